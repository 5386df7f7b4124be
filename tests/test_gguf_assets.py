"""GGUF converter errors and asset fetching."""

import numpy as np
import pytest

from any4_jax import assets
from converters import gguf2hf


def write_gguf(path, arch="llama", tensor_type="F32"):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    qtype = getattr(gguf.GGMLQuantizationType, tensor_type)
    if tensor_type == "F32":
        w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), np.float32))
    else:  # raw blocks of an unsupported type: 32x256 elements
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 256 // block * size), np.uint8),
                     raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert script permutes q/k rows with this formula; ours must undo it."""
    n_head, d_out, k = 4, 16, 3
    w = np.arange(d_out * k, dtype=np.float32).reshape(d_out, k)
    permuted = w.reshape(n_head, 2, d_out // n_head // 2, k).swapaxes(1, 2).reshape(d_out, k)
    np.testing.assert_array_equal(gguf2hf.unpermute_rope(permuted, n_head), w)


def test_unsupported_tensor_type_is_named(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", tensor_type="Q6_K")
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight \(Q6_K\).*supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        gguf2hf.convert(f, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert gguf2hf.main(["--gguf", str(f), "--out", str(tmp_path / "out")]) == 2


def test_unsupported_architecture(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'; supported: llama"):
        gguf2hf.convert(f, tmp_path / "out", progress=False)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="cannot read"):
        gguf2hf.convert(f, tmp_path / "out", progress=False)


def test_text_is_real_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ANY4_JAX_CACHE", str(tmp_path))
    lee = assets.text("lee")
    assert len(lee) > 300_000 and "Australia" in lee
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("a cached text was fetched again"))
    assert assets.text("lee") == lee


def test_unknown_text():
    with pytest.raises(ValueError, match="available: botchan, lee"):
        assets.text("moby")


def test_registry_unreachable_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ANY4_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(assets.AssetError, match="could not download gensim==4.4.0"):
        assets.text("lee")
    assert not (tmp_path / "cache" / "texts" / "lee.txt").exists()


def _f16_bytes(x):
    return np.asarray(x, np.float16).view(np.uint8).reshape(*np.shape(x), 2)


def _pack_q8_0(q, d):
    """GGML Q8_0 by hand: per block of 32, a float16 scale d then 32 int8 q; value = d * q."""
    rows, blocks = d.shape
    return np.concatenate([_f16_bytes(d),
                           q.astype(np.int8).view(np.uint8).reshape(rows, blocks, 32)], -1).reshape(rows, -1)


def _pack_q4_0(q, d):
    """GGML Q4_0 by hand: per block of 32, a float16 scale d then 16 bytes; byte j holds
    element j (low nibble) and element j + 16 (high nibble); value = d * (q - 8)."""
    rows, blocks = d.shape
    q = q.reshape(rows, blocks, 32).astype(np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    return np.concatenate([_f16_bytes(d), nibbles], -1).reshape(rows, -1)


def test_each_tensor_type_dequantizes_like_its_documented_layout(tmp_path):
    """F16, BF16, Q8_0 and Q4_0 tensors (Q4_1 is the real model's), packed here by hand
    from GGML's block layouts, come out of the converter as the values they encode."""
    import gguf
    from safetensors.numpy import load_file
    rng = np.random.default_rng(0)
    rows, k = 8, 64
    d = rng.uniform(0.01, 0.1, (rows, k // 32)).astype(np.float16)
    q8 = rng.integers(-128, 128, (rows, k))
    q4 = rng.integers(0, 16, (rows, k))
    f = rng.standard_normal((rows, k)).astype(np.float32)
    bf16_bits = (f.view(np.uint32) >> 16).astype(np.uint16)
    expected = {
        "ffn_up": ("F16", f.astype(np.float16), f.astype(np.float16).astype(np.float32)),
        "ffn_gate": ("BF16", bf16_bits.view(np.uint8).reshape(rows, -1),
                     (bf16_bits.astype(np.uint32) << 16).view(np.float32)),
        "ffn_down": ("Q8_0", _pack_q8_0(q8, d), np.repeat(d.astype(np.float32), 32, 1) * q8),
        "attn_v": ("Q4_0", _pack_q4_0(q4, d), np.repeat(d.astype(np.float32), 32, 1) * (q4 - 8)),
    }
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, value in [("block_count", 1), ("context_length", 64), ("embedding_length", k),
                       ("feed_forward_length", 64), ("head_count", 4), ("head_count_kv", 2)]:
        getattr(w, f"add_{key}")(value)
    w.add_layer_norm_rms_eps(1e-5)
    for name, (kind, data, _) in expected.items():
        if kind == "F16":
            w.add_tensor(f"blk.0.{name}.weight", data)
        else:
            w.add_tensor(f"blk.0.{name}.weight", data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gguf2hf.convert(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, (kind, _, values) in expected.items():
        hf_name = gguf2hf.hf_tensor_name(f"blk.0.{name}.weight")
        np.testing.assert_array_equal(tensors[hf_name], values.astype(np.float32), err_msg=kind)
