"""Generation speed, float vs any4 (and any3, any2), batch 1 and 8: prompts of 128 tokens, 128 new tokens.

    python -m benchmarks.generate_bench [--batch 1 8] [--runs 3] [--formats any4 any3 any2]
        [--out benchmarks/results/generate_cpu.md] [--llama8b]

SmolLM2-135M (real weights): float32, bfloat16, and each of ``--formats``
(calibrated, G = 128, bf16 metadata, float32 compute; any3 and any2 stored at 3
and 2 bits a code) through ``qmatmul``'s ``"auto"`` path (the C++ kernel on a
CPU, Pallas on a GPU), and any4 also through its ``"xla"`` path. Prompts are
consecutive 128-token slices of Botchan; every row generates all its tokens (no
stop token). Each configuration runs once to compile, then ``--runs`` times;
the table has the median of each figure: prefill and decode tokens/s (decode
counts each row's tokens after the first, which the prefill makes), and a decode
step's time split into waiting for the device's decode loops and host work
(sampling the first token, copying tokens, Python). "vs float32" is decode
tokens/s over float32's at the same batch, measured in the same run. The
markdown file is rewritten after every row. With ``--llama8b`` (default on a
GPU), also a Llama-3-8B-shaped model with random weights (bf16 vs any4 with
random codes; speed does not depend on the values): no real 8B weights can be
had offline.
"""

import argparse
import os
import dataclasses
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import assets, load_model
from any4_jax.generation import generate_ids
from any4_jax.models import ModelConfig, Transformer, param_shapes
from any4_jax.quantize import quantize_model
from any4_jax.recipe import QuantDenseFactory, Recipe
from benchmarks.quality import smollm2_flax

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)


def measure(model, params, prompts, new_tokens, runs):
    """Median (prefill tok/s, decode tok/s, device ms/step, host ms/step) of ``runs`` runs after a warm-up."""
    generate_ids(model, params, prompts, max_new_tokens=new_tokens, stop=())  # compile
    rows = []
    for _ in range(runs):
        s = {}
        generate_ids(model, params, prompts, max_new_tokens=new_tokens, stop=(), stats=s)
        steps = s["decode_steps"]
        rows.append((s["prefill_tokens"] / s["prefill_seconds"], s["decode_tokens"] / s["decode_seconds"],
                     1e3 * s["decode_device_seconds"] / steps,
                     1e3 * (s["decode_seconds"] - s["decode_device_seconds"]) / steps))
    return tuple(float(np.median(col)) for col in zip(*rows))


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
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--formats", nargs="+", default=["any4", "any3", "any2"], help="quantized formats to time")
    p.add_argument("--out", default="benchmarks/results/generate_cpu.md")
    p.add_argument("--llama8b", action="store_true", default=jax.default_backend() == "gpu")
    args = p.parse_args()
    device = jax.devices()[0]
    command = (f"python -m benchmarks.generate_bench --prompt-len {args.prompt_len} --new-tokens {args.new_tokens} "
               f"--batch {' '.join(map(str, args.batch))} --runs {args.runs} --formats {' '.join(args.formats)}"
               + (" --llama8b" if args.llama8b else ""))
    lines = [f"Written by `{command}` on {getattr(device, 'device_kind', device.platform)} ({device.platform}), "
             f"host {platform.machine()} with {os.cpu_count()} cores, jax {jax.__version__}. "
             f"Prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens a row; medians of {args.runs} runs.",
             "", "| model | weights | matmul | batch | prefill tok/s | decode tok/s | device ms/step | "
             "host ms/step | decode vs float32 |", "|---|---|---|---|---|---|---|---|---|"]

    def add(row):
        lines.append(row)
        print(row, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")

    flax_dir = smollm2_flax()
    model, params, tok = load_model(flax_dir)
    ids = tok(assets.text("botchan"))["input_ids"]
    bf16_model, bf16_params = load_model(flax_dir, dtype=jnp.bfloat16, tokenizer=False)[:2]
    bf16_params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), bf16_params)
    variants = [("float32", "-", model, params), ("bfloat16", "-", bf16_model, bf16_params)]
    for fmt in args.formats:
        qmodel, qparams = quantize_model(model, params, fmt=fmt, tokenizer=tok, progress=False)
        variants.append((fmt, "auto", qmodel, qparams))
        if fmt == "any4":
            variants.append((fmt, "xla", qmodel.clone(dense=dataclasses.replace(qmodel.dense, matmul="xla")), qparams))
    for batch in args.batch:
        prompts = [ids[1000 + i * args.prompt_len:1000 + (i + 1) * args.prompt_len] for i in range(batch)]
        base = None
        for weights, matmul, m, prm in variants:
            prefill, decode, device_ms, host_ms = measure(m, prm, prompts, args.new_tokens, args.runs)
            base = base or decode  # float32 comes first
            add(f"| SmolLM2-135M | {weights} | {matmul} | {batch} | {prefill:.1f} | {decode:.2f} | {device_ms:.2f} | "
                f"{host_ms:.3f} | {decode / base:.2f}x |")

    if args.llama8b:
        config = ModelConfig.from_hf(LLAMA3_8B)
        fmodel = Transformer(config, dtype=jnp.bfloat16)
        qmodel = fmodel.clone(dense=QuantDenseFactory(Recipe("any4", 128)))
        rng = np.random.default_rng(0)
        for batch in args.batch:
            prompts = [rng.integers(0, config.vocab_size, args.prompt_len).tolist() for _ in range(batch)]
            base = None
            for weights, m in [("bfloat16", fmodel), ("any4", qmodel)]:
                prm = random_params(m, jax.random.PRNGKey(0), jnp.bfloat16)
                prefill, decode, device_ms, host_ms = measure(m, prm, prompts, args.new_tokens, args.runs)
                base = base or decode
                add(f"| Llama-3-8B-shaped (random weights) | {weights} | auto | {batch} | {prefill:.1f} | "
                    f"{decode:.2f} | {device_ms:.2f} | {host_ms:.3f} | {decode / base:.2f}x (vs bf16) |")
                del prm


if __name__ == "__main__":
    main()
