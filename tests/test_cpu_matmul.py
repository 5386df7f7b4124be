"""The CPU paths of ``qmatmul`` (docs/design.md §5): the C++ kernel (each of its
AVX-512, AVX2 and scalar builds) and XLA's fused reduction and dequantize + dot,
against a float64 numpy formula that decodes the packed bytes by hand."""

import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import load_model, quantize_tensor
from any4_jax import layers
from any4_jax.layers import choose_matmul, qmatmul
from pallas_kernels import cpu
from conftest import dequantize_by_hand

FORMAT_OF_BITS = {4: "any4", 3: "any3", 2: "int2"}


def reference(x, qw):
    """``x @ W^T`` in float64, W decoded by hand (conftest.dequantize_by_hand)."""
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64) @ dequantize_by_hand(qw).T


# (M, K, N, group size, bits, metadata dtype): K not a multiple of 64 or of G,
# one group a row, N not a multiple of the kernel's row tile, M past one x tile.
CASES = [
    (1, 576, 1536, 128, 4, "bfloat16"),
    (1, 7, 33, None, 4, "bfloat16"),
    (3, 576, 43, None, 3, "float16"),
    (5, 4096, 64, 64, 4, "bfloat16"),
    (9, 1000, 48, 256, 4, "float16"),
    (16, 200, 24, None, 2, "float32"),
    (17, 640, 41, 128, 4, "bfloat16"),
]


def make(rng, m, k, n, g, bits, storage, x_dtype=jnp.float32):
    w = (rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32)
    qw = quantize_tensor(w, FORMAT_OF_BITS[bits], g, n_init=1, storage_dtype=storage)
    return jnp.asarray(rng.standard_normal((m, k)), x_dtype), qw


def close(y, ref, rtol=2e-5):  # float32 sums of up to 4096 terms; a wrong code is ~1e-1
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=rtol * np.abs(ref).max())


needs_kernel = pytest.mark.skipif(not cpu.available(), reason="the CPU kernel could not be built here (see warning)")


@needs_kernel
@pytest.mark.parametrize("m, k, n, g, bits, storage", CASES)
def test_cpu_kernel_matches_reference(rng, m, k, n, g, bits, storage):
    x, qw = make(rng, m, k, n, g, bits, storage)
    close(jax.jit(lambda x, q: qmatmul(x, q, path="cpu"))(x, qw), reference(x, qw))


@pytest.mark.parametrize("m, k, n, g, bits, storage", CASES)
def test_xla_paths_match_reference(rng, m, k, n, g, bits, storage):
    x, qw = make(rng, m, k, n, g, bits, storage)
    assert choose_matmul("xla", m, qw) == ("fused" if m <= layers.FUSED_MAX_M else "dequantize")
    close(qmatmul(x, qw, path="xla"), reference(x, qw))
    close(layers.fused_matmul(x, qw), reference(x, qw))
    close(layers.dequantize_matmul(x, qw), reference(x, qw))


@needs_kernel
def test_cpu_kernel_takes_leading_dims_and_bf16_x(rng):
    x, qw = make(rng, 6, 576, 100, 128, 4, "bfloat16", jnp.bfloat16)
    x = x.reshape(2, 3, 576)
    y = qmatmul(x, qw, path="cpu")
    assert y.shape == (2, 3, 100) and y.dtype == jnp.bfloat16
    close(y.reshape(6, 100), reference(x.reshape(6, 576), qw), rtol=8e-3)  # one bf16 rounding of y


X86 = cpu.platform.machine() in ("x86_64", "AMD64")
BUILDS = [pytest.param(("-march=native", "-mno-avx512f"), "avx2", id="avx2",
                       marks=pytest.mark.skipif(not X86, reason="an x86 build")),
          pytest.param(None, "scalar", id="plain loop")]


