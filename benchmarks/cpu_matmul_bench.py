"""The quantized matmul paths on this machine's CPU: which one to use for which M.

    python -m benchmarks.cpu_matmul_bench [--m 1 4 8 16 64 256] [--runs 5] [--out benchmarks/results/cpu_matmul.md]

For each shape (K -> N: 4096 -> 4096, and SmolLM2-135M's 576 -> 1536 and
1536 -> 576) and each M, one call's time of: float32 ``jnp.dot`` (the float
model's layer), bf16 ``jnp.dot``, and the paths of ``qmatmul`` on any4 weights
(G = 128, bf16 metadata): the C++ CPU kernel (``pallas_kernels.cpu``; its
``-march=native`` build and its plain loop, built for the machine's baseline
instruction set as a CPU without AVX2 runs it), and XLA's ``dequantize_matmul``
(W rebuilt, then ``dot``) and ``fused_matmul`` (one reduction over the codes, no W). Layers are
distinct weights (enough of them that the float32 ones do not fit in the
caches, as in a model), chained inside one ``jit`` so that nothing is hoisted;
median of ``--runs`` runs. Ratios are float32 time / path time (above 1 =
faster than float32), measured in the same run. ``layers.CPU_KERNEL_MAX_M``,
``PLAIN_KERNEL_MAX_M`` and ``FUSED_MAX_M`` are set from this table. The markdown file is rewritten after every row.
"""

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import quantize_tensor
from any4_jax.layers import CPU_KERNEL_MAX_M, FUSED_MAX_M, PLAIN_KERNEL_MAX_M, dequantize_matmul, fused_matmul
from pallas_kernels import cpu

SHAPES = [(4096, 4096, 4), (576, 1536, 32), (1536, 576, 32)]  # K, N, layers
PLAIN_TARGET = "any4_cpu_lut_gemv_plain"
PATHS = {
    "float32 dot": lambda x, w: jnp.dot(x, w),
    "bf16 dot": lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32),
    "CPU kernel": lambda x, q: cpu.lut_gemv(x, q.codes, q.lut, q.scales, q.zeros, group_size=q.group_size),
    "CPU kernel, plain loop": lambda x, q: cpu.lut_gemv(x, q.codes, q.lut, q.scales, q.zeros,
                                                        group_size=q.group_size, target=PLAIN_TARGET),
    "XLA dequantize + dot": dequantize_matmul,
    "XLA fused": fused_matmul,
}


def per_layer_seconds(f, x, weights, runs: int) -> float:
    @jax.jit
    def chain(x, weights):
        acc = jnp.zeros((x.shape[0], 1), jnp.float32)
        for w in weights:  # each layer's input depends on the previous output
            acc = acc + f(x + acc * 1e-30, w)[:, :1]
        return acc

    jax.block_until_ready(chain(x, weights))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(chain(x, weights))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / len(weights)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 8, 16, 64, 256])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/cpu_matmul.md")
    args = p.parse_args()
    if not cpu.available():
        raise SystemExit("the CPU kernel could not be built; see the warning")
    plain = cpu.isa_of(cpu.register(cpu.plain_flags(), PLAIN_TARGET))
    device = jax.devices()[0]
    lines = [f"Written by `python -m benchmarks.cpu_matmul_bench --m {' '.join(map(str, args.m))} --runs {args.runs}` "
             f"on {platform.machine()} {device.platform} with {os.cpu_count()} cores, jax {jax.__version__}. Per-layer ms, median of {args.runs} runs; (x) = float32 time / "
             f"this time. The CPU kernel: its {cpu.isa()} build (`-march=native`); its plain loop: built with "
             f"`{' '.join(cpu.plain_flags())}` ({plain}). When written: `CPU_KERNEL_MAX_M` = {CPU_KERNEL_MAX_M}, "
             f"`PLAIN_KERNEL_MAX_M` = {PLAIN_KERNEL_MAX_M}, `FUSED_MAX_M` = {FUSED_MAX_M}.", "",
             "| K -> N | M | " + " | ".join(PATHS) + " |", "|---|---|" + "---|" * len(PATHS)]

    def write():
        print(lines[-1], flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")

    write()
    rng = np.random.default_rng(0)
    for k, n, layers in SHAPES:
        ws = [(rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32) for _ in range(layers)]
        weights = {"float32 dot": [jnp.asarray(w.T) for w in ws],
                   "bf16 dot": [jnp.asarray(w.T, jnp.bfloat16) for w in ws],
                   "CPU kernel": [quantize_tensor(w, "any4", 128, n_init=1) for w in ws]}
        for name in ("CPU kernel, plain loop", "XLA dequantize + dot", "XLA fused"):
            weights[name] = weights["CPU kernel"]
        for m in args.m:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            t = {name: per_layer_seconds(f, x, weights[name], args.runs) for name, f in PATHS.items()
                 if not (name == "XLA fused" and m > 64)}  # minutes, and never chosen there
            base = t["float32 dot"]
            lines.append(f"| {k} -> {n} | {m} | " + " | ".join(
                f"{t[name] * 1e3:.3f} ({base / t[name]:.2f}x)" if name in t else "-" for name in PATHS) + " |")
            write()
        del ws, weights


if __name__ == "__main__":
    main()
