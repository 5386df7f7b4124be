"""Hugging Face PyTorch checkpoint -> any4-jax Flax model directory.

    python -m converters.hf2flax --model HF_DIR --out OUT_DIR [--dtype bfloat16|float32] [--overwrite]
        [--quantize any4 --group-size 128 --calibration default|FILE|none]

Reads ``config.json`` and the weights (``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin``,
which needs torch), maps names, transposes linear weights to Flax's
``(in, out)`` layout and writes an orbax checkpoint, ``config.json``, the
tokenizer files and ``manifest.json``. Tensors are read one at a time, so peak
memory is about one copy of the model; the output appears atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from any4_jax import quantize
from any4_jax.checkpoint import check_output_dir, load_tokenizer, save_model
from any4_jax.formats import FORMATS
from any4_jax.models import ModelConfig, Transformer, param_shapes
from converters import run_command

DTYPES = ("float32", "bfloat16")


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax param path -> (HF tensor name, whether to transpose)."""
    parts = [re.sub(r"^(layers|experts)_(\d+)$", r"\1.\2", p) for p in path]
    leaf = parts[-1]
    transpose = leaf == "kernel"
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    name = ".".join(parts)
    return (name if name.startswith("lm_head") else "model." + name), transpose


def _inside(model_dir: Path, name: str, index: Path) -> Path:
    """A shard named by the index, which must be a file inside ``model_dir`` (an
    untrusted index may not point elsewhere)."""
    path = (model_dir / name).resolve()
    if model_dir.resolve() not in path.parents:
        raise ValueError(f"{index} names the shard {name!r}, which is outside {model_dir}; "
                         f"shards must be files in the model folder")
    return path


class TensorReader:
    """Reads named tensors one at a time from safetensors (single or sharded) or a .bin."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        binary = model_dir / "pytorch_model.bin"
        self._handles = {}
        self._torch_state = None
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: _inside(model_dir, f, index) for name, f in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in self._open(single).keys()}
        elif binary.exists():
            try:
                import torch
            except ImportError as e:
                raise SystemExit(f"{binary} is a PyTorch pickle; reading it needs torch "
                                 f"(pip install torch), or convert it to safetensors first") from e
            self._torch_state = torch.load(binary, map_location="cpu", mmap=True, weights_only=True)
            self.files = {name: binary for name in self._torch_state}
        else:
            raise FileNotFoundError(f"no weights in {model_dir}: expected model.safetensors, "
                                    f"model.safetensors.index.json or pytorch_model.bin")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="flax")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"cannot read {path}: {e} (truncated or corrupt safetensors file?)") from e
        return self._handles[path]

    def __contains__(self, name):
        return name in self.files

    def get(self, name: str):
        if self._torch_state is not None:
            return self._torch_state[name].float().numpy()  # exact for f16/bf16; cast later
        try:
            return self._open(self.files[name]).get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name} from {self.files[name]}: {e} "
                             f"(truncated or corrupt safetensors file?)") from e


def load_hf_params(model_dir, dtype: str = "float32", progress: bool = True):
    """``(config dict, ModelConfig, Flax params)`` from an HF model directory."""
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --model must be a Hugging Face model "
                                f"directory with config.json and weights")
    hf_config = json.loads(config_path.read_text())
    config = ModelConfig.from_hf(hf_config)
    shapes = param_shapes(Transformer(config))
    reader = TensorReader(model_dir)

    flat = _flatten(shapes)
    params, used = {}, set()
    for path, spec in tqdm(flat.items(), desc="converting", unit="tensor", disable=not progress):
        name, transpose = hf_name(path)
        if name not in reader:
            raise KeyError(f"tensor {name} (for Flax param {'/'.join(path)}) is missing from {model_dir}")
        tensor = reader.get(name)
        expected = tuple(spec.shape[::-1] if transpose else spec.shape)  # in the checkpoint's layout
        if tuple(tensor.shape) != expected:
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}; the config asks for {expected}")
        bad = ~np.isfinite(np.asarray(tensor, np.float32))
        if bad.any():
            raise ValueError(f"tensor {name} in {model_dir} has {int(bad.sum())} NaN/Inf value(s), the first at "
                             f"{tuple(int(i) for i in np.argwhere(bad)[0])}; the checkpoint is damaged")
        used.add(name)
        _set(params, path, jnp.asarray(tensor.T if transpose else tensor, dtype=dtype))
    expected_extra = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings else ())
    unused = sorted(n for n in reader.files if n not in used and not n.endswith(expected_extra))
    if unused:
        warnings.warn(f"{len(unused)} tensor(s) in {model_dir} are not used by its config "
                      f"({config.model_type}) and were not converted: {', '.join(unused[:5])}"
                      f"{' ...' if len(unused) > 5 else ''}", stacklevel=2)
    return hf_config, config, params


def convert(model_dir, out_dir, *, dtype: str = "float32", overwrite: bool = False, progress: bool = True,
            fmt: str | None = None, group_size: int | None = 128, calibration="default",
            **quantize_options) -> dict:
    """Convert (and, with ``fmt=FORMAT``, quantize) ``model_dir`` into
    ``out_dir``, written atomically. ``calibration``: ``"default"``, a prompt
    string, or ``None``; ``quantize_options`` go to ``quantize_model``.
    Returns the manifest (plus ``seconds``)."""
    model_dir = Path(model_dir)
    check_output_dir(out_dir, overwrite, inputs=[model_dir])  # fail before the long work, not after it
    start = time.perf_counter()
    hf_config, config, params = load_hf_params(model_dir, dtype, progress)
    tokenizer = load_tokenizer(model_dir)
    model = Transformer(config, dtype=jnp.dtype(dtype))
    if fmt:
        model, params = quantize.quantize_model(model, params, fmt=fmt, group_size=group_size,
                                                calibration=calibration, tokenizer=tokenizer, progress=progress,
                                                **quantize_options)
    manifest = save_model(out_dir, model, params, tokenizer, overwrite=overwrite,
                          source=model_dir.absolute(), hf_config=hf_config)
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m converters.hf2flax", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quantize", choices=FORMATS, help="also quantize every linear layer but lm_head to this format")
    quantize.add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = p.parse_args(argv)

    def body():
        options = quantize.from_arguments(args) if args.quantize else {}
        m = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite,
                    fmt=args.quantize, **options)
        what = f"{m['quantization']['fmt']}, {m['quantization']['bits_per_weight']} bits/weight" \
            if m.get("quantization") else m["dtype"]
        print(f"wrote {args.out}: {m['model_type']}, {m['parameters']:,} parameters, {what}, {m['seconds']} s")
        return 0

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
