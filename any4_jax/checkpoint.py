"""Model directories: orbax params, one checkpoint per part + ``config.json`` + tokenizer + ``manifest.json``.

    OUT_DIR/
      params/<key>/    one orbax checkpoint for each top-level params key (a "part":
                       embed_tokens, layers_0, ..., norm, lm_head), written one at a time
      config.json      HF-style config (what ``ModelConfig.from_hf`` reads)
      manifest.json    format version, source, dtype, parameter count and, for a
                       quantized model, its versioned ``Recipe`` (docs/design.md §7)
      tokenizer files  (``tokenizer.save_pretrained``)

Every write goes to a temporary sibling directory that is renamed into place
at the end, so a crash never leaves a directory that looks complete; a long
write (``ResumableWrite``) keeps its finished parts there and continues after
an interrupt. ``ParamSource`` reads a float model a few parts at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from any4_jax import hf_format, hub
from any4_jax.files import (CheckpointError, atomic_directory, check_output_dir, compute_dtype,
                             count_params, load_tokenizer)
from any4_jax.formats import QuantizedWeight, get_format, pack_codes
from pallas_kernels.layout import repack
from any4_jax.models import ModelConfig, Transformer, param_shapes
from any4_jax.recipe import QuantDenseFactory, Recipe, bits_per_weight
from any4_jax.sharding import shardings

# 5: 2- and 3-bit codes take 2 and 3 bits (16- and 24-byte blocks, pallas_kernels.layout);
# 4: params/ holds one orbax checkpoint per top-level key (written and read a part at a time),
#    2- and 3-bit codes in 4-bit containers (as in 1-3; repacked when read: _in_containers);
# 3: one orbax checkpoint of all params, codes in 64-element kernel blocks (pallas_kernels.layout.pack_codes);
# 2: "quantization" holds a versioned Recipe, codes packed in pairs (element 2i in the
#    low nibble); 1: as 2, with the fields of the old layer factory. 1 and 2 load
#    through _repack_pairs; 1 to 3 through _restore of the one checkpoint.
MANIFEST_VERSION = 5


def write_part(params_dir: Path, key: str, tree):
    """Write one part (the subtree of a top-level params key) as its own orbax
    checkpoint, ``params_dir/key``, renamed into place once complete."""
    params_dir.mkdir(parents=True, exist_ok=True)
    tmp = (params_dir / f".{key}.tmp-{uuid.uuid4().hex[:8]}").absolute()
    # Synchronous and uncompressed: zstd's buffers held 1.7x a large leaf (an 8B model's 1 GB
    # embedding) while it was written, the plain write one copy; compression saved ~25% on disk.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
        checkpointer.save(tmp, args=ocp.args.PyTreeSave(tree))
    if (params_dir / key).exists():  # a part written before an interrupt, never committed
        shutil.rmtree(params_dir / key)
    os.rename(tmp, params_dir / key)


def release_memory():
    """Hand memory freed since the last call back to the system: glibc keeps
    freed blocks in each thread's arena, which after one block of a large model
    held hundreds of MB (a no-op where there is no ``malloc_trim``)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def model_manifest(model, parameters: int, *, source=None, recipe: Recipe | None = None,
                   bits: float | None = None) -> dict:
    """The manifest of a model directory (``read_manifest`` checks it)."""
    manifest = {"format_version": MANIFEST_VERSION, "parameters": int(parameters), "quantized": recipe is not None,
                "dtype": np.dtype(model.dtype).name, "model_type": model.config.model_type,
                "source": None if source is None else str(Path(source).absolute())}
    if recipe is not None:
        manifest["quantization"] = {**recipe.to_dict(), "bits_per_weight": bits}
    return manifest


