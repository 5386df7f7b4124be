"""Generation with a KV cache against recomputation and against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from any4_jax import load_model
from any4_jax import generation as gen
from any4_jax.quantize import quantize_model


def greedy_without_cache(model, params, prompt, n):
    """Full recomputation each step. Right padding to one fixed length keeps it to
    one compilation and cannot change a causal model's logits at earlier positions."""
    import jax
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, len(prompt) + n), np.int32)
        padded[0, :len(ids)] = ids
        logits = forward(params, jnp.asarray(padded))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "mixtral", "mistral", "qwen3", "gemma3"])
def test_cache_equals_recomputation(tiny_model, arch):
    _, flax_dir = tiny_model(arch)
    model, params, _ = load_model(flax_dir)
    prompt = [5, 17, 99, 3, 42, 7]
    ours = gen.generate_ids(model, params, [prompt], max_new_tokens=32)[0]
    assert ours == greedy_without_cache(model, params, prompt, 32)


def test_quantized_cache_equals_recomputation(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    qmodel, qparams = quantize_model(model, params, fmt="any4", group_size=32, calibration=None, progress=False)
    prompt = [1, 2, 3, 4]
    assert gen.generate_ids(qmodel, qparams, [prompt], max_new_tokens=16)[0] == \
        greedy_without_cache(qmodel, qparams, prompt, 16)


def test_batch_of_different_lengths_equals_each_alone(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [100]]
    batch = gen.generate_ids(model, params, prompts, max_new_tokens=12)
    for p, b in zip(prompts, batch):
        assert b == gen.generate_ids(model, params, [p], max_new_tokens=12)[0]


def test_decode_loop_compiles_once_per_cache_bucket(tiny_model, monkeypatch, caplog):
    """After a 3-token prompt (bucket 16), 5, 50 or 112 new tokens share one
    cache length (here a bucket of 128) and so one compiled prefill and decode
    loop; 200 need a cache of 256, which compiles both once more."""
    import logging

    import jax
    monkeypatch.setattr(gen, "CACHE_BUCKET", 128)  # the tiny model's context is 256
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)

    def compiles(n):
        caplog.clear()
        with jax.log_compiles(), caplog.at_level(logging.WARNING):
            assert len(gen.generate_ids(model, params, [[1, 2, 3]], max_new_tokens=n)[0]) == n
        return {f: sum(f"XLA compilation of jit({f})" in r.getMessage() for r in caplog.records)
                for f in ("_prefill", "_decode_loop")}

    gen._prefill.clear_cache()
    gen._decode_loop.clear_cache()
    assert compiles(5) == {"_prefill": 1, "_decode_loop": 1}  # control: compilations are seen
    assert compiles(50) == compiles(112) == {"_prefill": 0, "_decode_loop": 0}
    assert compiles(200) == {"_prefill": 1, "_decode_loop": 1}


