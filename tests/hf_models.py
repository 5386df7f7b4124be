"""Tiny random Hugging Face models (transformers + torch) for the tests."""

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=10000.0)),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2_mha": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=4)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=True)),
    # layer 0 slides (window 8, its own rope base), layer 1 is global; scaled embeddings, (1 + w) norms
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
}


def make_hf_model(arch, seed=0):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra})).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save(model, out_dir, kind):
    """kind: 'safetensors', 'sharded' or 'bin'."""
    if kind == "safetensors":
        model.save_pretrained(out_dir)
    elif kind == "sharded":
        model.save_pretrained(out_dir, max_shard_size="20KB")
    else:  # transformers 5 writes only safetensors: re-save its tensors as a torch pickle
        from safetensors.torch import load_file
        model.save_pretrained(out_dir)
        state = load_file(out_dir / "model.safetensors")
        torch.save(state, out_dir / "pytorch_model.bin")
        (out_dir / "model.safetensors").unlink()
    return out_dir


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def char_tokenizer():
    """A character-level tokenizer for the tiny models (98 ids < their vocabulary of
    128): printable ASCII, <unk>/<s>/</s>, and a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(i): i - 29 for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    return fast


def linear_inputs(model, ids) -> dict:
    """``{module name: (tokens, K) input}`` of every ``torch.nn.Linear`` of ``model``
    run on ``ids``, seen by forward hooks."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(torch.as_tensor(ids, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return {name: x.reshape(-1, x.shape[-1]) for name, x in inputs.items()}
