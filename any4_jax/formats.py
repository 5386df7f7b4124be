"""Every format as "LUT + per-group scale and zero" (docs/design.md §2).

    W[n, k] ≈ lut[n, codes[n, k]] * scales[n, k // G] + zeros[n, k // G]

Storage (``QuantizedWeight``):
  * ``codes``  ``(N, packed_columns(K, bits))`` uint8: ``bits`` bits a code, in
    blocks of 64 elements laid out for the kernels (32, 24 or 16 bytes a block
    for 4, 3 or 2 bits; ``pallas_kernels.layout`` defines the order,
    ``pack_codes`` / ``unpack_codes`` convert). ``bits_per_weight`` counts
    the storage actually used.
  * ``lut``    ``(N, 2**bits)``: one table per row (int/nf4/fp4 repeat a fixed one).
  * ``scales``, ``zeros``  ``(N, n_groups)`` with ``n_groups = ceil(K / G)``.
  LUT, scales and zeros are stored as bfloat16 by default (``storage_dtype``;
  16-bit metadata as the kernel and tinygemm use: 4.25 bits a weight at G = 128
  and large K); codes are chosen in float32 and the metadata rounded after.
  ``storage_dtype="float32"`` keeps full precision (0.25 more bits a weight
  at G = 128).

int formats store ``lut = 0 .. 2**bits - 1`` and ``zero = min``, so they
dequantize bit-exactly to ``q * s + min`` (a centred ``lut - 2**(bits-1)`` is the
same format with the zero shifted; anyN uses that centring).

When K is not a multiple of G the last group is shorter: the padding takes no
part in min/max (edge padding), k-means (zero weight) or the output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import kmeans
from any4_jax.tables import FP4_TABLE, NF4_TABLE
from pallas_kernels.layout import pack_codes, packed_columns, unpack_codes


@dataclasses.dataclass(frozen=True)
class Format:
    """A quantization format: ``kind`` is ``"int"`` (min-max, asymmetric),
    ``"table"`` (absmax-scaled fixed ``table``, signed) or ``"learned"`` (a
    per-row LUT from weighted k-means)."""

    name: str
    bits: int
    kind: str
    table: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


FORMATS = {f.name: f for f in (
    Format("int4", 4, "int"), Format("int3", 3, "int"), Format("int2", 2, "int"),
    Format("nf4", 4, "table", NF4_TABLE), Format("fp4", 4, "table", FP4_TABLE),
    Format("any4", 4, "learned"), Format("any3", 3, "learned"), Format("any2", 2, "learned"))}
GROUP_SIZES = (32, 64, 128, 256, 512, 1024, None)
STORAGE_DTYPES = ("bfloat16", "float16", "float32")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def get_format(fmt: str) -> Format:
    """The ``Format`` named ``fmt``, or a ValueError listing the accepted names."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def check_group_size(group_size):
    """``group_size`` if supported (``None`` = one group a row), else a ValueError."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported group_size {group_size!r}; accepted: "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    return group_size


def check_storage_dtype(storage_dtype) -> jnp.dtype:
    """``storage_dtype`` as a numpy dtype, or a ValueError naming what is accepted."""
    try:
        dtype = jnp.dtype(storage_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in STORAGE_DTYPES:
        raise ValueError(f"unsupported storage_dtype {storage_dtype!r}; accepted: {', '.join(STORAGE_DTYPES)}")
    return dtype


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "lut", "scales", "zeros"],
    meta_fields=["shape", "bits", "group_size", "fmt"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``(N, K)`` weight (PyTorch layout: N outputs, K inputs).

    ``group_size`` is the actual group length (K when quantized with ``None``).
    """

    codes: jax.Array   # (N, packed_columns(K, bits)) uint8 (kernel layout)
    lut: jax.Array     # (N, 2**bits)
    scales: jax.Array  # (N, n_groups)
    zeros: jax.Array   # (N, n_groups)
    shape: tuple[int, int]
    bits: int
    group_size: int
    fmt: str

    @classmethod
    def abstract(cls, n: int, k: int, fmt: str, group_size: int | None, storage_dtype="bfloat16"):
        """A zero weight of the shapes ``quantize_tensor`` produces (for init and restore)."""
        bits, g = get_format(fmt).bits, k if group_size is None else group_size
        dtype = check_storage_dtype(storage_dtype)
        groups = (n, cdiv(k, g))
        return cls(jnp.zeros((n, packed_columns(k, bits)), jnp.uint8), jnp.zeros((n, 2 ** bits), dtype),
                   jnp.zeros(groups, dtype), jnp.zeros(groups, dtype), (n, k), bits, g, fmt)

    @property
    def n_groups(self) -> int:
        return cdiv(self.shape[1], self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.codes, self.lut, self.scales, self.zeros))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])