def finish_model_dir(tmp: Path, hf_config: dict, tokenizer=None, manifest: dict | None = None):
    """Write what a model directory holds besides its parts into ``tmp``; the
    manifest last (what marks the directory complete)."""
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def read_manifest(model_dir) -> dict:
    d = Path(model_dir)
    for name in ("manifest.json", "config.json", "params"):
        if not (d / name).exists():
            raise CheckpointError(f"{d} is not an any4-jax model directory: {name} is missing "
                                  f"(make one with `python -m converters.hf2flax`)")
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d}/manifest.json is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{d}/manifest.json must hold a JSON object; it holds a {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version == 1 and manifest.get("quantization"):  # v1: the same fields, without a version
        manifest["quantization"] = {"recipe_version": 1, **manifest["quantization"]}
    elif version not in (1, 2, 3, 4, MANIFEST_VERSION):
        raise CheckpointError(f"{d}/manifest.json has format_version {version!r}; this any4-jax reads "
                              f"1 to {MANIFEST_VERSION} (a newer any4-jax wrote it? upgrade any4-jax)")
    dtype = manifest.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"{d}/manifest.json has dtype {dtype!r}; accepted: float32, bfloat16, float16")
    if not isinstance(manifest.get("quantization") or {}, dict):
        raise CheckpointError(f"{d}/manifest.json: quantization must be an object (the recipe) or absent; "
                              f"got {manifest['quantization']!r}")
    return manifest


def manifest_recipe(model_dir, manifest: dict) -> Recipe | None:
    """The ``Recipe`` of a quantized model's manifest (None for a float model)."""
    quant = manifest.get("quantization")
    if not quant:
        return None
    fields = {k: v for k, v in quant.items() if k != "bits_per_weight"}
    try:
        return Recipe.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(model_dir)}/manifest.json: {e}") from e


def save_model(out_dir, model, params, tokenizer=None, *, overwrite: bool = False, source=None,
               hf_config: dict | None = None, format: str = "any4") -> dict:
    """Write a float or quantized ``Transformer`` and its params to ``out_dir``
    (atomically), one part per top-level key. Quantized params keep their dtypes
    (uint8 codes, LUTs, scales); the manifest records how they were made (the
    ``Recipe``). ``hf_config`` (default: ``model.config.to_hf()``) is written as
    ``config.json``. ``format="safetensors"`` writes a quantized model as the
    Hugging Face-style folder of ``hf_format`` instead (docs/checkpoint_format.md).
    Returns the manifest (or that folder's ``config.json``)."""
    if format == "safetensors":
        return hf_format.write(out_dir, model, params.__getitem__, hf_config or model.config.to_hf(), tokenizer,
                               overwrite=overwrite, source=source)
    if format != "any4":
        raise ValueError(f"unknown format {format!r}; accepted: any4 (a model directory), safetensors")
    recipe = model.dense.recipe if isinstance(model.dense, QuantDenseFactory) else None
    manifest = model_manifest(model, count_params(params), source=source, recipe=recipe,
                              bits=bits_per_weight(params) if recipe else None)
    with atomic_directory(out_dir, overwrite=overwrite, inputs=() if source is None else (source,)) as tmp:
        for key, part in params.items():
            write_part(tmp / "params", key, part)
        finish_model_dir(tmp, hf_config or model.config.to_hf(), tokenizer, manifest)
    return manifest


