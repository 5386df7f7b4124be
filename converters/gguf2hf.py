"""GGUF (llama.cpp) file -> Hugging Face model directory.

    python -m converters.gguf2hf --gguf FILE --out HF_DIR [--overwrite]

Architectures ``llama``, ``qwen2``, ``qwen3`` and ``gemma3`` (its text model).
Every tensor type the ``gguf`` package dequantizes (F32, F16, BF16, Q4_0/1,
Q5_0/1, Q8_0, Q2_K-Q6_K, the IQ types, TQ1_0/TQ2_0, MXFP4, NVFP4) becomes
float32; llama.cpp's rope permutation of ``attn_q``/``attn_k`` is undone for
``llama``, and its +1 on Gemma's norm weights taken off. Writes
``model.safetensors`` a tensor at a time, ``config.json`` and the tokenizer
(``tokenizer.json`` and ``tokenizer_config.json``, rebuilt from the GGUF metadata
with the ``tokenizers`` library: byte-level BPE, or SentencePiece-style BPE with
byte fallback for ``tokenizer.ggml.model = "llama"``). No torch needed. The
output appears atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from any4_jax.checkpoint import atomic_directory
from converters import run_command
from any4_jax.tensorfiles import SafetensorsWriter

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# Tensor types the gguf package dequantizes (the K-quants and IQ types through its numpy code)
DEQUANTIZED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
               "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
               "TQ2_0", "MXFP4", "NVFP4")
_HF = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
       "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",  # Gemma: the norm before the feed-forward (below)
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in names:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF file")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (back to HF's rotate-half order)."""
    d_out, k = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, k).swapaxes(1, 2).reshape(d_out, k)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> dict:
    """The Hugging Face ``config.json`` of the model a GGUF file holds."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    if a("rope.scaling.type", "none") not in ("none", "linear") or \
            any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError("GGUF rope scaling of type yarn or llama3 (rope_freqs) is not supported")
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    layers = int(a("block_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    head_dim = int(a("attention.key_length", a("rope.dimension_count", hidden // heads)))
    model_type, architecture = _HF[arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": int(a("vocab_size", len(tokens) if tokens else 0)),
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "gelu_pytorch_tanh" if arch == "gemma3" else "silu",
        "max_position_embeddings": int(a("context_length", 2048)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6 if arch == "gemma3" else 1e-5)),
        "rope_theta": float(a("rope.freq_base", 1e6 if arch == "gemma3" else 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if a("rope.scaling.type", "none") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    if arch == "gemma3":  # what llama.cpp fixes in code for Gemma 3, the config says in Hugging Face's form
        window = a("attention.sliding_window")
        config.update(
            hidden_activation="gelu_pytorch_tanh", sliding_window=None if window is None else int(window),
            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
            rope_local_base_freq=10000.0, final_logit_softcapping=a("final_logit_softcapping"),
            attn_logit_softcapping=a("attn_logit_softcapping"),
            # Gemma 3 27B (62 layers) scales queries by hidden / heads, the others by the head size
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim)
    return config


# Pre-tokenizer regexes of byte-level BPE vocabularies, by ``tokenizer.ggml.pre``
# (llama.cpp's names). Any other value (SmolLM2 says "smollm") uses GPT-2's
# built-in ByteLevel split, as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                        "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map of byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def gguf_tokenizer(reader) -> PreTrainedTokenizerFast | None:
    """The tokenizer a GGUF file describes, built from its metadata (tokens,
    merges or scores, token types, special-token ids, chat template) with the
    ``tokenizers`` library; None if the file has no tokenizer. Byte-level BPE
    (``tokenizer.ggml.model == "gpt2"``: the Llama-3 / SmolLM2 / Qwen family) and
    SentencePiece-style BPE with byte fallback (``"llama"``: Llama 2, Mistral,
    Gemma) are supported."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"unsupported GGUF tokenizer {kind!r} (tokenizer.ggml.model); supported: "
                         f"gpt2 (byte-level BPE), llama (SentencePiece-style BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or (merges is None and kind == "gpt2"):
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    special = lambda key: None if _field(reader, f"tokenizer.ggml.{key}") is None else tokens[
        int(_field(reader, f"tokenizer.ggml.{key}"))]
    if kind == "gpt2":
        tok, vocab, alphabet = _byte_level(reader, tokens, merges)
    else:
        tok, vocab, alphabet = _sentencepiece(reader, tokens, merges, special("unknown_token_id"),
                                              gemma=_field(reader, "general.architecture") == "gemma3")
    # Control tokens stay whole and special; user-defined ones stay whole (llama.cpp matches both whole).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                            if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    bos = special("bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab.get(bos, 0))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"))


