"""Quantized layers, whole-model quantization, calibration, quantized checkpoints, CLI."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import codes_by_hand, dequantize_by_hand
from hf_models import linear_inputs
import torch

from any4_jax import dequantize, load_model, quantize_tensor
from any4_jax.calibrate import dense_input_statistics
from any4_jax.checkpoint import CheckpointError, save_model
from any4_jax.formats import QuantizedWeight
from any4_jax.layers import QuantDense
from any4_jax.quantize import quantize_model
from any4_jax.recipe import quantized_weights

IDS = np.random.default_rng(0).integers(0, 128, size=(1, 40)).astype(np.int32)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_quant_dense_equals_dense_with_dequantized_weights(rng, dtype, tol, use_bias):
    """Tolerance: f32 differs only by summation order (~1e-6 relative); bf16
    rounds inputs and outputs to 8 mantissa bits (2**-8 ~ 4e-3, times a few)."""
    w = rng.standard_normal((48, 200)).astype(np.float32)
    qw = quantize_tensor(w, "any4", 64)
    bias = rng.standard_normal(48).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 200)), dtype)
    qparams = {"kernel": qw, **({"bias": bias} if use_bias else {})}
    y = QuantDense(48, use_bias, dtype, "any4", 64).apply({"params": qparams}, x)
    dparams = {"kernel": dequantize(qw).T, **({"bias": bias} if use_bias else {})}
    ref = nn.Dense(48, use_bias=use_bias, dtype=dtype).apply({"params": dparams}, x)
    assert y.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol * float(jnp.abs(ref).max()))


def test_nnx_quant_linear_equals_linear_with_dequantized_weights():
    from flax import nnx

    from any4_jax.nnx import QuantLinear
    linear = nnx.Linear(96, 40, rngs=nnx.Rngs(0))
    q = QuantLinear.from_linear(linear, "nf4", 32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 96)), jnp.float32)
    ref = x @ dequantize(q.weight).T + linear.bias[...]
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_quantize_model_quantizes_every_linear_but_skipped(tiny_model):
    _, flax_dir = tiny_model("llama")  # untied lm_head
    model, params, _ = load_model(flax_dir)
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=32, calibration=IDS, progress=False)
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
    quantized = {jax.tree_util.keystr(p) for p, v in flat if isinstance(v, QuantizedWeight)}
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert not any("lm_head" in p for p in quantized)
    originals = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0])
    for p, v in flat:
        if not isinstance(v, QuantizedWeight):  # embeddings, norms, lm_head: bit-identical
            np.testing.assert_array_equal(np.asarray(v), np.asarray(originals[jax.tree_util.keystr(p)]))
    logits = np.asarray(qmodel.apply({"params": qparams}, jnp.asarray(IDS)))
    # the float model run on W decoded by hand from the stored codes, LUTs and scales
    by_hand = jax.tree_util.tree_map(
        lambda v: jnp.asarray(dequantize_by_hand(v).T, jnp.float32) if isinstance(v, QuantizedWeight) else v,
        qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    expected = np.asarray(model.apply({"params": by_hand}, jnp.asarray(IDS)))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    float_logits = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    error = np.abs(logits - float_logits).mean() / np.abs(float_logits).mean()
    assert 1e-3 < error < 0.1  # quantized (not the float weights), and close to them


def test_calibration_statistics_match_pytorch_hooks(tiny_model):
    """Our captured abs_mean / mean_abs / rms of each Linear's input equal
    forward-hook statistics of transformers' PyTorch model on the same ids."""
    hf, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    inputs = linear_inputs(hf, IDS)
    for statistic, fn in [("abs_mean", lambda x: x.mean(0).abs()), ("mean_abs", lambda x: x.abs().mean(0)),
                          ("rms", lambda x: x.pow(2).mean(0).sqrt())]:
        ours = dense_input_statistics(model, params, IDS, statistic)
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
            path = name.removeprefix("model.").replace("layers.", "layers_").replace(".", "/")
            ref = fn(inputs[name]).numpy()
            np.testing.assert_allclose(ours[path], ref, rtol=1e-4, atol=1e-5, err_msg=f"{statistic} {name}")


