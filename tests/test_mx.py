"""Tests of companion.mx: MX block formats (OCP MX v1.0) and NVFP4.

Oracles: literal tables written by hand from the spec (element rounding ties, carries and saturation;
shared scales), an independent reference built from torch casts and ml_dtypes, torch's
float4_e2m1fn_x2 / float8_e8m0fnu / float8_e4m3fn views, and hypothesis properties.
"""

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from companion import mx
from companion.formats import UnknownFormatError
from companion.mx import (
    ELEMENT_TYPES,
    SCALE_ROUNDINGS,
    MXTensor,
    element_type,
    pack_fp4,
    quantize_mx,
    quantize_nvfp4,
    scale_codes,
    unpack_fp4,
)

ELEMS = list(ELEMENT_TYPES)
f32 = np.float32


# --------------------------------------------------------------------------
# The element types
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name, bits, emax, max_value, min_positive", [
    ("fp8_e4m3", 8, 8, 448.0, 2.0 ** -9),
    ("fp8_e5m2", 8, 15, 57344.0, 2.0 ** -16),
    ("fp6_e2m3", 6, 2, 7.5, 2.0 ** -3),
    ("fp6_e3m2", 6, 4, 28.0, 2.0 ** -4),
    ("fp4_e2m1", 4, 2, 6.0, 0.5),
    ("int8", 8, 0, 127 / 64, 2.0 ** -6),
])
def test_element_type_table(name, bits, emax, max_value, min_positive):
    t = element_type(name)
    assert (t.bits, t.emax, t.max, t.min_positive) == (bits, emax, max_value, min_positive)
    assert 2.0 ** t.emax <= t.max < 2.0 ** (t.emax + 1)


# --------------------------------------------------------------------------
# Hand-made element tables: ties, carries, saturation (with X = 1)
# --------------------------------------------------------------------------

# (element type, the block's anchor that makes the "floor" scale 2^0, value, expected code)
ELEMENT_TABLE = [
    # FP4 E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 are codes 0..7; the sign is 0x8.
    ("fp4_e2m1", 4.0, 0.25, 0x0),    # tie 0 | 0.5 -> even 0
    ("fp4_e2m1", 4.0, 0.75, 0x2),    # tie 0.5 | 1 -> 1: carry from subnormal to normal
    ("fp4_e2m1", 4.0, 1.25, 0x2),    # tie 1 | 1.5 -> 1
    ("fp4_e2m1", 4.0, 1.75, 0x4),    # tie 1.5 | 2 -> 2: carry into the next binade
    ("fp4_e2m1", 4.0, 2.5, 0x4),     # tie 2 | 3 -> 2
    ("fp4_e2m1", 4.0, 3.5, 0x6),     # tie 3 | 4 -> 4: carry
    ("fp4_e2m1", 4.0, 5.0, 0x6),     # tie 4 | 6 -> 4
    ("fp4_e2m1", 4.0, 5.25, 0x7),    # above the tie -> 6
    ("fp4_e2m1", 4.0, 7.5, 0x7),     # beyond max: saturates to 6
    ("fp4_e2m1", 4.0, -2.5, 0xC),    # -2
    ("fp4_e2m1", 4.0, -0.2, 0x8),    # rounds to -0, sign kept
    # FP6 E2M3 (bias 1): subnormal step 1/8, max 7.5 = 0b011111.
    ("fp6_e2m3", 4.0, 0.0625, 0),    # tie 0 | 1/8 -> 0
    ("fp6_e2m3", 4.0, 0.1875, 2),    # tie 1/8 | 2/8 -> 2/8
    ("fp6_e2m3", 4.0, 0.9375, 8),    # tie 7/8 (largest subnormal) | 1 -> 1: carry
    ("fp6_e2m3", 4.0, 1.9375, 16),   # tie 1.875 | 2 -> 2: carry
    ("fp6_e2m3", 4.0, 7.25, 30),     # tie 7 | 7.5 -> 7
    ("fp6_e2m3", 4.0, 7.9, 31),      # beyond max: saturates to 7.5
    ("fp6_e2m3", 4.0, -7.9, 63),     # -7.5
    # FP6 E3M2 (bias 3): subnormal step 1/16, max 28 = 0b011111.
    ("fp6_e3m2", 16.0, 0.03125, 0),  # tie 0 | 1/16 -> 0
    ("fp6_e3m2", 16.0, 0.21875, 4),  # tie 3/16 | 1/4 -> 1/4: carry into the normals
    ("fp6_e3m2", 16.0, 0.9375, 12),  # tie 0.875 | 1 -> 1: carry
    ("fp6_e3m2", 16.0, 26.0, 30),    # tie 24 | 28 -> 24
    ("fp6_e3m2", 16.0, 30.0, 31),    # rounds to 32, beyond max: saturates to 28
    # FP8 E4M3 (bias 7): max 448 = 0x7E, 0x7F is NaN and never produced.
    ("fp8_e4m3", 256.0, 1.0625, 0x38),   # tie 1 | 1.125 -> 1
    ("fp8_e4m3", 256.0, 1.1875, 0x3A),   # tie 1.125 | 1.25 -> 1.25
    ("fp8_e4m3", 256.0, 1.9375, 0x40),   # tie 1.875 | 2 -> 2: carry
    ("fp8_e4m3", 256.0, 2.0 ** -10, 0x00),       # tie 0 | 2^-9 -> 0
    ("fp8_e4m3", 256.0, 3 * 2.0 ** -10, 0x02),   # tie 2^-9 | 2^-8 -> 2^-8
    ("fp8_e4m3", 256.0, 7.5 * 2.0 ** -9, 0x08),  # tie largest subnormal | 2^-6 -> 2^-6: carry
    ("fp8_e4m3", 256.0, 464.0, 0x7E),    # tie 448 | 480 -> 448 (even)
    ("fp8_e4m3", 256.0, 470.0, 0x7E),    # nearer 480, beyond max: saturates to 448, not NaN
    ("fp8_e4m3", 256.0, -500.0, 0xFE),   # -448
    # FP8 E5M2 (bias 15): max 57344 = 0x7B; the codes of Inf and NaN are never produced.
    ("fp8_e5m2", 32768.0, 1.125, 0x3C),   # tie 1 | 1.25 -> 1
    ("fp8_e5m2", 32768.0, 1.375, 0x3E),   # tie 1.25 | 1.5 -> 1.5
    ("fp8_e5m2", 32768.0, 1.875, 0x40),   # tie 1.75 | 2 -> 2: carry
    ("fp8_e5m2", 32768.0, 61440.0, 0x7B),  # tie 57344 | 65536 -> 65536 overflows: saturates
    ("fp8_e5m2", 32768.0, 65000.0, 0x7B),  # saturates, never Inf
    # MXINT8: code * 2^-6, symmetric [-127, 127].
    ("int8", 1.0, 2.0 ** -7, 0),          # tie 0 | 1/64 -> 0
    ("int8", 1.0, 3 * 2.0 ** -7, 2),      # tie 1/64 | 2/64 -> 2/64
    ("int8", 1.0, 1.5, 96),
    ("int8", 1.0, 127.5 / 64, 127),       # tie 127 | 128 -> 128, beyond max: 127
    ("int8", 1.0, 1.999, 127),
    ("int8", 1.0, -1.999, 0x81),          # -127, never -128
    ("int8", 1.0, -(2.0 ** -7), 0),       # integers have no -0
]


