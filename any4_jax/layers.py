"""Quantized Dense layers. Every quantized matmul goes through ``qmatmul``."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from any4_jax.formats import QuantizedWeight, dequantize


MATMUL_ENV = "ANY4_JAX_MATMUL"
MATMUL_PATHS = ("auto", "kernel", "xla")


def matmul_path(path: str | None = None) -> str:
    """``"kernel"`` or ``"xla"``: ``path`` if given, else ``$ANY4_JAX_MATMUL``, else
    ``auto`` = the Pallas kernel on a GPU, XLA elsewhere."""
    path = path or os.environ.get(MATMUL_ENV, "auto")
    if path not in MATMUL_PATHS:
        raise ValueError(f"unknown matmul path {path!r} (argument or ${MATMUL_ENV}); "
                         f"accepted: {', '.join(MATMUL_PATHS)}")
    if path == "auto":
        return "kernel" if jax.default_backend() == "gpu" else "xla"
    return path


def qmatmul(x, qw: QuantizedWeight, *, path: str | None = None, **kernel_options):
    """``x @ W^T`` for ``x (..., K)`` and ``W (N, K)`` given by ``qw``; returns ``x.dtype``.

    ``path`` (or ``$ANY4_JAX_MATMUL``): ``"kernel"`` = the Pallas LUT matmul
    (in interpret mode when there is no GPU), ``"xla"`` = dequantize to
    ``x.dtype`` and ``dot`` with float32 accumulation, ``"auto"`` (default) =
    kernel on GPU, XLA elsewhere. ``kernel_options`` go to ``lut_matmul``.
    """
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features; the quantized weight {qw.shape} expects K = {k}")
    if matmul_path(path) == "kernel":
        from pallas_kernels.lut_matmul import lut_matmul
        kernel_options.setdefault("interpret", jax.default_backend() != "gpu")
        y = lut_matmul(x.reshape(-1, k), qw.codes, qw.lut, qw.scales, qw.zeros, k=k,
                       group_size=qw.group_size, **kernel_options)
        return y.reshape(*x.shape[:-1], n)
    w = dequantize(qw, x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def abstract_quantized_weight(n: int, k: int, fmt: str, group_size: int | None, dtype) -> QuantizedWeight:
    """A zero ``QuantizedWeight`` of the shapes ``quantize_tensor`` produces (for init/restore)."""
    bits = int(fmt[-1])
    g = k if group_size is None else group_size
    n_groups = -(-k // g)
    return QuantizedWeight(jnp.zeros((n, -(-k // 2)), jnp.uint8), jnp.zeros((n, 2 ** bits), dtype),
                           jnp.zeros((n, n_groups), dtype), jnp.zeros((n, n_groups), dtype),
                           (n, k), bits, g, fmt)


class QuantDense(nn.Module):
    """Drop-in for ``nn.Dense`` (same ``features``, ``use_bias``, ``dtype``) whose
    ``kernel`` parameter is a ``QuantizedWeight`` (``(features, K)``, PyTorch layout)."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    fmt: str = "any4"
    group_size: int | None = 128
    storage_dtype: Any = jnp.bfloat16
    mesh: Any = None  # with the kernel path: run it per shard (see sharding.per_shard_qmatmul)

    @nn.compact
    def __call__(self, x):
        k = x.shape[-1]
        qw = self.param("kernel", lambda _: abstract_quantized_weight(
            self.features, k, self.fmt, self.group_size, self.storage_dtype))
        dtype = self.dtype or x.dtype
        y = self._matmul(x.astype(dtype), qw)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(dtype)
        return y

    def _matmul(self, x, qw):
        if self.mesh is not None and matmul_path() == "kernel":
            from any4_jax import sharding
            kind = ("column" if self.name in sharding.COLUMN_PARALLEL else
                    "row" if self.name in sharding.ROW_PARALLEL else None)
            if kind:
                return sharding.per_shard_qmatmul(x, qw, self.mesh, kind)
        return qmatmul(x, qw)


@dataclasses.dataclass(frozen=True)
class QuantDenseFactory:
    """The ``dense`` of a quantized ``Transformer``: ``QuantDense`` everywhere but
    the layers whose name is in ``skip``, which stay ``nn.Dense``."""

    fmt: str
    group_size: int | None
    skip: tuple = ("lm_head",)
    storage_dtype: str = "bfloat16"
    # How the weights were made (recorded in checkpoints; no effect on compute):
    calibration: str | None = None
    statistic: str = "abs_mean"
    scale_sample_weight: bool = True
    sequential: bool = False
    mesh: Any = None  # set by load_model(..., mesh=...): kernel matmuls run per shard

    def __call__(self, features, *, use_bias=True, dtype=None, name=None):
        if name in self.skip:
            return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)
        return QuantDense(features, use_bias, dtype, self.fmt, self.group_size,
                          jnp.dtype(self.storage_dtype), self.mesh, name=name)

    def recipe(self) -> dict:
        """The fields a checkpoint records (everything but the mesh)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mesh"}
