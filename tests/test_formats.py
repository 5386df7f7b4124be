"""Formats against plain-numpy implementations of the docs/design.md §2 formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import FORMATS, GROUP_SIZES, dequantize, quantize_tensor
from any4_jax.formats import FP4_TABLE, NF4_TABLE
from any4_jax.kmeans import weighted_kmeans_1d
from conftest import codes_by_hand, dequantize_by_hand, group_scaled, realistic_weight

SHAPES = [(8, 256, 64), (5, 200, 64), (3, 96, None)]  # (N, K, G); 200 % 64 != 0


def numpy_groups(w, g):
    """List of (column slice) per group; the last one may be shorter."""
    k = w.shape[1]
    g = k if g is None else g
    return [slice(i, min(i + g, k)) for i in range(0, k, g)]


def numpy_int(w, g, bits):
    levels = np.float32(2 ** bits - 1)
    codes = np.zeros(w.shape, np.int64)
    deq = np.zeros_like(w)
    for sl in numpy_groups(w, g):
        grp = w[:, sl]
        mn = grp.min(1, keepdims=True)
        s = np.maximum(grp.max(1, keepdims=True) - mn, np.float32(1e-6)) / levels
        q = np.clip(np.round((grp - mn) / s), 0, levels)
        codes[:, sl] = q
        deq[:, sl] = q * s + mn
    return codes, deq


def numpy_table(w, g, table):
    """Nearest table value of w / absmax; exact ties go to the larger magnitude."""
    values = np.zeros_like(w)
    deq = np.zeros_like(w)
    t = table.astype(np.float64)
    for sl in numpy_groups(w, g):
        grp = w[:, sl]
        a = np.abs(grp).max(1, keepdims=True)
        r = (grp / np.where(a > 0, a, np.float32(1))).astype(np.float64)
        d = np.abs(r[..., None] - t)
        best = d.min(-1, keepdims=True)
        tied = np.where(d == best, np.abs(t), -1.0)
        idx = tied.argmax(-1)
        values[:, sl] = table[idx]
        deq[:, sl] = table[idx] * a
    return values, deq


def codes_of(qw):
    return codes_by_hand(qw)


@pytest.mark.parametrize("n, k, g", SHAPES)
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_int_matches_numpy_exactly(rng, n, k, g, bits):
    w = rng.standard_t(4, size=(n, k)).astype(np.float32)
    qw = quantize_tensor(w, f"int{bits}", g, storage_dtype="float32")
    codes, deq = numpy_int(w, g, bits)
    np.testing.assert_array_equal(codes_of(qw), codes)
    np.testing.assert_array_equal(np.asarray(dequantize(qw)), deq)


def table_test_weights(rng, n, k, table):
    """Random weights plus values exactly at, and one float32 step either side
    of, every midpoint between neighbouring table values (the tie cases)."""
    w = rng.standard_t(4, size=(n, k)).astype(np.float32)
    t = np.unique(table.astype(np.float64))
    mids = (t[1:] + t[:-1]) / 2
    probes = np.concatenate([mids.astype(np.float32),
                             np.nextafter(mids.astype(np.float32), np.float32(2)),
                             np.nextafter(mids.astype(np.float32), np.float32(-2))])
    w[0, : probes.size] = probes  # absmax of each group of row 0 must be exactly 1:
    for sl in numpy_groups(w, 64):
        w[0, sl.start] = 1.0
    return w


@pytest.mark.parametrize("n, k, g", SHAPES)
@pytest.mark.parametrize("fmt, table", [("nf4", NF4_TABLE), ("fp4", FP4_TABLE)])
def test_table_formats_match_numpy_exactly(rng, n, k, g, fmt, table):
    w = table_test_weights(rng, n, k, table)
    qw = quantize_tensor(w, fmt, g, storage_dtype="float32")
    values, deq = numpy_table(w, g, table)
    np.testing.assert_array_equal(table[codes_of(qw)], values)
    np.testing.assert_array_equal(np.asarray(dequantize(qw)), deq)


def test_fp4_table_is_bitsandbytes():
    mags = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    np.testing.assert_array_equal(FP4_TABLE[:8], mags.astype(np.float32))
    np.testing.assert_array_equal(FP4_TABLE[8:], -mags.astype(np.float32))


def exact_rows(rng, fmt, n, k, g):
    """Rows whose every group holds only 2**bits representable values,
    with the group's extremes present, so each format can reproduce them."""
    bits = int(fmt[-1])
    w = np.zeros((n, k), np.float32)
    for sl in numpy_groups(w, g):
        step = np.float32(2.0 ** -rng.integers(2, 6))
        if fmt in ("nf4", "fp4"):
            table = NF4_TABLE if fmt == "nf4" else FP4_TABLE
            vals = table * step
            idx = rng.integers(0, 16, size=(n, sl.stop - sl.start))
            idx[:, 0] = int(np.argmax(table))  # absmax = step
        else:
            levels = 2 ** bits - 1
            vals = (np.arange(levels + 1, dtype=np.float32) - 2 ** (bits - 1)) * step
            idx = rng.integers(0, levels + 1, size=(n, sl.stop - sl.start))
            idx[:, 0], idx[:, 1] = 0, levels
        w[:, sl] = vals[idx]
    return w


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, g", [(256, 64), (200, 64), (128, None)])
def test_exact_round_trip(rng, fmt, k, g):
    w = exact_rows(rng, fmt, 6, k, g)
    qw = quantize_tensor(w, fmt, g, storage_dtype="float32")
    np.testing.assert_array_equal(np.asarray(dequantize(qw)), w)