def load_model(model_dir, *, dtype=None, tokenizer: bool | str = True, require: str | None = None, mesh=None,
               matmul: str = "auto", revision: str | None = None):
    """``(model, params, tokenizer)`` from a directory written by the converter
    or ``save_model``. Quantized checkpoints load as they were saved (never
    re-quantized).

    ``dtype`` is the compute dtype (default: the dtype the checkpoint was saved
    in). ``require="float"`` or ``"quantized"`` refuses the other kind. The
    tokenizer is ``None`` when the directory has none or ``tokenizer=False``;
    ``tokenizer="required"`` makes a missing one a ``CheckpointError``.
    With a ``mesh`` (see ``any4_jax.sharding``) every array is read straight
    into its shards by the partition rules. ``matmul`` is the quantized layers'
    ``qmatmul`` path (``layers.MATMUL_PATHS``). ``model_dir`` may be a Hugging
    Face Hub id (``hub.resolve``; ``revision``).
    """
    if require not in (None, "float", "quantized"):
        raise ValueError(f"require must be None, 'float' or 'quantized'; got {require!r}")
    d = hub.resolve(model_dir, revision=revision)
    if hf_format.is_exported(d):  # a folder any4 export wrote (docs/checkpoint_format.md)
        if require == "float":
            raise CheckpointError(f"{d} holds a quantized model; a float model is required here")
        model, params = hf_format.read(d, dtype=dtype, matmul=matmul, mesh=mesh)
    else:
        model, params = _read_model_dir(d, dtype, require, mesh, matmul)
    tok = load_tokenizer(d) if tokenizer else None
    if tok is None and tokenizer == "required":
        raise CheckpointError(f"{d} has no tokenizer (tokenizer.json or tokenizer_config.json), which this "
                              f"needs: convert the model from a folder that has one")
    return model, params, tok


def _read_model_dir(d: Path, dtype, require, mesh, matmul):
    """``(model, params)`` of a model directory (manifest.json; see ``load_model``)."""
    manifest = read_manifest(d)
    quant = manifest.get("quantization")
    if require == "quantized" and not quant:
        raise CheckpointError(f"{d} holds a float model; a quantized one is required here "
                              f"(make one with `any4 quantize --model {d} --out DIR`)")
    if require == "float" and quant:
        raise CheckpointError(f"{d} holds a model already quantized to {quant['fmt']}; a float model is "
                              f"required here (quantize the original float checkpoint instead)")
    config = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    model = Transformer(config, dtype=compute_dtype(dtype, manifest.get("dtype", "float32")))
    if quant:
        model = model.clone(dense=manifest_recipe(d, manifest).dense(matmul, mesh))
    abstract = param_shapes(model)
    if manifest["format_version"] < 3 and quant:  # codes packed in pairs: repack on one device, then place
        params = _repack_pairs(_restore(d / "params", abstract, other_codes_width=True))
        if mesh is not None:
            params = jax.device_put(params, shardings(params, mesh))
    else:
        params = read_parts(d, manifest, abstract, None if mesh is None else shardings(abstract, mesh))
    return model, params


def _repack_pairs(params):
    """Codes of format versions 1-2 (element 2i in the low nibble of byte i) in today's layout."""
    def from_pairs(qw):
        pairs = jnp.stack([qw.codes & 0xF, qw.codes >> 4], axis=-1).reshape(qw.shape[0], -1)[:, :qw.shape[1]]
        return dataclasses.replace(qw, codes=pack_codes(pairs, qw.bits))

    return _map_quantized(from_pairs, params)


def _in_containers(manifest: dict) -> bool:
    """Whether a model directory's 2- or 3-bit codes sit in 4-bit containers (format versions 1-4)."""
    quant = manifest.get("quantization")
    return bool(quant) and manifest["format_version"] < 5 and get_format(quant["fmt"]).bits < 4


def _map_quantized(f, params):
    return jax.tree_util.tree_map(lambda x: f(x) if isinstance(x, QuantizedWeight) else x, params,
                                  is_leaf=lambda x: isinstance(x, QuantizedWeight))


