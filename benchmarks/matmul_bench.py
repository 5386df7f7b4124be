"""Quantized matmul speed on a GPU: the Pallas LUT kernel vs bf16 and vs the library's XLA path.

    python -m benchmarks.matmul_bench [--m 1 16 64] [--shapes 4096x4096 ...] [--out FILE.md] [--quick]

Shapes (K -> N): 4096->4096, 8192->8192, Llama-3-8B's 4096->14336 and 14336->4096,
and Llama-3-70B's 8192->28672 and 28672->8192; any4 and int4 weights at G = 128
with bf16 LUT/scales/zeros (the default storage). Columns: bf16 ``jnp.dot``
(XLA / cuBLAS), ``qmatmul(path="xla")`` (the library's XLA path: dequantize +
dot) and ``qmatmul(path="kernel")`` with each lookup strategy. Each time is one
call's share of ``--iters`` calls run inside one jitted loop (a host sync per
call would hide a ~15 us kernel), the median of 3 such runs. Speedup is over bf16
measured in the same run; GB/s counts the bytes a call must move (weights,
metadata, x, y). Every output is compared with ``lut_matmul_reference`` before
it is timed: a wrong one is reported instead of a time, and the command then
exits with status 1. The table is rewritten after every row, so a run cut short
keeps what it measured. Without a GPU the kernel columns say so.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import quantize_tensor
from any4_jax.layers import qmatmul
from pallas_kernels.lut_matmul import STRATEGIES, TOLERANCE, lut_matmul_reference

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # SXM HBM peaks, GB/s


def peak_bandwidth(kind: str) -> float | None:
    return next((gbs for name, gbs in PEAK_GBS.items() if name in kind), None)


def per_call_seconds(f, x, *weights, iters: int) -> float:
    """One call's share of ``iters`` calls inside one jitted loop (each call sees a
    different x, so nothing is hoisted), median of 3 runs after a warm-up."""
    @jax.jit
    def many(x, *weights):
        def body(i, acc):
            y = f(x + i.astype(x.dtype) * 1e-3, *weights)
            return acc + y[0, 0].astype(jnp.float32)
        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

    jax.block_until_ready(many(x, *weights))
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(many(x, *weights))
        runs.append((time.perf_counter() - t) / iters)
    return float(np.median(runs))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--formats", nargs="+", default=["any4", "int4"])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--shapes", nargs="+", default=None, metavar="KxN", help="shapes K x N (default: all of SHAPES)")
    p.add_argument("--quick", action="store_true", help="one small shape, few iterations (a smoke run)")
    p.add_argument("--out", default=None, help="write the table to this markdown file (after every row)")
    args = p.parse_args()
    shapes = [(1024, 1024)] if args.quick else SHAPES if not args.shapes else [
        tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    iters = 5 if args.quick else args.iters

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    kind = getattr(device, "device_kind", device.platform)
    peak = peak_bandwidth(kind) if on_gpu else None
    lines = [f"Written by `python -m benchmarks.matmul_bench {' '.join(sys.argv[1:])}` on {kind} "
             f"({device.platform}); jax {jax.__version__}; host {platform.node()}.",
             f"Peak HBM bandwidth used for %: {peak or 'unknown'} GB/s. Per-call times: {iters} calls in one "
             "jitted loop, median of 3 runs.", "",
             "| fmt | M | K -> N | bf16 dot us | XLA path us (x) | "
             + " | ".join(f"kernel {s} us (x, GB/s, %peak)" for s in STRATEGIES) + " |",
             "|---|---|---|---|---|" + "---|" * len(STRATEGIES)]

    def write():
        print(lines[-1], flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")

    write()
    wrong = 0
    rng = np.random.default_rng(0)
    for fmt in args.formats:
        for k, n in shapes:
            w = (rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32)
            qw = quantize_tensor(w, fmt, 128, n_init=1)  # bf16 metadata: the default storage
            w_bf16 = jnp.asarray(w, jnp.bfloat16)
            for m in args.m:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                io = 2 * (m * k + m * n)
                t_bf16 = per_call_seconds(lambda x, w: jnp.dot(x, w.T), x, w_bf16, iters=iters)
                t_xla = per_call_seconds(lambda x, q: qmatmul(x, q, path="xla"), x, qw, iters=iters)
                cells = [f"{t_bf16 * 1e6:.1f}", f"{t_xla * 1e6:.1f} ({t_bf16 / t_xla:.2f}x)"]
                ref = np.asarray(lut_matmul_reference(x, qw.codes, qw.lut, qw.scales, qw.zeros, k=k, group_size=128),
                                 np.float32)
                for strategy in STRATEGIES:
                    if not on_gpu:
                        cells.append("n/a (no GPU)")
                        continue
                    y = np.asarray(jax.jit(lambda x, q, s=strategy: qmatmul(x, q, path="kernel", strategy=s))(x, qw),
                                   np.float32)
                    error = float(np.abs(y - ref).max()) if np.isfinite(y).all() else float("inf")
                    if error > TOLERANCE["bfloat16"] * float(np.abs(ref).max()):
                        wrong += 1
                        cells.append(f"WRONG: max error {error:.3g} of max |y| {float(np.abs(ref).max()):.3g}")
                        continue
                    t = per_call_seconds(lambda x, q, s=strategy: qmatmul(x, q, path="kernel", strategy=s), x, qw,
                                         iters=iters)
                    gbs = (qw.nbytes + io) / t / 1e9
                    pct = f"{100 * gbs / peak:.0f}%" if peak else "?"
                    cells.append(f"{t * 1e6:.1f} ({t_bf16 / t:.2f}x, {gbs:.0f}, {pct})")
                lines.append(f"| {fmt} | {m} | {k} -> {n} | " + " | ".join(cells) + " |")
                write()
    if wrong:
        print(f"{wrong} kernel output(s) differ from the reference", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
