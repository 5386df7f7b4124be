"""GGUF (llama.cpp) Llama-architecture file -> Hugging Face model directory.

    python -m converters.gguf2hf --gguf FILE --out HF_DIR [--overwrite]

Dequantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors to float32 with the ``gguf``
package, undoes llama.cpp's rope permutation of ``attn_q``/``attn_k``, and writes
``model.safetensors``, ``config.json`` and the tokenizer (``tokenizer.json`` and
``tokenizer_config.json``, rebuilt from the GGUF metadata with the ``tokenizers``
library). No torch needed. The output appears atomically.
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
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from any4_jax.checkpoint import atomic_directory
from converters import run_command

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (back to HF's rotate-half order)."""
    d_out, k = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, k).swapaxes(1, 2).reshape(d_out, k)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none", "linear") or \
            any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError("GGUF rope scaling (rope_freqs / llama3) is not supported")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens) if tokens else 0)),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


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
    merges, token types, special-token ids, chat template) with the
    ``tokenizers`` library; None if the file has no tokenizer. Byte-level BPE
    (``tokenizer.ggml.model == "gpt2"``, the Llama-3 / SmolLM2 / Qwen2 family)
    is supported."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {kind!r} (tokenizer.ggml.model); supported: "
                         f"gpt2 (byte-level BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
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
    # Control tokens stay whole and special; user-defined ones stay whole (llama.cpp matches both whole).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    def special(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    bos = special("bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab.get(bos, 0))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"))


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
    bad = sorted({f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                  if t.tensor_type.name not in SUPPORTED_TYPES})
    if bad:
        raise ValueError(f"unsupported GGUF tensor types: {', '.join(bad)}; "
                         f"supported: {', '.join(SUPPORTED_TYPES)}")
    tokenizer = gguf_tokenizer(reader)
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[gguf_file]) as tmp:
        tensors = {}
        for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress):
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
            w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
            suffix = t.name.split(".", 2)[-1]
            if suffix in heads:
                w = unpermute_rope(w, heads[suffix])
            tensors[hf_tensor_name(t.name)] = np.ascontiguousarray(w)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # marks the folder as ours, so that --overwrite may replace it later
        (tmp / "manifest.json").write_text(json.dumps({"written_by": "any4-jax converters.gguf2hf",
                                                       "source": str(gguf_file.absolute())}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return config


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m converters.gguf2hf", description=__doc__.split("\n")[0])
    p.add_argument("--gguf", required=True, help="llama-architecture .gguf file")
    p.add_argument("--out", required=True, help="output HF model directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = p.parse_args(argv)

    def body():
        cfg = convert(args.gguf, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}: llama, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}")
        return 0

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
