"""Smoke tests: the examples and the demo run as a user would run them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_own_flax_model_example(tmp_path):
    out = run([str(ROOT / "examples" / "own_flax_model.py"), "--steps", "150"], tmp_path)
    rows = dict(re.findall(r"^(\w+)\s+([\d.]+)\s+[\d.]+$", out, re.M))
    assert set(rows) == {"float", "any4", "nf4", "int4", "any2", "int2"}, out
    assert float(rows["float"]) > 0.9 and float(rows["any4"]) > 0.9, out


def test_quantize_and_generate_example(tmp_path, smollm2_hf):
    out = run([str(ROOT / "examples" / "quantize_and_generate.py"), "--workdir", str(tmp_path), "--windows", "1"],
              tmp_path)
    fp, any4 = map(float, re.search(r"float ([\d.]+), any4 ([\d.]+)", out).groups())
    assert fp < any4 < 60, out
    assert "any4 answers:" in out


def test_quantize_matrix_example(tmp_path):
    out = run([str(ROOT / "examples" / "quantize_matrix.py"), "--rows", "256", "--cols", "576"], tmp_path)
    ratio = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+[\d.]+\s+[\d.e+-]+\s+([\d.]+)", out, re.M)}
    assert ratio["any4"] < ratio["nf4"] < ratio["int4"] < ratio["fp4"], out


def test_demo(tmp_path, smollm2_hf):
    out = run(["-m", "any4_jax.cli", "demo", "--workdir", str(tmp_path), "--windows", "1", "--seq-len", "512",
               "--max-new-tokens", "8"], tmp_path)
    ppl = dict(re.findall(r"^\| (\S+)\s*\|\s+([\d.]+) \|", out, re.M))
    assert set(ppl) == {"float*", "int4", "fp4", "nf4", "any4"}, out
    assert float(ppl["any4"]) < float(ppl["int4"]), out
    assert (tmp_path / "smollm2-any4" / "manifest.json").exists()
    answer = re.search(r"^assistant: (.+)$", out, re.M)
    assert answer and len(answer.group(1).split()) >= 3 and "<|im_" not in answer.group(1), out