@pytest.mark.parametrize("elem, anchor, value, code", ELEMENT_TABLE)
def test_element_rounding_table(elem, anchor, value, code):
    x = np.zeros(32, dtype=np.float32)
    x[0], x[1] = anchor, value
    assert f32(value) == value  # every table value is exact in float32
    for mode in ("floor", "rceil", "even"):
        q = quantize_mx(x, elem, scale_rounding=mode)
        if mode != "floor" and q.scales[0] != 127:
            continue  # the table is for X = 1; rceil/even may pick 2 for the saturating rows
        assert q.scales.tolist() == [127]
        assert int(q.elements[1]) == code, (elem, value, mode)


# --------------------------------------------------------------------------
# Hand-made scale tables
# --------------------------------------------------------------------------

# (element, amax (exact float32), expected E8M0 codes for floor, rceil, even)
SCALE_TABLE = [
    ("fp4_e2m1", 6.0, (127, 127, 127)),
    ("fp4_e2m1", 6.5, (127, 128, 127)),       # floor clips 6.5 to 6; even keeps 2^0 (6.5 -> 1.5 * 4)
    ("fp4_e2m1", 7.0, (127, 128, 128)),       # 7 = 1.75 * 4 rounds to 8: even moves up
    ("fp4_e2m1", 4.0, (127, 127, 127)),
    ("fp4_e2m1", 3.0, (126, 126, 126)),       # rceil: 3/6 = 2^-1 exactly (the float32 product too)
    ("fp4_e2m1", 8.0, (128, 128, 128)),
    ("fp4_e2m1", 0.0, (0, 0, 0)),             # all-zero block: the smallest scale
    ("fp4_e2m1", 2.0 ** -125, (0, 0, 0)),     # floor: -125 - 2 = -127 exactly
    ("fp4_e2m1", 2.0 ** -124, (1, 1, 1)),     # rceil: 2^-124 / 6 = 2^-126.6 (a float32 subnormal) -> 2^-126
    ("fp4_e2m1", 1e-40, (0, 0, 0)),           # a float32 subnormal: clamped to 2^-127
    ("fp4_e2m1", float(f32(3e38)), (252, 253, 253)),
    ("fp4_e2m1", float("inf"), (255, 255, 255)),
    ("fp4_e2m1", float("nan"), (255, 255, 255)),
    ("fp8_e4m3", 448.0, (127, 127, 127)),
    ("fp8_e4m3", 480.0, (127, 128, 127)),     # floor and even clip 480 to 448
    ("fp8_e4m3", 496.0, (127, 128, 128)),     # 1.9375 * 256 rounds to 2 * 256 at 4 significant bits
    ("fp8_e4m3", 256.0, (127, 127, 127)),
    ("fp8_e5m2", 57344.0, (127, 127, 127)),
    ("fp8_e5m2", 61440.0, (127, 128, 128)),
    ("fp6_e2m3", 7.5, (127, 127, 127)),
    ("fp6_e2m3", 7.75, (127, 128, 128)),
    ("fp6_e3m2", 28.0, (127, 127, 127)),
    ("fp6_e3m2", 30.0, (127, 128, 128)),
    ("int8", 1.0, (127, 127, 127)),
    ("int8", 1.984375, (127, 127, 127)),      # 127/64: the largest value, no rounding up
    ("int8", 1.9921875, (127, 128, 128)),     # 127.5/64
    # rceil in float32, as cuBLAS/TE compute it: d = fp32(amax * fp32(1/max)), rounded up.
    ("fp4_e2m1", float(np.nextafter(f32(6), f32(7))), (127, 128, 127)),     # d = 1 + 2^-23: up
    ("fp8_e4m3", float(np.nextafter(f32(896), f32(0))), (128, 128, 128)),   # d rounds to exactly 2
    ("int8", float(np.nextafter(f32(127 / 64), f32(2))), (127, 127, 127)),  # d rounds to exactly 1
]


