"""Flax (Linen) decoder-only models of the Llama family, built from an HF config.

Llama 2/3/3.1/3.2 (with ``llama3`` rope scaling), Mistral (sliding window),
Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mixtral (top-k mixture of experts),
SmolLM2 (a Llama) and Gemma 3's text models (scaled embeddings, (1 + w) norms
around attention and the feed-forward, q/k norms, GeGLU, sliding-window layers
with their own rope base between global ones).

Parameter names follow Hugging Face's (``layers_3/self_attn/q_proj/kernel`` is
``model.layers.3.self_attn.q_proj.weight`` transposed), so converting is a loop.
Every linear layer is made by ``Transformer.dense``, called as
``dense(features, use_bias=, dtype=, name=, parallel=)`` (default
``float_dense``, an ``nn.Dense``): a quantized model swaps them all with
``model.clone(dense=...)`` without editing this file. ``parallel`` says how the
model splits each layer over a mesh's model axis (``PARALLEL``, docs/design.md §6).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma3_text")
ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}
# How each linear layer is split for tensor parallelism (Megatron style): column
# = output features split, row = input features split (partial sums added).
PARALLEL = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row",
            "gate_proj": "column", "up_proj": "column", "down_proj": "row",
            "w1": "column", "w3": "column", "w2": "row", "lm_head": "column", "gate": None}
SLIDING, FULL = "sliding_attention", "full_attention"  # the layer types of a config's layer_types


# Output features a product computes at a time (an LLM's head: 128k): XLA on a CPU converts
# 16-bit weights to float32 for a product, and a whole Llama-3 head would be 1-2 GB at once.
def accumulating_dot(x, w, *, transposed: bool = False):
    """``x @ w`` (``w (K, N)``), or ``x @ w.T`` for ``transposed`` (``w (N, K)``,
    an embedding table), in ``jnp.dot``'s result dtype. 16-bit products are
    asked for as float32 accumulations, then rounded, as XLA computes them
    anyway: asked for in 16 bits, XLA's CPU backend first converts the whole of
    ``w`` to float32 (a Llama-3 head: 2 GiB more, in every step). float16 it
    converts either way (it has no float16 x float16 -> float32 product): a
    float16 checkpoint on a CPU is best loaded with ``dtype="bfloat16"``."""
    spec = (((x.ndim - 1,), (1 if transposed else 0,)), ((), ()))
    dtype = jnp.result_type(x, w)
    wide = jnp.float32 if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2 else None
    if wide is not None and math.prod(x.shape[:-1]) == 1:  # one row (batch-1 decode): XLA's CPU backend converts
        x2 = jnp.broadcast_to(x.reshape(1, -1), (2, x.shape[-1]))  # w for that product too; two rows it does not
        return jax.lax.dot_general(x2, w, (((1,), spec[0][1]), ((), ())), preferred_element_type=wide)[:1] \
            .reshape(*x.shape[:-1], -1).astype(dtype)
    return jax.lax.dot_general(x, w, spec, preferred_element_type=wide).astype(dtype)


class Dense(nn.Dense):
    """``nn.Dense`` (same parameters, same result) whose product is an
    ``accumulating_dot``: no float32 copy of a 16-bit kernel."""

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = accumulating_dot(inputs, kernel)
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class Embed(nn.Embed):
    """``nn.Embed`` (same parameter, same result) that reads its rows as raw
    16-bit integers: XLA's CPU backend gathers bf16/f16 rows in float32,
    converting the whole table first (1 GB for Llama-3.2-1B's, in every step).
    ``scale``: rows times ``sqrt(features)``, rounded to the table's dtype (Gemma)."""
    scale: bool = False

    def __call__(self, inputs):
        (table,) = nn.dtypes.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        if jnp.dtype(table.dtype).itemsize != 2:
            rows = jnp.take(table, inputs, axis=0)
        else:
            rows = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), inputs, axis=0)
            rows = jax.lax.bitcast_convert_type(rows, table.dtype)
        return rows * jnp.asarray(math.sqrt(self.features), rows.dtype) if self.scale else rows


def softcap(logits, cap: float | None):
    """``tanh(logits / cap) * cap`` (Gemma's soft capping), or ``logits`` without a cap."""
    return logits if not cap else jnp.tanh(logits / cap) * cap


