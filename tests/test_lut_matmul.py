"""The Pallas LUT matmul: interpret mode vs the pure-jnp reference, and the
CPU-side Pallas -> Triton lowering check (docs/design.md §5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import quantize_tensor
from any4_jax.layers import QuantDense, qmatmul
from pallas_kernels import lut_matmul as lm
from pallas_kernels.lut_matmul import (block_config, lut_matmul, lut_matmul_reference, pack_codes, packed_columns,
                                       unpack_codes)

# Relative tolerance (of max |y|) per input dtype. The kernel and the reference
# both accumulate in float32 and round the result to x.dtype once (bf16: 2**-8,
# f16: 2**-11 relative); the kernel also rounds the LUT values to x.dtype before
# the tensor-core dot (exact for the default bf16 storage), which at most doubles that.
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}
FORMAT_OF_BITS = {4: "any4", 3: "int3", 2: "any2"}

# (M, K, N, group size, bits, dtype, strategy): a sample of the full grid in
# which every value of every axis appears; prmt needs 16-bit x.
CASES = [
    (1, 4096, 4096, 128, 4, jnp.bfloat16, "prmt"),
    (1, 4096, 4096, 128, 4, jnp.bfloat16, "gather"),
    (1, 576, 1536, 32, 3, jnp.float16, "prmt"),
    (3, 576, 64, 64, 2, jnp.float32, "gather"),
    (3, 4096, 1536, 256, 4, jnp.float16, "prmt"),
    (16, 576, 1536, None, 4, jnp.bfloat16, "prmt"),
    (16, 4096, 64, 32, 3, jnp.float32, "gather"),
    (33, 576, 64, 128, 4, jnp.float32, "gather"),
    (33, 576, 1536, 64, 2, jnp.bfloat16, "gather"),
    (128, 576, 64, 256, 3, jnp.float16, "prmt"),
    (128, 4096, 64, None, 2, jnp.bfloat16, "prmt"),
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


@pytest.mark.parametrize("dtype, block_n, block_m", [(jnp.float32, 32, 16), (jnp.bfloat16, 64, 16),
                                                     (jnp.bfloat16, 16, 32)])
def test_masking_when_shapes_do_not_divide_the_blocks(rng, dtype, block_n, block_m):
    """K = 1000 (the last group has 40 elements, the last code block is padded),
    N = 96 and M = 5 or 37 (rows masked in W and in x)."""
    m = 5 if block_m == 16 else 37
    x, qw = make(rng, m, 1000, 96, 64, 4, dtype)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    y = lut_matmul(*args, k=1000, group_size=64, interpret=True, block_n=block_n, block_m=block_m)
    check(y, lut_matmul_reference(*args, k=1000, group_size=64), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fewer_rows_than_one_block(rng, dtype):
    """N = 4 (Mixtral's router) and M = 3 in blocks of 16: rows past N and M repeat
    the last real row; no output element may be clobbered."""
    x, qw = make(rng, 3, 512, 4, 32, 4, dtype)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    check(lut_matmul(*args, k=512, group_size=32, interpret=True), lut_matmul_reference(*args, k=512, group_size=32),
          dtype)


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
    with pytest.raises(ValueError, match="'cuda'; accepted: auto, kernel, cpu, xla"):
        qmatmul(jnp.ones((1, 64)), quantize_tensor(np.ones((8, 64), np.float32), "int4", 32), path="cuda")
    from any4_jax.cli import matmul_from_env
    monkeypatch.setenv("ANY4_JAX_MATMUL", "cuda")
    with pytest.raises(ValueError, match="ANY4_JAX_MATMUL='cuda'; accepted: auto, kernel, cpu, xla"):
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
    (dict(strategy="table"), "accepted: gather \\(prmt needs bf16 or f16 x\\)"),
    (dict(strategy="prmt"), "'prmt' for x of dtype float32"),
    (dict(block_n=48), "block_n must be a power of two >= 16"),
    (dict(block_k=128), "block_k = 128 must be a multiple of 64 that divides the group size 64"),
    (dict(block_q=4), "unknown block options"),
    (dict(k=100), r"x must be \(M, K=100\)"),
])
def test_bad_arguments(rng, kwargs, match):
    x, qw = make(rng, 1, 128, 16, 64, 4, jnp.float32)
    args = dict(k=128, group_size=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lut_matmul(x, qw.codes, qw.lut, qw.scales, qw.zeros, **args)


def _lower_for_cuda(f, *shapes):
    return jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def _can_lower_for_cuda():
    """Whether this jax lowers Pallas for CUDA without a GPU, judged on a trivial
    kernel that is known to lower (so that a failure of *our* kernel fails)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltr

    def add_one(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    trivial = lambda x: pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                                       compiler_params=pltr.CompilerParams(num_warps=1, num_stages=1))(x)
    try:
        _lower_for_cuda(trivial, jax.ShapeDtypeStruct((16,), jnp.float32))
        return True, ""
    except Exception as e:  # jaxlib >= 0.11 needs a GPU to lower Triton kernels
        return False, f"this jax/jaxlib cannot lower Pallas->Triton without a GPU ({type(e).__name__}: {str(e)[:120]})"


CAN_LOWER, WHY_NOT = _can_lower_for_cuda()


@pytest.mark.skipif(not CAN_LOWER, reason=WHY_NOT or "-")
@pytest.mark.parametrize("m, k, group_size, bits, dtype, param_dtype, strategy", [
    (1, 4096, 128, 4, jnp.bfloat16, jnp.bfloat16, "prmt"), (1, 4096, 128, 4, jnp.bfloat16, jnp.bfloat16, "gather"),
    (4, 4096, 32, 4, jnp.float16, jnp.float32, "prmt"), (16, 4096, 4096, 3, jnp.bfloat16, jnp.bfloat16, "prmt"),
    (64, 4096, 128, 2, jnp.bfloat16, jnp.bfloat16, "prmt"), (128, 4096, 256, 4, jnp.float32, jnp.float32, "gather"),
    (1, 333, 333, 4, jnp.bfloat16, jnp.bfloat16, "prmt"),       # odd K, one group a row
    (16, 1000, 64, 4, jnp.bfloat16, jnp.bfloat16, "prmt"),      # K not a multiple of G
])
def test_triton_lowering(m, k, group_size, bits, dtype, param_dtype, strategy):
    n, g = 4096, -(-k // group_size)
    S = jax.ShapeDtypeStruct
    f = functools.partial(lut_matmul, k=k, group_size=group_size, strategy=strategy)
    text = _lower_for_cuda(f, S((m, k), dtype), S((n, packed_columns(k)), jnp.uint8), S((n, 2 ** bits), param_dtype),
                           S((n, g), param_dtype), S((n, g), param_dtype))
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call") == 1  # one launch


def test_block_config_is_pow2_and_one_group_per_k_block():
    for m in (1, 16, 64):
        for g in (32, 64, 128, 576, 1024):
            cfg = block_config(m, 4096, 4096, g)
            for name in ("block_n", "block_k", "block_m"):
                assert cfg[name] & (cfg[name] - 1) == 0, (m, g, cfg)
            assert cfg["block_k"] % 64 == 0 and (g % cfg["block_k"] == 0 or g in (32, 576)), cfg
            assert cfg["block_n"] == 16 * cfg["num_warps"], cfg  # one MMA height of W a warp


def test_code_layout_against_a_hand_packed_block():
    """Byte 4w + b of a 64-element block: low nibble = element p, high = p + 1, with
    p = 4w + 2b for b < 2 and 32 + 4w + 2(b - 2) for b >= 2 (see the module docstring)."""
    codes = np.arange(64) % 16
    expected = []
    for w in range(8):
        for b in range(4):
            p = 4 * w + 2 * b if b < 2 else 32 + 4 * w + 2 * (b - 2)
            expected.append(codes[p] | (codes[p + 1] << 4))
    np.testing.assert_array_equal(np.asarray(pack_codes(codes[None]))[0], np.array(expected, np.uint8))
    codes = np.random.default_rng(0).integers(0, 16, (3, 200))
    assert pack_codes(codes).shape == (3, packed_columns(200)) == (3, 128)
    np.testing.assert_array_equal(np.asarray(unpack_codes(pack_codes(codes), 200)), codes)


def test_prmt_emulation_follows_the_ptx_definition():
    """prmt.b32 d, a, b, c (default mode): byte i of d is byte c[4i+2:4i] of {b, a}."""
    a, b = jnp.uint32(0x33221100), jnp.uint32(0x77665544)
    for sel, want in ((0x3210, 0x33221100), (0x7654, 0x77665544), (0x5140, 0x55114400), (0x0426, 0x00442266)):
        assert int(lm.prmt(a, b, jnp.uint32(sel))) == want, hex(sel)


@pytest.mark.parametrize("levels", [16, 8, 4])
def test_lookup_program_returns_every_lut_entry(levels):
    """The byte-permute program (run as jnp ops) turns words of 8 codes into their
    16-bit LUT values, for every code of 2-, 3- and 4-bit LUTs."""
    rng = np.random.default_rng(levels)
    lut = np.zeros((6, 16), np.uint16)
    lut[:, :levels] = rng.integers(0, 1 << 16, (6, levels))
    codes = rng.integers(0, levels, (6, 64))
    codes[0, :levels] = np.arange(levels)
    words = np.asarray(pack_codes(codes)).view("<u4")  # 8 words: one 64-element block a row
    tables = {name: v[:, None] for name, v in lm.lut_tables(jnp.asarray(lut)).items()}
    out = [np.asarray(o) for o in lm.lookup_emulated(jnp.asarray(words), tables)]
    values = np.take_along_axis(lut, codes, axis=1)
    for half, (r0, r1) in enumerate(((out[0], out[1]), (out[2], out[3]))):
        got = np.stack([r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16], -1).reshape(6, 32)
        np.testing.assert_array_equal(got, values[:, 32 * half:32 * half + 32])


def test_lookup_ptx_writes_its_outputs_after_its_last_input_read():
    """Inline-asm outputs may share registers with inputs: no output before the last read."""
    for half in (0, 1):
        lines = lm._lookup_ptx(half).splitlines()
        writes = [i for i, line in enumerate(lines) if line.split(" ", 1)[-1].startswith(("$0,", "$1,"))]
        reads = [i for i, line in enumerate(lines) if any(f"${r}" in line.split(",", 1)[-1] for r in range(2, 11))]
        assert writes and reads and min(writes) > max(reads), lines


def test_static_entry_gives_the_per_call_function_and_stored_arguments():
    fn, args, info = lm.static_entry(1, 256, 512, 128, 4)
    assert [a.shape for a in args] == [(1, 512), (256, 256), (256, 16), (256, 4), (256, 4)]
    assert info["x"] == 0 and set(info["config"]) >= {"block_n", "block_k"}
    text = _lower_for_cuda(fn, *args) if CAN_LOWER else None
    assert text is None or text.count("__gpu$xla.gpu.triton") == 1


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (run scripts/gpu_check.sh on one)")
@pytest.mark.parametrize("m, k, n, group_size, bits, dtype, strategy", CASES)
def test_gpu_matches_reference(rng, m, k, n, group_size, bits, dtype, strategy):
    x, qw = make(rng, m, k, n, group_size, bits, dtype)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    y = lut_matmul(*args, k=k, group_size=qw.group_size, strategy=strategy)
    check(y, lut_matmul_reference(*args, k=k, group_size=qw.group_size), dtype)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_model_logits_on_the_kernel_path_equal_the_xla_path(tiny_model, dtype, tol):
    """A whole quantized model (tiny Llama, any4, G = 32) run with every matmul on the
    Pallas kernel (interpret mode; prmt lookup for bf16, gather for f32) against the
    XLA path. Tolerance of max |logit|: f32 differs by summation order; bf16 rounds
    activations between layers, so one rounding difference propagates."""
    from any4_jax import load_model, quantize_model
    from any4_jax.recipe import QuantDenseFactory

    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir, dtype=dtype)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=32, calibration=ids, progress=False,
                                     matmul="xla")
    on_kernel = qmodel.clone(dense=QuantDenseFactory(qmodel.dense.recipe, "kernel"))
    ref = np.asarray(qmodel.apply({"params": qparams}, ids), np.float32)
    out = np.asarray(on_kernel.apply({"params": qparams}, ids), np.float32)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * np.abs(ref).max())