@pytest.mark.parametrize("elem, amax, codes", SCALE_TABLE)
def test_scale_table(elem, amax, codes):
    got = tuple(int(scale_codes(f32(amax), elem, mode)) for mode in SCALE_ROUNDINGS)
    assert got == codes


# --------------------------------------------------------------------------
# An independent reference built from torch casts and ml_dtypes
# --------------------------------------------------------------------------

ML_ELEMENT = {"fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp6_e3m2": ml_dtypes.float6_e3m2fn,
              "fp4_e2m1": ml_dtypes.float4_e2m1fn}
TORCH_ELEMENT = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def reference_mx(x, elem, mode):
    """Rows of 32 (float32 numpy) -> (scale codes, element codes), by torch/ml_dtypes casts."""
    t = element_type(elem)
    xb = torch.from_numpy(x.reshape(-1, 32))
    amax = xb.abs().amax(dim=1)
    mant, exp = torch.frexp(amax.double())           # amax = mant * 2^exp, mant in [0.5, 1)
    if mode == "floor":
        e = exp - 1 - t.emax
    elif mode == "even":
        sig = torch.floor(torch.ldexp(mant, torch.tensor(t.man_bits + 1)) + 0.5)
        e = exp - 1 + (sig >= 2 ** (t.man_bits + 1)).long() - t.emax
    else:
        d = (amax * torch.tensor(1 / t.max, dtype=torch.float32)).double()
        dm, de = torch.frexp(d)
        e = torch.where(dm == 0.5, de - 1, de)
        e = torch.where(d > 0, e, -127)
    e = torch.where(amax > 0, e, -127).clamp(-127, 127)
    scales = torch.where(torch.isfinite(amax), e + 127, 255).to(torch.uint8)
    v = (xb.double() * torch.exp2(-e.double())[:, None]).clamp(-t.max, t.max)
    v = torch.where(torch.isfinite(amax)[:, None], v, 0.0)
    if elem in TORCH_ELEMENT:
        codes = v.float().to(TORCH_ELEMENT[elem]).view(torch.uint8)
    elif elem == "int8":
        codes = torch.round(v * 64).to(torch.int8).view(torch.uint8)   # torch.round: half to even
    else:
        codes = torch.from_numpy(v.numpy().astype(np.float32).astype(ML_ELEMENT[elem]).view(np.uint8))
    return scales.numpy(), codes.numpy().reshape(x.shape)


def wide_random(rng, rows):
    x = rng.standard_normal((rows, 32)) * np.exp2(rng.integers(-40, 40, (rows, 1)))
    x[::5] = np.round(x[::5] * 8) / 8 * np.exp2(rng.integers(-4, 4, (x[::5].shape[0], 1)))  # ties
    x[::7, 0] *= 300.0          # outliers: blocks whose amax clips under floor
    x[3] = 0.0
    x[4] = 1e-42                # float32 subnormals
    return x.astype(np.float32)