def test_mixtral_experts_calibrate_on_their_routed_tokens(tiny_model):
    """Each expert's w1/w3/w2 statistics are taken over the tokens the router sent
    it, unweighted: the reference is computed in PyTorch from the routing that a
    forward hook on transformers' MixtralExperts sees, with its own weights."""
    hf, flax_dir = tiny_model("mixtral")
    model, params, _ = load_model(flax_dir)
    ids = np.random.default_rng(3).integers(0, 128, size=(2, 30)).astype(np.int32)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (mod, args)))
             for name, m in hf.named_modules() if type(m).__name__ == "MixtralExperts"]
    with torch.no_grad():
        hf(torch.as_tensor(ids, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    ours = dense_input_statistics(model, params, ids, "mean_abs")
    checked = 0
    for name, (mod, (x, index, _)) in seen.items():
        layer = name.split(".")[2]
        for e in range(mod.num_experts):
            tokens = (index == e).any(-1)
            prefix = f"layers_{layer}/block_sparse_moe/experts_{e}"
            if not tokens.any():
                assert f"{prefix}/w1" not in ours
                continue
            xe = x[tokens]
            with torch.no_grad():
                gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                he = torch.nn.functional.silu(gate) * up
            for w, ref in (("w1", xe), ("w3", xe), ("w2", he)):
                np.testing.assert_allclose(ours[f"{prefix}/{w}"], ref.abs().mean(0).numpy(), rtol=1e-4, atol=1e-6,
                                           err_msg=f"{prefix}/{w}")
            # averaging over every token (what running all experts on all tokens sees) differs
            all_tokens = x.abs().mean(0).numpy()
            assert tokens.sum() < len(tokens) and not np.allclose(ours[f"{prefix}/w1"], all_tokens, rtol=1e-3)
            checked += 1
    assert checked >= 4


def test_sequential_recalibrates_later_layers_only(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    kw = dict(fmt="any4", group_size=32, calibration=IDS, progress=False, key=jax.random.PRNGKey(5))
    _, once = quantize_model(model, params, **kw)
    _, seq = quantize_model(model, params, sequential=True, **kw)
    first = lambda p: p["layers_0"]["self_attn"]["q_proj"]["kernel"]
    last = lambda p: p["layers_1"]["mlp"]["down_proj"]["kernel"]
    # the first layer sees the float model's input either way; the last one does not
    np.testing.assert_array_equal(np.asarray(first(once).lut), np.asarray(first(seq).lut))
    assert not np.array_equal(np.asarray(last(once).lut), np.asarray(last(seq).lut))


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2"])
def test_save_load_gives_bitwise_identical_logits(tiny_model, tmp_path, arch):
    _, flax_dir = tiny_model(arch)
    model, params, _ = load_model(flax_dir)
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=32, calibration=IDS,
                                     storage_dtype="bfloat16", progress=False)
    manifest = save_model(tmp_path / "q", qmodel, qparams)
    assert manifest["quantization"]["fmt"] == "any4" and manifest["quantization"]["group_size"] == 32
    assert manifest["quantization"]["calibration"] == "token ids"
    qmodel2, qparams2, _ = load_model(tmp_path / "q", require="quantized")
    for a, b in zip(quantized_weights(qparams), quantized_weights(qparams2)):
        assert a.codes.dtype == b.codes.dtype == jnp.uint8 and b.lut.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(qmodel.apply({"params": qparams}, jnp.asarray(IDS))),
                                  np.asarray(qmodel2.apply({"params": qparams2}, jnp.asarray(IDS))))


def test_float_and_quantized_checkpoints_are_told_apart(tiny_model, tmp_path):
    _, flax_dir = tiny_model("llama")
    with pytest.raises(CheckpointError, match="holds a float model; a quantized one is required"):
        load_model(flax_dir, require="quantized")
    model, params, _ = load_model(flax_dir, require="float")
    qmodel, qparams = quantize_model(model, params, fmt="int4", group_size=32, calibration=None, progress=False)
    save_model(tmp_path / "q", qmodel, qparams)
    with pytest.raises(CheckpointError, match="already quantized to int4; a float model is required"):
        load_model(tmp_path / "q", require="float")


@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="int8"), "accepted: int4, int3, int2, nf4, fp4, any4, any3, any2"),
    (dict(statistic="median"), "accepted: abs_mean, mean_abs, rms"),
    (dict(group_size=96), "accepted: 32, 64, 128"),
    (dict(calibration="the prompt"), "needs a tokenizer"),
])
def test_bad_arguments(tiny_model, kwargs, match):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    with pytest.raises(ValueError, match=match):
        quantize_model(model, params, progress=False, **kwargs)