def dequantize(qw: QuantizedWeight, dtype=jnp.float32):
    """``(N, K)`` weight of ``dtype``: ``lut[codes] * scale + zero`` computed in float32."""
    n, k = qw.shape
    g = qw.group_size
    codes = unpack_codes(qw.codes, k, qw.bits).astype(jnp.int32)
    values = jnp.take_along_axis(qw.lut.astype(jnp.float32), codes, axis=1)
    values = _to_groups(values, g)
    out = values * qw.scales.astype(jnp.float32)[..., None] + qw.zeros.astype(jnp.float32)[..., None]
    return out.reshape(n, -1)[:, :k].astype(dtype)


def quantize_tensor(w, fmt: str = "any4", group_size: int | None = 128, *,
                    sample_weight=None, scale_sample_weight: bool = True, key=None,
                    storage_dtype="bfloat16", **kmeans_options) -> QuantizedWeight:
    """Quantize an ``(N, K)`` weight (PyTorch layout) to ``fmt``.

    Args:
      w: ``(N, K)`` float array.
      fmt: one of ``FORMATS``.
      group_size: one of ``GROUP_SIZES``; ``None`` is one group per row. K need
        not be a multiple of it (the last group is shorter).
      sample_weight: optional ``(K,)`` non-negative per-input-channel statistic
        (calibration, docs/design.md §3); used by anyN only.
      scale_sample_weight: anyN: multiply the k-means element weights by the
        group scale (``ω = a[k] * s[n, g(k)]``, the paper's best setting).
      key: PRNG key for k-means (anyN); default ``PRNGKey(0)``.
      storage_dtype: dtype of the stored LUT, scales and zeros: ``"bfloat16"``
        (default), ``"float16"`` or ``"float32"``.
      **kmeans_options: passed to ``kmeans.weighted_kmeans_1d``.
    """
    spec = get_format(fmt)
    check_group_size(group_size)
    storage_dtype = check_storage_dtype(storage_dtype)
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D (N, K) weight matrix; got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a float array; got dtype {w.dtype}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w must be non-empty; got shape {w.shape}")
    w = w.astype(jnp.float32)
    _check_finite(w, "w")
    if sample_weight is not None:
        sample_weight = jnp.asarray(sample_weight, jnp.float32)
        if sample_weight.shape != (k,):
            raise ValueError(f"sample_weight must have shape (K,) = ({k},) to match w of shape "
                             f"{w.shape}; got {sample_weight.shape}")
        _check_finite(sample_weight, "sample_weight")
        if bool(jnp.any(sample_weight < 0)):
            raise ValueError("sample_weight must be non-negative")

    g = k if group_size is None else group_size
    bits = spec.bits
    wg = _to_groups(w, g, mode="edge")  # (N, n_groups, G)
    if spec.kind == "int":
        lut, codes, scales, zeros = _quantize_int(wg, bits)
    elif spec.kind == "table":
        lut, codes, scales, zeros = _quantize_table(wg, spec.name)
    else:
        lut, codes, scales, zeros = _quantize_any(wg, bits, k, sample_weight,
                                                  scale_sample_weight, key, kmeans_options)
    return assemble(w, codes.reshape(n, -1)[:, :k], lut, scales, zeros, fmt, g, storage_dtype)


def round_to_nearest(w, fmt: str, group_size: int):
    """``dequantize(quantize_tensor(w, fmt, group_size))`` for the fixed formats
    (int and table), in float32 metadata and traceable under ``jax.jit``: what
    searches over many candidate weights (AWQ) compare."""
    spec = get_format(fmt)
    if spec.kind == "learned":
        raise ValueError(f"round_to_nearest takes a fixed format (int or table); {fmt} learns its table")
    n, k = w.shape
    wg = _to_groups(w.astype(jnp.float32), group_size, mode="edge")
    lut, codes, scales, zeros = _quantize_int(wg, spec.bits) if spec.kind == "int" else _quantize_table(wg, fmt)
    values = jnp.take_along_axis(lut, codes.reshape(n, -1).astype(jnp.int32), axis=1).reshape(wg.shape)
    return (values * scales[..., None] + zeros[..., None]).reshape(n, -1)[:, :k]


def assemble(w, codes, lut, scales, zeros, fmt: str, group_size: int, storage_dtype) -> QuantizedWeight:
    """The ``QuantizedWeight`` of ``w (N, K)`` from ``(N, K)`` codes and float32
    metadata, rounded to ``storage_dtype`` (a ValueError if it cannot hold them)."""
    for name, a in (("scale", scales), ("zero", zeros), ("LUT entry", lut)):
        _check_storable(a, name, storage_dtype, w)
    bits = get_format(fmt).bits
    return QuantizedWeight(pack_codes(codes, bits), lut.astype(storage_dtype), scales.astype(storage_dtype),
                           zeros.astype(storage_dtype), tuple(w.shape), bits, group_size, fmt)


def _to_groups(a, g, mode="constant"):
    """``(N, K)`` -> ``(N, ceil(K/g), g)``, padding the last group."""
    n, k = a.shape
    pad = -k % g
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad)), mode=mode)
    return a.reshape(n, -1, g)


