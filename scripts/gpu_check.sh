#!/usr/bin/env bash
# GPU check for the Pallas LUT matmul, in one go (about 8 minutes on an H100):
#   1. the kernel tests compiled for the GPU (interpret=False),
#   2. the matmul benchmark, written to benchmarks/results/gpu_<device>.md.
# Usage (on the GPU machine, from the repository root): bash scripts/gpu_check.sh [--tune]
set -uo pipefail
export PYTHONUNBUFFERED=1
device=$(python -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
out="benchmarks/results/gpu_${device}.md"
mkdir -p benchmarks/results
{
  echo "# GPU check on ${device}"
  echo
  echo '```'
  timeout 180 python -m pytest -q -x tests/test_lut_matmul.py -k "gpu or interpret" 2>&1 | tail -15
  echo '```'
  echo
} > "$out"
if [ "${1:-}" = "--tune" ]; then
  timeout 300 python -m benchmarks.tune_lut_matmul --m 1 --budget-s 240 2>&1 | tail -20
fi
timeout 240 python -m benchmarks.matmul_bench --m 1 4 16 --iters 30 --out /tmp/bench.md 2>&1 | tail -40
cat /tmp/bench.md >> "$out"
echo "wrote $out"
