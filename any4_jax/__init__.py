"""any4-jax: learned 4-bit weight quantization (any4) for LLMs in JAX."""

from any4_jax.formats import (FORMATS, GROUP_SIZES, QuantizedWeight, dequantize,
                              quantize_tensor)
from any4_jax.checkpoint import load_model
from any4_jax.kmeans import weighted_kmeans_1d
from any4_jax.models import ModelConfig, Transformer

__all__ = ["FORMATS", "GROUP_SIZES", "ModelConfig", "QuantizedWeight", "Transformer", "dequantize",
           "load_model", "quantize_tensor", "weighted_kmeans_1d"]
__version__ = "0.1.0"
