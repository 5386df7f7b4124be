"""Quantized Dense layers. Every quantized matmul goes through ``qmatmul``
(docs/design.md §5); every quantized layer computes with ``quantized_dense``."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from any4_jax.formats import QuantizedWeight, dequantize
from pallas_kernels.lut_matmul import lut_matmul

MATMUL_PATHS = ("auto", "kernel", "xla")
PARALLEL = (None, "column", "row")


def check_matmul_path(path: str) -> str:
    if path not in MATMUL_PATHS:
        raise ValueError(f"unknown matmul path {path!r}; accepted: {', '.join(MATMUL_PATHS)}")
    return path


def qmatmul(x, qw: QuantizedWeight, *, path: str = "auto", **kernel_options):
    """``x @ W^T`` for ``x (..., K)`` and ``W (N, K)`` given by ``qw``; returns ``x.dtype``.

    ``path``: ``"kernel"`` = the Pallas LUT matmul (in interpret mode when there
    is no GPU), ``"xla"`` = dequantize to ``x.dtype`` and ``dot`` with float32
    accumulation, ``"auto"`` (default) = kernel on a GPU, XLA elsewhere.
    ``kernel_options`` go to ``lut_matmul``.
    """
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features; the quantized weight {qw.shape} expects K = {k}")
    on_gpu = jax.default_backend() == "gpu"
    if check_matmul_path(path) == "kernel" or (path == "auto" and on_gpu):
        kernel_options.setdefault("interpret", not on_gpu)
        y = lut_matmul(x.reshape(-1, k), qw.codes, qw.lut, qw.scales, qw.zeros, k=k,
                       group_size=qw.group_size, **kernel_options)
        return y.reshape(*x.shape[:-1], n)
    w = dequantize(qw, x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def per_shard_qmatmul(x, qw: QuantizedWeight, mesh, parallel: str):
    """``qmatmul`` on the Pallas kernel, run on each shard with ``shard_map``
    (a custom kernel is opaque to XLA's partitioner, which would gather whole
    weights to every device). ``mesh`` axes are ``(data, model)``.
    ``parallel``: ``"column"`` (rows of W split; the output comes out split along
    N) or ``"row"`` (K split; the partial products are summed with ``psum``). The
    batch dimension is split over ``data`` when it divides."""
    data, model = mesh.axis_names
    n, k = qw.shape
    tp = mesh.shape[model]
    batch = data if x.shape[0] % mesh.shape[data] == 0 else None
    middle = (None,) * (x.ndim - 2)
    if parallel == "column":
        x_spec, w_spec, lut_spec = P(batch, *middle, None), P(model, None), P(model, None)
        out_spec, local_shape = P(batch, *middle, model), (n // tp, k)
    elif parallel == "row":
        x_spec, w_spec, lut_spec = P(batch, *middle, model), P(None, model), P(None, None)
        out_spec, local_shape = P(batch, *middle, None), (n, k // tp)
    else:
        raise ValueError(f"parallel must be 'column' or 'row'; got {parallel!r}")

    def local(x, codes, lut, scales, zeros):
        w = QuantizedWeight(codes, lut, scales, zeros, local_shape, qw.bits, qw.group_size, qw.fmt)
        y = qmatmul(x, w, path="kernel")
        if parallel == "row":
            y = jax.lax.psum(y.astype(jnp.float32), model).astype(x.dtype)
        return y

    # check_vma=False: a pallas_call does not say how its output varies over the mesh
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec, lut_spec, w_spec, w_spec),
                         out_specs=out_spec, check_vma=False)(x, qw.codes, qw.lut, qw.scales, qw.zeros)


def quantized_dense(x, qw: QuantizedWeight, bias=None, *, dtype=None, path: str = "auto",
                    parallel: str | None = None, mesh=None):
    """The body of every quantized layer: cast ``x`` to ``dtype`` (default
    ``x.dtype``), ``qmatmul`` (per shard on a mesh with the kernel path), add ``bias``."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    kernel = path == "kernel" or (path == "auto" and jax.default_backend() == "gpu")
    if mesh is not None and parallel is not None and kernel:
        y = per_shard_qmatmul(x, qw, mesh, parallel)
    else:
        y = qmatmul(x, qw, path=path)
    return y if bias is None else y + bias.astype(dtype)


class QuantDense(nn.Module):
    """Drop-in for ``nn.Dense`` (same ``features``, ``use_bias``, ``dtype``) whose
    ``kernel`` parameter is a ``QuantizedWeight`` (``(features, K)``, PyTorch layout).

    ``fmt``, ``group_size``, ``storage_dtype``: the stored weight's shapes.
    ``matmul``: the ``qmatmul`` path. ``parallel``: how the model splits this
    layer over a mesh's model axis (``"column"``, ``"row"`` or None), used with
    ``mesh`` to run the kernel per shard.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    fmt: str = "any4"
    group_size: int | None = 128
    storage_dtype: Any = "bfloat16"
    matmul: str = "auto"
    parallel: str | None = None
    mesh: Any = None

    @nn.compact
    def __call__(self, x):
        qw = self.param("kernel", lambda _: QuantizedWeight.abstract(
            self.features, x.shape[-1], self.fmt, self.group_size, self.storage_dtype))
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        return quantized_dense(x, qw, bias, dtype=self.dtype, path=self.matmul, parallel=self.parallel,
                               mesh=self.mesh)
