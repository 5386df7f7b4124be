"""Multi-device checks. Run by tests/test_sharding.py in a process of its own,
with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts."""

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_models import save  # noqa: E402

from any4_jax import load_model, quantize_tensor  # noqa: E402
from any4_jax import layers, sharding as sh  # noqa: E402
from any4_jax.checkpoint import save_model  # noqa: E402
from any4_jax.quantize import quantize_model  # noqa: E402
from converters import hf2flax  # noqa: E402

MESHES = [(1, 8), (2, 4), (8, 1)]
IDS = np.random.default_rng(0).integers(0, 128, size=(8, 16)).astype(np.int32)
# Dimensions every mesh axis of 8 divides, with whole groups of 32 and whole 64-element code blocks on each shard.
SHAPE = dict(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)


def test_eight_devices():
    assert jax.device_count() == 8, os.environ.get("XLA_FLAGS")


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def converted(request, tmp_path_factory):
    import torch
    torch.manual_seed(0)
    if request.param == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    else:
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE, num_local_experts=4,
                                                                         num_experts_per_tok=2))
    d = tmp_path_factory.mktemp(request.param)
    hf2flax.convert(save(hf.eval(), d / "hf", "safetensors"), d / "float", progress=False)
    model, params, _ = load_model(d / "float")
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=32, calibration=IDS[:1], progress=False)
    save_model(d / "any4", qmodel, qparams)
    return d


@pytest.mark.parametrize("kind", ["float", "any4"])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_logits_equal_single_device(converted, kind, mesh_shape):
    model, params, _ = load_model(converted / kind)
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    mesh = sh.make_mesh(*mesh_shape)
    _, sharded, _ = load_model(converted / kind, mesh=mesh)  # read straight into the mesh
    check_placement(sharded, mesh, quantized=kind == "any4", llama=converted.name.startswith("llama"))
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(sharded, sh.shard_batch(IDS, mesh))
    # float32 throughout; only the order of the cross-shard sums differs
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # outputs split over the model axis
ROW = ("o_proj", "down_proj")                                    # inputs (K) split over the model axis


def check_placement(params, mesh, quantized: bool, llama: bool):
    """Each kind of leaf is split as the Megatron layout says, and each device
    holds about 1/tp of the weights (a model left replicated would hold all)."""
    tp = mesh.shape["model"]
    total = per_device = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        total += leaf.nbytes
        per_device += leaf.addressable_shards[0].data.nbytes
        spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        if not llama or tp == 1:
            continue
        layer = next((l for l in COLUMN + ROW if f"'{l}'" in name), None)
        if "embed_tokens" in name or "lm_head" in name:
            expected = ("model", None)  # by vocabulary (embedding (V, H); lm_head kernel (H, V) below)
            if "lm_head" in name:
                expected = (None, "model")
        elif layer is None:  # norms: replicated
            expected = (None,) * leaf.ndim
        elif quantized:  # QuantizedWeight leaves, PyTorch layout (N, K)
            if layer in COLUMN:
                expected = ("model", None)
            else:
                expected = (None, None) if name.endswith(".lut") else (None, "model")
        else:  # Flax kernels (K, N)
            expected = (None, "model") if layer in COLUMN else ("model", None)
        assert spec == expected, (name, spec, expected)
    bound = 1.0 if tp == 1 else 1.2 / tp  # a little replicated: norms, row-parallel LUTs
    assert per_device <= bound * total, (per_device, total, tp)
    if tp > 1:
        assert per_device < 0.5 * total


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_quantization_equals_single_device(mesh_shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, size=(300, 256)) * 0.02).astype(np.float32)
    act = np.abs(rng.standard_normal(256)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    single = quantize_tensor(w, "any4", 64, sample_weight=act, key=key)
    sharded = quantize_tensor(w, "any4", 64, sample_weight=act, key=key, mesh=sh.make_mesh(*mesh_shape))
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mesh_that_does_not_divide_a_layer_is_named(converted):
    model, params, _ = load_model(converted / "float")
    mesh = sh.make_mesh(1, 8)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layers_0"]["self_attn"]["k_proj"]["kernel"] = jnp.zeros((256, 60))
    with pytest.raises(ValueError, match=r"layer layers_0/self_attn/k_proj/kernel: its output features N = 60 "
                                         r"is not divisible by the mesh's 'model' axis of size 8"):
        sh.shard_params(bad, mesh)
    _, qparams, _ = load_model(converted / "any4")
    qmesh = sh.make_mesh(1, 8)
    qw = quantize_tensor(np.ones((256, 96), np.float32), "any4", 32)  # 3 groups along K
    qparams["layers_1"]["self_attn"]["o_proj"]["kernel"] = qw
    with pytest.raises(ValueError, match=r"layers_1/self_attn/o_proj/kernel: its number of groups along K = 3"):
        sh.shard_params(qparams, qmesh)


def test_checkpoint_written_from_a_mesh_loads_on_one_device(converted, tmp_path):
    model, params, _ = load_model(converted / "float")
    mesh = sh.make_mesh(2, 4)
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=32, calibration=IDS[:1],
                                     progress=False, mesh=mesh)
    save_model(tmp_path / "q", qmodel, sh.shard_params(qparams, mesh))
    _, loaded, _ = load_model(tmp_path / "q")
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(loaded))
    np.testing.assert_array_equal(np.asarray(qmodel.apply({"params": loaded}, jnp.asarray(IDS))),
                                  np.asarray(qmodel.apply({"params": qparams}, jnp.asarray(IDS))))


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_kernel_runs_per_shard_under_shard_map(converted, mesh_shape, monkeypatch):
    """With the kernel path forced (Pallas interpret mode on CPU), a model loaded
    into a mesh runs every q/k/v/o/gate/up/down matmul per shard; its logits
    equal the single-device XLA path's."""
    model, params, _ = load_model(converted / "any4")
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    mesh = sh.make_mesh(*mesh_shape)
    smodel, sparams, _ = load_model(converted / "any4", mesh=mesh, matmul="kernel")
    assert smodel.dense.mesh is mesh and smodel.dense.matmul == "kernel"
    calls = []
    original = layers.per_shard_qmatmul
    monkeypatch.setattr(layers, "per_shard_qmatmul", lambda *a: calls.append(a[3]) or original(*a))
    out = jax.jit(lambda p, x: smodel.apply({"params": p}, x))(sparams, sh.shard_batch(IDS, mesh))
    assert calls.count("column") > 0 and calls.count("row") > 0
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
