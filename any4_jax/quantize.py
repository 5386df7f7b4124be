"""Float params -> quantized params, for any Flax Linen model with ``nn.Dense`` layers.

How the weights are made is a ``Recipe`` (versioned, written to checkpoints);
how a quantized layer computes and where it runs is a ``QuantDenseFactory``
(the recipe, a matmul path and an optional mesh). ``add_arguments`` /
``from_arguments`` are the command-line flags for both the ``any4`` CLI and
``python -m converters.hf2flax --quantize``.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from any4_jax import calibrate
from any4_jax.awq import awq, scale_groups
from any4_jax.gptq import default_damp, gptq_quantize
from any4_jax.refine import DEFAULT_STEPS, refine
from any4_jax.formats import (STORAGE_DTYPES, QuantizedWeight, check_group_size, check_storage_dtype,
                              dequantize, get_format, quantize_tensor)
from any4_jax.layers import QuantDense, check_matmul_path, quantized_dense
from any4_jax.models import float_dense


METHODS = ("plain", "gptq", "awq")  # docs/design.md §9, §10
# One name for the best any4 recipe (README's quality table): GPTQ, then refinement.
PRESETS = {"gptq-refine": dict(method="gptq", refine_steps=DEFAULT_STEPS)}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How quantized weights were made; a checkpoint records it (``to_dict``)
    and loading validates it (``from_dict``). It fixes the parameter shapes.

    ``calibration`` describes the data (``"default"`` = the built-in prompt,
    ``None`` = none, else e.g. ``"prompt (812 chars)"``); the data itself is an
    argument of ``quantize_model``.
    """

    VERSION: ClassVar[int] = 3  # 2 added method, act_order and damp; 3 refine_steps

    fmt: str = "any4"
    group_size: int | None = 128
    storage_dtype: str = "bfloat16"
    skip: tuple[str, ...] = ("lm_head",)
    calibration: str | None = "default"
    statistic: str = "abs_mean"
    scale_sample_weight: bool = True
    sequential: bool = False
    method: str = "plain"
    act_order: bool = False
    damp: float | None = None
    refine_steps: int = 0

    def __post_init__(self):
        get_format(self.fmt)
        check_group_size(self.group_size)
        object.__setattr__(self, "storage_dtype", check_storage_dtype(self.storage_dtype).name)
        object.__setattr__(self, "skip", tuple(self.skip or ()))
        if self.statistic not in calibrate.STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; accepted: {', '.join(calibrate.STATISTICS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        if self.method == "awq" and get_format(self.fmt).kind == "learned":
            raise ValueError(f"method='awq' takes a fixed format (int4, int3, int2, nf4, fp4); got {self.fmt!r} "
                             f"(for anyN use 'plain' or 'gptq')")
        if self.method == "awq" and self.sequential:
            raise ValueError("method='awq' is not sequential (its scaling keeps the float model's function); "
                             "drop sequential=True")
        if not (isinstance(self.refine_steps, (int, np.integer)) and not isinstance(self.refine_steps, bool)
                and self.refine_steps >= 0):
            raise ValueError(f"refine_steps must be an integer >= 0 (0: no refinement); got {self.refine_steps!r}")

    def to_dict(self) -> dict:
        return {"recipe_version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """The recipe a checkpoint recorded; a ValueError names an unknown version or field."""
        d = dict(d)
        version = d.pop("recipe_version", None)
        if version not in (1, 2, cls.VERSION):
            raise ValueError(f"recipe_version {version!r} is not one this any4-jax reads (1 to {cls.VERSION})")
        if version == 1:
            d.update(method="plain", act_order=False, damp=None)
        if version in (1, 2):
            d.update(refine_steps=0)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ValueError(f"recipe (version {version}) has unknown field(s) {unknown} and lacks "
                             f"field(s) {missing}; expected exactly: {', '.join(sorted(names))}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class QuantDenseFactory:
    """The ``dense`` of a quantized ``Transformer``: ``QuantDense`` layers with the
    recipe's shapes everywhere but the layers in ``recipe.skip`` (plain Dense).
    ``matmul`` is the ``qmatmul`` path; with a ``mesh``, kernel matmuls run per shard."""

    recipe: Recipe
    matmul: str = "auto"
    mesh: Any = None

    def __post_init__(self):
        check_matmul_path(self.matmul)

    def __call__(self, features, *, use_bias=True, dtype=None, name=None, parallel=None):
        r = self.recipe
        if name in r.skip:
            return float_dense(features, use_bias=use_bias, dtype=dtype, name=name)
        return QuantDense(features, use_bias, dtype, r.fmt, r.group_size, r.storage_dtype, self.matmul,
                          parallel, self.mesh, name=name)


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """Wraps a Linen model that builds its ``nn.Dense`` layers itself: ``apply``
    runs it with every Dense whose ``kernel`` is a ``QuantizedWeight`` routed
    through ``qmatmul``. (Models with a ``dense`` factory, like ``Transformer``,
    get ``QuantDense`` layers instead.)"""

    model: Any
    recipe: Recipe | None = None
    matmul: str = "auto"

    def apply(self, variables, *args, **kwargs):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.Dense) and context.method_name == "__call__":
                kernel = module.get_variable("params", "kernel")
                if isinstance(kernel, QuantizedWeight):
                    bias = module.get_variable("params", "bias") if module.use_bias else None
                    return quantized_dense(args[0], kernel, bias, dtype=module.dtype, path=self.matmul)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return self.model.apply(variables, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def calibration_inputs(calibration, tokenizer, max_len: int | None = None):
    """Model inputs for ``calibration``: ``"default"`` (the built-in prompt), a
    prompt, a list of texts, an array of token ids / model inputs, or ``None``
    (no calibration); ``quantize_model`` also takes ``"generated"``
    (``calibrate.generated_ids``). An input
    longer than ``max_len`` tokens (the model's context) is split into chunks of
    at most ``max_len``, with a warning (statistics pool over all chunks)."""
    if calibration is None:
        return None
    if isinstance(calibration, str):
        texts = [calibrate.DEFAULT_PROMPT if calibration == "default" else calibration]
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        texts = list(calibration)
    else:
        x = np.asarray(calibration)
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


def _chunked(inputs, max_len):
    if not max_len or all(x.shape[-1] <= max_len for x in inputs):
        return inputs
    longest = max(x.shape[-1] for x in inputs)
    warnings.warn(f"calibration input of {longest} tokens is longer than the model context {max_len}; "
                  f"it is split into chunks of {max_len} tokens", stacklevel=3)
    return [x[..., i:i + max_len] for x in inputs for i in range(0, x.shape[-1], max_len)]


def quantize_model(model, params, *, fmt: str = "any4", group_size: int | None = 128,
                   skip=("lm_head",), calibration="default", statistic: str = "abs_mean",
                   scale_sample_weight: bool = True, sequential: bool = False, tokenizer=None,
                   key=None, storage_dtype: str = "bfloat16", progress: bool = True, matmul: str = "auto",
                   method: str = "plain", act_order: bool = True, damp: float | None = None,
                   refine_steps: int = 0, **kmeans_options):
    """Quantize every Dense layer of ``model`` except those named in ``skip``.

    Returns ``(qmodel, qparams)``: ``qmodel.apply({"params": qparams}, x)`` runs
    the quantized model. Embeddings, norms and tied heads stay float (they are
    not Dense layers). With ``calibration`` (see ``calibration_inputs``) each
    layer's k-means is weighted by a per-input-channel ``statistic`` of its input
    (``abs_mean``, ``mean_abs`` or ``rms``) from one forward pass of the float
    model; ``sequential=True`` re-runs that pass before each layer on the
    partially quantized model, as the original did (one pass per layer: slower).
    ``method="gptq"`` then snaps each weight to its row's table (learned or
    fixed) with GPTQ error feedback through the Hessian of the layer's inputs on
    the calibration data (``gptq.gptq_quantize``; ``act_order`` orders columns
    by it; ``damp``, default ``gptq.default_damp(fmt)``, is its damping).
    ``method="awq"`` (fixed formats) first scales each layer's input channels
    by its activations and folds the inverse into the op before it, then clips
    each group's range, both searched to lower the layer's output error on the
    calibration data (``awq.awq``); round-to-nearest then quantizes.
    ``refine_steps > 0`` then moves each weight's LUT (anyN), scales and zeros,
    codes fixed, to lower the layer's output error on the calibration data
    (``refine.refine``, that many Adam steps). With either, the ``"default"``
    calibration is ``"generated"`` (one prompt is too few tokens for a
    Hessian). ``storage_dtype`` is the dtype of the stored LUTs, scales
    and zeros; ``matmul`` the ``qmatmul`` path of the returned model. The fields become the
    model's ``Recipe``; ``kmeans_options`` go to ``quantize_tensor``.
    ``method="gptq-refine"`` is ``method="gptq"`` with ``refine_steps=40``
    (or the ``refine_steps`` given, if > 0): the best any4 method measured here, under one name.
    """
    if method in PRESETS:
        preset = PRESETS[method]
        method, refine_steps = preset["method"], refine_steps or preset["refine_steps"]
    elif method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS + tuple(PRESETS))}")
    if method == "gptq":
        damp = default_damp(fmt) if damp is None else damp
    else:
        act_order, damp = False, None
    recipe = Recipe(fmt, group_size, storage_dtype, skip, _describe(calibration), statistic, scale_sample_weight,
                    sequential, method, act_order, damp, refine_steps)  # arguments checked before generating
    needs_hessians = method in ("gptq", "awq") or refine_steps > 0
    if method == "awq":  # a model AWQ cannot fold into is refused before any work
        scale_groups(getattr(model, "config", None), ())
    if needs_hessians and isinstance(calibration, str) and calibration == "default":
        calibration = "generated"
    if isinstance(calibration, str) and calibration == "generated":
        if tokenizer is None:
            raise ValueError("calibration='generated' needs the model's tokenizer (tokenizer=...)")
        calibration = calibrate.generated_ids(model, params, tokenizer)
        recipe = dataclasses.replace(recipe, calibration=f"generated ({calibration.shape[0]} x "
                                                         f"{calibration.shape[1]} tokens)")
    skip = recipe.skip
    key = jax.random.PRNGKey(0) if key is None else key
    inputs = calibration_inputs(calibration, tokenizer,
                                getattr(getattr(model, "config", None), "max_position_embeddings", None))

    if needs_hessians and inputs is None:
        raise ValueError(f"{'method=' + repr(method) if method != 'plain' else 'refine_steps > 0'} needs calibration data "
                         f"(got calibration=None)")
    layers = _dense_layers(params, skip)
    stats, hessians = {}, {}
    if inputs is not None:
        # One pass finds the call order and (unless sequential) every layer's statistic.
        stats = calibrate.dense_input_statistics(model, params, inputs, statistic)
        order = [p for p in stats if p in layers] + [p for p in layers if p not in stats]
        if needs_hessians:
            hessians = calibrate.dense_input_hessians(model, params, inputs)
        if method == "awq":  # scaled and clipped float weights, then round-to-nearest below
            mean_abs = calibrate.dense_input_statistics(model, params, inputs, "mean_abs")
            params, hessians = awq(model.config, params, {p: h for p, h in hessians.items() if p in layers},
                                   mean_abs, fmt, group_size, progress=progress)
    else:
        order = list(layers)

    learned = get_format(fmt).kind == "learned"

    def quantize_layer(i, path):
        kernel = _get(params, path)["kernel"]
        w = jnp.asarray(kernel, jnp.float32).T  # Flax (K, N) -> (N, K)
        bad = 0 if path not in stats else int((~np.isfinite(stats[path])).sum())
        if bad:
            raise ValueError(f"the calibration {statistic} of {path}'s input has {bad} non-finite value(s): the "
                             f"model's activations overflow or are NaN on the calibration input (check the float "
                             f"model's perplexity, or pass calibration=None)")
        fit = lambda: quantize_tensor(w, fmt, group_size, sample_weight=stats.get(path),
                                      scale_sample_weight=scale_sample_weight, key=jax.random.fold_in(key, i),
                                      storage_dtype=storage_dtype, **kmeans_options)
        if method == "gptq" and path in hessians:  # anyN's LUT is fitted first; fixed tables need nothing
            qw = gptq_quantize(w, hessians[path], fmt, group_size, lut=fit().lut if learned else None,
                               act_order=act_order, damp=damp, storage_dtype=storage_dtype)
        else:
            qw = fit()
        if refine_steps and path in hessians:
            qw = refine(qw, w, hessians[path], steps=refine_steps)
        return qw

    quantized = {}
    bar = tqdm(order, desc=f"quantizing {fmt}", unit="layer", disable=not progress)
    if sequential:  # each layer sees the model with the layers before it quantized
        work = jax.tree_util.tree_map(lambda x: x, params)  # float params, updated in place
        for i, path in enumerate(bar):
            bar.set_postfix_str(path)
            if inputs is not None and i > 0:
                stats = calibrate.dense_input_statistics(model, work, inputs, statistic)
                if needs_hessians:
                    hessians = calibrate.dense_input_hessians(model, work, inputs)
            quantized[path] = quantize_layer(i, path)
            layer = _get(work, path)
            layer["kernel"] = dequantize(quantized[path], layer["kernel"].dtype).T
    else:  # independent layers, two at a time (much of a layer's work leaves a core idle)
        pool = ThreadPoolExecutor(2)
        try:
            for path, qw in zip(bar, pool.map(quantize_layer, range(len(order)), order)):
                bar.set_postfix_str(path)
                quantized[path] = qw
        finally:  # an error or an interrupt: the layers not yet started never start
            pool.shutdown(cancel_futures=True)
    qparams = jax.tree_util.tree_map(lambda x: x, params)
    for path, qw in quantized.items():
        _get(qparams, path)["kernel"] = qw
    if hasattr(model, "dense") and hasattr(model, "clone"):
        return model.clone(dense=QuantDenseFactory(recipe, matmul)), qparams
    return QuantizedModel(model, recipe, matmul), qparams


def quantized_weights(params) -> list[QuantizedWeight]:
    is_q = lambda x: isinstance(x, QuantizedWeight)
    return [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_q) if is_q(x)]


def bits_per_weight(params) -> float:
    """Stored bits per weight over the quantized layers of ``params``."""
    qws = quantized_weights(params)
    count = sum(q.shape[0] * q.shape[1] for q in qws)
    return round(8 * sum(q.nbytes for q in qws) / max(count, 1), 4)


def add_arguments(p: argparse.ArgumentParser):
    """The quantization flags, shared by ``any4 quantize`` and ``python -m converters.hf2flax``."""
    p.add_argument("--group-size", default="128", help="32, 64, 128, 256, 512, 1024 or 'none' (one group a row)")
    p.add_argument("--calibration", default="default",
                   help="'default' (the built-in one-prompt calibration), 'generated' (8 x 512 tokens the "
                        "float model writes from one-word seeds), a text FILE, or 'none'")
    p.add_argument("--method", default="plain", choices=METHODS + tuple(PRESETS),
                   help="plain (the paper's), gptq (error feedback through the Hessian of each layer's "
                        "inputs), awq (fixed formats: activation-aware scaling and clipping) or gptq-refine "
                        f"(gptq, then --refine {DEFAULT_STEPS}: the best any4 here, slowest); all but plain "
                        "default to the 'generated' calibration")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq: columns in order of decreasing Hessian diagonal (default: on)")
    p.add_argument("--damp", type=float, default=None,
                   help="gptq: diagonal damping as a fraction of the mean diagonal (default: 0.01, anyN 3.0)")
    p.add_argument("--refine", type=int, nargs="?", const=DEFAULT_STEPS, default=0, metavar="STEPS",
                   help="refine each layer's LUT, scales and zeros (codes fixed) on its output error over the "
                        f"calibration data, STEPS Adam steps (--refine alone: {DEFAULT_STEPS}; default: off; its "
                        "default calibration is 'generated')")
    p.add_argument("--statistic", default="abs_mean", choices=calibrate.STATISTICS,
                   help="per-input-channel activation statistic (default abs_mean, the paper's)")
    p.add_argument("--sequential", action="store_true",
                   help="re-calibrate before each layer on the partially quantized model (slower)")
    p.add_argument("--storage-dtype", default="bfloat16", choices=STORAGE_DTYPES,
                   help="dtype of the stored LUTs, scales and zeros (default bfloat16: ~4.25 bits/weight at G=128)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")


def from_arguments(args) -> dict:
    """``quantize_model`` keyword arguments from the flags of ``add_arguments``."""
    group = None if str(args.group_size).lower() == "none" else args.group_size
    if group is not None and not str(group).isdigit():
        raise ValueError(f"--group-size {group!r}: expected 32, 64, 128, 256, 512, 1024 or 'none'")
    group = None if group is None else int(group)
    cal = args.calibration
    if cal.lower() == "none":
        cal = None
    elif cal not in ("default", "generated"):
        path = Path(cal)
        if not path.is_file():
            raise FileNotFoundError(f"--calibration {cal}: not 'default', 'generated', 'none' or an existing text file")
        try:
            cal = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--calibration {cal}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
    return dict(group_size=group, calibration=cal, statistic=args.statistic, sequential=args.sequential,
                method=args.method, act_order=args.act_order, damp=args.damp, refine_steps=args.refine,
                storage_dtype=args.storage_dtype, key=jax.random.PRNGKey(args.seed))


def _describe(calibration):
    if calibration is None or isinstance(calibration, str) and calibration == "default":
        return calibration
    if isinstance(calibration, str):
        return calibration if calibration == "generated" else f"prompt ({len(calibration)} chars)"
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
