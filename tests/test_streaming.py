"""One block at a time: streaming conversion and quantization give what the
in-memory path gives, survive a kill, refuse changed work, and stay within a
memory bound that holding the model whole would break."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from any4_jax import cli, load_model
from any4_jax.calibrate import capture, forward
from any4_jax.checkpoint import CheckpointError, ResumableWrite, open_model_dir
from any4_jax.models import stages
from any4_jax.quantize import quantize_checkpoint, quantize_model
from benchmarks.scale import peak_rss_of, write_random_checkpoint
from converters import hf2flax

ROOT = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(4).integers(0, 128, size=(4, 64)).astype(np.int32)


def leaves(params) -> dict:
    """``{path: float32 numpy array}`` of every array, a QuantizedWeight's four included."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): np.asarray(jnp.asarray(v, jnp.float32)) for p, v in flat}


def assert_same(a, b):
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


METHODS = {
    "any4": dict(fmt="any4", group_size=32),
    "any4-uncalibrated": dict(fmt="any4", group_size=32, calibration=None),
    "any4-sequential": dict(fmt="any4", group_size=32, sequential=True),
    "any4-gptq-refine": dict(fmt="any4", group_size=32, method="gptq-refine", refine_steps=3),
    "int4-gptq-sequential": dict(fmt="int4", group_size=32, method="gptq", sequential=True),
    "nf4-refine": dict(fmt="nf4", group_size=None, refine_steps=3),
}


@pytest.mark.parametrize("arch, method", [("llama", m) for m in METHODS] + [
    ("mixtral", "any4"), ("mixtral", "any4-sequential"), ("llama3", "any4-gptq-refine"),
    ("qwen2_mha", "awq")])
def test_streaming_gives_the_in_memory_weights(tiny_model, tmp_path, arch, method):
    """quantize_checkpoint (one stage in memory at a time, from the model
    directory) and quantize_model (whole params in memory) agree bit for bit,
    for every method; the saved model computes what the in-memory one does."""
    _, flax_dir = tiny_model(arch)
    kw = dict(fmt="int4", group_size=32, method="awq") if method == "awq" else dict(METHODS[method])
    kw.setdefault("calibration", IDS)
    model, params, _ = load_model(flax_dir)
    qmodel, expected = quantize_model(model, params, progress=False, **kw)
    manifest = quantize_checkpoint(open_model_dir(flax_dir), tmp_path / "q", progress=False, **kw)
    streamed_model, streamed, _ = load_model(tmp_path / "q")
    assert_same(streamed, expected)
    assert json.loads(json.dumps(manifest)) == json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert streamed_model.dense.recipe == qmodel.dense.recipe
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "manifest.json", "params"]
    np.testing.assert_array_equal(np.asarray(streamed_model.apply({"params": streamed}, IDS[:1])),
                                  np.asarray(qmodel.apply({"params": expected}, IDS[:1])))


def test_converting_and_quantizing_in_one_step_equals_two(tiny_model, tmp_path):
    """From the Hugging Face folder (no float copy written) or from its converted
    directory: the same weights."""
    hf, flax_dir = tiny_model("llama")
    from hf_models import save
    src = save(hf, tmp_path / "hf", "safetensors")
    kw = dict(fmt="any4", group_size=32, calibration=IDS, progress=False)
    quantize_checkpoint(hf2flax.open_hf_dir(src), tmp_path / "one", **kw)
    quantize_checkpoint(open_model_dir(flax_dir), tmp_path / "two", **kw)
    assert_same(load_model(tmp_path / "one")[1], load_model(tmp_path / "two")[1])


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_stages_in_turn_compute_the_model(tiny_model, arch):
    """The embedding, each block and the head, run one after another on their own
    params, give the whole model's logits (what calibrating block by block needs)."""
    _, flax_dir = tiny_model(arch)
    model, params, _ = load_model(flax_dir)
    xs = None
    for stage in stages(model):
        xs = forward(stage, params, [IDS], xs)
    np.testing.assert_allclose(np.asarray(xs[0]), np.asarray(model.apply({"params": params}, IDS)),
                               rtol=1e-6, atol=1e-6)


