"""Damaged checkpoints, malformed manifests, missing tokenizers, weights too
large to scale and interrupted saves: one clear error, nothing left behind."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from any4_jax import load_model, quantize_tensor, save_model
from any4_jax.checkpoint import CheckpointError
from any4_jax.generation import generate


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A fresh copy of the tiny Llama's model folder, to damage."""
    _, flax_dir = tiny_model("llama")
    out = tmp_path / "model"
    shutil.copytree(flax_dir, out)
    return out


def data_files(model_dir):
    return sorted((p for p in (model_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


def test_truncated_params_name_the_checkpoint(model_copy):
    biggest = data_files(model_copy)[-1]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"params/\w+ could not be read: .*damaged or incomplete"):
        load_model(model_copy)


def test_missing_params_file_names_the_checkpoint(model_copy):
    for f in data_files(model_copy):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"params/\w+ could not be read"):
        load_model(model_copy)


def test_garbage_params_metadata_names_the_checkpoint(model_copy):
    (model_copy / "params" / "layers_0" / "_METADATA").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"params/layers_0 could not be read"):
        load_model(model_copy)


@pytest.mark.parametrize("manifest, match", [
    ("[1, 2]", "must hold a JSON object; it holds a list"),
    ("{oops", "is not valid JSON"),
    ('{"format_version": 3, "dtype": "complex64"}', "dtype 'complex64'; accepted: float32"),
    ('{"format_version": 3, "quantization": "any4"}', "quantization must be an object"),
    ('{"format_version": "3"}', "format_version '3'"),
])
def test_malformed_manifest(model_copy, manifest, match):
    (model_copy / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=match):
        load_model(model_copy)


def test_missing_tokenizer_where_it_is_needed(model_copy):
    for f in model_copy.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    model, params, tok = load_model(model_copy)  # fine where no tokenizer is needed
    assert tok is None
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        load_model(model_copy, tokenizer="required")
    with pytest.raises(ValueError, match="generate needs a tokenizer"):
        generate(model, params, None, "hello")
    for cmd in (["eval", "--model", str(model_copy), "--text", "botchan"],
                ["generate", "--model", str(model_copy), "--prompt", "hi"]):
        r = subprocess.run([sys.executable, "-m", "any4_jax.cli", *cmd], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "has no tokenizer" in r.stderr


@pytest.mark.parametrize("fmt", ["int4", "any4"])
def test_weights_near_float32_max_are_refused_not_nan(fmt):
    w = np.zeros((4, 64), np.float32)
    w[2, :32], w[2, 32:] = 3e38, -3e38  # max - min overflows float32
    with pytest.raises(ValueError, match=r"\(row, column\) \(2, 0\) is inf.*row 2 spans \[-3e\+38, 3e\+38\]"):
        quantize_tensor(w, fmt, 64)
    ok = quantize_tensor(w / 4, fmt, 64)  # the same shape at a quarter: representable
    assert all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in (ok.lut, ok.scales, ok.zeros))


def test_float16_metadata_that_overflows_names_the_fix():
    w = np.linspace(-1e6, 1e6, 128, dtype=np.float32).reshape(2, 64)
    with pytest.raises(ValueError, match="float16 cannot hold.*use storage_dtype='bfloat16' or 'float32'"):
        quantize_tensor(w, "int4", 64, storage_dtype="float16")
    assert quantize_tensor(w, "int4", 64, storage_dtype="bfloat16").scales.dtype == jnp.bfloat16


def test_interrupted_save_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    """Ctrl-C while a part is written: nothing (hidden or not) is left, the target never appears."""
    _, flax_dir = tiny_model("llama")
    model, params, tok = load_model(flax_dir)
    real_save, saves = ocp.Checkpointer.save, []

    def save_then_interrupt(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == 2:  # the second part written, not yet renamed
            raise KeyboardInterrupt

    monkeypatch.setattr(ocp.Checkpointer, "save", save_then_interrupt)
    out = tmp_path / "out" / "model"
    with pytest.raises(KeyboardInterrupt):
        save_model(out, model, params, tok)
    import time
    time.sleep(1.0)  # a writer still running would recreate files here
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    save_model(out, model, params, tok)  # and the same call then works
    assert json.loads((out / "manifest.json").read_text())["parameters"] > 0


def test_converter_refuses_nan_weights_and_warns_of_unused_tensors(tiny_model, tmp_path):
    import torch
    from hf_models import save

    from converters import hf2flax
    hf, _ = tiny_model("llama")
    weight = hf.model.layers[1].mlp.up_proj.weight  # the session's shared model: put it back after
    original = weight[3, 5].item()
    with torch.no_grad():
        weight[3, 5] = float("nan")
    try:
        src = save(hf, tmp_path / "nan", "safetensors")
    finally:
        with torch.no_grad():
            weight[3, 5] = original
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight .* 1 NaN/Inf value\(s\), the first at \(3, 5\)"):
        hf2flax.convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    from safetensors.numpy import load_file, save_file
    src = save(hf, tmp_path / "extra", "safetensors")
    tensors = load_file(src / "model.safetensors")
    tensors["model.extra_head.weight"] = np.ones((2, 2), np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) .* not used by its config \(llama\).*model.extra_head.weight"):
        hf2flax.convert(src, tmp_path / "out2", progress=False)