@pytest.mark.parametrize("mode", SCALE_ROUNDINGS)
@pytest.mark.parametrize("elem", ELEMS)
def test_against_independent_reference(elem, mode):
    x = wide_random(np.random.default_rng(ELEMS.index(elem)), 2000)
    x[6, 3], x[8, 9], x[9, 0] = np.nan, np.inf, -np.inf
    q = quantize_mx(x, elem, scale_rounding=mode)
    scales, codes = reference_mx(x, elem, mode)
    assert np.array_equal(q.scales.ravel(), scales)
    assert np.array_equal(q.elements, codes)


# --------------------------------------------------------------------------
# Special values
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("elem", ELEMS)
def test_nan_and_inf_make_the_block_nan(elem, bad):
    x = np.linspace(-1, 1, 96, dtype=np.float32).reshape(1, 96)
    x[0, 40] = bad
    q = quantize_mx(x, elem)
    assert q.scales.tolist() == [[q.scales[0, 0], 255, q.scales[0, 2]]]
    assert q.scales[0, 0] != 255 and q.scales[0, 2] != 255
    assert not q.elements[0, 32:64].any()       # codes of a NaN block carry nothing
    y = q.dequantize()
    assert np.isnan(y[0, 32:64]).all() and np.isfinite(np.delete(y, range(32, 64), axis=1)).all()
    assert np.isnan(q.scale_values()[0, 1])


@pytest.mark.parametrize("elem", ELEMS)
def test_all_zero_block(elem):
    x = np.zeros((2, 32), dtype=np.float32)
    x[1, 5] = -0.0
    q = quantize_mx(x, elem)
    assert q.scales.tolist() == [[0], [0]]
    y = q.dequantize()
    assert (y == 0).all()


@pytest.mark.parametrize("elem, expect", [
    # amax 2^-140: the scale clamps at 2^-127, so V/X = 2^-13 * (value / 2^-140 ...)
    ("fp8_e5m2", [2.0 ** -140, 2.0 ** -141]),  # E5M2 reaches 2^-16 at X = 1: both survive
    ("fp8_e4m3", [0.0, 0.0]),                  # E4M3's smallest subnormal is 2^-9: both flush
    ("fp4_e2m1", [0.0, 0.0]),
])
def test_amax_below_the_scale_range(elem, expect):
    x = np.zeros(32, dtype=np.float32)
    x[0], x[1] = 2.0 ** -140, 2.0 ** -141
    q = quantize_mx(x, elem)
    assert q.scales.tolist() == [0]
    assert q.dequantize()[:2].tolist() == expect


def test_element_overflow_saturates():
    # floor: amax 7.5 keeps X = 1 for FP4, so 7.5 clips to 6; rceil picks X = 2 and keeps 8.
    x = np.array([7.5, 1.0] + [0.0] * 30, dtype=np.float32)
    assert quantize_mx(x, "fp4_e2m1").dequantize()[:2].tolist() == [6.0, 1.0]
    assert quantize_mx(x, "fp4_e2m1", scale_rounding="rceil").dequantize()[:2].tolist() == [8.0, 1.0]
    # E4M3 never produces its NaN code 0x7F/0xFF, E5M2 never its Inf 0x7C/0xFC.
    big = np.full(32, 500.0, dtype=np.float32)
    big[1::2] *= -1
    assert set(quantize_mx(big, "fp8_e4m3").elements.tolist()) == {0x7E, 0xFE}
    big = np.full(32, 65000.0, dtype=np.float32)
    assert set(quantize_mx(big, "fp8_e5m2").elements.tolist()) == {0x7B}


def test_float64_input_is_rounded_to_float32():
    x = np.full(32, 1 + 2.0 ** -30)  # rounds to exactly 1 in float32
    q = quantize_mx(x, "fp8_e4m3")
    assert (q.dequantize() == 1.0).all()
    big = np.zeros(32)
    big[3] = 1e300                    # beyond float32: Inf, so the block is NaN
    assert quantize_mx(big, "fp8_e4m3").scales.tolist() == [255]


# --------------------------------------------------------------------------
# Shapes, padding, axes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis, block", [
    ((3, 45), -1, 32), ((45, 3), 0, 32), ((2, 3, 40), 1, 2), ((7,), 0, 3), ((5, 64), 1, 32), ((1, 1), 0, 32),
])
def test_padding_and_axes(shape, axis, block):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    q = quantize_mx(x, "fp6_e3m2", block_size=block, axis=axis)
    ax = axis % len(shape)
    n_blocks = -(-shape[ax] // block)
    assert q.scales.shape == shape[:ax] + (n_blocks,) + shape[ax + 1:]
    assert q.elements.shape == shape[:ax] + (n_blocks * block,) + shape[ax + 1:]
    y = q.dequantize()
    assert y.shape == shape
    # Same as quantizing the zero-padded tensor (along the axis moved last) and slicing it back.
    padded = np.zeros(q.elements.shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in shape)] = x
    moved = np.moveaxis(padded, ax, -1)
    ref = quantize_mx(moved, "fp6_e3m2", block_size=block, axis=-1)
    assert np.array_equal(np.moveaxis(ref.elements, -1, ax), q.elements)
    assert np.array_equal(np.moveaxis(ref.scales, -1, ax), q.scales)
    assert np.array_equal(np.moveaxis(ref.dequantize(), -1, ax)[tuple(slice(0, n) for n in shape)], y)