def test_storage_layout(rng):
    w, _ = realistic_weight(rng, 16, 200)
    qw = quantize_tensor(w, "any3", 64)
    assert qw.codes.shape == (16, 96) and qw.codes.dtype == np.uint8  # 4 blocks of 64 codes, 24 bytes each
    assert qw.lut.shape == (16, 8) and qw.scales.shape == (16, 4) and qw.zeros.shape == (16, 4)
    assert qw.n_groups == 4 and qw.bits == 3 and qw.group_size == 64
    # codes 3 bits each + 8 LUT values a row + 2 values a group, 2 bytes each (bfloat16 default)
    expected = 16 * 96 + 16 * 8 * 2 + 2 * 16 * 4 * 2
    assert qw.nbytes == expected
    assert qw.bits_per_weight == pytest.approx(8 * expected / (16 * 200))
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 4
    assert jax.tree_util.tree_unflatten(treedef, leaves).shape == (16, 200)


def weighted_error(w, qw, act):
    return float((((np.asarray(dequantize(qw)) - w) ** 2) * act[None, :]).sum())


def test_any4_beats_fixed_tables_on_realistic_weights(rng):
    w, act = realistic_weight(rng, 128, 1024)
    err = {f: weighted_error(w, quantize_tensor(w, f, 128, sample_weight=act), act)
           for f in ("any4", "nf4", "int4", "fp4", "any3", "int3", "any2", "int2")}
    assert err["any4"] < err["nf4"] < err["int4"] < err["fp4"], err
    assert err["any3"] < err["int3"], err
    assert err["any2"] < err["int2"], err


def test_calibration_weighting_helps_where_it_is_measured(rng):
    w, act = realistic_weight(rng, 64, 512)
    plain = weighted_error(w, quantize_tensor(w, "any4", 128), act)
    calibrated = weighted_error(w, quantize_tensor(w, "any4", 128, sample_weight=act), act)
    assert calibrated < plain


def test_padding_takes_no_part_in_kmeans(rng):
    """K = 200, G = 64: the last group has 8 real elements. The any4 LUT must
    equal weighted k-means on the real elements alone (deterministic init)."""
    w, act = realistic_weight(rng, 4, 200)
    opts = dict(init="uniform", n_bins=None)
    qw = quantize_tensor(w, "any4", 64, sample_weight=act, storage_dtype="float32", **opts)
    u = np.zeros_like(w)
    omega = np.zeros_like(w)
    for sl in numpy_groups(w, 64):
        grp = w[:, sl]
        mn = grp.min(1, keepdims=True)
        s = np.maximum(grp.max(1, keepdims=True) - mn, np.float32(1e-6)) / np.float32(15)
        u[:, sl] = (grp - mn) / s
        omega[:, sl] = act[sl] * s
    c, _ = weighted_kmeans_1d(u, omega, 16, **opts)
    np.testing.assert_allclose(np.asarray(qw.lut) + 8, np.asarray(c), rtol=1e-5, atol=1e-5)


