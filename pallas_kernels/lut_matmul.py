"""LUT-dequant matmul ``y = x @ W^T`` for 2-, 3- and 4-bit LUT weights (Pallas, Triton backend).

    W[n, k] = lut[n, code[n, k]] * scales[n, k // G] + zeros[n, k // G]

Codes come in the layout of ``pallas_kernels.layout`` (64-element blocks, a
block's two halves in the low and high nibbles of its words; 2- and 3-bit codes,
in 16- and 24-byte blocks, are shifted and masked into 4-bit words first); the
byte-permute lookup is the program of ``pallas_kernels.lookup``.

**One kernel for every M** (docs/design.md §5): a program owns ``block_n`` rows
of W and ``block_m`` rows of x (``block_m`` = 16 for decode, M <= 16, padded with
masked rows) and loops over K in blocks of ``block_k`` elements, one group per
block (``block_k`` divides G; for G = 32 each half-block is a group). For each
K block it looks the codes up in the row's LUT (a pointer-indexed load from the
flat LUT: the lookup Triton can lower), multiplies the ``(block_n, block_k/2)``
halves by the matching halves of x on the tensor cores (``jnp.dot``, float32
accumulation; "swap AB": W is the left operand, so M = 1..16 costs one MMA
width), scales the two products by the group's scale and adds the zero term
``z[n, g] * Σ_{k∈g} x[k]``. The output is cast and stored by the kernel: one
launch, no split-K, nothing for XLA to add. Masks are compiled in only where a
shape does not divide its block, and every load stays inside its buffer: code
bytes past a row read as code 0, group indices are clamped, and
a problem past int32 offsets is split into several launches (``FLAT_LIMIT``).

``lut_matmul_reference`` (pure jnp) is the spec; ``static_entry`` is the entry
the static analysis tool calls (everything per call on the GPU path).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.layout import CODE_BLOCK, HALF, block_bytes, pack_codes, packed_columns, unpack_codes
from pallas_kernels.lookup import TABLES, lookup_emulated, lookup_ptx

DECODE_MAX_M = 16         # up to here x rows are padded to one MMA width
STRATEGIES = ("prmt", "gather")


# ---------------------------------------------------------------------------
# The reference: the spec.

def lut_matmul_reference(x, codes, lut, scales, zeros, *, k: int, group_size: int):
    """Pure-jnp ``x @ W^T``: dequantize W in float32, matmul at HIGHEST precision,
    return ``x.dtype``."""
    idx = unpack_codes(codes, k, lut.shape[1].bit_length() - 1).astype(jnp.int32)
    values = jnp.take_along_axis(lut.astype(jnp.float32), idx, axis=1)
    g = jnp.arange(k) // group_size
    w = values * scales.astype(jnp.float32)[:, g] + zeros.astype(jnp.float32)[:, g]
    y = jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------
# Block sizes: a tuned table (benchmarks/tune_lut_matmul.py fills it on a GPU),
# else a heuristic.

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """The blocks, warps and pipeline stages of one launch; checks itself.

    A program owns ``block_n`` rows of W and ``block_m`` rows of x and loops
    over K in blocks of ``block_k`` elements (powers of two >= 16; ``block_k`` a
    multiple of the 64-element code block). ``check(k, group_size)`` adds what
    depends on the weight: ``block_k`` divides G (or is 64 for groups of 32).
    """
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16; got {v}")
        if self.block_k % CODE_BLOCK:
            raise ValueError(f"block_k must be a multiple of the {CODE_BLOCK}-element code block; got {self.block_k}")
        if self.num_warps not in (1, 2, 4, 8, 16) or not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1; got {self.num_warps}, "
                             f"{self.num_stages}")

    def check(self, k: int, group_size: int) -> "BlockSizes":
        bk = self.block_k
        if not (group_size % bk == 0 or group_size == k or (group_size == HALF and bk == CODE_BLOCK)):
            raise ValueError(f"block_k = {bk} must divide the group size {group_size} (or be {CODE_BLOCK} for "
                             f"groups of {HALF}): one group per K block")
        return self


@functools.lru_cache(maxsize=1)
def tuned_blocks() -> dict:
    """The tuned block table, package data ``pallas_kernels/tuned_blocks.json``
    (``benchmarks/tune_lut_matmul.py`` writes it on a GPU; empty = heuristic)."""
    return json.loads(resources.files(__package__).joinpath("tuned_blocks.json").read_text())


def tuned_key(m, n, k, group_size, bits):
    return f"m{min(pl.next_power_of_2(m), 128)}:n{n}:k{k}:g{group_size}:b{bits}"


def block_sizes(m: int, n: int, k: int, group_size: int, bits: int = 4) -> BlockSizes:
    """The ``BlockSizes`` for a shape: the tuned table's entry if any, else a heuristic."""
    tuned = tuned_blocks().get(tuned_key(m, n, k, group_size, bits))
    if tuned:
        return BlockSizes(**tuned)
    # One group per K block: block_k divides G (64 when G = 32: a group per half-block).
    g = group_size if group_size & (group_size - 1) == 0 else CODE_BLOCK
    block_k = max(CODE_BLOCK, min(256, g, pl.next_power_of_2(k)))
    block_m = 16 if m <= DECODE_MAX_M else 64
    # 16 rows of W a warp (one MMA height); fewer rows a program when N cannot fill the SMs.
    block_n, num_warps = 64, 4
    while num_warps > 1 and pl.cdiv(n, block_n) < 66:
        block_n, num_warps = block_n // 2, num_warps // 2
    return BlockSizes(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=3)


