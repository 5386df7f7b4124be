"""The code layout of LUT weights, shared by every kernel and the XLA paths.

K is cut into blocks of ``CODE_BLOCK`` = 64 elements (the last one padded with
code 0). A 4-bit block is 32 bytes, read as 8 little-endian 32-bit words.
Nibble ``e`` (bits 4e..4e+3) of word ``w`` holds element ``4w + e`` for e < 4
and element ``32 + 4w + (e - 4)`` for e >= 4. So the low half of each word's
nibbles multiplies the block's first 32 inputs and the high half its last 32:
x is read as two contiguous halves, and one byte permute on the GPU looks up
four codes at once (``pallas_kernels.lookup``).

2- and 3-bit codes take 16 and 24 bytes a block (``block_bytes``), laid out so
that a few shifts and masks turn them back into the 4-bit block
(``expand_codes``; every kernel does this in registers). With ``c4[j]`` the
4-bit block's byte j (codes below 4 or 8):

* bytes 0..15, the low two bits of every code: byte j holds bits 0-1 of
  ``c4[j]``'s two nibbles in its bits 0-1 and 4-5, and those of ``c4[j + 16]``
  in its bits 2-3 and 6-7 (``c4[j] = b[j] & 0x33``, ``c4[j + 16] = (b[j] >> 2) & 0x33``);
* 3-bit only, bytes 16..23, the third bit: bit ``q`` of byte ``16 + i`` is bit 2
  of ``c4[8q + i]``'s low nibble and bit ``4 + q`` that of its high nibble.

``pack_codes`` / ``unpack_codes`` are the one definition; no Pallas or Triton
import here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

CODE_BLOCK = 64           # K elements per packed block
HALF = CODE_BLOCK // 2    # bytes per 4-bit packed block
BITS = (2, 3, 4)


def block_bytes(bits: int = 4) -> int:
    """Bytes per 64-element block of ``bits``-bit codes (16, 24 or 32)."""
    if bits not in BITS:
        raise ValueError(f"codes are 2, 3 or 4 bits wide; got {bits!r}")
    return CODE_BLOCK * bits // 8


def packed_columns(k: int, bits: int = 4) -> int:
    """Bytes per row of packed ``bits``-bit codes for K inputs."""
    return -(-k // CODE_BLOCK) * block_bytes(bits)


def pack_codes(codes, bits: int = 4):
    """``(N, K)`` ints in [0, 2**bits) -> ``(N, packed_columns(K, bits))`` uint8 (see module docstring)."""
    codes = jnp.asarray(codes, jnp.uint8)
    n, k = codes.shape
    # (block, half, word, element): element 4w + e of a half; bytes pair up elements (0,1) and (2,3)
    c = jnp.pad(codes, ((0, 0), (0, -k % CODE_BLOCK))).reshape(n, -1, 2, 8, 2, 2)
    byte = c[..., 0] | (c[..., 1] << 4)                    # (n, block, half, word, pair)
    c4 = byte.transpose(0, 1, 3, 2, 4).reshape(n, -1, HALF)  # word-major: [half0 pairs, half1 pairs]
    if bits == 4:
        return c4.reshape(n, -1)
    block_bytes(bits)
    planes = [(c4[..., :16] & 0x33) | ((c4[..., 16:] & 0x33) << 2)]
    if bits == 3:
        third = (c4 >> 2) & 0x11                           # (n, block, 32): bit 2 of both nibbles
        planes.append(third[..., 0:8] | (third[..., 8:16] << 1) | (third[..., 16:24] << 2) | (third[..., 24:32] << 3))
    return jnp.concatenate(planes, axis=-1).reshape(n, -1)


def expand_codes(packed, bits: int = 4):
    """``(N, packed_columns(K, bits))`` uint8 -> the same codes as 4-bit blocks,
    ``(N, packed_columns(K))`` (what the 4-bit consumers read)."""
    if bits == 4:
        return packed
    n = packed.shape[0]
    b = packed.reshape(n, -1, block_bytes(bits))
    low = b[..., :16]
    c4 = jnp.concatenate([low & 0x33, (low >> 2) & 0x33], axis=-1)
    if bits == 3:
        third = b[..., 16:24]
        c4 = c4 | (jnp.concatenate([(third >> q) & 0x11 for q in range(4)], axis=-1) << 2)
    return c4.reshape(n, -1)


def low_nibble_elements(k: int) -> np.ndarray:
    """``(packed_columns(K),)``: the element (of K padded to whole blocks) whose
    code is the low nibble of each 4-bit packed byte; the high nibble holds the
    next element. Lets a consumer permute ``x`` into the storage order instead of
    unpacking the codes."""
    j = np.arange(HALF)
    word, half, pair = j // 4, (j // 2) % 2, j % 2
    low = half * HALF + 4 * word + 2 * pair
    return (np.arange(packed_columns(k) // HALF)[:, None] * CODE_BLOCK + low).reshape(-1)


def unpack_codes(packed, k: int, bits: int = 4):
    """``(N, packed_columns(K, bits))`` uint8 -> ``(N, K)`` uint8."""
    packed = expand_codes(packed, bits)
    n = packed.shape[0]
    b = packed.reshape(n, -1, 8, 2, 2)                      # (n, block, word, half, pair)
    nib = jnp.stack([b & 0xF, b >> 4], axis=-1)             # (..., pair, lo/hi nibble)
    return nib.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1)[:, :k]


def repack(packed, k: int, bits: int, from_bits: int = 4):
    """Codes packed at ``from_bits`` (e.g. the 4-bit containers older checkpoints
    stored 2- and 3-bit codes in) packed at ``bits``."""
    return pack_codes(unpack_codes(packed, k, from_bits), bits)
