"""Beyond one device: partition rules for float and quantized models, with jax.sharding.

A mesh has two axes, ``("data", "model")``: batches split over ``data``,
weights over ``model`` (tensor parallelism, Megatron style):

* column-parallel (q/k/v/gate/up, Mixtral's w1/w3): the output features N are
  split — a float kernel ``(K, N)`` as ``P(None, "model")``; a
  ``QuantizedWeight`` (N, K) has codes, LUT, scales and zeros split by rows.
* row-parallel (o/down, Mixtral's w2): the input features K are split — a float
  kernel as ``P("model", None)``; quantized codes, scales and zeros along K with
  whole groups and whole 64-element code blocks on each shard, the LUT (one per
  row) replicated. XLA adds the
  partial products (an all-reduce).
* embeddings and lm_head by vocabulary; norms and Mixtral's router replicated.
  Mixtral's experts are tensor-parallel inside each expert (every expert on
  every device), not expert-parallel.

Which layer is which comes from the model (``models.PARALLEL``). Inference
needs nothing else: ``jax.jit`` of ``model.apply`` on sharded params
lets XLA partition the rest (GSPMD). ``shard_params`` checks every layer first
and names the one whose size a mesh axis does not divide.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from any4_jax.formats import QuantizedWeight
from any4_jax.models import PARALLEL
from pallas_kernels.layout import CODE_BLOCK

DATA, MODEL = "data", "model"


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
    parallel = PARALLEL.get(layer)
    where = "/".join(path)

    def need(size, what):
        if size % tp:
            raise ValueError(f"layer {where}: {what} = {size} is not divisible by the mesh's "
                             f"'{MODEL}' axis of size {tp}; choose a model-axis size that divides it")

    if isinstance(leaf, QuantizedWeight):
        n, k = leaf.shape
        if parallel == "row":
            need(leaf.n_groups, "its number of groups along K")
            if k % leaf.group_size:
                raise ValueError(f"layer {where}: K = {k} is not a multiple of the group size "
                                 f"{leaf.group_size}, so its groups cannot be split evenly over {tp} shards")
            if k % CODE_BLOCK:
                raise ValueError(f"layer {where}: K = {k} is not a multiple of the {CODE_BLOCK}-element code "
                                 f"blocks, so its codes cannot be split along K")
            need(k // CODE_BLOCK, f"its number of {CODE_BLOCK}-element code blocks along K")
            split = P(None, MODEL)
            return QuantizedWeight(split, P(None, None), split, split, leaf.shape, leaf.bits,
                                   leaf.group_size, leaf.fmt)
        if parallel == "column":
            need(n, "its output features N")
            rows = P(MODEL, None)
            return QuantizedWeight(rows, rows, rows, rows, leaf.shape, leaf.bits, leaf.group_size, leaf.fmt)
        return QuantizedWeight(P(), P(), P(), P(), leaf.shape, leaf.bits, leaf.group_size, leaf.fmt)
    if name == "embedding":
        need(leaf.shape[0], "its vocabulary size")
        return P(MODEL, None)
    if name == "kernel":
        if parallel == "column":
            need(leaf.shape[1], "its output features N")
            return P(None, MODEL)
        if parallel == "row":
            need(leaf.shape[0], "its input features K")
            return P(MODEL, None)
    if name == "bias" and parallel == "column":
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