# ---------------------------------------------------------------------------
# The kernel.

def _words(u8):
    """``(R, 4W)`` uint8 -> ``(R, W)`` uint32, little-endian: how Triton hands four
    consecutive 8-bit elements to inline assembly with pack = 4."""
    b = u8.reshape(u8.shape[0], -1, 4).astype(jnp.uint32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _halves(r0, r1, dtype):
    """Two ``(R, W)`` uint32 registers of 16-bit pairs -> ``(R, 4W)`` values of ``dtype``."""
    v = jnp.stack([r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16], axis=-1).astype(jnp.uint16)
    return lax.bitcast_convert_type(v.reshape(r0.shape[0], -1), dtype)


def _prmt_lookup(packed, tables, dtype, interpret):
    """``(BN, 32)`` code bytes of one code block -> the ``(BN, 32)`` LUT values of
    its first and second halves, in ``dtype`` (16-bit). ``tables``: eight
    ``(BN, 32)`` uint8 tensors whose four consecutive bytes are a table register."""
    if interpret:  # the same program in jnp, fed as Triton feeds the assembly
        out = lookup_emulated(_words(packed), dict(zip(TABLES, map(_words, tables))))
        return _halves(out[0], out[1], dtype), _halves(out[2], out[3], dtype)
    spec = jax.ShapeDtypeStruct(packed.shape, dtype)
    return [pltr.elementwise_inline_asm(lookup_ptx(h), args=[packed, *tables], pack=4,
                                        constraints=",".join(["=r"] * 2 + ["r"] * 9),
                                        result_shape_dtypes=[spec])[0] for h in (0, 1)]


def _kernel(x_ref, codes_ref, lut_ref, scales_ref, zeros_ref, out_ref, *, m, n, k, n_groups, group_size,
            levels, block_m, block_n, block_k, strategy, interpret):
    """One program: W rows [j*BN, (j+1)*BN) times x rows [i*BM, (i+1)*BM), over all of K.
    All refs are flat; indices are computed here."""
    i, j = pl.program_id(0), pl.program_id(1)
    bits = levels.bit_length() - 1
    kc, per_block = packed_columns(k, bits), block_bytes(bits)  # code bytes a row, a 64-element block
    dtype = x_ref.dtype
    # Rows past N (or M) repeat the last real row: they compute exact duplicates and store
    # the same values to the same place, so no load or store needs a row mask.
    rows = jnp.minimum(j * block_n + jnp.arange(block_n), n - 1)
    xrows = jnp.minimum(i * block_m + jnp.arange(block_m), m - 1)
    tail = k % block_k != 0                 # the last K block runs past K: mask x
    code_tail = pl.cdiv(k, block_k) * (block_k // CODE_BLOCK) * per_block > kc  # ... and past the row's codes
    split_groups = group_size < block_k     # G = 32: each half of a code block is its own group
    # Code blocks of one group are looked up and multiplied together: `fuse` blocks a dot.
    fuse = 1 if split_groups else block_k // CODE_BLOCK
    # The code tile of one lookup: 4-bit, `fuse` blocks of 32 bytes; 2-bit (prmt), the `fuse`
    # blocks' low planes (16 bytes each, consecutive); 3-bit (prmt), one block's low plane.
    tile = HALF * fuse if bits == 4 or strategy == "gather" else 16 * (fuse if bits == 2 else 1)
    prec = lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def load(ref, mask=None):
        return pltr.load(ref, mask=mask, other=None if mask is None else 0)

    # Ones for the Σx MMA, as a load that never reads (rows are never negative): loaded
    # data can be an MMA operand in shared memory, a constant is rebuilt in registers per MMA.
    ones = pltr.load(x_ref.at[jnp.zeros((block_n, tile), jnp.int32)], mask=(rows < 0)[:, None], other=1)

    def dot(a, b):  # (BN, HALF) x (BM, HALF)^T on the tensor cores, float32 accumulation
        return jnp.dot(a, b.T, preferred_element_type=jnp.float32, precision=prec)

    if strategy == "prmt":  # the LUT row's bytes, four entries a register (loop-invariant)
        entry = (jnp.arange(tile) % 4)[None, :]  # as wide as the code tiles of a lookup
        tables = {}
        for q in range(4):
            e = 4 * q + entry
            v = load(lut_ref.at[rows[:, None] * levels + jnp.minimum(e, levels - 1)],
                     e < levels if 4 * q + 3 >= levels else None)
            u = lax.bitcast_convert_type(v.astype(dtype), jnp.uint16).astype(jnp.uint32)
            tables[f"th{q}"], tables[f"tl{q}"] = (u >> 8).astype(jnp.uint8), (u & 0xFF).astype(jnp.uint8)
        tables = [tables[t] for t in TABLES]

    def code_bytes(cols):  # bytes past the row read as code 0, never the next row
        cols = cols[None, :]
        return load(codes_ref.at[rows[:, None] * kc + cols], (cols < kc) if code_tail else None)

    def lookup(block0, n_blocks):
        """The LUT values of ``n_blocks`` code blocks from block0, in pieces
        ``(values (BN, width), x columns (width,) from the first block's, half)``;
        ``half``: which half of its block each piece's elements are in."""
        p = jnp.arange(tile)
        if strategy == "prmt" and bits == 4:  # each thread's four K-consecutive bytes are one word
            x_col = (p // HALF) * CODE_BLOCK + p % HALF
            values = _prmt_lookup(code_bytes(block0 * HALF + p), tables, dtype, interpret)
            return [(values[h], x_col + HALF * h, h) for h in (0, 1)]
        if strategy == "prmt":  # byte p of a low plane holds 4-bit bytes p (q = 0) and p + 16 (q = 1)
            pieces = []
            for b in range(1 if bits == 2 else n_blocks):  # 2-bit: the blocks' planes side by side
                base = (block0 + b) * per_block
                low = code_bytes(base + p)
                third = code_bytes(base + 16 + p % 8) if bits == 3 else None
                x_col = b * CODE_BLOCK + (p // 16) * CODE_BLOCK + p % 16
                for q in (0, 1):
                    c4 = (low >> (2 * q)) & 0x33
                    if bits == 3:  # 4-bit byte c = p + 16q: bit 2 of its nibbles from byte c % 8, bit c // 8
                        c4 = c4 | (((third >> (p // 8 + 2 * q).astype(jnp.uint8)[None, :]) & 0x11) << 2)
                    values = _prmt_lookup(c4, tables, dtype, interpret)
                    pieces += [(values[h], x_col + 16 * q + HALF * h, h) for h in (0, 1)]
            return pieces
        blk, pos = p // HALF, p % HALF
        nibble = (4 * (pos % 2))[None, :]
        out = []  # gather: a pointer-indexed load per code; element 4w + e of a half is
        for h in (0, 2):  # nibble e % 2 of byte 4w + h + e // 2 of its block (see the code layout)
            c = 4 * (pos // 4) + h + (pos % 4) // 2
            if bits == 4:
                code = (code_bytes((block0 + blk) * HALF + c).astype(jnp.int32) >> nibble) & 0xF
            else:  # that byte's two bits in the low plane (and the third in the third plane)
                base = (block0 + blk) * per_block
                low = code_bytes(base + c % 16).astype(jnp.int32)
                code = (low >> ((2 * (c // 16))[None, :] + nibble)) & 3
                if bits == 3:
                    third = code_bytes(base + 16 + c % 8).astype(jnp.int32)
                    code = code | (((third >> ((c // 8)[None, :] + nibble)) & 1) << 2)
            out.append(load(lut_ref.at[(rows * levels)[:, None] + code]).astype(dtype))
        x_col = blk * CODE_BLOCK + pos
        return [(out[0], x_col, 0), (out[1], x_col + HALF, 1)]

    def scale_and_zero(g):
        s = load(scales_ref.at[rows * n_groups + g]).astype(jnp.float32)
        z = load(zeros_ref.at[rows * n_groups + g]).astype(jnp.float32)
        return s[:, None], z[:, None]

    def body(kb, acc):
        k0 = kb * block_k
        prod = xsum = None  # Σ W x and Σ x of this K block, accumulated in the MMA accumulators
        for sub in range(block_k // CODE_BLOCK // fuse):  # `fuse` code blocks at a time
            c0 = k0 + sub * CODE_BLOCK * fuse
            for w, x_col, half in lookup(kb * (block_k // CODE_BLOCK) + sub * fuse, fuse):
                cols = c0 + x_col
                xt = load(x_ref.at[xrows[:, None] * k + cols[None, :]], (cols < k)[None, :] if tail else None)
                if split_groups:  # G = 32 (block_k = 64): each half is its own group (past K: the last)
                    s, z = scale_and_zero(jnp.minimum(2 * kb + half, n_groups - 1))
                    acc = acc + s * dot(w, xt) + z * dot(ones, xt)
                    continue
                prod = dot(w, xt) if prod is None else dot(w, xt) + prod
                xsum = dot(ones, xt) if xsum is None else dot(ones, xt) + xsum  # Σ x, exact in f32
        if split_groups:
            return acc
        s, z = scale_and_zero(jnp.minimum(k0 // group_size, n_groups - 1))
        return acc + s * prod + z * xsum

    acc = lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_n, block_m), jnp.float32))
    pltr.store(out_ref.at[xrows[None, :] * n + rows[:, None]], acc.astype(out_ref.dtype))


def _pallas_call(x, codes, lut, scales, zeros, *, m, n, k, group_size, levels, strategy, interpret,
                 blocks: BlockSizes):
    """The launch on flat buffers holding (at least) an ``(m, K)`` x and ``n`` rows
    of the weight (``levels`` LUT entries a row); ``(m * n,)`` out."""
    kernel = functools.partial(
        _kernel, m=m, n=n, k=k, n_groups=-(-k // group_size), group_size=group_size, levels=levels,
        block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k, strategy=strategy,
        interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, blocks.block_m), pl.cdiv(n, blocks.block_n)),
        out_shape=jax.ShapeDtypeStruct((m * n,), x.dtype),
        compiler_params=pltr.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="lut_matmul",
    )(x, codes, lut, scales, zeros)


@functools.partial(jax.jit, static_argnames=("k", "group_size", "strategy", "interpret", "blocks"))
def _lut_matmul(x, codes, lut, scales, zeros, *, k, group_size, strategy, interpret, blocks):
    m, n = x.shape[0], codes.shape[0]
    y = _pallas_call(x.reshape(-1), codes.reshape(-1), lut.reshape(-1), scales.reshape(-1), zeros.reshape(-1),
                     m=m, n=n, k=k, group_size=group_size, levels=lut.shape[1], strategy=strategy,
                     interpret=interpret, blocks=blocks)
    return y.reshape(m, n)


# The kernel's flat indices are int32: a launch never spans more elements of one buffer.
FLAT_LIMIT = 2 ** 31 - 1


def lut_matmul(x, codes, lut, scales, zeros, *, k: int, group_size: int, strategy: str | None = None,
               interpret: bool = False, **block_options):
    """``x @ W^T`` with float32 accumulation, returned in ``x.dtype``.

    Args:
      x: ``(M, K)`` bf16, f16 or f32.
      codes: ``(N, packed_columns(K, bits))`` uint8 in the layout of ``layout.pack_codes``.
      lut: ``(N, 2**bits)``, bits 2, 3 or 4; scales, zeros: ``(N, ceil(K/G))`` (any float dtype).
      k, group_size: K and the group length (``K`` for one group per row).
      strategy: the LUT lookup: ``"prmt"`` (the LUT in registers, byte permutes;
        16-bit x only; 2- and 3-bit codes are first shifted and masked into 4-bit
        words) or ``"gather"`` (a load per code); default prmt for bf16/f16 x,
        gather for float32 x.
      interpret: run in the Pallas interpreter (any backend; for tests).
      block_options: override the fields of ``block_sizes`` (a ``BlockSizes``).

    A problem whose x, codes or output has more than ``FLAT_LIMIT`` elements
    runs as several launches over slices of M and N.
    """
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be (M, K={k}); got {x.shape}")
    n, levels = codes.shape[0], lut.shape[1]
    if lut.shape[0] != n or levels not in (4, 8, 16):
        raise ValueError(f"lut must be (N={n}, 4|8|16); got {lut.shape}")
    bits = levels.bit_length() - 1
    prmt_ok = x.dtype in (jnp.bfloat16, jnp.float16)
    strategy = strategy or ("prmt" if prmt_ok else "gather")
    if strategy not in STRATEGIES or (strategy == "prmt" and not prmt_ok):
        raise ValueError(f"unknown strategy {strategy!r} for x of dtype {x.dtype}; accepted: "
                         f"{'prmt, gather' if prmt_ok else 'gather (prmt needs bf16 or f16 x)'}")
    if codes.shape != (n, packed_columns(k, bits)) or codes.dtype != jnp.uint8:
        raise ValueError(f"codes of {bits}-bit weights must be uint8 (N, packed_columns(K, {bits})) = "
                         f"({n}, {packed_columns(k, bits)}); got {codes.dtype} {codes.shape}")
    n_groups = -(-k // group_size)
    if scales.shape != (n, n_groups) or zeros.shape != (n, n_groups):
        raise ValueError(f"scales and zeros must be (N, ceil(K/G)) = ({n}, {n_groups}); "
                         f"got {scales.shape} and {zeros.shape}")
    blocks = block_sizes(x.shape[0], n, k, group_size, bits)
    unknown = set(block_options) - {f.name for f in dataclasses.fields(BlockSizes)}
    if unknown:
        raise ValueError(f"unknown block options {sorted(unknown)}; accepted: "
                         f"{', '.join(f.name for f in dataclasses.fields(BlockSizes))}")
    blocks = dataclasses.replace(blocks, **block_options).check(k, group_size)
    run = functools.partial(_lut_matmul, k=k, group_size=group_size, strategy=strategy, interpret=interpret,
                            blocks=blocks)
    m = x.shape[0]
    rows = lambda limit, block: max(1, limit // block * block or limit)  # whole blocks where they fit
    rows_n = rows(FLAT_LIMIT // packed_columns(k, bits), blocks.block_n)
    rows_m = rows(FLAT_LIMIT // max(k, min(n, rows_n)), blocks.block_m)
    if m <= rows_m and n <= rows_n:
        return run(x, codes, lut, scales, zeros)
    return jnp.concatenate([  # slices small enough for int32 offsets
        jnp.concatenate([run(x[a:a + rows_m], codes[b:b + rows_n], lut[b:b + rows_n], scales[b:b + rows_n],
                             zeros[b:b + rows_n]) for b in range(0, n, rows_n)], axis=1)
        for a in range(0, m, rows_m)], axis=0)


# How far the kernel may be from the reference, of max |y|, by x's dtype: both
# accumulate in float32 and round once to x.dtype; the kernel also rounds the LUT
# values to x.dtype before the tensor-core dot (exact for bf16 storage), at most
# doubling that (bf16: 2**-8, f16: 2**-11 relative, times a margin).
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def self_check(x_dtype, param_dtype, bits: int, group_size: int, k: int, blocks: BlockSizes,
               strategy: str | None = None, interpret: bool = False, seed: int = 0) -> str | None:
    """Run the kernel compiled with ``blocks`` on a small problem of its
    configuration whose shapes divide none of the blocks (rows of x and W past a
    block, a short last group and K block) and compare it with
    ``lut_matmul_reference``: None when they agree, else what failed, in one line."""
    x_dtype, param_dtype = jnp.dtype(x_dtype), jnp.dtype(param_dtype)
    g = group_size
    kk = k if g == k else 2 * g + (17 if g == HALF else 33)  # one group a row: the layer's own K
    m = blocks.block_m + 3 if blocks.block_m > DECODE_MAX_M else 5
    n = blocks.block_n + 5
    rng = np.random.default_rng(seed)
    levels, n_groups = 2 ** bits, -(-kk // g)
    args = (jnp.asarray(rng.standard_normal((m, kk)), x_dtype), pack_codes(rng.integers(0, levels, (n, kk)), bits),
            jnp.asarray(rng.standard_normal((n, levels)), param_dtype),
            jnp.asarray(rng.uniform(0.01, 0.03, (n, n_groups)), param_dtype),
            jnp.asarray(rng.standard_normal((n, n_groups)) * 0.01, param_dtype))
    try:
        y = lut_matmul(*args, k=kk, group_size=g, strategy=strategy, interpret=interpret,
                       **dataclasses.asdict(blocks))
        y = np.asarray(jax.block_until_ready(y), np.float32)
    except Exception as e:  # noqa: BLE001 - a compile or launch error of any kind is the answer
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:300] if text else ''}"
    ref = np.asarray(lut_matmul_reference(*args, k=kk, group_size=g), np.float32)
    error = float(np.abs(y - ref).max()) if np.isfinite(y).all() else float("inf")
    if error > TOLERANCE[x_dtype.name] * float(np.abs(ref).max()):
        return (f"its output differs from the reference by {error:.3g} (max |y| {float(np.abs(ref).max()):.3g}) "
                f"for x {x_dtype.name}, {bits}-bit codes, G = {g}, {blocks}")
    return None


def static_entry(m, n, k, group_size, bits, strategy=None, x_dtype="bfloat16", param_dtype="bfloat16",
                 **block_options):
    """The entry of the static analysis tool (``--entry pallas_kernels.lut_matmul:static_entry``):
    the per-call function of the GPU path and the weight's arguments as stored."""
    S = jax.ShapeDtypeStruct
    n_groups = -(-k // group_size)
    args = (S((m, k), jnp.dtype(x_dtype)), S((n, packed_columns(k, bits)), jnp.uint8),
            S((n, 2 ** bits), jnp.dtype(param_dtype)), S((n, n_groups), jnp.dtype(param_dtype)),
            S((n, n_groups), jnp.dtype(param_dtype)))

    def per_call(x, codes, lut, scales, zeros):
        return lut_matmul(x, codes, lut, scales, zeros, k=k, group_size=group_size, strategy=strategy,
                          **block_options)

    config = dataclasses.asdict(dataclasses.replace(block_sizes(m, n, k, group_size, bits), **block_options))
    return per_call, args, {"x": 0, "config": config, "label": "lut_matmul: one launch, swap-AB dot, fused zero"}