def float_dense(features, *, use_bias=True, dtype=None, name=None, parallel=None):
    """The default ``dense`` factory: ``Dense``, an ``nn.Dense`` (``parallel`` is
    only used by the partition rules, which read it from ``PARALLEL``)."""
    return Dense(features, use_bias=use_bias, dtype=dtype, name=name)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None  # llama3 scaling as sorted (key, value) pairs, hashable
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases
    sliding_window: int | None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    hidden_act: str = "silu"
    qk_norm: bool = False  # RMSNorm of each head's q and k (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma's 1
    sandwich_norms: bool = False  # Gemma's norms after attention and around the feed-forward
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power (default head_dim)
    layer_types: tuple | None = None  # SLIDING or FULL per layer; None: all sliding if sliding_window
    rope_local_theta: float | None = None  # the sliding layers' rope base, where it is their own (Gemma)
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a parsed HF ``config.json`` (transformers 4 or 5 spelling)."""
        model_type = cfg.get("model_type")
        if model_type == "gemma3":
            raise ValueError("model_type 'gemma3' is Gemma 3's image-text model; supported is its text model, "
                             "model_type 'gemma3_text' (Gemma 3 270M and 1B; a Gemma3ForCausalLM checkpoint)")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is 'llama')")
        gemma = model_type == "gemma3_text"
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
        rope_all = dict(cfg.get("rope_parameters") or {})
        full = dict(rope_all.get(FULL, rope_all) if gemma else rope_all)
        full.update(cfg.get("rope_scaling") or {})
        theta = full.get("rope_theta", cfg.get("rope_theta", 1e6 if gemma else 10000.0))
        local_theta = None
        if gemma:
            local_theta = float(dict(rope_all.get(SLIDING) or {}).get(
                "rope_theta", cfg.get("rope_local_theta", cfg.get("rope_local_base_freq", 10000.0))))
        heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window", 4096 if gemma else None)
        layer_types = None
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        if gemma or (window is not None and cfg.get("layer_types")):
            n = cfg["num_hidden_layers"]
            pattern = cfg.get("sliding_window_pattern", 6)
            layer_types = tuple(cfg.get("layer_types") or [
                SLIDING if (i + 1) % pattern else FULL for i in range(n)])
            if len(layer_types) != n or set(layer_types) - {SLIDING, FULL}:
                raise ValueError(f"layer_types must name {SLIDING!r} or {FULL!r} for each of the {n} layers; "
                                 f"got {list(layer_types)}")
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(full),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=window,
            num_local_experts=cfg.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if model_type == "mixtral" else 0,
            hidden_act=act,
            qk_norm=model_type == "qwen3" or gemma,
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            embed_scale=gemma,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)) if gemma else None,
            layer_types=layer_types,
            rope_local_theta=local_theta,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if gemma else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if gemma else None,
        )

    def to_hf(self) -> dict:
        """An HF-style config dict that ``from_hf`` reads back to this config."""
        d = dataclasses.asdict(self)
        scaling = d.pop("rope_scaling")
        d["rope_scaling"] = None if scaling is None else dict(scaling)
        d["use_sliding_window"] = self.sliding_window is not None
        d["layer_types"] = None if self.layer_types is None else list(self.layer_types)
        return d


def _rope_scaling(rope: dict):
    """A config's rope scaling as sorted (key, value) pairs (hashable), or None."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    elif rope_type == "linear":
        keys = ("factor",)
    else:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3")
    return (("rope_type", rope_type),) + tuple((k, float(rope[k])) for k in keys)


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax param path -> (Hugging Face tensor name, whether to transpose): a
    Flax kernel is ``(K, N)``, a PyTorch weight ``(N, K)``."""
    parts = [re.sub(r"^(layers|experts)_(\d+)$", r"\1.\2", p) for p in path]
    leaf = parts[-1]
    transpose = leaf == "kernel"
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    name = ".".join(parts)
    return (name if name.startswith("lm_head") else "model." + name), transpose



def rope_frequencies(config: ModelConfig, sliding: bool = False) -> np.ndarray:
    """Inverse frequencies ``(head_dim // 2,)`` of a layer (``sliding``: a sliding
    layer's, with its own base where the config has one, unscaled), with llama3
    or linear scaling if configured."""
    dim = config.head_dim
    theta = config.rope_local_theta if sliding and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_scaling is None or (sliding and config.rope_local_theta):
        return inv_freq.astype(np.float32)
    p = dict(config.rope_scaling)
    if p["rope_type"] == "linear":
        return (inv_freq / p["factor"]).astype(np.float32)
    factor, low, high, old_ctx = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                                  p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """x: ``(B, T, H, D)``; positions: ``(B, T)``. HF's rotate-half convention."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last axis in float32, scaled by ``offset + weight``
    (Gemma stores ``weight - 1``: offset 1)."""
    eps: float
    dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return ((self.offset + weight.astype(jnp.float32)) * x32).astype(self.dtype)


def norm(config: ModelConfig, dtype, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, dtype, config.norm_offset, name=name)


class Attention(nn.Module):
    config: ModelConfig
    dense: Callable
    dtype: Any
    sliding: bool = False  # a sliding-window layer (its own rope base where the config has one)

    @nn.compact
    def __call__(self, x, positions, mask, cache=None):
        """x ``(B, T, H)``; mask ``(B, 1, T, S)`` bool; cache: optional
        ``(k, v, index)`` with k/v ``(B, S, Hkv, D)`` to write this step into."""
        c = self.config
        b, t, _ = x.shape
        dense = lambda n, name, bias: self.dense(n, use_bias=bias, dtype=self.dtype, name=name,
                                                 parallel=PARALLEL[name])
        q = dense(c.num_attention_heads * c.head_dim, "q_proj", c.attention_bias)(x)
        k = dense(c.num_key_value_heads * c.head_dim, "k_proj", c.attention_bias)(x)
        v = dense(c.num_key_value_heads * c.head_dim, "v_proj", c.attention_bias)(x)
        q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:  # over each head's features, before rope
            q, k = norm(c, self.dtype, "q_norm")(q), norm(c, self.dtype, "k_norm")(k)
        inv_freq = jnp.asarray(rope_frequencies(c, self.sliding))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_cache = None
        if cache is not None:
            ck, cv, index = cache
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            new_cache = (ck, cv)
            k, v = ck, cv
        groups = c.num_attention_heads // c.num_key_value_heads
        q = q.reshape(b, t, c.num_key_value_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = scores / math.sqrt(c.query_pre_attn_scalar or c.head_dim)
        if c.attn_logit_softcapping:
            scores = jnp.tanh(scores / c.attn_logit_softcapping) * c.attn_logit_softcapping
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32)).astype(self.dtype)
        out = out.reshape(b, t, c.num_attention_heads * c.head_dim)
        return dense(c.hidden_size, "o_proj", False)(out), new_cache


class MLP(nn.Module):
    hidden: int
    intermediate: int
    dense: Callable
    dtype: Any
    names: tuple = ("gate_proj", "up_proj", "down_proj")
    act: str = "silu"  # a key of ACTIVATIONS

    @nn.compact
    def __call__(self, x, routed=None):
        """``routed`` (Mixtral experts): a bool mask of x's tokens that the router
        sent here. It does not change the output; calibration statistics
        (``calibrate``) count only those tokens, as hooks on PyTorch's experts do."""
        gate, up, down = (self.dense(n, use_bias=False, dtype=self.dtype, name=name, parallel=PARALLEL[name])
                          for n, name in zip((self.intermediate, self.intermediate, self.hidden), self.names))
        return down(ACTIVATIONS[self.act](gate(x)) * up(x))


class SparseMoe(nn.Module):
    """Mixtral's block: softmax router in float32, top-k, renormalised weights.
    Every expert runs on every token (simple and jit-friendly; wasteful at scale)."""
    config: ModelConfig
    dense: Callable
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        logits = self.dense(c.num_local_experts, use_bias=False, dtype=self.dtype, name="gate",
                            parallel=PARALLEL["gate"])(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, idx = jax.lax.top_k(probs, c.num_experts_per_tok)
        top = top / top.sum(-1, keepdims=True)
        weights = jnp.sum(jax.nn.one_hot(idx, c.num_local_experts) * top[..., None], axis=-2)
        out = jnp.zeros(x.shape, jnp.float32)
        for e in range(c.num_local_experts):
            expert = MLP(c.hidden_size, c.intermediate_size, self.dense, self.dtype,
                         names=("w1", "w3", "w2"), act=c.hidden_act, name=f"experts_{e}")
            out = out + weights[..., e:e + 1] * expert(x, routed=jnp.any(idx == e, axis=-1)).astype(jnp.float32)
        return out.astype(self.dtype)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dense: Callable
    dtype: Any
    sliding: bool = False  # a sliding-window layer (``mask`` is then the sliding one)

    @nn.compact
    def __call__(self, x, positions, mask, cache=None):
        c = self.config
        h, new_cache = Attention(c, self.dense, self.dtype, self.sliding, name="self_attn")(
            norm(c, self.dtype, "input_layernorm")(x), positions, mask, cache)
        if c.sandwich_norms:  # Gemma: a norm after attention, and one each side of the feed-forward
            x = x + norm(c, self.dtype, "post_attention_layernorm")(h)
            y = norm(c, self.dtype, "pre_feedforward_layernorm")(x)
        else:
            x = x + h
            y = norm(c, self.dtype, "post_attention_layernorm")(x)
        if c.num_local_experts:
            y = SparseMoe(c, self.dense, self.dtype, name="block_sparse_moe")(y)
        else:
            y = MLP(c.hidden_size, c.intermediate_size, self.dense, self.dtype, act=c.hidden_act, name="mlp")(y)
        if c.sandwich_norms:
            y = norm(c, self.dtype, "post_feedforward_layernorm")(y)
        return x + y, new_cache


def attention_mask_of(config: ModelConfig, q_pos, key_pos, key_valid=None, sliding: bool = False):
    """``(B, 1, T, S)`` bool: query positions ``q_pos (T,)`` may attend to keys at
    ``key_pos (B, S)`` (causal; for a ``sliding`` layer within the window) that are valid."""
    mask = q_pos[:, None] >= key_pos[:, None, :]  # causal, (B, T, S)
    if sliding:
        mask &= q_pos[:, None] - key_pos[:, None, :] < config.sliding_window
    if key_valid is not None:
        mask &= key_valid.astype(bool)[:, None, :]
    return mask[:, None]


class Transformer(nn.Module):
    """``apply({"params": p}, input_ids (B, T))`` -> logits ``(B, T, vocab)`` float32.

    ``attention_mask`` ``(B, T)`` (1 = real token, 0 = padding) and
    ``positions`` ``(B, T)`` are optional. With ``cache`` (see
    ``init_cache``) it also returns the updated cache: the KV-cache path of
    generation.
    """
    config: ModelConfig
    dtype: Any = jnp.float32
    dense: Callable = float_dense

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        c = self.config
        b, t = input_ids.shape
        embed = Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, scale=c.embed_scale, name="embed_tokens")
        x = embed(input_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if cache is None:
            key_pos, key_valid, q_offset = jnp.broadcast_to(jnp.arange(t), (b, t)), attention_mask, 0
        else:  # keys are the whole cache; the new tokens sit at cache["index"]
            s = cache["valid"].shape[1]
            valid = jax.lax.dynamic_update_slice(
                cache["valid"], (jnp.ones((b, t), bool) if attention_mask is None
                                 else attention_mask.astype(bool)), (0, cache["index"]))
            key_pos, key_valid, q_offset = jnp.broadcast_to(jnp.arange(s), (b, s)), valid, cache["index"]
        masks = {sliding: attention_mask_of(c, q_offset + jnp.arange(t), key_pos, key_valid, sliding)
                 for sliding in {c.is_sliding(i) for i in range(c.num_hidden_layers)}}

        new_layers = []
        for i in range(c.num_hidden_layers):
            layer_cache = None
            if cache is not None:
                layer_cache = (cache["k"][i], cache["v"][i], cache["index"])
            sliding = c.is_sliding(i)
            x, kv = DecoderLayer(c, self.dense, self.dtype, sliding, name=f"layers_{i}")(
                x, positions, masks[sliding], layer_cache)
            new_layers.append(kv)
        x = norm(c, self.dtype, "norm")(x)
        if c.tie_word_embeddings:
            query, table = nn.dtypes.promote_dtype(x, embed.embedding, dtype=self.dtype)  # as embed.attend
            logits = accumulating_dot(query, table, transposed=True)
        else:
            logits = self.dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head",
                                parallel=PARALLEL["lm_head"])(x)
        logits = softcap(logits.astype(jnp.float32), c.final_logit_softcapping)
        if cache is None:
            return logits
        new_cache = {"k": jnp.stack([kv[0] for kv in new_layers]),
                     "v": jnp.stack([kv[1] for kv in new_layers]),
                     "valid": valid, "index": cache["index"] + t}
        return logits, new_cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32):
    """An empty KV cache for ``Transformer(..., cache=...)``."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def param_shapes(model: Transformer) -> dict:
    """The params pytree of ``model`` as ``jax.ShapeDtypeStruct`` leaves (no memory)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]


