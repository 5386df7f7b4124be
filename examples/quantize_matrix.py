"""Quantize one real-shaped weight matrix with every format and print its error.

    python examples/quantize_matrix.py [--rows 1536] [--cols 576] [--group-size 128]

The matrix is heavy-tailed like an LLM's (Student-t), and a heavy-tailed
per-input-channel statistic stands in for calibration activations. The error
column is the activation-weighted reconstruction error relative to int4's.
"""

import argparse
import time

import jax
import numpy as np

from any4_jax import dequantize, quantize_tensor


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1536, help="N, output features")
    parser.add_argument("--cols", type=int, default=576, help="K, input features")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    w = (rng.standard_t(4, size=(args.rows, args.cols)) * 0.02).astype(np.float32)
    act = (np.abs(rng.standard_t(3, size=args.cols)) + 0.01).astype(np.float32)

    print(f"weight {args.rows}x{args.cols}, group size {args.group_size}, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}")
    print(f"{'format':<7}{'bits/weight':>12}{'weighted MSE':>15}{'vs int4':>9}{'seconds':>9}")
    errors = {}
    for fmt in ("int4", "fp4", "nf4", "any4", "int3", "any3", "int2", "any2"):
        start = time.perf_counter()
        qw = quantize_tensor(w, fmt, args.group_size, sample_weight=act)
        err = float(((np.asarray(dequantize(qw)) - w) ** 2 * act).mean())
        seconds = time.perf_counter() - start
        errors[fmt] = err
        print(f"{fmt:<7}{qw.bits_per_weight:>12.3f}{err:>15.3e}{err / errors['int4']:>9.3f}{seconds:>9.2f}")


if __name__ == "__main__":
    main()
