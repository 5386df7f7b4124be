#!/usr/bin/env bash
# GPU check of the Pallas LUT matmul, in one go (meant to take under 8 minutes on an H100/H200):
#   1. every test of tests/test_lut_matmul.py, compiled for the GPU (interpret=False there: the
#      bounds, masking, odd-K and N < 16 tests too), and the model on the kernel path;
#   2. kernel vs bf16 vs the XLA path for M = 1, 16, 64 at K = N = 4096 and 8192, each output
#      compared with the reference before it is timed (benchmarks/matmul_bench.py);
#   3. with --tune, the block tuner (its table goes to the output directory, not the source tree).
# Everything goes to one directory, $OUT when set (a remote GPU machine brings it back), else
# benchmarks/results/; the report is gpu_check_<device>.md there. Exits non-zero if a test fails
# or a kernel output is wrong.
#
# Usage (from the repository root): bash scripts/gpu_check.sh [--tune] [--cpu] [--break-kernel] [--select EXPR]
#   --cpu           no GPU: the same tests in interpret mode, no timings (to check this script)
#   --break-kernel  every kernel output is off by one (tests/conftest.py): the check must fail
#   --select EXPR   only the tests pytest -k EXPR selects
set -uo pipefail
export PYTHONUNBUFFERED=1
tune=0 cpu=0 select=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tune) tune=1 ;;
    --cpu) cpu=1 ;;
    --break-kernel) export ANY4_JAX_TEST_BREAK_KERNEL=1 ;;
    --select) select="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (accepted: --tune --cpu --break-kernel --select EXPR)" >&2; exit 2 ;;
  esac
  shift
done
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
if [ "$cpu" = 0 ] && ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "gpu_check.sh: jax sees no GPU here (pass --cpu to run the tests in interpret mode)" >&2
  exit 2
fi
device=$(python -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))") || {
  echo "gpu_check.sh: this python cannot import jax (activate the environment the project is installed in)" >&2
  exit 2
}
report="$out_dir/gpu_check_${device}.md"
status=0
start=$SECONDS

tests_log="$out_dir/gpu_check_tests.log"
timeout 300 python -m pytest -q -rA -p no:cacheprovider -o addopts= tests/test_lut_matmul.py ${select:+-k "$select"} \
  >"$tests_log" 2>&1 || status=1

bench="$out_dir/matmul_bench.md"
if [ "$cpu" = 0 ]; then
  timeout 240 python -m benchmarks.matmul_bench --m 1 16 64 --shapes 4096x4096 8192x8192 --formats any4 \
    --out "$bench" >"$out_dir/matmul_bench.log" 2>&1 || status=1
  if [ "$tune" = 1 ]; then
    timeout 240 python -m benchmarks.tune_lut_matmul --m 1 16 --budget-s 180 --out "$out_dir/tuned_blocks.json" \
      >"$out_dir/tune.log" 2>&1 || status=1
  fi
fi

{
  echo "# GPU check on ${device}"
  echo
  echo "Written by \`bash scripts/gpu_check.sh$([ "$cpu" = 1 ] && echo " --cpu")$([ -n "${ANY4_JAX_TEST_BREAK_KERNEL:-}" ] && echo " --break-kernel")\` in $((SECONDS - start)) s; exit status $status."
  python - <<'EOF'
import importlib.metadata as md, jax
versions = []
for name in ("jax", "jaxlib", "triton", "jax-cuda12-plugin", "jax-cuda13-plugin"):
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
d = jax.devices()[0]
print(f"\nDevice: {d.device_kind} ({d.platform}, compute capability {getattr(d, 'compute_capability', 'n/a')}); "
      + ", ".join(versions) + ".")
EOF
  echo
  echo "## Tests (tests/test_lut_matmul.py, compiled for this device)"
  echo
  echo '```'
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$tests_log" | tail -200
  echo '```'
  if [ -f "$bench" ] && [ "$cpu" = 0 ]; then
    echo
    echo "## Kernel vs bf16 (every output checked against the reference first)"
    echo
    cat "$bench"
  fi
} >"$report"
echo "wrote $report (exit status $status)"
exit $status
