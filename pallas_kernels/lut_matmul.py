"""LUT-dequant matmul ``y = x @ W^T`` for 4-bit-container LUT weights (Pallas, Triton backend).

    W[n, k] = lut[n, code[n, k]] * scales[n, k // G] + zeros[n, k // G]

**Code layout** (``pack_codes`` / ``unpack_codes``; ``any4_jax`` stores codes this
way): K is cut into blocks of ``CODE_BLOCK`` = 64 elements (the last one padded
with code 0), 32 bytes a block, read as 8 little-endian 32-bit words. Nibble
``e`` (bits 4e..4e+3) of word ``w`` holds element ``4w + e`` for e < 4 and
element ``32 + 4w + (e - 4)`` for e >= 4. So the low half of each word's nibbles
multiplies the block's first 32 inputs and the high half its last 32: x is read
as two contiguous halves, and one ``prmt`` looks up four codes at once
(``_LOOKUP``). 2- and 3-bit codes use the same 4-bit containers.

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
shape does not divide its block.

``lut_matmul_reference`` (pure jnp) is the spec; ``static_entry`` is the entry
the static analysis tool calls (everything per call on the GPU path).
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

CODE_BLOCK = 64           # K elements per packed block
HALF = CODE_BLOCK // 2    # bytes per packed block
DECODE_MAX_M = 16         # up to here x rows are padded to one MMA width
STRATEGIES = ("prmt", "gather")


# ---------------------------------------------------------------------------
# The code layout.

def packed_columns(k: int) -> int:
    """Bytes per row of packed codes for K inputs."""
    return -(-k // CODE_BLOCK) * HALF


def pack_codes(codes):
    """``(N, K)`` ints in [0, 16) -> ``(N, packed_columns(K))`` uint8 (see module docstring)."""
    codes = jnp.asarray(codes, jnp.uint8)
    n, k = codes.shape
    # (block, half, word, element): element 4w + e of a half; bytes pair up elements (0,1) and (2,3)
    c = jnp.pad(codes, ((0, 0), (0, -k % CODE_BLOCK))).reshape(n, -1, 2, 8, 2, 2)
    byte = c[..., 0] | (c[..., 1] << 4)                    # (n, block, half, word, pair)
    return byte.transpose(0, 1, 3, 2, 4).reshape(n, -1)    # word-major: [half0 pairs, half1 pairs]


def low_nibble_elements(k: int) -> np.ndarray:
    """``(packed_columns(K),)``: the element (of K padded to whole blocks) whose
    code is the low nibble of each packed byte; the high nibble holds the next
    element. Lets a consumer permute ``x`` into the storage order instead of
    unpacking the codes."""
    j = np.arange(HALF)
    word, half, pair = j // 4, (j // 2) % 2, j % 2
    low = half * HALF + 4 * word + 2 * pair
    return (np.arange(packed_columns(k) // HALF)[:, None] * CODE_BLOCK + low).reshape(-1)


def unpack_codes(packed, k: int):
    """``(N, packed_columns(K))`` uint8 -> ``(N, K)`` uint8."""
    n = packed.shape[0]
    b = packed.reshape(n, -1, 8, 2, 2)                      # (n, block, word, half, pair)
    nib = jnp.stack([b & 0xF, b >> 4], axis=-1)             # (..., pair, lo/hi nibble)
    return nib.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1)[:, :k]


# ---------------------------------------------------------------------------
# The lookup: 16-bit LUT values of 8 codes (one 32-bit word) from a LUT held in
# registers, with byte permutes. The LUT row is split into its entries' high
# bytes and low bytes, four entries a register (th0..th3 = high bytes of entries
# 0-3, 4-7, 8-11, 12-15; tl0..tl3 the low bytes). ``prmt(a, b, sel)``: byte i of
# the result is byte ``(sel >> 4i) & 7`` of the 8 bytes {b, a} (a = bytes 0-3;
# the selector's mode bits are never set here). ``sel(a, b, m)``: bitwise
# ``m ? b : a``. The same program is printed as PTX for the GPU (``_lookup_ptx``)
# and run as jnp integer ops in interpret mode and in tests (``lookup_emulated``).

_LOOKUP = (
    ("and", "s", "c", 0x77777777),        # 3-bit index of every code
    ("shr", "t", "c", 3),
    ("and", "t", "t", 0x11111111),        # bit 3 of every code, moved to bit 0 of its nibble
    ("shr", "s4", "s", 16),               # codes 4..7 (the block's second half)
    ("shr", "t4", "t", 16),
    ("mov", "k", 0x0000FF00),             # byte 0 = 0x00, byte 1 = 0xFF
    ("prmt", "m", "k", "k", "t"),         # byte i = 0xFF where code i >= 8
    ("prmt", "m4", "k", "k", "t4"),
) + tuple(op for half, (idx, mask) in enumerate((("s", "m"), ("s4", "m4"))) for op in (
    ("prmt", "a", "th0", "th1", idx), ("prmt", "b", "th2", "th3", idx), ("sel", f"h{half}", "a", "b", mask),
    ("prmt", "a", "tl0", "tl1", idx), ("prmt", "b", "tl2", "tl3", idx), ("sel", f"l{half}", "a", "b", mask),
)) + (  # outputs last: an output register may share a physical register with an input
    ("prmti", "o0", "l0", "h0", 0x5140), ("prmti", "o1", "l0", "h0", 0x7362),  # codes 0, 1 | 2, 3
    ("prmti", "o2", "l1", "h1", 0x5140), ("prmti", "o3", "l1", "h1", 0x7362),  # codes 4, 5 | 6, 7
)
_TABLES = ("th0", "th1", "th2", "th3", "tl0", "tl1", "tl2", "tl3")


def _lookup_ptx(half: int) -> str:
    """The PTX of the part of ``_LOOKUP`` that makes outputs o{2h}, o{2h+1}, for
    ``elementwise_inline_asm`` with pack = 4 (one result a call: jax's lowering
    takes one): output $0, $1 (two 16-bit values each), inputs $2 (4 code bytes =
    one word) and $3..$10 (the eight table registers). ptxas shares what the two
    halves have in common."""
    outs = {f"o{2 * half}": "$0", f"o{2 * half + 1}": "$1"}
    regs = {"c": "$2", **{t: f"${3 + i}" for i, t in enumerate(_TABLES)}, **outs}
    needed, program = set(outs), []
    for op in reversed(_LOOKUP):  # keep only what the outputs depend on
        if op[1] in needed:
            program.insert(0, op)
            needed = (needed - {op[1]}) | {a for a in op[2:] if isinstance(a, str)}
    temps = sorted({op[1] for op in program} - set(regs))
    r = lambda name: regs.get(name, f"%{name}")
    lines = [f".reg .b32 {', '.join('%' + t for t in temps)};"]
    for op, d, *a in program:
        if op == "mov":
            lines.append(f"mov.b32 {r(d)}, {a[0]:#x};")
        elif op == "and":
            lines.append(f"and.b32 {r(d)}, {r(a[0])}, {a[1]:#x};")
        elif op == "shr":
            lines.append(f"shr.u32 {r(d)}, {r(a[0])}, {a[1]};")
        elif op == "prmt":
            lines.append(f"prmt.b32 {r(d)}, {r(a[0])}, {r(a[1])}, {r(a[2])};")
        elif op == "prmti":
            lines.append(f"prmt.b32 {r(d)}, {r(a[0])}, {r(a[1])}, {a[2]:#x};")
        elif op == "sel":  # lop3 truth table of (m ? b : a) with a = 0xF0, b = 0xCC, m = 0xAA
            lines.append(f"lop3.b32 {r(d)}, {r(a[0])}, {r(a[1])}, {r(a[2])}, 0xD8;")
    return "{\n" + "\n".join(lines) + "\n}"


def prmt(a, b, sel):
    """PTX ``prmt.b32`` (default mode, selector mode bits clear) on uint32 arrays."""
    out = jnp.zeros_like(a)
    for i in range(4):
        idx = (sel >> (4 * i)) & 7
        byte = jnp.where(idx < 4, a >> (8 * (idx & 3)), b >> (8 * (idx & 3))) & 0xFF
        out = out | (byte << (8 * i))
    return out


def lookup_emulated(words, tables):
    """``_LOOKUP`` in jnp: uint32 ``words`` and a dict of uint32 table registers
    (broadcastable) -> the four uint32 output registers."""
    env = {"c": words, **tables}
    for op, d, *a in _LOOKUP:
        if op == "mov":
            env[d] = jnp.full_like(words, a[0])
        elif op == "and":
            env[d] = env[a[0]] & jnp.uint32(a[1])
        elif op == "shr":
            env[d] = env[a[0]] >> jnp.uint32(a[1])
        elif op == "prmt":
            env[d] = prmt(env[a[0]], env[a[1]], env[a[2]])
        elif op == "prmti":
            env[d] = prmt(env[a[0]], env[a[1]], jnp.uint32(a[2]))
        elif op == "sel":
            env[d] = (env[a[0]] & ~env[a[2]]) | (env[a[1]] & env[a[2]])
    return [env[f"o{i}"] for i in range(4)]


def lut_tables(lut16):
    """``(..., 16)`` uint16 LUT values -> the eight uint32 table registers of ``_LOOKUP``."""
    lut16 = lut16.astype(jnp.uint32)
    words = {}
    for q in range(4):
        for name, byte in (("th", lut16 >> 8), ("tl", lut16 & 0xFF)):
            words[f"{name}{q}"] = sum(byte[..., 4 * q + e] << (8 * e) for e in range(4))
    return words


# ---------------------------------------------------------------------------
# The reference: the spec.

def lut_matmul_reference(x, codes, lut, scales, zeros, *, k: int, group_size: int):
    """Pure-jnp ``x @ W^T``: dequantize W in float32, matmul at HIGHEST precision,
    return ``x.dtype``."""
    idx = unpack_codes(codes, k).astype(jnp.int32)
    values = jnp.take_along_axis(lut.astype(jnp.float32), idx, axis=1)
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


def _tuned_key(m, n, k, group_size, bits):
    return f"m{min(pl.next_power_of_2(m), 128)}:n{n}:k{k}:g{group_size}:b{bits}"


def block_config(m: int, n: int, k: int, group_size: int, bits: int = 4) -> dict:
    """Block sizes, warps and stages for a shape: the tuned table's entry if any,
    else a heuristic. Keys: block_m, block_n, block_k, num_warps, num_stages."""
    tuned = tuned_blocks().get(_tuned_key(m, n, k, group_size, bits))
    if tuned:
        return dict(tuned)
    # One group per K block: block_k divides G (64 when G = 32: a group per half-block).
    g = group_size if group_size & (group_size - 1) == 0 else CODE_BLOCK
    block_k = max(CODE_BLOCK, min(256, g, pl.next_power_of_2(k)))
    block_m = 16 if m <= DECODE_MAX_M else 64
    # 16 rows of W a warp (one MMA height); fewer rows a program when N cannot fill the SMs.
    block_n, num_warps = 64, 4
    while num_warps > 1 and pl.cdiv(n, block_n) < 66:
        block_n, num_warps = block_n // 2, num_warps // 2
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=3)


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
        out = lookup_emulated(_words(packed), dict(zip(_TABLES, map(_words, tables))))
        return _halves(out[0], out[1], dtype), _halves(out[2], out[3], dtype)
    spec = jax.ShapeDtypeStruct(packed.shape, dtype)
    return [pltr.elementwise_inline_asm(_lookup_ptx(h), args=[packed, *tables], pack=4,
                                        constraints=",".join(["=r"] * 2 + ["r"] * 9),
                                        result_shape_dtypes=[spec])[0] for h in (0, 1)]


def _kernel(x_ref, codes_ref, lut_ref, scales_ref, zeros_ref, out_ref, *, m, n, k, n_groups, group_size,
            levels, block_m, block_n, block_k, strategy, interpret):
    """One program: W rows [j*BN, (j+1)*BN) times x rows [i*BM, (i+1)*BM), over all of K.
    All refs are flat; indices are computed here."""
    i, j = pl.program_id(0), pl.program_id(1)
    kc = packed_columns(k)
    dtype = x_ref.dtype
    # Rows past N (or M) repeat the last real row: they compute exact duplicates and store
    # the same values to the same place, so no load or store needs a row mask.
    rows = jnp.minimum(j * block_n + jnp.arange(block_n), n - 1)
    xrows = jnp.minimum(i * block_m + jnp.arange(block_m), m - 1)
    tail = k % block_k != 0                 # the last K block runs past K: mask x (codes are padded)
    split_groups = group_size < block_k     # G = 32: each half of a code block is its own group
    # Code blocks of one group are looked up and multiplied together: `fuse` blocks a dot.
    fuse = 1 if split_groups else block_k // CODE_BLOCK
    span = jnp.arange(HALF * fuse)          # bytes of `fuse` blocks; value j sits at x column:
    x_col = (span // HALF) * CODE_BLOCK + span % HALF   # ... k0 + x_col (+ HALF for the high halves)
    prec = lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def load(ref, mask=None):
        return pltr.load(ref, mask=mask, other=None if mask is None else 0)

    # Ones for the Σx MMA, as a load that never reads (rows are never negative): loaded
    # data can be an MMA operand in shared memory, a constant is rebuilt in registers per MMA.
    ones = pltr.load(x_ref.at[jnp.zeros((block_n, HALF * fuse), jnp.int32)], mask=(rows < 0)[:, None], other=1)

    def dot(a, b):  # (BN, HALF) x (BM, HALF)^T on the tensor cores, float32 accumulation
        return jnp.dot(a, b.T, preferred_element_type=jnp.float32, precision=prec)

    if strategy == "prmt":  # the LUT row's bytes, four entries a register (loop-invariant)
        entry = (span % 4)[None, :]  # as wide as the code tiles of a fused lookup
        tables = {}
        for q in range(4):
            e = 4 * q + entry
            v = load(lut_ref.at[rows[:, None] * levels + jnp.minimum(e, levels - 1)],
                     e < levels if 4 * q + 3 >= levels else None)
            u = lax.bitcast_convert_type(v.astype(dtype), jnp.uint16).astype(jnp.uint32)
            tables[f"th{q}"], tables[f"tl{q}"] = (u >> 8).astype(jnp.uint8), (u & 0xFF).astype(jnp.uint8)
        tables = [tables[t] for t in _TABLES]

    def codes_at(byte0, byte_cols):  # byte0: a multiple of 32 written without division (alignment stays visible)
        return load(codes_ref.at[rows[:, None] * kc + (byte0 + byte_cols)[None, :]])

    def lookup(byte0, n_blocks=1):
        """The LUT values of the low and high halves of ``n_blocks`` code blocks from
        byte0, ``(BN, 32 * n_blocks)`` each (blocks side by side)."""
        if strategy == "prmt":
            return _prmt_lookup(codes_at(byte0, jnp.arange(HALF * n_blocks)), tables, dtype, interpret)
        j = jnp.arange(HALF * n_blocks)
        blk, pos = j // HALF, j % HALF
        out = []  # gather: a pointer-indexed load per code; element 4w + e of a half is
        for h in (0, 2):  # nibble e % 2 of byte 4w + h + e // 2 of its block (see the code layout)
            byte = codes_at(byte0, blk * HALF + 4 * (pos // 4) + h + (pos % 4) // 2).astype(jnp.int32)
            code = (byte >> (4 * (pos % 2))[None, :]) & 0xF
            out.append(load(lut_ref.at[(rows * levels)[:, None] + code]).astype(dtype))
        return out

    def scale_and_zero(g):
        s = load(scales_ref.at[rows * n_groups + g]).astype(jnp.float32)
        z = load(zeros_ref.at[rows * n_groups + g]).astype(jnp.float32)
        return s[:, None], z[:, None]

    def body(kb, acc):
        k0 = kb * block_k
        prod = xsum = None  # Σ W x and Σ x of this K block, accumulated in the MMA accumulators
        for sub in range(block_k // CODE_BLOCK // fuse):  # `fuse` code blocks at a time
            c0 = k0 + sub * CODE_BLOCK * fuse
            for w, off in zip(lookup(kb * (block_k // 2) + sub * HALF * fuse, fuse), (0, HALF)):
                cols = c0 + off + x_col
                xt = load(x_ref.at[xrows[:, None] * k + cols[None, :]], (cols < k)[None, :] if tail else None)
                if split_groups:  # G = 32 (block_k = 64): each half is its own group
                    s, z = scale_and_zero(2 * kb + off // HALF)
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


@functools.partial(jax.jit, static_argnames=(
    "k", "group_size", "strategy", "interpret", "block_m", "block_n", "block_k", "num_warps", "num_stages"))
def _lut_matmul(x, codes, lut, scales, zeros, *, k, group_size, strategy, interpret, block_m, block_n, block_k,
                num_warps, num_stages):
    m, n = x.shape[0], codes.shape[0]
    kernel = functools.partial(
        _kernel, m=m, n=n, k=k, n_groups=scales.shape[1], group_size=group_size, levels=lut.shape[1],
        block_m=block_m, block_n=block_n, block_k=block_k, strategy=strategy, interpret=interpret)
    y = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        out_shape=jax.ShapeDtypeStruct((m * n,), x.dtype),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lut_matmul",
    )(x.reshape(-1), codes.reshape(-1), lut.reshape(-1), scales.reshape(-1), zeros.reshape(-1))
    return y.reshape(m, n)


def lut_matmul(x, codes, lut, scales, zeros, *, k: int, group_size: int, strategy: str | None = None,
               interpret: bool = False, **block_options):
    """``x @ W^T`` with float32 accumulation, returned in ``x.dtype``.

    Args:
      x: ``(M, K)`` bf16, f16 or f32.
      codes: ``(N, packed_columns(K))`` uint8 in the layout of ``pack_codes``.
      lut: ``(N, 2**bits)``; scales, zeros: ``(N, ceil(K/G))`` (any float dtype).
      k, group_size: K and the group length (``K`` for one group per row).
      strategy: the LUT lookup: ``"prmt"`` (the LUT in registers, byte permutes;
        16-bit x only) or ``"gather"`` (a load per code); default prmt for
        bf16/f16 x, gather for float32 x.
      interpret: run in the Pallas interpreter (any backend; for tests).
      block_options: override ``block_config`` (block_m, block_n, block_k,
        num_warps, num_stages). Block sizes are powers of two; block_m and
        block_n >= 16; block_k a multiple of 64 that divides G (or 64 for G = 32).
    """
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be (M, K={k}); got {x.shape}")
    sixteen_bit = x.dtype in (jnp.bfloat16, jnp.float16)
    strategy = strategy or ("prmt" if sixteen_bit else "gather")
    if strategy not in STRATEGIES or (strategy == "prmt" and not sixteen_bit):
        raise ValueError(f"unknown strategy {strategy!r} for x of dtype {x.dtype}; accepted: "
                         f"{'prmt, gather' if sixteen_bit else 'gather (prmt needs bf16 or f16 x)'}")
    n = codes.shape[0]
    if codes.shape != (n, packed_columns(k)) or codes.dtype != jnp.uint8:
        raise ValueError(f"codes must be uint8 (N, packed_columns(K)) = ({n}, {packed_columns(k)}); "
                         f"got {codes.dtype} {codes.shape}")
    levels = lut.shape[1]
    if lut.shape[0] != n or levels not in (4, 8, 16):
        raise ValueError(f"lut must be (N={n}, 4|8|16); got {lut.shape}")
    n_groups = -(-k // group_size)
    if scales.shape != (n, n_groups) or zeros.shape != (n, n_groups):
        raise ValueError(f"scales and zeros must be (N, ceil(K/G)) = ({n}, {n_groups}); "
                         f"got {scales.shape} and {zeros.shape}")
    config = block_config(x.shape[0], n, k, group_size, levels.bit_length() - 1)
    unknown = set(block_options) - set(config)
    if unknown:
        raise ValueError(f"unknown block options {sorted(unknown)}; accepted: {sorted(config)}")
    config.update(block_options)
    for name in ("block_m", "block_n", "block_k"):
        if config[name] & (config[name] - 1) or config[name] < 16:
            raise ValueError(f"{name} must be a power of two >= 16; got {config[name]}")
    bk = config["block_k"]
    if bk % CODE_BLOCK or not (group_size % bk == 0 or group_size == k or (group_size == HALF and bk == CODE_BLOCK)):
        raise ValueError(f"block_k = {bk} must be a multiple of {CODE_BLOCK} that divides the group size "
                         f"{group_size} (or {CODE_BLOCK} for groups of {HALF})")
    return _lut_matmul(x, codes, lut, scales, zeros, k=k, group_size=group_size, strategy=strategy,
                       interpret=interpret, **config)


def static_entry(m, n, k, group_size, bits, strategy=None, x_dtype="bfloat16", param_dtype="bfloat16",
                 **block_options):
    """The entry of the static analysis tool (``--entry pallas_kernels.lut_matmul:static_entry``):
    the per-call function of the GPU path and the weight's arguments as stored."""
    S = jax.ShapeDtypeStruct
    n_groups = -(-k // group_size)
    args = (S((m, k), jnp.dtype(x_dtype)), S((n, packed_columns(k)), jnp.uint8),
            S((n, 2 ** bits), jnp.dtype(param_dtype)), S((n, n_groups), jnp.dtype(param_dtype)),
            S((n, n_groups), jnp.dtype(param_dtype)))

    def per_call(x, codes, lut, scales, zeros):
        return lut_matmul(x, codes, lut, scales, zeros, k=k, group_size=group_size, strategy=strategy,
                          **block_options)

    config = {**block_config(m, n, k, group_size, bits), **block_options}
    return per_call, args, {"x": 0, "config": config, "label": "lut_matmul: one launch, swap-AB dot, fused zero"}
