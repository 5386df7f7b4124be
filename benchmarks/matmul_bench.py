"""Batch-1 decode matmul speed: the Pallas LUT kernel vs bf16 and vs XLA dequantize+dot.

    python benchmarks/matmul_bench.py [--m 1 4 16] [--out FILE.md] [--quick]

Shapes (K -> N): 4096->4096, 8192->8192 and Llama-3-8B's 4096->14336,
14336->4096, 4096->6144; formats any4 and int4 (G = 128, bf16 LUT/scales/zeros
as the kernel would serve them). Columns: bf16 ``jnp.dot`` (XLA / cuBLAS), XLA
dequantize + dot, the kernel with each lookup strategy. Speedup is over bf16
measured in the same run; GB/s counts the bytes each method must read (weights,
metadata, x) and write (y), against the GPU's peak HBM bandwidth.
Without a GPU the kernel columns are skipped (interpret mode measures nothing).
"""

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lut_matmul import STRATEGIES, lut_matmul

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096), (4096, 6144)]
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # SXM HBM peaks, GB/s


def peak_bandwidth(kind: str) -> float | None:
    for name, gbs in PEAK_GBS.items():
        if name in kind:
            return gbs
    return None


def timed(f, *args, iters=50):
    jax.block_until_ready(f(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def quantized(key, n, k, fmt, group_size=128):
    """Random codes with the format's LUT (speed does not depend on the values)."""
    k1, k2, k3 = jax.random.split(key, 3)
    codes = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    if fmt == "int4":
        lut = jnp.broadcast_to(jnp.arange(16, dtype=jnp.bfloat16), (n, 16))
    else:
        lut = jnp.sort(jax.random.normal(k2, (n, 16)), axis=1).astype(jnp.bfloat16)
    scales = (jax.random.uniform(k3, (n, k // group_size)) * 0.01).astype(jnp.bfloat16)
    zeros = (-8 * scales).astype(jnp.bfloat16)
    return codes, lut, scales, zeros


def dequant_dot(x, codes, lut, scales, zeros, group_size=128):
    n = codes.shape[0]
    unpacked = jnp.stack([codes & 0xF, codes >> 4], -1).reshape(n, -1).astype(jnp.int32)
    w = jnp.take_along_axis(lut, unpacked, axis=1).reshape(n, -1, group_size)
    w = (w * scales[..., None] + zeros[..., None]).reshape(n, -1).astype(x.dtype)
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--formats", nargs="+", default=["any4", "int4"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="one small shape, few iterations (a smoke run)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    shapes = [(1024, 1024)] if args.quick else SHAPES
    iters = 3 if args.quick else args.iters

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    kind = getattr(device, "device_kind", device.platform)
    peak = peak_bandwidth(kind) if on_gpu else None
    lines = [f"Device: {kind} ({device.platform}); jax {jax.__version__}; host {platform.node()}",
             f"Peak HBM bandwidth used for %: {peak or 'unknown'} GB/s. Times are medians of {iters} runs.", "",
             "| fmt | M | K -> N | bf16 dot us | XLA deq+dot us (x) | "
             + " | ".join(f"kernel {s} us (x, GB/s, %peak)" for s in STRATEGIES) + " |",
             "|---|---|---|---|---|" + "---|" * len(STRATEGIES)]
    print("\n".join(lines), flush=True)
    key = jax.random.PRNGKey(0)
    for fmt in args.formats:
        for k, n in shapes:
            codes, lut, scales, zeros = quantized(key, n, k, fmt)
            w_bf16 = jax.random.normal(key, (n, k), jnp.bfloat16)
            q_bytes = codes.size + 2 * (lut.size + scales.size + zeros.size)
            for m in args.m:
                x = jax.random.normal(key, (m, k), jnp.bfloat16)
                io = 2 * (m * k + m * n)
                t_bf16 = timed(jax.jit(lambda x, w: jnp.dot(x, w.T)), x, w_bf16, iters=iters)
                t_xla = timed(jax.jit(dequant_dot), x, codes, lut, scales, zeros, iters=iters)
                cells = [f"{t_bf16 * 1e6:.1f}", f"{t_xla * 1e6:.1f} ({t_bf16 / t_xla:.2f}x)"]
                for strategy in STRATEGIES:
                    if not on_gpu:
                        cells.append("n/a (no GPU)")
                        continue
                    f = jax.jit(lambda x, c, l, s, z, st=strategy: lut_matmul(x, c, l, s, z, k=k, group_size=128,
                                                                              strategy=st))
                    t = timed(f, x, codes, lut, scales, zeros, iters=iters)
                    gbs = (q_bytes + io) / t / 1e9
                    pct = f"{100 * gbs / peak:.0f}%" if peak else "?"
                    cells.append(f"{t * 1e6:.1f} ({t_bf16 / t:.2f}x, {gbs:.0f}, {pct})")
                lines.append(f"| {fmt} | {m} | {k} -> {n} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
