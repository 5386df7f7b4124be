"""LUT-dequant matmul ``y = x @ W^T`` for 4-bit-container LUT weights (Pallas, Triton backend).

    W[n, k] = lut[n, code[n, k]] * scales[n, k // G] + zeros[n, k // G]

Codes are packed two per byte along K (element ``2i`` in the low nibble), the
layout of ``any4_jax.QuantizedWeight``; this package imports nothing from
``any4_jax`` and takes the arrays plus static ``k`` and ``group_size``.

The zero term leaves the kernel entirely (docs/design.md §5):
``Σ_g z[n,g] Σ_{k∈g} x[k]`` is a tiny ``(M, n_groups) @ (n_groups, N)`` matmul
done by XLA. The kernel computes ``Σ_k x[k] · lut[n, code] · s[n, g(k)]``:

* **decode** (M ≤ 16): each program owns ``block_n`` rows and a slice of K
  (split-K over a second grid axis when N alone cannot fill the GPU); it loops
  over K blocks with ``lax.fori_loop``, looks the codes up, and does a vector
  multiply-add and a row reduction for each of the M inputs. When a K block
  lies inside one group, its scale multiplies the block's sum, not each element.
* **prefill** (M > 16): tiles of ``block_m`` rows of x; each K block of the
  weight is dequantized to x's dtype and multiplied on the tensor cores with
  ``jnp.dot`` (float32 accumulation).

Lookup strategies (both lower to Triton, docs/design.md §5): ``"gather"`` — a
pointer-indexed load from the flat LUT at ``row * 2**bits + code``; ``"select"``
— the LUT row is loaded as ``2**bits`` column vectors and a select tree on the
code bits picks the value.

Split-K partial sums are written to a ``(split, M, N)`` float32 buffer that XLA
adds up: programs never accumulate into the same output.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

STRATEGIES = ("gather", "select")
DECODE_MAX_M = 16


# ---------------------------------------------------------------------------
# The reference: the spec.

def lut_matmul_reference(x, codes, lut, scales, zeros, *, k: int, group_size: int):
    """Pure-jnp ``x @ W^T``: dequantize W in float32, matmul at HIGHEST precision,
    return ``x.dtype``."""
    n = codes.shape[0]
    unpacked = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(n, -1)[:, :k].astype(jnp.int32)
    values = jnp.take_along_axis(lut.astype(jnp.float32), unpacked, axis=1)
    g = jnp.arange(k) // group_size
    w = values * scales.astype(jnp.float32)[:, g] + zeros.astype(jnp.float32)[:, g]
    y = jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------
# Block sizes: a tuned table (benchmarks/tune_lut_matmul.py fills it on a GPU),
# else a heuristic.

@functools.lru_cache(maxsize=1)
def tuned_blocks() -> dict:
    """The tuned block table, package data ``pallas_kernels/tuned_blocks.json``
    (``benchmarks/tune_lut_matmul.py`` writes it on a GPU; empty = heuristic)."""
    return json.loads(resources.files(__package__).joinpath("tuned_blocks.json").read_text())


def _pow2_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _tuned_key(m, n, k, group_size, bits, strategy):
    regime = "decode" if m <= DECODE_MAX_M else "prefill"
    return f"{regime}:m{pl.next_power_of_2(m)}:n{n}:k{k}:g{group_size}:b{bits}:{strategy}"


def block_config(m: int, n: int, k: int, group_size: int, bits: int = 4, strategy: str = "gather") -> dict:
    """Block sizes, warps and stages for a shape: the tuned table's entry if any,
    else a heuristic. Keys: block_n, block_k (in elements, even), split_k,
    block_m (prefill), num_warps, num_stages."""
    tuned = tuned_blocks().get(_tuned_key(m, n, k, group_size, bits, strategy))
    if tuned:
        return dict(tuned)
    # K blocks never straddle a group when block_k divides the group size.
    block_k = min(256, _pow2_at_most(group_size) if group_size % 32 == 0 else 256, pl.next_power_of_2(k))
    block_k = max(block_k, 32)
    if m <= DECODE_MAX_M:
        block_n = 64 if m <= 4 else 32
        n_blocks = pl.cdiv(n, block_n)
        k_blocks = pl.cdiv(k, block_k)
        split = int(min(k_blocks, max(1, 264 // n_blocks)))  # ~2 waves on 132 SMs
        return dict(block_n=block_n, block_k=block_k, split_k=split, block_m=1, num_warps=4, num_stages=3)
    return dict(block_n=64, block_k=min(block_k, 64), split_k=1, block_m=min(64, pl.next_power_of_2(m)),
                num_warps=4, num_stages=3)


# ---------------------------------------------------------------------------
# The kernel.

def _lookup(lut_ref, rows, row_ok, codes, bits, strategy, transposed):
    """``lut[rows, codes]`` as float32. codes is ``(BN, BKh)``, or ``(BKh, BN)``
    when ``transposed``; rows ``(BN,)``."""
    levels = 2 ** bits
    expand = (lambda v: v[None, :]) if transposed else (lambda v: v[:, None])
    if strategy == "gather":
        return pltr.load(lut_ref.at[expand(rows) * levels + codes], mask=expand(row_ok), other=0).astype(jnp.float32)
    level = [expand(pltr.load(lut_ref.at[rows * levels + j], mask=row_ok, other=0).astype(jnp.float32))
             for j in range(levels)]
    for bit in range(bits):  # a select tree: halve the candidates on each code bit
        on = ((codes >> bit) & 1) == 1
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _kernel(x_even_ref, x_odd_ref, codes_ref, lut_ref, scales_ref, out_ref, *,
            m, n, kh, n_groups, group_size, bits, strategy, block_n, block_kh, k_blocks_per_split,
            block_m, decode, hoist_scale):
    """One program: rows [i*BN, (i+1)*BN) (and x rows [r*BM, ...) in prefill),
    K blocks [s*KB, (s+1)*KB). All refs are flat; indices are computed here."""
    if decode:
        i, s = pl.program_id(0), pl.program_id(1)
        r = 0
    else:
        r, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = i * block_n + jnp.arange(block_n)
    row_ok = rows < n
    first = s * k_blocks_per_split

    def block(b):
        """Codes, scales and x of K block b (columns in packed units)."""
        cols = (first + b) * block_kh + jnp.arange(block_kh)
        col_ok = cols < kh
        if decode:
            idx = rows[:, None] * kh + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
        else:  # transposed tile (BKh, BN) so that it feeds jnp.dot directly
            idx = rows[None, :] * kh + cols[:, None]
            ok = row_ok[None, :] & col_ok[:, None]
        packed = pltr.load(codes_ref.at[idx], mask=ok, other=0).astype(jnp.int32)
        lo = _lookup(lut_ref, rows, row_ok, packed & 0xF, bits, strategy, not decode)
        hi = _lookup(lut_ref, rows, row_ok, packed >> 4, bits, strategy, not decode)
        if hoist_scale:
            g = jnp.minimum(((first + b) * block_kh * 2) // group_size, n_groups - 1)
            scale = pltr.load(scales_ref.at[rows * n_groups + g], mask=row_ok, other=0).astype(jnp.float32)
        else:
            groups = jnp.minimum((cols * 2) // group_size, n_groups - 1)
            sidx = rows[:, None] * n_groups + groups[None, :] if decode else \
                rows[None, :] * n_groups + groups[:, None]
            scale = pltr.load(scales_ref.at[sidx], mask=ok, other=0).astype(jnp.float32)
            lo, hi = lo * scale, hi * scale
            scale = None
        lo, hi = jnp.where(ok, lo, 0.0), jnp.where(ok, hi, 0.0)
        return cols, col_ok, lo, hi, scale

    if decode:
        def body(b, accs):
            cols, col_ok, lo, hi, scale = block(b)
            new = []
            for mi in range(m):  # M <= 16: one multiply-add and reduction per input row
                xe = pltr.load(x_even_ref.at[mi * kh + cols], mask=col_ok, other=0).astype(jnp.float32)
                xo = pltr.load(x_odd_ref.at[mi * kh + cols], mask=col_ok, other=0).astype(jnp.float32)
                part = jnp.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)
                new.append(accs[mi] + (part * scale if scale is not None else part))
            return tuple(new)

        accs = lax.fori_loop(0, k_blocks_per_split, body, tuple(jnp.zeros(block_n, jnp.float32) for _ in range(m)))
        for mi in range(m):
            pltr.store(out_ref.at[(s * m + mi) * n + rows], accs[mi], mask=row_ok)
        return

    xrows = r * block_m + jnp.arange(block_m)
    xrow_ok = xrows < m

    def body(b, acc):
        cols, col_ok, lo, hi, scale = block(b)
        xidx = xrows[:, None] * kh + cols[None, :]
        xok = xrow_ok[:, None] & col_ok[None, :]
        xe = pltr.load(x_even_ref.at[xidx], mask=xok, other=0)
        xo = pltr.load(x_odd_ref.at[xidx], mask=xok, other=0)
        dt = xe.dtype
        prec = lax.Precision.HIGHEST if dt == jnp.float32 else None
        part = jnp.dot(xe, lo.astype(dt), preferred_element_type=jnp.float32, precision=prec) + \
            jnp.dot(xo, hi.astype(dt), preferred_element_type=jnp.float32, precision=prec)
        return acc + (part * scale[None, :] if scale is not None else part)

    acc = lax.fori_loop(0, k_blocks_per_split, body, jnp.zeros((block_m, block_n), jnp.float32))
    oidx = (s * m + xrows[:, None]) * n + rows[None, :]
    pltr.store(out_ref.at[oidx], acc, mask=xrow_ok[:, None] & row_ok[None, :])


@functools.partial(jax.jit, static_argnames=(
    "k", "group_size", "strategy", "interpret", "block_n", "block_k", "split_k", "block_m",
    "num_warps", "num_stages"))
def _lut_matmul(x, codes, lut, scales, zeros, *, k, group_size, strategy, interpret,
                block_n, block_k, split_k, block_m, num_warps, num_stages):
    m = x.shape[0]
    n, kh = codes.shape
    n_groups = scales.shape[1]
    bits = int(np.log2(lut.shape[1]))
    block_kh = block_k // 2
    k_blocks = pl.cdiv(kh, block_kh)
    split = max(1, min(split_k, k_blocks))
    per_split = pl.cdiv(k_blocks, split)
    split = pl.cdiv(k_blocks, per_split)  # no empty splits
    # a K block inside a single group: its scale can multiply the block's sum
    hoist = n_groups == 1 or (group_size % block_k == 0)
    decode = m <= DECODE_MAX_M

    xp = jnp.pad(x, ((0, 0), (0, 2 * kh - k)))  # an odd K gets a zero partner for the last code
    x_even, x_odd = xp[:, 0::2].reshape(-1), xp[:, 1::2].reshape(-1)
    grid = (pl.cdiv(n, block_n), split) if decode else (pl.cdiv(m, block_m), pl.cdiv(n, block_n), split)
    kernel = functools.partial(
        _kernel, m=m, n=n, kh=kh, n_groups=n_groups, group_size=group_size, bits=bits, strategy=strategy,
        block_n=block_n, block_kh=block_kh, k_blocks_per_split=per_split, block_m=block_m, decode=decode,
        hoist_scale=hoist)
    partial = pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=jax.ShapeDtypeStruct((split * m * n,), jnp.float32),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lut_matmul_decode" if decode else "lut_matmul_prefill",
    )(x_even, x_odd, codes.reshape(-1), lut.reshape(-1), scales.reshape(-1))
    y = partial.reshape(split, m, n).sum(0)
    # zero term: Σ_g z[n, g] · (Σ_{k in g} x[k])
    group_sums = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n_groups * group_size - k)))
    group_sums = group_sums.reshape(m, n_groups, group_size).sum(-1)
    y = y + jnp.dot(group_sums, zeros.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def lut_matmul(x, codes, lut, scales, zeros, *, k: int, group_size: int, strategy: str = "gather",
               interpret: bool = False, **block_options):
    """``x @ W^T`` with float32 accumulation, returned in ``x.dtype``.

    Args:
      x: ``(M, K)`` bf16, f16 or f32.
      codes: ``(N, ceil(K/2))`` uint8, two codes per byte (element 2i low nibble).
      lut: ``(N, 2**bits)``; scales, zeros: ``(N, n_groups)``.
      k, group_size: K and the group length (``K`` for one group per row).
      strategy: ``"gather"`` or ``"select"`` (see module docstring).
      interpret: run in the Pallas interpreter (any backend; for tests).
      block_options: override ``block_config`` (block_n, block_k, split_k,
        block_m, num_warps, num_stages). Block sizes are powers of two.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; accepted: {', '.join(STRATEGIES)}")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be (M, K={k}); got {x.shape}")
    n, kh = codes.shape
    if kh != -(-k // 2) or codes.dtype != jnp.uint8:
        raise ValueError(f"codes must be uint8 (N, ceil(K/2)) = ({n}, {-(-k // 2)}); got {codes.dtype} {codes.shape}")
    levels = lut.shape[1]
    if lut.shape[0] != n or levels not in (4, 8, 16):
        raise ValueError(f"lut must be (N={n}, 4|8|16); got {lut.shape}")
    n_groups = -(-k // group_size)
    if scales.shape != (n, n_groups) or zeros.shape != (n, n_groups):
        raise ValueError(f"scales and zeros must be (N, ceil(K/G)) = ({n}, {n_groups}); "
                         f"got {scales.shape} and {zeros.shape}")
    config = block_config(x.shape[0], n, k, group_size, int(np.log2(levels)), strategy)
    unknown = set(block_options) - set(config)
    if unknown:
        raise ValueError(f"unknown block options {sorted(unknown)}; accepted: {sorted(config)}")
    config.update(block_options)
    for name in ("block_n", "block_k", "block_m"):
        if config[name] & (config[name] - 1):
            raise ValueError(f"{name} must be a power of two; got {config[name]}")
    if config["block_k"] < 2:
        raise ValueError("block_k must be >= 2 (two codes a byte)")
    return _lut_matmul(x, codes, lut, scales, zeros, k=k, group_size=group_size, strategy=strategy,
                       interpret=interpret, **config)