def test_torch_input_and_dtypes():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q = quantize_mx(x, "fp8_e4m3")
    assert np.array_equal(q.dequantize(), quantize_mx(x.float().numpy(), "fp8_e4m3").dequantize())
    assert quantize_mx(x.half(), "int8").shape == (4, 64)
    as_ml = x.float().numpy().astype(ml_dtypes.bfloat16)     # ml_dtypes' bfloat16 is accepted too
    assert np.array_equal(quantize_mx(as_ml, "int8").dequantize(), quantize_mx(x, "int8").dequantize())


@pytest.mark.parametrize("shape", [(0, 32), (4, 0), (0,)])
def test_empty_tensors(shape):
    q = quantize_mx(np.zeros(shape, dtype=np.float32), "fp4_e2m1")
    assert q.dequantize().shape == shape
    assert q.total_bits == 0
    n = quantize_nvfp4(np.zeros(shape, dtype=np.float32))
    assert n.dequantize().shape == shape


# --------------------------------------------------------------------------
# Packing and torch's dtypes
# --------------------------------------------------------------------------

def test_pack_fp4_literal_bytes():
    codes = np.array([[0x1, 0x2, 0xF, 0x8]], dtype=np.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x8F]]          # first element in the low nibble
    assert np.array_equal(unpack_fp4(packed), codes)
    t = pack_fp4(torch.from_numpy(codes))
    assert isinstance(t, torch.Tensor) and t.tolist() == [[0x21, 0x8F]]
    assert torch.equal(unpack_fp4(t.view(torch.float4_e2m1fn_x2)), torch.from_numpy(codes))


def test_pack_fp4_errors():
    with pytest.raises(ValueError, match="even"):
        pack_fp4(np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_fp4(np.array([16, 0], dtype=np.uint8))
    with pytest.raises(TypeError):
        pack_fp4(np.zeros(2, dtype=np.int32))


def test_fp4_agrees_with_torch_float4_and_ml_dtypes():
    x = torch.randn(8, 64) * 3
    q = quantize_mx(x, "fp4_e2m1")
    elements, scales = q.to_torch()
    assert elements.dtype == torch.float4_e2m1fn_x2 and tuple(elements.shape) == (8, 32)
    assert scales.dtype == torch.float8_e8m0fnu and tuple(scales.shape) == (8, 2)
    raw = elements.view(torch.uint8).numpy()
    assert np.array_equal(raw & 0xF, q.elements[:, 0::2]) and np.array_equal(raw >> 4, q.elements[:, 1::2])
    # Element values decode as ml_dtypes' float4_e2m1fn; scales as torch's float8_e8m0fnu.
    assert np.array_equal(q.elements.view(ml_dtypes.float4_e2m1fn).astype(np.float64), q.element_values())
    assert np.array_equal(scales.to(torch.float32).double().numpy(), q.scale_values())
    # Back from the torch views: the same tensor.
    back = MXTensor.from_torch(elements, scales, shape=(8, 64))
    assert back.elem == "fp4_e2m1"
    assert np.array_equal(back.elements, q.elements) and np.array_equal(back.scales, q.scales)
    assert np.array_equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("elem, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2),
                                         ("int8", torch.int8), ("fp6_e2m3", torch.uint8)])
def test_to_and_from_torch(elem, dtype):
    x = torch.randn(3, 70)
    q = quantize_mx(x, elem)
    elements, scales = q.to_torch()
    assert elements.dtype == dtype
    if elem.startswith("fp8"):  # torch decodes the codes to the same element values
        assert np.array_equal(elements.to(torch.float64).numpy(), q.element_values())
    back = MXTensor.from_torch(elements, scales, shape=(3, 70), elem=elem if dtype == torch.uint8 else None)
    assert np.array_equal(back.dequantize(), q.dequantize())


def test_scales_agree_with_torch_e8m0_cast():
    x = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    x *= np.exp2(np.arange(-32, 32))[:, None].astype(np.float32)
    q = quantize_mx(x, "fp8_e4m3")
    powers = torch.from_numpy(q.scale_values())           # 2^e, exact
    assert np.array_equal(powers.to(torch.float8_e8m0fnu).view(torch.uint8).numpy(), q.scales)


