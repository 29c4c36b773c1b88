"""Tests of companion.scaling against independent computations.

Oracles: per-block quantization written out directly with numpy (rint, clip, two's complement) block by
block in Python loops; ml_dtypes casts for float elements (with power-of-two scales, so the scaled values
are exact float32 numbers and ml_dtypes rounds them once); hand-computed worked examples and storage
counts; statistics for stochastic rounding.
"""
import math
import warnings
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from companion.formats import IntFormat, get_format
from companion.scaling import (
    Granularity,
    QuantizedTensor,
    calibrate,
    error_metrics,
    max_abs_error,
    mse,
    per_block,
    per_channel,
    per_tensor,
    per_tile,
    quantize,
    quantize_scales,
    relative_error,
    sqnr_db,
)

# companion.formats has no uint8 built in; a user-defined one is an ordinary format.
UINT8 = IntFormat("uint8", 8, signed=False)
F32 = lambda v: np.float64(np.float32(v))  # noqa: E731  (scales are stored in fp32 by default)


def rng(seed=0):
    return np.random.default_rng(seed)


def oracle_symmetric_int(block, bits):
    """Direct symmetric absmax quantization of one block: (codes, dequantized, scale)."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(block).max()
    s = F32(amax / qmax) if amax > 0 else 1.0
    q = np.clip(np.rint(block / s), -qmax - 1, qmax)
    codes = (q.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint8)
    return codes, q * s, s


def blocks_of(shape, block_shape):
    """Index tuples of every block (slices), in row-major grid order."""
    ranges = [range(0, n, b) for n, b in zip(shape, block_shape)]
    for starts in np.ndindex(*[len(r) for r in ranges]):
        yield tuple(slice(r[i], r[i] + b) for r, i, b in zip(ranges, starts, block_shape))


def check_against_oracle(x, granularity, block_shape, bits=8):
    name = {8: "int8", 4: "int4"}[bits]
    qt = quantize(x, name, granularity)
    assert qt.layout.block_shape == block_shape
    want_codes = np.zeros(x.shape, dtype=np.uint8)
    want_deq = np.zeros(x.shape)
    want_scales = []
    for idx in blocks_of(x.shape, block_shape):
        c, d, s = oracle_symmetric_int(x[idx].astype(np.float64), bits)
        want_codes[idx], want_deq[idx] = c, d
        want_scales.append(s)
    np.testing.assert_array_equal(qt.codes, want_codes)
    np.testing.assert_array_equal(qt.scales.ravel(), want_scales)
    np.testing.assert_array_equal(qt.dequantize(), want_deq)
    return qt


# --------------------------------------------------------------------------
# Granularities against direct loops
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_per_tensor(bits):
    x = rng().standard_normal((7, 33)).astype(np.float32)
    qt = check_against_oracle(x, per_tensor(), (7, 33), bits)
    assert qt.scales.shape == (1, 1)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel(axis):
    x = rng(1).standard_normal((4, 5, 6)) * rng(2).uniform(0.1, 10, (1, 5, 1))
    shape = tuple(1 if d == axis % 3 else n for d, n in enumerate(x.shape))
    qt = check_against_oracle(x, per_channel(axis), shape)
    assert qt.scales.shape == tuple(x.shape[d] if d == axis % 3 else 1 for d in range(3))


@pytest.mark.parametrize("axis, block_size", [(-1, 32), (1, 16), (0, 8), (0, 1)])
def test_per_block(axis, block_size):
    x = rng(3).laplace(size=(16, 96))
    shape = (1, block_size) if axis % 2 == 1 else (block_size, 1)
    check_against_oracle(x, per_block(block_size, axis=axis), shape, bits=4)


@pytest.mark.parametrize("rows, cols", [(128, 128), (1, 128), (64, 32)])
def test_per_tile(rows, cols):
    x = rng(4).standard_normal((256, 384)).astype(np.float32)
    x[3, 200] = 40.0  # one spike: only its tile's scale should see it
    qt = check_against_oracle(x, per_tile(rows, cols), (rows, cols))
    assert qt.scales.shape == (256 // rows, 384 // cols)


def test_tile_on_a_stack_of_matrices_is_per_matrix():
    x = rng(5).standard_normal((3, 8, 8))
    qt = check_against_oracle(x, per_tile(4, 4), (1, 4, 4))
    assert qt.scales.shape == (3, 2, 2)


def test_torch_input_matches_numpy():
    x = rng(6).standard_normal((8, 64)).astype(np.float32)
    a = quantize(x, "int8", per_block(32))
    b = quantize(torch.from_numpy(x), "int8", per_block(32))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    bf = torch.from_numpy(x).to(torch.bfloat16)
    c = quantize(bf, "int8")
    assert c.codes.shape == (8, 64)


# --------------------------------------------------------------------------
# Worked examples
# --------------------------------------------------------------------------

def test_int4_worked_example_scale_0_1():
    # INT4 with scale 0.1 covers [-0.8, 0.7] in steps of 0.1.
    r = [0.34, -0.27, 0.71, -0.66, 0.06, 1.3, -0.95, 0.0]
    qt = quantize(np.array(r), "int4", scales=0.1)
    np.testing.assert_array_equal(qt.values(), [3, -3, 7, -7, 1, 7, -8, 0])
    np.testing.assert_array_equal(qt.codes, [0b0011, 0b1101, 0b0111, 0b1001, 0b0001, 0b0111, 0b1000, 0])
    s = np.float32(0.1).item()  # the stored fp32 scale: 0.100000001490116...
    assert qt.scales.item() == s
    np.testing.assert_array_equal(qt.dequantize(), np.array([3, -3, 7, -7, 1, 7, -8, 0]) * s)
    # 0.25 / 0.1 is exactly 2.5 in float64, but the stored scale is a little above 0.1: 2 wins.
    assert quantize(np.array([0.25]), "int4", scales=0.1).values().item() == 2
    assert quantize(np.array([0.25]), "int4", scales=0.1, scale_format="fp64").values().item() == 2  # tie to even
    assert quantize(np.array([0.35]), "int4", scales=0.1, scale_format="fp64").values().item() == 3  # 3.4999...


def test_affine_worked_example():
    # [lo, hi] = [-1, 2] onto uint4 [0, 15]: s = 3/15 = 0.2, z = 0 - round(-1 / 0.2) = 5.
    x = np.array([-1.0, 0.0, 0.5, 2.0, 0.1])
    qt = quantize(x, "uint4", method="minmax", zero_point=True)
    s = F32(0.2)
    assert qt.scales.item() == s and qt.zero_points.item() == 5
    np.testing.assert_array_equal(qt.values(), np.clip(np.rint(x / s) + 5, 0, 15))
    deq = qt.dequantize()
    assert deq[1] == 0.0  # real zero is exact
    np.testing.assert_array_equal(deq, (qt.values() - 5) * s)


def test_affine_widens_the_range_to_contain_zero():
    x = np.array([2.0, 3.0, 4.5])  # all positive: lo is taken as 0, so z = 0
    qt = quantize(x, UINT8, method="minmax", zero_point=True)
    assert qt.zero_points.item() == 0 and qt.scales.item() == F32(4.5 / 255)


def test_affine_random_against_oracle():
    x = rng(7).uniform(-0.3, 1.7, size=(6, 40))
    qt = quantize(x, "uint4", per_channel(0), method="minmax", zero_point=True)
    for i in range(6):
        lo, hi = min(x[i].min(), 0), max(x[i].max(), 0)
        s = F32((hi - lo) / 15)
        z = np.clip(0 - np.rint(lo / s), 0, 15)
        q = np.clip(np.rint(x[i] / s) + z, 0, 15)
        assert qt.scales[i, 0] == s and qt.zero_points[i, 0] == z
        np.testing.assert_array_equal(qt.codes[i], q.astype(np.uint8))
        np.testing.assert_array_equal(qt.dequantize()[i], (q - z) * s)


def test_signed_affine_int8():
    x = rng(8).uniform(-0.5, 3.0, size=200)
    qt = quantize(x, "int8", method="minmax", zero_point=True)
    lo, hi = x.min(), x.max()
    s = F32((hi - lo) / 255)
    z = np.clip(-128 - np.rint(lo / s), -128, 127)
    q = np.clip(np.rint(x / s) + z, -128, 127)
    assert qt.zero_points.item() == z
    np.testing.assert_array_equal(qt.codes, (q.astype(np.int64) & 0xFF).astype(np.uint8))


# --------------------------------------------------------------------------
# Float element formats (oracle: ml_dtypes, with power-of-two scales)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype", [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp4_e2m1", ml_dtypes.float4_e2m1fn),
                                         ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_float_elements_with_e8m0_scales(name, dtype):
    fmt = get_format(name)
    x = (rng(9).standard_normal((8, 64)) * rng(10).uniform(0.01, 100, (8, 1))).astype(np.float32)
    qt = quantize(x, name, per_block(32), scale_format="e8m0")
    s = qt.layout.expand(qt.scales)
    assert np.all(np.log2(qt.scales) == np.rint(np.log2(qt.scales)))  # powers of two
    for xb, sb in zip(x.reshape(-1, 32), s.reshape(-1, 32)):
        raw = np.abs(xb).max().astype(np.float64) / fmt.max
        below = 2.0 ** np.floor(np.log2(raw))  # nearest power of two, ties (1.5 * 2^k) up
        assert sb[0] == (below if raw < 1.5 * below else 2 * below)
    y = np.clip(x / s.astype(np.float32), -fmt.max, fmt.max)  # exact: s is a power of two
    want = y.astype(dtype).view(np.uint8)
    if fmt.bits < 8:
        want = want & ((1 << fmt.bits) - 1)
    np.testing.assert_array_equal(qt.codes, want)
    np.testing.assert_array_equal(qt.dequantize(), y.astype(dtype).astype(np.float64) * s)


def test_e8m0_scale_is_rounded_to_nearest_power_of_two():
    x = np.array([448 * 1.4, 1.0])  # amax / 448 = 1.4 -> 1 (log2 1.4 = 0.49)
    assert quantize(x, "fp8_e4m3", scale_format="e8m0").scales.item() == 1.0
    x = np.array([448 * 1.5])  # ties go up in E8M0 (see companion.formats)
    assert quantize(x, "fp8_e4m3", scale_format="e8m0").scales.item() == 2.0


def test_rounded_down_scale_saturates_the_block_max():
    x = np.array([448 * 1.4])  # scale 1: 627.2 saturates to 448
    qt = quantize(x, "fp8_e4m3", scale_format="e8m0")
    assert qt.dequantize().item() == 448.0


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def test_percentile_scale():
    x = rng(11).standard_t(3, size=10_000)
    qt = quantize(x, "int4", method="percentile", percentile=99.0)
    assert qt.scales.item() == F32(np.percentile(np.abs(x), 99.0) / 7)
    lo, hi = np.percentile(x, 1.0), np.percentile(x, 99.0)
    qa = quantize(x, "uint4", method="percentile", percentile=99.0, zero_point=True)
    assert qa.scales.item() == F32((hi - lo) / 15)


def test_percentile_per_channel_with_padding():
    x = rng(12).standard_normal((3, 50))
    qt = quantize(x, "int8", per_block(32), method="percentile", percentile=90, pad=True)
    for i in range(3):
        for j, sl in enumerate([slice(0, 32), slice(32, 50)]):
            assert qt.scales[i, j] == F32(np.percentile(np.abs(x[i, sl]), 90) / 127)


def test_mse_search_against_brute_force():
    x = rng(13).standard_t(2, size=(4, 256))
    grid = 40
    qt = quantize(x, "int4", per_channel(0), method="mse", mse_grid=grid)
    for i in range(4):
        amax = np.abs(x[i]).max()
        best = None
        for k in range(grid):
            s = F32((1 - k / grid) * amax / 7)
            err = np.sum((np.clip(np.rint(x[i] / s), -8, 7) * s - x[i]) ** 2)
            if best is None or err < best[0]:
                best = (err, s)
        assert qt.scales[i, 0] == best[1]
    err_mse = np.sum((qt.dequantize() - x) ** 2)
    err_max = np.sum((quantize(x, "int4", per_channel(0)).dequantize() - x) ** 2)
    assert err_mse < err_max


def test_mse_search_affine_not_worse_than_minmax():
    x = rng(14).lognormal(size=2000) - 1
    a = quantize(x, "uint4", method="mse", zero_point=True)
    b = quantize(x, "uint4", method="minmax", zero_point=True)
    assert mse(x, a.dequantize()) <= mse(x, b.dequantize())


def test_static_scales_and_calibrate():
    calib = rng(15).standard_normal((16, 64))
    s, z = calibrate(calib, "int8", per_channel(0))
    assert z is None and s.shape == (16, 1)
    new = rng(16).standard_normal((16, 64)) * 2
    qt = quantize(new, "int8", per_channel(0), scales=s)
    np.testing.assert_array_equal(qt.values(), np.clip(np.rint(new / s), -128, 127))
    s, z = calibrate(calib, UINT8, method="minmax", zero_point=True)
    qt = quantize(new, UINT8, scales=s, zero_points=z, zero_point=True)
    np.testing.assert_array_equal(qt.values(), np.clip(np.rint(new / s) + z, 0, 255))


def test_static_scale_errors():
    x = np.ones((4, 4))
    with pytest.raises(ValueError, match="broadcast"):
        quantize(x, "int8", per_channel(0), scales=np.ones(3))
    with pytest.raises(ValueError, match="positive"):
        quantize(x, "int8", scales=0.0)
    with pytest.raises(ValueError, match="zero_points"):
        quantize(x, UINT8, zero_point=True, scales=1.0)
    with pytest.raises(ValueError, match="integers"):
        quantize(x, UINT8, zero_point=True, scales=1.0, zero_points=2.5)


# --------------------------------------------------------------------------
# Storage accounting (hand-computed)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape, fmt, granularity, kwargs, bits", [
    ((384, 1536), "int4", per_tensor(), {}, Fraction(4) + Fraction(32, 384 * 1536)),
    ((384, 1536), "int4", per_channel(0), {}, Fraction(4) + Fraction(32, 1536)),
    ((384, 1536), "int8", per_channel(1), {}, Fraction(8) + Fraction(32, 384)),
    ((384, 1536), "int4", per_block(32), {"scale_format": "fp16"}, Fraction(9, 2)),
    ((384, 1536), "fp4_e2m1", per_block(32), {"scale_format": "e8m0"}, Fraction(17, 4)),  # MXFP4-like
    ((384, 1536), "fp8_e4m3", per_tile(128, 128), {}, Fraction(8) + Fraction(32, 128 * 128)),
    ((384, 1536), "fp8_e4m3", per_tile(1, 128), {}, Fraction(33, 4)),
    ((384, 1536), "uint4", per_block(64), {"zero_point": True, "method": "minmax", "scale_format": "fp16"},
     Fraction(4) + Fraction(16 + 4, 64)),
    ((3, 100), "int4", per_block(32), {"pad": True}, Fraction(300 * 4 + 12 * 32, 300)),  # 4 blocks per row
])
def test_bits_per_element(shape, fmt, granularity, kwargs, bits):
    x = rng(17).standard_normal(shape)
    qt = quantize(x, fmt, granularity, **kwargs)
    assert qt.bits_per_element == bits
    assert qt.total_bits == bits * math.prod(shape)


def test_double_quantized_scales_accounting_and_values():
    x = rng(18).standard_normal((64, 1024))  # 1024 blocks of 64 -> 4 second-level blocks of 256
    qt = quantize(x, "int4", per_block(64))
    dq = quantize_scales(qt, "fp8_e4m3", 256)
    n = x.size
    assert dq.storage_bits() == {"codes": 4 * n, "scales": 8 * 1024, "scales of the scales": 4 * 32, "scale offset": 32}
    assert dq.bits_per_element == 4 + Fraction(8, 64) + Fraction(32, 64 * 256) + Fraction(32, n)
    # Oracle: centre on the fp32 mean, absmax fp8 per 256, fp32 second-level scales, add back.
    s = qt.scales.ravel()
    offset = F32(s.mean())
    e4m3 = get_format("fp8_e4m3")
    want = []
    for blk in (s - offset).reshape(-1, 256):
        s2 = F32(np.abs(blk).max() / 448)
        want.append(e4m3.round(blk / s2, saturate=True) * s2)
    np.testing.assert_array_equal(dq.scales.ravel(), np.float32(np.concatenate(want) + offset))
    np.testing.assert_array_equal(dq.codes, qt.codes)  # codes are not recomputed
    assert np.max(np.abs(dq.scales / qt.scales - 1)) < 2 ** -4


# --------------------------------------------------------------------------
# Padding, zeros, special values, bad input
# --------------------------------------------------------------------------

def test_non_divisible_block_is_refused_unless_padded():
    x = rng(19).standard_normal((3, 100))
    with pytest.raises(ValueError, match="pad=True"):
        quantize(x, "int8", per_block(32))
    with pytest.raises(ValueError, match="pad=True"):
        quantize(x, "int8", per_tile(2, 50))
    qt = quantize(x, "int8", per_block(32), pad=True)
    assert qt.layout.padded and qt.scales.shape == (3, 4) and qt.codes.shape == (3, 100)
    for i in range(3):
        for j, sl in enumerate([slice(0, 32), slice(32, 64), slice(64, 96), slice(96, 100)]):
            c, d, s = oracle_symmetric_int(x[i, sl], 8)
            assert qt.scales[i, j] == s
            np.testing.assert_array_equal(qt.codes[i, sl], c)
            np.testing.assert_array_equal(qt.dequantize()[i, sl], d)


def test_padding_affine_uses_only_real_elements():
    x = np.concatenate([np.full(32, 1.0), [0.5, 0.75]])  # last block [0.5, 0.75] (no real zero in it)
    qt = quantize(x, UINT8, per_block(32), method="minmax", zero_point=True, pad=True)
    assert qt.scales[1] == F32(0.75 / 255) and qt.zero_points[1] == 0


def test_all_zero_blocks_round_trip_to_zero():
    x = np.zeros((4, 64))
    x[1, :32] = rng(20).standard_normal(32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs in [{}, {"method": "percentile"}, {"method": "mse", "mse_grid": 5}]:
            for fmt in ["int4", "fp8_e4m3", "fp4_e2m1"]:
                qt = quantize(x, fmt, per_block(32), **kwargs)
                deq = qt.dequantize()
                assert np.isfinite(qt.scales).all() and np.isfinite(deq).all()
                assert (deq[x == 0] == 0).all() and (qt.scales[x.reshape(4, 2, 32).any(-1) == 0] == 1).all()
        qa = quantize(x, "uint4", per_block(32), method="minmax", zero_point=True)
        assert (qa.dequantize()[x == 0] == 0).all()
        assert quantize(np.zeros(0), "int8").codes.shape == (0,)
        assert quantize(np.zeros(()), "int8").dequantize() == 0.0


def test_tiny_scales_clamp_to_the_scale_format():
    x = np.array([1e-30, -1e-30])  # amax / 7 is far below fp16's smallest subnormal
    qt = quantize(x, "int4", scale_format="fp16")
    assert qt.scales.item() == get_format("fp16").min_positive
    assert np.isfinite(qt.dequantize()).all()


def test_nan_and_inf():
    x = np.array([0.5, -1.0, np.inf, -np.inf, np.nan, 0.25])
    with pytest.raises(ValueError, match="NaN"):
        quantize(x, "int8")
    with pytest.raises(ValueError, match="NaN"):
        quantize(x, "fp4_e2m1")
    qt = quantize(x, "fp8_e4m3")  # e4m3 has a NaN code
    s = qt.scales.item()
    assert s == F32(1.0 / 448)  # NaN and Inf are ignored by calibration
    deq = qt.dequantize()
    assert deq[2] == 448 * s and deq[3] == -448 * s  # +-Inf saturate
    e4m3 = get_format("fp8_e4m3")
    assert np.isnan(deq[4]) and deq[1] == -448 * s and deq[0] == e4m3.round(0.5 / s) * s
    finite = quantize(np.array([0.5, -1.0, np.inf]), "int8")
    assert finite.dequantize()[2] == 127 * finite.scales.item()
    only_inf = quantize(np.array([np.inf, 0.0]), "int8")
    assert only_inf.scales.item() == 1.0 and only_inf.values()[0] == 127


def test_bad_input_errors():
    x = np.ones((4, 8))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        quantize(x, "int8", per_channel(2))
    with pytest.raises(ValueError, match="out of range"):
        quantize(x, "int8", per_block(4, axis=-3))
    with pytest.raises(TypeError, match="floating"):
        quantize(np.ones((4, 8), dtype=np.int32), "int8")
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.ones(4, dtype=torch.int64), "int8")
    with pytest.raises(TypeError, match="floating"):
        quantize(np.array([True]), "int8")
    with pytest.raises(ValueError, match="positive int"):
        per_block(0)
    with pytest.raises(ValueError, match="at least 2"):
        quantize(np.ones(8), "int8", per_tile(2, 2))
    with pytest.raises(ValueError, match="unknown calibration"):
        quantize(x, "int8", method="max")
    with pytest.raises(ValueError, match="symmetric"):
        quantize(x, "int8", zero_point=True, method="absmax")
    with pytest.raises(ValueError, match="affine"):
        quantize(x, "int8", method="minmax")
    with pytest.raises(ValueError, match="integer element format"):
        quantize(x, "fp8_e4m3", zero_point=True, method="minmax")
    with pytest.raises(ValueError, match="signed"):
        quantize(x, "uint4")
    with pytest.raises(KeyError, match="unknown format"):
        quantize(x, "int3")
    with pytest.raises(ValueError, match="percentile"):
        quantize(x, "int8", method="percentile", percentile=0)
    with pytest.raises(TypeError, match="Granularity"):
        quantize(x, "int8", granularity=32)
    with pytest.raises(ValueError, match="granularity"):
        Granularity("row")


# --------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_and_adjacent():
    n = 200_000
    x = np.full(n, 0.37)
    s = np.float32(0.1).item()
    qt = quantize(x, "int4", scales=0.1, rounding="stochastic", rng=1)
    deq = qt.dequantize()
    assert set(np.unique(qt.values())) == {3.0, 4.0}
    p = 0.37 / s - 3  # probability of rounding up
    sigma = s * math.sqrt(p * (1 - p) / n)
    assert abs(deq.mean() - 0.37) < 5 * sigma
    rtn = quantize(x, "int4", scales=0.1).dequantize()
    assert rtn.mean() - 0.37 > 100 * sigma  # round to nearest: always 0.4
    again = quantize(x, "int4", scales=0.1, rounding="stochastic", rng=1)
    np.testing.assert_array_equal(again.codes, qt.codes)


def test_stochastic_rounding_affine_and_float():
    x = np.full(100_000, 0.123)
    qa = quantize(np.append(x, [-1.0, 1.0]), "uint4", scales=2 / 15, zero_points=7, zero_point=True,
                  rounding="stochastic", rng=np.random.default_rng(2))
    assert abs(qa.dequantize()[:-2].mean() - 0.123) < 5 * (2 / 15) * 0.5 / math.sqrt(x.size)
    qf = quantize(x, "fp4_e2m1", scales=0.1, rounding="stochastic", rng=3)  # 1.23 between 1 and 1.5
    assert set(np.unique(qf.values())) == {1.0, 1.5}
    assert abs(qf.dequantize().mean() - 0.123) < 5 * 0.05 * 0.5 / math.sqrt(x.size)


# --------------------------------------------------------------------------
# Error metrics
# --------------------------------------------------------------------------

def test_metrics_by_hand():
    x = np.array([1.0, 1.0, 1.0, 1.0])
    y = np.array([1.1, 0.9, 1.0, 1.0])
    noise = (0.1 ** 2 + 0.1 ** 2)  # up to the float64 rounding of 1.1 - 1 and 1 - 0.9
    assert mse(x, y) == pytest.approx(noise / 4, rel=1e-12)
    assert sqnr_db(x, y) == pytest.approx(10 * math.log10(4 / noise), rel=1e-12)
    assert sqnr_db(x, y) == pytest.approx(23.0103, abs=1e-4)
    assert max_abs_error(x, y) == pytest.approx(0.1, rel=1e-12)
    assert relative_error(x, y) == pytest.approx(math.sqrt(noise) / 2, rel=1e-12)
    assert sqnr_db(x, x) == math.inf and relative_error(x, x) == 0.0
    assert relative_error(np.zeros(2), np.ones(2)) == math.inf
    assert set(error_metrics(x, y)) == {"mse", "sqnr_db", "max_abs", "relative"}
    with pytest.raises(ValueError, match="shapes"):
        mse(x, y[:3])


def test_quantization_error_is_at_most_half_a_step():
    x = rng(21).uniform(-1, 1, size=(32, 32))
    qt = quantize(x, "int8", per_channel(0))
    step = qt.layout.expand(qt.scales)
    assert np.all(np.abs(qt.dequantize() - x) <= step / 2 * (1 + 1e-12))


def test_repr_and_layout():
    qt = quantize(rng(22).standard_normal((4, 64)), "int4", per_block(32))
    assert isinstance(qt, QuantizedTensor)
    assert "int4" in repr(qt) and "5.0000" in repr(qt)  # 4 + 32/32
    assert str(qt.layout) == "per block of 32 (axis -1): 4x2 blocks of 1x32"


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_and_granularities_with_padding(seed):
    # Any rank, any granularity, sizes that need not divide: every block, partial ones included,
    # must equal the direct computation on that block alone.
    r = rng(100 + seed)
    ndim = int(r.integers(1, 5))
    shape = tuple(int(n) for n in r.integers(1, 12, ndim))
    x = r.standard_normal(shape) * np.exp(r.standard_normal(shape))
    kind = ["tensor", "channel", "block", "tile"][seed % 4 if ndim >= 2 else seed % 3]
    axis = int(r.integers(-ndim, ndim))
    g = {"tensor": per_tensor(), "channel": per_channel(axis),
         "block": per_block(int(r.integers(1, 6)), axis=axis),
         "tile": per_tile(int(r.integers(1, 5)), int(r.integers(1, 5)))}[kind]
    qt = quantize(x, "int4", g, pad=True)
    block_shape = g.block_shape(shape)
    deq = qt.dequantize()
    for idx in blocks_of(shape, block_shape):
        c, d, s = oracle_symmetric_int(x[idx], 4)
        np.testing.assert_array_equal(qt.codes[idx], c)
        np.testing.assert_array_equal(deq[idx], d)
    assert qt.scales.shape == tuple(-(-n // b) for n, b in zip(shape, block_shape))
