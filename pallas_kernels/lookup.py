"""The LUT lookup of the GPU kernel as a program of 32-bit integer ops.

16-bit LUT values of 8 codes (one 32-bit word) from a LUT held in registers,
with byte permutes. The LUT row is split into its entries' high bytes and low
bytes, four entries a register (th0..th3 = high bytes of entries 0-3, 4-7,
8-11, 12-15; tl0..tl3 the low bytes). ``prmt(a, b, sel)``: byte i of the result
is byte ``(sel >> 4i) & 7`` of the 8 bytes {b, a} (a = bytes 0-3; the
selector's mode bits are never set here). ``sel(a, b, m)``: bitwise ``m ? b : a``.
The same program is printed as PTX for the GPU (``lookup_ptx``) and run as jnp
integer ops in interpret mode and in tests (``lookup_emulated``); the tests also
run the printed PTX through an evaluator written from the PTX ISA.
"""

from __future__ import annotations

import jax.numpy as jnp

PROGRAM = (
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
TABLES = ("th0", "th1", "th2", "th3", "tl0", "tl1", "tl2", "tl3")


def lookup_ptx(half: int) -> str:
    """The PTX of the part of ``PROGRAM`` that makes outputs o{2h}, o{2h+1}, for
    ``elementwise_inline_asm`` with pack = 4 (one result a call: jax's lowering
    takes one): output $0, $1 (two 16-bit values each), inputs $2 (4 code bytes =
    one word) and $3..$10 (the eight table registers). ptxas shares what the two
    halves have in common."""
    outs = {f"o{2 * half}": "$0", f"o{2 * half + 1}": "$1"}
    regs = {"c": "$2", **{t: f"${3 + i}" for i, t in enumerate(TABLES)}, **outs}
    needed, program = set(outs), []
    for op in reversed(PROGRAM):  # keep only what the outputs depend on
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
    """``PROGRAM`` in jnp: uint32 ``words`` and a dict of uint32 table registers
    (broadcastable) -> the four uint32 output registers."""
    env = {"c": words, **tables}
    for op, d, *a in PROGRAM:
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
    """``(..., 16)`` uint16 LUT values -> the eight uint32 table registers of ``PROGRAM``."""
    lut16 = lut16.astype(jnp.uint32)
    words = {}
    for q in range(4):
        for name, byte in (("th", lut16 >> 8), ("tl", lut16 & 0xFF)):
            words[f"{name}{q}"] = sum(byte[..., 4 * q + e] << (8 * e) for e in range(4))
    return words


