"""What every model folder needs, whatever its format: its errors, atomic
writes that replace only what is ours, the parameter count, the compute dtype
and the tokenizer beside it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.formats import QuantizedWeight


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
    """Parameters of a params tree; a ``QuantizedWeight`` counts the N x K weights it stands for."""
    is_q = lambda x: isinstance(x, QuantizedWeight)
    return int(sum(x.shape[0] * x.shape[1] if is_q(x) else np.prod(x.shape)
                   for x in jax.tree_util.tree_leaves(params, is_leaf=is_q)))


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(dtype, saved: str):
    """``dtype`` (None: ``saved``) as a jnp dtype, if it is one of ``COMPUTE_DTYPES``."""
    name = saved if dtype is None else dtype
    try:
        name = jnp.dtype(name).name
    except TypeError:
        pass
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}; accepted: {', '.join(COMPUTE_DTYPES)} (or None: as saved)")
    return jnp.dtype(name)


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
