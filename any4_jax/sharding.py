"""Beyond one device: partition rules for float and quantized models, with jax.sharding.

A mesh has two axes, ``("data", "model")``: batches split over ``data``,
weights over ``model`` (tensor parallelism, Megatron style):

* column-parallel (q/k/v/gate/up, Mixtral's w1/w3): the output features N are
  split — a float kernel ``(K, N)`` as ``P(None, "model")``; a
  ``QuantizedWeight`` (N, K) has codes, LUT, scales and zeros split by rows.
* row-parallel (o/down, Mixtral's w2): the input features K are split — a float
  kernel as ``P("model", None)``; quantized codes, scales and zeros along K with
  whole groups on each shard, the LUT (one per row) replicated. XLA adds the
  partial products (an all-reduce).
* embeddings and lm_head by vocabulary; norms and Mixtral's router replicated.
  Mixtral's experts are tensor-parallel inside each expert (every expert on
  every device), not expert-parallel.

Inference needs nothing else: ``jax.jit`` of ``model.apply`` on sharded params
lets XLA partition the rest (GSPMD). ``shard_params`` checks every layer first
and names the one whose size a mesh axis does not divide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from any4_jax.formats import QuantizedWeight

DATA, MODEL = "data", "model"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3")
ROW_PARALLEL = ("o_proj", "down_proj", "w2")


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all); ``model``
    defaults to the devices left after ``data``."""
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) // data if model is None else model
    if data * model != len(devices):
        raise ValueError(f"mesh {data} x {model} needs {data * model} devices; {len(devices)} given "
                         f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def _spec_for(path: tuple[str, ...], leaf, tp: int):
    """The PartitionSpec(s) of one parameter, or a ValueError naming it."""
    layer, name = (path[-2] if len(path) > 1 else ""), path[-1]
    where = "/".join(path)

    def need(size, what):
        if size % tp:
            raise ValueError(f"layer {where}: {what} = {size} is not divisible by the mesh's "
                             f"'{MODEL}' axis of size {tp}; choose a model-axis size that divides it")

    if isinstance(leaf, QuantizedWeight):
        n, k = leaf.shape
        if layer in ROW_PARALLEL:
            need(leaf.n_groups, "its number of groups along K")
            if k % leaf.group_size:
                raise ValueError(f"layer {where}: K = {k} is not a multiple of the group size "
                                 f"{leaf.group_size}, so its groups cannot be split evenly over {tp} shards")
            need(k // 2, "K / 2 (packed code columns)")
            split = P(None, MODEL)
            return QuantizedWeight(split, P(None, None), split, split, leaf.shape, leaf.bits,
                                   leaf.group_size, leaf.fmt)
        if layer in COLUMN_PARALLEL or layer == "lm_head":
            need(n, "its output features N")
            rows = P(MODEL, None)
            return QuantizedWeight(rows, rows, rows, rows, leaf.shape, leaf.bits, leaf.group_size, leaf.fmt)
        return QuantizedWeight(P(), P(), P(), P(), leaf.shape, leaf.bits, leaf.group_size, leaf.fmt)
    if name == "embedding":
        need(leaf.shape[0], "its vocabulary size")
        return P(MODEL, None)
    if name == "kernel":
        if layer in COLUMN_PARALLEL or layer == "lm_head":
            need(leaf.shape[1], "its output features N")
            return P(None, MODEL)
        if layer in ROW_PARALLEL:
            need(leaf.shape[0], "its input features K")
            return P(MODEL, None)
    if name == "bias" and layer in COLUMN_PARALLEL:
        need(leaf.shape[0], "its bias length")
        return P(MODEL)
    return P()


def param_specs(params, mesh: Mesh):
    """A pytree like ``params`` of ``PartitionSpec`` (``QuantizedWeight`` leaves
    become ``QuantizedWeight``s of specs)."""
    tp = mesh.shape[MODEL]
    is_q = lambda x: isinstance(x, QuantizedWeight)

    def spec(path, leaf):
        keys = tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)
        return _spec_for(keys, leaf, tp)

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=is_q)


def shardings(params, mesh: Mesh):
    """``NamedSharding``s for ``params`` (same structure, leaf for leaf)."""
    specs = param_specs(params, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh):
    """Place ``params`` on ``mesh`` by the partition rules (checked first)."""
    return jax.device_put(params, shardings(params, mesh))


def shard_batch(x, mesh: Mesh):
    """Split a ``(B, ...)`` batch over the mesh's data axis."""
    return jax.device_put(x, NamedSharding(mesh, P(DATA, *([None] * (np.ndim(x) - 1)))))


def per_shard_qmatmul(x, qw: QuantizedWeight, mesh: Mesh, parallel: str):
    """``qmatmul`` on the Pallas kernel, run on each shard with ``shard_map``
    (a custom kernel is opaque to XLA's partitioner, which would gather whole
    weights to every device). ``parallel``: ``"column"`` (rows of W split; the
    output comes out split along N) or ``"row"`` (K split; the partial products
    are summed with ``psum``). The batch dimension is split over ``data`` when
    it divides."""
    from any4_jax.layers import qmatmul

    n, k = qw.shape
    tp = mesh.shape[MODEL]
    batch = DATA if x.shape[0] % mesh.shape[DATA] == 0 else None
    middle = (None,) * (x.ndim - 2)
    if parallel == "column":
        x_spec, w_spec, lut_spec = P(batch, *middle, None), P(MODEL, None), P(MODEL, None)
        out_spec, local_shape = P(batch, *middle, MODEL), (n // tp, k)
    elif parallel == "row":
        x_spec, w_spec, lut_spec = P(batch, *middle, MODEL), P(None, MODEL), P(None, None)
        out_spec, local_shape = P(batch, *middle, None), (n, k // tp)
    else:
        raise ValueError(f"parallel must be 'column' or 'row'; got {parallel!r}")

    def local(x, codes, lut, scales, zeros):
        w = QuantizedWeight(codes, lut, scales, zeros, local_shape, qw.bits, qw.group_size, qw.fmt)
        y = qmatmul(x, w, path="kernel")
        if parallel == "row":
            y = jax.lax.psum(y.astype(jnp.float32), MODEL).astype(x.dtype)
        return y

    # check_vma=False: a pallas_call does not say how its output varies over the mesh
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec, lut_spec, w_spec, w_spec),
                         out_specs=out_spec, check_vma=False)(x, qw.codes, qw.lut, qw.scales, qw.zeros)
