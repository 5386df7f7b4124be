"""The Python API end to end on a real model: SmolLM2-135M-Instruct.

    python examples/quantize_and_generate.py [--workdir any4-example] [--windows 4]

Load, quantize with calibrated any4, save, load back, evaluate, generate.
"""

import argparse
import time
from pathlib import Path

import jax

from any4_jax import assets, load_model
from any4_jax.checkpoint import save_model
from any4_jax.evaluate import perplexity
from any4_jax.generation import generate_text
from any4_jax.quantize import quantize_model
from any4_jax.recipe import bits_per_weight
from converters import hf2flax


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="any4-example")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows of 1024 tokens")
    args = p.parse_args()
    work = Path(args.workdir)

    # 1. A Hugging Face folder -> a Flax model directory (fetched once, then cached).
    float_dir = work / "smollm2-flax"
    if not (float_dir / "manifest.json").exists():
        hf2flax.convert(assets.smollm2(), float_dir, overwrite=True)
    model, params, tokenizer = load_model(float_dir)

    # 2. Quantize every linear layer (but lm_head) with any4, calibrated on the built-in prompt.
    start = time.perf_counter()
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=128,
                                     tokenizer=tokenizer, key=jax.random.PRNGKey(0))
    print(f"quantized in {time.perf_counter() - start:.1f} s, {bits_per_weight(qparams)} bits/weight")

    # 3. Save and load it back: codes, LUTs and scales are stored as they are.
    save_model(work / "smollm2-any4", qmodel, qparams, tokenizer, overwrite=True)
    qmodel, qparams, tokenizer = load_model(work / "smollm2-any4", require="quantized")

    # 4. Evaluate on real text, float vs any4.
    ids = tokenizer(assets.text("botchan"))["input_ids"]
    ppl_float = perplexity(model, params, ids, seq_len=1024, max_windows=args.windows)
    ppl_any4 = perplexity(qmodel, qparams, ids, seq_len=1024, max_windows=args.windows)
    print(f"perplexity on Botchan: float {ppl_float:.2f}, any4 {ppl_any4:.2f}")

    # 5. Generate (jit-compiled, KV cache).
    answer = generate_text(qmodel, qparams, tokenizer, "Name three primary colors.", chat=True,
                           max_new_tokens=40)[0]
    print("any4 answers:", answer)


if __name__ == "__main__":
    main()