@needs_kernel
@pytest.mark.parametrize("march, isa", BUILDS)
def test_other_instruction_sets_match_reference(rng, march, isa):
    """The AVX2 and the plain loops, built here as other FFI targets (the plain one
    for the machine's baseline: x86-64 or armv8-a), and the instruction set each says it has."""
    if isa == "avx2" and "avx2" not in cpu.cpu_id():
        pytest.skip("this CPU has no AVX2")
    flags = cpu.plain_flags() if march is None else tuple(f for f in cpu.FLAGS if f != "-march=native") + march
    target = f"any4_test_{isa}"
    assert cpu.isa_of(cpu.register(flags, target)) == isa
    for m, k, n, g, bits, storage in CASES + THREADED:
        x, qw = make(rng, m, k, n, g, bits, storage)
        close(cpu.lut_gemv(x, qw.codes, qw.lut, qw.scales, qw.zeros, group_size=qw.group_size, target=target),
              reference(x, qw))


# Big enough for the threaded path (M x N x code bytes >= 1 MiB), with fewer than 16 rows of W:
# a row count below one task's share once divided by zero (SIGFPE) there.
THREADED = [(64, 4096, 8, 128, 4, "bfloat16"), (64, 4096, 15, 128, 4, "float16"), (64, 32768, 1, 128, 4, "bfloat16"),
            (40, 4096, 17, None, 4, "float32")]


@needs_kernel
@pytest.mark.parametrize("m, k, n, g, bits, storage", THREADED)
def test_threaded_path_with_few_rows(rng, m, k, n, g, bits, storage):
    """In a child process (a crash must fail the test, not end the session)."""
    code = (f"import numpy as np, jax.numpy as jnp; from any4_jax import quantize_tensor, qmatmul\n"
            f"rng = np.random.default_rng(0); w = (rng.standard_normal(({n}, {k})) * 0.02).astype(np.float32)\n"
            f"q = quantize_tensor(w, 'any4', {g}, n_init=1, storage_dtype='{storage}')\n"
            f"x = jnp.asarray(rng.standard_normal(({m}, {k})), jnp.float32)\n"
            f"np.save('out.npy', np.asarray(qmatmul(x, q, path='cpu'))); np.save('x.npy', np.asarray(x))\n"
            f"import pickle; pickle.dump(q, open('q.pkl', 'wb'))\n")
    import os, pickle, tempfile
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-1500:]}"
        y, x, qw = np.load(f"{d}/out.npy"), np.load(f"{d}/x.npy"), pickle.load(open(f"{d}/q.pkl", "rb"))
    close(y, reference(x, qw))


def test_the_build_key_changes_with_the_cpu_flags_and_compiler(monkeypatch, tmp_path):
    """A cached build is only taken for the same source, jaxlib, compiler, flags and
    CPU; the CPU identity names the machine and its features on x86 and Arm."""
    ident = cpu.cpu_id()
    assert ident.splitlines()[0] == cpu.platform.machine() and len(ident.splitlines()) >= 2
    built = []
    monkeypatch.setattr(cpu, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(cpu.subprocess, "run", lambda cmd, **kw: built.append(cmd) or types.SimpleNamespace(
        returncode=1, stdout="c++ 1.0", stderr="stop here"))
    names = set()
    for change in ({}, {"flags": cpu.plain_flags()}, {"compiler": "/usr/bin/other-c++"}, {"cpu": "another cpu"}):
        monkeypatch.setattr(cpu, "cpu_id", lambda: change.get("cpu", ident))
        with pytest.raises(RuntimeError, match="stop here"):
            cpu.build(change.get("compiler", "/usr/bin/c++"), flags=change.get("flags", cpu.FLAGS))
        names.add(built[-1][built[-1].index("-o") + 1].rsplit("/", 1)[-1])
    assert len(names) == 4, names


def test_a_compile_that_hangs_is_given_up(monkeypatch, tmp_path):
    def hang(cmd, **kw):
        if "--version" in cmd:
            return types.SimpleNamespace(returncode=0, stdout="c++ 1.0", stderr="")
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])
    monkeypatch.setattr(cpu, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(cpu.subprocess, "run", hang)
    with pytest.raises(RuntimeError, match=f"took over {cpu.COMPILE_TIMEOUT_S} s"):
        cpu.build("/usr/bin/c++")


def test_auto_picks_by_rows_and_group_size(rng):
    _, qw = make(rng, 1, 256, 8, 128, 4, "bfloat16")
    _, qw32 = make(rng, 1, 256, 8, 32, 4, "bfloat16")
    small = "cpu" if cpu.available() and cpu.isa() != "scalar" else "fused"
    assert choose_matmul("auto", 1, qw) == choose_matmul("auto", layers.CPU_KERNEL_MAX_M, qw) == small
    assert choose_matmul("auto", layers.CPU_KERNEL_MAX_M + 1, qw) == "dequantize"
    assert choose_matmul("auto", 1, qw32) == "dequantize"  # G = 32: neither the kernel nor the fused sum
    assert choose_matmul("kernel", 1, qw) == "kernel"
    with pytest.raises(ValueError, match="multiples of 64.*has 32"):
        choose_matmul("cpu", 1, qw32)
    with pytest.raises(ValueError, match="unknown matmul path 'fast'.*auto, kernel, cpu, xla"):
        choose_matmul("fast", 1, qw)


def test_without_a_compiler_auto_falls_back_to_xla(rng, monkeypatch):
    x, qw = make(rng, 2, 576, 64, 128, 4, "bfloat16")
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    monkeypatch.setattr(cpu, "cache_dir", lambda: Path("/nonexistent-any4-test"))
    cpu.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU LUT kernel is not available.*no C\\+\\+ compiler"):
            assert not cpu.available()
        assert choose_matmul("auto", 2, qw) == "fused"
        close(qmatmul(x, qw), reference(x, qw))
        with pytest.raises(RuntimeError, match="could not be built.*path='xla'"):
            qmatmul(x, qw, path="cpu")
    finally:
        monkeypatch.undo()
        cpu.available.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu.ENV_OFF, "0")
    cpu.available.cache_clear()
    try:
        assert not cpu.available()
    finally:
        monkeypatch.undo()
        cpu.available.cache_clear()


