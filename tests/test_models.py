"""Flax models and the HF -> Flax converter, against transformers' PyTorch forward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import load_model
from converters import hf2flax
from hf_models import ARCHS, make_hf_model, save, torch_logits


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 128, size=(2, 24))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", ["safetensors", "sharded", "bin"])
def test_logits_match_pytorch(tmp_path, arch, kind, ids):
    hf = make_hf_model(arch)
    src = save(hf, tmp_path / "hf", kind)
    if kind == "sharded":
        assert (src / "model.safetensors.index.json").exists()
    if kind == "bin":
        assert (src / "pytorch_model.bin").exists() and not (src / "model.safetensors").exists()
    hf2flax.convert(src, tmp_path / "flax", progress=False)
    model, params, _ = load_model(tmp_path / "flax")
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_padding_mask_matches_pytorch(tmp_path, ids):
    import torch
    hf = make_hf_model("llama")
    hf2flax.convert(save(hf, tmp_path / "hf", "safetensors"), tmp_path / "flax", progress=False)
    model, params, _ = load_model(tmp_path / "flax")
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(positions)).logits.numpy()
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


def test_bfloat16_checkpoint(tmp_path, ids):
    hf = make_hf_model("llama")
    hf2flax.convert(save(hf, tmp_path / "hf", "safetensors"), tmp_path / "flax", dtype="bfloat16", progress=False)
    model, params, _ = load_model(tmp_path / "flax")
    assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    manifest = json.loads((tmp_path / "flax" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert manifest["parameters"] == sum(p.numel() for p in hf.parameters())
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    ref = torch_logits(hf, ids)
    # bf16 weights and activations: 8 mantissa bits, errors compound over 2 layers.
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


# ---- bad input: each gives a clear error and leaves no output behind ----

def _no_output(tmp_path):
    return not any(p.name.startswith((".flax", "flax")) for p in tmp_path.iterdir())


def test_missing_config(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf2flax.convert(tmp_path / "hf", tmp_path / "flax", progress=False)
    assert _no_output(tmp_path)


def test_unknown_model_type(tmp_path):
    src = save(make_hf_model("llama"), tmp_path / "hf", "safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'; supported: llama, mistral, qwen2, qwen3, mixtral, gemma3_text"):
        hf2flax.convert(src, tmp_path / "flax", progress=False)
    assert _no_output(tmp_path)


def test_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file
    src = save(make_hf_model("llama"), tmp_path / "hf", "safetensors")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf2flax.convert(src, tmp_path / "flax", progress=False)
    assert _no_output(tmp_path)


def test_shape_mismatch(tmp_path):
    src = save(make_hf_model("llama"), tmp_path / "hf", "safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 96\); the config asks for \(64, 80\)"):
        hf2flax.convert(src, tmp_path / "flax", progress=False)
    assert _no_output(tmp_path)


def test_truncated_safetensors(tmp_path):
    src = save(make_hf_model("llama"), tmp_path / "hf", "safetensors")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hf2flax.convert(src, tmp_path / "flax", progress=False)
    assert _no_output(tmp_path)


def test_existing_output_needs_overwrite(tmp_path):
    src = save(make_hf_model("llama"), tmp_path / "hf", "safetensors")
    out = tmp_path / "flax"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert hf2flax.main(["--model", str(src), "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "user data"
    # not a model directory of ours: --overwrite refuses it too (it holds the user's data)
    assert hf2flax.main(["--model", str(src), "--out", str(out), "--overwrite"]) == 2
    assert (out / "keep.txt").read_text() == "user data"
    # a model directory of ours is replaced, atomically
    (out / "keep.txt").unlink()
    out.rmdir()
    assert hf2flax.main(["--model", str(src), "--out", str(out)]) == 0
    assert hf2flax.main(["--model", str(src), "--out", str(out), "--overwrite"]) == 0
    assert (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_load_model_rejects_a_non_model_dir(tmp_path):
    from any4_jax.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_a_large_head_and_embedding_never_copy_their_table_to_float32(monkeypatch, dtype):
    """The product of a head of more than DOT_CHUNK outputs runs a chunk at a time
    and the embedding reads rows as raw 16-bit integers: the compiled program holds
    no float32 copy of a 16-bit table (XLA's CPU backend would make one, 1-2 GB for
    a Llama-3 head), and the results are those of the plain product and lookup."""
    import re

    from any4_jax import models
    monkeypatch.setattr(models, "DOT_CHUNK", 256)
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((1000, 64)), dtype)  # 1000 = 3 x 256 + an overlapping 4th
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), dtype)
    head = jax.jit(lambda t, x: models.dot_in_chunks(x, t, transposed=True))
    np.testing.assert_allclose(np.asarray(head(table, x), np.float32), np.asarray(jnp.dot(x, table.T), np.float32),
                               rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6, atol=1e-5)
    ids = jnp.asarray(rng.integers(0, 1000, (2, 7)))
    embed = models.Embed(1000, 64, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(embed.apply({"params": {"embedding": table}}, ids), np.float32),
                                  np.asarray(table[ids], np.float32))
    if dtype == jnp.bfloat16:
        for f, args in ((head, (table, x)), (jax.jit(lambda t, i: embed.apply({"params": {"embedding": t}}, i)),
                                             (table, ids))):
            assert not re.search(r"f32\[1000,64\]", f.lower(*args).compile().as_text())
