"""The Pallas LUT matmul: interpret mode vs the pure-jnp reference, and the
CPU-side Pallas -> Triton lowering check (docs/design.md §5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import quantize_tensor
from any4_jax.layers import QuantDense, qmatmul
from pallas_kernels.lut_matmul import STRATEGIES, block_config, lut_matmul, lut_matmul_reference

# Relative tolerance (of max |y|) per input dtype. The kernel and the reference
# both accumulate in float32 and round the result to x.dtype once (bf16: 2**-8,
# f16: 2**-11 relative); the prefill path also rounds the dequantized weight to
# x.dtype before the tensor-core dot, which at most doubles that.
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}
FORMAT_OF_BITS = {4: "any4", 3: "int3", 2: "any2"}

# (M, K, N, group size, bits, dtype, strategy): a sample of the full grid in
# which every value of every axis appears, both regimes with both strategies.
CASES = [
    (1, 4096, 4096, 128, 4, jnp.bfloat16, "gather"),
    (1, 4096, 4096, 128, 4, jnp.bfloat16, "select"),
    (1, 576, 1536, 32, 3, jnp.float16, "select"),
    (3, 576, 64, 64, 2, jnp.float32, "gather"),
    (3, 4096, 1536, 256, 4, jnp.float16, "gather"),
    (16, 576, 1536, None, 4, jnp.bfloat16, "select"),
    (16, 4096, 64, 32, 3, jnp.float32, "gather"),
    (33, 576, 64, 128, 4, jnp.float32, "select"),
    (33, 576, 1536, 64, 2, jnp.bfloat16, "gather"),
    (128, 576, 64, 256, 3, jnp.float16, "gather"),
    (128, 4096, 64, None, 2, jnp.bfloat16, "select"),
    (128, 576, 4096, 128, 4, jnp.float32, "gather"),
]


def make(rng, m, k, n, group_size, bits, dtype):
    w = (rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32)
    qw = quantize_tensor(w, FORMAT_OF_BITS[bits], group_size, n_init=1)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    return x, qw


def check(y, ref, dtype):
    assert y.dtype == ref.dtype == dtype
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOL[dtype] * np.abs(ref).max())


@pytest.mark.parametrize("m, k, n, group_size, bits, dtype, strategy", CASES)
def test_interpret_matches_reference(rng, m, k, n, group_size, bits, dtype, strategy):
    x, qw = make(rng, m, k, n, group_size, bits, dtype)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    y = lut_matmul(*args, k=k, group_size=qw.group_size, strategy=strategy, interpret=True)
    check(y, lut_matmul_reference(*args, k=k, group_size=qw.group_size), dtype)


@pytest.mark.parametrize("block_k, split_k", [(32, 1), (64, 3), (512, 2)])
def test_masking_when_k_is_not_a_multiple_of_group_or_block(rng, block_k, split_k):
    """K = 1000 (odd number of 8-element tails), G = 64: the last group has 40
    elements, and block_k 512 spans several groups (scales gathered per element)."""
    x, qw = make(rng, 5, 1000, 96, 64, 4, jnp.float32)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    y = lut_matmul(*args, k=1000, group_size=64, interpret=True, block_k=block_k, split_k=split_k, block_n=32)
    check(y, lut_matmul_reference(*args, k=1000, group_size=64), jnp.float32)


def test_odd_k(rng):
    x, qw = make(rng, 2, 333, 40, 32, 4, jnp.float32)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    check(lut_matmul(*args, k=333, group_size=32, interpret=True),
          lut_matmul_reference(*args, k=333, group_size=32), jnp.float32)


def test_reference_equals_dequantize_then_matmul(rng):
    """The kernel's spec agrees with the library's own dequantization formula."""
    from any4_jax import dequantize
    x, qw = make(rng, 4, 200, 24, 64, 4, jnp.float32)
    ref = lut_matmul_reference(x, qw.codes, qw.lut, qw.scales, qw.zeros, k=200, group_size=64)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(x) @ np.asarray(dequantize(qw)).T, rtol=1e-5, atol=1e-5)


def test_quant_dense_on_kernel_equals_xla_path(rng):
    w = (rng.standard_normal((64, 576)) * 0.05).astype(np.float32)
    qw = quantize_tensor(w, "any4", 128)
    params = {"params": {"kernel": qw, "bias": jnp.asarray(rng.standard_normal(64), jnp.float32)}}
    x = jnp.asarray(rng.standard_normal((2, 3, 576)), jnp.float32)
    y_kernel = QuantDense(64, True, jnp.float32, "any4", 128, matmul="kernel").apply(params, x)
    y_xla = QuantDense(64, True, jnp.float32, "any4", 128, matmul="xla").apply(params, x)
    check(y_kernel, y_xla, jnp.float32)
    np.testing.assert_allclose(np.asarray(qmatmul(x, qw, path="kernel")), np.asarray(y_xla - params["params"]["bias"]),
                               rtol=0, atol=2e-5 * float(jnp.abs(y_xla).max()))


def test_matmul_path_errors(monkeypatch):
    with pytest.raises(ValueError, match="'cuda'; accepted: auto, kernel, xla"):
        qmatmul(jnp.ones((1, 64)), quantize_tensor(np.ones((8, 64), np.float32), "int4", 32), path="cuda")
    from any4_jax.cli import matmul_from_env
    monkeypatch.setenv("ANY4_JAX_MATMUL", "cuda")
    with pytest.raises(ValueError, match="ANY4_JAX_MATMUL='cuda'; accepted: auto, kernel, xla"):
        matmul_from_env()


def test_matmul_path_is_fixed_when_the_model_is_built_not_while_tracing(rng, monkeypatch):
    """The environment variable is read by the CLI only: a layer built with
    matmul="xla" keeps the XLA path whatever the variable says later."""
    qw = quantize_tensor((rng.standard_normal((64, 576)) * 0.05).astype(np.float32), "any4", 128)
    x = jnp.asarray(rng.standard_normal((1, 576)), jnp.float32)
    monkeypatch.setenv("ANY4_JAX_MATMUL", "kernel")
    import pallas_kernels.lut_matmul as lm
    monkeypatch.setattr(lm, "_lut_matmul", lambda *a, **k: pytest.fail("the kernel ran on the xla path"))
    QuantDense(64, False, jnp.float32, "any4", 128, matmul="xla").apply({"params": {"kernel": qw}}, x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="table"), "accepted: gather, select"),
    (dict(block_n=48), "block_n must be a power of two"),
    (dict(block_q=4), "unknown block options"),
    (dict(k=100), r"x must be \(M, K=100\)"),
])
def test_bad_arguments(rng, kwargs, match):
    x, qw = make(rng, 1, 128, 16, 64, 4, jnp.float32)
    args = dict(k=128, group_size=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lut_matmul(x, qw.codes, qw.lut, qw.scales, qw.zeros, **args)


def _lower_for_cuda(m, k, n, group_size, strategy, dtype=jnp.bfloat16):
    shapes = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
              jax.ShapeDtypeStruct((n, 16), jnp.float32), jax.ShapeDtypeStruct((n, k // group_size), jnp.float32),
              jax.ShapeDtypeStruct((n, k // group_size), jnp.float32))
    f = functools.partial(lut_matmul, k=k, group_size=group_size, strategy=strategy)
    return jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def _can_lower_for_cuda():
    try:
        _lower_for_cuda(1, 256, 64, 128, "gather")
        return True, ""
    except Exception as e:  # jaxlib >= 0.11 needs a GPU to lower Triton kernels
        return False, f"this jax/jaxlib cannot lower Pallas->Triton without a GPU ({type(e).__name__}: {str(e)[:120]})"


CAN_LOWER, WHY_NOT = _can_lower_for_cuda()


@pytest.mark.skipif(not CAN_LOWER, reason=WHY_NOT or "-")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("m, group_size", [(1, 128), (4, 32), (16, 4096), (64, 128), (128, 32)])
def test_triton_lowering(m, group_size, strategy):
    text = _lower_for_cuda(m, 4096, 4096, group_size, strategy)
    assert "triton_kernel_call" in text or "__gpu$xla.gpu.triton" in text


def test_block_config_is_pow2_and_prefers_group_aligned_k_blocks():
    for m in (1, 16, 64):
        for g in (32, 128, 576, 1024):
            cfg = block_config(m, 4096, 4096, g)
            for name in ("block_n", "block_k", "block_m"):
                assert cfg[name] & (cfg[name] - 1) == 0, (m, g, cfg)
            if g in (32, 128, 1024) and m <= 16:
                assert g % cfg["block_k"] == 0, cfg


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (run scripts/gpu_check.sh on one)")
@pytest.mark.parametrize("m, k, n, group_size, bits, dtype, strategy", CASES)
def test_gpu_matches_reference(rng, m, k, n, group_size, bits, dtype, strategy):
    x, qw = make(rng, m, k, n, group_size, bits, dtype)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    y = lut_matmul(*args, k=k, group_size=qw.group_size, strategy=strategy)
    check(y, lut_matmul_reference(*args, k=k, group_size=qw.group_size), dtype)
