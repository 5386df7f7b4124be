"""Output-aware refinement (any4_jax.refine) against independent references:
the output error decoded by hand, the least-squares optimum of a group's scale
and zero, and the plain method it starts from."""

import numpy as np
import pytest

from any4_jax import quantize_tensor
from any4_jax.gptq import gptq_quantize
from any4_jax.quantize import quantize_model
from any4_jax.recipe import Recipe
from any4_jax.refine import output_error as library_output_error
from any4_jax.refine import refine
from conftest import codes_by_hand, correlated_inputs, layer_errors, output_error


@pytest.mark.parametrize("fmt", ["any4", "nf4", "int4", "any3"])
@pytest.mark.parametrize("start", ["plain", "gptq"])
def test_refinement_never_increases_the_output_error(rng, fmt, start):
    """On its calibration inputs, refined error <= the error it started from,
    row by row, and clearly lower overall; codes never move, fixed tables stay."""
    n, k, g = 48, 200, 64  # a partial last group
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = correlated_inputs(rng, 512, k)
    h = x.T @ x
    qw = quantize_tensor(w, fmt, g, sample_weight=np.abs(x).mean(0))
    if start == "gptq":
        qw = gptq_quantize(w, h, fmt, g, lut=qw.lut, act_order=True)
    refined = refine(qw, w, h)
    before, after = output_error(w, qw, h), output_error(w, refined, h)
    assert after < 0.97 * before
    # rows are independent: none got worse
    d0 = _row_errors(w, qw, h)
    d1 = _row_errors(w, refined, h)
    assert np.all(d1 <= d0 * (1 + 1e-5)), np.max(d1 / d0)
    np.testing.assert_array_equal(codes_by_hand(refined), codes_by_hand(qw))
    if fmt in ("nf4", "int4"):
        np.testing.assert_array_equal(np.asarray(refined.lut), np.asarray(qw.lut))
    assert refined.lut.dtype == qw.lut.dtype and refined.scales.dtype == qw.scales.dtype
    assert library_output_error(w, refined, h) == pytest.approx(after, rel=1e-3)


def _row_errors(w, qw, h):
    from conftest import dequantize_by_hand
    d = dequantize_by_hand(qw) - w
    return np.einsum("nk,kl,nl->n", d, h.astype(np.float64), d)


def test_identity_hessian_reaches_the_least_squares_scale_and_zero(rng):
    """With H = I and int4's fixed table, the best scale and zero of each group
    (codes fixed) is a line fit of the weights on the codes; refinement gets
    within 1% of that optimum's error and not below it."""
    n, k, g = 16, 128, 32
    w = rng.standard_normal((n, k)).astype(np.float32) ** 3  # heavy tails: min-max scales are far from optimal
    qw = quantize_tensor(w, "int4", g, storage_dtype="float32")
    refined = refine(qw, w, np.eye(k, dtype=np.float32), steps=400)
    codes = codes_by_hand(qw).astype(np.float64)
    best = 0.0
    for r in range(n):
        for j in range(0, k, g):
            a = np.stack([codes[r, j:j + g], np.ones(g)], 1)
            coef = np.linalg.lstsq(a, w[r, j:j + g].astype(np.float64), rcond=None)[0]
            best += np.sum((a @ coef - w[r, j:j + g]) ** 2)
    start, got = output_error(w, qw, np.eye(k)), output_error(w, refined, np.eye(k))
    assert best < 0.8 * start  # the test can tell a refinement from none
    assert best * (1 - 1e-4) <= got <= best * 1.01


def test_zero_steps_is_the_identity(rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    qw = quantize_tensor(w, "any4", 32)
    assert refine(qw, w, np.eye(64), steps=0) is qw


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=-1), "steps must be an integer >= 0"),
    (dict(steps=2.5), "steps must be an integer >= 0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),
    (dict(hessian=np.eye(63)), r"hessian must have shape \(K, K\) = \(64, 64\)"),
    (dict(w=np.ones((8, 32))), r"w must have the quantized weight's shape \(8, 64\)"),
    (dict(hessian=np.full((64, 64), np.nan)), "must be finite"),
])
def test_bad_input(rng, kwargs, match):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    qw = quantize_tensor(w, "any4", 32)
    args = dict(w=w, hessian=np.eye(64))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        refine(qw, args.pop("w"), args.pop("hessian"), **args)


def test_quantize_model_refine_lowers_every_layers_output_error(tiny_calibrated):
    """Each layer's error on the calibration tokens under refine_steps is at most
    plain any4's (most clearly lower); the recipe records the steps."""
    model, params, ids, h = tiny_calibrated
    kw = dict(fmt="any4", group_size=32, calibration=ids, progress=False)
    _, plain = quantize_model(model, params, **kw)
    refined_model, refined = quantize_model(model, params, refine_steps=40, **kw)
    assert refined_model.dense.recipe.refine_steps == 40
    errors = layer_errors(params, plain, refined, h)
    assert all(e_refined <= e_plain * (1 + 1e-5) for e_plain, e_refined in errors.values()), errors
    assert sum(e_refined < 0.9 * e_plain for e_plain, e_refined in errors.values()) >= 10  # of 14 layers
    with pytest.raises(ValueError, match="refine_steps > 0 needs calibration data"):
        quantize_model(model, params, refine_steps=5, calibration=None, progress=False)
    with pytest.raises(ValueError, match="refine_steps must be an integer >= 0"):
        quantize_model(model, params, refine_steps=-1, calibration="generated", progress=False)


def test_gptq_refine_is_gptq_then_refinement_under_one_name(tiny_calibrated):
    """method="gptq-refine": the recipe is GPTQ's (act-order, any4's damping) with 40
    refinement steps, and no layer's output error is above GPTQ's alone."""
    model, params, ids, h = tiny_calibrated
    kw = dict(fmt="any4", group_size=32, calibration=ids, progress=False)
    _, gptq = quantize_model(model, params, method="gptq", **kw)
    best_model, best = quantize_model(model, params, method="gptq-refine", **kw)
    r = best_model.dense.recipe
    assert (r.method, r.refine_steps, r.act_order, r.damp) == ("gptq", 40, True, 3.0)
    errors = layer_errors(params, gptq, best, h)
    assert all(e_best <= e_gptq * (1 + 1e-5) for e_gptq, e_best in errors.values()), errors
    assert sum(e_best < 0.95 * e_gptq for e_gptq, e_best in errors.values()) >= 7  # of 14 layers
    with pytest.raises(ValueError, match="accepted: plain, gptq, awq, gptq-refine"):
        quantize_model(model, params, method="best", **kw)


def test_recipes_before_version_3_load_without_refinement():
    d = Recipe(fmt="int4").to_dict()
    assert d["recipe_version"] == 3 and d["refine_steps"] == 0
    del d["refine_steps"]
    assert Recipe.from_dict({**d, "recipe_version": 2}).refine_steps == 0
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['refine_steps'\]"):
        Recipe.from_dict(d)
