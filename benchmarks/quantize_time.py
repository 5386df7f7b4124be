"""How long quantizing SmolLM2-135M takes, by method: writes benchmarks/results/quantize_time_smollm2.md.

    python -m benchmarks.quantize_time [--group-size 64] [--methods plain gptq gptq-refine] [--out FILE]

Each method runs twice in one process on the float model of
``benchmarks/quality.py`` (any4, the method's default calibration): the first
run compiles, the second finds the compiled code in memory (the ``any4``
command keeps it on disk, so its second invocation is close to the second run).
Separately, the generated calibration text alone (``calibrate.generated_ids``,
8 x 512 tokens; part of every method but plain). Wall-clock seconds on this
machine, nothing else running; "vs plain" is each method's second run over the
plain method's, measured in the same run.
"""

import argparse
import os
import platform
import time
from pathlib import Path

import jax

from any4_jax import assets, calibrate, load_model
from any4_jax.quantize import quantize_model
from benchmarks.quality import smollm2_flax


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["plain", "gptq", "gptq-refine"])
    p.add_argument("--workdir", default=str(assets.cache_dir() / "bench"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize_time_smollm2.md"))
    args = p.parse_args()

    model, params, tok = load_model(smollm2_flax(args.workdir))

    rows = []
    for method in args.methods:
        run = lambda: quantize_model(model, params, tokenizer=tok, fmt="any4", group_size=args.group_size,
                                     method=method, progress=False)[1]
        first, second = timed(run), timed(run)
        rows.append((method, first, second))
        print(f"{method}: {first:.1f} s, then {second:.1f} s", flush=True)
    gen = timed(lambda: calibrate.generated_ids(model, params, tok))
    plain = dict((m, s) for m, _, s in rows).get("plain")

    lines = [f"# SmolLM2-135M-Instruct: quantization time by method (any4, G = {args.group_size})", "",
             f"Written by `python -m benchmarks.quantize_time --group-size {args.group_size} --methods "
             f"{' '.join(args.methods)}` (machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"jax {jax.__version__}). Wall-clock seconds; the second run has its code compiled.", "",
             "| method | first run s | second run s | vs plain |", "|---|---|---|---|"]
    for method, first, second in rows:
        ratio = f"{second / plain:.1f}x" if plain else "-"
        lines.append(f"| {method} | {first:.1f} | {second:.1f} | {ratio} |")
    lines += ["", f"Of which, outside 'plain': writing the generated calibration text (8 x 512 tokens, "
                  f"a second call): {gen:.1f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
