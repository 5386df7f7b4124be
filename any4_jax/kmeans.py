"""Weighted 1-D k-means, one independent problem per row, jitted and vmapped.

The solver never sorts a row (XLA's CPU sort is the main cost of the obvious
approach, docs/design.md §4).  Instead each row is summarised by a fine histogram: ``n_bins``
equal-width bins over the row's range, each bin carrying its total weight and
its weighted mean.  The bin means are already sorted, so Lloyd's algorithm runs
on them with prefix sums and ``searchsorted`` — O(n_clusters · log n_bins) per
iteration, independent of the row length.  The k-means objective decomposes
exactly into within-bin variance (a constant) plus the objective on the bin
means, so the only approximation is that a bin goes to a single cluster; the
final step assigns every element exactly to its nearest centroid and recomputes
the centroids from the raw elements.  Because iterations are this cheap, several
k-means++ starts are affordable (``n_init``) and the best one is kept.

``n_bins=None`` sorts the row instead (every element its own point): exact
Lloyd, slower.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from any4_jax.tables import NF4_TABLE

INITS = ("k-means++", "uniform", "nf4", "random")
_DEFAULT_N_BINS = 1024
_SEED_POINTS = 256  # k-means++ runs on at most about this many (merged) points


def weighted_kmeans_1d(
    x,
    weights=None,
    n_clusters: int = 16,
    *,
    key=None,
    init: str = "k-means++",
    n_init: int = 3,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_bins: int | None = _DEFAULT_N_BINS,
    chunk_rows: int = 128,
    mesh=None,
):
    """Weighted k-means on each row of ``x`` independently.

    Args:
      x: ``(R, K)`` float array, one 1-D problem per row.
      weights: ``(R, K)`` non-negative element weights, or ``None`` for all ones.
        A row whose weights sum to zero is solved with uniform weights.
      n_clusters: number of centroids per row (at most 256).
      key: ``jax.random`` key; the result is a deterministic function of it
        (and does not depend on ``chunk_rows``). Defaults to ``PRNGKey(0)``.
      init: ``"k-means++"`` (weighted, greedy, as scikit-learn), ``"uniform"``
        (evenly spaced over the row's range), ``"nf4"`` (NF4-shaped over the
        range) or ``"random"`` (distinct elements drawn with probability
        proportional to weight).
      n_init: number of starts; the one with the lowest objective is kept.
        Deterministic inits ignore it.
      max_iter, tol: Lloyd stops after ``max_iter`` iterations or when the
        squared centroid shift is ``<= tol * var(row)`` (scikit-learn's rule).
      n_bins: histogram resolution (see module docstring); ``None`` = exact,
        sort-based points.
      chunk_rows: rows processed per compiled call (per device); bounds memory.
      mesh: a ``jax.sharding.Mesh``: rows are spread over all its devices
        (each row's problem is independent; the result equals one device's).

    Returns:
      ``(centroids (R, n_clusters) float32, ascending per row,
         labels (R, K) uint8)``.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows, K); got shape {x.shape}")
    w = jnp.ones_like(x) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != x.shape:
        raise ValueError(f"weights shape {w.shape} must equal x shape {x.shape}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
    if not 1 <= n_clusters <= 256:
        raise ValueError(f"n_clusters must be in [1, 256] (labels are uint8); got {n_clusters}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1; got {n_init}, {max_iter}")
    if n_bins is not None and n_bins < n_clusters:
        raise ValueError(f"n_bins must be >= n_clusters ({n_clusters}) or None; got {n_bins}")
    if init in ("uniform", "nf4"):
        n_init = 1
    key = jax.random.PRNGKey(0) if key is None else key

    rows = x.shape[0]
    row_keys = jax.random.split(key, max(rows, 1))
    devices = 1 if mesh is None else mesh.size
    chunk = max(1, min(chunk_rows, -(-rows // devices))) * devices
    place = (lambda a: a) if mesh is None else functools.partial(
        jax.device_put, device=NamedSharding(mesh, P(tuple(mesh.axis_names), None)))
    solve = functools.partial(
        _solve_chunk, n_clusters=n_clusters, init=init, n_init=n_init,
        max_iter=max_iter, tol=tol, n_bins=n_bins)
    starts = list(range(0, rows, chunk))

    def run(start):
        stop = min(start + chunk, rows)
        pad = chunk - (stop - start)  # the last chunk is padded so shapes stay static
        xs, ws, ks = (place(jnp.pad(a[start:stop], [(0, pad)] + [(0, 0)] * (a.ndim - 1)))
                      for a in (x, w, row_keys))
        c, l = jax.block_until_ready(solve(xs, ws, ks))
        return c[: stop - start], l[: stop - start]

    # On the CPU one calling thread keeps about one core busy with these small
    # programs (2 threads on 2 cores: 1.3x on SmolLM2-135M), so chunks go to one
    # thread per core, the first alone so that it compiles once. Chunks are
    # independent: the result does not change.
    results = [run(starts[0])] if starts else []
    pool = ThreadPoolExecutor(_workers(mesh))
    try:
        results += pool.map(run, starts[1:])
    finally:  # an interrupt: the chunks not yet started never start
        pool.shutdown(cancel_futures=True)
    centroids, labels = [c for c, _ in results], [l for _, l in results]
    if not centroids:
        return jnp.zeros((0, n_clusters), jnp.float32), jnp.zeros(x.shape, jnp.uint8)
    centroids, labels = jnp.concatenate(centroids), jnp.concatenate(labels)
    if mesh is not None:  # hand the result back where the input lives
        home = x.sharding
        centroids, labels = jax.device_put(centroids, home), jax.device_put(labels, home)
    return centroids, labels


def _workers(mesh) -> int:
    """Threads that feed chunks: one per CPU core on the CPU, else one."""
    if mesh is not None or jax.default_backend() != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def kmeans_objective(x, weights, centroids, labels):
    """``sum_k w[r, k] * (x[r, k] - centroids[r, labels[r, k]])**2`` per row, in float64 numpy."""
    x, w, c = (np.asarray(a, np.float64) for a in (x, weights, centroids))
    fit = np.take_along_axis(c, np.asarray(labels, np.int64), axis=1)
    return (w * (x - fit) ** 2).sum(axis=1)


# ---------------------------------------------------------------------------
# The per-row solver.  Everything below works on ONE row; `_solve_chunk` vmaps.

@functools.partial(jax.jit, static_argnames=("n_clusters", "init", "n_init", "max_iter", "tol", "n_bins"))
def _solve_chunk(x, w, keys, *, n_clusters, init, n_init, max_iter, tol, n_bins):
    row = functools.partial(_solve_row, n_clusters=n_clusters, init=init, n_init=n_init,
                            max_iter=max_iter, tol=tol, n_bins=n_bins)
    return jax.vmap(row)(x, w, keys)


def _solve_row(x, w, key, *, n_clusters, init, n_init, max_iter, tol, n_bins):
    w = jnp.where(w.sum() > 0, w, jnp.ones_like(w))  # zero total weight: fall back to uniform
    points, pw = _summarise(x, w, n_bins)
    tol_abs = tol * jnp.var(x)

    def one_start(k):
        c0 = _init_centroids(points, pw, x, k, n_clusters, init)
        c = _lloyd(points, pw, c0, max_iter, tol_abs)
        return c, _binned_objective(points, pw, c)

    cs, objs = jax.vmap(one_start)(jax.random.split(key, n_init))
    return _finish(x, w, cs[jnp.argmin(objs)])


def _finish(x, w, c):
    """One exact Lloyd step on the raw elements (an empty cluster keeps its
    centroid), then labels = the nearest centroid of every element."""
    labels = _assign(x, c)
    wsum = jnp.zeros(c.shape[0], jnp.float32).at[labels].add(w)
    wxsum = jnp.zeros(c.shape[0], jnp.float32).at[labels].add(w * x)
    c = jnp.sort(jnp.where(wsum > 0, wxsum / jnp.where(wsum > 0, wsum, 1.0), c))
    return c, _assign(x, c).astype(jnp.uint8)


def _summarise(x, w, n_bins):
    """Sorted points and their weights: histogram bins, or the sorted row."""
    if n_bins is None:
        order = jnp.argsort(x)
        return x[order], w[order]
    lo, hi = x.min(), x.max()
    width = jnp.maximum(hi - lo, 1e-30) / n_bins
    idx = jnp.clip(((x - lo) / width).astype(jnp.int32), 0, n_bins - 1)
    pw = jnp.zeros(n_bins, jnp.float32).at[idx].add(w)
    pwx = jnp.zeros(n_bins, jnp.float32).at[idx].add(w * (x - lo))
    centers = (jnp.arange(n_bins, dtype=jnp.float32) + 0.5) * width
    means = jnp.where(pw > 0, pwx / jnp.where(pw > 0, pw, 1.0), centers)
    # A mean can drift past a bin edge by a rounding error; keep points sorted.
    means = jnp.clip(means, jnp.arange(n_bins) * width, (jnp.arange(n_bins) + 1) * width)
    return lo + means, pw


def _midpoints(c):
    return 0.5 * (c[1:] + c[:-1])


def _assign(x, c):
    """Index of the nearest centroid (c ascending) = number of midpoints below x."""
    return jnp.sum(x[:, None] > _midpoints(c)[None, :], axis=1)


def _lloyd(points, pw, c0, max_iter, tol_abs):
    """Lloyd on sorted weighted points using prefix sums; centroids stay ascending."""
    cw = jnp.concatenate([jnp.zeros(1), jnp.cumsum(pw)])
    cwx = jnp.concatenate([jnp.zeros(1), jnp.cumsum(pw * (points - points[0]))])
    n = points.shape[0]

    def update(c):
        edges = jnp.searchsorted(points, _midpoints(c), side="right")
        bounds = jnp.concatenate([jnp.zeros(1, edges.dtype), edges, jnp.full(1, n, edges.dtype)])
        wsum = cw[bounds[1:]] - cw[bounds[:-1]]
        wxsum = cwx[bounds[1:]] - cwx[bounds[:-1]]
        new = jnp.where(wsum > 0, points[0] + wxsum / jnp.where(wsum > 0, wsum, 1.0), c)
        return jnp.sort(new)

    def cond(state):
        i, _, shift = state
        return (i < max_iter) & (shift > tol_abs)

    def body(state):
        i, c, _ = state
        new = update(c)
        return i + 1, new, jnp.sum((new - c) ** 2)

    _, c, _ = jax.lax.while_loop(cond, body, (0, c0, jnp.inf))
    return c


def _binned_objective(points, pw, c):
    fit = c[_assign(points, c)]
    return jnp.sum(pw * (points - fit) ** 2)




def _init_centroids(points, pw, x, key, n_clusters, init):
    lo, hi = x.min(), x.max()
    if init == "uniform":
        return lo + (hi - lo) * jnp.linspace(0.0, 1.0, n_clusters)
    if init == "nf4":
        shape = np.interp(np.linspace(0, 15, n_clusters), np.arange(16), NF4_TABLE)
        return lo + (hi - lo) * (jnp.asarray(shape, jnp.float32) + 1) / 2
    if init == "random":
        # Distinct points, drawn with probability proportional to weight (Gumbel top-k).
        g = jax.random.gumbel(key, pw.shape) + jnp.log(jnp.maximum(pw, 1e-30))
        g = jnp.where(pw > 0, g, -jnp.inf)
        _, idx = jax.lax.top_k(g, n_clusters)
        return jnp.sort(points[idx])
    # Seeding only needs a rough picture of the row: coarsen the points first.
    factor = max(1, points.shape[0] // max(_SEED_POINTS, n_clusters))
    if factor > 1:
        n = points.shape[0] // factor * factor
        cw = pw[:n].reshape(-1, factor).sum(1)
        cx = (pw[:n] * points[:n]).reshape(-1, factor).sum(1)
        points = jnp.where(cw > 0, cx / jnp.where(cw > 0, cw, 1.0), points[:n].reshape(-1, factor)[:, 0])
        pw = cw
    return jnp.sort(_kmeans_plus_plus(points, pw, key, n_clusters))


def _kmeans_plus_plus(points, pw, key, n_clusters):
    """Greedy weighted k-means++ (scikit-learn's variant): 2 + log(k) candidates a step,
    each drawn by inverse-CDF sampling (far cheaper than `random.categorical`)."""
    trials = 2 + int(math.log(n_clusters))
    k0, key = jax.random.split(key)

    def sample(k, prob, n):
        cdf = jnp.cumsum(prob)
        u = jax.random.uniform(k, (n,)) * cdf[-1]
        return jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, points.shape[0] - 1)

    first = points[sample(k0, pw, 1)[0]]
    d2 = (points - first) ** 2
    centers = jnp.full(n_clusters, first)

    def step(j, state):
        centers, d2 = state
        cand = points[sample(jax.random.fold_in(key, j), pw * d2, trials)]
        new_d2 = jnp.minimum(d2[None, :], (points[None, :] - cand[:, None]) ** 2)
        best = jnp.argmin(jnp.sum(pw[None, :] * new_d2, axis=1))
        return centers.at[j].set(cand[best]), new_d2[best]

    centers, _ = jax.lax.fori_loop(1, n_clusters, step, (centers, d2))
    return centers


# ---------------------------------------------------------------------------
# The exact optimum, as a yardstick for Lloyd (benchmarks/kmeans_bench.py).

@functools.partial(jax.jit, static_argnames="n_bins")
def histogram_points(x, w, n_bins: int = _DEFAULT_N_BINS):
    """Each row of ``x (R, K)`` as the solver sees it: ``(points, weights)``,
    ``(R, n_bins)``, the weighted means and total weights of its histogram bins."""
    return jax.vmap(lambda a, b: _summarise(a, b, n_bins))(x, w)


@jax.jit
def finish(x, w, centroids):
    """``weighted_kmeans_1d``'s last step for centroids found elsewhere: one exact
    Lloyd step on each row's raw elements, then ``(centroids, labels)``."""
    return jax.vmap(_finish)(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                             jnp.asarray(centroids, jnp.float32))


def exact_kmeans_1d(points, weights, n_clusters: int):
    """The exact weighted k-means of each row of sorted 1-D ``points`` (float64 numpy).

    In one dimension an optimal clustering splits the sorted points into
    contiguous runs, so dynamic programming over the split points finds it:
    ``D[j, i]`` (the least cost of the first ``i`` points in ``j`` clusters) is
    ``min_m D[j-1, m] + cost(m, i)``, with ``cost`` from prefix sums. Dense, this
    is O(n_clusters · B²) a row for B points (divide and conquer over the
    monotone split points would make it O(n_clusters · B log B), still far more
    work than Lloyd's few binary searches an iteration): a reference for
    histograms (``B`` = the bins), not a solver for whole models.

    Args:
      points: ``(R, B)`` ascending per row. weights: ``(R, B)`` non-negative.
    Returns:
      ``(centroids (R, n_clusters) ascending, objective (R,))``; a cluster left
      empty (fewer distinct points than clusters) repeats its neighbour.
    """
    p, w = np.asarray(points, np.float64), np.asarray(weights, np.float64)
    if p.ndim != 2 or p.shape != w.shape:
        raise ValueError(f"points and weights must be equal (R, B) arrays; got {p.shape} and {w.shape}")
    block = 8  # rows at a time: the cost matrices take 8 (B+1)² bytes a row
    if p.shape[0] > block:
        parts = [_exact_rows(p[i:i + block], w[i:i + block], n_clusters) for i in range(0, p.shape[0], block)]
        return np.concatenate([c for c, _ in parts]), np.concatenate([o for _, o in parts])
    return _exact_rows(p, w, n_clusters)


def _exact_rows(p, w, n_clusters):
    r, b = p.shape
    mean = (w * p).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1e-300)
    p = p - mean  # centred: the prefix sums stay exact
    zero = np.zeros((r, 1))
    cw, cx, cxx = (np.concatenate([zero, np.cumsum(a, axis=1)], axis=1) for a in (w, w * p, w * p * p))
    sw = cw[:, None, :] - cw[:, :, None]  # [m, i]: points m .. i-1
    sx = cx[:, None, :] - cx[:, :, None]
    cost = cxx[:, None, :] - cxx[:, :, None] - sx ** 2 / np.where(sw > 0, sw, 1.0)
    upper = np.triu(np.ones((b + 1, b + 1), bool))  # m <= i; m == i is an empty cluster
    cost = np.where(upper, np.maximum(cost, 0.0), np.inf)
    best, splits = cost[:, 0, :], []  # one cluster over the first i points
    for _ in range(n_clusters - 1):
        total = best[:, :, None] + cost
        splits.append(total.argmin(axis=1))
        best = np.take_along_axis(total, splits[-1][:, None, :], axis=1)[:, 0, :]
    # Walk the split points back from i = B.
    bounds = np.zeros((r, n_clusters + 1), np.int64)
    bounds[:, -1] = b
    for j in range(n_clusters - 1, 0, -1):
        bounds[:, j] = np.take_along_axis(splits[j - 1], bounds[:, j + 1:j + 2], axis=1)[:, 0]
    rows = np.arange(r)[:, None]
    sw = cw[rows, bounds[:, 1:]] - cw[rows, bounds[:, :-1]]
    sx = cx[rows, bounds[:, 1:]] - cx[rows, bounds[:, :-1]]
    means = np.where(sw > 0, sx / np.where(sw > 0, sw, 1.0), np.nan) + mean
    for j in range(1, n_clusters):  # empty clusters: repeat the one before
        means[:, j] = np.where(np.isnan(means[:, j]), means[:, j - 1], means[:, j])
    for j in range(n_clusters - 2, -1, -1):
        means[:, j] = np.where(np.isnan(means[:, j]), means[:, j + 1], means[:, j])
    return means, best[:, -1]
