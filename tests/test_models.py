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


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])  # float16: see accumulating_dot
def test_a_head_and_an_embedding_never_copy_their_table_to_float32(dtype):
    """The head's product (tied or not) accumulates in float32 and the embedding
    reads rows as raw 16-bit integers: the compiled programs hold no float32 copy
    of a 16-bit table (XLA's CPU backend would make one, 2 GiB for a Llama-3 head;
    its temporaries stay below the table's own size), and the results are those of
    the product computed in float64 and rounded once, and of the plain lookup."""
    from any4_jax import models
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((1000, 64)), dtype)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), dtype)
    tied = jax.jit(lambda t, x: models.accumulating_dot(x, t, transposed=True))
    untied = jax.jit(lambda k, x: models.Dense(1000, use_bias=False, dtype=dtype).apply({"params": {"kernel": k}}, x))
    kernel = jnp.asarray(np.asarray(table).T)  # (64, 1000), as an lm_head is stored
    exact = np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
    for f, w, rows in ((tied, table, x), (untied, kernel, x), (tied, table, x[:1, :1]), (untied, kernel, x[:1, :1])):
        out = f(w, rows)
        assert out.dtype == dtype and out.shape == (*rows.shape[:-1], 1000)
        np.testing.assert_allclose(np.asarray(out, np.float64), exact[:rows.shape[0], :rows.shape[1]],
                                   rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-2 if dtype == jnp.bfloat16 else 1e-5)
    ids = jnp.asarray(rng.integers(0, 1000, (2, 7)))
    embed = models.Embed(1000, 64, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(embed.apply({"params": {"embedding": table}}, ids), np.float32),
                                  np.asarray(table[ids], np.float32))
    if dtype == jnp.bfloat16:
        lookup = jax.jit(lambda t, i: embed.apply({"params": {"embedding": t}}, i))
        one_row = x[:1, :1]  # batch-1 decode: XLA's CPU backend converts the table for a one-row product
        for f, args in ((tied, (table, x)), (untied, (kernel, x)), (tied, (table, one_row)), (untied, (kernel, one_row)),
                        (lookup, (table, ids))):
            temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
            assert temp < table.nbytes, (f, args[1].shape, temp)  # a float32 copy: 2x
