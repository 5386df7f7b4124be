"""Untrusted or careless input loses nothing (#12). `--overwrite` replaces only what
this project wrote — never the current directory, an input or a folder holding one,
a file, or a foreign folder (each of these used to be deleted); a shard index may
not point outside its folder; a config that disagrees with the params fails at load."""

import os
import subprocess
import sys

import pytest

from any4_jax import cli
from any4_jax.checkpoint import check_output_dir
from converters import hf2flax
from hf_models import make_hf_model, save


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory holding an HF model and an unrelated file of the user's."""
    monkeypatch.chdir(tmp_path)
    src = save(make_hf_model("llama"), tmp_path / "hf", "safetensors")
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path, src


def intact(root, src):
    return (root / "notes.txt").read_text() == "mine" and (src / "model.safetensors").is_file() and \
        not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("out, why", [
    (".", "is the current directory or one of its parents"),
    ("hf", "is the input"),          # --out == --model
    ("..", "current directory or one of its parents"),
    ("notes.txt", "is a file"),
])
def test_hf2flax_overwrite_refuses_and_deletes_nothing(workspace, capsys, out, why):
    root, src = workspace
    assert hf2flax.main(["--model", str(src), "--out", out, "--overwrite"]) == 2
    assert why in capsys.readouterr().err
    assert intact(root, src)


def test_overwrite_refuses_a_folder_that_holds_the_input(workspace, capsys):
    root, src = workspace
    nested = save(make_hf_model("llama"), root / "models" / "hf", "safetensors")
    assert hf2flax.main(["--model", str(nested), "--out", str(root / "models"), "--overwrite"]) == 2
    assert "holds it" in capsys.readouterr().err
    assert (nested / "model.safetensors").is_file()


def test_overwrite_refuses_a_foreign_folder_but_replaces_its_own(workspace, capsys):
    root, src = workspace
    foreign = root / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert hf2flax.main(["--model", str(src), "--out", str(foreign), "--overwrite"]) == 2
    assert "not a model directory written by any4-jax" in capsys.readouterr().err
    assert (foreign / "cat.jpg").is_file()
    # a model directory written here, and an empty one, may be replaced
    assert hf2flax.main(["--model", str(src), "--out", "flax"]) == 0
    assert hf2flax.main(["--model", str(src), "--out", "flax", "--overwrite"]) == 0
    (root / "empty").mkdir()
    assert hf2flax.main(["--model", str(src), "--out", "empty", "--overwrite"]) == 0
    assert (root / "empty" / "manifest.json").is_file() and intact(root, src)


def test_quantize_refuses_to_overwrite_its_own_input(workspace, capsys):
    root, src = workspace
    assert hf2flax.main(["--model", str(src), "--out", "flax"]) == 0
    before = sorted(os.listdir(root / "flax"))
    assert cli.main(["quantize", "--model", "flax", "--out", "flax", "--overwrite", "--calibration", "none"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert sorted(os.listdir(root / "flax")) == before


def test_a_new_path_needs_no_overwrite(tmp_path):
    assert check_output_dir(tmp_path / "new") == (tmp_path / "new").absolute()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        check_output_dir(tmp_path)


def test_an_index_naming_a_shard_outside_the_folder_is_refused(workspace, capsys):
    import json
    root, src = workspace
    sharded = save(make_hf_model("llama"), root / "sharded", "sharded")
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    for evil in ("../notes.txt", str(root / "notes.txt")):
        data["weight_map"][first] = evil
        index.write_text(json.dumps(data))
        assert hf2flax.main(["--model", str(sharded), "--out", "flax"]) == 2
        assert "outside" in capsys.readouterr().err
    assert intact(root, src) and not (root / "flax").exists()


def test_config_that_disagrees_with_the_params_fails_at_load(workspace):
    import json

    from any4_jax import load_model
    from any4_jax.checkpoint import CheckpointError
    root, src = workspace
    assert hf2flax.main(["--model", str(src), "--out", "flax"]) == 0
    config = json.loads((root / "flax" / "config.json").read_text())
    config["intermediate_size"] *= 2
    (root / "flax" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp/gate_proj/kernel is \(\d+, \d+\), the model needs"):
        load_model(root / "flax")


def test_unwritable_out_is_refused_before_any_work(tiny_model):
    """/proc refuses new directories even to root; nothing is converted first."""
    from any4_jax.checkpoint import check_output_dir
    with pytest.raises(PermissionError, match=r"cannot write /proc/any4-test/model: /proc is not writable"):
        check_output_dir("/proc/any4-test/model")
    _, flax_dir = tiny_model("llama")
    r = subprocess.run([sys.executable, "-m", "any4_jax.cli", "quantize", "--model", str(flax_dir),
                        "--out", "/proc/any4-test/model"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: cannot write")
    assert "quantizing" not in r.stderr  # refused before the work
