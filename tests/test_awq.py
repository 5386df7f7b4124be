"""AWQ (any4_jax.awq) against independent references: the float model's own
logits (scaling keeps its function), a numpy search over the same grid, and
round-to-nearest int4 (which AWQ must beat on the layers' output error)."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import load_model
from any4_jax.awq import CLIP_RATIOS, SCALE_GRID, awq
from any4_jax.calibrate import dense_input_hessians, dense_input_statistics
from any4_jax.quantize import quantize_model

IDS = np.random.default_rng(7).integers(0, 128, size=(4, 64)).astype(np.int32)
G = 32


def get(tree, path):
    return functools.reduce(lambda t, key: t[key], path.split("/"), tree)


def rtn_int4(w, g):
    """Round-to-nearest int4 of ``w (N, K)`` in float64: min-max per group of ``g``."""
    n, k = w.shape
    out = np.empty_like(w, np.float64)
    for j in range(0, k, g):
        c = w[:, j:j + g].astype(np.float64)
        mn = c.min(1, keepdims=True)
        s = np.maximum(c.max(1, keepdims=True) - mn, 1e-6) / 15
        out[:, j:j + g] = np.clip(np.round((c - mn) / s), 0, 15) * s + mn
    return out


def error(w, w_hat, h):
    d = np.asarray(w, np.float64) - w_hat
    return float(np.einsum("nk,kl,nl->", d, np.asarray(h, np.float64), d))


@pytest.fixture(params=["llama", "qwen2_mha"])  # grouped-query attention; full heads with biases (v -> o folds)
def calibrated(request, tiny_model):
    _, flax_dir = tiny_model(request.param)
    model, params, _ = load_model(flax_dir)
    h = dense_input_hessians(model, params, IDS)
    mean_abs = dense_input_statistics(model, params, IDS, "mean_abs")
    h.pop("lm_head", None)
    return request.param, model, params, h, mean_abs


def test_scaling_keeps_the_float_model_and_searches_the_grid(calibrated):
    arch, model, params, h, mean_abs = calibrated
    scaled, h_scaled = awq(model.config, params, h, mean_abs, "int4", G, clip=False)
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    got = np.asarray(model.apply({"params": scaled}, jnp.asarray(IDS)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    folds = ["layers_0/input_layernorm", "layers_0/post_attention_layernorm", "layers_0/mlp/up_proj"]
    # The q/k/v group's scale, read off the folded norm, is the best of the grid by a numpy search.
    s = np.asarray(get(params, "layers_0/input_layernorm")["weight"]) / np.asarray(
        get(scaled, "layers_0/input_layernorm")["weight"])
    names = [f"layers_0/self_attn/{n}" for n in ("q_proj", "k_proj", "v_proj")]
    w = np.concatenate([np.asarray(get(params, n)["kernel"], np.float64).T for n in names])
    x = np.maximum(mean_abs[names[0]], 1e-4)
    errors = []
    for alpha in np.arange(SCALE_GRID) / SCALE_GRID:
        c = x ** alpha
        c = c / np.sqrt(c.max() * c.min())
        errors.append(error(w, rtn_int4(w * c, G) / c, h[names[0]]))
    assert error(w, rtn_int4(w * s, G) / s, h[names[0]]) <= min(errors) * (1 + 1e-4)
    assert min(errors) < 0.98 * errors[0]  # the search beat no scaling here, so the check can fail
    changed = [p for p in folds if not np.allclose(np.asarray(get(scaled, p).get("weight", get(scaled, p).get("kernel"))),
                                                   np.asarray(get(params, p).get("weight", get(params, p).get("kernel"))))]
    assert changed == folds
    if arch == "qwen2_mha":  # v_proj's output (and bias) carry o_proj's scale
        v0, v1 = get(params, "layers_0/self_attn/v_proj"), get(scaled, "layers_0/self_attn/v_proj")
        ratio = np.asarray(v0["bias"]) / np.asarray(v1["bias"])
        # kernel (K, N): inputs scaled by the q/k/v group's s, outputs divided by o_proj's
        np.testing.assert_allclose(np.asarray(v0["kernel"]) / np.asarray(v1["kernel"]) * s[:, None] / ratio, 1,
                                   rtol=1e-3)
        assert np.ptp(ratio) > 1e-3
    # Hessians are those of the scaled inputs: H / s sᵀ.
    np.testing.assert_allclose(h_scaled[names[0]], h[names[0]] / np.outer(s, s), rtol=1e-4)


def test_clipping_picks_each_groups_best_ratio(calibrated):
    _, model, params, h, mean_abs = calibrated
    scaled, hs = awq(model.config, params, h, mean_abs, "int4", G, clip=False)
    clipped, _ = awq(model.config, params, h, mean_abs, "int4", G)
    path = "layers_1/mlp/down_proj"
    w = np.asarray(get(scaled, path)["kernel"], np.float64).T
    c = np.asarray(get(clipped, path)["kernel"], np.float64).T
    hh = np.asarray(hs[path], np.float64)
    picked_below_one = 0
    for j in range(0, w.shape[1], G):
        block = hh[j:j + G, j:j + G]
        bound = np.abs(w[:, j:j + G]).max(1, keepdims=True)
        cands = [np.clip(w[:, j:j + G], -r * bound, r * bound) for r in CLIP_RATIOS]
        errs = np.stack([np.einsum("ng,gh,nh->n", w[:, j:j + G] - rtn_int4(x, G), block, w[:, j:j + G] - rtn_int4(x, G))
                         for x in cands])
        got = np.einsum("ng,gh,nh->n", w[:, j:j + G] - rtn_int4(c[:, j:j + G], G), block,
                        w[:, j:j + G] - rtn_int4(c[:, j:j + G], G))
        assert np.all(got <= errs.min(0) * (1 + 1e-3) + 1e-9)
        picked_below_one += int(np.sum(np.abs(c[:, j:j + G]).max(1) < 0.999 * bound[:, 0]))
    assert picked_below_one > 0
    for name in ("q_proj", "k_proj"):  # not clipped, as the reference implementation
        p = f"layers_1/self_attn/{name}"
        np.testing.assert_array_equal(np.asarray(get(clipped, p)["kernel"]), np.asarray(get(scaled, p)["kernel"]))


def test_awq_lowers_the_layers_output_error_below_round_to_nearest(calibrated):
    """What AWQ optimizes, measured in the float model's coordinates: layer by
    layer, tr((W - Ŵ) H (W - Ŵ)ᵀ) on the calibration tokens with Ŵ the int4
    weight of the scaled, clipped layer divided by its input scale, against
    round-to-nearest int4 of W (both rounded in numpy)."""
    arch, model, params, h, mean_abs = calibrated
    scaled, _ = awq(model.config, params, h, mean_abs, "int4", G, clip=False)
    final, _ = awq(model.config, params, h, mean_abs, "int4", G)
    ratio = lambda path, key: np.asarray(get(params, path)[key]) / np.asarray(get(scaled, path)[key])
    total_awq = total_rtn = 0.0
    for i in range(2):
        s_qkv = ratio(f"layers_{i}/input_layernorm", "weight")
        s_mlp = ratio(f"layers_{i}/post_attention_layernorm", "weight")
        s_down = ratio(f"layers_{i}/mlp/up_proj", "kernel")[0] * s_mlp[0]  # up's outputs carry down's scale
        mha = arch == "qwen2_mha"
        s_o = ratio(f"layers_{i}/self_attn/v_proj", "bias") if mha else 1  # v's outputs carry o's
        layers = [("self_attn/q_proj", s_qkv, 1), ("self_attn/k_proj", s_qkv, 1), ("self_attn/v_proj", s_qkv, s_o),
                  ("mlp/gate_proj", s_mlp, 1), ("mlp/up_proj", s_mlp, s_down), ("mlp/down_proj", s_down, 1)]
        for name, s_in, s_out in layers + ([("self_attn/o_proj", s_o, 1)] if mha else []):
            path = f"layers_{i}/{name}"
            w = np.asarray(get(params, path)["kernel"], np.float64).T
            # back to the float model's coordinates: (N, K) rows times the output scale, columns over the input's
            w_awq = rtn_int4(np.asarray(get(final, path)["kernel"], np.float64).T, G) * np.reshape(s_out, (-1, 1)) / s_in
            total_awq += error(w, w_awq, h[path])
            total_rtn += error(w, rtn_int4(w, G), h[path])
    assert total_awq < 0.9 * total_rtn


def test_quantize_model_awq_is_round_to_nearest_of_the_awq_weights(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    h = dense_input_hessians(model, params, IDS)
    h.pop("lm_head")
    final, _ = awq(model.config, params, h, dense_input_statistics(model, params, IDS, "mean_abs"), "int4", G)
    qmodel, qparams = quantize_model(model, params, fmt="int4", method="awq", group_size=G, calibration=IDS,
                                     storage_dtype="float32", progress=False)
    assert qmodel.dense.recipe.method == "awq"
    np.testing.assert_array_equal(np.asarray(qparams["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))
    from conftest import dequantize_by_hand
    for path in h:
        want = rtn_int4(np.asarray(get(final, path)["kernel"], np.float64).T, G)
        np.testing.assert_allclose(dequantize_by_hand(get(qparams, path)["kernel"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(qparams["layers_0"]["input_layernorm"]["weight"]),
                                  np.asarray(final["layers_0"]["input_layernorm"]["weight"]))


@pytest.mark.parametrize("fmt", ["any4", "any3"])
def test_awq_for_anyn_learns_tables_on_the_scaled_weights_with_less_output_error(tiny_model, fmt):
    """anyN + AWQ: the norms carry the scales of AWQ searched with intN rounding
    (no clipping), and over the layers, in the float model's coordinates (Ŵ decoded by hand, then
    divided by the layer's input scale), tr((W - Ŵ) H (W - Ŵ)ᵀ) on the calibration
    tokens is below plain anyN's with the same calibration."""
    from conftest import dequantize_by_hand
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    h = dense_input_hessians(model, params, IDS)
    h.pop("lm_head")
    mean_abs = dense_input_statistics(model, params, IDS, "mean_abs")
    folded, _ = awq(model.config, params, h, mean_abs, f"int{fmt[-1]}", G, clip=False)
    _, q_awq = quantize_model(model, params, fmt=fmt, method="awq", group_size=G, calibration=IDS, progress=False)
    _, q_plain = quantize_model(model, params, fmt=fmt, group_size=G, calibration=IDS, progress=False)
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_array_equal(np.asarray(q_awq[f"layers_{i}"][norm]["weight"]),
                                          np.asarray(folded[f"layers_{i}"][norm]["weight"]))
    ratio = lambda path, key: np.asarray(get(params, path)[key], np.float64) / np.asarray(get(folded, path)[key])
    total_awq = total_plain = 0.0
    for i in range(2):
        s_qkv = ratio(f"layers_{i}/input_layernorm", "weight")
        s_mlp = ratio(f"layers_{i}/post_attention_layernorm", "weight")
        s_down = ratio(f"layers_{i}/mlp/up_proj", "kernel")[0] * s_mlp[0]
        for name, s_in, s_out in [("self_attn/q_proj", s_qkv, 1), ("self_attn/k_proj", s_qkv, 1),
                                  ("self_attn/v_proj", s_qkv, 1), ("mlp/gate_proj", s_mlp, 1),
                                  ("mlp/up_proj", s_mlp, s_down), ("mlp/down_proj", s_down, 1)]:
            path = f"layers_{i}/{name}"
            w = np.asarray(get(params, path)["kernel"], np.float64).T
            w_awq = dequantize_by_hand(get(q_awq, path)["kernel"]) * np.reshape(s_out, (-1, 1)) / s_in
            total_awq += error(w, w_awq, h[path])
            total_plain += error(w, dequantize_by_hand(get(q_plain, path)["kernel"]), h[path])
    assert total_awq < total_plain, (total_awq, total_plain)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="int4", sequential=True), "method='awq' is not sequential"),
    (dict(fmt="int4", calibration=None), "method='awq' needs calibration data"),
])
def test_bad_arguments(tiny_model, kwargs, match):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    with pytest.raises(ValueError, match=match):
        quantize_model(model, params, method="awq", progress=False, **{"calibration": IDS, **kwargs})


