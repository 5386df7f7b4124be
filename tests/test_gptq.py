"""GPTQ error feedback against a plain numpy reference (the sequential OBQ
update on an explicit inverse Hessian, float64) and against round-to-nearest."""

import numpy as np
import pytest

from any4_jax import load_model, quantize_tensor
from any4_jax.calibrate import dense_input_hessians, generated_ids
from any4_jax.gptq import gptq_quantize
from any4_jax.quantize import quantize_model
from conftest import codes_by_hand, correlated_inputs, layer_errors, output_error


def gptq_int_reference(w, h, g, bits=4, damp=0.01, act_order=False):
    """GPTQ for intN in float64, written from the paper's equations without its
    tricks: after quantizing column j, the other unquantized columns get
    ``-err / Hinv[j, j] * Hinv[j, :]`` and column j is eliminated from ``Hinv``.
    Group min/max are taken when the loop reaches a group (or, with act_order,
    from the original weights, columns by decreasing diag(H))."""
    w = w.astype(np.float64).copy()
    n, k = w.shape
    h = h.astype(np.float64) / np.mean(np.diag(h)) + damp * np.eye(k)
    hinv = np.linalg.inv(h)
    levels = 2 ** bits - 1
    codes = np.zeros((n, k), np.int64)

    def params(cols):
        mn = cols.min(1)
        s = (np.maximum(cols.max(1) - mn, 1e-6) / levels).astype(np.float32).astype(np.float64)
        return s, mn.astype(np.float32).astype(np.float64)

    static = [params(w[:, i:i + g]) for i in range(0, k, g)]
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    done = np.zeros(k, bool)
    for j in order:
        if act_order:
            s, mn = static[j // g]
        elif j % g == 0:
            s, mn = params(w[:, j:j + g])
        q = np.clip(np.round((w[:, j] - mn) / s), 0, levels)
        codes[:, j] = q
        err = w[:, j] - (q * s + mn)
        done[j] = True
        rest = ~done
        w[:, rest] -= np.outer(err / hinv[j, j], hinv[j, rest])
        w[:, j] = q * s + mn
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k, g", [(256, 64), (192, 128)])
def test_int4_matches_the_numpy_reference(rng, act_order, k, g):
    w = (rng.standard_t(4, (24, k)) * 0.02).astype(np.float32)
    x = correlated_inputs(rng, 1024, k)
    h = x.T @ x / len(x)
    qw = gptq_quantize(w, h, "int4", g, act_order=act_order, storage_dtype="float32")
    ref = gptq_int_reference(w, h, g, act_order=act_order)
    assert np.mean(codes_by_hand(qw) == ref) > 0.99  # float32 vs float64: a rare tie flips


@pytest.mark.parametrize("fmt", ["int4", "nf4", "any4", "any3"])
@pytest.mark.parametrize("g", [64, None])
def test_output_error_below_round_to_nearest(rng, fmt, g):
    """GPTQ minimizes tr((W - Ŵ) H (W - Ŵ)ᵀ) column by column: on inputs with a
    known Hessian it ends well below the same format's round-to-nearest (or
    nearest-LUT-entry) error; K = 200 leaves a partial last group."""
    w = (rng.standard_t(4, (32, 200)) * 0.02).astype(np.float32)
    x = correlated_inputs(rng, 2048, 200)
    h = x.T @ x / len(x)
    rtn = quantize_tensor(w, fmt, g, sample_weight=np.abs(x).mean(0))
    for act_order in (False, True):
        qw = gptq_quantize(w, h, fmt, g, lut=rtn.lut, act_order=act_order, damp=0.01)
        assert qw.shape == rtn.shape and qw.group_size == rtn.group_size
        assert output_error(w, qw, h) < 0.8 * output_error(w, rtn, h), (fmt, act_order)


def test_identity_hessian_is_round_to_nearest(rng):
    """With H = I there is nothing to compensate: int4 GPTQ is round-to-nearest."""
    w = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    qw = gptq_quantize(w, np.eye(128), "int4", 64, damp=0.0, storage_dtype="float32")
    rtn = quantize_tensor(w, "int4", 64, storage_dtype="float32")
    np.testing.assert_array_equal(codes_by_hand(qw), codes_by_hand(rtn))


@pytest.mark.parametrize("kwargs, match", [
    (dict(hessian=np.eye(63)), r"hessian must have shape \(K, K\) = \(64, 64\)"),
    (dict(fmt="any4"), r"any4 needs its learned lut of shape \(2, 16\)"),
    (dict(damp=-1.0), "damp must be a finite number >= 0"),
    (dict(hessian=np.full((64, 64), np.nan)), "finite"),
    (dict(group_size=48), "accepted: 32, 64"),
])
def test_bad_input(kwargs, match):
    args = dict(w=np.ones((2, 64), np.float32), hessian=np.eye(64), fmt="int4", group_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gptq_quantize(args.pop("w"), args.pop("hessian"), args.pop("fmt"), args.pop("group_size"), **args)


def test_hessians_match_pytorch_hooks(tiny_model):
    from hf_models import linear_inputs
    hf, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 24)).astype(np.int32)
    inputs = linear_inputs(hf, ids)
    ours = dense_input_hessians(model, params, ids)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x = inputs[name].double().numpy()
        path = name.removeprefix("model.").replace("layers.", "layers_").replace(".", "/")
        np.testing.assert_allclose(ours[path], x.T @ x / len(x), rtol=1e-4, atol=1e-5 * np.abs(x).max() ** 2)


def test_quantize_model_gptq_lowers_every_layers_output_error(tiny_calibrated):
    """On the calibration tokens, each layer's tr((W - Ŵ) H (W - Ŵ)ᵀ) under
    method='gptq' is below plain int4's; the recipe records the method."""
    model, params, ids, h = tiny_calibrated
    kw = dict(fmt="int4", group_size=32, calibration=ids, progress=False)
    plain_model, plain = quantize_model(model, params, **kw)
    gptq_model, gptq = quantize_model(model, params, method="gptq", act_order=True, **kw)
    assert (plain_model.dense.recipe.method, gptq_model.dense.recipe.method) == ("plain", "gptq")
    assert gptq_model.dense.recipe.act_order
    errors = layer_errors(params, plain, gptq, h)
    assert all(e_gptq < e_plain * 1.001 for e_plain, e_gptq in errors.values()), errors
    assert sum(e_gptq < 0.9 * e_plain for e_plain, e_gptq in errors.values()) >= 10  # of 14 layers
    with pytest.raises(ValueError, match="method='gptq' needs calibration data"):
        quantize_model(model, params, fmt="int4", method="gptq", calibration=None, progress=False)


def test_generated_calibration_is_seeded_text_from_the_model(tiny_model):
    from hf_models import char_tokenizer
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    tok = char_tokenizer()
    a = generated_ids(model, params, tok, sequences=3, tokens=20, seed=1)
    b = generated_ids(model, params, tok, sequences=3, tokens=20, seed=1)
    c = generated_ids(model, params, tok, sequences=3, tokens=20, seed=2)
    np.testing.assert_array_equal(a, b)
    assert a.shape[0] == 3 and a.shape[1] >= 20 and not np.array_equal(a, c)
    assert (tok.decode(a[0, :3]), tok.decode(a[1, :2]), tok.decode(a[2, :1])) == ("The", "In", "A")
    with pytest.raises(ValueError, match="sequences must be 1..16"):
        generated_ids(model, params, tok, sequences=0)