def test_stream_sees_every_token_in_order(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    seen = []
    out = gen.generate_ids(model, params, [[5, 6], [7]], max_new_tokens=2 * gen.DECODE_CHUNK + 3,
                           stream=lambda step, tokens: seen.append((step, tokens.tolist())))
    assert [step for step, _ in seen] == list(range(2 * gen.DECODE_CHUNK + 3))
    assert [[t[i] for _, t in seen] for i in range(2)] == out


def test_decode_rate_counts_model_steps(tiny_model):
    """n new tokens take n - 1 decode steps (the first comes from the prefill logits)."""
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    stats = {}
    out = gen.generate_ids(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=6, stats=stats)
    assert [len(o) for o in out] == [6, 6]
    assert stats["decode_tokens"] == 2 * 5 and stats["prefill_tokens"] == 5


def test_stop_token_ends_a_row(tiny_model):
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    free = gen.generate_ids(model, params, [[5, 6, 7]], max_new_tokens=10)[0]
    stopped = gen.generate_ids(model, params, [[5, 6, 7]], max_new_tokens=10, stop=[free[3]])[0]
    assert stopped == free[: free.index(free[3]) + 1]


def test_a_row_that_stops_early_leaves_the_others_running(tiny_model):
    """Row 0 stops in the second decode chunk on the first of several stop ids it
    meets; row 1, which meets none, runs to max_new_tokens as it would alone."""
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    n = 2 * gen.DECODE_CHUNK + 5
    alone = [gen.generate_ids(model, params, [p], max_new_tokens=n)[0] for p in ([5, 6, 7], [9, 3])]
    late = [t for t in alone[0][gen.DECODE_CHUNK + 1:] if t not in alone[1] and t not in alone[0][:gen.DECODE_CHUNK + 1]]
    assert late, "no token of row 0 to stop on (change the prompts)"
    never = next(t for t in range(128) if t not in alone[0] + alone[1])
    both = gen.generate_ids(model, params, [[5, 6, 7], [9, 3]], max_new_tokens=n, stop=[never, late[0]])
    end = alone[0].index(late[0]) + 1
    assert end > gen.DECODE_CHUNK + 1 and both == [alone[0][:end], alone[1]]


def test_generate_stops_at_the_tokenizers_eos_by_default(tiny_model):
    from hf_models import char_tokenizer
    _, flax_dir = tiny_model("llama")
    model, params, _ = load_model(flax_dir)
    tok = char_tokenizer()
    free = gen.generate(model, params, tok, "abc", max_new_tokens=20, stop=[])[0]
    tok.eos_token = tok.convert_ids_to_tokens(free[4])  # a token the model emits early
    stopped = gen.generate(model, params, tok, "abc", max_new_tokens=20)[0]
    assert stopped == free[: free.index(free[4]) + 1] and len(stopped) < len(free)


def test_sampling_is_seeded_and_respects_top_k():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    import jax
    a = gen.sample(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=2)
    b = gen.sample(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(np.asarray(a).tolist()) == {0, 1}
    assert abs(np.mean(np.asarray(a) == 0) - 0.5 / 0.8) < 0.05  # renormalised over the top 2
    c = np.asarray(gen.sample(logits, jax.random.PRNGKey(1), temperature=1.0, top_p=0.7))
    assert set(c.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}


@pytest.mark.parametrize("spread", [0.2, 20.0])  # a narrow nucleus; one wider than NUCLEUS_CANDIDATES
def test_nucleus_mask_matches_a_full_sort(rng, spread):
    logits = (rng.standard_normal((4, 6000)) * 3 / spread).astype(np.float32)
    logits[0, :5] = logits[0, 5]  # ties go by index
    keep = np.asarray(gen.nucleus_mask(jnp.asarray(logits), 0.9))
    order = np.argsort(-logits, axis=1, kind="stable")
    p = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    p = np.take_along_axis(p / p.sum(1, keepdims=True), order, 1)
    expected = np.zeros_like(keep)
    np.put_along_axis(expected, order, np.cumsum(p, 1) - p < 0.9, 1)
    np.testing.assert_array_equal(keep, expected)
    assert (expected.sum(1) > gen.NUCLEUS_CANDIDATES).all() == (spread > 1)  # both paths are taken


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[""]), "empty"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompts=["word " * 9000]), "exceeds the model's context of 8192"),
])
def test_bad_input(smollm2_flax, kwargs, match):
    model, params, tok = load_model(smollm2_flax)
    args = dict(prompts=["Hello"], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gen.generate(model, params, tok, args.pop("prompts"), **args)


def test_smollm2_greedy_matches_transformers(smollm2_hf, smollm2_flax):
    from transformers import AutoModelForCausalLM
    model, params, tok = load_model(smollm2_flax)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ours = gen.generate(model, params, tok, prompts, max_new_tokens=20)
    for prompt, new in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=20)[0, ids.shape[1]:].tolist()
        assert new == ref  # token for token, up to and including EOS


def test_smollm2_any4_chat_generates_text(smollm2_any4):
    model, params, tok = load_model(smollm2_any4)
    text = gen.generate_text(model, params, tok, "What is the capital of France?", chat=True, max_new_tokens=12)[0]
    assert "Paris" in text


def test_the_decode_loop_holds_no_converted_copy_of_a_table(tiny_model, monkeypatch):
    """In a 16-bit model at batch 1, the compiled decode loop makes no whole-table
    copy of the embedding or the head (XLA's CPU backend would hoist a raw or a
    float32 view of each out of the loop: 3 GiB for Llama-3-8B): its temporaries
    stay below one table's size. It still decodes what recomputation does."""
    import dataclasses

    import jax

    from any4_jax.models import Transformer
    _, flax_dir = tiny_model("llama")
    small, _, _ = load_model(flax_dir)
    config = dataclasses.replace(small.config, vocab_size=32768, num_hidden_layers=1, tie_word_embeddings=False)
    model = Transformer(config, dtype=jnp.bfloat16)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    table_bytes = params["embed_tokens"]["embedding"].nbytes  # 4 MiB; the head's kernel is as large
    temps = []
    loop = gen._decode_loop

    def recording(*args, **kwargs):
        temps.append(loop.lower(*args, **kwargs).compile().memory_analysis().temp_size_in_bytes)
        return loop(*args, **kwargs)

    monkeypatch.setattr(gen, "_decode_loop", recording)
    prompt = [5, 17, 99, 3]
    ours = gen.generate_ids(model, params, [prompt], max_new_tokens=6)[0]
    assert temps and max(temps) < table_bytes, (temps, table_bytes)
    assert ours == greedy_without_cache(model, params, prompt, 6)