class Head(nn.Module):
    """The last stage of an untied ``Transformer``: final norm, then ``lm_head``."""
    config: ModelConfig
    dense: Callable = float_dense
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = norm(c, self.dtype, "norm")(x)
        return self.dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head",
                          parallel=PARALLEL["lm_head"])(x)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One piece of a model's forward pass, owning ``keys`` of its top-level
    params: ``run_stage`` maps the hidden states ``x`` of calibration ids to the
    next ones, one piece in memory at a time (docs/design.md §11).

    ``kind`` is ``"embed"`` (ids -> x), ``"block"`` (a decoder layer, its
    params under ``keys[0]``), ``"head"`` (``Head``), ``"model"`` (any Linen
    model whole: ids -> output) or ``"none"`` (params no computation needs,
    such as a tied model's final norm). ``module`` is hashable, so stages of one
    shape share their compiled programs.
    """
    keys: tuple[str, ...]
    kind: str
    module: Any = None

    @property
    def prefix(self) -> str:
        """What a Dense path inside ``module`` is prefixed with in the model's params."""
        return self.keys[0] if self.kind == "block" else ""


def stages(model) -> list[Stage]:
    """``model``'s forward pass as ``Stage``s, in order: one for a ``Transformer``'s
    embedding, each decoder layer, and the head; a single ``"model"`` stage for
    any other Linen model (its top-level keys are found when it runs)."""
    if not isinstance(model, Transformer):
        return [Stage((), "model", model)]
    c = model.config
    blocks = {sliding: DecoderLayer(c, model.dense, model.dtype, sliding) for sliding in (False, True)}
    final = (Stage(("norm",), "none") if c.tie_word_embeddings
             else Stage(("norm", "lm_head"), "head", Head(c, model.dense, model.dtype)))
    embed = Embed(c.vocab_size, c.hidden_size, dtype=model.dtype, scale=c.embed_scale)
    return ([Stage(("embed_tokens",), "embed", embed)]
            + [Stage((f"layers_{i}",), "block", blocks[c.is_sliding(i)]) for i in range(c.num_hidden_layers)]
            + [final])


def stage_params(stage: Stage, params: dict):
    """The part of ``params`` (a dict holding the stage's keys) that the
    stage's module applies to: the same pytree structure for every block."""
    if stage.kind in ("embed", "block"):
        return params[stage.keys[0]]
    return params if stage.kind == "model" else {k: params[k] for k in stage.keys}


def apply_stage(kind: str, module, p, x, ids):
    """The output of a stage's ``module`` with params ``p`` (``stage_params``)
    for hidden states ``x`` (``None`` before the first stage) of the ``(B, T)``
    token ids ``ids``. Pure: jit it with ``kind`` and ``module`` static."""
    if kind == "embed":
        return module.apply({"params": p}, ids)
    if kind == "block":
        b, t = ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = attention_mask_of(module.config, jnp.arange(t), positions, sliding=module.sliding)
        return module.apply({"params": p}, x, positions, mask)[0]
    if kind == "head":
        return module.apply({"params": p}, x)
    if kind == "model":
        return module.apply({"params": p}, ids)
    raise ValueError(f"a stage of kind {kind!r} computes nothing")
