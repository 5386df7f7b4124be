"""Quantized Dense layers. Every quantized matmul goes through ``qmatmul``
(docs/design.md §5); every quantized layer computes with ``quantized_dense``."""

from __future__ import annotations

import functools
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from any4_jax.formats import QuantizedWeight, dequantize
from pallas_kernels import cpu
from pallas_kernels.layout import CODE_BLOCK, expand_codes, low_nibble_elements, packed_columns
from pallas_kernels.lut_matmul import block_sizes, lut_matmul, self_check

MATMUL_PATHS = ("auto", "kernel", "cpu", "xla")
MATMUL_ENV = "ANY4_JAX_MATMUL"  # read by the command line only (any4_jax.cli)
PARALLEL = (None, "column", "row")
# Largest M for which "auto" takes the CPU kernel (its AVX2 / AVX-512 build, and its
# plain loop on a CPU without them) and "xla" the fused reduction; above, dequantize +
# dot. Picked from ``python -m benchmarks.cpu_matmul_bench`` (docs/design.md §5).
CPU_KERNEL_MAX_M = 64
PLAIN_KERNEL_MAX_M = 16
FUSED_MAX_M = 8


def check_matmul_path(path: str) -> str:
    if path not in MATMUL_PATHS:
        raise ValueError(f"unknown matmul path {path!r}; accepted: {', '.join(MATMUL_PATHS)}")
    return path


def kernel_offered() -> bool:
    """Whether ``"auto"`` may use the Pallas kernel here: an NVIDIA GPU of compute
    capability 8.0 or newer (its MMAs and PTX need it; ROCm and older GPUs take XLA)."""
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    cc = re.fullmatch(r"(\d+)\.(\d+)", str(getattr(device, "compute_capability", "")))
    return "nvidia" in device.device_kind.lower() + str(getattr(device.client, "platform_version", "")).lower() \
        and cc is not None and int(cc.group(1)) >= 8


_KERNEL_FAILURE: list = []  # the first failed self-check of this process: "auto" takes XLA after it


@functools.lru_cache(maxsize=None)
def kernel_verified(x_dtype: str, param_dtype: str, bits: int, group_size: int, k: int, blocks) -> bool:
    """Whether the kernel passed ``lut_matmul.self_check`` for this configuration
    (run once a process and configuration; compiled on a GPU, else in interpret
    mode). The first failure warns, once, and every later answer is False."""
    if _KERNEL_FAILURE:
        return False
    # In a thread of its own: JAX's trace state is per thread, so the check runs now even
    # when a model that calls this is being traced.
    with ThreadPoolExecutor(1) as pool:
        failure = pool.submit(self_check, x_dtype, param_dtype, bits, group_size, k, blocks,
                              interpret=jax.default_backend() != "gpu").result()
    if failure:
        _KERNEL_FAILURE.append(failure)
        warnings.warn(f"the Pallas LUT kernel failed its self-check on {jax.devices()[0].device_kind} ({failure}); "
                      f"quantized layers use XLA instead (slower). {MATMUL_ENV}=xla silences this, "
                      f"{MATMUL_ENV}=kernel uses the kernel anyway", RuntimeWarning, stacklevel=2)
    return not failure


def choose_matmul(path: str, m: int, qw: QuantizedWeight, sharded: bool = False, x_dtype=None) -> str:
    """What computes ``qmatmul`` for ``m`` rows of x (of ``x_dtype``, default the
    weight's storage dtype): ``"kernel"`` (Pallas), ``"cpu"`` (the CPU kernel),
    ``"fused"`` or ``"dequantize"`` (XLA). ``"auto"`` takes the Pallas kernel only
    where it is offered (``kernel_offered``) and passed its self-check for the
    configuration (``kernel_verified``); ``"kernel"`` takes it without a check.
    ``sharded``: on a mesh, where on a CPU ``"auto"`` and ``"xla"`` take
    dequantize + dot, which XLA partitions well (CPU devices of one machine share
    its cores; per-shard kernels and the fused reduction measured slower there,
    ``benchmarks/scaling.py``)."""
    check_matmul_path(path)
    if path == "kernel":
        return "kernel"
    if path == "auto" and kernel_offered():
        n, k = qw.shape
        x_dtype = jnp.dtype(x_dtype or qw.lut.dtype)
        if kernel_verified(x_dtype.name, jnp.dtype(qw.lut.dtype).name, qw.bits, qw.group_size, k,
                           block_sizes(m, n, k, qw.group_size, qw.bits)):
            return "kernel"
    if sharded and path in ("auto", "xla"):
        return "dequantize"
    whole_bytes = _group_bytes(qw) is not None  # what the CPU kernel and the fused sum take
    if path == "cpu":
        if not whole_bytes:
            raise ValueError(f"the CPU kernel takes group sizes that are multiples of 64 (or one group a row); "
                             f"this weight has {qw.group_size}")
        if not cpu.available():
            raise RuntimeError("the CPU kernel could not be built (see the warning above); use path='xla'")
        return "cpu"
    if path == "auto" and jax.default_backend() == "cpu" and whole_bytes and cpu.available():
        if m <= (PLAIN_KERNEL_MAX_M if cpu.isa() == "scalar" else CPU_KERNEL_MAX_M):
            return "cpu"
    return "fused" if m <= FUSED_MAX_M and whole_bytes else "dequantize"


