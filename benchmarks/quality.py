"""Perplexity of SmolLM2-135M under every format: writes benchmarks/results/quality_smollm2.md.

    python benchmarks/quality.py [--windows 32] [--group-sizes 64 128] [--out FILE]

For each group size: float, int4/fp4/nf4, any4 (uncalibrated; calibrated on
the built-in prompt without and with scale weighting; other statistics;
sequential; float32 instead of bfloat16 LUT/scale/zero storage; calibrated on
generated text), GPTQ-int4/nf4, any4 and any3 + GPTQ, any3/int3, any2/int2 —
perplexity on Botchan and on the Lee corpus (non-overlapping windows of
--seq-len tokens) and each run's quantization time. The essential rows (the
paper's comparison) run first at every group size, then the ablations.

Results are kept in a JSON file beside the table, rewritten after every row and
keyed by everything that changes a row (model, windows, sequence length, group
size, configuration with its storage dtype, seed); a rerun skips the rows it
already has for the same settings. The markdown is rendered from the JSON alone,
with the rows measured under the current --windows / --seq-len.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax

from any4_jax import assets, load_model
from any4_jax.evaluate import perplexity
from any4_jax.quantize import quantize_model
from any4_jax.recipe import bits_per_weight
from converters import hf2flax

# (label, quantize_model keyword arguments or None for the float model, essential?)
# Essential rows (the paper's comparison) run first at every group size.
CONFIGS = [
    ("float (dequantized Q4_1)", None, True),
    ("int4", dict(fmt="int4", calibration=None), True),
    ("fp4", dict(fmt="fp4", calibration=None), True),
    ("nf4", dict(fmt="nf4", calibration=None), True),
    ("any4, no calibration", dict(fmt="any4", calibration=None), False),
    ("any4, calibrated (abs_mean), no scale weighting", dict(fmt="any4", scale_sample_weight=False), False),
    ("any4, calibrated (abs_mean) x scale  [default]", dict(fmt="any4"), True),
    ("any4, calibrated x scale, float32 LUT/scales/zeros", dict(fmt="any4", storage_dtype="float32"), True),
    ("any4, calibrated (mean_abs) x scale", dict(fmt="any4", statistic="mean_abs"), False),
    ("any4, calibrated (rms) x scale", dict(fmt="any4", statistic="rms"), False),
    ("any4, calibrated x scale, sequential", dict(fmt="any4", sequential=True), False),
    ("int3", dict(fmt="int3", calibration=None), True),
    ("any3, calibrated x scale", dict(fmt="any3"), True),
    ("any4, calibrated on generated text x scale", dict(fmt="any4", calibration="generated"), True),
    ("GPTQ-int4, generated, act-order, damp 0.01", dict(fmt="int4", method="gptq", act_order=True, damp=0.01, calibration="generated"), True),
    ("GPTQ-nf4, generated, act-order, damp 0.01", dict(fmt="nf4", method="gptq", act_order=True, damp=0.01, calibration="generated"), True),
    ("any4 + GPTQ, generated, act-order, damp 3", dict(fmt="any4", method="gptq", act_order=True, damp=3.0,
                                                       calibration="generated"), True),
    ("any3 + GPTQ, generated, act-order, damp 3", dict(fmt="any3", method="gptq", act_order=True, damp=3.0,
                                                       calibration="generated"), True),
    ("AWQ-int4, generated", dict(fmt="int4", method="awq", calibration="generated"), True),
    ("any4 + refinement (40 steps), generated", dict(fmt="any4", refine_steps=40, calibration="generated"), True),
    ("any4 + GPTQ + refinement (40 steps), generated, act-order, damp 3",
     dict(fmt="any4", method="gptq", act_order=True, damp=3.0, refine_steps=40, calibration="generated"), True),
    ("any3 + GPTQ + refinement (40 steps), generated, act-order, damp 3",
     dict(fmt="any3", method="gptq", act_order=True, damp=3.0, refine_steps=40, calibration="generated"), True),
    ("int2", dict(fmt="int2", calibration=None), False),
    ("any2, calibrated x scale", dict(fmt="any2"), False),
]
STATISTIC_ROWS_ONLY_AT = 128  # the mean_abs / rms comparison runs at one group size
TEXTS = ("botchan", "lee")
MODEL = "SmolLM2-135M-Instruct (dequantized Q4_1)"
SEED = 0


def row_key(label, kwargs, g, windows, seq_len) -> str:
    """Everything that changes a row's numbers (kwargs include the storage dtype)."""
    config = {"storage_dtype": "bfloat16", **(kwargs or {})} if kwargs is not None else "float"
    return json.dumps({"model": MODEL, "windows": windows, "seq_len": seq_len, "seed": SEED,
                       "group_size": None if kwargs is None else g, "label": label, "config": config},
                      sort_keys=True)


