"""AWQ: activation-aware scaling and clipping (docs/design.md §10).

AWQ (Lin et al., 2024) protects the weights that meet large activations: the
input channels of the layers that share an input are multiplied by
``s = mean|x|^α`` and the op before them (an RMSNorm, or the Dense layer whose
output they read) is divided by ``s``, which leaves the float model unchanged
while the quantization grid follows the salient channels. ``α`` is searched on
a grid per group of layers, then each group's clipping range is searched; the
result is a float model that plain round-to-nearest quantizes, so it is stored
and served like every other format. For anyN the searches round to intN (the
same min-max groups anyN's tables are learned in, ``search_format``), there is
no clipping (a learned table keeps the outliers; on the tests' tiny model,
clipping raised anyN's output error above plain anyN's), and the table is then
learned on the scaled weights.

Here both searches minimize the layers' own output error
``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``H = E[x xᵀ]`` (the reference implementation
measures the attention or MLP block's output for the scales).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from any4_jax.formats import get_format, round_to_nearest

SCALE_GRID = 20  # α in 0, 0.05, ..., 0.95 (α = 0: no scaling)
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # 1.0 down to 0.55 of a group's |w| max
NO_CLIP = ("q_proj", "k_proj")  # as the reference: their errors are amplified by the attention softmax


def search_format(fmt: str) -> str:
    """The fixed format whose rounding the searches measure: ``fmt`` itself, or for
    anyN intN (anyN learns its table in intN's min-max groups)."""
    spec = get_format(fmt)
    return f"int{spec.bits}" if spec.kind == "learned" else fmt


def scale_groups(config, layer_names) -> list[tuple[str, str, list[str]]]:
    """``(kind, previous op, [layers that read its output])`` of each decoder
    layer whose scaling can be folded: the norms before q/k/v and gate/up (Gemma:
    its pre-feed-forward norm),
    v_proj before o_proj (only without grouped-query attention: v's heads are
    shared), up_proj before down_proj."""
    if not hasattr(config, "num_key_value_heads"):
        raise ValueError("method='awq' needs a Llama-family any4_jax Transformer (its config names the layers "
                         "whose scaling can be folded)")
    if getattr(config, "num_local_experts", 0):
        raise ValueError("method='awq' supports dense Llama-family models; a mixture of experts "
                         "(the router shares the experts' input) is not supported: use 'plain' or 'gptq'")
    groups = []
    before_mlp = "pre_feedforward_layernorm" if getattr(config, "sandwich_norms", False) else "post_attention_layernorm"
    for i in sorted({int(p.split("/")[0].removeprefix("layers_")) for p in layer_names if p.startswith("layers_")}):
        at, mlp = f"layers_{i}/self_attn", f"layers_{i}/mlp"
        groups.append(("norm", f"layers_{i}/input_layernorm", [f"{at}/q_proj", f"{at}/k_proj", f"{at}/v_proj"]))
        if config.num_attention_heads == config.num_key_value_heads:
            groups.append(("dense", f"{at}/v_proj", [f"{at}/o_proj"]))
        groups.append(("norm", f"layers_{i}/{before_mlp}", [f"{mlp}/gate_proj", f"{mlp}/up_proj"]))
        groups.append(("dense", f"{mlp}/up_proj", [f"{mlp}/down_proj"]))
    return groups


def awq(config, params, hessians: dict, mean_abs: dict, fmt: str, group_size: int | None, *,
        clip: bool = True, progress: bool = False):
    """``(params, hessians)`` after AWQ's scaling and clipping, for ``fmt`` at
    ``group_size`` (searched with ``search_format(fmt)``): the float model computes the same
    function (up to clipping; ``clip=False`` skips it), and each Hessian is
    that of the scaled inputs.

    ``hessians`` and ``mean_abs`` are ``calibrate.dense_input_hessians`` and
    ``dense_input_statistics(..., "mean_abs")`` of the float model; a layer
    without them (not quantized) is left alone, and so is its group.
    """
    clip = clip and get_format(fmt).kind != "learned"  # anyN's tables keep outliers: clipping cost it error
    fmt = search_format(fmt)
    params = jax.tree_util.tree_map(lambda x: x, params)  # new containers, same leaves
    hessians = dict(hessians)
    get = lambda path: functools.reduce(lambda t, key: t[key], path.split("/"), params)
    groups = [g for g in scale_groups(config, hessians) if all(n in hessians and n in mean_abs for n in g[2])]
    for kind, prev, names in tqdm(groups, desc="awq scales", unit="group", disable=not progress):
        k = get(names[0])["kernel"].shape[0]
        w = jnp.concatenate([jnp.asarray(get(n)["kernel"], jnp.float32).T for n in names])
        h = jnp.asarray(hessians[names[0]])
        g = k if group_size is None else group_size
        s = _search_scale(w, h, jnp.asarray(mean_abs[names[0]], jnp.float32), fmt=fmt, g=g)
        before = get(prev)
        if kind == "norm":  # the norm scales by (offset + weight): Gemma's offset is 1
            offset = getattr(config, "norm_offset", 0.0)
            before["weight"] = ((offset + before["weight"]) / s - offset).astype(before["weight"].dtype)
        else:  # a Dense layer's output channels (Flax kernel (K, N)), and its bias
            before["kernel"] = (before["kernel"] / s[None, :]).astype(before["kernel"].dtype)
            if "bias" in before:
                before["bias"] = (before["bias"] / s).astype(before["bias"].dtype)
        for n in names:
            layer = get(n)
            layer["kernel"] = (layer["kernel"] * s[:, None]).astype(layer["kernel"].dtype)
            hessians[n] = hessians[n] / np.asarray(s)[:, None] / np.asarray(s)[None, :]
    clipped = [p for p in hessians if clip and p.rsplit("/", 1)[-1] not in NO_CLIP]
    for path in tqdm(clipped, desc="awq clipping", unit="layer", disable=not progress):
        layer = get(path)
        w = jnp.asarray(layer["kernel"], jnp.float32).T
        g = w.shape[1] if group_size is None else group_size
        layer["kernel"] = _clip(w, jnp.asarray(hessians[path]), fmt=fmt, g=g).T.astype(layer["kernel"].dtype)
    return params, hessians


def _output_error(w, w_hat, h):
    e = w - w_hat
    return jnp.sum((e @ h) * e)


@functools.partial(jax.jit, static_argnames=("fmt", "g"))
def _search_scale(w, h, mean_abs, *, fmt, g):
    """The ``s = mean_abs^α`` (normalized to geometric mean 1 of its extremes)
    whose round-to-nearest weight has the lowest output error."""
    h = h / jnp.maximum(jnp.mean(jnp.diag(h)), 1e-30)
    x = jnp.maximum(mean_abs, 1e-4)

    def scale(alpha):
        s = x ** alpha
        return s / jnp.sqrt(s.max() * s.min())

    def error(alpha):
        s = scale(alpha)
        return _output_error(w, round_to_nearest(w * s, fmt, g) / s, h)

    alphas = jnp.arange(SCALE_GRID, dtype=jnp.float32) / SCALE_GRID
    return scale(alphas[jnp.argmin(jax.lax.map(error, alphas))])


@functools.partial(jax.jit, static_argnames=("fmt", "g"))
def _clip(w, h, *, fmt, g):
    """``w`` with each (row, group) clipped to the ratio of its ``|w|`` max in
    ``CLIP_RATIOS`` whose round-to-nearest error on the group's own inputs
    (the group's diagonal block of ``h``) is lowest."""
    n, k = w.shape
    kp = -(-k // g) * g
    wp = jnp.pad(w, ((0, 0), (0, kp - k)))
    hp = jnp.pad(h, ((0, kp - k), (0, kp - k)))
    blocks = jnp.stack([hp[i:i + g, i:i + g] for i in range(0, kp, g)])  # (groups, G, G)
    bound = jnp.abs(wp).reshape(n, -1, g).max(-1, keepdims=True)

    def candidate(ratio):
        c = jnp.clip(wp.reshape(n, -1, g), -ratio * bound, ratio * bound).reshape(n, kp)[:, :k]
        e = jnp.pad(w - round_to_nearest(c, fmt, g), ((0, 0), (0, kp - k))).reshape(n, -1, g)
        return c, jnp.einsum("njg,jgh,njh->nj", e, blocks, e)

    clipped, errors = jax.lax.map(candidate, jnp.asarray(CLIP_RATIOS, jnp.float32))  # (R, N, K), (R, N, groups)
    best = jnp.argmin(errors, axis=0)  # (N, groups)
    pick = jnp.repeat(best, g, axis=1)[:, :k]
    return jnp.take_along_axis(clipped, pick[None], axis=0)[0]