def read_parts(d: Path, manifest: dict, abstract, placements=None, keys=None):
    """The params of model directory ``d`` (only the top-level ``keys``, if given),
    as ``abstract`` describes them, each part restored straight into its
    ``placements`` (a tree of shardings like ``abstract``; default: one device)."""
    keys = list(abstract) if keys is None else list(keys)
    containers = _in_containers(manifest)  # then read on one device, repacked at the codes' bits, placed
    where = None if placements is None or containers else {k: placements[k] for k in keys}
    if manifest["format_version"] < 4:  # one checkpoint of every part
        params = _restore(d / "params", {k: abstract[k] for k in keys}, where, partial=keys != list(abstract),
                          other_codes_width=containers)
    else:
        found = sorted(p.name for p in (d / "params").iterdir() if p.is_dir() and not p.name.startswith("."))
        if sorted(abstract) != found:
            raise CheckpointError(f"{d / 'params'} holds the parts {found}; the model in config.json/manifest.json "
                                  f"needs {sorted(abstract)} (a damaged or incomplete checkpoint: write it again)")
        params = {k: _restore(d / "params" / k, abstract[k], None if where is None else where[k],
                              other_codes_width=containers) for k in keys}
    if not containers:
        return params
    params = _map_quantized(lambda qw: dataclasses.replace(qw, codes=repack(qw.codes, qw.shape[1], qw.bits)), params)
    return params if placements is None else jax.device_put(params, {k: placements[k] for k in keys})


def _restore(path: Path, abstract, placements=None, other_codes_width: bool = False, partial: bool = False):
    """Restore an orbax params tree with the structure of ``abstract`` (the
    model's own, ``QuantizedWeight`` nodes included), the dtypes as saved, and
    the shardings of ``placements`` (default: one device). Every saved shape must
    be the model's (``other_codes_width``: but the codes', as in older format
    versions: pairs, 4-bit containers); ``partial``: the checkpoint may hold more
    than ``abstract``."""
    with ocp.StandardCheckpointer() as checkpointer:  # closed after: its threads and buffers go
        return _restore_with(checkpointer, path.absolute(), abstract, placements, other_codes_width, partial)


def _restore_with(checkpointer, path, abstract, placements, other_codes_width, partial):
    try:
        metadata = checkpointer.metadata(path).item_metadata
    except Exception as e:  # orbax/tensorstore raise many kinds
        raise CheckpointError(f"{path} could not be read: {_first_line(e)} (a damaged or incomplete "
                              f"checkpoint: convert or save the model again)") from e
    saved = {_keys(p): m for p, m in jax.tree_util.tree_leaves_with_path(metadata)}
    if not saved:
        raise CheckpointError(f"{path} could not be read: it lists no arrays (a damaged or incomplete "
                              f"checkpoint: convert or save the model again)")
    targets = jax.tree_util.tree_leaves_with_path(abstract)
    wanted = {_keys(p) for p, _ in targets}
    if not wanted <= set(saved) or (not partial and wanted != set(saved)):
        missing = sorted("/".join(k) for k in wanted - set(saved))
        raise CheckpointError(f"{path} does not match the model in config.json/manifest.json "
                              f"(missing: {', '.join(missing[:5]) or 'none'})")
    wrong = [f"{'/'.join(_keys(p))} is {tuple(saved[_keys(p)].shape)}, the model needs {tuple(a.shape)}"
             for p, a in targets if tuple(saved[_keys(p)].shape) != tuple(a.shape)
             and not (other_codes_width and _keys(p)[-1] == "codes")]
    if wrong:
        raise CheckpointError(f"{path} does not match config.json/manifest.json: {'; '.join(wrong[:3])}"
                              f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}")
    if placements is not None:
        placements = jax.tree_util.tree_leaves(placements)
    else:  # one device, whatever topology the checkpoint was written from
        placements = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(targets)
    leaves = [jax.ShapeDtypeStruct(saved[_keys(p)].shape, saved[_keys(p)].dtype, sharding=sh)
              for (p, _), sh in zip(targets, placements)]
    target = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)
    try:
        if not partial:
            return checkpointer.restore(path, target)
        args = jax.tree_util.tree_map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            path, args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True))
    except Exception as e:
        raise CheckpointError(f"{path} could not be read: {_first_line(e)} (a damaged or incomplete "
                              f"checkpoint: convert or save the model again)") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """A float model's params, read a few parts (top-level keys) at a time.

    ``read(keys)`` returns ``{key: subtree}`` for those keys; ``dtype`` is the
    params' dtype (and the compute dtype a model of them takes); ``fingerprint``
    changes when the files behind it do (a resumed write checks it).
    """
    path: Path
    hf_config: dict
    dtype: str
    read: Callable
    fingerprint: str

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config)


