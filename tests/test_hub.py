"""Hugging Face Hub ids wherever a model folder is taken, read from a cache in the
hub's own layout (built here; offline: this machine reaches no Hub)."""

import shutil
import types

import pytest

from any4_jax import cli, hub, load_model


def fake_hub_cache(root, repo_id, files_from, commit="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/COMMIT/...}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_converts_from_the_cache(tiny_model, offline_hub, tmp_path, capsys):
    hf, flax_dir = tiny_model("llama")
    from hf_models import save
    save(hf, tmp_path / "src", "safetensors")
    snapshot = fake_hub_cache(offline_hub, "any4-test/tiny-llama", tmp_path / "src")
    assert hub.resolve("any4-test/tiny-llama") == snapshot
    assert cli.main(["convert", "--model", "any4-test/tiny-llama", "--out", str(tmp_path / "flax")]) == 0
    model, params, _ = load_model(tmp_path / "flax")
    ref_model, ref, _ = load_model(flax_dir)
    import numpy as np
    for a, b in zip(*(np.asarray(p["layers_1"]["mlp"]["down_proj"]["kernel"]) for p in (params, ref))):
        np.testing.assert_array_equal(a, b)
    # a model directory of ours on the Hub loads by its id too
    fake_hub_cache(offline_hub, "any4-test/tiny-flax", tmp_path / "flax")
    model2, params2, _ = load_model("any4-test/tiny-flax")
    assert model2.config == model.config


def test_unknown_ids_and_paths_are_clear_errors(offline_hub, capsys):
    assert cli.main(["convert", "--model", "no-such-org/no-such-model", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model is not in the Hugging Face cache and the Hub cannot be reached" in err
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hugging Face Hub id"):
        hub.resolve("./missing/folder/here")


def test_a_bin_checkpoint_from_the_hub_needs_allow_bin(tiny_model, offline_hub, tmp_path, capsys):
    hf, _ = tiny_model("llama")
    from hf_models import save
    save(hf, tmp_path / "src", "bin")
    fake_hub_cache(offline_hub, "any4-test/tiny-bin", tmp_path / "src")
    assert cli.main(["convert", "--model", "any4-test/tiny-bin", "--out", str(tmp_path / "a")]) == 2
    assert "pass --allow-bin" in capsys.readouterr().err
    assert cli.main(["convert", "--model", "any4-test/tiny-bin", "--out", str(tmp_path / "a"), "--allow-bin"]) == 0


def test_export_round_trips_bit_for_bit_and_follows_the_documented_layout(tiny_model, offline_hub, tmp_path,
                                                                         monkeypatch):
    """`any4 export` writes sharded safetensors with Hugging Face names, the four
    arrays of each quantized layer and a quantization_config; load_model reads it
    back (also by Hub id) to identical arrays, and the model to identical logits."""
    import json

    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from any4_jax import hf_format, save_model
    from any4_jax.quantize import quantize_model
    from conftest import codes_by_hand
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    qmodel, qparams = quantize_model(model, params, fmt="any3", group_size=32, calibration=None, progress=False)
    save_model(tmp_path / "q", qmodel, qparams)
    monkeypatch.setattr(hf_format, "SHARD_BYTES", 40_000)  # several shards even for a tiny model
    assert cli.main(["export", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "x")]) == 0
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["format"], q["format_version"]) == ("any4", 3, 32, "any3", 2)
    index = json.loads((tmp_path / "x" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    tensors = {}
    for f in set(index.values()):
        tensors.update(load_file(str(tmp_path / "x" / f)))  # the safetensors package, independently
    qw = qparams["layers_1"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.qweight"], np.asarray(qw.codes))
    assert tensors["model.layers.1.self_attn.q_proj.lut"].shape == (qw.shape[0], 8)
    np.testing.assert_array_equal(tensors["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)  # (N, K)
    assert codes_by_hand(qw).max() < 8
    for source in (tmp_path / "x", "any4-test/tiny-any3"):
        if source != tmp_path / "x":
            fake_hub_cache(offline_hub, source, tmp_path / "x")
        m2, p2, _ = load_model(source)
        assert m2.dense.recipe == qmodel.dense.recipe
        flat = lambda t: jax.tree_util.tree_leaves(t)
        for a, b in zip(flat(p2), flat(qparams)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.arange(10)[None] % 100
    np.testing.assert_array_equal(np.asarray(m2.apply({"params": p2}, ids)), np.asarray(qmodel.apply({"params": qparams}, ids)))
    # Format version 1 kept 3-bit codes in 4-bit blocks: such an export still loads, to the same arrays.
    from safetensors.numpy import save_file

    from pallas_kernels.layout import pack_codes
    for f in set(index.values()):
        shard = load_file(str(tmp_path / "x" / f))
        for name in shard:
            if name.endswith(".qweight"):
                n, k = shard[name].shape[0], shard[name].shape[1] // 24 * 64  # whole 24-byte blocks
                shard[name] = np.asarray(pack_codes(codes_by_hand(types.SimpleNamespace(
                    codes=shard[name], bits=3, shape=(n, k)))))
        save_file(shard, str(tmp_path / "x" / f), metadata={"format": "pt"})
    config["quantization_config"]["format_version"] = 1
    (tmp_path / "x" / "config.json").write_text(json.dumps(config))
    m3, p3, _ = load_model(tmp_path / "x")
    for a, b in zip(jax.tree_util.tree_leaves(p3), jax.tree_util.tree_leaves(qparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
