"""Perplexity of a real model under every format: writes benchmarks/results/quality_<model>.md.

    python benchmarks/quality.py [--model smollm2|gemma3] [--windows N] [--group-sizes 64 128] [--out FILE]

SmolLM2-135M (the default, 32 windows) runs every row below; Gemma 3 270M
(``--model gemma3``, 8 windows: its 262144-token head makes each window
costly on a CPU) runs the paper's comparison: float, int4/nf4/fp4, any4 plain,
any4's best method, GPTQ-int4 and AWQ-int4.

For each group size: float, int4/fp4/nf4, any4 (uncalibrated; calibrated on
the built-in prompt without and with scale weighting; other statistics;
sequential; float32 instead of bfloat16 LUT/scale/zero storage; calibrated on
generated text), GPTQ-int4/nf4, any4 and any3 + GPTQ, any3/int3, any2/int2 —
perplexity on Botchan and on the Lee corpus (non-overlapping windows of
--seq-len tokens) and each run's quantization time. The essential rows (the
paper's comparison) run first at every group size, then the ablations.

Results are kept in a JSON file beside the table, rewritten after every row and
keyed by everything that changes a row (model, windows, sequence length, group
size, configuration with its storage dtype, seed, and for the rows that use it
the generated calibration text's source); a rerun skips the rows it already
has for the same settings. The markdown is rendered from the JSON alone,
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
from any4_jax.formats import get_format
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
    ("any4 + AWQ scaling (no clipping), generated", dict(fmt="any4", method="awq", calibration="generated"), True),
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
SEED = 0
# Gemma 3 270M: the paper's comparison (float, fixed tables, any4 plain and best, GPTQ and AWQ on int4)
GEMMA3_ROWS = ("int4", "fp4", "nf4", "any4, calibrated (abs_mean) x scale  [default]",
               "any4 + GPTQ + refinement (40 steps), generated, act-order, damp 3",
               "GPTQ-int4, generated, act-order, damp 0.01", "AWQ-int4, generated",
               "any4 + AWQ scaling (no clipping), generated")
# Where calibration comes from changed once (block by block: a cached text SmolLM2 wrote, for any model,
# instead of the model writing its own in memory), and the uncalibrated anyN k-means keys now follow the
# layers' call order: the rows this changes carry these in their keys, so the rows measured before stay
# apart (and are shown beside the new ones).
# 2- and 3-bit codes were later stored at their own width (they had 4-bit containers): the same
# weights in fewer bytes, a new bits/weight; those rows carry that in their keys too.
GENERATED = {"generated_text": f"{assets.CALIBRATION_GENERATOR}'s, cached, any model"}
UNCALIBRATED_ANYN = {"kmeans_keys": "by call order"}


def changed_by_pipeline(kwargs) -> dict:
    """The key fields for what changed in this row since the in-memory pipeline with 4-bit
    containers (none: the same weights, stored the same)."""
    if kwargs is None:
        return {}
    bits = get_format(kwargs["fmt"]).bits
    stored = {"codes": f"{bits} bits a code"} if bits < 4 else {}
    if kwargs.get("calibration", "default") == "generated" or kwargs.get("method", "plain") != "plain" \
            or kwargs.get("refine_steps"):
        return {**GENERATED, **stored}
    if kwargs.get("calibration", "default") is None and kwargs["fmt"].startswith("any"):
        return {**UNCALIBRATED_ANYN, **stored}
    return stored


def row_key(model, label, kwargs, g, windows, seq_len, before=False) -> str:
    """Everything that changes a row's numbers (kwargs include the storage dtype);
    ``before``: the key the row had before the block-by-block pipeline."""
    config = {"storage_dtype": "bfloat16", **(kwargs or {})} if kwargs is not None else "float"
    if not before and kwargs is not None:
        config.update(changed_by_pipeline(kwargs))
    return json.dumps({"model": model, "windows": windows, "seq_len": seq_len, "seed": SEED,
                       "group_size": None if kwargs is None else g, "label": label, "config": config},
                      sort_keys=True)


def smollm2_flax(workdir=None) -> Path:
    """The float Flax SmolLM2-135M the benchmarks measure, converted once into
    ``workdir`` (default: the any4-jax cache's ``bench`` folder)."""
    return _flax(assets.smollm2, "smollm2-flax", workdir)


def gemma3_flax(workdir=None) -> Path:
    """The float Flax Gemma 3 270M (dequantized from its Q4_K_M GGUF), converted once."""
    return _flax(assets.gemma3, "gemma3-270m-flax", workdir)


def _flax(hf_dir, name, workdir) -> Path:
    flax_dir = Path(workdir or assets.cache_dir() / "bench") / name
    if not (flax_dir / "manifest.json").exists():
        hf2flax.convert(hf_dir(), flax_dir, overwrite=True)
    return flax_dir


MODELS = {  # name -> (the model's key in the results, title, float row label, Flax folder, rows, default windows)
    "smollm2": ("SmolLM2-135M-Instruct (dequantized Q4_1)", "SmolLM2-135M-Instruct", "float (dequantized Q4_1)",
                smollm2_flax, [c[0] for c in CONFIGS], 32),
    "gemma3": ("Gemma 3 270M (dequantized Q4_K_M)", "Gemma 3 270M", "float (dequantized Q4_K_M)",
               gemma3_flax, ["float (dequantized Q4_1)", *GEMMA3_ROWS], 8),
}
WEIGHTS_NOTE = {
    "smollm2": "**SmolLM2's released weights are already 4-bit** (llama.cpp Q4_1, blocks of 32): the 'float' row is "
               "their dequantized form, and every other row re-quantizes those weights.",
    "gemma3": "**Gemma 3 270M is fetched as a llama.cpp Q4_K_M GGUF** (K-quants: 4 to 6 bits in super-blocks of "
              "256, some tensors Q8_0): the 'float' row is its dequantized form, and every other row re-quantizes "
              "those weights. Its tied 262144 x 640 embedding (170M of its 268M parameters) stays float.",
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--windows", type=int, default=None, help="per text (default: 32 for smollm2, 8 for gemma3)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--group-sizes", type=int, nargs="+", default=[128, 64])
    p.add_argument("--workdir", default=str(assets.cache_dir() / "bench"))
    p.add_argument("--out", default=None, help="default: benchmarks/results/quality_<model>.md")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="measure only the rows whose configuration contains one of these texts")
    args = p.parse_args()
    model_key, title, float_label, flax_dir, row_labels, default_windows = MODELS[args.model]
    args.windows = args.windows or default_windows
    args.out = args.out or str(Path(__file__).parent / "results" / f"quality_{args.model}.md")
    configs = [(float_label if kw is None else label, kw, essential) for label, kw, essential in CONFIGS
               if label in row_labels]

    model, params, tok = load_model(flax_dir(args.workdir))
    ids = {name: tok(assets.text(name))["input_ids"] for name in TEXTS}

    header = [
        f"# {title}: perplexity by format",
        "",
        f"Written by `python benchmarks/quality.py --model {args.model}` "
        f"(machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}).",
        f"Perplexity over {args.windows} non-overlapping windows of {args.seq_len} tokens of each text "
        "(Botchan from the sentencepiece sources; the Lee news corpus from gensim).",
        "All linear layers but the lm_head are quantized; calibration is the built-in one-prompt text, "
        f"or, in rows that say 'generated', 8 x 512 tokens of text {assets.CALIBRATION_GENERATOR} wrote from "
        "one-word seeds, cached once for any model (`calibration=\"generated\"`: no overlap with either text; "
        "docs/design.md §3). "
        "GPTQ rows: `method=\"gptq\"` (error feedback through each layer's input Hessian); refinement rows: "
        "`refine_steps=40` (LUT, scales and zeros moved by Adam to lower each layer's output error, codes fixed); "
        "AWQ rows: `method=\"awq\"` (activation-aware input-channel scaling folded into the op before, and clipping). "
        "LUTs, scales and zeros are stored as bfloat16 (the default) unless a row says float32.",
        "",
        WEIGHTS_NOTE[args.model],
        "'quantize s' is wall-clock time on the machine named above, which other jobs may have shared.",
        "",
    ]
    results_file = Path(args.out).with_suffix(".json")
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    key = lambda label, kwargs, g, before=False: row_key(model_key, label, kwargs, g, args.windows, args.seq_len,
                                                         before)

    def write():
        lines = list(header)
        for g in args.group_sizes:
            lines += [f"## Group size {g}", "", "| configuration | Botchan | Lee | bits/weight | quantize s |",
                      "|---|---|---|---|---|"]
            for label, kwargs, _ in configs:
                r = results.get(key(label, kwargs, g))
                if r:
                    lines.append(f"| {label} | {r['ppl'][0]:.3f} | {r['ppl'][1]:.3f} | {r['bpw']:.2f} | {r['s']:.1f} |")
            lines.append("")
        before = [(g, label, results[key(label, kw, g, True)], results.get(key(label, kw, g)))
                  for g in args.group_sizes for label, kw, _ in configs
                  if changed_by_pipeline(kw) and key(label, kw, g, True) in results]
        if before:
            lines += ["## Before the block-by-block pipeline and true 2- and 3-bit storage", "",
                      "These rows were measured before quantization went block by block: the 'generated' text was "
                      "written by the model itself in memory (token ids, not text), and uncalibrated anyN drew "
                      "its k-means keys in another order; 2- and 3-bit codes were stored in 4-bit containers "
                      "(hence their bits/weight). 'now' is the row above ('-': not measured again yet).", "",
                      "| G | configuration | before: Botchan / Lee | bits/weight | now: Botchan / Lee | bits/weight |",
                      "|---|---|---|---|---|---|"]
            for g, label, old, new in before:
                now = f"{new['ppl'][0]:.3f} / {new['ppl'][1]:.3f} | {new['bpw']:.2f}" if new else "- | -"
                lines.append(f"| {g} | {label} | {old['ppl'][0]:.3f} / {old['ppl'][1]:.3f} | {old['bpw']:.2f} | {now} |")
            lines.append("")
        Path(args.out).write_text("\n".join(lines) + "\n")
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    # Essential rows first; among them the default any4 and its float32-metadata twin first of all.
    first = lambda c: (not c[2], c[1] is not None and not c[0].startswith("any4, calibrated"))
    todo = [(g, c) for group in sorted({first(c) for c in configs}) for g in args.group_sizes for c in configs
            if first(c) == group and not ("statistic" in (c[1] or {}) and g != STATISTIC_ROWS_ONLY_AT)
            and (args.only is None or any(t in c[0] for t in args.only))]
    for g, (label, kwargs, _) in todo:
        if key(label, kwargs, g) in results:  # resumed: measured by an earlier run with the same settings
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
        results[key(label, kwargs, g)] = {"ppl": ppl, "bpw": bpw, "s": secs}
        print(label, g, results[key(label, kwargs, g)], flush=True)
        write()
    write()


if __name__ == "__main__":
    main()
