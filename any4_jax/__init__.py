"""any4-jax: learned 4-bit weight quantization (any4) for LLMs in JAX."""

from any4_jax.checkpoint import load_model, save_model
from any4_jax.evaluate import perplexity
from any4_jax.formats import FORMATS, GROUP_SIZES, Format, QuantizedWeight, dequantize, quantize_tensor
from any4_jax.generation import generate, generate_text
from any4_jax.kmeans import weighted_kmeans_1d
from any4_jax.layers import QuantDense, qmatmul
from any4_jax.models import ModelConfig, Transformer
from any4_jax.quantize import quantize_model
from any4_jax.recipe import Recipe

__all__ = ["FORMATS", "GROUP_SIZES", "Format", "ModelConfig", "QuantDense", "QuantizedWeight", "Recipe",
           "Transformer", "dequantize", "generate", "generate_text", "load_model", "perplexity", "qmatmul",
           "quantize_model", "quantize_tensor", "save_model", "weighted_kmeans_1d"]
__version__ = "0.1.0"
