"""Tests of companion.accumulation: running sums kept in a narrow format.

Oracles: NumPy float32 sequential summation (np.cumsum with dtype float32 adds left to right), an
element-by-element torch loop that rounds the accumulator to float16 after every addition, hand-made
cases where rounding the float64 sum first would round twice, and the model's own limits (p = 23 is
FP32, promotion at K or beyond changes nothing).
"""
import numpy as np
import pytest
import torch

from companion import accumulation as acc
from companion.formats import UnknownFormatError, get_format

f32 = np.float32


def wide_float32(rng, shape, spread=20):
    """float32 values whose exponents vary over 2·spread binades, so that sums lose low bits."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread, shape))
    return x.astype(f32)


# --------------------------------------------------------------------------
# Oracles: NumPy float32 and torch float16
# --------------------------------------------------------------------------

def test_fp32_sequential_equals_numpy_float32_summation():
    rng = np.random.default_rng(0)
    x = wide_float32(rng, (64, 1000))
    want = np.cumsum(x, axis=-1, dtype=f32)  # sequential: out[i] = out[i - 1] + x[i] in float32
    got = acc.accumulate(x, "fp32", checkpoints=range(1, 1001))
    assert got.dtype == np.float64
    assert np.array_equal(got, want.astype(np.float64))
    assert np.array_equal(acc.accumulate(x, "fp32"), want[:, -1].astype(np.float64))


def test_fp32_dot_equals_numpy_float32_loop():
    rng = np.random.default_rng(1)
    # bf16 values: their products are exact in float32, so NumPy's float32 products are too.
    a = get_format("bf16").round(rng.standard_normal((32, 500)))
    b = get_format("bf16").round(rng.standard_normal((32, 500)))
    s = np.zeros(32, f32)
    for i in range(500):
        s = s + (a[:, i].astype(f32) * b[:, i].astype(f32))
    assert np.array_equal(acc.dot(a, b, "fp32"), s.astype(np.float64))


def test_fp16_accumulation_equals_torch_float16_loop():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(48, 700, generator=gen).half()
    b = torch.randn(48, 700, generator=gen).half()
    a[0], b[0] = 200 * a[0].abs(), b[0].abs()  # positive products summing past 65504: overflow to inf
    a[1] *= 1e-3  # tiny products: sums among FP16's subnormals
    products = a.float() * b.float()  # exact: 11-bit significands give at most 22-bit products
    s = torch.zeros(48, dtype=torch.float16)
    for i in range(700):
        s = (s.float() + products[:, i]).half()  # float32 add, then float16: a single rounding here
    got = acc.dot(a, b, "fp16")
    assert np.array_equal(got, s.double().numpy(), equal_nan=True)
    assert np.isinf(got[0]) and np.all(np.isfinite(got[1:]))


# --------------------------------------------------------------------------
# One rounding per addition
# --------------------------------------------------------------------------

def test_each_addition_rounds_the_exact_sum_once():
    # 1 + 2^-24 + 2^-76 lies just above the midpoint of 1 and 1 + 2^-23 in FP32. Its float64 sum is
    # the midpoint itself, which ties to even (1.0): rounding twice would give the wrong answer.
    t = 2.0 ** -24 + 2.0 ** -76
    assert acc.accumulate([1.0, t], "fp32") == 1 + 2.0 ** -23
    assert acc.accumulate([-1.0, -t], "fp32") == -(1 + 2.0 ** -23)
    # Toward zero: 1 - 2^-80 rounds to 1.0 in float64, but its truncation to FP32 is 1 - 2^-24.
    assert acc.accumulate([1.0, -2.0 ** -80], "fp32", rounding="toward_zero") == 1 - 2.0 ** -24
    assert acc.accumulate([1.0, -2.0 ** -80], "fp32") == 1.0


def test_rounding_toward_zero_never_increases_a_sum_of_positive_terms():
    rng = np.random.default_rng(2)
    x = rng.random((50, 300))
    truncated = acc.accumulate(x, 10, rounding="toward_zero")
    nearest = acc.accumulate(x, 10)
    assert np.all(truncated <= x.sum(axis=-1)) and np.all(truncated <= nearest)


# --------------------------------------------------------------------------
# The model's limits and its parts
# --------------------------------------------------------------------------

@pytest.mark.parametrize("model", [{}, {"chunk": 8}, {"chunk": 4, "promote_every": 16}])
def test_p23_is_fp32(model):
    rng = np.random.default_rng(3)
    x = wide_float32(rng, (40, 256), spread=10)  # inside FP32's normal range throughout
    assert np.array_equal(acc.accumulate(x, 23, **model), acc.accumulate(x, "fp32", **model))


@pytest.mark.parametrize("accumulator", [13, "fp16", "bf16"])
def test_promotion_at_K_or_beyond_changes_nothing(accumulator):
    rng = np.random.default_rng(4)
    e4m3 = get_format("fp8_e4m3")
    a, b = e4m3.round(rng.standard_normal((2, 64, 512)))
    for model in ({"chunk": 1}, {"chunk": 32, "align_bits": 14}):
        plain = acc.dot(a, b, accumulator, **model)
        for every in (512, 1024):
            assert np.array_equal(acc.dot(a, b, accumulator, promote_every=every, **model), plain)
    assert not np.array_equal(acc.dot(a, b, 13, promote_every=128), acc.dot(a, b, 13))


def test_group_alignment_truncates_below_the_largest_terms_leading_bit():
    # align_bits=3 keeps bits 2^0, 2^-1, 2^-2 of a group led by 1.0: 0.375 -> 0.25, the rest -> 0.
    group = [1.0, 0.375, 0.1875, 0.015625]
    assert acc.accumulate(group, 50, chunk=4, align_bits=3) == 1.25
    assert acc.accumulate([-g for g in group], 50, chunk=4, align_bits=3) == -1.25
    assert acc.accumulate(group, 50, chunk=4) == 1.578125
    # One group, then one rounding to the accumulator: 1.578125 to 2 mantissa bits is 1.5.
    assert acc.accumulate(group, 2, chunk=4) == 1.5
    # K not a multiple of chunk: the last group is short (as if padded with zeros).
    assert acc.accumulate(group + [4.0], 50, chunk=4, align_bits=3) == 5.25


def test_checkpoints_equal_separate_runs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 600))
    model = {"chunk": 8, "align_bits": 12, "promote_every": 64, "rounding": "toward_zero"}
    ks = [8, 64, 72, 320, 600]
    got = acc.accumulate(x, 11, checkpoints=ks, **model)
    assert got.shape == (16, len(ks))
    for j, k in enumerate(ks):
        assert np.array_equal(got[:, j], acc.accumulate(x[:, :k], 11, **model))


def test_matmul_is_a_grid_of_dot_products():
    rng = np.random.default_rng(6)
    a = get_format("fp8_e4m3").round(rng.standard_normal((5, 96)))
    b = get_format("fp8_e4m3").round(rng.standard_normal((96, 7)))
    c = acc.matmul(a, b, 13, chunk=32, align_bits=14)
    assert c.shape == (5, 7)
    for i in range(5):
        assert np.array_equal(c[i], acc.dot(a[i][None, :], b.T, 13, chunk=32, align_bits=14))
    assert np.array_equal(acc.matmul(torch.from_numpy(a).float(), b, "fp32"), acc.matmul(a, b, "fp32"))


def test_accumulator_formats():
    assert acc.accumulator_format("fp16") is get_format("fp16")
    p = acc.accumulator_format(13)
    assert (p.man_bits, p.exp_bits, p.name) == (13, 11, "p13")


# --------------------------------------------------------------------------
# Statistics: the error grows with K in FP16, not (visibly) in FP32
# --------------------------------------------------------------------------

def test_fp16_error_grows_with_K():
    rng = np.random.default_rng(7)
    bf16 = get_format("bf16")
    a, b = bf16.round(rng.standard_normal((2, 128, 4096)))
    ks = [64, 512, 4096]
    exact = np.cumsum(a * b, axis=-1)[:, np.array(ks) - 1]  # float64: error far below FP16's

    def error(accumulator):
        got = acc.dot(a, b, accumulator, checkpoints=ks)
        return np.sqrt(((got - exact) ** 2).sum(axis=0) / (exact ** 2).sum(axis=0))

    fp16, fp32 = error("fp16"), error("fp32")
    # Random rounding errors: relative error ~ u·sqrt(K/2), 8 times larger at 64 times the length.
    assert fp16[1] > 2 * fp16[0] and fp16[2] > 2 * fp16[1] and fp16[2] > 4 * fp16[0]
    assert np.all(fp32 < fp16 / 1000)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_bad_input_is_rejected_with_a_reason():
    x = np.ones((4, 64))
    with pytest.raises(UnknownFormatError):
        acc.accumulate(x, "fp17")
    with pytest.raises(TypeError, match="float format"):
        acc.accumulate(x, "int8")
    for p in (0, 51, -3):
        with pytest.raises(ValueError, match="mantissa bits"):
            acc.accumulate(x, p)
    with pytest.raises(ValueError, match="rounding"):
        acc.accumulate(x, rounding="stochastic")
    for chunk in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunk"):
            acc.accumulate(x, chunk=chunk)
    with pytest.raises(ValueError, match="multiple of chunk"):
        acc.accumulate(x, chunk=32, promote_every=48)
    with pytest.raises(ValueError, match="exactly"):
        acc.accumulate(x, chunk=64, align_bits=50)
    for checkpoints in ([32, 16], [0], [65], [33], []):
        with pytest.raises(ValueError, match="checkpoints"):
            acc.accumulate(x, chunk=16, checkpoints=checkpoints)
    with pytest.raises(ValueError, match="last axis"):
        acc.accumulate(np.ones((4, 0)))
    with pytest.raises(ValueError, match="last axis"):
        acc.accumulate(3.0)
    with pytest.raises(TypeError, match="real numbers"):
        acc.accumulate(np.array(["1", "2"]))
    with pytest.raises(ValueError, match="float32 cannot represent"):
        acc.dot(np.full(8, 0.1), np.ones(8))
    with pytest.raises(ValueError, match="expected A"):
        acc.matmul(np.ones((3, 4)), np.ones((5, 2)))
