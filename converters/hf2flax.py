"""Hugging Face PyTorch checkpoint -> any4-jax Flax model directory, one part at a time.

    python -m converters.hf2flax --model HF_DIR --out OUT_DIR [--dtype auto|float32|bfloat16|float16] [--overwrite]

Reads ``config.json`` and the weights (``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin``,
which needs torch), maps names, transposes linear weights to Flax's
``(in, out)`` layout and writes the model directory (``any4_jax.checkpoint``)
one part (embedding, decoder layer, norm, head) at a time: tensors are read
with plain file reads, not a memory map, so memory holds about one part. The
dtype follows the checkpoint's weights unless ``--dtype`` says otherwise. The
output appears atomically. ``open_hf_dir`` reads the same parts for
``any4 convert --quantize`` (quantized on the way, never written as float).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from any4_jax.checkpoint import (ParamSource, atomic_directory, check_output_dir, count_params, fingerprint,
                                 finish_model_dir, load_tokenizer, model_manifest, release_memory, write_part)
from any4_jax import hub
from any4_jax.models import ModelConfig, Transformer, hf_name, param_shapes
from converters import run_command
from any4_jax.tensorfiles import SafetensorsFile, shard_path

DTYPES = ("auto", "float32", "bfloat16", "float16")
FLOAT_DTYPES = {"F64": "float32", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # -> the dtype "auto" picks
_TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
                 "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                 "uint8": "U8", "bool": "BOOL"}
_CHECK_ELEMENTS = 1 << 24  # finiteness is checked this many elements at a time (bounded memory)


class TensorReader:
    """Reads named tensors one at a time from safetensors (single or sharded) or a .bin."""

    def __init__(self, model_dir: Path, allow_bin: bool = True):
        self.dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        binary = model_dir / "pytorch_model.bin"
        self._torch_state = None
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from e
            shards = {f: SafetensorsFile(shard_path(model_dir, f, index)) for f in sorted(set(weight_map.values()))}
            self._files = {name: shards[f] for name, f in weight_map.items()}
            for name, f in self._files.items():
                if name not in f.tensors:
                    raise ValueError(f"{index} places tensor {name} in {f.path.name}, which does not hold it")
            self.weight_files = [f.path for f in shards.values()] + [index]
        elif single.exists():
            f = SafetensorsFile(single)
            self._files = {name: f for name in f.tensors}
            self.weight_files = [single]
        elif binary.exists() and not allow_bin:
            raise ValueError(f"{binary} is a PyTorch pickle (which runs code when loaded); pass --allow-bin "
                             f"(allow_bin=True) to read it, or convert it to safetensors first")
        elif binary.exists():
            try:
                import torch
            except ImportError as e:
                raise SystemExit(f"{binary} is a PyTorch pickle; reading it needs torch "
                                 f"(pip install torch), or convert it to safetensors first") from e
            self._torch_state = torch.load(binary, map_location="cpu", mmap=True, weights_only=True)
            self._files = {name: binary for name in self._torch_state}
            self.weight_files = [binary]
        else:
            raise FileNotFoundError(f"no weights in {model_dir}: expected model.safetensors, "
                                    f"model.safetensors.index.json or pytorch_model.bin (a Hub model with only "
                                    f"pytorch_model.bin is fetched with --allow-bin)")

    @property
    def names(self):
        return list(self._files)

    def __contains__(self, name):
        return name in self._files

    def dtype(self, name: str) -> str:
        """The stored dtype, in safetensors' spelling (``"BF16"``, ``"I8"``, ...)."""
        if self._torch_state is not None:
            return _TORCH_DTYPES.get(str(self._torch_state[name].dtype).removeprefix("torch."), "?")
        return self._files[name].tensors[name][0]

    def shape(self, name: str) -> tuple:
        if self._torch_state is not None:
            return tuple(self._torch_state[name].shape)
        return self._files[name].tensors[name][1]

    def get(self, name: str) -> np.ndarray:
        if self._torch_state is not None:
            t = self._torch_state[name]
            return (t.float() if t.is_floating_point() else t).numpy()  # exact for f16/bf16; cast later
        return self._files[name].read(name)


def source_dtype(reader: TensorReader, names) -> str:
    """The dtype ``"auto"`` takes: that of the float tensors holding most of the bytes of ``names``."""
    weights = Counter()
    for name in names:
        if name in reader and reader.dtype(name) in FLOAT_DTYPES:
            weights[FLOAT_DTYPES[reader.dtype(name)]] += int(np.prod(reader.shape(name)))
    return weights.most_common(1)[0][0] if weights else "float32"


