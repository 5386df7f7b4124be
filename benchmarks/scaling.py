"""How quantization time and decode latency change with 1, 2, 4, 8 devices.

    python -m benchmarks.scaling [--devices 1 2 4 8] [--rows 4096] [--cols 4096] [--out FILE.md]

Each device count runs in a process of its own (jax fixes the device count at
start; without accelerators, XLA_FLAGS gives it that many CPU devices):
  * any4 LUT learning of a rows x cols heavy-tailed matrix, rows spread over the
    devices (``quantize_tensor(..., mesh=...)``);
  * one decode step (batch 8, KV cache 256) of a Llama-shaped model (hidden 1024,
    4 layers, float and any4) with tensor-parallel sharded params.
Then an extrapolation (not a measurement) of Llama-3-70B's any4 LUT learning on
one such device: (70B-model linear weights) x (measured seconds per weight on one
device); it leaves out calibration, loading and saving, and assumes the cost per
weight stays the same at 70B's shapes. On CPU devices of one 2-core machine,
more devices share the same cores: the numbers show overheads, not a speed-up,
so no multi-device estimate is made. The table also goes to --out.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Llama-3-70B linear layers: 80 x (q, k, v, o, gate, up, down) as (N, K)
LLAMA3_70B_LINEAR = 80 * (8192 * 8192 * 2 + 1024 * 8192 * 2 + 28672 * 8192 * 3)


def worker(n, rows, cols):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from any4_jax import quantize_tensor
    from any4_jax.generation import decode_step
    from any4_jax.recipe import QuantDenseFactory, Recipe
    from any4_jax.models import ModelConfig, Transformer, init_cache
    from any4_jax.sharding import make_mesh, shard_params
    from benchmarks.generate_bench import random_params

    devices = jax.devices()[:n]
    mesh = make_mesh(1, n, devices=devices)
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    act = np.abs(rng.standard_normal(cols)).astype(np.float32)
    quantize_tensor(w[: 128 * n], "any4", 128, sample_weight=act, mesh=mesh)  # compile
    start = time.perf_counter()
    jax.block_until_ready(quantize_tensor(w, "any4", 128, sample_weight=act, mesh=mesh))
    q_seconds = time.perf_counter() - start

    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8))
    latency = {}
    for name, model in [("float", Transformer(config)),
                        ("any4", Transformer(config).clone(dense=QuantDenseFactory(Recipe("any4", 128), mesh=mesh)))]:
        step = jax.jit(decode_step, static_argnums=0, donate_argnums=4)
        params = shard_params(random_params(model, jax.random.PRNGKey(0), jnp.float32), mesh)
        cache = init_cache(config, 8, 256)
        token, pos = jnp.zeros(8, jnp.int32), jnp.zeros(8, jnp.int32)
        _, cache = step(model, params, token, pos, cache)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            logits, cache = step(model, params, token, pos, cache)
            logits.block_until_ready()
            times.append(time.perf_counter() - t)
        latency[name] = float(np.median(times))
    print(json.dumps({"devices": n, "quantize_s": q_seconds, "seconds_per_weight": q_seconds / (rows * cols),
                      "decode_ms_float": 1e3 * latency["float"], "decode_ms_any4": 1e3 * latency["any4"],
                      "platform": devices[0].platform}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/scaling_cpu.md")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.rows, args.cols)
    results = []
    for n in args.devices:
        out = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--worker", str(n), "--rows",
                              str(args.rows), "--cols", str(args.cols)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    lines = [f"Written by `python -m benchmarks.scaling --devices {' '.join(map(str, args.devices))} --rows "
             f"{args.rows} --cols {args.cols}` on {base['platform']} devices of one machine with {os.cpu_count()} "
             f"cores: any4 LUT learning of a {args.rows}x{args.cols} matrix; decode step of a 4-layer, "
             f"hidden-1024 Llama (batch 8).", "",
             "| devices | quantize s | vs 1 device | decode ms float | decode ms any4 |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['devices']} | {r['quantize_s']:.2f} | {base['quantize_s'] / r['quantize_s']:.2f}x | "
                     f"{r['decode_ms_float']:.2f} | {r['decode_ms_any4']:.2f} |")
    per_weight = base["seconds_per_weight"]
    est = LLAMA3_70B_LINEAR * per_weight
    lines += ["", f"Extrapolation, not measured: Llama-3-70B has {LLAMA3_70B_LINEAR / 1e9:.1f}B linear weights; at the "
              f"{per_weight * 1e9:.1f} ns/weight measured above on 1 {base['platform']} device, LUT learning alone "
              f"would take {est / 60:.0f} min on one such device (calibration, loading and saving left out; the "
              f"cost per weight assumed not to change with the shapes)."]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