def test_from_torch_errors():
    q = quantize_mx(torch.randn(2, 64), "fp4_e2m1")
    elements, scales = q.to_torch()
    with pytest.raises(ValueError, match="expected elements of shape"):
        MXTensor.from_torch(elements, scales, shape=(2, 96))
    with pytest.raises(ValueError, match="infer"):
        MXTensor.from_torch(elements.view(torch.uint8), scales, shape=(2, 64))
    with pytest.raises(TypeError, match="do not hold"):
        MXTensor.from_torch(elements, scales, shape=(2, 64), elem="fp8_e4m3")
    with pytest.raises(TypeError, match="scales"):
        MXTensor.from_torch(elements, scales.view(torch.uint8).float(), shape=(2, 64))
    odd = quantize_mx(torch.randn(33, 3), "fp4_e2m1", axis=0)
    with pytest.raises(ValueError, match="odd"):
        odd.to_torch()


# --------------------------------------------------------------------------
# Storage accounting
# --------------------------------------------------------------------------

def test_storage_accounting():
    x = np.ones((4, 256), dtype=np.float32)
    assert quantize_mx(x, "fp4_e2m1").bits_per_element == Fraction(17, 4)      # 4.25
    assert quantize_mx(x, "fp6_e2m3").bits_per_element == Fraction(25, 4)      # 6.25
    assert quantize_mx(x, "fp8_e4m3").bits_per_element == Fraction(33, 4)      # 8.25
    assert quantize_mx(x, "int8", block_size=16).bits_per_element == Fraction(17, 2)
    assert mx.bits_per_element("fp4_e2m1", 32) == Fraction(17, 4)
    n = quantize_nvfp4(x)
    assert n.storage_bits() == {"elements": 4096, "block scales": 512, "tensor scale": 32}
    assert n.bits_per_element == Fraction(9, 2) + Fraction(32, 1024)
    square = np.ones((16, 256), dtype=np.float32)      # 2-D tiles pad rows to 16 as well
    assert quantize_nvfp4(square, blocks="2d").bits_per_element == Fraction(9, 2) + Fraction(32, 4096)
    assert quantize_nvfp4(x, blocks="2d").total_bits == 4 * quantize_nvfp4(x).total_bits - 3 * 32
    # Padding is stored, so it is counted: 45 elements in two blocks of 32.
    assert quantize_mx(np.ones(45, dtype=np.float32), "fp4_e2m1").total_bits == 64 * 4 + 2 * 8


# --------------------------------------------------------------------------
# NVFP4
# --------------------------------------------------------------------------

def test_nvfp4_hand_made():
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :5] = [2688.0, 448.0, 1120.0, -1568.0, 150.0]    # amax 2688: s_tensor = 1, s_block = 448
    x[0, 16:19] = [6.0, 2.5, -0.25]                        # amax 6: s_block = 1
    q = quantize_nvfp4(x)
    assert q.tensor_scale == 1.0
    assert q.block_scales.tolist() == [[0x7E, 0x38]]       # E4M3 448 and 1
    assert q.elements[0, :5].tolist() == [0x7, 0x2, 0x4, 0xE, 0x1]  # 6, 1, 2.5->2 (tie), -3.5->-4, 0.33->0.5
    assert q.elements[0, 16:19].tolist() == [0x7, 0x4, 0x8]         # 6, 2.5->2 (tie), -0.25->-0
    assert q.dequantize()[0, :5].tolist() == [2688.0, 448.0, 896.0, -1792.0, 224.0]


def test_nvfp4_tensor_scale():
    assert mx.nvfp4_tensor_scale(2688.0) == 1.0
    assert mx.nvfp4_tensor_scale(0.0) == 1.0
    assert mx.nvfp4_tensor_scale(1.0) == float(np.float32(1 / 2688))
    with pytest.raises(ValueError):
        mx.nvfp4_tensor_scale(float("inf"))


def test_nvfp4_special_values():
    x = np.random.default_rng(0).standard_normal((2, 48)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, 20] = np.inf
    x[1, 32:48] = 0.0
    q = quantize_nvfp4(x)
    # The tensor scale ignores non-finite values.
    finite = np.abs(x[np.isfinite(x)]).max()
    assert q.tensor_scale == mx.nvfp4_tensor_scale(finite)
    assert q.block_scales[0, 0] == 0x7F and q.block_scales[1, 1] == 0x7F and q.block_scales[1, 2] == 0
    y = q.dequantize()
    assert np.isnan(y[0, :16]).all() and np.isnan(y[1, 16:32]).all()
    assert (y[1, 32:] == 0).all() and np.isfinite(y[0, 16:]).all()


def test_nvfp4_static_amax_saturates():
    x = np.linspace(-10, 10, 32, dtype=np.float32).reshape(1, 32)
    q = quantize_nvfp4(x, global_amax=1.0)    # calibrated far too low
    assert q.block_scales.tolist() == [[0x7E, 0x7E]]
    assert np.abs(q.dequantize()).max() == 6 * 448 * q.tensor_scale


