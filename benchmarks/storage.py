"""What a quantized weight costs in storage: writes benchmarks/results/storage.md.

    python benchmarks/storage.py [--workdir DIR] [--out FILE]

1. Bits per weight as stored (`QuantizedWeight.bits_per_weight`: codes + LUT +
   scales + zeros) of any4 matrices of SmolLM2's shapes (K = 576) and of an
   8B-shaped layer (K = 4096), G = 64 and 128, bfloat16 and float32 metadata.
2. SmolLM2-135M on disk: the float32 and bfloat16 Flax checkpoints and the any4
   checkpoint (G = 128, bf16 metadata), each written by this script.
"""

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from any4_jax import assets, load_model, quantize_model, quantize_tensor, save_model
from converters import hf2flax

SHAPES = [("SmolLM2 q_proj", 576, 576), ("SmolLM2 gate_proj", 1536, 576), ("SmolLM2 down_proj", 576, 1536),
          ("Llama-3-8B q_proj", 4096, 4096), ("Llama-3-8B down_proj", 4096, 14336)]


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(assets.cache_dir() / "bench-storage"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "storage.md"))
    args = p.parse_args()
    work = Path(args.workdir)
    rng = np.random.default_rng(0)

    lines = ["# Storage: bits per weight and size on disk", "",
             f"Written by `python benchmarks/storage.py` ({platform.machine()}, {os.cpu_count()} CPU cores, "
             f"jax {jax.__version__}). Bits per weight count everything stored: 4-bit codes, one 16-entry LUT "
             "per row, a scale and a zero per group.", "",
             "| matrix (N x K) | G | bf16 metadata | float32 metadata |", "|---|---|---|---|"]
    for name, n, k in SHAPES:
        w = (rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32)
        for g in (128, 64):
            bpw = [quantize_tensor(w, "any4", g, storage_dtype=dt, n_init=1).bits_per_weight
                   for dt in ("bfloat16", "float32")]
            lines.append(f"| {name} ({n} x {k}) | {g} | {bpw[0]:.3f} | {bpw[1]:.3f} |")
            print(lines[-1], flush=True)

    hf_dir = assets.smollm2()
    sizes = []
    for dtype in ("float32", "bfloat16"):
        out = work / f"smollm2-{dtype}"
        if not (out / "manifest.json").exists():
            hf2flax.convert(hf_dir, out, dtype=dtype, overwrite=True, progress=False)
        sizes.append((f"float ({dtype})", dir_bytes(out / "params"), None))
    model, params, tok = load_model(work / "smollm2-float32")
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    embedding = params["embed_tokens"]["embedding"].size
    start = time.perf_counter()
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=128, tokenizer=tok, progress=False)
    print(f"any4 quantization: {time.perf_counter() - start:.1f} s", flush=True)
    manifest = save_model(work / "smollm2-any4", qmodel, qparams, tok, overwrite=True)
    sizes.append(("any4, G = 128, bf16 metadata", dir_bytes(work / "smollm2-any4" / "params"),
                  manifest["quantization"]["bits_per_weight"]))
    lines += ["", "## SmolLM2-135M-Instruct on disk (orbax `params/`)", "",
              f"Embeddings ({embedding / 1e6:.1f}M of the {total / 1e6:.1f}M parameters, tied with the output "
              "layer) and norms stay float32 in the any4 checkpoint; every linear layer is quantized.", "",
              "| checkpoint | MB | vs float32 | bits/weight of the quantized layers |", "|---|---|---|---|"]
    for label, size, bpw in sizes:
        lines.append(f"| {label} | {size / 1e6:.1f} | {size / sizes[0][1]:.2f}x | {'' if bpw is None else bpw} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
