"""Per-input-channel activation statistics of every Dense layer, from one prompt.

The paper's finding (docs/design.md §3): one short, hand-written, diverse prompt
calibrates as well as 128 samples of 2048 tokens. ``DEFAULT_PROMPT`` is this
project's own. Statistics are captured with ``flax.linen.intercept_methods``
around ``nn.Dense`` calls, so no model code changes. A module called with a
``routed=`` mask (a Mixtral expert) has its Dense layers' statistics taken over
the routed tokens only, as forward hooks on PyTorch's experts see them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

STATISTICS = ("abs_mean", "mean_abs", "rms")

DEFAULT_PROMPT = """\
The lighthouse keeper had not spoken to anyone in eleven days when the boat finally came. \
She watched it round the headland, its red sail patched twice, and put the kettle on.

GENEVA (Reuters) - Trade ministers from forty countries agreed on Tuesday to cut tariffs on \
medical supplies by half over the next three years, officials said, ending months of talks.

def merge_sorted(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

Q: A train leaves at 9:40 and the trip takes 2 hours 35 minutes. When does it arrive?
A: 9:40 + 2:35 = 12:15. It arrives at 12:15. Also, 17 * 23 = 391 and 1024 / 16 = 64.

Water boils at 100 degrees Celsius at sea level. The Amazon is the largest rainforest on Earth, \
and Mount Everest rises 8,849 metres above sea level. Marie Curie won Nobel Prizes in physics and chemistry.

<table><tr><td>Name</td><td>Year</td></tr><tr><td>Ada Lovelace</td><td>1843</td></tr></table>
Dear team, please find the minutes of Monday's meeting attached; the budget review moves to Friday.
"""


GENERATED_SEEDS = ("The", "In", "A", "It", "When", "This", "There", "He", "She", "We", "Once", "After",
                   "Today", "If", "My", "Our")


def generated_ids(model, params, tokenizer, sequences: int = 8, tokens: int = 512, seed: int = 0) -> np.ndarray:
    """``(sequences, T)`` token ids of text the float model writes itself from
    one-word seeds (sampled at temperature 1, top-p 0.95; ``tokens`` new ones,
    fewer if the model's context is shorter): calibration data that cannot
    overlap any evaluation text (docs/design.md §3)."""
    from any4_jax.generation import generate  # a decode loop: imported only where text is generated

    if not 1 <= sequences <= len(GENERATED_SEEDS) or tokens < 1:
        raise ValueError(f"generated calibration: sequences must be 1..{len(GENERATED_SEEDS)} and tokens >= 1; "
                         f"got {sequences}, {tokens}")
    seeds = list(GENERATED_SEEDS[:sequences])
    prompts = [tokenizer(s)["input_ids"] for s in seeds]
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context:  # a short-context model writes less
        tokens = max(1, min(tokens, context - max(len(p) for p in prompts)))
    new = generate(model, params, tokenizer, seeds, max_new_tokens=tokens, temperature=1.0, top_p=0.95,
                   seed=seed, stop=[])
    rows = [p + n for p, n in zip(prompts, new)]
    length = min(len(r) for r in rows)
    return np.asarray([r[:length] for r in rows], np.int32)


def dense_input_statistics(model, params, inputs, statistic: str = "abs_mean"):
    """``{module path: (K,) float64 statistic of its input}`` for every ``nn.Dense``
    (and subclass) called while running ``model.apply({"params": params}, x)``.

    ``inputs`` is one input or a list of inputs (token ids: ``(B, T)`` arrays);
    statistics are pooled over all tokens of all of them. ``abs_mean`` =
    ``|mean_t x|`` (the paper's), ``mean_abs`` = ``mean_t |x|``, ``rms`` =
    ``sqrt(mean_t x**2)``. The dict is in call order; a layer that saw no
    token (an expert the router never chose) has no entry.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; accepted: {', '.join(STATISTICS)}")
    out = {}
    for path, (n, s, sa, sq) in _pooled(model, params, inputs, hessian=False).items():
        if n > 0:
            out[path] = {"abs_mean": np.abs(s / n), "mean_abs": sa / n, "rms": np.sqrt(sq / n)}[statistic]
    return out


def dense_input_hessians(model, params, inputs):
    """``{module path: (K, K) float32 E[x xᵀ]}`` of every Dense input over the
    tokens of ``inputs`` (GPTQ's Hessian, up to a factor 2); as
    ``dense_input_statistics`` otherwise."""
    return {path: (h / n).astype(np.float32)
            for path, (n, h) in _pooled(model, params, inputs, hessian=True).items() if n > 0}


def _pooled(model, params, inputs, hessian: bool) -> dict:
    totals: dict = {}
    for x in inputs if isinstance(inputs, list) else [inputs]:
        run, order = _capture_fn(model, hessian)
        sums = run(params, jnp.asarray(x))
        for path, values in zip(order, sums):
            values = [np.asarray(v, np.float64 if not hessian else np.float32) for v in values]
            totals[path] = [a + b for a, b in zip(totals[path], values)] if path in totals else values
    return totals


@functools.lru_cache(maxsize=8)
def _capture_fn(model, hessian: bool = False):
    """A jitted forward that returns every Dense input's sums (token count and
    sums of x, |x|, x², or token count and xᵀx), and the list of their module
    paths in call order (filled in when it is traced)."""
    order = []

    @jax.jit
    def run(params, x):
        records = {}
        routed = []  # masks of the enclosing routed=... calls (Mixtral experts)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if kwargs.get("routed") is not None:
                routed.append(kwargs["routed"])
                try:
                    return next_fun(*args, **kwargs)
                finally:
                    routed.pop()
            if isinstance(context.module, nn.Dense):
                a = args[0].astype(jnp.float32)
                a = a.reshape(-1, a.shape[-1])
                w = routed[-1].reshape(-1, 1).astype(jnp.float32) if routed else jnp.ones((a.shape[0], 1))
                path = "/".join(context.module.path)
                if path not in records:  # a layer called twice keeps its first call's stats
                    records[path] = (w.sum(), (w * a).T @ a) if hessian else (
                        w.sum(), (w * a).sum(0), (w * jnp.abs(a)).sum(0), (w * a * a).sum(0))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": params}, x)
        order[:] = list(records)
        return list(records.values())

    return run, order
