"""Fill pallas_kernels/tuned_blocks.json: the fastest block configuration per shape, on a GPU.

    python benchmarks/tune_lut_matmul.py [--m 1 4 16] [--budget-s 240]

For each (M, K -> N) of the benchmark shapes (G = 128, 4-bit) and each lookup
strategy, times a small grid of block_n / block_k / split_k / num_warps /
num_stages and keeps the fastest that matches the reference. Merges into the
existing table; stops trying new shapes when the time budget is spent.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.matmul_bench import SHAPES, quantized, timed
from pallas_kernels import lut_matmul as lm

TUNED_FILE = Path(lm.__file__).with_name("tuned_blocks.json")  # the package's own table


def candidates(m):
    if m <= lm.DECODE_MAX_M:
        for bn, bk, split, warps, stages in itertools.product((16, 32, 64, 128), (64, 128), (1, 2, 4, 8, 16),
                                                              (2, 4, 8), (2, 3)):
            yield dict(block_n=bn, block_k=bk, split_k=split, block_m=1, num_warps=warps, num_stages=stages)
    else:
        for bm, bn, bk, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (32, 64, 128), (4, 8), (2, 3)):
            yield dict(block_n=bn, block_k=bk, split_k=1, block_m=bm, num_warps=warps, num_stages=stages)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--budget-s", type=float, default=240)
    p.add_argument("--max-candidates", type=int, default=40, help="random sample of the grid per shape")
    args = p.parse_args()
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("tuning needs a GPU")
    table = dict(lm.tuned_blocks())
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    key = jax.random.PRNGKey(0)
    for (k, n), m, strategy in itertools.product(SHAPES, args.m, lm.STRATEGIES):
        if time.perf_counter() - start > args.budget_s:
            print("time budget spent; stopping")
            break
        codes, lut, scales, zeros = quantized(key, n, k, "any4")
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        ref = np.asarray(lm.lut_matmul_reference(x, codes, lut, scales, zeros, k=k, group_size=128), np.float32)
        grid = list(candidates(m))
        best = None
        for i in rng.permutation(len(grid))[: args.max_candidates]:
            cfg = grid[i]
            try:
                f = jax.jit(lambda *a, cfg=cfg: lm.lut_matmul(*a, k=k, group_size=128, strategy=strategy, **cfg))
                y = np.asarray(f(x, codes, lut, scales, zeros), np.float32)
                if np.abs(y - ref).max() > 2e-2 * np.abs(ref).max():
                    continue
                t = timed(f, x, codes, lut, scales, zeros, iters=20)
            except Exception as e:  # a configuration Triton cannot compile
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best:
            table[lm._tuned_key(m, n, k, 128, 4, strategy)] = best[1]
            print(f"M={m} {k}->{n} {strategy}: {best[0] * 1e6:.1f} us with {best[1]}", flush=True)
            TUNED_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
