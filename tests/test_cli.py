"""The ``any4`` command's success paths, on a tiny Llama with a character tokenizer:
each flag reaches the library (the result equals the Python API called with the
same options and differs from the defaults), and what is printed is what was made."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from any4_jax import cli, load_model
from any4_jax.checkpoint import read_manifest
from any4_jax.generation import generate
from any4_jax.quantize import quantize_model
from any4_jax.recipe import quantized_weights

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = "The cat sat on the mat. 12 + 30 = 42.\ndef f(x):\n    return x * 2\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf model, hf dir, flax dir written by `any4 convert`)."""
    from hf_models import char_tokenizer, make_hf_model
    d = tmp_path_factory.mktemp("cli")
    hf = make_hf_model("llama")
    hf.save_pretrained(d / "hf")
    char_tokenizer().save_pretrained(d / "hf")
    assert cli.main(["convert", "--model", str(d / "hf"), "--out", str(d / "flax")]) == 0
    return hf, d / "hf", d / "flax"


def _codes_and_luts(params):
    return [(np.asarray(q.codes), np.asarray(q.lut, np.float32)) for q in quantized_weights(params)]


def test_convert_writes_a_model_with_its_tokenizer(tiny):
    hf, _, flax_dir = tiny
    model, params, tok = load_model(flax_dir, tokenizer="required")
    ids = tok("Hello there")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.as_tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray([ids]))), ref,
                               rtol=1e-4, atol=1e-4)


def test_quantize_flags_reach_the_recipe_and_the_weights(tiny, tmp_path, capsys):
    _, _, flax_dir = tiny
    (tmp_path / "cal.txt").write_text(CALIBRATION)
    assert cli.main(["quantize", "--model", str(flax_dir), "--out", str(tmp_path / "q"), "--calibration",
                     str(tmp_path / "cal.txt"), "--group-size", "none", "--statistic", "rms", "--sequential",
                     "--seed", "3"]) == 0
    assert "group size None" in capsys.readouterr().out
    recipe = read_manifest(tmp_path / "q")["quantization"]
    assert (recipe["group_size"], recipe["statistic"], recipe["sequential"]) == (None, "rms", True)
    assert recipe["calibration"] == f"prompt ({len(CALIBRATION)} chars)"
    _, qparams, _ = load_model(tmp_path / "q")
    assert all(q.group_size == q.shape[1] for q in quantized_weights(qparams))  # one group a row

    model, params, tok = load_model(flax_dir)
    same = dict(fmt="any4", group_size=None, tokenizer=tok, key=jax.random.PRNGKey(3), progress=False)
    _, api = quantize_model(model, params, calibration=CALIBRATION, statistic="rms", sequential=True, **same)
    for (c, lut), (c_api, lut_api) in zip(_codes_and_luts(qparams), _codes_and_luts(api)):
        np.testing.assert_array_equal(c, c_api)
        np.testing.assert_array_equal(lut, lut_api)
    # the flags matter: the built-in prompt and abs_mean give other LUTs
    with pytest.warns(UserWarning, match="longer than the model context 256"):
        _, default = quantize_model(model, params, **same)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(_codes_and_luts(qparams), _codes_and_luts(default)))


def test_quantize_on_two_cpu_devices(tiny, tmp_path):
    """--devices 2 (a fresh process: jax reads the device count when it starts) gives
    the one-device result."""
    _, _, flax_dir = tiny
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-m", "any4_jax.cli", "quantize", "--model", str(flax_dir), "--out",
                        str(tmp_path / "q2"), "--devices", "2", "--group-size", "32", "--calibration", "none"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "on 2 cpu devices" in r.stdout
    model, params, _ = load_model(flax_dir)
    _, one = quantize_model(model, params, fmt="any4", group_size=32, calibration=None, progress=False)
    _, two, _ = load_model(tmp_path / "q2")
    for (c2, lut2), (c1, lut1) in zip(_codes_and_luts(two), _codes_and_luts(one)):
        assert np.mean(c2 == c1) > 0.999  # row-parallel k-means: the same up to float ties
        np.testing.assert_allclose(lut2, lut1, rtol=1e-2, atol=1e-3)