def qmatmul(x, qw: QuantizedWeight, *, path: str = "auto", **kernel_options):
    """``x @ W^T`` for ``x (..., K)`` and ``W (N, K)`` given by ``qw``; returns ``x.dtype``.

    ``path``: ``"kernel"`` = the Pallas LUT matmul (in interpret mode when there
    is no GPU); ``"cpu"`` = the C++ CPU kernel (``pallas_kernels.cpu``);
    ``"xla"`` = XLA only (a fused reduction over the codes for up to
    ``FUSED_MAX_M`` rows, else dequantize + ``dot``); ``"auto"`` (default) = the
    Pallas kernel on a GPU, the CPU kernel for up to ``CPU_KERNEL_MAX_M`` rows on
    a CPU where it builds, else XLA. ``kernel_options`` go to ``lut_matmul``.
    """
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features; the quantized weight {qw.shape} expects K = {k}")
    return _run(x, qw, choose_matmul(path, x.size // k, qw, x_dtype=x.dtype), **kernel_options)


def _run(x, qw: QuantizedWeight, how: str, **kernel_options):
    """``qmatmul`` computed by ``how`` (a ``choose_matmul`` answer)."""
    n, k = qw.shape
    x2 = x.reshape(-1, k)
    if how == "kernel":
        kernel_options.setdefault("interpret", jax.default_backend() != "gpu")
        y = lut_matmul(x2, qw.codes, qw.lut, qw.scales, qw.zeros, k=k, group_size=qw.group_size, **kernel_options)
    elif how == "cpu":
        y = cpu.lut_gemv(x2, qw.codes, qw.lut, qw.scales, qw.zeros, group_size=qw.group_size)
    elif how == "fused":
        y = fused_matmul(x2, qw)
    else:
        return dequantize_matmul(x, qw)
    return y.reshape(*x.shape[:-1], n).astype(x.dtype)


def dequantize_matmul(x, qw: QuantizedWeight):
    """XLA ``x @ W^T`` for any M: W dequantized to ``x.dtype``, one ``dot``
    accumulating in float32 (prefill, large batches)."""
    w = dequantize(qw, x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _group_bytes(qw: QuantizedWeight):
    """4-bit packed bytes per group when every group is a run of whole bytes (G a
    multiple of the 64-element code block, or one group a row); else None."""
    if qw.group_size % CODE_BLOCK == 0:
        return qw.group_size // 2
    return packed_columns(qw.shape[1]) if qw.n_groups == 1 else None


def _lookup(lut, codes):
    """``lut[n, codes[n, ...]]`` as a select tree on the code bits: elementwise,
    so XLA fuses it into the consumer (a gather would not vectorize)."""
    values = [lut[:, j].reshape(-1, *([1] * (codes.ndim - 1))) for j in range(lut.shape[1])]
    bit = 0
    while len(values) > 1:
        take_odd = ((codes >> bit) & 1).astype(bool)
        values = [jnp.where(take_odd, values[i + 1], values[i]) for i in range(0, len(values), 2)]
        bit += 1
    return values[0]


def fused_matmul(x, qw: QuantizedWeight):
    """XLA ``x @ W^T`` for ``x (M, K)`` with small M, float32, without building W.

    ``x`` is permuted into the codes' storage order (low and high nibbles), so
    one reduction over each group's bytes computes ``sum_k x[k] * lut[code]``;
    XLA fuses unpacking, lookup and multiply into it. Then ``y = sum_g t * scale
    + group_sums(x) @ zeros^T``. Work per weight does not shrink with M, so this
    is for decode (``FUSED_MAX_M``).
    """
    n, k = qw.shape
    m = x.shape[0]
    group_bytes = _group_bytes(qw)
    groups = qw.n_groups
    cols = groups * group_bytes
    codes = expand_codes(qw.codes, qw.bits)  # 2- and 3-bit codes as 4-bit blocks (fused by XLA)
    codes = jnp.pad(codes, ((0, 0), (0, cols - codes.shape[1]))).reshape(n, groups, group_bytes)
    x = x.astype(jnp.float32)
    low = low_nibble_elements(2 * cols)
    xp = jnp.pad(x, ((0, 0), (0, 2 * cols - k)))  # zeros: the padding adds nothing
    x_low, x_high = (xp[:, low + i].reshape(m, 1, groups, group_bytes) for i in (0, 1))
    lut = qw.lut.astype(jnp.float32)
    t = (_lookup(lut, codes & 15) * x_low + _lookup(lut, codes >> 4) * x_high).sum(-1)  # (M, N, groups)
    y = (t * qw.scales.astype(jnp.float32)).sum(-1)
    group_sums = (x_low + x_high).sum(-1).reshape(m, groups)
    return y + group_sums @ qw.zeros.astype(jnp.float32).T


def per_shard_qmatmul(x, qw: QuantizedWeight, mesh, parallel: str, path: str = "kernel"):
    """``qmatmul`` on a kernel (``path``: ``"kernel"`` or ``"cpu"``), run on each
    shard with ``shard_map`` (a custom kernel is opaque to XLA's partitioner,
    which would gather whole weights to every device). ``mesh`` axes are ``(data, model)``.
    ``parallel``: ``"column"`` (rows of W split; the output comes out split along
    N) or ``"row"`` (K split; the partial products are summed with ``psum``). The
    batch dimension is split over ``data`` when it divides."""
    data, model = mesh.axis_names
    n, k = qw.shape
    tp = mesh.shape[model]
    batch = data if x.shape[0] % mesh.shape[data] == 0 else None
    middle = (None,) * (x.ndim - 2)
    if parallel == "column":
        x_spec, w_spec, lut_spec = P(batch, *middle, None), P(model, None), P(model, None)
        out_spec, local_shape = P(batch, *middle, model), (n // tp, k)
    elif parallel == "row":
        x_spec, w_spec, lut_spec = P(batch, *middle, model), P(None, model), P(None, None)
        out_spec, local_shape = P(batch, *middle, None), (n, k // tp)
    else:
        raise ValueError(f"parallel must be 'column' or 'row'; got {parallel!r}")

    def local(x, codes, lut, scales, zeros):
        w = QuantizedWeight(codes, lut, scales, zeros, local_shape, qw.bits, qw.group_size, qw.fmt)
        y = qmatmul(x, w, path=path)
        if parallel == "row":
            y = jax.lax.psum(y.astype(jnp.float32), model).astype(x.dtype)
        return y

    # check_vma=False: a pallas_call does not say how its output varies over the mesh
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec, lut_spec, w_spec, w_spec),
                         out_specs=out_spec, check_vma=False)(x, qw.codes, qw.lut, qw.scales, qw.zeros)


def quantized_dense(x, qw: QuantizedWeight, bias=None, *, dtype=None, path: str = "auto",
                    parallel: str | None = None, mesh=None):
    """The body of every quantized layer: cast ``x`` to ``dtype`` (default
    ``x.dtype``), ``qmatmul`` (per shard on a mesh with the kernel path), add ``bias``."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    how = choose_matmul(path, x.size // x.shape[-1], qw, sharded=mesh is not None, x_dtype=dtype)
    if mesh is not None and parallel is not None and how in ("kernel", "cpu"):
        y = per_shard_qmatmul(x, qw, mesh, parallel, how)
    else:
        y = _run(x, qw, how)
    return y if bias is None else y + bias.astype(dtype)


class QuantDense(nn.Module):
    """Drop-in for ``nn.Dense`` (same ``features``, ``use_bias``, ``dtype``) whose
    ``kernel`` parameter is a ``QuantizedWeight`` (``(features, K)``, PyTorch layout).

    ``fmt``, ``group_size``, ``storage_dtype``: the stored weight's shapes.
    ``matmul``: the ``qmatmul`` path. ``parallel``: how the model splits this
    layer over a mesh's model axis (``"column"``, ``"row"`` or None), used with
    ``mesh`` to run the kernel per shard.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    fmt: str = "any4"
    group_size: int | None = 128
    storage_dtype: Any = "bfloat16"
    matmul: str = "auto"
    parallel: str | None = None
    mesh: Any = None

    @nn.compact
    def __call__(self, x):
        qw = self.param("kernel", lambda _: QuantizedWeight.abstract(
            self.features, x.shape[-1], self.fmt, self.group_size, self.storage_dtype))
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        return quantized_dense(x, qw, bias, dtype=self.dtype, path=self.matmul, parallel=self.parallel,
                               mesh=self.mesh)
