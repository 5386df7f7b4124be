"""A quantized model as a Hugging Face-style folder other runtimes can read
(docs/checkpoint_format.md is the specification).

    DIR/
      model-00001-of-0000N.safetensors   sharded safetensors (<= SHARD_BYTES each)
      model.safetensors.index.json       {"metadata": {"total_size"}, "weight_map": {name: file}}
      config.json                        the model's config, with a quantization_config
      tokenizer files

Tensors have Hugging Face's names. A quantized linear layer ``P`` (e.g.
``model.layers.3.mlp.up_proj``) is four tensors: ``P.qweight`` (uint8 codes,
``(N, 8 * bits * ceil(K / 64))`` in ``pallas_kernels.layout``'s order), ``P.lut``
(``(N, 2**bits)``), ``P.scales`` and ``P.zeros`` (``(N, ceil(K / G))``), so
that ``W[n, k] = lut[n, code[n, k]] * scales[n, k // G] + zeros[n, k // G]``;
every other weight is as in the float checkpoint (``P.weight`` ``(N, K)``,
``P.bias``, norms, embeddings). ``config.json`` holds
``quantization_config = {"quant_method": "any4", "format_version", "bits",
"group_size", "format", "storage_dtype", "recipe", "modules_not_converted"}``.
Written a part at a time (``write``; ``checkpoint.export`` from a model
directory) and read a part at a time (``read``; ``checkpoint.load_model`` takes
such a folder like a model directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from any4_jax.files import CheckpointError, atomic_directory, compute_dtype, count_params
from any4_jax.formats import QuantizedWeight, get_format
from any4_jax.models import ModelConfig, Transformer, hf_name, param_shapes
from any4_jax.recipe import QuantDenseFactory, Recipe
from any4_jax.sharding import shardings
from any4_jax.tensorfiles import SafetensorsFile, SafetensorsWriter, shard_path
from pallas_kernels.layout import CODE_BLOCK, HALF, repack

SHARD_BYTES = 5 << 30
QUANT_METHOD = "any4"
FORMAT_VERSION = 2  # 1: 2- and 3-bit codes in 4-bit containers (still read: repacked)
_FIELDS = {"codes": "qweight", "lut": "lut", "scales": "scales", "zeros": "zeros"}


def exported_tensors(abstract) -> list:
    """``(top-level key, Flax path, Hugging Face name, field or None, dtype, shape)``
    of every tensor of a params tree of shapes, in file order (part by part)."""
    out = []
    for key in abstract:
        flat = jax.tree_util.tree_flatten_with_path({key: abstract[key]},
                                                    is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
        for path, leaf in flat:
            keys = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
            name, transpose = hf_name(keys)
            if isinstance(leaf, QuantizedWeight):
                base = name.removesuffix(".weight")
                out += [(key, keys, f"{base}.{suffix}", field, np.dtype(getattr(leaf, field).dtype),
                         tuple(getattr(leaf, field).shape)) for field, suffix in _FIELDS.items()]
            else:
                out.append((key, keys, name, None, np.dtype(leaf.dtype),
                            tuple(leaf.shape[::-1]) if transpose else tuple(leaf.shape)))
    return out


def is_exported(model_dir) -> bool:
    """Whether ``model_dir`` is a folder in this format (config.json says so)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file() or (Path(model_dir) / "manifest.json").exists():
        return False
    try:
        q = json.loads(config.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def read(model_dir, *, dtype=None, matmul: str = "auto", mesh=None):
    """``(model, params)`` of a folder in this format, each part read from the
    safetensors files and placed (in its shards, with a ``mesh``) as it is read."""
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    q = config["quantization_config"]
    if q.get("format_version") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{d}/config.json: quantization_config format_version {q.get('format_version')!r}; "
                              f"this any4-jax reads 1 to {FORMAT_VERSION}")
    containers = q["format_version"] == 1 and q.get("bits", 4) < 4
    try:
        recipe = Recipe.from_dict(q["recipe"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d}/config.json: quantization_config.recipe: {e}") from e
    model = Transformer(ModelConfig.from_hf(config), dtype=compute_dtype(dtype, config.get("torch_dtype", "float32")))
    model = model.clone(dense=recipe.dense(matmul, mesh))
    abstract = param_shapes(model)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())["weight_map"]
    try:
        files = {f: SafetensorsFile(shard_path(d, f, index_file)) for f in sorted(set(index.values()))}
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    places = None if mesh is None else shardings(abstract, mesh)
    entries = exported_tensors(abstract)
    params = {}
    for key in abstract:
        part = {}
        for _, keys, name, field, dtype_, shape in [e for e in entries if e[0] == key]:
            if name not in index or name not in files[index[name]].tensors:
                raise CheckpointError(f"{d}: tensor {name} is missing (a damaged or incomplete export)")
            array = files[index[name]].read(name)
            if containers and field == "codes":  # version 1: 2- or 3-bit codes in 4-bit blocks
                bits, blocks = q["bits"], shape[1] // (8 * q["bits"])
                if array.shape == (shape[0], HALF * blocks):
                    array = np.asarray(repack(array, CODE_BLOCK * blocks, bits))
            if array.dtype != dtype_ or array.shape != shape:
                raise CheckpointError(f"{d}: tensor {name} is {array.dtype} {array.shape}; the model needs "
                                      f"{dtype_} {shape}")
            if not field and keys[-1] == "kernel":
                array = array.T
            _put(part, keys[1:], field, array)
        part = _rebuild(part, abstract[key])
        params[key] = jax.device_put(part, None if places is None else places[key])
    return model, params