def test_each_lut_entry_is_the_weighted_mean_of_its_elements(rng):
    """At k-means' fixed point each LUT entry is the mean of the group-scaled
    elements coded to it, weighted by activation x group scale (default) or by
    the activation alone (``scale_sample_weight=False``); the other weighting's
    means differ, so this tells the two apart."""
    w, act = realistic_weight(rng, 6, 256)
    u, scale = group_scaled(w, 64)
    weights = {True: act[None, :] * scale, False: np.broadcast_to(act, w.shape)}
    for scaled in (True, False):
        qw = quantize_tensor(w, "any4", 64, sample_weight=act, storage_dtype="float32", scale_sample_weight=scaled,
                             init="uniform", n_bins=None, tol=0.0)  # Lloyd run to its fixed point
        codes = codes_by_hand(qw)
        lut = np.asarray(qw.lut) + 8
        for which, omega in weights.items():
            means = np.array([[(omega[r] * u[r])[codes[r] == j].sum() / omega[r][codes[r] == j].sum()
                               if (codes[r] == j).any() else lut[r, j] for j in range(16)] for r in range(6)])
            close = np.allclose(means, lut, rtol=1e-4, atol=1e-4)
            assert close == (which == scaled), (scaled, which, np.abs(means - lut).max())


def test_deterministic_for_a_key(rng):
    w, act = realistic_weight(rng, 32, 256)
    key = jax.random.PRNGKey(11)
    a = quantize_tensor(w, "any4", 64, sample_weight=act, key=key)
    b = quantize_tensor(w, "any4", 64, sample_weight=act, key=key)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("fmt", ["any4", "int4", "nf4"])
def test_bfloat16_storage_is_the_default_and_rounds_only_the_metadata(rng, fmt):
    """The default stores LUT, scales and zeros as bf16: the same codes as a
    float32 quantization, and its metadata rounded to nearest bf16 (ml_dtypes)."""
    import ml_dtypes

    w, act = realistic_weight(rng, 8, 256)
    qw = quantize_tensor(w, fmt, 128, sample_weight=act)
    f32 = quantize_tensor(w, fmt, 128, sample_weight=act, storage_dtype="float32")
    assert qw.lut.dtype == qw.scales.dtype == qw.zeros.dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(qw.codes), np.asarray(f32.codes))
    for name in ("lut", "scales", "zeros"):
        expected = np.asarray(getattr(f32, name)).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(getattr(qw, name)), expected, err_msg=name)
    # 16-bit metadata: <= 4.5 bits a weight at G = 128 once K is large.
    big = quantize_tensor(np.asarray(rng.standard_normal((16, 4096)), np.float32), fmt, 128)
    assert big.bits_per_weight == pytest.approx(4 + (16 * 16 + 2 * 32 * 16) / 4096)
    assert big.bits_per_weight <= 4.5


@pytest.mark.parametrize("fmt, bits, most", [("any3", 3, 3.35), ("int3", 3, 3.35), ("any2", 2, 2.35),
                                              ("int2", 2, 2.35)])
