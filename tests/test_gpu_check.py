"""scripts/gpu_check.sh can fail: a deliberately broken kernel makes it exit non-zero
(shown here in interpret mode, --cpu), a sound one exits 0, and the report says which."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_check(tmp_path, *flags):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("ANY4_JAX_TEST_BREAK_KERNEL", None)
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--select", "fewer_rows", *flags], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    reports = list(tmp_path.glob("gpu_check_*.md"))
    assert len(reports) == 1, r.stderr
    return r.returncode, reports[0].read_text()


def test_gpu_check_exits_non_zero_on_a_broken_kernel(tmp_path):
    rc, report = run_check(tmp_path / "ok")
    assert rc == 0 and "exit status 0" in report and "2 passed" in report and "FAILED" not in report, report
    rc, report = run_check(tmp_path / "broken", "--break-kernel")
    assert rc == 1 and "exit status 1" in report and "--break-kernel" in report, report
    assert report.count("FAILED tests/test_lut_matmul.py::test_fewer_rows_than_one_block") == 2, report


def test_gpu_check_refuses_unknown_arguments(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 2 and "unknown argument --fast" in r.stderr