def open_model_dir(model_dir, *, revision: str | None = None) -> ParamSource:
    """The float model in ``model_dir`` (from ``any4 convert``; or a Hub id) as a
    ``ParamSource``; a ``CheckpointError`` if it is not one, or already quantized."""
    d = hub.resolve(model_dir, revision=revision).absolute()
    manifest = read_manifest(d)
    if manifest.get("quantization"):
        raise CheckpointError(f"{d} holds a model already quantized to {manifest['quantization'].get('fmt')}; a "
                              f"float model is required here (quantize the original float checkpoint instead)")
    hf_config = json.loads((d / "config.json").read_text())
    dtype = manifest.get("dtype", "float32")
    abstract = param_shapes(Transformer(ModelConfig.from_hf(hf_config), dtype=jnp.dtype(dtype)))
    read = lambda keys: read_parts(d, manifest, abstract, keys=keys)
    return ParamSource(d, hf_config, dtype, read, fingerprint([d / "manifest.json", d / "config.json"], [d / "params"]))


def fingerprint(read=(), stat=()) -> str:
    """What changes when the files behind a model do: the contents of the
    files in ``read``, and the name, size and modification time of each file
    in ``stat`` (a folder there: of every file under it)."""
    h = hashlib.sha256()
    for f in map(Path, read):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    for entry in map(Path, stat):
        for f in sorted(entry.rglob("*")) if entry.is_dir() else [entry]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(entry.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


class ResumableWrite:
    """A model directory written one part at a time that survives an interrupt.

    Use as a context manager. The work directory, ``.OUT.partial`` beside
    ``OUT``, holds ``progress.json`` (the ``identity`` of the work and its
    committed ``state``), the finished parts under ``params/`` and arrays the
    next step needs. Write parts into ``path / "params"``, save arrays with
    ``save_arrays``, then ``commit(state)``: only committed parts count, so a
    kill at any moment loses at most the step in progress. Entering with a
    work directory of the same ``identity`` continues from its state
    (``resume=None`` or ``True``; ``True`` also requires one); a different
    identity is refused, and ``resume=False`` discards the old work first.
    ``finish`` writes the rest of the model directory and renames it into
    place (``check_output_dir`` rules, checked again). On an error or an
    interrupt the work directory stays, and the exception says so.
    """

    def __init__(self, out_dir, identity: dict, *, overwrite: bool = False, resume: bool | None = None, inputs=()):
        self.out = check_output_dir(out_dir, overwrite, inputs)
        self.identity = json.loads(json.dumps(identity))  # as progress.json will hold it
        self.overwrite, self.resume, self.inputs = overwrite, resume, inputs
        self.path = self.out.parent / f".{self.out.name}.partial"
        self.state: dict = {}
        self._arrays: dict = {}

    def __enter__(self):
        progress = self._progress()
        if progress is not None and (self.resume is False or progress["identity"] != self.identity):
            if self.resume is not False:
                changed = sorted(k for k in set(progress["identity"]) | set(self.identity)
                                 if progress["identity"].get(k) != self.identity.get(k))
                raise CheckpointError(
                    f"{self.path} holds unfinished work on {self.out.name} with another {', '.join(changed)}: run "
                    f"the command that started it to continue, or start over with --restart (resume=False), "
                    f"which deletes it")
            shutil.rmtree(self.path)
            progress = None
        if progress is None:
            if self.resume:
                raise CheckpointError(f"nothing to resume for {self.out}: no unfinished work in {self.path}")
            if self.path.exists() or self.path.is_symlink():
                raise FileExistsError(f"{self.path} exists and was not written by any4-jax (no progress.json); "
                                      f"move it away")
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.new-"))
            (tmp / "params").mkdir()
            _write_json(tmp / "progress.json", {"identity": self.identity, "state": {}, "parts": [], "arrays": {}})
            os.rename(tmp, self.path)
            progress = self._progress()
        self.state, self._arrays = progress["state"], progress["arrays"]
        committed = set(progress["parts"])
        for p in (self.path / "params").iterdir():  # written after the last commit: never finished
            if p.name not in committed:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for f in self.path.glob("*.npz"):
            if f.name not in self._arrays.values():
                f.unlink()
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and self.path.exists():
            parts = len(self._progress()["parts"])
            note = (f"{parts} finished part(s) are kept in {self.path}: run the same command again to continue"
                    if parts else f"nothing was finished ({self.path} is kept)")
            if hasattr(error, "add_note"):
                error.add_note(note)
        return False

    def save_arrays(self, name: str, arrays):
        """Save a list of arrays (float32 on disk: exact for 16-bit floats) for the next commit."""
        file = f"{name}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.path / f".{file}"
        with open(tmp, "wb") as f:
            np.savez(f, *[np.asarray(jnp.asarray(a, jnp.float32)) for a in arrays])
        os.replace(tmp, self.path / file)
        self._arrays[name] = file

    def load_arrays(self, name: str, dtype) -> list:
        """The committed arrays saved as ``name``, cast to ``dtype``."""
        with np.load(self.path / self._arrays[name]) as z:
            return [jnp.asarray(z[f"arr_{i}"], dtype) for i in range(len(z.files))]

    def commit(self, state: dict):
        """Record ``state`` and every part now under ``params/`` as finished."""
        parts = sorted(p.name for p in (self.path / "params").iterdir() if not p.name.startswith("."))
        _write_json(self.path / "progress.json", {"identity": self.identity, "state": state, "parts": parts,
                                                  "arrays": self._arrays})
        self.state = state
        for f in self.path.glob("*.npz"):  # arrays of earlier commits
            if f.name not in self._arrays.values():
                f.unlink()

    def finish(self, hf_config: dict, tokenizer, manifest: dict):
        """Complete the model directory and rename it into place as ``out``."""
        finish_model_dir(self.path, hf_config, tokenizer, manifest)
        out = check_output_dir(self.out, self.overwrite, self.inputs)
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            os.rename(out, trash)
        os.rename(self.path, out)
        shutil.rmtree(trash, ignore_errors=True)
        for f in [out / "progress.json", *out.glob("*.npz")]:  # the work's own files: not part of a model
            f.unlink()

    def _progress(self) -> dict | None:
        f = self.path / "progress.json"
        if not f.is_file():
            return None
        try:
            progress = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f} is damaged ({e}); delete {self.path} to start over") from e
        if not isinstance(progress, dict) or not {"identity", "state", "parts", "arrays"} <= set(progress):
            raise CheckpointError(f"{f} is not an any4-jax progress file; delete {self.path} to start over")
        return progress


def _write_json(path: Path, data):
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def export(model_dir, out_dir, *, overwrite: bool = False) -> dict:
    """Export the quantized model directory ``model_dir`` (from ``any4 quantize``)
    as the Hugging Face-style folder of ``hf_format`` in ``out_dir``, a part at a
    time. Returns its ``config.json``."""
    d = Path(model_dir)
    manifest = read_manifest(d)
    if not manifest.get("quantization"):
        raise CheckpointError(f"{d} holds a float model; export takes a quantized one (any4 quantize first)")
    hf_config = json.loads((d / "config.json").read_text())
    model = Transformer(ModelConfig.from_hf(hf_config), dtype=jnp.dtype(manifest.get("dtype", "float32")))
    model = model.clone(dense=manifest_recipe(d, manifest).dense())
    abstract = param_shapes(model)
    return hf_format.write(out_dir, model, lambda key: read_parts(d, manifest, abstract, keys=[key])[key], hf_config,
                           load_tokenizer(d), overwrite=overwrite, source=d)
