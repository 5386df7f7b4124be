"""Float params -> quantized params, for any Flax Linen model with ``nn.Dense`` layers."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from any4_jax import calibrate
from any4_jax.formats import FORMATS, GROUP_SIZES, QuantizedWeight, dequantize, quantize_tensor
from any4_jax.layers import QuantDenseFactory, qmatmul


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """Wraps a Linen model that builds its ``nn.Dense`` layers itself: ``apply``
    runs it with every Dense whose ``kernel`` is a ``QuantizedWeight`` routed
    through ``qmatmul``. (Models with a ``dense`` factory, like ``Transformer``,
    get ``QuantDense`` layers instead.)"""

    model: Any

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(_quantized_dense_interceptor):
            return self.model.apply(variables, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _quantized_dense_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dense) and context.method_name == "__call__":
        kernel = module.get_variable("params", "kernel")
        if isinstance(kernel, QuantizedWeight):
            x = args[0]
            dtype = module.dtype or x.dtype
            y = qmatmul(x.astype(dtype), kernel)
            if module.use_bias:
                y = y + module.get_variable("params", "bias").astype(dtype)
            return y
    return next_fun(*args, **kwargs)


def calibration_inputs(calibration, tokenizer):
    """Model inputs for ``calibration``: ``"default"``, a prompt, a list of texts,
    an array of token ids / model inputs, or ``None`` (no calibration)."""
    if calibration is None:
        return None
    if isinstance(calibration, str):
        texts = [calibrate.DEFAULT_PROMPT if calibration == "default" else calibration]
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        texts = list(calibration)
    else:
        x = np.asarray(calibration)
        return [x if x.ndim >= 2 else x[None]]
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer (tokenizer=...), or pass token ids")
    inputs = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) < 1:
            raise ValueError(f"calibration text {text[:40]!r} is shorter than one token")
        inputs.append(np.asarray(ids, np.int32)[None])
    return inputs


def quantize_model(model, params, *, fmt: str = "any4", group_size: int | None = 128,
                   skip=("lm_head",), calibration="default", statistic: str = "abs_mean",
                   scale_sample_weight: bool = True, sequential: bool = False, tokenizer=None,
                   key=None, storage_dtype: str = "bfloat16", progress: bool = True, **kmeans_options):
    """Quantize every Dense layer of ``model`` except those named in ``skip``.

    Returns ``(qmodel, qparams)``: ``qmodel.apply({"params": qparams}, x)`` runs
    the quantized model. Embeddings, norms and tied heads stay float (they are
    not Dense layers). With ``calibration`` (see ``calibration_inputs``) each
    layer's k-means is weighted by a per-input-channel ``statistic`` of its input
    (``abs_mean``, ``mean_abs`` or ``rms``) from one forward pass of the float
    model; ``sequential=True`` re-runs that pass before each layer on the
    partially quantized model, as the original did (one pass per layer: slower).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported group_size {group_size!r}; accepted: {', '.join(map(str, GROUP_SIZES))}")
    if statistic not in calibrate.STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; accepted: {', '.join(calibrate.STATISTICS)}")
    skip = tuple(skip or ())
    key = jax.random.PRNGKey(0) if key is None else key
    inputs = calibration_inputs(calibration, tokenizer)

    layers = _dense_layers(params, skip)
    stats = {}
    if inputs is not None:
        # One pass finds the call order and (unless sequential) every layer's statistic.
        stats = calibrate.dense_input_statistics(model, params, inputs, statistic)
        order = [p for p in stats if p in layers] + [p for p in layers if p not in stats]
    else:
        order = list(layers)

    work = jax.tree_util.tree_map(lambda x: x, params)  # float params, updated in place when sequential
    quantized = {}
    bar = tqdm(order, desc=f"quantizing {fmt}", unit="layer", disable=not progress)
    for i, path in enumerate(bar):
        bar.set_postfix_str(path)
        if sequential and inputs is not None and i > 0:
            stats = calibrate.dense_input_statistics(model, work, inputs, statistic)
        kernel = _get(params, path)["kernel"]
        w = jnp.asarray(kernel, jnp.float32).T  # Flax (K, N) -> (N, K)
        qw = quantize_tensor(w, fmt, group_size, sample_weight=stats.get(path),
                             scale_sample_weight=scale_sample_weight, key=jax.random.fold_in(key, i),
                             storage_dtype=storage_dtype, **kmeans_options)
        quantized[path] = qw
        if sequential:
            _get(work, path)["kernel"] = dequantize(qw, kernel.dtype).T
    qparams = jax.tree_util.tree_map(lambda x: x, params)
    for path, qw in quantized.items():
        _get(qparams, path)["kernel"] = qw
    if hasattr(model, "dense") and hasattr(model, "clone"):
        recipe = QuantDenseFactory(fmt, group_size, skip, storage_dtype, _describe(calibration),
                                   statistic, scale_sample_weight, sequential)
        return model.clone(dense=recipe), qparams
    return QuantizedModel(model), qparams


def quantized_weights(params) -> list[QuantizedWeight]:
    is_q = lambda x: isinstance(x, QuantizedWeight)
    return [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_q) if is_q(x)]


def bits_per_weight(params) -> float:
    """Stored bits per weight over the quantized layers of ``params``."""
    qws = quantized_weights(params)
    count = sum(q.shape[0] * q.shape[1] for q in qws)
    return round(8 * sum(q.nbytes for q in qws) / max(count, 1), 4)


def _describe(calibration):
    if calibration is None or isinstance(calibration, str) and calibration == "default":
        return calibration
    if isinstance(calibration, str):
        return f"prompt ({len(calibration)} chars)"
    if isinstance(calibration, (list, tuple)):
        return f"{len(calibration)} texts"
    return "token ids"


def _dense_layers(params, skip) -> dict:
    """``{path: params dict}`` for every Dense-like leaf dict with a 2-D ``kernel``."""
    found = {}

    def walk(tree, prefix):
        for name, value in tree.items():
            path = f"{prefix}/{name}" if prefix else name
            if isinstance(value, dict):
                kernel = value.get("kernel")
                if kernel is not None and not isinstance(kernel, dict) and getattr(kernel, "ndim", 0) == 2:
                    if name not in skip:
                        found[path] = value
                else:
                    walk(value, path)

    walk(params, "")
    return found


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree
