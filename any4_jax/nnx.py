"""Flax NNX counterpart of ``QuantDense``: ``QuantLinear``, sharing ``qmatmul``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from any4_jax.formats import QuantizedWeight, quantize_tensor
from any4_jax.layers import quantized_dense


class QuantLinear(nnx.Module):
    """``y = x @ W^T + b`` with ``W`` stored as a ``QuantizedWeight``.

    Build it from a quantized weight, or from an ``nnx.Linear`` with
    ``QuantLinear.from_linear(linear, fmt="any4", group_size=128, ...)``.
    """

    def __init__(self, qw: QuantizedWeight, bias=None, *, dtype=None, matmul: str = "auto"):
        self.codes = nnx.Param(qw.codes)
        self.lut = nnx.Param(qw.lut)
        self.scales = nnx.Param(qw.scales)
        self.zeros = nnx.Param(qw.zeros)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.meta = (qw.shape, qw.bits, qw.group_size, qw.fmt)  # static
        self.dtype = dtype
        self.matmul = matmul  # the qmatmul path

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes[...], self.lut[...], self.scales[...], self.zeros[...], *self.meta)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, fmt: str = "any4", group_size: int | None = 128, **options):
        """Quantize an ``nnx.Linear`` (kernel ``(K, N)``); ``options`` go to ``quantize_tensor``."""
        qw = quantize_tensor(jnp.asarray(linear.kernel[...], jnp.float32).T, fmt, group_size, **options)
        bias = None if linear.bias is None else linear.bias[...]
        return cls(qw, bias, dtype=linear.dtype)

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return quantized_dense(x, self.weight, bias, dtype=self.dtype, path=self.matmul)