def smollm2_flax(workdir=None) -> Path:
    """The float Flax SmolLM2-135M the benchmarks measure, converted once into
    ``workdir`` (default: the any4-jax cache's ``bench`` folder)."""
    flax_dir = Path(workdir or assets.cache_dir() / "bench") / "smollm2-flax"
    if not (flax_dir / "manifest.json").exists():
        hf2flax.convert(assets.smollm2(), flax_dir, overwrite=True)
    return flax_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--group-sizes", type=int, nargs="+", default=[128, 64])
    p.add_argument("--workdir", default=str(assets.cache_dir() / "bench"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_smollm2.md"))
    args = p.parse_args()

    model, params, tok = load_model(smollm2_flax(args.workdir))
    ids = {name: tok(assets.text(name))["input_ids"] for name in TEXTS}

    header = [
        "# SmolLM2-135M-Instruct: perplexity by format",
        "",
        "Written by `python benchmarks/quality.py` "
        f"(machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}).",
        f"Perplexity over {args.windows} non-overlapping windows of {args.seq_len} tokens of each text "
        "(Botchan from the sentencepiece sources; the Lee news corpus from gensim).",
        "All linear layers but the tied lm_head are quantized; calibration is the built-in one-prompt text, "
        "or, in rows that say 'generated', 8 x 512 tokens the float model writes itself from one-word seeds "
        "(`calibration=\"generated\"`: no overlap with either text; its generation time is part of 'quantize s'). "
        "GPTQ rows: `method=\"gptq\"` (error feedback through each layer's input Hessian); refinement rows: "
        "`refine_steps=40` (LUT, scales and zeros moved by Adam to lower each layer's output error, codes fixed); "
        "AWQ rows: `method=\"awq\"` (activation-aware input-channel scaling folded into the op before, and clipping). "
        "LUTs, scales and zeros are stored as bfloat16 (the default) unless a row says float32.",
        "",
        "**SmolLM2's released weights are already 4-bit** (llama.cpp Q4_1, blocks of 32): the 'float' row is",
        "their dequantized form, and every other row re-quantizes those weights.",
        "'quantize s' is wall-clock time on the machine named above, which other jobs may have shared.",
        "",
    ]
    results_file = Path(args.out).with_suffix(".json")
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    def write():
        lines = list(header)
        for g in args.group_sizes:
            lines += [f"## Group size {g}", "", "| configuration | Botchan | Lee | bits/weight | quantize s |",
                      "|---|---|---|---|---|"]
            for label, kwargs, _ in CONFIGS:
                r = results.get(row_key(label, kwargs, g, args.windows, args.seq_len))
                if r:
                    lines.append(f"| {label} | {r['ppl'][0]:.3f} | {r['ppl'][1]:.3f} | {r['bpw']:.2f} | {r['s']:.1f} |")
            lines.append("")
        Path(args.out).write_text("\n".join(lines) + "\n")
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    # Essential rows first; among them the default any4 and its float32-metadata twin first of all.
    first = lambda c: (not c[2], c[1] is not None and not c[0].startswith("any4, calibrated"))
    todo = [(g, c) for group in sorted({first(c) for c in CONFIGS}) for g in args.group_sizes for c in CONFIGS
            if first(c) == group and not ("statistic" in (c[1] or {}) and g != STATISTIC_ROWS_ONLY_AT)]
    for g, (label, kwargs, _) in todo:
        key = row_key(label, kwargs, g, args.windows, args.seq_len)
        if key in results:  # resumed: measured by an earlier run with the same settings
            continue
        if kwargs is None:
            m, prm, secs, bpw = model, params, 0.0, 32.0
        else:
            start = time.perf_counter()
            m, prm = quantize_model(model, params, group_size=g, tokenizer=tok, key=jax.random.PRNGKey(SEED),
                                    progress=False, **kwargs)
            jax.block_until_ready(prm)
            secs, bpw = time.perf_counter() - start, bits_per_weight(prm)
        ppl = [perplexity(m, prm, ids[t], args.seq_len, args.windows, progress=False) for t in TEXTS]
        results[key] = {"ppl": ppl, "bpw": bpw, "s": secs}
        print(label, g, results[key], flush=True)
        write()
    write()


if __name__ == "__main__":
    main()
