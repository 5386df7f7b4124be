"""LUT learning speed and quality: this project's k-means vs the original's approach.

    python -m benchmarks.kmeans_bench [--rows 4096] [--cols 4096] [--sklearn-rows 256] [--out FILE.md]

Data: a heavy-tailed (Student-t) weight matrix, group-scaled as docs/design.md §2
(G = 128), element weights = |activation statistic| x group scale.
Baseline: scikit-learn KMeans(16, init="k-means++", n_init=1) per row with
sample weights, rows spread over all cores with joblib (what the original
does). Its worker pool is started (and scikit-learn imported in it) before the
clock starts; it runs on the first --sklearn-rows rows and is extrapolated to
the whole matrix (labelled as such); objective ratios are taken on those rows.
Speedups are given for the steady state and with the one-off compile time that
a single quantization pays. The markdown table also goes to --out.

Solvers: scikit-learn (Lloyd on the raw elements, the baseline); this
project's Lloyd on 1024-bin histograms with n_init k-means++ starts (the
default: 3); and the exact optimum of the same histograms by dynamic
programming (``kmeans.exact_kmeans_1d``, float64 numpy, run on the first
--exact-rows rows and extrapolated), followed by the same exact final step on
the raw elements as Lloyd's: it shows how much objective is left on the table.
"""

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from joblib import Parallel, delayed
from sklearn.cluster import KMeans

from any4_jax.kmeans import exact_kmeans_1d, finish, histogram_points, kmeans_objective, weighted_kmeans_1d


def make_data(rows, cols, group_size, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    act = (np.abs(rng.standard_t(3, size=cols)) + 0.01).astype(np.float32)
    g = w.reshape(rows, cols // group_size, group_size)
    mn = g.min(-1, keepdims=True)
    s = np.maximum(g.max(-1, keepdims=True) - mn, np.float32(1e-6)) / np.float32(15)
    u = ((g - mn) / s).reshape(rows, cols).astype(np.float32)
    omega = (act[None, :] * np.repeat(s[..., 0], group_size, axis=1)).astype(np.float32)
    return u, omega


def sklearn_row(u, omega, seed):
    km = KMeans(16, init="k-means++", n_init=1, random_state=seed).fit(u[:, None], sample_weight=omega)
    return km.cluster_centers_[:, 0], km.labels_


def exact_row_solver(u, omega):
    """Exact k-means of the rows' histograms, then the same last step on the raw
    elements as ``weighted_kmeans_1d``'s: centroids and labels."""
    c, _ = exact_kmeans_1d(*histogram_points(u, omega), 16)
    return finish(u, omega, c)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sklearn-rows", type=int, default=256, help="rows run by the baseline, then extrapolated")
    p.add_argument("--n-init", type=int, nargs="+", default=[1, 3], help="k-means++ starts to benchmark")
    p.add_argument("--exact-rows", type=int, default=64, help="rows run by the exact solver, then extrapolated")
    p.add_argument("--out", default="benchmarks/results/kmeans_cpu.md")
    args = p.parse_args()

    u, omega = make_data(args.rows, args.cols, args.group_size)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"matrix {args.rows}x{args.cols}, 16 centroids a row, G = {args.group_size}")

    n = min(args.sklearn_rows, args.rows)
    with Parallel(n_jobs=-1) as pool:
        pool(delayed(sklearn_row)(u[r], omega[r], r) for r in range(2 * (os.cpu_count() or 1)))  # warm the workers
        start = time.perf_counter()
        results = pool(delayed(sklearn_row)(u[r], omega[r], r) for r in range(n))
        sk_seconds = (time.perf_counter() - start) * args.rows / n
    sk_c = np.stack([c for c, _ in results])
    sk_l = np.stack([l for _, l in results])
    sk_obj = kmeans_objective(u[:n], omega[:n], sk_c, sk_l)

    rows = [(f"scikit-learn + joblib ({n} rows timed, extrapolated to {args.rows})", sk_seconds, 0.0, 1.0)]
    for n_init in args.n_init:
        run = lambda: weighted_kmeans_1d(u, omega, 16, key=jax.random.PRNGKey(0), n_init=n_init)
        start = time.perf_counter()
        jax.block_until_ready(run())
        first = time.perf_counter() - start
        start = time.perf_counter()
        c, labels = jax.block_until_ready(run())
        steady = time.perf_counter() - start
        obj = kmeans_objective(u[:n], omega[:n], np.asarray(c)[:n], np.asarray(labels)[:n])
        rows.append((f"any4-jax Lloyd, n_init={n_init}", steady, first - steady, float(np.median(obj / sk_obj))))

    m = min(args.exact_rows, n)
    start = time.perf_counter()
    c, labels = exact_row_solver(u[:m], omega[:m])
    ex_seconds = (time.perf_counter() - start) * args.rows / m
    obj = kmeans_objective(u[:m], omega[:m], c, labels)
    rows.append((f"exact DP on the histograms ({m} rows timed, extrapolated)", ex_seconds, 0.0,
                 float(np.median(obj / sk_obj[:m]))))

    lines = [f"Written by `python -m benchmarks.kmeans_bench --rows {args.rows} --cols {args.cols} --group-size "
             f"{args.group_size} --sklearn-rows {args.sklearn_rows} --exact-rows {args.exact_rows}` on {platform.machine()} with {os.cpu_count()} "
             f"cores, jax {jax.__version__}.", "",
             "| method | seconds | compile s | speedup | speedup with compile | median objective vs scikit-learn |",
             "|---|---|---|---|---|---|"]
    for name, secs, comp, ratio in rows:
        lines.append(f"| {name} | {secs:.2f} | {comp:.2f} | {sk_seconds / secs:.3g}x | "
                     f"{sk_seconds / (secs + comp):.3g}x | {ratio:.4f} |")
    print("\n" + "\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
