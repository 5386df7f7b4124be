"""Batch-1 generation speed, float vs any4: prompt of 128 tokens, 128 new tokens.

    python benchmarks/generate_bench.py [--prompt-len 128] [--new-tokens 128] [--llama8b]

Always: SmolLM2-135M (real weights; any4 calibrated, G = 128). With --llama8b
(default on a GPU): a Llama-3-8B-shaped model with random weights (bf16 vs
any4 with random codes; speed does not depend on the values), since no real
8B weights can be had offline. Each configuration runs once to compile, then
is timed; prefill and decode tokens/s are reported separately.
"""

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import assets, load_model
from any4_jax.generation import generate_ids
from any4_jax.quantize import QuantDenseFactory, Recipe
from any4_jax.models import ModelConfig, Transformer, param_shapes
from any4_jax.quantize import quantize_model

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)


def measure(model, params, prompt, new_tokens):
    generate_ids(model, params, [prompt], max_new_tokens=new_tokens)  # compile
    stats = {}
    generate_ids(model, params, [prompt], max_new_tokens=new_tokens, stop=(), stats=stats)
    return (stats["prefill_tokens"] / stats["prefill_seconds"], stats["decode_tokens"] / stats["decode_seconds"])


def random_params(model, key, dtype):
    """Random leaves of the right shapes (uint8 codes for quantized layers)."""
    shapes = param_shapes(model)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, s in zip(keys, leaves):
        if s.dtype == jnp.uint8:
            out.append(jax.random.randint(k, s.shape, 0, 256, jnp.int32).astype(jnp.uint8))
        else:
            out.append((jax.random.normal(k, s.shape, jnp.float32) * 0.02).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--llama8b", action="store_true", default=jax.default_backend() == "gpu")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind if hasattr(jax.devices()[0], 'device_kind') else ''} "
          f"({jax.default_backend()}), host {platform.machine()}, jax {jax.__version__}")
    rows = []

    from converters import hf2flax
    flax_dir = assets.cache_dir() / "bench" / "smollm2-flax"
    if not (flax_dir / "manifest.json").exists():
        hf2flax.convert(assets.smollm2(), flax_dir, overwrite=True)
    model, params, tok = load_model(flax_dir)
    ids = tok(assets.text("botchan"))["input_ids"]
    prompt = ids[1000:1000 + args.prompt_len]
    qmodel, qparams = quantize_model(model, params, fmt="any4", tokenizer=tok, progress=False)
    for variant, m, prm in [("float32", model, params), ("any4", qmodel, qparams)]:
        rows.append(("SmolLM2-135M", variant, *measure(m, prm, prompt, args.new_tokens)))
        print(rows[-1], flush=True)

    if args.llama8b:
        config = ModelConfig.from_hf(LLAMA3_8B)
        fmodel = Transformer(config, dtype=jnp.bfloat16)
        qmodel = fmodel.clone(dense=QuantDenseFactory(Recipe("any4", 128)))
        prompt = rng.integers(0, config.vocab_size, args.prompt_len).tolist()
        for variant, m in [("bfloat16", fmodel), ("any4", qmodel)]:
            prm = random_params(m, jax.random.PRNGKey(0), jnp.bfloat16)
            rows.append(("Llama-3-8B-shaped (random weights)", variant, *measure(m, prm, prompt, args.new_tokens)))
            print(rows[-1], flush=True)
            del prm

    base = {}
    print("\n| model | weights | prefill tok/s | decode tok/s | decode vs float |")
    print("|---|---|---|---|---|")
    for family, variant, prefill, decode in rows:
        base.setdefault(family, decode)  # the float run of each model comes first
        print(f"| {family} | {variant} | {prefill:.1f} | {decode:.2f} | {decode / base[family]:.2f}x |")


if __name__ == "__main__":
    main()
