"""Output-aware refinement of a quantized weight (docs/design.md §10).

k-means (and GPTQ's snapping) fit a weight's LUT, scales and zeros to the
*weights*. ``refine`` keeps the codes and moves the LUT values (learned formats
only: a fixed table stays fixed), scales and zeros to lower the layer's output
error on its calibration inputs,

    ‖X Wᵀ − X Ŵᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ),   H = Xᵀ X,

with an optax optimizer (Adam) in one ``jax.jit``-ted ``lax.scan``. It never
returns a weight whose output error, with the metadata rounded to its storage
dtype, is higher than the weight it was given.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from any4_jax.formats import QuantizedWeight, assemble, get_format, unpack_codes
from any4_jax.gptq import check_weight_and_hessian
from any4_jax.recipe import REFINE_STEPS

DEFAULT_LEARNING_RATE = 2e-2  # in quantization steps (LUT) and fractions of the scale (scale, zero) per step


def output_error(w, qw: QuantizedWeight, hessian) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` in float32: the summed squared output error
    of ``qw`` against ``w`` on inputs whose ``Xᵀ X`` is ``hessian``."""
    w = jnp.asarray(w, jnp.float32)
    n, k = w.shape
    codes = unpack_codes(qw.codes, k, qw.bits).astype(jnp.int32)
    return float(_row_errors(w, jnp.asarray(hessian, jnp.float32), codes, *_metadata(qw), g=qw.group_size).sum())


def refine(qw: QuantizedWeight, w, hessian, *, steps: int = REFINE_STEPS,
           learning_rate: float = DEFAULT_LEARNING_RATE) -> QuantizedWeight:
    """``qw`` with its LUT (learned formats), scales and zeros refined on the
    output error of ``w (N, K)`` under ``hessian (K, K)`` (``Xᵀ X`` of the
    layer's calibration inputs, any positive multiple), codes unchanged.

    ``steps`` Adam steps at ``learning_rate``; the result is ``qw`` itself if
    refinement (after rounding to the storage dtype) did not lower the error.
    """
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0; got {learning_rate!r}")
    w, h = check_weight_and_hessian(w, hessian, qw.shape)
    k = w.shape[1]
    if steps == 0:
        return qw
    h = h / jnp.maximum(jnp.mean(jnp.diag(h)), 1e-30)
    codes = unpack_codes(qw.codes, k, qw.bits).astype(jnp.int32)
    before = _metadata(qw)
    learn_lut = get_format(qw.fmt).kind == "learned"
    lut, scales, zeros = _refine(w, h, codes, *before, g=qw.group_size, steps=int(steps),
                                 learning_rate=float(learning_rate), learn_lut=learn_lut)
    refined = assemble(w, codes, lut if learn_lut else before[0], scales, zeros, qw.fmt, qw.group_size,
                       qw.scales.dtype)
    # Rows are independent (each has its own LUT, scales and zeros): keep a
    # refined row only where its error, as stored, went down.
    better = (_row_errors(w, h, codes, *_metadata(refined), g=qw.group_size)
              < _row_errors(w, h, codes, *before, g=qw.group_size))[:, None]
    pick = lambda new, old: jnp.where(better, new, old)
    return dataclasses.replace(qw, lut=pick(refined.lut, qw.lut), scales=pick(refined.scales, qw.scales),
                               zeros=pick(refined.zeros, qw.zeros))


def _metadata(qw):
    return tuple(a.astype(jnp.float32) for a in (qw.lut, qw.scales, qw.zeros))


def _dequantize(codes, lut, scales, zeros, g):
    group = jnp.arange(codes.shape[1]) // g
    return jnp.take_along_axis(lut, codes, axis=1) * scales[:, group] + zeros[:, group]


@functools.partial(jax.jit, static_argnames="g")
def _row_errors(w, h, codes, lut, scales, zeros, *, g):
    e = w - _dequantize(codes, lut, scales, zeros, g)
    return jnp.sum((e @ h) * e, axis=1)


@functools.partial(jax.jit, static_argnames=("g", "steps", "learning_rate", "learn_lut"))
def _refine(w, h, codes, lut, scales, zeros, *, g, steps, learning_rate, learn_lut):
    # Parameters in units where one Adam step moves each by ~learning_rate: the
    # LUT in its row's quantization steps, scales and zeros in the group's scale.
    step = jnp.maximum((lut.max(1, keepdims=True) - lut.min(1, keepdims=True)) / (lut.shape[1] - 1), 1e-12)

    def materialize(p):
        return (lut + step * p["lut"], scales * (1 + p["scale"]), zeros + scales * p["zero"])

    def grad(p):  # of tr(E H Eᵀ), E = W − Ŵ(p): one (N, K) x (K, K) product a step
        w_hat, vjp = jax.vjp(lambda p: _dequantize(codes, *materialize(p), g), p)
        return vjp(-2 * ((w - w_hat) @ h))[0]

    opt = optax.adam(learning_rate)
    p0 = {"lut": jnp.zeros_like(lut), "scale": jnp.zeros_like(scales), "zero": jnp.zeros_like(zeros)}

    def update(carry, _):
        p, state = carry
        grads = grad(p)
        if not learn_lut:
            grads["lut"] = jnp.zeros_like(grads["lut"])
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(update, (p0, opt.init(p0)), None, length=steps)
    return materialize(p)