def test_capture_groups_layers_by_their_input(tiny_model):
    """q/k/v read one input and share one Hessian; gate/up another; o and down their own."""
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    block = stages(model)[1]
    x = forward(stages(model)[0], params, [IDS])
    cap = capture(block, params, [IDS], x, hessians=True)
    a, m = "layers_0/self_attn", "layers_0/mlp"
    assert cap.order == [f"{a}/q_proj", f"{a}/k_proj", f"{a}/v_proj", f"{a}/o_proj", f"{m}/gate_proj",
                         f"{m}/up_proj", f"{m}/down_proj"]
    assert [cap.groups[p] for p in cap.order] == [f"{a}/q_proj"] * 3 + [f"{a}/o_proj"] + [f"{m}/gate_proj"] * 2 \
        + [f"{m}/down_proj"]
    assert sorted(cap.hessian_sums) == sorted({cap.groups[p] for p in cap.order})
    np.testing.assert_array_equal(cap.hessian(f"{a}/k_proj"), cap.hessian(f"{a}/q_proj"))


# A child that quantizes and is killed at a chosen moment (SIGKILL: nothing runs after it).
KILLED = """
import os, signal, sys, time
import numpy as np
import orbax.checkpoint as ocp
from any4_jax import checkpoint
from any4_jax.checkpoint import open_model_dir
from any4_jax.quantize import quantize_checkpoint

src, out, when, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seen = [0]
if when == "after-commit":  # right after the n-th stage is recorded as finished
    real_commit = checkpoint.ResumableWrite.commit
    def commit(self, state):
        real_commit(self, state)
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.ResumableWrite.commit = commit
elif when == "mid-write":  # the n-th part's files written, before the rename that puts it in place
    real_rename = os.rename
    def rename(src, dst):
        if "/params/." in str(src) and ".tmp-" in str(src) and ".orbax-checkpoint-tmp" not in str(src):
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
    os.rename = rename
ids = np.random.default_rng(4).integers(0, 128, size=(4, 64)).astype(np.int32)
quantize_checkpoint(open_model_dir(src), out, fmt="any4", group_size=32, method="gptq", sequential=True,
                    calibration=ids, progress=False)
"""


@pytest.mark.parametrize("when, n", [("after-commit", 2), ("mid-write", 3)])
def test_a_killed_quantization_resumes_to_the_same_weights(tiny_model, tmp_path, monkeypatch, when, n):
    """SIGKILL after the second stage is committed, or while the third part is
    half written: nothing appears at --out, the work directory keeps the
    committed stages only, and running again finishes with the weights of a run
    that was never interrupted (sequential GPTQ: the saved activations matter)."""
    _, flax_dir = tiny_model("llama")
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", KILLED, str(flax_dir), str(out), when, str(n)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists()
    work = tmp_path / ".q.partial"
    progress = json.loads((work / "progress.json").read_text())
    done = 2  # embedding and first block; the third part was never committed
    assert progress["state"]["stages"] == done
    assert progress["parts"] == sorted(["embed_tokens", "layers_0"])
    if when == "mid-write":
        assert any(p.name.startswith(".layers_1.tmp-") for p in (work / "params").iterdir())  # half written

    from any4_jax import quantize
    resumed, real = [], quantize.quantize_stages
    monkeypatch.setattr(quantize, "quantize_stages", lambda *a, **kw: resumed.append(kw.get("start")) or real(*a, **kw))
    kw = dict(fmt="any4", group_size=32, method="gptq", sequential=True, calibration=IDS, progress=False)
    quantize_checkpoint(open_model_dir(flax_dir), out, **kw)
    assert resumed[0] == done and not work.exists()
    model, params, _ = load_model(flax_dir)
    _, expected = quantize_model(model, params, **kw)
    assert_same(load_model(out)[1], expected)


