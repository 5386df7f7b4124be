"""GPTQ error feedback for every format (docs/design.md §9).

GPTQ (Frantar et al., 2023) quantizes a weight one input column at a time and
pushes each column's error onto the columns not yet quantized, weighted by the
inverse Hessian ``H = E[x xᵀ]`` of the layer's inputs, which minimizes the
layer's output error ``‖X Wᵀ − X Ŵᵀ‖²`` column by column. Here the "codebook" of
a row is its LUT: the fixed table of int/nf4/fp4, or the LUT any4 learned by
weighted k-means (``formats.quantize_tensor``), so error feedback serves every
format and writes the same ``QuantizedWeight``.

The loop runs in the form QuIP calls LDLQ: column j is quantized at
``x_j = w_j + Σ_{i<j} (w_i − q_i) B_ij`` with ``B`` from one Cholesky
factorization of ``H`` (``_feedback``), which gives GPTQ's codes without the
inverse of ``H`` its Cholesky form needs (docs/design.md §9).

int and table formats take a group's scale and zero when the loop reaches the
group, from the columns as the feedback has updated them (GPTQ's default); anyN
keeps the group scales its LUT was fitted in, taken up front from the original
weights ("static groups"); ``act_order`` takes the columns in order of
decreasing ``diag(H)``, with static groups for every format.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.formats import QuantizedWeight, assemble, check_group_size, check_storage_dtype, get_format
from any4_jax.recipe import default_damp

BLOCK = 128  # columns updated lazily together (GPTQ's block size)


def check_weight_and_hessian(w, hessian, shape=None):
    """``w`` and ``hessian`` as float32 arrays, or a ValueError naming the problem:
    ``w`` must be ``(N, K)`` (``shape`` if given), ``hessian`` ``(K, K)``, both finite."""
    w = jnp.asarray(w, jnp.float32)
    if shape is not None and tuple(w.shape) != tuple(shape):
        raise ValueError(f"w must have the quantized weight's shape {tuple(shape)}; got {tuple(w.shape)}")
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D (N, K) weight matrix; got shape {w.shape}")
    k = w.shape[1]
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (k, k):
        raise ValueError(f"hessian must have shape (K, K) = ({k}, {k}) to match w of shape {w.shape}; got {h.shape}")
    if not (bool(jnp.all(jnp.isfinite(w))) and bool(jnp.all(jnp.isfinite(h)))):
        raise ValueError("w and hessian must be finite (no NaN/Inf)")
    return w, h


def gptq_quantize(w, hessian, fmt: str = "int4", group_size: int | None = 128, *, lut=None,
                  damp: float | None = None, act_order: bool = False, storage_dtype="bfloat16") -> QuantizedWeight:
    """Quantize an ``(N, K)`` weight with GPTQ error feedback.

    Args:
      w: ``(N, K)`` float weight (PyTorch layout).
      hessian: ``(K, K)`` ``E[x xᵀ]`` of the layer's inputs (any positive
        multiple: it is normalized by its mean diagonal).
      fmt, group_size, storage_dtype: as for ``quantize_tensor``.
      lut: ``(N, 2**bits)`` per-row table for the learned formats (anyN),
        e.g. the ``lut`` of ``quantize_tensor(w, "any4", ...)``; the fixed
        formats use their own table.
      damp: added to the diagonal, as a fraction of its mean (default ``default_damp(fmt)``).
      act_order: quantize columns by decreasing ``diag(H)`` (static groups).
    """
    spec = get_format(fmt)
    check_group_size(group_size)
    dtype = check_storage_dtype(storage_dtype)
    w, h = check_weight_and_hessian(w, hessian)
    n, k = w.shape
    damp = default_damp(fmt) if damp is None else damp
    if not (np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0; got {damp}")
    levels = 2 ** spec.bits
    if spec.kind == "learned":
        if lut is None or tuple(np.shape(lut)) != (n, levels):
            raise ValueError(f"{fmt} needs its learned lut of shape ({n}, {levels}) "
                             f"(the lut of quantize_tensor(w, {fmt!r}, ...)); got {None if lut is None else np.shape(lut)}")
        table = jnp.asarray(lut).astype(dtype).astype(jnp.float32)
    elif spec.kind == "int":
        table = jnp.broadcast_to(jnp.arange(levels, dtype=jnp.float32), (n, levels))
    else:
        table = jnp.broadcast_to(jnp.asarray(spec.table), (n, levels))
    g = k if group_size is None else group_size
    codes, scales, zeros = _gptq(w, h, table, g=g, kind=spec.kind, bits=spec.bits, damp=float(damp),
                                 act_order=act_order, dtype=dtype)
    return assemble(w, codes, table, scales, zeros, fmt, g, dtype)


def group_parameters(wg, valid, kind: str, bits: int):
    """``(scale, zero)`` of groups ``wg (..., G)`` as ``formats`` defines them per
    kind (min-max for int and anyN, anyN's zero centred; absmax for the tables);
    ``valid`` masks padding out."""
    if kind == "table":
        return jnp.where(valid, jnp.abs(wg), 0).max(-1), jnp.zeros(wg.shape[:-1], jnp.float32)
    mn = jnp.where(valid, wg, jnp.inf).min(-1)
    s = jnp.maximum(jnp.where(valid, wg, -jnp.inf).max(-1) - mn, 1e-6) / (2 ** bits - 1)
    return s, mn + (2 ** (bits - 1) * s if kind == "learned" else 0)


def _feedback(h):
    """``B`` (strictly upper triangular) such that quantizing columns in order
    with ``x = w + (w - q) B`` is GPTQ's error feedback (QuIP's LDLQ form of it):
    with ``H = M Mᵀ``, ``M`` upper triangular (a Cholesky factorization of ``H``
    with its rows and columns reversed), ``B = M diag(M)⁻¹ − I``. One Cholesky
    (n³/3 flops): GPTQ's Cholesky factor of ``H⁻¹`` took an inverse besides
    (~3 n³), the most of GPTQ's time at K = 14336."""
    m = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    return jnp.triu(m / jnp.diag(m)[None, :], k=1)