def test_nvfp4_matches_a_torch_reference():
    x = torch.from_numpy(np.random.default_rng(5).standard_t(3, (64, 128)).astype(np.float32))
    q = quantize_nvfp4(x)
    s_t = torch.tensor(x.abs().max().item() / 2688.0, dtype=torch.float32).double()
    assert q.tensor_scale == s_t.item()
    xb = x.double().reshape(64, 8, 16)
    s_b = (xb.abs().amax(-1) / (6 * s_t)).float().to(torch.float8_e4m3fn)
    assert np.array_equal(s_b.view(torch.uint8).numpy(), q.block_scales)
    v = (xb / (s_b.double() * s_t)[..., None]).clamp(-6, 6).numpy().astype(np.float32)
    codes = v.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(64, 128)
    assert np.array_equal(codes, q.elements)


def test_nvfp4_2d_tiles():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 70)).astype(np.float32)
    x[3, 5] = 50.0                                   # one outlier: its whole 16 x 16 tile shares the scale
    q = quantize_nvfp4(x, blocks="2d")
    assert q.block_scales.shape == (3, 5) and q.elements.shape == (48, 80)
    tile_amax = np.abs(np.pad(x, ((0, 8), (0, 10)))).reshape(3, 16, 5, 16).max(axis=(1, 3))
    expect = mx._E4M3.encode(tile_amax / (6.0 * q.tensor_scale), saturate=True)
    assert np.array_equal(q.block_scales, expect)
    assert q.block_scales[0, 0] == 0x7E                # the outlier's tile reaches 448
    e, s, t = q.to_torch()
    assert e.dtype == torch.float4_e2m1fn_x2 and s.dtype == torch.float8_e4m3fn and t.dtype == torch.float32
    assert q.dequantize().shape == (40, 70)


def test_nvfp4_errors():
    with pytest.raises(ValueError, match="'1d' or '2d'"):
        quantize_nvfp4(np.ones((16, 16), dtype=np.float32), blocks="3d")
    with pytest.raises(ValueError, match="two dimensions"):
        quantize_nvfp4(np.ones(16, dtype=np.float32), blocks="2d")
    with pytest.raises(ValueError, match="axis must be -1"):
        quantize_nvfp4(np.ones((16, 16), dtype=np.float32), axis=0, blocks="2d")
    with pytest.raises(TypeError):
        quantize_nvfp4(np.ones(16, dtype=np.int64))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

def test_clear_errors():
    x = np.ones((2, 32), dtype=np.float32)
    with pytest.raises(UnknownFormatError, match="fp8_e4m3, fp8_e5m2"):
        quantize_mx(x, "fp3")
    with pytest.raises(ValueError):                       # UnknownFormatError is a ValueError too
        quantize_mx(x, "nf4")
    for bad in (0, -32, 2.5, True, "32"):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            quantize_mx(x, "fp4_e2m1", block_size=bad)
    with pytest.raises(ValueError, match="out of range"):
        quantize_mx(x, "fp4_e2m1", axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        quantize_mx(x, "fp4_e2m1", axis="0")
    with pytest.raises(ValueError, match="0-d"):
        quantize_mx(np.float32(1.0), "fp4_e2m1")
    with pytest.raises(ValueError, match="scale_rounding"):
        quantize_mx(x, "fp4_e2m1", scale_rounding="ceil")
    for bad in (np.ones(4, dtype=np.int32), torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.bool),
                np.ones(4, dtype=np.complex64), ["a", "b"]):
        with pytest.raises(TypeError, match="floating-point"):
            quantize_mx(bad, "fp4_e2m1")


# --------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------

PROPERTIES = settings(max_examples=40, deadline=None, database=None)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
blocks32 = hnp.arrays(np.float32, (3, 32), elements=finite32)


@PROPERTIES
@given(x=blocks32, elem=st.sampled_from(ELEMS), mode=st.sampled_from(SCALE_ROUNDINGS))
def test_elements_within_half_an_ulp(x, elem, mode):
    t = element_type(elem)
    q = quantize_mx(x, elem, scale_rounding=mode)
    e = q.scales.astype(np.int64) - 127
    v = np.ldexp(x.astype(np.float64), -np.repeat(e, 32, axis=1).astype(np.int32))  # x * 2^-scale, exact
    p = q.element_values()
    inside = np.abs(v) <= t.max
    assert (np.abs(p - v)[inside] <= t.ulp(v)[inside] / 2).all()
    assert (p[~inside] == np.sign(v[~inside]) * t.max).all()   # saturated
    if mode == "rceil":
        assert inside.all()                                    # rceil never clips


@PROPERTIES
@given(a=finite32.map(abs), b=finite32.map(abs), elem=st.sampled_from(ELEMS), mode=st.sampled_from(SCALE_ROUNDINGS))
def test_scale_monotone_in_amax(a, b, elem, mode):
    lo, hi = sorted([a, b])
    assert scale_codes(f32(lo), elem, mode) <= scale_codes(f32(hi), elem, mode)