def _put(tree, keys, field, array):
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    if field:
        tree.setdefault(keys[-1], {})[field] = np.ascontiguousarray(array)
    else:
        tree[keys[-1]] = np.ascontiguousarray(array)


def _rebuild(part, abstract):
    """The dicts of quantized fields read as ``QuantizedWeight``s again (shapes and
    metadata from the model's own)."""
    if isinstance(abstract, QuantizedWeight):
        return QuantizedWeight(part["codes"], part["lut"], part["scales"], part["zeros"], abstract.shape,
                               abstract.bits, abstract.group_size, abstract.fmt)
    if isinstance(abstract, dict):
        return {k: _rebuild(part[k], v) for k, v in abstract.items()}
    return part


def write(out_dir, model, read_part, hf_config: dict, tokenizer=None, *, overwrite: bool = False, source=None) -> dict:
    """Write ``model`` (a quantized ``Transformer``) whose params ``read_part(key)``
    returns one top-level key at a time, into ``out_dir`` in this format
    (atomically). Returns the ``config.json`` written."""
    if not isinstance(model.dense, QuantDenseFactory):
        raise ValueError("only a quantized model is written in this format (a float one is a plain "
                         "Hugging Face checkpoint already)")
    recipe = model.dense.recipe
    abstract = param_shapes(model)
    entries = exported_tensors(abstract)
    shards, size = [[]], 0
    for e in entries:
        nbytes = int(np.prod(e[5])) * e[4].itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    config = {**hf_config, "torch_dtype": np.dtype(model.dtype).name, "quantization_config": {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": get_format(recipe.fmt).bits,
        "group_size": recipe.group_size, "format": recipe.fmt, "storage_dtype": recipe.storage_dtype,
        "modules_not_converted": list(recipe.skip), "recipe": recipe.to_dict()}}
    with atomic_directory(out_dir, overwrite=overwrite, inputs=() if source is None else (source,)) as tmp:
        part_key, part = None, None
        for file, shard in zip(files, shards):
            with SafetensorsWriter(tmp / file, {e[2]: (e[4], e[5]) for e in shard}, metadata={"format": "pt"}) as out:
                for key, keys, name, field, _, _ in shard:
                    if key != part_key:  # entries run part by part: each part is read once
                        part_key, part = key, read_part(key)
                    leaf = part
                    for k in keys[1:]:
                        leaf = leaf[k]
                    array = np.asarray(getattr(leaf, field)) if field else np.asarray(leaf)
                    out.write(name, array if field or keys[-1] != "kernel" else array.T)
        index = {"metadata": {"total_size": sum(int(np.prod(e[5])) * e[4].itemsize for e in entries),
                              "parameters": count_params(abstract)},
                 "weight_map": {e[2]: f for f, shard in zip(files, shards) for e in shard}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return config