def test_three_and_two_bit_codes_take_three_and_two_bits(rng, fmt, bits, most):
    """At K = 4096, G = 128, bf16 metadata: ``bits`` a code, 2**bits LUT entries a
    row and a scale and zero a group, and the codes round-trip by the documented layout."""
    w = np.asarray(rng.standard_normal((8, 4096)), np.float32)
    qw = quantize_tensor(w, fmt, 128, n_init=1) if fmt.startswith("any") else quantize_tensor(w, fmt, 128)
    assert qw.codes.shape == (8, 4096 // 64 * 8 * bits)
    assert qw.bits_per_weight == pytest.approx(bits + (2 ** bits * 16 + 2 * 32 * 16) / 4096)
    assert qw.bits_per_weight <= most
    np.testing.assert_array_equal(np.asarray(dequantize(qw), np.float64), dequantize_by_hand(qw))


def test_storage_dtype_rejected_by_name():
    with pytest.raises(ValueError, match="storage_dtype 'int8'; accepted: bfloat16, float16, float32"):
        quantize_tensor(np.ones((2, 64), np.float32), "int4", 32, storage_dtype="int8")


def test_nan_inf_rejected_with_count_and_position():
    w = np.ones((4, 64), np.float32)
    w[2, 5] = np.nan
    w[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite.*\(2, 5\)"):
        quantize_tensor(w, "any4", 32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="int5"), "accepted: int4, int3, int2, nf4, fp4, any4, any3, any2"),
    (dict(group_size=100), "accepted: 32, 64, 128, 256, 512, 1024, None"),
    (dict(w=np.ones(64, np.float32)), "2-D"),
    (dict(w=np.ones((2, 64), np.int32)), "float"),
    (dict(sample_weight=np.ones(63, np.float32)), r"shape \(K,\) = \(64,\)"),
    (dict(sample_weight=-np.ones(64, np.float32)), "non-negative"),
    (dict(sample_weight=np.r_[np.ones(63), np.nan].astype(np.float32)), r"sample_weight has 1 non-finite.*\(63,\)"),
])
def test_bad_input(kwargs, match):
    args = dict(w=np.ones((2, 64), np.float32), fmt="any4", group_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        quantize_tensor(args.pop("w"), args.pop("fmt"), args.pop("group_size"), **args)


@pytest.mark.parametrize("g", GROUP_SIZES)
def test_every_listed_group_size_quantizes(rng, g):
    w, _ = realistic_weight(rng, 4, 1100)
    qw = quantize_tensor(w, "int4", g)
    assert qw.group_size == (1100 if g is None else g) and qw.scales.shape == (4, -(-1100 // qw.group_size))
    np.testing.assert_allclose(np.asarray(dequantize(qw)), w, atol=float(np.abs(w).max()) / 7)


def test_packed_bytes_match_a_hand_packed_block():
    """The byte layout written out by hand: byte j of a 64-code block holds code
    32h + 4w + 2p in its low nibble and the next code in its high nibble, with
    w = j // 4, h = (j // 2) % 2, p = j % 2; K past the last block is zero-padded."""
    from pallas_kernels.layout import pack_codes
    codes = (np.arange(2 * 70) * 7 % 16).reshape(2, 70).astype(np.uint8)  # two rows, 70 codes
    expected = np.zeros((2, 64), np.uint8)
    for row in range(2):
        padded = np.concatenate([codes[row], np.zeros(58, np.uint8)])
        for block in range(2):
            for j in range(32):
                e = 64 * block + 32 * ((j // 2) % 2) + 4 * (j // 4) + 2 * (j % 2)
                expected[row, 32 * block + j] = padded[e] | (padded[e + 1] << 4)
    np.testing.assert_array_equal(np.asarray(pack_codes(codes)), expected)


@pytest.mark.parametrize("bits", [3, 2])
def test_three_and_two_bit_bytes_match_hand_packed_blocks(bits):
    """The 2- and 3-bit layout written out by hand (24 or 16 bytes a block): the two
    codes of the 4-bit layout's byte j keep their low two bits in byte j % 16, at
    bits 2(j // 16) and 4 + 2(j // 16); 3 bits: their third bit in byte 16 + j % 8,
    at bits j // 8 and 4 + j // 8. K past the last block is zero-padded."""
    from pallas_kernels.layout import expand_codes, pack_codes, unpack_codes
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, (3, 100)).astype(np.uint8)  # 100 codes: a padded second block
    per_block = 8 * bits
    expected = np.zeros((3, 2 * per_block), np.uint8)
    for row in range(3):
        padded = np.concatenate([codes[row], np.zeros(28, np.uint8)]).astype(np.int64)
        for block in range(2):
            out = expected[row, per_block * block:per_block * (block + 1)]
            for j in range(32):
                e = 64 * block + 32 * ((j // 2) % 2) + 4 * (j // 4) + 2 * (j % 2)
                lo, hi, shift = padded[e], padded[e + 1], 2 * (j // 16)
                out[j % 16] |= ((lo & 3) << shift) | ((hi & 3) << (4 + shift))
                if bits == 3:
                    out[16 + j % 8] |= (((lo >> 2) & 1) << (j // 8)) | (((hi >> 2) & 1) << (4 + j // 8))
    np.testing.assert_array_equal(np.asarray(pack_codes(codes, bits)), expected)
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(expected), 100, bits)), codes)
    np.testing.assert_array_equal(np.asarray(expand_codes(jnp.asarray(expected), bits)),
                                  np.asarray(pack_codes(codes)))  # the 4-bit block the kernels read
