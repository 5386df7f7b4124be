"""The CPU LUT matmul for decode (``cpu_lut_gemv.cc``, docs/design.md §5).

XLA on a CPU cannot look a 4-bit code up in a per-row table at the speed it
streams float weights (a select tree costs ~1.2 ns a weight here, a float32
matrix-vector product ~0.15 ns), so decoding a quantized model through XLA is
several times slower than float. This kernel does the lookup with one vector
permute per 16 codes and reads only the packed codes.

It is C++, built on first use with the machine's C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against jaxlib's FFI headers, with
``-O3 -march=native`` (``FLAGS``), into the cache (``$ANY4_JAX_CACHE``, default
``~/.cache/any4-jax``), keyed by the source, jaxlib's version, the compiler, the
flags and the CPU (``cpu_id``: its model and features, on x86 and Arm alike).
Where it cannot be built (no compiler, an error, a compile past
``COMPILE_TIMEOUT_S``), ``available()`` is False, says why once (a warning), and
the library uses its XLA path. ``isa()`` says which inner loop the build has
(AVX-512, AVX2 or the plain loop). ``ANY4_JAX_CPU_KERNEL=0`` turns it off.
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
ISAS = ("scalar", "avx2", "avx512")  # what a build's inner loop uses (Any4LutGemvIsa)


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


FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
COMPILE_TIMEOUT_S = 300  # a compile that hangs must not hang the first decode step for ever
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def cpu_id() -> str:
    """What ``-march=native`` depends on: the machine, the CPU's model and feature
    lines (x86: ``model name``/``flags``; Arm: ``Features``, ``CPU implementer``,
    ``CPU part``) and the kernel's hardware capability bits (HWCAP)."""
    parts = [platform.machine()]
    try:
        keys = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
        seen = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name = line.split(":", 1)[0].strip()
            if name in keys and name not in seen:  # the first processor's: they are alike
                seen[name] = line
        parts += [seen[k] for k in keys if k in seen]
    except OSError:
        parts.append(platform.processor())
    try:
        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        parts.append(f"hwcap {getauxval(_AT_HWCAP):#x} {getauxval(_AT_HWCAP2):#x}")
    except (OSError, AttributeError):
        pass
    return "\n".join(parts)


def plain_flags() -> tuple[str, ...]:
    """``FLAGS`` for this machine's baseline instruction set (no AVX2 or AVX-512 on
    x86): the plain loop, as a CPU without them runs it."""
    march = {"x86_64": "-march=x86-64", "AMD64": "-march=x86-64", "aarch64": "-march=armv8-a",
             "arm64": "-march=armv8-a"}.get(platform.machine())
    return tuple(f for f in FLAGS if f != "-march=native") + ((march,) if march else ())


def build(compiler: str | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """The built shared library (compiled now unless cached: keyed by the source,
    jaxlib, the compiler and its version, the flags and ``cpu_id``). Raises
    RuntimeError with the compiler's message if it cannot be built in
    ``COMPILE_TIMEOUT_S``."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    source = resources.files(__package__).joinpath(SOURCE).read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{compiler} --version did not answer in 60 s") from e
    key = hashlib.sha256(b"\0".join(s if isinstance(s, bytes) else s.encode() for s in (
        source, jaxlib.__version__, compiler, version, " ".join(flags), cpu_id()))).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_lut_gemv-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # then one rename: never half a library
        src, lib = Path(tmp) / SOURCE, Path(tmp) / out.name
        src.write_bytes(source)
        cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(src), "-o", str(lib)]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"building {SOURCE} took over {COMPILE_TIMEOUT_S} s ({' '.join(cmd[:2])} ...)") from e
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE} failed ({' '.join(cmd[:2])} ...):\n{result.stderr[-2000:]}")
        os.replace(lib, out)
    return out



def register(flags: tuple[str, ...] = FLAGS, target: str = TARGET):
    """Build the kernel with ``flags`` (cached), load it and register it with XLA
    as the FFI target ``target``; returns the loaded library. Raises RuntimeError
    or OSError if it cannot be built or loaded."""
    library = ctypes.cdll.LoadLibrary(str(build(flags=flags)))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.Any4LutGemv), platform="cpu")
    return library


def isa_of(library) -> str:
    """The instruction set a loaded build's inner loop uses (``ISAS``)."""
    return ISAS[library.Any4LutGemvIsa()]


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded, registered kernel library, or None (a warning says why, once)."""
    if os.environ.get(ENV_OFF, "1") == "0":
        return None
    try:
        return register()
    except (RuntimeError, OSError) as e:
        warnings.warn(f"the CPU LUT kernel is not available, quantized layers use XLA (slower): {e}",
                      stacklevel=3)
        return None


def available() -> bool:
    """Whether the kernel is built and registered with XLA (building it if
    needed; a warning says why not, once)."""
    return _library() is not None


available.cache_clear = _library.cache_clear  # tests rebuild it


def isa() -> str | None:
    """The instruction set the built kernel's inner loop uses (``ISAS``), or None
    where it is not available."""
    library = _library()
    return None if library is None else isa_of(library)


def lut_gemv(x, codes, lut, scales, zeros, *, group_size: int, target: str = TARGET):
    """``x (M, K) @ W^T`` in float32 for a packed ``W (N, K)`` (codes as
    ``layout.pack_codes`` lays them out at the LUT's bits, ``lut`` (N, 4 | 8 | 16);
    lut/scales/zeros float32, bfloat16 or float16); ``group_size`` a multiple of 64, or one group a row.
    ``available()`` must be True. Rows of W are split over XLA's
    CPU threads only when jax has one CPU device: with several (virtual) devices,
    each runs its own calls on the same cores."""
    m, k = x.shape
    n = codes.shape[0]
    use_pool = np.int64(len(jax.local_devices(backend="cpu")) == 1)
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")(
        x.astype(jnp.float32), codes, lut, scales, zeros, group_size=np.int64(group_size), use_pool=use_pool)