@needs_kernel
def test_build_is_cached():
    first = cpu.build()
    mtime = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == mtime
    assert not [p for p in first.parent.iterdir() if p.name.startswith("tmp")]  # no half-built leftovers


@needs_kernel
def test_real_model_decode_step_cpu_kernel_vs_xla(smollm2_any4):
    """SmolLM2 any4: logits of a prompt and of one decode step through the kernel
    equal those through XLA (float32 sums in another order)."""
    from any4_jax.generation import decode_step
    from any4_jax.models import init_cache
    logits = {}
    for path in ("cpu", "xla"):
        model, params, tok = load_model(smollm2_any4, matmul=path)
        ids = jnp.asarray([tok("The capital of France is")["input_ids"]], jnp.int32)
        prompt_logits = model.apply({"params": params}, ids)
        cache = init_cache(model.config, 1, 64)
        n = ids.shape[1]
        _, cache = model.apply({"params": params}, ids, None, jnp.arange(n)[None], cache=cache)
        step, _ = decode_step(model, params, ids[:, -1], jnp.asarray([n]), cache)
        logits[path] = np.asarray(prompt_logits[0, -1]), np.asarray(step[0])
    for ours, xla in zip(logits["cpu"], logits["xla"]):
        np.testing.assert_allclose(ours, xla, rtol=0, atol=1e-3 * np.abs(xla).max())
        assert ours.argmax() == xla.argmax()


@needs_kernel
def test_concurrent_kernel_calls_do_not_deadlock():
    """XLA may run independent calls on every pool thread at once; each call
    splits its rows over the pool. Run in a subprocess so that a hang fails."""
    script = """
import jax, jax.numpy as jnp, numpy as np
from any4_jax import quantize_tensor
from any4_jax.layers import qmatmul
rng = np.random.default_rng(0)
ws = [quantize_tensor(rng.standard_normal((2048, 1024)).astype(np.float32), "any4", 128, n_init=1) for _ in range(6)]
x = jnp.asarray(rng.standard_normal((32, 1024)), jnp.float32)
def body(i, x):  # inside a loop, as in decoding: XLA runs the body's thunks on its pool
    return x + 1e-3 * jnp.tanh(sum(qmatmul(x, w, path="cpu")[:, :1024] for w in ws))
f = jax.jit(lambda x, ws: jax.lax.fori_loop(0, 20, body, x))
for _ in range(3):
    f(x, ws).block_until_ready()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