def test_mixture_of_experts_is_refused(tiny_model):
    _, flax_dir = tiny_model("mixtral")
    model, params, _ = load_model(flax_dir)
    with pytest.raises(ValueError, match="a mixture of experts"):
        quantize_model(model, params, fmt="int4", method="awq", calibration=IDS, progress=False)


def test_scaling_folds_into_gemmas_offset_norms(tiny_model):
    """Gemma 3: the norms scale by (1 + w), and gate/up read the pre-feed-forward norm
    (the post-attention one normalizes attention's output): the folded float model
    still computes the same logits, and exactly those ops changed."""
    _, flax_dir = tiny_model("gemma3")
    model, params, _ = load_model(flax_dir)
    h = dense_input_hessians(model, params, IDS)
    mean_abs = dense_input_statistics(model, params, IDS, "mean_abs")
    scaled, _ = awq(model.config, params, h, mean_abs, "int4", G, clip=False)
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    np.testing.assert_allclose(np.asarray(model.apply({"params": scaled}, jnp.asarray(IDS))), ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())
    ops = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
           "mlp/up_proj"]
    value = lambda tree, p: np.asarray(get(tree, f"layers_0/{p}").get("weight", get(tree, f"layers_0/{p}").get("kernel")))
    assert [p for p in ops if not np.allclose(value(scaled, p), value(params, p))] == [
        "input_layernorm", "pre_feedforward_layernorm", "mlp/up_proj"]
