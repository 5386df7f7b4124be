"""Real model sizes on this machine: writes benchmarks/results/scale_cpu.md.

    python -m benchmarks.scale [--sizes 1b 3b 8b] [--gptq 1b 8b] [--blocks-8b] [--block-70b] [--workdir DIR] [--out FILE]

For each size, a Llama-shaped Hugging Face checkpoint of random bf16 weights
(sharded safetensors, written here into a temporary folder under --workdir,
deleted after; never committed) with SmolLM2's tokenizer files, then each step
as a user runs it, in a child process: ``any4 convert`` (bf16 in, bf16 out),
``any4 quantize --format any4`` (plain, the built-in prompt), ``--method gptq``
where asked, and ``any4 generate`` of 16 tokens from the any4 model. Each
row: wall time and peak RSS of the child (``os.wait4``), the RSS as a multiple
of the bf16 model, and the size of what it wrote. Values do not matter for
memory and time, sizes do; quality needs real weights and is not measured here.

``--block-70b``: one decoder block of Llama-3-70B's shape (hidden 8192, FFN
28672) measured alone, and a projection of the whole model from it (80 blocks);
``--blocks-8b``: Llama-3-8B's first 4 blocks (its whole embedding and head),
plain and GPTQ, projected to 32 blocks — a check of the projection where the
whole model's plain row is measured too. Projections are labelled as such.

Results are kept in a JSON file beside the table, keyed by size and step (and
the git commit that measured them), rewritten after every step; a rerun skips
the steps it has (``--redo`` measures them again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=8192,
             vocab_size=128256, rope_theta=500000.0, attention_bias=False, torch_dtype="bfloat16")
SIZES = {
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "3b": dict(LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # the first 4 of Llama-3-8B's 32 blocks (its whole embedding and head): GPTQ projected from them
    "8b-4": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # one block of Llama-3-70B's shape; a small vocabulary, so the block is what is measured
    "70b-block": dict(LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=1,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                      vocab_size=49152),  # the tokenizer's (SmolLM2's): every id it makes has a row
}
NAMES = {"1b": "Llama-3.2-1B shape", "3b": "Llama-3.2-3B shape", "8b": "Llama-3-8B shape",
         "8b-4": "Llama-3-8B shape, 4 of its 32 blocks", "70b-block": "one Llama-3-70B block"}
# sampled sizes: (the whole model, its blocks over the blocks measured)
PROJECTED = {"8b-4": ("Llama-3-8B", 32 / 4, "its first 4 of 32 blocks"),
             "70b-block": ("Llama-3-70B", 80, "one of its 80 blocks")}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a Llama checkpoint of ``config``."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d, q, kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q * d, h),
                       p + "self_attn.k_proj.weight": (kv * d, h), p + "self_attn.v_proj.weight": (kv * d, h),
                       p + "self_attn.o_proj.weight": (h, q * d), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_random_checkpoint(out_dir, config: dict, *, dtype=ml_dtypes.bfloat16, seed: int = 0,
                            shard_bytes: int = 5 << 30) -> int:
    """Write an HF checkpoint of ``config`` with random weights (normal, std
    0.02; norms 1) as sharded safetensors + index, one tensor at a time (memory:
    one tensor). Returns the bytes of weights written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal((1 << 24) + (1 << 20), np.float32) * 0.02).astype(dtype)  # windows of it
    shapes = tensor_shapes(config)
    itemsize = np.dtype(dtype).itemsize
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    dtype_name = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32"}[np.dtype(dtype)]
    for s, names in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = int(np.prod(shapes[name])) * itemsize
            header[name] = {"dtype": dtype_name, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out / file, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name in names:
                n = int(np.prod(shapes[name]))
                if name.endswith("norm.weight"):
                    f.write(np.ones(n, dtype).tobytes())
                    continue
                done = 0
                while done < n:  # random windows of the pool: fast, and no two rows alike
                    take = min(n - done, 1 << 24)
                    start = int(rng.integers(0, len(pool) - take + 1))
                    f.write(pool[start:start + take].tobytes())
                    done += take
        total += offset
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return total


# Runs a Python command line and, at exit, writes its peak RSS (VmHWM, kB) to a file. The peak
# is read inside the process: a child's rusage also counts the parent it was forked from.
_PEAK = """
import atexit, runpy, sys
report = sys.argv.pop(1)
def peak():
    with open('/proc/self/status') as status, open(report, 'w') as out:
        out.write(next(l for l in status if l.startswith('VmHWM:')).split()[1])
atexit.register(peak)
how, what, sys.argv = sys.argv[1], sys.argv[2], [sys.argv[2]] + sys.argv[3:]
if how == '-m':
    runpy.run_module(what, run_name='__main__', alter_sys=True)
else:
    exec(compile(what, '<string>', 'exec'), {'__name__': '__main__'})
"""


def peak_rss_of(argv, env=None, timeout=None, cwd=None) -> dict:
    """Run the Python command line ``argv`` (``[python, "-m", module, ...]`` or
    ``[python, "-c", code, ...]``) as a child process: its wall time, exit code,
    peak RSS in bytes (its own high-water mark, read as it exits) and the end of
    its output."""
    if len(argv) < 3 or argv[1] not in ("-m", "-c"):
        raise ValueError(f"expected [python, '-m' or '-c', ...]; got {argv[:3]}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "peak"
        r = subprocess.run([argv[0], "-c", _PEAK, str(report), *argv[1:]], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, timeout=timeout, cwd=cwd)
        rss = int(report.read_text()) * 1024 if report.exists() else None
    return {"s": round(time.perf_counter() - start, 1), "rc": r.returncode, "rss": rss, "output": r.stdout[-3000:]}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def _git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


def steps(size: str, gptq: bool) -> list[tuple[str, list[str]]]:
    """``(step, any4 arguments)`` for one size, in order; paths relative to its work folder."""
    out = [("convert", ["convert", "--model", "hf", "--out", "flax"]),
           ("quantize any4 (plain)", ["quantize", "--model", "flax", "--out", "any4", "--format", "any4"])]
    if gptq:
        out.append(("quantize any4 (gptq)", ["quantize", "--model", "flax", "--out", "any4-gptq", "--format", "any4",
                                             "--method", "gptq"]))
    if size not in PROJECTED:
        out.append(("generate 16 tokens (any4)", ["generate", "--model", "any4", "--prompt",
                                                  "The capital of France is", "--max-new-tokens", "16"]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="*", default=["1b", "3b", "8b"], choices=[s for s in SIZES if s not in PROJECTED])
    p.add_argument("--gptq", nargs="*", default=["1b"], help="sizes that also run --method gptq")
    p.add_argument("--blocks-8b", action="store_true", help="also measure 4 of the 8B's blocks (GPTQ too) and project")
    p.add_argument("--block-70b", action="store_true", help="also measure one 70B-shaped block and project")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the checkpoints go (deleted after)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_cpu.md"))
    p.add_argument("--redo", action="store_true", help="measure again the steps the results already hold")
    args = p.parse_args()
    from any4_jax import assets  # SmolLM2's tokenizer files: a real tokenizer for the random models

    results_file = Path(args.out).with_suffix(".json")
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    sizes = list(args.sizes) + ["8b-4"] * args.blocks_8b + ["70b-block"] * args.block_70b
    for size in sizes:
        size_steps = steps(size, size in args.gptq or size in PROJECTED)
        if not args.redo and all(f"{size} | {name}" in results for name, _ in size_steps):
            continue  # each step needs the ones before it: a size is measured whole
        work = Path(tempfile.mkdtemp(prefix=f"any4-scale-{size}-", dir=args.workdir))
        try:
            start = time.perf_counter()
            model_bytes = write_random_checkpoint(work / "hf", SIZES[size])
            for f in assets.smollm2().iterdir():
                if f.name.startswith("tokenizer") or f.suffix == ".jinja":
                    shutil.copy(f, work / "hf" / f.name)
            print(f"{size}: wrote {model_bytes / 2**30:.2f} GiB of random bf16 weights in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            for name, argv in size_steps:
                r = peak_rss_of([sys.executable, "-m", "any4_jax.cli", *argv], env=env, timeout=4 * 3600, cwd=work)
                if r["rc"] != 0:
                    raise RuntimeError(f"{size} {name} failed:\n{r['output']}")
                written = argv[argv.index("--out") + 1] if "--out" in argv else None
                results[f"{size} | {name}"] = {
                    "size": size, "step": name, "s": r["s"], "rss": r["rss"], "model_bytes": model_bytes,
                    "written_bytes": dir_bytes(work / written) if written else None, "commit": _git_commit()}
                print(f"{size} {name}: {r['s']} s, peak RSS {r['rss'] / 2**30:.2f} GiB", flush=True)
                results_file.write_text(json.dumps(results, indent=1) + "\n")
                write_table(results, args.out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    write_table(results, args.out)


def write_table(results: dict, out):
    """The markdown of ``results`` (rendered from the JSON alone)."""
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = ["# Real model sizes on a CPU: time and peak memory per step", "",
             f"Written by `python -m benchmarks.scale` (machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory). "
             "Llama-shaped Hugging Face checkpoints of random bf16 weights (written by the script into a "
             "temporary folder, deleted after; SmolLM2's tokenizer), each step as the `any4` command in a child "
             "process: wall time and that process's peak RSS (its own high-water mark, VmHWM). 'x model' is the "
             "peak RSS over the bf16 checkpoint's size. Calibration: `quantize` plain uses the built-in prompt, "
             "`--method gptq` the generated text (SmolLM2-135M-Instruct's, cached before the run). Random weights: "
             "memory and time are those of the real shapes; quality is not measured here.", "",
             "| model | bf16 on disk (GiB) | step | s | peak RSS (GiB) | x model | written (GiB) | commit |",
             "|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SIZES)}
    rows = sorted(results.values(), key=lambda r: (order[r["size"]], list(results.values()).index(r)))
    for r in rows:
        written = gib(r["written_bytes"]) if r["written_bytes"] else "-"
        lines.append(f"| {NAMES[r['size']]} | {gib(r['model_bytes'])} | {r['step']} | {r['s']:.0f} | "
                     f"{gib(r['rss'])} | {r['rss'] / r['model_bytes']:.2f} | {written} | {r['commit']} |")
    for size, (whole, factor, part) in PROJECTED.items():
        sample = {r["step"]: r for r in rows if r["size"] == size}
        if not sample:
            continue
        lines += ["", f"## {whole}, projected from {part} (a projection, not a measurement)", "",
                  f"Projected: a step's time x {factor:g}, the whole model's blocks over the blocks measured (the "
                  "embedding, the head and the process start counted that many times: an overestimate); peak memory "
                  "as measured, since the streaming path holds one block at a time."]
        measured = {r["step"]: r for r in rows if r["size"] == "8b"} if size == "8b-4" else {}
        if size == "70b-block":
            lines[-1] += (" Its checkpoint holds a 49152-token embedding and head besides the block. Left out: "
                          "reading and writing ~140 GB of weights (disk speed: not measured here), and the real "
                          "128256-token embedding and head (2 GiB each in bf16: about 4 GiB more RSS while each "
                          "is converted or written, as the 8B rows show for their 1 GiB).")
        if measured:
            lines[-1] += " Where the whole model was measured too (above), its time is beside the projection."
        lines += ["", f"| step | measured (s) | {whole} projected (h) | {whole} measured (h) | peak RSS (GiB) |",
                  "|---|---|---|---|---|"]
        for name, r in sample.items():
            full = f"{measured[name]['s'] / 3600:.2f}" if name in measured else "-"
            lines.append(f"| {name} | {r['s']:.0f} | {r['s'] * factor / 3600:.2f} | {full} | {gib(r['rss'])} |")
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
