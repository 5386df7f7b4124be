"""The CPU LUT matmul for decode (``cpu_lut_gemv.cc``, docs/design.md §5).

XLA on a CPU cannot look a 4-bit code up in a per-row table at the speed it
streams float weights (a select tree costs ~1.2 ns a weight here, a float32
matrix-vector product ~0.15 ns), so decoding a quantized model through XLA is
several times slower than float. This kernel does the lookup with one vector
permute per 16 codes and reads only the packed codes.

It is C++, built on first use with the machine's C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against jaxlib's FFI headers, with
``-O3 -march=native``, into the cache (``$ANY4_JAX_CACHE``, default
``~/.cache/any4-jax``), keyed by the source, jaxlib's version, the compiler and
the CPU. Where it cannot be built, ``available()`` is False, says why once (a
warning), and the library uses its XLA path. ``ANY4_JAX_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = "any4_cpu_lut_gemv"
SOURCE = "cpu_lut_gemv.cc"
ENV_OFF = "ANY4_JAX_CPU_KERNEL"


def cache_dir() -> Path:
    """The project's cache (``$ANY4_JAX_CACHE``, default ``~/.cache/any4-jax``):
    built kernels here, downloaded models in ``any4_jax.assets``."""
    d = Path(os.environ.get("ANY4_JAX_CACHE", Path.home() / ".cache" / "any4-jax"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [l for l in info.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def build(compiler: str | None = None) -> Path:
    """The built shared library (compiled now unless cached). Raises
    RuntimeError with the compiler's message if it cannot be built."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    source = resources.files(__package__).joinpath(SOURCE).read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join(s if isinstance(s, bytes) else s.encode() for s in (
        source, jaxlib.__version__, version, _cpu_id()))).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_lut_gemv-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # then one rename: never half a library
        src, lib = Path(tmp) / SOURCE, Path(tmp) / out.name
        src.write_bytes(source)
        cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", str(src), "-o", str(lib)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE} failed ({' '.join(cmd[:2])} ...):\n{result.stderr[-2000:]}")
        os.replace(lib, out)
    return out


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel is built and registered with XLA (building it if
    needed; a warning says why not, once)."""
    if os.environ.get(ENV_OFF, "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Any4LutGemv), platform="cpu")
        return True
    except (RuntimeError, OSError) as e:
        warnings.warn(f"the CPU LUT kernel is not available, quantized layers use XLA (slower): {e}",
                      stacklevel=2)
        return False


def lut_gemv(x, codes, lut, scales, zeros, *, group_size: int):
    """``x (M, K) @ W^T`` in float32 for a packed ``W (N, K)`` (codes as
    ``lut_matmul.pack_codes`` lays them out; lut/scales/zeros float32, bfloat16
    or float16); ``group_size`` a multiple of 64, or one group a row.
    ``available()`` must be True. Rows of W are split over XLA's
    CPU threads only when jax has one CPU device: with several (virtual) devices,
    each runs its own calls on the same cores."""
    m, k = x.shape
    n = codes.shape[0]
    use_pool = np.int64(len(jax.local_devices(backend="cpu")) == 1)
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")(
        x.astype(jnp.float32), codes, lut, scales, zeros, group_size=np.int64(group_size), use_pool=use_pool)
