"""The code layout of 4-bit-container LUT weights, shared by every kernel and the XLA paths.

K is cut into blocks of ``CODE_BLOCK`` = 64 elements (the last one padded with
code 0), 32 bytes a block, read as 8 little-endian 32-bit words. Nibble ``e``
(bits 4e..4e+3) of word ``w`` holds element ``4w + e`` for e < 4 and element
``32 + 4w + (e - 4)`` for e >= 4. So the low half of each word's nibbles
multiplies the block's first 32 inputs and the high half its last 32: x is read
as two contiguous halves, and one byte permute on the GPU looks up four codes
at once (``pallas_kernels.lookup``). 2- and 3-bit codes use the same 4-bit
containers. ``pack_codes`` / ``unpack_codes`` are the one definition; no
Pallas or Triton import here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

CODE_BLOCK = 64           # K elements per packed block
HALF = CODE_BLOCK // 2    # bytes per packed block



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