def _byte_level(reader, tokens, merges):
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written in plain text (not the byte alphabet) is re-spelled byte by byte.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, vocab, alphabet


def sentencepiece_merges(vocab: dict, rank: dict) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies (GGUF stores none): every
    split of a token into two tokens of the vocabulary, best first by the merged
    token's ``rank`` (higher first), then by the lengths of the parts; a token's
    own splits in order of their parts' ids."""
    found = []
    for token, score in rank.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        found += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _sentencepiece(reader, tokens, merges, unk, gemma: bool):
    """BPE with byte fallback over "▁"-spelled spaces. Gemma: spaces become "▁"
    before anything else, no prefix space, tokens of spaces spelled with "▁", and
    merges ranked by position in the file (its scores do not follow its merge
    order); others (Llama 2, Mistral): a "▁" before the first word (Metaspace),
    merges ranked by score."""
    if gemma:
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif gemma:
        pairs = sentencepiece_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    else:
        pairs = sentencepiece_merges(vocab, dict(zip(tokens, _field(reader, "tokenizer.ggml.scores"))))
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True, unk_token=unk if gemma else None))
    tail = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence(tail)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(tail + [decoders.Strip(content=" ", left=1)])
    return tok, vocab, None


def convert(gguf_file, out_dir, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Write an HF model directory for ``gguf_file``; returns its config."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} not found")
    try:
        reader = GGUFReader(str(gguf_file))
    except Exception as e:
        raise ValueError(f"cannot read {gguf_file} as GGUF: {e}") from e
    config = gguf_config(reader)
    arch = _field(reader, "general.architecture")
    bad = sorted({f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                  if t.tensor_type.name not in DEQUANTIZED})
    if bad:
        raise ValueError(f"unsupported GGUF tensor types: {', '.join(bad)}; supported: {', '.join(DEQUANTIZED)}")
    tokenizer = gguf_tokenizer(reader)
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    shape = lambda t: tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
    names = {t.name: hf_tensor_name(t.name, arch) for t in reader.tensors}
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[gguf_file]) as tmp:
        with SafetensorsWriter(tmp / "model.safetensors", {names[t.name]: (np.float32, shape(t)) for t in reader.tensors},
                               metadata={"format": "pt"}) as out:
            for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress):
                w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape(t))
                suffix = t.name.split(".", 2)[-1]
                if arch == "llama" and suffix in heads:
                    w = unpermute_rope(w, heads[suffix])
                if arch == "gemma3" and t.name.endswith("norm.weight"):
                    w = w - np.float32(1)  # llama.cpp stores Gemma's norm weights plus one
                out.write(names[t.name], w)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # marks the folder as ours, so that --overwrite may replace it later
        (tmp / "manifest.json").write_text(json.dumps({"written_by": "any4-jax converters.gguf2hf",
                                                       "source": str(gguf_file.absolute())}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return config


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m converters.gguf2hf", description=__doc__.split("\n")[0])
    p.add_argument("--gguf", required=True, help=".gguf file (architecture llama, qwen2, qwen3 or gemma3)")
    p.add_argument("--out", required=True, help="output HF model directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = p.parse_args(argv)

    def body():
        cfg = convert(args.gguf, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}")
        return 0

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
