"""Perplexity over non-overlapping windows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(model, params, window):
    """Sum of next-token negative log-likelihoods of one ``(1, T)`` window."""
    logits = model.apply({"params": params}, window)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, window[:, 1:, None], axis=-1).sum()


def perplexity(model, params, token_ids, seq_len: int = 1024, max_windows: int | None = None,
               progress: bool = True) -> float:
    """``exp(mean NLL)`` over non-overlapping windows of ``seq_len`` tokens.

    No BOS is added; in each window every token after the first is predicted
    and counted (``seq_len - 1`` per window). A tail shorter than ``seq_len``
    is dropped so that every window compiles to the same shape.
    """
    context = model.config.max_position_embeddings if hasattr(model, "config") else None
    if seq_len < 2 or (context and seq_len > context):
        raise ValueError(f"seq_len must be at least 2 (a window predicts seq_len - 1 tokens)"
                         f"{f' and at most the model context {context}' if context else ''}; got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, or None for every window; got {max_windows}")
    ids = np.asarray(token_ids).reshape(-1)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens; got {len(ids)}")
    if max_windows is not None:
        n = min(n, max_windows)
    total = 0.0
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        window = jnp.asarray(ids[i * seq_len:(i + 1) * seq_len], jnp.int32)[None]
        total += float(_window_nll(model, params, window))
    return float(np.exp(total / (n * (seq_len - 1))))
