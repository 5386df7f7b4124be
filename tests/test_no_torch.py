"""torch stays off the run-time path: the GGUF tokenizer is built without
transformers' GGUF reader (which imports torch), and the whole command-line path
runs in a process where ``import torch`` fails."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from any4_jax import assets

ROOT = Path(__file__).resolve().parents[1]

# Every step a user takes, in one process whose `import torch` fails (sitecustomize).
PIPELINE = """
import sys
from any4_jax import cli
from converters import gguf2hf, hf2flax

gguf, work = sys.argv[1], sys.argv[2]
steps = [
    (gguf2hf.main, ["--gguf", gguf, "--out", f"{work}/hf"]),
    (hf2flax.main, ["--model", f"{work}/hf", "--out", f"{work}/flax"]),
    (cli.main, ["quantize", "--model", f"{work}/flax", "--out", f"{work}/any4", "--format", "any4"]),
    (cli.main, ["eval", "--model", f"{work}/any4", "--text", "botchan", "--seq-len", "128",
                "--max-windows", "1"]),
    (cli.main, ["generate", "--model", f"{work}/any4", "--prompt", "The capital of France is",
                "--max-new-tokens", "4"]),
]
for main, argv in steps:
    rc = main(argv)
    assert rc == 0, (argv, rc)
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "torch")
assert not loaded, loaded
print("PIPELINE OK")
"""


def test_whole_path_runs_where_torch_cannot_be_imported(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PIPELINE), str(assets.smollm2_gguf()),
                             str(tmp_path / "work")], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0 and "PIPELINE OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    assert "perplexity" in result.stdout and "any4" in result.stdout


def test_the_guard_itself_blocks_torch(tmp_path):
    """Control: the sitecustomize used above really makes `import torch` fail."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    result = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True)
    assert result.returncode != 0 and "torch" in result.stderr


@pytest.fixture(scope="module")
def tokenizers_pair():
    """(ours from the GGUF metadata, transformers' own GGUF tokenizer) for SmolLM2."""
    pytest.importorskip("torch", reason="transformers' GGUF tokenizer (the reference) needs torch")
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from converters.gguf2hf import gguf_tokenizer

    path = assets.smollm2_gguf()
    ours = gguf_tokenizer(GGUFReader(str(path)))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, ref


@pytest.mark.parametrize("name", ["botchan", "lee"])
def test_gguf_tokenizer_encodes_real_text_like_transformers(tokenizers_pair, name):
    ours, ref = tokenizers_pair
    text = assets.text(name)
    ids = ours(text)["input_ids"]
    assert len(ids) > 50_000
    assert ids == ref(text)["input_ids"]
    assert ours.decode(ids) == text


def test_gguf_tokenizer_chat_template_and_special_tokens_like_transformers(tokenizers_pair):
    ours, ref = tokenizers_pair
    messages = [{"role": "user", "content": "Name three primary colors.\n\nThanks! <|im_end|> café 日本"}]
    a = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert a == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert a.startswith("<|im_start|>system")
    assert ours(a)["input_ids"] == ref(a)["input_ids"]
    assert ours(a)["input_ids"].count(1) == 3  # <|im_start|> kept whole: system, user, assistant
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
