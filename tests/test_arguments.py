"""Numeric arguments are checked where they enter: a bad one is an error naming it,
never a silently wrong number (#12: `eval --seq-len -5` printed perplexity 1.000,
`--top-p 0` emitted token 0 forever, `--temperature -1` sampled the inverted
distribution)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import cli, load_model, perplexity
from any4_jax.generation import generate_ids, sample


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=-5), "seq_len must be at least 2"), (dict(seq_len=0), "seq_len must be at least 2"),
    (dict(seq_len=1), "seq_len must be at least 2"), (dict(seq_len=4096), "at most the model context"),
    (dict(seq_len=8, max_windows=-3), "max_windows must be >= 1"),
    (dict(seq_len=8, max_windows=0), "max_windows must be >= 1"),
])
def test_perplexity_arguments(tiny_model, kwargs, match):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    with pytest.raises(ValueError, match=match):
        perplexity(model, params, np.arange(100) % 128, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_k=0), "top_k must be an integer >= 1"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=-1.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
])
def test_sampling_arguments(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(jnp.zeros((1, 8)), jax.random.PRNGKey(0), **kwargs)
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    with pytest.raises(ValueError, match=match):
        generate_ids(model, params, [[1, 2, 3]], max_new_tokens=2, **kwargs)


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.7]]))
    draws = [int(sample(logits, jax.random.PRNGKey(i), temperature=1.0, top_k=50)[0]) for i in range(200)]
    assert set(draws) == {0, 1, 2}


@pytest.mark.parametrize("argv, match", [
    (["eval", "--seq-len", "-5"], "seq_len must be at least 2"),
    (["eval", "--max-windows", "0"], "max_windows must be >= 1"),
    (["generate", "--prompt", "Hi", "--top-k", "0", "--temperature", "1"], "top_k must be an integer >= 1"),
    (["generate", "--prompt", "Hi", "--top-p", "0", "--temperature", "1"], r"top_p must be in \(0, 1\]"),
    (["generate", "--prompt", "Hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
])
def test_cli_reports_bad_numbers_as_one_error_line(smollm2_any4, capsys, argv, match):
    assert cli.main([argv[0], "--model", str(smollm2_any4), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(match, err), err


def test_calibration_longer_than_the_context_is_chunked_with_a_warning(tiny_model):
    from any4_jax.calibrate import calibration_inputs
    from any4_jax.quantize import quantize_model

    with pytest.warns(UserWarning, match="split into chunks of 256 tokens"):
        chunks = calibration_inputs(np.arange(600) % 128, None, max_len=256)
    assert [c.shape for c in chunks] == [(1, 256), (1, 256), (1, 88)]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=-1)[0], np.arange(600) % 128)
    _, flax_dir = tiny_model("llama")  # context 256
    model, params, _ = load_model(flax_dir)
    with pytest.warns(UserWarning, match="600 tokens is longer than the model context 256"):
        quantize_model(model, params, fmt="int4", group_size=32, calibration=np.arange(600) % 128, progress=False)


@pytest.mark.parametrize("argv, match", [
    (["--group-size", "abc"], "--group-size 'abc': expected 32, 64"),
    (["--calibration", "BINARY"], "not a UTF-8 text file"),
])
def test_cli_names_the_bad_flag(tiny_model, tmp_path, capsys, argv, match):
    _, flax_dir = tiny_model("llama")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    argv = [str(tmp_path / "blob.bin") if a == "BINARY" else a for a in argv]
    assert cli.main(["quantize", "--model", str(flax_dir), "--out", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()


def test_debug_shows_the_traceback_and_failures_are_one_line(tmp_path, capsys):
    from any4_jax.checkpoint import CheckpointError
    assert cli.main(["eval", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json is missing" in err and "Traceback" not in err
    for argv in (["--debug", "eval", "--model", str(tmp_path)], ["eval", "--model", str(tmp_path), "--debug"]):
        with pytest.raises(CheckpointError, match="manifest.json is missing"):
            cli.main(argv)


def test_unexpected_failures_end_in_one_line_too(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_eval", lambda args: 1 / 0)
    assert cli.main(["eval", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)\n"
