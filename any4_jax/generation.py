"""``jax.jit`` generation: padded prefill, then one compiled decode step with a KV cache.

Shapes are static so that nothing recompiles per token: prompts are left-padded
to a length bucket (a power of two), and the cache is preallocated to a bucket
(a multiple of ``CACHE_BUCKET``) that holds prompt and new tokens. The cache is
donated from step to step.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.models import init_cache

CACHE_BUCKET = 256


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(model, params, ids, mask, cache):
    positions = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.apply({"params": params}, ids, mask, positions, cache=cache)
    return logits[:, -1], cache, positions[:, -1]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode_step(model, params, token, position, cache):
    logits, cache = model.apply({"params": params}, token[:, None], None, position[:, None], cache=cache)
    return logits[:, -1], cache


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """A ValueError naming the argument unless ``temperature`` >= 0 (0 = greedy),
    ``top_k`` >= 1 and ``0 < top_p <= 1`` (None = off)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, or None for no top-k; got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1], or None for no top-p; got {top_p}")


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _sample(logits, key, *, temperature, top_k, top_p):
    """Next tokens ``(B,)`` from logits ``(B, V)``: greedy at temperature 0,
    else softmax(logits / T) restricted to the top-k and/or the top-p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass before it is < top_p (the first one always stays)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


def sample(logits, key, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Next tokens ``(B,)`` from logits ``(B, V)``: greedy at temperature 0, else
    softmax(logits / T) restricted to the top-k and/or the top-p nucleus (a
    ``top_k`` of V or more keeps every token). Arguments as ``check_sampling``."""
    check_sampling(temperature, top_k, top_p)
    top_k = None if top_k is None or top_k >= logits.shape[-1] else int(top_k)
    return _sample(logits, key, temperature=float(temperature), top_k=top_k, top_p=top_p)


def encode_prompts(tokenizer, prompts, chat: bool = False) -> list[list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass a string or a list of strings")
    out = []
    for p in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(p)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"prompt {p!r} is empty (0 tokens); give at least one token")
        out.append(list(ids))
    return out


def generate_ids(model, params, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop: Sequence[int] = (), stream: Callable | None = None,
                 stats: dict | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompt excluded; a stop token ends a row and is kept).

    ``stream(step, tokens)`` is called after each step with the ``(B,)`` new
    tokens. ``stats``, if given, receives prefill/decode timings.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)  # once, before the prefill; the loop calls _sample
    temperature = float(temperature)
    top_k = None if top_k is None or top_k >= model.config.vocab_size else int(top_k)
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {context} tokens")
    b = len(prompt_ids)
    p_len = _bucket(longest)
    ids = np.zeros((b, p_len), np.int32)
    mask = np.zeros((b, p_len), np.int32)
    for i, p in enumerate(prompt_ids):  # left padding
        ids[i, p_len - len(p):] = p
        mask[i, p_len - len(p):] = 1
    cache_len = -(-(p_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    cache_dtype = model.dtype
    cache = init_cache(model.config, b, cache_len, cache_dtype)

    key = jax.random.PRNGKey(seed)
    stop_ids = jnp.asarray(list(stop) or [-1], jnp.int32)
    t0 = time.perf_counter()
    logits, cache, position = _prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), cache)
    logits.block_until_ready()
    t1 = time.perf_counter()
    out = np.zeros((b, max_new_tokens), np.int64)
    done = np.zeros(b, bool)
    steps = 0
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = _sample(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = np.asarray(token)
        out[:, step] = tok
        steps = step + 1
        if stream is not None:
            stream(step, tok)
        done |= np.isin(tok, np.asarray(stop_ids))
        if done.all() or step == max_new_tokens - 1:
            break
        position = position + 1
        logits, cache = _decode_step(model, params, token.astype(jnp.int32), position, cache)
    t2 = time.perf_counter()
    if stats is not None:
        stats.update(prefill_tokens=int(mask.sum()), prefill_seconds=t1 - t0,
                     decode_tokens=(steps - 1) * b, decode_seconds=t2 - t1)  # the first token came from prefill
    results = []
    for row in out[:, :steps]:
        row = row.tolist()
        hit = [i for i, t in enumerate(row) if t in set(np.asarray(stop_ids).tolist())]
        results.append(row[: hit[0] + 1] if hit else row)
    return results


def generate(model, params, tokenizer, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop=None,
             chat: bool = False, stream: Callable | None = None, stats: dict | None = None):
    """For each prompt (a string or a list), the list of new token ids.

    ``stop``: token ids that end a row (default: the tokenizer's EOS).
    ``chat=True`` wraps each prompt in the tokenizer's chat template.
    Works the same for float and quantized params.
    """
    if stop is None:
        stop = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return generate_ids(model, params, encode_prompts(tokenizer, prompts, chat),
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop=stop, stream=stream, stats=stats)


def generate_text(model, params, tokenizer, prompts, **kwargs) -> list[str]:
    """``generate`` decoded to strings (special tokens dropped)."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate(model, params, tokenizer, prompts, **kwargs)]
