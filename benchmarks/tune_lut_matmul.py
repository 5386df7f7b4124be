"""Fill pallas_kernels/tuned_blocks.json: the fastest block configuration per shape, on a GPU.

    python -m benchmarks.tune_lut_matmul [--m 1 16] [--budget-s 240] [--out FILE]

For each (M, K -> N) of the benchmark shapes (any4, G = 128, default lookup),
times a sample of block_m / block_n / block_k / num_warps / num_stages and keeps
the fastest that matches the reference. Merges into the package's table and writes
the result to ``--out`` (default: the package's own ``tuned_blocks.json``); stops
trying new shapes when the time budget is spent.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import quantize_tensor
from benchmarks.matmul_bench import SHAPES, per_call_seconds
from pallas_kernels import lut_matmul as lm

TUNED_FILE = Path(lm.__file__).with_name("tuned_blocks.json")  # the package's own table


def candidates(m):
    """Block configs of the kernel: 16 rows of W a warp, block_k dividing G = 128."""
    block_ms = (16,) if m <= lm.DECODE_MAX_M else (32, 64, 128)
    for bm, warps, bk, stages in itertools.product(block_ms, (1, 2, 4, 8), (64, 128), (2, 3, 4)):
        yield dict(block_m=bm, block_n=16 * warps, block_k=bk, num_warps=warps, num_stages=stages)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16])
    p.add_argument("--budget-s", type=float, default=240)
    p.add_argument("--max-candidates", type=int, default=40, help="random sample of the grid per shape")
    p.add_argument("--out", default=str(TUNED_FILE), help="where the merged table goes")
    args = p.parse_args()
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("tuning needs a GPU")
    table = dict(lm.tuned_blocks())
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for (k, n), m in itertools.product(SHAPES, args.m):
        if time.perf_counter() - start > args.budget_s:
            print("time budget spent; stopping")
            break
        qw = quantize_tensor((rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32), "any4", 128, n_init=1)
        w = (qw.codes, qw.lut, qw.scales, qw.zeros)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        ref = np.asarray(lm.lut_matmul_reference(x, *w, k=k, group_size=128), np.float32)
        grid = list(candidates(m))
        best = None
        for i in rng.permutation(len(grid))[: args.max_candidates]:
            cfg = grid[i]
            f = lambda x, *w, cfg=cfg: lm.lut_matmul(x, *w, k=k, group_size=128, **cfg)
            try:
                y = np.asarray(jax.jit(f)(x, *w), np.float32)
                if np.abs(y - ref).max() > 2e-2 * np.abs(ref).max():
                    continue
                t = per_call_seconds(f, x, *w, iters=50)
            except Exception as e:  # a configuration Triton cannot compile
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best:
            table[lm.tuned_key(m, n, k, 128, 4)] = best[1]
            print(f"M={m} {k}->{n}: {best[0] * 1e6:.1f} us with {best[1]}", flush=True)
            Path(args.out).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
