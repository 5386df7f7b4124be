"""The Pallas LUT matmul: interpret mode vs the pure-jnp reference, and the
CPU-side Pallas -> Triton lowering check (docs/design.md §5)."""

import functools
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import quantize_tensor
from any4_jax import layers
from any4_jax.layers import QuantDense, choose_matmul, qmatmul
from pallas_kernels import lookup, lut_matmul as lm
from pallas_kernels.layout import pack_codes, packed_columns, unpack_codes
from pallas_kernels.lut_matmul import BlockSizes, block_sizes, lut_matmul, lut_matmul_reference

# Relative tolerance (of max |y|) per input dtype. The kernel and the reference
# both accumulate in float32 and round the result to x.dtype once (bf16: 2**-8,
# f16: 2**-11 relative); the kernel also rounds the LUT values to x.dtype before
# the tensor-core dot (exact for the default bf16 storage), which at most doubles that.
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}
FORMAT_OF_BITS = {4: "any4", 3: "int3", 2: "any2"}
ON_GPU = jax.default_backend() == "gpu"  # then the kernel tests run compiled (scripts/gpu_check.sh)

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
    (128, 576, 64, 256, 3, jnp.float16, "gather"),
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
    y = lut_matmul(*args, k=1000, group_size=64, interpret=not ON_GPU, block_n=block_n, block_m=block_m)
    check(y, lut_matmul_reference(*args, k=1000, group_size=64), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fewer_rows_than_one_block(rng, dtype):
    """N = 4 (Mixtral's router) and M = 3 in blocks of 16: rows past N and M repeat
    the last real row; no output element may be clobbered."""
    x, qw = make(rng, 3, 512, 4, 32, 4, dtype)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    check(lut_matmul(*args, k=512, group_size=32, interpret=not ON_GPU),
          lut_matmul_reference(*args, k=512, group_size=32), dtype)


def poisoned(rng, m, k, n, group_size, levels, dtype):
    """A weight whose last LUT entry is NaN and never used by its codes, and
    buffers that hold one more row past it (codes 0xFF, LUT, scales and zeros NaN)
    and NaN past the end of x: any read outside the real rows, K or codes makes
    the output NaN, while the true product is finite."""
    g = -(-k // group_size)
    codes = rng.integers(0, levels - 1, (n, k))  # never the last entry
    lut = rng.standard_normal((n, levels)).astype(np.float32)
    lut[:, -1] = np.nan
    scales, zeros = (rng.standard_normal((n, g)) * 0.02).astype(np.float32), (rng.standard_normal((n, g)) * 0.01).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    real = (x, pack_codes(codes, levels.bit_length() - 1), jnp.asarray(lut, jnp.bfloat16), jnp.asarray(scales, jnp.bfloat16),
            jnp.asarray(zeros, jnp.bfloat16))
    nan = lambda shape, dt: jnp.full(shape, jnp.nan, dt)
    flat = (jnp.concatenate([x.reshape(-1), nan((2 * k,), dtype)]),
            jnp.concatenate([real[1], jnp.full((1, real[1].shape[1]), 0xFF, jnp.uint8)]).reshape(-1),
            *[jnp.concatenate([a, nan((1, a.shape[1]), jnp.bfloat16)]).reshape(-1) for a in real[2:]])
    return real, flat


BOUNDS = [  # (m, k, n, G, levels, dtype, strategy, block_n, block_k)
    *[(3, 3 * 128 + r, 40, 128, 16, jnp.bfloat16, "prmt", 32, 128) for r in (1, 31, 32, 33, 63)],  # K = r mod block_k
    *[(2, 4 * 64 + r, 24, 32, 16, jnp.float32, "gather", 16, 64) for r in (1, 16, 32)],  # G = 32, K = r mod 64
    (5, 300, 5, 300, 8, jnp.float32, "gather", 32, 64),    # 3-bit, N < block_n, one group a row
    (17, 1000, 7, 64, 4, jnp.bfloat16, "gather", 64, 64),  # 2-bit, M past one block
    (1, 200, 3, 64, 8, jnp.float16, "prmt", 16, 64),
    # K blocks past the last code block (5 code blocks, 3 K blocks of 128): 3 and 2 bits
    (3, 289, 40, 289, 8, jnp.bfloat16, "prmt", 32, 128), (2, 289, 24, 289, 4, jnp.float32, "gather", 16, 128),
    (2, 289, 24, 289, 4, jnp.bfloat16, "prmt", 16, 128), (4, 2 * 64 + 7, 40, 32, 8, jnp.float16, "prmt", 32, 64),
]


@pytest.mark.parametrize("m, k, n, group_size, levels, dtype, strategy, block_n, block_k", BOUNDS)
def test_no_load_leaves_the_weight_or_x(rng, m, k, n, group_size, levels, dtype, strategy, block_n, block_k):
    """Compiled on a GPU, else in interpret mode (whose out-of-range loads read a
    buffer's last element: here NaN): the output is finite and right."""
    real, flat = poisoned(rng, m, k, n, group_size, levels, dtype)
    blocks = BlockSizes(block_m=16, block_n=block_n, block_k=block_k, num_warps=block_n // 16, num_stages=2)
    y = jax.jit(functools.partial(lm._pallas_call, m=m, n=n, k=k, group_size=group_size, levels=levels,
                                  strategy=strategy, interpret=not ON_GPU, blocks=blocks.check(k, group_size)))(*flat)
    ref = lut_matmul_reference(*real, k=k, group_size=group_size)
    assert np.isfinite(np.asarray(ref, np.float32)).all()
    assert np.isfinite(np.asarray(y, np.float32)).all(), "a load read past the weight, its row or x"
    check(y.reshape(m, n), ref, dtype)


def test_past_int32_offsets_the_problem_is_split(rng, monkeypatch):
    """A problem whose buffers pass FLAT_LIMIT elements (2**31 - 1: the kernel's
    offsets are int32) runs as several launches; shown with a small limit."""
    monkeypatch.setattr(lm, "FLAT_LIMIT", 40 * 256)
    calls = []
    real = lm._lut_matmul
    monkeypatch.setattr(lm, "_lut_matmul", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x, qw = make(rng, 70, 256, 96, 64, 4, jnp.float32)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    check(lut_matmul(*args, k=256, group_size=64, interpret=not ON_GPU),
          lut_matmul_reference(*args, k=256, group_size=64), jnp.float32)
    assert len(calls) > 2 and all(m * 256 <= lm.FLAT_LIMIT for m, _ in calls)


def test_odd_k(rng):
    x, qw = make(rng, 2, 333, 40, 32, 4, jnp.float32)
    args = (x, qw.codes, qw.lut, qw.scales, qw.zeros)
    check(lut_matmul(*args, k=333, group_size=32, interpret=not ON_GPU),
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
    (dict(block_k=128), "block_k = 128 must divide the group size 64"),
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
    """Whether this jaxlib lowers Pallas for CUDA: every jaxlib on a GPU; without
    one, jaxlib 0.10 only (0.11 needs a GPU; the test extra pins 0.10.2). Decided
    by version and device, never by catching an error, which could be our kernel's."""
    import jaxlib
    if ON_GPU:
        return True, ""
    major_minor = tuple(int(v) for v in jaxlib.__version__.split(".")[:2])
    return major_minor < (0, 11), f"jaxlib {jaxlib.__version__} lowers Pallas for CUDA only on a GPU"


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
    text = _lower_for_cuda(f, S((m, k), dtype), S((n, packed_columns(k, bits)), jnp.uint8), S((n, 2 ** bits), param_dtype),
                           S((n, g), param_dtype), S((n, g), param_dtype))
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call") == 1  # one launch


def test_block_sizes_are_pow2_and_one_group_per_k_block():
    for m in (1, 16, 64):
        for g in (32, 64, 128, 576, 1024):
            b = block_sizes(m, 4096, 4096, g)
            for v in (b.block_n, b.block_k, b.block_m):
                assert v & (v - 1) == 0, (m, g, b)
            assert b.block_k % 64 == 0 and (g % b.block_k == 0 or g in (32, 576)), b
            assert b.block_n == 16 * b.num_warps, b  # one MMA height of W a warp


@pytest.mark.parametrize("fields, match", [
    (dict(block_n=48), "block_n must be a power of two >= 16; got 48"), (dict(block_m=8), "block_m must be"),
    (dict(block_k=32), "block_k must be a power of two >= 16|multiple of the 64"), (dict(num_warps=3), "num_warps"),
    (dict(num_stages=0), "num_stages >= 1")])
def test_block_sizes_check_themselves(fields, match):
    with pytest.raises(ValueError, match=match):
        BlockSizes(**fields)
    with pytest.raises(ValueError, match="block_k = 256 must divide the group size 64"):
        BlockSizes(block_k=256).check(4096, 64)


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
        assert int(lookup.prmt(a, b, jnp.uint32(sel))) == want, hex(sel)


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
    tables = {name: v[:, None] for name, v in lookup.lut_tables(jnp.asarray(lut)).items()}
    out = [np.asarray(o) for o in lookup.lookup_emulated(jnp.asarray(words), tables)]
    values = np.take_along_axis(lut, codes, axis=1)
    for half, (r0, r1) in enumerate(((out[0], out[1]), (out[2], out[3]))):
        got = np.stack([r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16], -1).reshape(6, 32)
        np.testing.assert_array_equal(got, values[:, 32 * half:32 * half + 32])


def test_lookup_ptx_writes_its_outputs_after_its_last_input_read():
    """Inline-asm outputs may share registers with inputs: no output before the last read."""
    for half in (0, 1):
        lines = lookup.lookup_ptx(half).splitlines()
        writes = [i for i, line in enumerate(lines) if line.split(" ", 1)[-1].startswith(("$0,", "$1,"))]
        reads = [i for i, line in enumerate(lines) if any(f"${r}" in line.split(",", 1)[-1] for r in range(2, 11))]
        assert writes and reads and min(writes) > max(reads), lines


def test_static_entry_gives_the_per_call_function_and_stored_arguments():
    fn, args, info = lm.static_entry(1, 256, 512, 128, 4)
    assert [a.shape for a in args] == [(1, 512), (256, 256), (256, 16), (256, 4), (256, 4)]
    assert info["x"] == 0 and set(info["config"]) >= {"block_n", "block_k"}
    if CAN_LOWER:  # else only the arguments are checked
        assert _lower_for_cuda(fn, *args).count("__gpu$xla.gpu.triton") == 1



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


@pytest.fixture
def offered(monkeypatch):
    """As on a capable GPU: "auto" offers the kernel (its self-check runs in interpret mode here)."""
    monkeypatch.setattr(layers, "kernel_offered", lambda: True)
    layers.kernel_verified.cache_clear()
    layers._KERNEL_FAILURE.clear()
    yield
    layers.kernel_verified.cache_clear()
    layers._KERNEL_FAILURE.clear()


def test_auto_takes_a_kernel_that_passes_its_self_check(offered, rng):
    _, qw = make(rng, 1, 576, 64, 128, 4, jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_matmul("auto", 1, qw, x_dtype=jnp.bfloat16) == "kernel"
        assert choose_matmul("auto", 100, qw, x_dtype=jnp.float32) == "kernel"  # prefill blocks, gather lookup


@pytest.mark.parametrize("broken", ["wrong output", "compile error"])
def test_a_kernel_that_fails_its_self_check_is_not_used_by_auto(offered, rng, monkeypatch, broken):
    """Once a self-check fails: one warning naming what failed and the variable that
    silences it; "auto" takes another path for every later configuration, without a
    warning (XLA; here, on a CPU, also the CPU kernel), and a layer's output is then
    right; "kernel" still takes the kernel, and
    what it does (an error, or its wrong output) reaches the caller."""
    real = lm._lut_matmul

    def bad(*args, **kwargs):
        if broken == "compile error":
            raise RuntimeError("ptxas fatal: unresolved extern function")
        return real(*args, **kwargs) + 1

    monkeypatch.setattr(lm, "_lut_matmul", bad)
    x, qw = make(rng, 2, 576, 64, 128, 4, jnp.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"failed its self-check .*(ptxas fatal|differs from the reference).*"
                                            r"ANY4_JAX_MATMUL=xla silences this") as caught:
        assert choose_matmul("auto", 2, qw, x_dtype=jnp.bfloat16) != "kernel"
    assert len([w for w in caught if "self-check" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_matmul("auto", 100, qw, x_dtype=jnp.float32) == "dequantize"  # XLA
        y = QuantDense(64, False, jnp.bfloat16, "any4", 128).apply({"params": {"kernel": qw}}, x)
    check(y, QuantDense(64, False, jnp.bfloat16, "any4", 128, matmul="xla").apply({"params": {"kernel": qw}}, x),
          jnp.bfloat16)
    assert choose_matmul("kernel", 2, qw) == "kernel"
    if broken == "compile error":
        with pytest.raises(RuntimeError, match="ptxas fatal"):
            qmatmul(x, qw, path="kernel")
    else:
        assert not np.allclose(np.asarray(qmatmul(x, qw, path="kernel"), np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("kind, cc, offered", [("NVIDIA H100 80GB HBM3", "9.0", True), ("NVIDIA A100-SXM4-40GB", "8.0", True),
                                               ("Tesla V100-SXM2-16GB", "7.0", False), ("AMD Instinct MI250X", None, False)])
def test_the_kernel_is_offered_to_nvidia_gpus_of_compute_capability_8_or_more(monkeypatch, kind, cc, offered):
    device = types.SimpleNamespace(device_kind=kind, client=types.SimpleNamespace(
        platform_version="rocm 6.0" if cc is None else "cuda 12080"), **({} if cc is None else {"compute_capability": cc}))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert layers.kernel_offered() is offered


def run_ptx(text: str, regs: dict) -> dict:
    """Evaluate straight-line PTX of ``mov/and/shr/prmt/lop3`` on 32-bit registers
    (``$n`` operands and ``%name`` temporaries), each opcode written from the PTX
    ISA: ``prmt.b32`` default mode (selector nibble: bits 0-2 pick one of the bytes
    {b, a}, bit 3 replicates its sign bit), ``lop3.b32`` (bit i of ``immLut``
    is the result for the bits (a, b, c) = i's bits 2, 1, 0), ``shr.u32`` logical."""
    regs = dict(regs)
    val = lambda t: int(t, 0) if t[0].isdigit() else regs[t]
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(" ", 1)
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            r = val(a[0])
        elif op == "and.b32":
            r = val(a[0]) & val(a[1])
        elif op == "shr.u32":
            r = val(a[0]) >> min(val(a[1]), 32)
        elif op == "prmt.b32":
            x, y, sel = val(a[0]), val(a[1]), val(a[2])
            source = [(x >> 8 * i) & 0xFF for i in range(4)] + [(y >> 8 * i) & 0xFF for i in range(4)]
            r = 0
            for i in range(4):
                nib = (sel >> 4 * i) & 0xF
                byte = source[nib & 7]
                r |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << 8 * i
        elif op == "lop3.b32":
            x, y, z, lut = val(a[0]), val(a[1]), val(a[2]), val(a[3])
            r = sum(((lut >> ((x >> i & 1) << 2 | (y >> i & 1) << 1 | (z >> i & 1))) & 1) << i for i in range(32))
        else:
            raise AssertionError(f"an opcode the evaluator does not know: {line}")
        regs[d] = r & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("levels", [16, 8, 4])
def test_the_printed_ptx_looks_up_every_lut_entry(levels):
    """The PTX text the kernel inlines, evaluated instruction by instruction (not the
    jnp emulation): for 32-bit words of 8 codes (nibble e = code e, as the code
    layout packs them), half h's program returns the 16-bit LUT values of codes
    4h..4h+3 in $0 = (4h, 4h+1) and $1 = (4h+2, 4h+3), low half first."""
    rng = np.random.default_rng(levels)
    lut = [int(v) for v in rng.integers(0, 1 << 16, 16)]
    tables = {}
    for q in range(4):  # th_q / tl_q: byte e = high / low byte of entry 4q + e
        tables[f"${3 + q}"] = sum((lut[4 * q + e] >> 8) << 8 * e for e in range(4))
        tables[f"${7 + q}"] = sum((lut[4 * q + e] & 0xFF) << 8 * e for e in range(4))
    words = [list(range(8)), list(range(8, 16)), [levels - 1] * 8] + [list(rng.integers(0, levels, 8)) for _ in range(30)]
    for codes in words:
        codes = [c % levels for c in codes]
        word = sum(c << 4 * e for e, c in enumerate(codes))
        for half in (0, 1):
            out = run_ptx(lookup.lookup_ptx(half), {"$2": word, **tables})
            got = [out["$0"] & 0xFFFF, out["$0"] >> 16, out["$1"] & 0xFFFF, out["$1"] >> 16]
            assert got == [lut[c] for c in codes[4 * half:4 * half + 4]], (half, codes)


def test_the_ptx_evaluator_follows_the_isa():
    """Control: the evaluator's prmt (both modes) and lop3 on values worked out by hand."""
    r = run_ptx("prmt.b32 $0, $1, $2, 0x5140;\nprmt.b32 $3, $1, $2, 0x8888;\nlop3.b32 $4, $1, $2, $5, 0xD8;",
                {"$1": 0x33221100, "$2": 0x77665544, "$5": 0xFFFF0000})
    assert r["$0"] == 0x55114400 and r["$3"] == 0x00000000  # byte 0 of a is 0x00: sign 0
    assert run_ptx("prmt.b32 $0, $1, $2, 0x8;", {"$1": 0x80, "$2": 0})["$0"] == 0x808080FF  # nibble 8: a0's sign
    assert r["$4"] == (0x77660000 | 0x1100)  # 0xD8 = m ? b : a with m = $5