@PROPERTIES
@given(x=blocks32, elem=st.sampled_from(ELEMS), mode=st.sampled_from(SCALE_ROUNDINGS))
def test_quantization_is_idempotent(x, elem, mode):
    y = quantize_mx(x, elem, scale_rounding=mode).dequantize()
    # An MX value can exceed float32's range (element 256 × scale 2^120 = 2^128); quantize_mx reads
    # float32, so such a block is covered by test_mx_value_beyond_float32_range below instead.
    if np.isfinite(y).all() and np.abs(y).max(initial=0) > np.finfo(np.float32).max:
        return
    assert np.array_equal(quantize_mx(y, elem, scale_rounding=mode).dequantize(), y, equal_nan=True)


def test_mx_value_beyond_float32_range():
    # 3.2964854e38 / 2^120 = 248, a tie between E4M3 240 and 256 that goes to even 256: the block's
    # MX value is 2^128, representable in MX (float64 dequantize) but Inf once read as float32.
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = np.float32(3.2964854e38)
    q = quantize_mx(x, "fp8_e4m3", scale_rounding="rceil")
    assert q.scale_values()[0, 0] == 2.0**120 and q.dequantize()[0, 0] == 2.0**128
    again = quantize_mx(q.dequantize(), "fp8_e4m3", scale_rounding="rceil")
    assert np.isnan(again.dequantize()).all()  # documented: beyond float32 -> Inf -> NaN block


@PROPERTIES
@given(codes=hnp.arrays(np.uint8, (2, 32), elements=st.integers(0, 15)), e=st.integers(-120, 120))
def test_fp4_round_trip_of_representable_blocks(codes, e):
    codes[:, 0] = 0x7                                 # each block holds +6: floor gives back X = 2^e
    x = (mx._E2M1.decode(codes) * 2.0 ** e).astype(np.float32)
    q = quantize_mx(x, "fp4_e2m1")
    assert (q.scales == e + 127).all()
    zero = codes & 0x7 == 0                           # +0 and -0 are both zeros
    assert np.array_equal(np.where(zero, 0, q.elements), np.where(zero, 0, codes))
    assert np.array_equal(q.dequantize(), x.astype(np.float64))


@PROPERTIES
@given(x=hnp.arrays(np.float32, (2, 48), elements=finite32))
def test_nvfp4_elements_within_half_an_ulp(x):
    q = quantize_nvfp4(x)
    full = np.repeat(q.scale_values(), 16, axis=1)
    live = full > 0
    v = x.astype(np.float64)[live] / full[live]
    p = mx._E2M1.decode(q.elements)[live]
    inside = np.abs(v) <= 6
    ulp = element_type("fp4_e2m1").ulp(v)
    assert (np.abs(p - v)[inside] <= ulp[inside] / 2).all()
    assert (np.abs(p[~inside]) == 6).all()


# --------------------------------------------------------------------------
# Random Hadamard rotation
# --------------------------------------------------------------------------

def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("n", [1, 2, 16, 32, 128])
def test_hadamard_transform_is_the_sylvester_matrix(n):
    assert np.array_equal(mx.hadamard_transform(np.eye(n)) * math.sqrt(n), sylvester(n))


def test_random_hadamard_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 96, 6))
    y = mx.random_hadamard(x, size=32, axis=1, seed=7)
    signs = np.diag(mx.random_hadamard(np.eye(32), size=32, seed=7) @ sylvester(32).T) * math.sqrt(32) / 32
    assert set(np.round(signs).tolist()) <= {-1.0, 1.0}
    # Group by group it is x_g @ diag(signs) @ H / sqrt(32).
    rot = np.diag(np.round(signs)) @ sylvester(32) / math.sqrt(32)
    expect = np.einsum("agc,gh->ahc", x.reshape(4, 3, 32, 6).transpose(0, 2, 1, 3).reshape(4, 32, 18), rot)
    got = y.reshape(4, 3, 32, 6).transpose(0, 2, 1, 3).reshape(4, 32, 18)
    assert np.allclose(got, expect, rtol=0, atol=1e-12)
    assert np.allclose(mx.random_hadamard(y, 32, axis=1, seed=7, inverse=True), x, rtol=0, atol=1e-12)
    assert math.isclose(np.sum(y * y), np.sum(x * x), rel_tol=1e-12)
    # One outlier in a group becomes 32 values of equal magnitude.
    spike = np.zeros(32)
    spike[9] = 8.0
    assert np.allclose(np.abs(mx.random_hadamard(spike, 32)), 8.0 / math.sqrt(32), rtol=0, atol=1e-15)


def test_random_hadamard_errors():
    with pytest.raises(ValueError, match="power of two"):
        mx.random_hadamard(np.ones(48), size=24)
    with pytest.raises(ValueError, match="multiple"):
        mx.random_hadamard(np.ones(48), size=32)
    with pytest.raises(ValueError, match="power of two"):
        mx.hadamard_transform(np.ones(12))
