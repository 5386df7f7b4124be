"""Model directories: orbax params + ``config.json`` + tokenizer + ``manifest.json``.

    OUT_DIR/
      params/          orbax checkpoint of the params pytree
      config.json      HF-style config (what ``ModelConfig.from_hf`` reads)
      manifest.json    format version, source, dtype, parameter count and, for a
                       quantized model, its versioned ``Recipe`` (docs/design.md §7)
      tokenizer files  (``tokenizer.save_pretrained``)

Every write goes to a temporary sibling directory that is renamed into place
at the end, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from any4_jax.formats import QuantizedWeight, pack_codes
from any4_jax.models import ModelConfig, Transformer, param_shapes
from any4_jax.quantize import QuantDenseFactory, Recipe, bits_per_weight
from any4_jax.sharding import shardings

# 3: codes in 64-element kernel blocks (pallas_kernels.lut_matmul.pack_codes);
# 2: "quantization" holds a versioned Recipe, codes packed in pairs (element 2i in the
#    low nibble); 1: as 2, with the fields of the old layer factory. 1 and 2 load
#    through _repack_pairs.
MANIFEST_VERSION = 3


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or of the wrong kind."""


def check_output_dir(out_dir, overwrite: bool = False, inputs=()) -> Path:
    """``out_dir`` as an absolute path if a model may be written there, else a
    FileExistsError naming it and why. A new path is fine; an existing one only
    with ``overwrite``, and even then only an empty directory or a directory this
    project wrote (``manifest.json``) — never a file, the current directory or one
    of its parents, an input, or a directory that holds an input. Call it before
    the long work."""
    out = Path(out_dir).absolute()
    _check_writable(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise FileExistsError(f"output directory {out} already exists; pass overwrite=True "
                              f"(--overwrite) to replace it")
    real, cwd = out.resolve(), Path.cwd().resolve()
    if not real.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a model directory; --overwrite never replaces a file")
    if real == cwd or real in cwd.parents:
        raise FileExistsError(f"--out {out} is the current directory or one of its parents; "
                              f"--overwrite never replaces it")
    for path in map(lambda p: Path(p).resolve(), inputs):
        if real == path or real in path.parents:
            raise FileExistsError(f"--out {out} is the input {path} or holds it; choose another output directory")
    if any(real.iterdir()) and not (real / "manifest.json").is_file():
        raise FileExistsError(f"--out {out} is not empty and not a model directory written by any4-jax "
                              f"(no manifest.json); --overwrite only replaces those")
    return out


def _check_writable(out: Path):
    """A PermissionError now, not after the work, if nothing can be written
    where ``out`` would go (its nearest existing parent; probed with a temp dir)."""
    existing = next(p for p in out.parents if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".any4-probe-"))
    except OSError as e:
        raise PermissionError(f"cannot write {out}: {existing} is not writable ({e.strerror or e})") from e