@functools.partial(jax.jit, static_argnames=("g", "kind", "bits", "damp", "act_order", "dtype"))
def _gptq(w, h, table, *, g, kind, bits, damp, act_order, dtype):
    n, k = w.shape
    block = max(BLOCK, g)  # a group never straddles two blocks
    kp = -(-k // block) * block
    valid = jnp.arange(kp) < k
    # padding: zero weights and an identity Hessian block (its errors reach no real column)
    w = jnp.pad(w, ((0, 0), (0, kp - k)))
    h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag(jnp.where(valid, 0.0, 1.0))
    dead = jnp.diag(h) == 0  # an input that is always zero: its weights do not matter
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[None], 0.0, w)
    h = h / jnp.mean(jnp.diag(h)[:k])
    h = h + damp * jnp.eye(kp)

    group_of = jnp.arange(kp) // g
    n_groups = kp // g
    static = act_order or kind == "learned"
    if static:  # group scales from the original weights (those a learned LUT was fitted with)
        s0, z0 = group_parameters(w.reshape(n, n_groups, g), valid.reshape(n_groups, g), kind, bits)
        s0, z0 = s0.astype(dtype).astype(jnp.float32), z0.astype(dtype).astype(jnp.float32)
    else:
        s0 = z0 = jnp.zeros((n, n_groups), jnp.float32)
    # act_order: columns by decreasing diag(H), padding last
    perm = jnp.argsort(jnp.where(valid, -jnp.diag(h), jnp.inf)) if act_order else jnp.arange(kp)
    w, h, col_group, col_valid = w[:, perm], h[perm][:, perm], group_of[perm], valid[perm]
    feedback = _feedback(h)
    del h
    if not static:  # the weights GPTQ's group scales are taken from (see below)
        diagonal = feedback.reshape(n_groups, g, n_groups, g)[jnp.arange(n_groups), :, jnp.arange(n_groups)]
        unit = jnp.eye(g) + diagonal  # (groups, G, G) unit upper triangular
        refit = jax.vmap(lambda a: jax.scipy.linalg.solve_triangular(a, jnp.eye(g), lower=False,
                                                                      unit_diagonal=True))(unit)

    def column(i, state, start, f1):
        w1, e1, codes, s, z = state
        j = start + i
        if not static:  # a group's scale and zero when the loop reaches its first column
            def new_group(sz):
                # GPTQ takes them from its updated weights: the best fit of the columns left given
                # the codes chosen so far, w + (x - w)(I + B_gg)^-1 from the running x = w + e B
                x = jax.lax.dynamic_slice_in_dim(w1, (i // g) * g, g, axis=1)
                w0 = jax.lax.dynamic_slice_in_dim(e1, (i // g) * g, g, axis=1)
                cols = w0 + (x - w0) @ refit[j // g]
                ok = jax.lax.dynamic_slice_in_dim(col_valid, j, g)
                sn, zn = group_parameters(cols, ok, kind, bits)
                return (sz[0].at[:, j // g].set(sn.astype(dtype).astype(jnp.float32)),
                        sz[1].at[:, j // g].set(zn.astype(dtype).astype(jnp.float32)))

            s, z = jax.lax.cond(j % g == 0, new_group, lambda sz: sz, (s, z))
        sc, ze = s[:, col_group[j]], z[:, col_group[j]]
        target = (w1[:, i] - ze) / jnp.where(sc > 0, sc, 1.0)
        code = jnp.argmin(jnp.abs(table - target[:, None]), axis=1)
        q = jnp.take_along_axis(table, code[:, None], axis=1)[:, 0] * sc + ze
        err = e1[:, i] - q  # e1 holds the block's original weights until each column's turn
        w1 = w1 + err[:, None] * f1[i][None, :]  # strictly upper: reaches the later columns only
        return w1, e1.at[:, i].set(err), codes.at[:, j].set(code.astype(jnp.uint8)), s, z

    def run_block(b, state):
        e, codes, s, z = state
        start = b * block
        w0 = jax.lax.dynamic_slice_in_dim(w, start, block, axis=1)
        # x = w + e B: the errors of every column before the block reach it in one product
        w1 = w0 + e @ jax.lax.dynamic_slice_in_dim(feedback, start, block, axis=1)
        f1 = jax.lax.dynamic_slice(feedback, (start, start), (block, block))
        w1, e1, codes, s, z = jax.lax.fori_loop(
            0, block, functools.partial(column, start=start, f1=f1), (w1, w0, codes, s, z))
        return jax.lax.dynamic_update_slice_in_dim(e, e1, start, axis=1), codes, s, z

    codes = jnp.zeros((n, kp), jnp.uint8)
    _, codes, s, z = jax.lax.fori_loop(0, kp // block, run_block, (jnp.zeros_like(w), codes, s0, z0))
    codes = codes[:, jnp.argsort(perm)][:, :k]
    n_real = -(-k // g)
    return codes, s[:, :n_real], z[:, :n_real]