def test_generate_streams_the_text_and_applies_the_chat_template(tiny, capsys, monkeypatch):
    _, _, flax_dir = tiny
    model, params, tok = load_model(flax_dir)
    for chat in (False, True):
        writes = []
        real_write = sys.stdout.write
        monkeypatch.setattr(sys.stdout, "write", lambda s: (writes.append(s), real_write(s))[1])
        argv = ["generate", "--model", str(flax_dir), "--prompt", "Once upon", "--max-new-tokens", "12"]
        assert cli.main(argv + (["--chat"] if chat else [])) == 0
        monkeypatch.undo()
        out, err = capsys.readouterr()
        ids = generate(model, params, tok, "Once upon", max_new_tokens=12, chat=chat)[0]
        assert out == tok.decode(ids, skip_special_tokens=True) + "\n"
        assert len([w for w in writes if w not in ("", "\n")]) > 1  # streamed, not printed at the end
        assert "decode" in err and "tok/s" in err
        if chat:  # the template changes the prompt, so the greedy continuation too
            assert ids != generate(model, params, tok, "Once upon", max_new_tokens=12)[0]


def test_eval_on_a_text_file_is_the_mean_negative_log_likelihood(tiny, tmp_path, capsys):
    _, _, flax_dir = tiny
    text = "It was a bright cold day in April, and the clocks were striking thirteen. " * 3
    (tmp_path / "t.txt").write_text(text)
    assert cli.main(["eval", "--model", str(flax_dir), "--text", str(tmp_path / "t.txt"), "--seq-len", "64",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, params, tok = load_model(flax_dir)
    ids = np.asarray(tok(text)["input_ids"])
    windows = len(ids) // 64
    assert result["windows"] == windows == 3 and result["text"] == str(tmp_path / "t.txt")
    x = ids[: windows * 64].reshape(windows, 64)
    logp = jax.nn.log_softmax(np.asarray(model.apply({"params": params}, jnp.asarray(x)), np.float64), -1)
    nll = -np.take_along_axis(np.asarray(logp)[:, :-1], x[:, 1:, None], -1).mean()
    assert result["perplexity"] == pytest.approx(np.exp(nll), rel=1e-4)


def test_quantize_method_gptq_is_one_flag(tiny, tmp_path, capsys):
    """--method gptq: act-order on, the format's damping, generated calibration."""
    _, _, flax_dir = tiny
    assert cli.main(["quantize", "--model", str(flax_dir), "--out", str(tmp_path / "g"), "--format", "int4",
                     "--group-size", "32", "--method", "gptq"]) == 0
    recipe = read_manifest(tmp_path / "g")["quantization"]
    assert (recipe["method"], recipe["act_order"], recipe["damp"]) == ("gptq", True, 0.01)
    # SmolLM2's texts in the character tokenizer, in rows of the context (256), 4096 tokens in all
    assert recipe["calibration"] == "generated by SmolLM2-135M-Instruct (16 x 256 tokens)"
    model, params, _ = load_model(tmp_path / "g")
    assert model.apply({"params": params}, jnp.ones((1, 8), jnp.int32)).shape == (1, 8, 128)


def test_quantize_awq_with_refinement(tiny, tmp_path):
    """--method awq --refine 5: the recipe records both; a bare --refine is 40 steps."""
    _, _, flax_dir = tiny
    assert cli.main(["quantize", "--model", str(flax_dir), "--out", str(tmp_path / "a"), "--format", "int4",
                     "--group-size", "32", "--method", "awq", "--refine", "5"]) == 0
    recipe = read_manifest(tmp_path / "a")["quantization"]
    assert (recipe["method"], recipe["refine_steps"]) == ("awq", 5)
    assert recipe["calibration"] == "generated by SmolLM2-135M-Instruct (16 x 256 tokens)"
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--refine"])
    assert cli.quantize_options(args)["recipe"].refine_steps == 40
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "gptq-refine"])
    r = cli.quantize_options(args)["recipe"]
    assert (r.method, r.refine_steps, r.act_order, r.damp) == ("gptq", 40, True, 3.0)