def open_hf_dir(model_dir, dtype: str = "auto", *, revision: str | None = None,
                allow_bin: bool = False) -> ParamSource:
    """A Hugging Face model folder, or Hub id (``any4_jax.hub.resolve``:
    ``revision``; a ``.bin`` checkpoint only with ``allow_bin``), as a
    ``ParamSource``: its float params, read one part at a time in Flax's layout
    and ``dtype`` (``"auto"``: the checkpoint's own, ``source_dtype``)."""
    model_dir = hub.resolve(model_dir, revision=revision, allow_bin=allow_bin).absolute()
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --model must be a Hugging Face model "
                                f"directory with config.json and weights")
    try:
        hf_config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from e
    config = ModelConfig.from_hf(hf_config)
    reader = TensorReader(model_dir, allow_bin)
    abstract = param_shapes(Transformer(config))
    names = {path: hf_name(path) for path in _flatten(abstract)}
    for path, (name, _) in names.items():
        if name not in reader:
            raise KeyError(f"tensor {name} (for Flax param {'/'.join(path)}) is missing from {model_dir}")
    if dtype == "auto":
        dtype = source_dtype(reader, [n for n, _ in names.values()])
    expected_extra = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings else ())
    used = {n for n, _ in names.values()}
    unused = sorted(n for n in reader.names if n not in used and not n.endswith(expected_extra))
    if unused:
        warnings.warn(f"{len(unused)} tensor(s) in {model_dir} are not used by its config "
                      f"({config.model_type}) and were not converted: {', '.join(unused[:5])}"
                      f"{' ...' if len(unused) > 5 else ''}", stacklevel=2)
    out_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)

    def read(keys):
        part = {}
        for key in keys:
            for path, spec in _flatten({key: abstract[key]}).items():
                name, transpose = names[path]
                _set(part, path, _weight(reader, name, model_dir, spec.shape, transpose, out_dtype))
        return part

    index = [f for f in reader.weight_files if f.suffix == ".json"]
    tensors = [f for f in reader.weight_files if f.suffix != ".json"]
    return ParamSource(model_dir, hf_config, dtype, read, fingerprint([config_path, *index], tensors))


def _weight(reader, name, model_dir, shape, transpose, out_dtype) -> np.ndarray:
    """One tensor in Flax's layout and ``out_dtype``, checked: a float dtype, the
    config's shape, finite."""
    stored = reader.dtype(name)
    if stored not in FLOAT_DTYPES:
        what = ("an FP8-quantized checkpoint, whose scales this converter does not apply"
                if stored.startswith("F8") else "not a float weight")
        raise ValueError(f"tensor {name} in {model_dir} is stored as {stored} ({what}); a weight must be "
                         f"F32, F16, BF16 or F64")
    expected = tuple(shape[::-1] if transpose else shape)  # in the checkpoint's layout
    if tuple(reader.shape(name)) != expected:
        raise ValueError(f"tensor {name} has shape {tuple(reader.shape(name))}; the config asks for {expected}")
    tensor = reader.get(name)
    flat, count, first = tensor.reshape(-1), 0, None
    for start in range(0, flat.size, _CHECK_ELEMENTS):  # in slices: no float32 copy of a whole bf16 tensor
        bad = ~np.isfinite(flat[start:start + _CHECK_ELEMENTS].astype(np.float32))
        if bad.any():
            count += int(bad.sum())
            first = first if first is not None else np.unravel_index(start + int(np.argmax(bad)), tensor.shape)
    if count:
        raise ValueError(f"tensor {name} in {model_dir} has {count} NaN/Inf value(s), the first at "
                         f"{tuple(int(i) for i in first)}; the checkpoint is damaged")
    tensor = tensor.T if transpose else tensor
    return np.ascontiguousarray(tensor.astype(out_dtype, copy=False))


def load_hf_params(model_dir, dtype: str = "auto", progress: bool = True):
    """``(config dict, ModelConfig, Flax params)`` from an HF model directory, whole in memory."""
    source = open_hf_dir(model_dir, dtype)
    keys = list(param_shapes(Transformer(source.config)))
    params = {}
    for key in tqdm(keys, desc="converting", unit="part", disable=not progress):
        params.update(source.read([key]))
    return source.hf_config, source.config, params


def convert(model_dir, out_dir, *, dtype: str = "auto", overwrite: bool = False, progress: bool = True,
            revision: str | None = None, allow_bin: bool = True) -> dict:
    """Convert ``model_dir`` into the model directory ``out_dir``, one part at a
    time (peak memory about one part: a decoder layer, or the embedding), written
    atomically. ``dtype``: ``"auto"`` (the checkpoint's own), ``"float32"``,
    ``"bfloat16"`` or ``"float16"``. Returns the manifest (plus ``seconds``)."""
    model_dir = Path(model_dir)
    check_output_dir(out_dir, overwrite, inputs=[model_dir])  # fail before the long work, not after it
    start = time.perf_counter()
    source = open_hf_dir(model_dir, dtype, revision=revision, allow_bin=allow_bin)
    model_dir = source.path
    tokenizer = load_tokenizer(model_dir)
    model = Transformer(source.config, dtype=np.dtype(ml_dtypes.bfloat16 if source.dtype == "bfloat16"
                                                      else source.dtype))
    keys, parameters = list(param_shapes(model)), 0
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[model_dir]) as tmp:
        for key in tqdm(keys, desc=f"converting to {source.dtype}", unit="part", disable=not progress):
            part = source.read([key])
            parameters += count_params(part)
            write_part(tmp / "params", key, part[key])
            del part
            release_memory()
        manifest = model_manifest(model, parameters, source=model_dir)
        finish_model_dir(tmp, source.hf_config, tokenizer, manifest)
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def add_arguments(p: argparse.ArgumentParser):
    """The conversion flags (``any4 convert`` adds the quantization flags to them)."""
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + weights) or Hub id")
    p.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit (default: main)")
    p.add_argument("--allow-bin", action="store_true",
                   help="read a pytorch_model.bin (a pickle; without it only safetensors are read from the Hub)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="parameter dtype (default auto: the checkpoint's own, e.g. bfloat16 in, bfloat16 out)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m converters.hf2flax", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = p.parse_args(argv)
    return run_command(lambda: run(args), args.debug)


def run(args) -> int:
    """Convert by the flags of ``add_arguments``; print one line."""
    m = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite, revision=args.revision,
                allow_bin=args.allow_bin or Path(args.model).exists())
    chosen = " (the checkpoint's own)" if args.dtype == "auto" else ""
    print(f"wrote {args.out}: {m['model_type']}, {m['parameters']:,} parameters, {m['dtype']}{chosen}, "
          f"{m['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
