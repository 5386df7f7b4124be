"""Sharded quantization and inference on 8 CPU devices.

jax fixes its device count when it starts, so these checks run in a process of
their own with XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_multidevice_checks():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "python_files=check_*.py",
         "--rootdir", str(HERE / "multidevice"), str(HERE / "multidevice" / "check_sharding.py")],
        env=env, capture_output=True, text=True, timeout=1200)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in summary and "failed" not in summary, summary
