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
    f = write_gguf(tmp_path / "m.gguf", tensor_type="Q8_1")  # llama.cpp's intermediate type: never a weight
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight \(Q8_1\).*supported: F32, F16, BF16, Q4_0"):
        gguf2hf.convert(f, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert gguf2hf.main(["--gguf", str(f), "--out", str(tmp_path / "out")]) == 2


def test_unsupported_architecture(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3, gemma3"):
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


MAKE_ONCE = """
import sys, time
from pathlib import Path
from any4_jax import assets
out = Path(sys.argv[1])
def make():
    with open(out.parent / "makers.log", "a") as log:
        log.write("made\\n")
    time.sleep(2)  # the other process arrives meanwhile
    (out / "part").mkdir(parents=True)
    (out / "last").write_text("done")
assets._made_once(out, make, last="last")
print((out / "last").read_text())
"""


def test_two_processes_make_an_asset_once(tmp_path):
    """Two processes asking for the same missing asset at once (two test workers, two
    commands): one makes it, the other waits and finds it done."""
    import subprocess
    import sys
    procs = [subprocess.Popen([sys.executable, "-c", MAKE_ONCE, str(tmp_path / "asset")], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    assert [p.communicate(timeout=300)[0].strip() for p in procs] == ["done", "done"]
    assert (tmp_path / "makers.log").read_text() == "made\n"


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


def _pack_q5(q, d, m=None):
    """GGML Q5_0 (Q5_1 with ``m``) by hand: per block of 32, f16 d (and f16 m), a
    little-endian uint32 qh whose bit j is bit 4 of element j, then 16 bytes: byte j
    holds the low 4 bits of element j (low nibble) and of element j + 16 (high);
    value = d * (q - 16) (Q5_1: d * q + m)."""
    rows, blocks = d.shape
    q = q.reshape(rows, blocks, 32).astype(np.uint32)
    qs = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)
    qh = ((q >> 4) & 1) << np.arange(32, dtype=np.uint32)
    qh = qh.sum(-1, dtype=np.uint32).view(np.uint8).reshape(rows, blocks, 4)
    head = [_f16_bytes(d)] + ([] if m is None else [_f16_bytes(m)])
    return np.concatenate(head + [qh, qs.astype(np.uint8)], -1).reshape(rows, -1)


def _pack_q4_k(q, d, dmin, sc, mn):
    """GGML Q4_K by hand: per super-block of 256, f16 d and dmin, 12 bytes of eight
    6-bit scales and mins (bytes 0-3: scales 0-3, their top bits the high bits of
    scales 4-7; 4-7: mins 0-3 likewise; 8-11: low 4 bits of scales / mins 4-7), then
    128 bytes: for each 64 elements, byte l holds element l (low nibble) and l + 32;
    value = d * scale * q - dmin * min, scale and min those of its 32."""
    rows, blocks = d.shape
    q, sc, mn = q.reshape(rows, blocks, 4, 2, 32).astype(np.uint8), sc.astype(np.uint8), mn.astype(np.uint8)
    packed = np.zeros((rows, blocks, 12), np.uint8)
    packed[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, blocks, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], -1).reshape(rows, -1)


def _pack_q6_k(q, d, sc):
    """GGML Q6_K by hand: per super-block of 256, 128 bytes of low 4 bits, 64 bytes of
    high 2 bits, 16 int8 scales (one per 16 elements), f16 d. In each half of 128:
    ql[l] = element l | element l + 64 (high nibble), ql[l + 32] = l + 32 | l + 96,
    qh[l] = bits 4-5 of l, l + 32, l + 64, l + 96 at 0, 2, 4, 6; value = d * scale * (q - 32)."""
    rows, blocks = d.shape
    q = q.reshape(rows, blocks, 2, 4, 32).astype(np.uint8)  # half, quarter, l
    ql = np.concatenate([q[..., 0, :] & 15 | (q[..., 2, :] & 15) << 4, q[..., 1, :] & 15 | (q[..., 3, :] & 15) << 4], -1)
    qh = (q[..., 0, :] >> 4) | (q[..., 1, :] >> 4) << 2 | (q[..., 2, :] >> 4) << 4 | (q[..., 3, :] >> 4) << 6
    parts = [ql.reshape(rows, blocks, 128), qh.reshape(rows, blocks, 64), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)]
    return np.concatenate(parts, -1).reshape(rows, -1)


def test_each_tensor_type_dequantizes_like_its_documented_layout(tmp_path):
    """F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K and Q6_K tensors (Q4_1 is SmolLM2's;
    Q4_K, Q5_0, Q6_K and Q8_0 Gemma 3's), packed here by hand from GGML's block
    layouts, come out of the converter as the values they encode."""
    import gguf
    from safetensors.numpy import load_file
    rng = np.random.default_rng(0)
    rows, k = 8, 256
    d = rng.uniform(0.01, 0.1, (rows, k // 32)).astype(np.float16)
    m = rng.uniform(-0.1, 0.1, (rows, k // 32)).astype(np.float16)
    dk, dmin = (rng.uniform(0.001, 0.01, (rows, 1)).astype(np.float16) for _ in range(2))
    sc, mn = rng.integers(0, 64, (rows, 1, 8)), rng.integers(0, 64, (rows, 1, 8))
    sc6 = rng.integers(-128, 128, (rows, 1, 16))
    q8, q4, q5, q6 = (rng.integers(lo, hi, (rows, k)) for lo, hi in ((-128, 128), (0, 16), (0, 32), (0, 64)))
    f = rng.standard_normal((rows, k)).astype(np.float32)
    bf16_bits = (f.view(np.uint32) >> 16).astype(np.uint16)
    per32 = lambda a: np.repeat(a.astype(np.float32), 32, 1)
    dk32 = dk.astype(np.float32)
    expected = {
        "ffn_up": ("F16", f.astype(np.float16), f.astype(np.float16).astype(np.float32)),
        "ffn_gate": ("BF16", bf16_bits.view(np.uint8).reshape(rows, -1),
                     (bf16_bits.astype(np.uint32) << 16).view(np.float32)),
        "ffn_down": ("Q8_0", _pack_q8_0(q8, d), per32(d) * q8),
        "attn_v": ("Q4_0", _pack_q4_0(q4, d), per32(d) * (q4 - 8)),
        "attn_output": ("Q5_0", _pack_q5(q5, d), per32(d) * (q5 - 16)),
        "attn_k": ("Q5_1", _pack_q5(q5, d, m), per32(d) * q5 + per32(m)),
        "attn_q": ("Q4_K", _pack_q4_k(q4, dk, dmin, sc, mn),
                   dk32 * np.repeat(sc[:, 0], 32, 1) * q4 - dmin.astype(np.float32) * np.repeat(mn[:, 0], 32, 1)),
        "ffn_norm": ("Q6_K", _pack_q6_k(q6, dk, sc6), dk32 * np.repeat(sc6[:, 0], 16, 1) * (q6 - 32)),
    }
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen3")  # no rope permutation: values as packed
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
        np.testing.assert_allclose(tensors[hf_name], values.astype(np.float32), rtol=1e-6, atol=0, err_msg=kind)


@pytest.mark.parametrize("kind", gguf2hf.DEQUANTIZED)
def test_every_dequantized_type_reaches_the_model_folder(tmp_path, kind):
    """Each type the gguf package dequantizes, as random blocks: the converter writes
    what gguf.quants.dequantize gives, in the tensor's own (rows, K) shape (the
    values of the types packed by hand are checked above)."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import load_file
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, k = 4, 256
    raw = np.random.default_rng(qtype.value).integers(0, 256, (rows, k // block * size), dtype=np.uint8)
    if kind == "F32":
        raw = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen3")
    for key, value in [("block_count", 1), ("context_length", 64), ("embedding_length", k),
                       ("feed_forward_length", 64), ("head_count", 4), ("head_count_kv", 2)]:
        getattr(w, f"add_{key}")(value)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=None if kind == "F32" else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gguf2hf.convert(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    want = np.asarray(dequantize(raw, qtype), np.float32).reshape(rows, k)
    assert got.shape == (rows, k)
    np.testing.assert_array_equal(got, want)