def test_non_finite_calibration_activations_name_the_layer(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    broken = jax.tree_util.tree_map(lambda x: x, params)
    norm = broken["layers_1"]["post_attention_layernorm"]
    norm["weight"] = jnp.full_like(norm["weight"], jnp.inf)
    with pytest.raises(ValueError, match=r"abs_mean of layers_1/mlp/gate_proj's input has \d+ non-finite"):
        quantize_model(model, broken, fmt="any4", group_size=32, calibration=IDS, progress=False)


def test_load_model_computes_in_the_dtype_asked_for(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    bf16, bf16_params, _ = load_model(flax_dir, dtype="bfloat16")
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    out = bf16.apply({"params": bf16_params}, jnp.asarray(IDS))
    assert bf16.dtype == jnp.bfloat16  # logits come out in float32 either way
    error = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert 1e-4 < error < 5e-2  # rounded to bf16's 8 bits, not float32's 24
    with pytest.raises(ValueError, match="dtype 'int8'; accepted: float32, bfloat16, float16"):
        load_model(flax_dir, dtype="int8")


def test_calibration_text_shorter_than_one_token_is_refused(smollm2_flax):
    model, params, tok = load_model(smollm2_flax)
    with pytest.raises(ValueError, match="shorter than one token"):
        quantize_model(model, params, calibration="", tokenizer=tok, progress=False)


def test_cli_eval_json_and_quantize(smollm2_flax, smollm2_any4, tmp_path, capsys):
    from any4_jax import cli
    assert cli.main(["eval", "--model", str(smollm2_any4), "--text", "botchan", "--seq-len", "256",
                     "--max-windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "any4" and result["windows"] == 2
    assert cli.main(["eval", "--model", str(smollm2_flax), "--text", "botchan", "--seq-len", "256",
                     "--max-windows", "2", "--json"]) == 0
    float_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    # measured here: 30.08 vs float 23.89 on these two 256-token windows (1.26x): quantized
    # (above float), and a broken lookup, scale or layout (ppl in the hundreds or more) fails
    assert float_ppl < result["perplexity"] < 1.35 * float_ppl
    # quantizing a quantized model is refused, and nothing is written
    assert cli.main(["quantize", "--model", str(smollm2_any4), "--out", str(tmp_path / "x")]) == 2
    assert "a float model is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_and_quantize_in_one_step(tiny_model, tmp_path):
    from any4_jax import cli
    hf, _ = tiny_model("llama")
    from hf_models import save
    src = save(hf, tmp_path / "hf", "safetensors")
    assert cli.main(["convert", "--model", str(src), "--out", str(tmp_path / "q"), "--quantize", "nf4",
                     "--group-size", "32", "--calibration", "none"]) == 0
    model, params, _ = load_model(tmp_path / "q", require="quantized")
    qws = quantized_weights(params)
    assert len(qws) == 14 and all(q.fmt == "nf4" and q.group_size == 32 for q in qws)


@pytest.fixture
def saved_int4(tiny_model, tmp_path):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    qmodel, qparams = quantize_model(model, params, fmt="int4", group_size=32, calibration=None, progress=False)
    save_model(tmp_path / "q", qmodel, qparams)
    return tmp_path / "q", np.asarray(qmodel.apply({"params": qparams}, jnp.asarray(IDS)))


def _edit_manifest(d, edit):
    path = d / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_records_a_versioned_recipe(saved_int4):
    d, _ = saved_int4
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format_version"] == 5
    q = manifest["quantization"]
    assert q["recipe_version"] == 3 and q["method"] == "plain" and q["fmt"] == "int4" and q["storage_dtype"] == "bfloat16"
    model, params, _ = load_model(d)
    qws = quantized_weights(params)
    stored_bits = sum(8 * q.codes.size + 16 * (q.lut.size + q.scales.size + q.zeros.size) for q in qws)
    assert q["bits_per_weight"] == pytest.approx(stored_bits / sum(q.shape[0] * q.shape[1] for q in qws), abs=1e-4)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["quantization"].update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda m: m["quantization"].pop("statistic"), r"lacks field\(s\) \['statistic'\]"),
    (lambda m: m["quantization"].update(recipe_version=7), "recipe_version 7 is not one this any4-jax reads"),
    (lambda m: m.update(format_version=9), "format_version 9"),
    (lambda m: m["quantization"].update(fmt="int5"), "unknown format 'int5'"),
])
def test_a_bad_recipe_is_a_checkpoint_error_naming_it(saved_int4, edit, match):
    d, _ = saved_int4
    _edit_manifest(d, edit)
    with pytest.raises(CheckpointError, match=match):
        load_model(d)


def _as_one_checkpoint(d, params):
    """Rewrite ``d/params`` as versions 1-3 stored it: one orbax checkpoint of the whole tree."""
    import shutil

    import orbax.checkpoint as ocp
    shutil.rmtree(d / "params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((d / "params").absolute(), params)
    checkpointer.close()


@pytest.mark.parametrize("version, fmt", [(1, "any4"), (2, "any4"), (3, "any4"), (2, "any3"), (3, "int2"),
                                          (4, "any3")])
def test_checkpoints_of_earlier_format_versions_still_load(tiny_model, tmp_path, version, fmt):
    """Versions 1-3 kept all params in one orbax checkpoint; 1-2 packed codes in
    pairs (element 2i in the low nibble of byte i); version 1 also lacked the
    recipe version; 1-4 kept 2- and 3-bit codes in 4-bit blocks. They load to the
    same logits."""
    from any4_jax.checkpoint import write_part
    from pallas_kernels.layout import pack_codes

    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    qmodel, qparams = quantize_model(model, params, fmt=fmt, group_size=32, calibration=IDS, progress=False)
    logits = np.asarray(qmodel.apply({"params": qparams}, jnp.asarray(IDS)))

    def old_layout(qw):  # written with numpy from the codes decoded by hand
        if not isinstance(qw, QuantizedWeight):
            return qw
        c = codes_by_hand(qw)
        if version >= 3:  # 4-bit blocks
            return dataclasses.replace(qw, codes=pack_codes(c))
        c = np.pad(c, ((0, 0), (0, c.shape[1] % 2)))
        return dataclasses.replace(qw, codes=jnp.asarray((c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)))

    old = jax.tree_util.tree_map(old_layout, qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    save_model(tmp_path / "q", qmodel, qparams)
    if version < 4:
        _as_one_checkpoint(tmp_path / "q", old)
    else:
        for key in old:
            write_part(tmp_path / "q" / "params", key, old[key])

    def downgrade(m):
        m["format_version"] = version
        if version == 1:
            del m["quantization"]["recipe_version"]

    _edit_manifest(tmp_path / "q", downgrade)
    loaded_model, loaded, _ = load_model(tmp_path / "q")
    np.testing.assert_array_equal(np.asarray(loaded_model.apply({"params": loaded}, jnp.asarray(IDS))), logits)