def test_changed_work_is_refused_and_restart_discards_it(tiny_model, tmp_path, monkeypatch, capsys):
    """Interrupted (Ctrl-C after two stages) from the CLI: the message says what
    was kept; the same command with another recipe is refused, naming what
    changed; --restart starts over; --resume with nothing to resume is an error."""
    from any4_jax import checkpoint
    _, flax_dir = tiny_model("llama")
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(flax_dir), "--out", str(out), "--group-size", "32", "--calibration", "none"]
    real_commit = checkpoint.ResumableWrite.commit
    calls = []

    def interrupted(self, state):
        real_commit(self, state)
        calls.append(state)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.ResumableWrite, "commit", interrupted)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "2 finished part(s) are kept in" in err and "run the same command again to continue" in err
    monkeypatch.undo()
    assert cli.main(argv[:-4] + ["--group-size", "64", "--calibration", "none"]) == 2
    err = capsys.readouterr().err
    assert "holds unfinished work on q with another recipe" in err and "--restart" in err
    assert cli.main(argv + ["--restart", "--format", "int4"]) == 0
    assert json.loads((out / "manifest.json").read_text())["quantization"]["fmt"] == "int4"
    assert cli.main(["quantize", "--model", str(flax_dir), "--out", str(tmp_path / "r"), "--calibration", "none",
                     "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / ".s.partial").mkdir()  # not ours: never taken over or deleted
    with pytest.raises(FileExistsError, match="was not written by any4-jax"):
        with ResumableWrite(tmp_path / "s", {"a": 1}):
            pass
    assert (tmp_path / ".s.partial").is_dir()


def test_a_changed_source_is_refused(tiny_model, tmp_path):
    import shutil
    _, flax_dir = tiny_model("llama")
    src = tmp_path / "src"
    shutil.copytree(flax_dir, src)
    work = ResumableWrite(tmp_path / "q", {"source": open_model_dir(src).fingerprint})
    with work:
        work.commit({"stages": 1})
    os.utime(next(p for p in sorted((src / "params" / "layers_1").rglob("*")) if p.is_file()), ns=(1, 1))
    with pytest.raises(CheckpointError, match="with another source"):
        with ResumableWrite(tmp_path / "q", {"source": open_model_dir(src).fingerprint}):
            pass


def save_safetensors(path, tensors: dict):
    """A .safetensors file written from the format's definition (8-byte header
    length, JSON header of dtypes, shapes and offsets, then the bytes)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int8): "I8",
             np.dtype(np.uint8): "U8", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + b"".join(np.ascontiguousarray(a).tobytes()
                                                                  for a in tensors.values()))


def _bf16_checkpoint(tmp_path, config_overrides=None):
    """A tiny Llama of random bf16 weights, as the Hub ships them."""
    config = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-5,
                  max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
                  **(config_overrides or {}))
    write_random_checkpoint(tmp_path / "hf", config, shard_bytes=40_000)
    return tmp_path / "hf"


def test_convert_keeps_the_checkpoints_dtype_unless_told(tmp_path, capsys):
    src = _bf16_checkpoint(tmp_path)
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded, with an index
    assert cli.main(["convert", "--model", str(src), "--out", str(tmp_path / "auto")]) == 0
    assert "bfloat16 (the checkpoint's own)" in capsys.readouterr().out
    assert cli.main(["convert", "--model", str(src), "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    a, pa, _ = load_model(tmp_path / "auto")
    b, pb, _ = load_model(tmp_path / "f32")
    assert (a.dtype, b.dtype) == (jnp.bfloat16, jnp.float32)
    assert pa["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    from any4_jax.tensorfiles import SafetensorsFile
    shard = SafetensorsFile(next(src.glob("*00001-of-*.safetensors")))
    name = next(n for n in shard.tensors if n.endswith("q_proj.weight"))
    np.testing.assert_array_equal(np.asarray(pa["layers_0"]["self_attn"]["q_proj"]["kernel"]).T,
                                  shard.read(name))  # bf16 kept bit for bit, transposed
    np.testing.assert_array_equal(np.asarray(pb["layers_0"]["self_attn"]["q_proj"]["kernel"]).T,
                                  shard.read(name).astype(np.float32))
    with pytest.raises(ValueError, match="--group-size only apply with --quantize"):
        cli.main(["--debug", "convert", "--model", str(src), "--out", str(tmp_path / "x"), "--group-size", "64"])


@pytest.mark.parametrize("dtype, what", [(np.int8, "I8 (not a float weight)"), (np.uint8, "U8 (not a float weight)"),
                                         (ml_dtypes.float8_e4m3fn, "F8_E4M3 (an FP8-quantized checkpoint")])
def test_a_weight_that_is_not_float_is_refused_by_name(tmp_path, dtype, what):
    from benchmarks.scale import tensor_shapes
    config = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-5,
                  max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in tensor_shapes(config).items()}
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = np.ones(tensors[name].shape, dtype)
    (tmp_path / "hf").mkdir()
    save_safetensors(tmp_path / "hf" / "model.safetensors", tensors)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"tensor {name} in .* is stored as {re.escape(what)}"):
        hf2flax.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# Llama-shaped, float32, 24 blocks: 2.5 GB, so that holding it whole would break the bounds below.
BIG = dict(model_type="llama", hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
           num_attention_heads=12, num_key_value_heads=4, head_dim=128, vocab_size=4096, rms_norm_eps=1e-5,
           max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False)
# What every command's process holds before its work: jax, the library, a tokenizer read.
BASELINE = ("import sys, jax.numpy as jnp; from any4_jax import cli; from any4_jax.checkpoint import load_tokenizer; "
            "load_tokenizer(sys.argv[1]); jnp.ones(3).block_until_ready()")


def test_streaming_memory_stays_near_one_block(tmp_path):
    """Peak RSS in a child process, above what the same process holds before its
    work: `any4 convert` under 0.25x the model and `any4 quantize` (int4,
    calibrated on a text file) under 0.5x, where holding the model whole would
    be 1x or more (a block is 1/24 of it; the rest is the allocator and XLA's
    compiled programs). `any4 generate` of the quantized model: at most 1.3x
    its checkpoint + 1.5 GB, in all."""
    from hf_models import char_tokenizer
    src = tmp_path / "hf"
    model_bytes = write_random_checkpoint(src, BIG, dtype=np.float32, shard_bytes=1 << 30)
    char_tokenizer().save_pretrained(src)
    (tmp_path / "cal.txt").write_text("The quick brown fox jumps over the lazy dog. 0123456789\n" * 20)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}
    any4 = [sys.executable, "-m", "any4_jax.cli"]
    base = peak_rss_of([sys.executable, "-c", BASELINE, str(src)], env=env)
    convert = peak_rss_of(any4 + ["convert", "--model", str(src), "--out", str(tmp_path / "flax")], env=env)
    quant = peak_rss_of(any4 + ["quantize", "--model", str(tmp_path / "flax"), "--out", str(tmp_path / "q"),
                                "--format", "int4", "--calibration", str(tmp_path / "cal.txt")], env=env)
    gen = peak_rss_of(any4 + ["generate", "--model", str(tmp_path / "q"), "--prompt", "Once", "--max-new-tokens",
                              "4"], env=env)
    for r in (base, convert, quant, gen):
        assert r["rc"] == 0, r["output"]
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "q" / "params").rglob("*") if f.is_file())
    over = {name: (r["rss"] - base["rss"]) / model_bytes for name, r in (("convert", convert), ("quantize", quant))}
    print(f"model {model_bytes / 1e6:.0f} MB, baseline RSS {base['rss'] / 1e6:.0f} MB, above it: "
          f"{ {k: round(v, 3) for k, v in over.items()} } of the model; generate {gen['rss'] / 1e6:.0f} MB "
          f"for a {checkpoint_bytes / 1e6:.0f} MB checkpoint")
    assert over["convert"] < 0.25 and over["quantize"] < 0.5, over
    assert gen["rss"] < 1.3 * checkpoint_bytes + 1.5e9
