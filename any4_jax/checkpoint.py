"""Model directories: orbax params + ``config.json`` + tokenizer + ``manifest.json``.

    OUT_DIR/
      params/          orbax checkpoint of the params pytree
      config.json      HF-style config (what ``ModelConfig.from_hf`` reads)
      manifest.json    format version, source, dtype, parameter count, ...
      tokenizer files  (``tokenizer.save_pretrained``)

Every write goes to a temporary sibling directory that is renamed into place
at the end, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np

MANIFEST_VERSION = 1


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or of the wrong kind."""


@contextlib.contextmanager
def atomic_directory(out_dir, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` when the block succeeds."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists; pass overwrite=True "
                              f"(--overwrite) to replace it")
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
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
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
    manifest = json.loads((d / "manifest.json").read_text())
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise CheckpointError(f"{d}/manifest.json has format_version "
                              f"{manifest.get('format_version')!r}; this any4-jax reads {MANIFEST_VERSION}")
    return manifest


def load_model(model_dir, *, dtype=None, tokenizer: bool = True):
    """``(model, params, tokenizer)`` from a directory written by the converter.

    ``dtype`` is the compute dtype (default: the dtype the checkpoint was
    saved in). The tokenizer is ``None`` when the directory has none or
    ``tokenizer=False``.
    """
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from any4_jax.models import ModelConfig, Transformer

    d = Path(model_dir)
    manifest = read_manifest(d)
    config = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    params = ocp.StandardCheckpointer().restore((d / "params").absolute())
    model = Transformer(config, dtype=jnp.dtype(dtype or manifest.get("dtype", "float32")))
    tok = None
    if tokenizer and (d / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(d))
    return model, params, tok
