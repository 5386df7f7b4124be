"""Render the static kernel analysis (sm_90, no GPU) as benchmarks/results/kernel_static_sm90.md.

    python benchmarks/kernel_static_table.py benchmarks/results/kernel_static_*.json

Each JSON file is the output of the static analysis tool (kernel_static, kept
outside this repository; its README says how to install it), run from the
repository root as

    python KERNEL_STATIC/kernel_static.py --entry pallas_kernels.lut_matmul:static_entry \\
        --m 1,16,64 --n N --k K --group-size 128 --json benchmarks/results/kernel_static_NxK.json
    (and ``--bits 3`` / ``--bits 2`` into ``kernel_static_NxK_b3.json`` / ``_b2.json``)

It compiles the kernel offline to H100 machine code and counts what it does:
these are instruction counts and a roofline model, not timings.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "kernel_static_sm90.md"


def main(paths):
    lines = ["# The LUT matmul compiled for sm_90 (H100), counted statically", "",
             "Written by `python benchmarks/kernel_static_table.py benchmarks/results/kernel_static_*.json` from the "
             "static analysis tool's JSON (command in each section). Instruction counts and a roofline model "
             "(memory at 70% of 3.35 TB/s, one instruction per scheduler per cycle), not timings; bf16 is an "
             "XLA dot of the same shape at 90% of peak. any4 weights of 4, 3 or 2 bits, G = 128, bf16 x and "
             "metadata; the last column compares the estimate with the 4-bit kernel's for the same shape and M.", ""]
    runs = {path: json.loads(Path(path).read_text()) for path in sorted(paths)}
    four_bit = {(r["args"]["n"], r["args"]["k"], s["m"]): s["t_est_us"] for d in runs.values()
                for r, s in zip(d["runs"], d["summary"]) if r["args"].get("bits", 4) == 4}
    for path, d in sorted(runs.items(), key=lambda kv: (kv[1]["runs"][0]["args"]["n"],
                                                         -kv[1]["runs"][0]["args"].get("bits", 4))):
        args = d["runs"][0]["args"]
        bits = args.get("bits", 4)
        lines += [f"## N = {args['n']}, K = {args['k']}, G = {args['group_size']}, {bits}-bit codes", "",
                  f"`python KERNEL_STATIC/kernel_static.py --entry {args['entry']} --m "
                  f"{','.join(str(r['m']) for r in d['summary'])} --n {args['n']} --k {args['k']} --group-size "
                  f"{args['group_size']}{'' if bits == 4 else f' --bits {bits}'} --json {path}` "
                  f"(tool {d['tool_version']})", "",
                  "| M | config | SASS instr / weight (K loop) | registers | spills | prefetch | XLA ops besides "
                  "the kernel | estimate us (bound) | bf16 us | estimated speedup | vs 4-bit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for run, s in zip(d["runs"], d["summary"]):
            cfg = run["config"]
            config = f"block_m {cfg.get('block_m')}, block_n {cfg.get('block_n')}, block_k {cfg.get('block_k')}, " \
                     f"warps {cfg.get('num_warps')}, stages {cfg.get('num_stages')}"
            lines.append(f"| {s['m']} | {config} | {s['instr_per_weight']:.2f} | {s['registers']} | "
                         f"{s['spill_bytes']} B | {'yes' if s['prefetch'] else 'no'} | {s['xla_launches']} | "
                         f"{s['t_est_us']:.1f} ({s['bound']}) | {s['t_bf16_us']:.1f} | {s['speedup']:.2f}x | "
                         f"{ratio(four_bit.get((args['n'], args['k'], s['m'])), s['t_est_us'])} |")
        lines.append("")
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


def ratio(base, t):
    return "-" if base is None else f"{base / t:.2f}x"


if __name__ == "__main__":
    main(sys.argv[1:])
