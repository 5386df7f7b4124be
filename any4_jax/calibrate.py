"""Calibration: its inputs, and what every Dense layer sees of them, one stage at a time.

The paper's finding (docs/design.md §3): one short, hand-written, diverse prompt
calibrates as well as 128 samples of 2048 tokens. ``DEFAULT_PROMPT`` is this
project's own. ``capture`` runs one ``models.Stage`` (an embedding, a decoder
block, a head, or a whole Linen model) on hidden states and records, for each
``nn.Dense`` it calls, sums of its input (for the per-input-channel statistics)
and, when asked, ``Σ x xᵀ`` (GPTQ's Hessian) once per distinct input: q/k/v
share one, gate/up another. It uses ``flax.linen.intercept_methods``, so no
model code changes. A module called with a ``routed=`` mask (a Mixtral expert)
has its Dense layers' statistics taken over the routed tokens only, as forward
hooks on PyTorch's experts see them.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from any4_jax.models import Stage, apply_stage, stage_params, stages
from any4_jax.recipe import STATISTICS

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


def calibration_inputs(calibration, tokenizer, max_len: int | None = None) -> list[np.ndarray] | None:
    """Model inputs (a list of arrays: ``(B, T)`` int32 token ids for a language
    model) for ``calibration``: ``"default"`` (the built-in prompt), a prompt, a
    list of texts, an array of model inputs, or ``None`` (no calibration: ``None``). An
    input longer than ``max_len`` tokens (the model's context) is split into
    chunks of at most ``max_len``, with a warning (statistics pool over all chunks)."""
    if calibration is None:
        return None
    if isinstance(calibration, str):
        texts = [DEFAULT_PROMPT if calibration == "default" else calibration]
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        texts = list(calibration)
    else:
        x = np.asarray(calibration)
        if x.size == 0:
            raise ValueError(f"calibration inputs must not be empty; got shape {x.shape}")
        return _chunked([x if x.ndim >= 2 else x[None]], max_len)
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer (tokenizer=...), or pass token ids")
    inputs = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) < 1:
            raise ValueError(f"calibration text {text[:40]!r} is shorter than one token")
        inputs.append(np.asarray(ids, np.int32)[None])
    return _chunked(inputs, max_len)


def batch_texts(texts, tokenizer, max_len: int | None = None, length: int = 512, tokens: int = 4096) -> np.ndarray:
    """``(rows, L)`` token ids of ``texts`` for one batched run: the texts'
    tokens one after another (each tokenized on its own), cut into rows of
    ``L = min(length, max_len)`` tokens, at most ``tokens`` in all."""
    ids = [i for t in texts for i in tokenizer(t)["input_ids"]]
    row = min(length, max_len or length)
    rows = min(len(ids) // row, max(1, tokens // row))
    if rows < 1:
        raise ValueError(f"calibration texts of {len(ids)} tokens in all; at least {row} are needed")
    return np.asarray(ids[:rows * row], np.int32).reshape(rows, row)


def _chunked(inputs, max_len):
    if not max_len or all(x.shape[-1] <= max_len for x in inputs):
        return inputs
    longest = max(x.shape[-1] for x in inputs)
    warnings.warn(f"calibration input of {longest} tokens is longer than the model context {max_len}; "
                  f"it is split into chunks of {max_len} tokens", stacklevel=3)
    return [x[..., i:i + max_len] for x in inputs for i in range(0, x.shape[-1], max_len)]


@dataclasses.dataclass
class Capture:
    """What the Dense layers of one stage saw on the calibration inputs.

    Paths are the layers' paths in the model's params (``layers_3/mlp/up_proj``).
    ``order``: in call order. ``groups``: each path -> the first path called on
    the same input (and, for a routed expert, the same routing). ``sums``: path
    -> ``[tokens, Σx, Σ|x|, Σx²]`` (float64). ``hessian_sums``: group -> ``Σ x xᵀ``
    (float32), when asked for. ``outputs``: the stage's output for each input
    (None where not asked for).
    """
    order: list
    groups: dict
    sums: dict
    hessian_sums: dict
    outputs: list

    def statistic(self, path: str, statistic: str = "abs_mean"):
        """``(K,)`` float64: ``abs_mean`` = ``|mean_t x|`` (the paper's),
        ``mean_abs`` = ``mean_t |x|``, ``rms`` = ``sqrt(mean_t x**2)``; None for
        a layer that saw no token (an expert the router never chose)."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; accepted: {', '.join(STATISTICS)}")
        n, s, sa, sq = self.sums[path]
        if n <= 0:
            return None
        return {"abs_mean": np.abs(s / n), "mean_abs": sa / n, "rms": np.sqrt(sq / n)}[statistic]

    def hessian(self, path: str):
        """``(K, K)`` float32 ``E[x xᵀ]`` of the layer's input (GPTQ's Hessian, up to
        a factor 2); None for a layer that saw no token."""
        n = self.sums[path][0]
        return None if n <= 0 else (self.hessian_sums[self.groups[path]] / n).astype(np.float32)


def capture(stage: Stage, params, inputs, xs=None, *, hessians: bool = False, outputs: bool = True) -> Capture:
    """Run ``stage`` with ``params`` (a dict holding its keys; a ``"model"``
    stage: the whole tree) on each calibration input (``inputs``: a list of
    ``(B, T)`` ids; ``xs``: the hidden states entering the stage for each, or
    None before the first stage) and record what its Dense layers see."""
    run, layout = _capture_fn(stage.kind, stage.module, hessians, outputs)
    p = stage_params(stage, params)
    sums, hess, outs = {}, {}, []
    for i, ids in enumerate(inputs):
        out, stats, hs = run(p, None if xs is None else xs[i], jnp.asarray(ids))
        outs.append(out)
        for path, values in zip(layout["order"], stats):
            values = [np.asarray(v, np.float64) for v in values]
            sums[path] = [a + b for a, b in zip(sums[path], values)] if path in sums else values
        for path, h in hs.items():
            h = np.asarray(h, np.float32)
            hess[path] = hess[path] + h if path in hess else h
    prefix = f"{stage.prefix}/" if stage.prefix else ""
    full = lambda path: prefix + path
    return Capture([full(p) for p in layout["order"]], {full(p): full(g) for p, g in layout["groups"].items()},
                   {full(p): v for p, v in sums.items()}, {full(p): v for p, v in hess.items()}, outs)


def call_order(stage: Stage, params) -> list[str]:
    """The paths of the Dense layers ``stage`` calls, in call order, found by
    tracing it (nothing is computed)."""
    run, layout = _capture_fn(stage.kind, stage.module, False, False)
    x = None
    if stage.kind in ("block", "head"):
        x = jax.ShapeDtypeStruct((1, 1, stage.module.config.hidden_size), stage.module.dtype)
    jax.eval_shape(run, stage_params(stage, params), x, jax.ShapeDtypeStruct((1, 1), jnp.int32))
    return [f"{stage.prefix}/{p}" if stage.prefix else p for p in layout["order"]]


def forward(stage: Stage, params, inputs, xs=None) -> list:
    """The stage's output for each calibration input (as ``capture``, recording nothing)."""
    p = stage_params(stage, params)
    return [_forward(stage.kind, stage.module, p, None if xs is None else xs[i], jnp.asarray(ids))
            for i, ids in enumerate(inputs)]


_forward = jax.jit(apply_stage, static_argnums=(0, 1))


def model_captures(model, params, inputs, *, hessians: bool = False) -> list[Capture]:
    """``capture`` of every stage of ``model`` in turn, each fed the float
    outputs of the one before (``models.stages``)."""
    xs, out = None, []
    for stage in stages(model):
        if stage.kind == "none":
            continue
        cap = capture(stage, params, inputs, xs, hessians=hessians)
        out.append(cap)
        xs = cap.outputs
    return out


def dense_input_statistics(model, params, inputs, statistic: str = "abs_mean"):
    """``{module path: (K,) float64 statistic of its input}`` for every ``nn.Dense``
    (and subclass) called while running ``model`` on ``inputs`` (one ``(B, T)``
    ids array or a list of them; statistics pool over all their tokens; see
    ``Capture.statistic``). The dict is in call order; a layer that saw no
    token (an expert the router never chose) has no entry."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; accepted: {', '.join(STATISTICS)}")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    out = {}
    for cap in model_captures(model, params, inputs):
        for path in cap.order:
            if (s := cap.statistic(path, statistic)) is not None:
                out[path] = s
    return out


def dense_input_hessians(model, params, inputs):
    """``{module path: (K, K) float32 E[x xᵀ]}`` of every Dense input over the
    tokens of ``inputs``; as ``dense_input_statistics`` otherwise."""
    inputs = inputs if isinstance(inputs, list) else [inputs]
    out = {}
    for cap in model_captures(model, params, inputs, hessians=True):
        for path in cap.order:
            if (h := cap.hessian(path)) is not None:
                out[path] = h
    return out


@functools.lru_cache(maxsize=32)
def _capture_fn(kind, module, hessians: bool, outputs: bool):
    """A jitted stage run that returns its output, each Dense input's sums
    (token count and sums of x, |x|, x²) and, with ``hessians``, ``Σ x xᵀ`` of
    each distinct input; and the layout (``order``, ``groups``: Dense paths
    relative to the stage's module), filled in when it is traced."""
    layout = {"order": [], "groups": {}}

    @jax.jit
    def run(p, x, ids):
        records, seen, routed = {}, [], []  # seen: (input, routing, group) of each distinct input

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
                path = "/".join(context.module.path)
                if path not in records:  # a layer called twice keeps its first call's stats
                    given, mask = args[0], (routed[-1] if routed else None)
                    group = next((g for xi, mi, g in seen if xi is given and mi is mask), None)
                    if group is None:
                        group = path
                        seen.append((given, mask, path))
                    a = given.astype(jnp.float32)
                    a = a.reshape(-1, a.shape[-1])
                    w = mask.reshape(-1, 1).astype(jnp.float32) if mask is not None else jnp.ones((a.shape[0], 1))
                    stats = (w.sum(), (w * a).sum(0), (w * jnp.abs(a)).sum(0), (w * a * a).sum(0))
                    h = (w * a).T @ a if hessians and group == path else None
                    records[path] = (group, stats, h)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = apply_stage(kind, module, p, x, ids)
        layout["order"] = list(records)
        layout["groups"] = {path: r[0] for path, r in records.items()}
        return (out if outputs else None), [r[1] for r in records.values()], \
            {path: r[2] for path, r in records.items() if r[2] is not None}

    return run, layout