@contextlib.contextmanager
def atomic_directory(out_dir, overwrite: bool = False, inputs=()):
    """Yield a temporary directory that becomes ``out_dir`` when the block
    succeeds (``check_output_dir`` rules for what ``overwrite`` may replace)."""
    out = check_output_dir(out_dir, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def write_model_dir(tmp: Path, params, hf_config: dict, tokenizer=None, manifest: dict | None = None):
    """Write all parts of a model directory into ``tmp`` (an ``atomic_directory``)."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(tmp / "params", params)
    finally:  # also on Ctrl-C: the async writer must stop before the caller removes tmp
        checkpointer.close()
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    info = {"format_version": MANIFEST_VERSION, "parameters": count_params(params), "quantized": False}
    info.update(manifest or {})
    (tmp / "manifest.json").write_text(json.dumps(info, indent=2))


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
    elif version not in (1, 2, MANIFEST_VERSION):
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
               hf_config: dict | None = None) -> dict:
    """Write a float or quantized ``Transformer`` and its params to ``out_dir``
    (atomically). Quantized params keep their dtypes (uint8 codes, LUTs,
    scales); the manifest records how they were made (the ``Recipe``). ``hf_config``
    (default: ``model.config.to_hf()``) is written as ``config.json``. Returns the manifest."""
    manifest = {"dtype": np.dtype(model.dtype).name, "model_type": model.config.model_type,
                "source": None if source is None else str(source)}
    if isinstance(model.dense, QuantDenseFactory):
        manifest["quantized"] = True
        manifest["quantization"] = {**model.dense.recipe.to_dict(), "bits_per_weight": bits_per_weight(params)}
    with atomic_directory(out_dir, overwrite=overwrite, inputs=() if source is None else (source,)) as tmp:
        write_model_dir(tmp, params, hf_config or model.config.to_hf(), tokenizer, manifest)
    return json.loads((Path(out_dir) / "manifest.json").read_text())


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _compute_dtype(dtype, saved: str):
    """``dtype`` (None: ``saved``) as a jnp dtype, if it is one of ``COMPUTE_DTYPES``."""
    name = saved if dtype is None else dtype
    try:
        name = jnp.dtype(name).name
    except TypeError:
        pass
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}; accepted: {', '.join(COMPUTE_DTYPES)} (or None: as saved)")
    return jnp.dtype(name)


def load_model(model_dir, *, dtype=None, tokenizer: bool | str = True, require: str | None = None, mesh=None,
               matmul: str = "auto"):
    """``(model, params, tokenizer)`` from a directory written by the converter
    or ``save_model``. Quantized checkpoints load as they were saved (never
    re-quantized).

    ``dtype`` is the compute dtype (default: the dtype the checkpoint was saved
    in). ``require="float"`` or ``"quantized"`` refuses the other kind. The
    tokenizer is ``None`` when the directory has none or ``tokenizer=False``;
    ``tokenizer="required"`` makes a missing one a ``CheckpointError``.
    With a ``mesh`` (see ``any4_jax.sharding``) every array is read straight
    into its shards by the partition rules. ``matmul`` is the quantized layers'
    ``qmatmul`` path (``layers.MATMUL_PATHS``).
    """
    d = Path(model_dir)
    manifest = read_manifest(d)
    quant = manifest.get("quantization")
    if require not in (None, "float", "quantized"):
        raise ValueError(f"require must be None, 'float' or 'quantized'; got {require!r}")
    if require == "quantized" and not quant:
        raise CheckpointError(f"{d} holds a float model; a quantized one is required here "
                              f"(make one with `any4 quantize --model {d} --out DIR`)")
    if require == "float" and quant:
        raise CheckpointError(f"{d} holds a model already quantized to {quant['fmt']}; a float model is "
                              f"required here (quantize the original float checkpoint instead)")
    config = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    model = Transformer(config, dtype=_compute_dtype(dtype, manifest.get("dtype", "float32")))
    if quant:
        model = model.clone(dense=QuantDenseFactory(manifest_recipe(d, manifest), matmul, mesh))
    if manifest["format_version"] < 3 and quant:  # codes packed in pairs: repack on one device, then place
        params = _repack_pairs(_restore(d / "params", param_shapes(model), pair_packed_codes=True))
        if mesh is not None:
            params = jax.device_put(params, shardings(params, mesh))
    else:
        params = _restore(d / "params", param_shapes(model), mesh)
    tok = load_tokenizer(d) if tokenizer else None
    if tok is None and tokenizer == "required":
        raise CheckpointError(f"{d} has no tokenizer (tokenizer.json or tokenizer_config.json), which this "
                              f"needs: convert the model from a folder that has one")
    return model, params, tok


def load_tokenizer(model_dir):
    """The Hugging Face tokenizer saved in ``model_dir``, or None if it has none.
    Never runs code from the folder (``trust_remote_code=False``)."""
    d = Path(model_dir)
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer  # ~2 s to import: only where a tokenizer is read

    try:
        return AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except Exception as e:  # a damaged file surfaces as many kinds of error
        raise CheckpointError(f"the tokenizer in {d} could not be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e


def _repack_pairs(params):
    """Codes of format versions 1-2 (element 2i in the low nibble of byte i) in today's layout."""
    def repack(qw):
        if not isinstance(qw, QuantizedWeight):
            return qw
        pairs = jnp.stack([qw.codes & 0xF, qw.codes >> 4], axis=-1).reshape(qw.shape[0], -1)[:, :qw.shape[1]]
        return dataclasses.replace(qw, codes=pack_codes(pairs))

    return jax.tree_util.tree_map(repack, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def _restore(path: Path, abstract, mesh=None, pair_packed_codes: bool = False):
    """Restore an orbax params tree with the structure of ``abstract`` (the
    model's own, ``QuantizedWeight`` nodes included), the dtypes as saved, and,
    with a mesh, the partition rules' shardings. Every saved shape must be the
    model's (``pair_packed_codes``: codes of format versions 1-2 are half of K wide)."""
    checkpointer = ocp.StandardCheckpointer()
    path = path.absolute()
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
    if set(saved) != {_keys(p) for p, _ in targets}:
        missing = sorted("/".join(k) for k in {_keys(p) for p, _ in targets} - set(saved))
        raise CheckpointError(f"{path} does not match the model in config.json/manifest.json "
                              f"(missing: {', '.join(missing[:5]) or 'none'})")
    wrong = [f"{'/'.join(_keys(p))} is {tuple(saved[_keys(p)].shape)}, the model needs {tuple(a.shape)}"
             for p, a in targets if tuple(saved[_keys(p)].shape) != tuple(a.shape)
             and not (pair_packed_codes and _keys(p)[-1] == "codes")]
    if wrong:
        raise CheckpointError(f"{path} does not match config.json/manifest.json: {'; '.join(wrong[:3])}"
                              f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}")
    if mesh is not None:
        placements = jax.tree_util.tree_leaves(shardings(abstract, mesh))
    else:  # one device, whatever topology the checkpoint was written from
        placements = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(targets)
    leaves = [jax.ShapeDtypeStruct(saved[_keys(p)].shape, saved[_keys(p)].dtype, sharding=sh)
              for (p, _), sh in zip(targets, placements)]
    target = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)
    try:
        return checkpointer.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read: {_first_line(e)} (a damaged or incomplete "
                              f"checkpoint: convert or save the model again)") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
