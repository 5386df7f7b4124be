"""What a quantization is: the ``Recipe`` (versioned, written to checkpoints),
every default resolved in one place, and the layer factory it implies.

A checkpoint imports this module alone to read a recipe back; the pipeline
(``quantize``) takes a ``Recipe`` and runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from any4_jax.formats import QuantizedWeight, check_group_size, check_storage_dtype, get_format
from any4_jax.layers import QuantDense, check_matmul_path
from any4_jax.models import float_dense

METHODS = ("plain", "gptq", "awq")  # docs/design.md §9, §10
STATISTICS = ("abs_mean", "mean_abs", "rms")  # docs/design.md §3
REFINE_STEPS = 40  # refinement's steps when asked for without a number (docs/design.md §10)
# One name for the best any4 recipe (benchmarks/results/quality_smollm2.md): GPTQ, then refinement.
PRESETS = {"gptq-refine": dict(method="gptq", refine_steps=REFINE_STEPS)}


def default_damp(fmt: str) -> float:
    """GPTQ's damping: its 1% of the mean diagonal for fixed tables; 3.0 for
    anyN, whose LUT already fits the weights (docs/design.md §9: measured on SmolLM2)."""
    return 3.0 if get_format(fmt).kind == "learned" else 0.01


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How quantized weights are made. The pipeline runs it, a checkpoint records
    it (``to_dict``) and loading validates it (``from_dict``); it fixes the
    parameter shapes. Build one with ``Recipe.resolve`` (presets and the
    method's defaults filled in); the constructor only checks.

    ``calibration`` describes the data (``"default"`` = the built-in prompt,
    ``None`` = none, else e.g. ``"prompt (812 chars)"``); the data itself is an
    argument of the pipeline.
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
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; accepted: {', '.join(STATISTICS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS + tuple(PRESETS))}")
        if self.method == "awq" and self.sequential:
            raise ValueError("method='awq' is not sequential (its scaling keeps the float model's function); "
                             "drop sequential=True")
        if not (isinstance(self.refine_steps, (int, np.integer)) and not isinstance(self.refine_steps, bool)
                and self.refine_steps >= 0):
            raise ValueError(f"refine_steps must be an integer >= 0 (0: no refinement); got {self.refine_steps!r}")
        if self.damp is not None and not (np.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f"damp must be a finite number >= 0 (or None); got {self.damp!r}")

    @classmethod
    def resolve(cls, *, method: str = "plain", act_order: bool | None = None, damp: float | None = None,
                refine_steps: int = 0, **fields) -> "Recipe":
        """The recipe with every default filled in: a preset method
        (``"gptq-refine"`` = GPTQ + ``REFINE_STEPS`` refinement steps, or the
        ``refine_steps`` given), GPTQ's ``act_order`` (on) and ``damp``
        (``default_damp``); neither means anything for the other methods."""
        if method in PRESETS:
            preset = PRESETS[method]
            method, refine_steps = preset["method"], refine_steps or preset["refine_steps"]
        elif method not in METHODS:
            raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS + tuple(PRESETS))}")
        if method == "gptq":
            damp = default_damp(fields.get("fmt", cls.fmt)) if damp is None else damp
            act_order = True if act_order is None else bool(act_order)
        else:
            act_order, damp = False, None
        return cls(method=method, act_order=act_order, damp=damp, refine_steps=refine_steps, **fields)

    @property
    def needs_hessians(self) -> bool:
        """Whether the method fits layer outputs (``E[x xᵀ]`` of each layer's inputs)."""
        return self.method in ("gptq", "awq") or self.refine_steps > 0

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

    def dense(self, matmul: str = "auto", mesh=None) -> "QuantDenseFactory":
        """The ``dense`` factory of a model quantized by this recipe."""
        return QuantDenseFactory(self, matmul, mesh)


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


def quantized_weights(params) -> list[QuantizedWeight]:
    is_q = lambda x: isinstance(x, QuantizedWeight)
    return [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_q) if is_q(x)]


def storage_totals(params) -> tuple[int, int]:
    """``(stored bytes, weights)`` of the quantized layers of ``params``."""
    qws = quantized_weights(params)
    return sum(q.nbytes for q in qws), sum(q.shape[0] * q.shape[1] for q in qws)


def bits_per_weight(params=None, totals: tuple[int, int] | None = None) -> float:
    """Stored bits per weight over the quantized layers of ``params`` (or of
    ``totals``, summed ``storage_totals`` of its parts)."""
    nbytes, count = storage_totals(params) if totals is None else totals
    return round(8 * nbytes / max(count, 1), 4)
