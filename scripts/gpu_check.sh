#!/usr/bin/env bash
# GPU check for the Pallas LUT matmul, in one go (under 8 minutes on an H100/H200):
#   1. the kernel tests compiled for the GPU (interpret=False) and the model on the kernel path,
#   2. the matmul benchmark (kernel vs bf16 vs the XLA path, timed inside one jit).
# Everything it writes goes to one directory: $OUT when set (a remote GPU machine brings it
# back), else benchmarks/results/. The report is gpu_<device>.md there.
# Usage (on the GPU machine, from the repository root): bash scripts/gpu_check.sh [--tune]
set -uo pipefail
export PYTHONUNBUFFERED=1
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
device=$(python -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
report="$out_dir/gpu_${device}.md"
{
  echo "# GPU check on ${device}"
  echo
  echo "Written by \`bash scripts/gpu_check.sh\`. Kernel tests compiled for the GPU:"
  echo
  echo '```'
  timeout 240 python -m pytest -q -x tests/test_lut_matmul.py -k "gpu or interpret or kernel" 2>&1 | tail -15
  echo '```'
  echo
} > "$report"
if [ "${1:-}" = "--tune" ]; then
  timeout 300 python -m benchmarks.tune_lut_matmul --m 1 16 --budget-s 240 2>&1 | tail -20 | tee "$out_dir/tune.log"
fi
timeout 300 python -m benchmarks.matmul_bench --m 1 16 64 --out "$out_dir/matmul_bench.md" 2>&1 | tail -40
cat "$out_dir/matmul_bench.md" >> "$report"
echo "wrote $report"
