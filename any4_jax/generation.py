"""``jax.jit`` generation: padded prefill, then decode loops that run on the device.

Decoding runs ``DECODE_CHUNK`` steps at a time inside one jitted
``lax.while_loop`` (model step, sampling and stop-token tracking on the device,
the KV cache donated from call to call); the host sees each chunk's tokens (for
``stream``) and stops when every row has stopped. Shapes are static, so nothing
recompiles per token or per length: prompts are left-padded to a length bucket
(a power of two, at least 16) and the cache is preallocated to a multiple of
``CACHE_BUCKET`` that holds prompt and new tokens. The prefill and the decode
loop compile once per (batch size, prompt bucket, cache length); the number of
new tokens is a traced value, so 5 or 200 new tokens after a 16-token prompt use
the same compiled loop (cache 256), while 300 need a cache of 512 and compile it
again.
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
DECODE_CHUNK = 16  # decode steps per device loop (and per ``stream`` delivery)
# top-p sorts only this many of the most likely tokens unless the nucleus is
# larger: on a 2-core CPU a full sort of 8 rows of 49152 logits takes ~90 ms,
# top_k(4096) 11 ms, and SmolLM2's nucleus (T = 1, p = 0.95) is wider than
# 4096 tokens for 0.6% of the tokens it writes (1024: 19%).
NUCLEUS_CANDIDATES = 4096


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(model, params, ids, mask, cache):
    positions = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.apply({"params": params}, ids, mask, positions, cache=cache)
    return logits[:, -1], cache, positions[:, -1]


def decode_step(model, params, token, position, cache):
    """One model step: logits ``(B, V)`` for ``token (B,)`` at ``position (B,)``, and the cache."""
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
    if top_p is not None and top_p < 1.0:
        logits = jnp.where(nucleus_mask(logits, top_p), logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


def nucleus_mask(logits, top_p: float):
    """The top-p nucleus of softmax(logits) ``(B, V)``: a token stays if the
    probability mass of the tokens before it (by decreasing logit, ties by
    index) is < top_p, so the first always stays. Only the ``NUCLEUS_CANDIDATES``
    most likely tokens are sorted, all of them when the nucleus is larger."""
    keep, beyond = _nucleus(logits, top_p, min(NUCLEUS_CANDIDATES, logits.shape[-1]))
    return jax.lax.cond(beyond, lambda: _nucleus(logits, top_p, logits.shape[-1])[0], lambda: keep)


def _nucleus(logits, top_p, k):
    """``nucleus_mask`` among the ``k`` most likely tokens, and whether it may reach beyond them."""
    _, order = jax.lax.top_k(logits, k)
    # Values gathered by index: computing on top_k's own values output makes
    # XLA's CPU backend sort instead (measured: 78 ms against 11 ms for k = 4096).
    top = jnp.take_along_axis(logits, order, axis=-1)
    m = top[:, :1]
    probs = jnp.exp(top - m) / jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return keep, jnp.any(keep_sorted[:, -1]) & (k < logits.shape[-1])


def sample(logits, key, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Next tokens ``(B,)`` from logits ``(B, V)``: greedy at temperature 0, else
    softmax(logits / T) restricted to the top-k and/or the top-p nucleus (a
    ``top_k`` of V or more keeps every token). Arguments as ``check_sampling``."""
    check_sampling(temperature, top_k, top_p)
    top_k = None if top_k is None or top_k >= logits.shape[-1] else int(top_k)
    return _sample(logits, key, temperature=float(temperature), top_k=top_k, top_p=top_p)


# XLA's loop-invariant code motion would hoist out of the loop every conversion of a weight the step makes
# (on a CPU: a 16-bit embedding table's raw view, 1 GiB for Llama-3's; any float32 upcast, 2 GiB) and keep it
# for the whole loop; inside the step each stays fused into its use.
LOOP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p"), donate_argnames="cache",
                   compiler_options=LOOP_COMPILER_OPTIONS)