def _check_finite(a, name):
    bad = ~jnp.isfinite(a)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])
        raise ValueError(f"{name} has {count} non-finite value(s) (NaN/Inf), the first at index "
                         f"{first}; quantization needs finite weights")


def _check_storable(a, name, dtype, w):
    """A ValueError if a float32 ``a`` overflowed or does not fit ``dtype``
    (weights near float32's maximum, or large weights with float16 metadata)."""
    bad = ~jnp.isfinite(a.astype(dtype))
    if bool(bad.any()):
        first = tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])
        raise ValueError(
            f"the {name} at (row, column) {first} is {float(a[first]):.4g}, which {jnp.dtype(dtype).name} cannot "
            f"hold: the weights are too large to quantize (|w| up to {float(jnp.abs(w).max()):.4g}, row "
            f"{first[0]} spans [{float(w[first[0]].min()):.4g}, {float(w[first[0]].max()):.4g}]). Rescale them"
            + (", or use storage_dtype='bfloat16' or 'float32'" if jnp.dtype(dtype) == jnp.float16 else ""))


def _divide(a, b):
    """``a / b`` with ``b`` broadcast to ``a``, correctly rounded. XLA rewrites a
    division by a broadcast into a multiplication by the reciprocal (not the
    float32 formula of docs/design.md §2); the barrier hides the broadcast from it."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def _min_max_scale(wg, levels):
    mn = wg.min(axis=-1)
    return mn, _divide(jnp.maximum(wg.max(axis=-1) - mn, 1e-6), jnp.float32(levels))


@functools.partial(jax.jit, static_argnames="bits")
def _quantize_int(wg, bits):
    levels = 2 ** bits - 1
    mn, s = _min_max_scale(wg, levels)
    q = jnp.clip(jnp.round(_divide(wg - mn[..., None], s[..., None])), 0, levels)
    lut = jnp.broadcast_to(jnp.arange(levels + 1, dtype=jnp.float32), (wg.shape[0], levels + 1))
    return lut, q.astype(jnp.uint8), s, mn


def _nearest_code_thresholds(table):
    """For a fixed table: sorted values, their codes, and exact float32 thresholds.

    ``r`` goes above the midpoint ``m`` between two neighbours when ``r > m``,
    and on a tie (``r == m``) to the value of larger magnitude (bitsandbytes).
    Midpoints are exact in float64; comparing a float32 ``r`` with them is the
    same as comparing with the float32 just above (``>=``) or below (``>``).
    """
    order = np.argsort(table, kind="stable")
    values = table[order].astype(np.float64)
    mids = (values[1:] + values[:-1]) / 2
    above = np.array([np.nextafter(np.float32(m), np.float32(np.inf)) if np.float32(m) < m
                      else np.float32(m) for m in mids], np.float32)  # smallest f32 >= m
    below = np.array([np.nextafter(np.float32(m), np.float32(-np.inf)) if np.float32(m) > m
                      else np.float32(m) for m in mids], np.float32)  # largest f32 <= m
    return order.astype(np.uint8), above, below, mids > 0  # ties go up above zero


@functools.partial(jax.jit, static_argnames="fmt")
def _quantize_table(wg, fmt):
    table = FORMATS[fmt].table
    codes_sorted, above, below, tie_up = _nearest_code_thresholds(table)
    a = jnp.abs(wg).max(axis=-1)
    r = _divide(wg, jnp.where(a > 0, a, 1.0)[..., None])
    goes_up = jnp.where(tie_up, r[..., None] >= above, r[..., None] > below)
    idx = goes_up.sum(-1)
    codes = jnp.asarray(codes_sorted)[idx]
    lut = jnp.broadcast_to(jnp.asarray(table), (wg.shape[0], 16))
    return lut, codes, a, jnp.zeros_like(a)



def _quantize_any(wg, bits, k, sample_weight, scale_sample_weight, key, kmeans_options):
    n, n_groups, g = wg.shape
    levels = 2 ** bits - 1
    mn, s = _min_max_scale(wg, levels)
    u = _divide(wg - mn[..., None], s[..., None]).reshape(n, -1)
    valid = (jnp.arange(n_groups * g) < k).astype(jnp.float32)  # padding gets zero weight
    if sample_weight is None or not bool(jnp.any(sample_weight > 0)):
        omega = jnp.broadcast_to(valid, u.shape)
    else:
        a = jnp.pad(sample_weight, (0, n_groups * g - k))
        omega = jnp.broadcast_to(a, u.shape)
        if scale_sample_weight:
            omega = omega * jnp.repeat(s, g, axis=1)
    centroids, labels = kmeans.weighted_kmeans_1d(u, omega, levels + 1, key=key, **kmeans_options)
    half = 2 ** (bits - 1)
    return centroids - half, labels, s, mn + half * s