def _decode_loop(model, params, token, position, cache, key, done, stop_ids, steps, *, temperature, top_k, top_p):
    """Up to ``min(steps, DECODE_CHUNK)`` decode steps, fewer if every row has
    stopped: each feeds ``token`` to the model and samples the next one. Returns
    the new tokens ``(B, DECODE_CHUNK)``, how many were made, and the state to
    continue from."""
    out = jnp.zeros((token.shape[0], DECODE_CHUNK), jnp.int32)

    def more(state):
        i, _, _, _, _, done, _ = state
        return (i < jnp.minimum(steps, DECODE_CHUNK)) & ~jnp.all(done)

    def step(state):
        i, token, position, cache, key, done, out = state
        position = position + 1
        logits, cache = decode_step(model, params, token, position, cache)
        key, sub = jax.random.split(key)
        token = _sample(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p).astype(jnp.int32)
        done = done | (token[:, None] == stop_ids[None]).any(-1)
        return i + 1, token, position, cache, key, done, out.at[:, i].set(token)

    state = jax.lax.while_loop(more, step, (jnp.int32(0), token, position, cache, key, done, out))
    count, token, position, cache, key, done, out = state
    return out, count, token, position, cache, key, done


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

    ``stream(step, tokens)`` is called for each step with the ``(B,)`` new
    tokens, as each chunk of ``DECODE_CHUNK`` steps comes back from the device.
    ``stats``, if given, receives prefill/decode timings: ``decode_seconds`` in
    all, ``decode_device_seconds`` of it waiting for the decode loops (the rest
    is host work).
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
    stop_ids = np.asarray(list(stop) or [-1], np.int32)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    t0 = time.perf_counter()
    logits, cache, position = _prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), cache)
    logits.block_until_ready()
    t1 = time.perf_counter()
    key, sub = jax.random.split(key)
    token = _sample(logits, sub, **sampling).astype(jnp.int32)  # the first new token, from the prefill
    key = np.asarray(key)  # host values in, device values out: every call sees the same kinds of arrays
    first = np.asarray(token)
    done = np.isin(first, stop_ids)
    chunks, steps, device_seconds = [first[:, None]], 1, 0.0
    if stream is not None:
        stream(0, first)
    while steps < max_new_tokens and not done.all():
        t = time.perf_counter()
        new, count, token, position, cache, key, done_dev = _decode_loop(
            model, params, token, position, cache, key, done, stop_ids, np.int32(max_new_tokens - steps), **sampling)
        new, count, done, key = np.asarray(new), int(count), np.asarray(done_dev), np.asarray(key)
        device_seconds += time.perf_counter() - t
        chunks.append(new[:, :count])
        if stream is not None:
            for i in range(count):
                stream(steps + i, new[:, i])
        steps += count
    t2 = time.perf_counter()
    out = np.concatenate(chunks, axis=1)
    if stats is not None:  # the first token came from the prefill: decode made the others
        stats.update(prefill_tokens=int(mask.sum()), prefill_seconds=t1 - t0, decode_tokens=(steps - 1) * b,
                     decode_seconds=t2 - t1, decode_steps=steps - 1, decode_device_seconds=device_seconds)
    results, stops = [], set(stop_ids.tolist())
    for row in out[:, :steps]:
        row = row.tolist()
        hit = [i for i, t in enumerate(row) if t in stops]
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
    if tokenizer is None:
        raise ValueError("generate needs a tokenizer (the model folder has none?); generate_ids takes token ids")
    if stop is None:
        stop = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return generate_ids(model, params, encode_prompts(tokenizer, prompts, chat),
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop=stop, stream=stream, stats=stats)


def generate_text(model, params, tokenizer, prompts, **kwargs) -> list[str]:
    """``generate`` decoded to strings (special tokens dropped)."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate(model, params, tokenizer, prompts, **kwargs)]
