"""Tests of companion.training.quantizers: torch quantize-dequantize against the NumPy definitions.

Oracles: companion.scaling.quantize (FP32 scales), companion.mx.quantize_mx (E8M0 scales),
companion.mx.quantize_nvfp4 (NVFP4), companion.kernels.fp8_blockwise_reference (DeepSeek's FP8
blocks) and the formats module (scale-free rounding), compared bit for bit (rtol=0, atol=0; -0.0 is
not +0.0; NaN matches NaN). Stochastic rounding: adjacency, reproducibility and unbiasedness within
a Hoeffding bound.
"""
import math

import numpy as np
import pytest
import torch

from companion import mx, scaling
from companion.formats import get_format
from companion.kernels import fp8_blockwise_reference
from companion.training import BF16, IDENTITY, QuantSpec, quantize_dequantize

# --------------------------------------------------------------------------
# The oracles
# --------------------------------------------------------------------------


def reference(x, spec, axis=-1):
    """dequantize(quantize(x)) by the companion's NumPy definitions, float64."""
    x = x.detach().cpu()
    axis = axis % x.ndim
    if spec.scale == "none":
        return spec.element_format.round(x.double().numpy())
    if spec.scale == "e8m0":
        return mx.quantize_mx(x, spec.format, spec.block_size, axis).dequantize()
    if spec.scale == "e4m3":
        if spec.granularity == "block":
            return mx.quantize_nvfp4(x, axis=axis).dequantize()
        xt = x if axis == 1 else x.T  # quantize_nvfp4's 16 x 16 tiles lie over the last two axes
        out = mx.quantize_nvfp4(xt, axis=-1, blocks="2d").dequantize()
        return out if axis == 1 else out.T.copy()
    granularity = {
        "tensor": lambda: scaling.per_tensor(),
        "channel": lambda: scaling.per_block(x.shape[axis], axis),
        "block": lambda: scaling.per_block(spec.block_size, axis),
        # tile = (rows, cols) with cols along `axis`: per_tile's cols run along the last axis
        "tile": lambda: scaling.per_tile(*(spec.tile if axis == 1 else spec.tile[::-1])),
    }[spec.granularity]()
    return scaling.quantize(x, spec.format, granularity, pad=True).dequantize()


def as_dtype(values, dtype):
    """float64 NumPy values -> torch dtype, rounded once (to bf16 through the formats module)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(get_format("bf16").round(values)).to(dtype)
    return torch.from_numpy(np.asarray(values)).to(dtype)


def assert_same(got, want):
    """Bit for bit, except that any NaN matches any NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}[got.dtype]
    g, w = got[~nan].view(ints), want[~nan].view(ints)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} values differ, first: {got[~nan][bad[:3, 0]]} vs {want[~nan][bad[:3, 0]]}"


def spread(shape, seed=0, dtype=torch.float32):
    """Normal values whose rows (and columns) live in different binades, down to subnormals."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-30, 30, (shape[0],) + (1,) * (len(shape) - 1), generator=g)
    cols = torch.randint(-4, 5, shape[1:], generator=g)
    x = torch.randn(shape, generator=g) * torch.exp2((rows + cols).float())
    x.view(-1)[:: 7] = 0.0  # zeros of both signs and a tiny subnormal tail
    x.view(-1)[3:: 11] *= -0.0
    x.view(-1)[5:: 13] *= 2.0 ** -120
    return x.to(dtype)


SPECS = [
    QuantSpec.per_tensor("fp8_e4m3"),
    QuantSpec.per_tensor("fp8_e5m2"),
    QuantSpec.per_tensor("int8"),
    QuantSpec.per_channel("int4"),
    QuantSpec.per_channel("fp8_e4m3"),
    QuantSpec.per_block("fp8_e4m3", 128),
    QuantSpec.per_block("int8", 32),
    QuantSpec.per_block("fp4_e2m1", 16),
    QuantSpec.per_tile("fp8_e4m3", 128, 128),
    QuantSpec.per_tile("int8", 4, 32),
    QuantSpec.mx("fp8_e4m3"),
    QuantSpec.mx("fp8_e5m2"),
    QuantSpec.mx("fp6_e2m3"),
    QuantSpec.mx("fp4_e2m1"),
    QuantSpec.mx("int8"),
    QuantSpec.mx("fp4_e2m1", block_size=16),
    QuantSpec.nvfp4(),
    QuantSpec.nvfp4(tile=True),
    BF16,
    QuantSpec.rounded("fp8_e4m3"),
]


# --------------------------------------------------------------------------
# Equal to the definitions
# --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(37, 300), (130, 70)])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_equals_the_reference_on_ragged_shapes(spec, shape, axis):
    x = spread(shape, seed=shape[0] + axis)
    assert_same(quantize_dequantize(x, spec, axis), as_dtype(reference(x, spec, axis), torch.float32))


@pytest.mark.parametrize("spec", [QuantSpec.per_block("fp8_e4m3", 32), QuantSpec.mx("fp4_e2m1"), QuantSpec.nvfp4()],
                         ids=str)
def test_three_dimensional_input_blocks_along_the_middle_axis(spec):
    x = spread((5, 70, 6), seed=3)
    assert_same(quantize_dequantize(x, spec, axis=1), as_dtype(reference(x, spec, 1), torch.float32))


@pytest.mark.parametrize("spec", [QuantSpec.per_tensor("fp8_e4m3"), QuantSpec.per_block("int4", 16),
                                  QuantSpec.mx("fp8_e4m3"), QuantSpec.nvfp4(), BF16], ids=str)
def test_bf16_input_and_output_dtypes(spec):
    x = spread((40, 96), seed=5, dtype=torch.bfloat16)
    want = reference(x, spec, -1)
    assert_same(quantize_dequantize(x, spec), as_dtype(want, torch.bfloat16))  # one rounding to bf16
    assert_same(quantize_dequantize(x, spec, out_dtype=torch.float32), as_dtype(want, torch.float32))


def test_float64_input_follows_each_definition():
    x = spread((16, 64), seed=9, dtype=torch.float64) * (1 + 2.0 ** -40)  # not float32 values
    for spec in (QuantSpec.per_tensor("fp8_e4m3"), QuantSpec.mx("fp8_e4m3"), QuantSpec.nvfp4(), BF16):
        assert_same(quantize_dequantize(x, spec), torch.from_numpy(reference(x, spec)))


@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
def test_fp8_blockwise_kernel_definition(tile):
    x = spread((200, 300), seed=11)
    codes, scales = fp8_blockwise_reference(x, tile=tile)
    want = codes.float() * scales.repeat_interleave(tile[0], 0).repeat_interleave(128, 1)[:200, :300]
    spec = QuantSpec.per_block("fp8_e4m3", 128) if tile == (1, 128) else QuantSpec.per_tile("fp8_e4m3", *tile)
    assert_same(quantize_dequantize(x, spec), want)


def test_exact_quotient_where_the_float32_division_rounds_onto_a_tie():
    # amax = 448 (1 + 2^-23) gives s = 1 + 2^-23. x = 1.1875 + 2^-23 has x / s just below the E4M3
    # tie 1.1875 (between 1.125 and 1.25); in float32 the quotient rounds onto the tie, which goes to
    # the even 1.25. Here, as in companion.scaling, the exact quotient rounds down to 1.125.
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 448 * (1 + 2.0 ** -23), 1.1875 + 2.0 ** -23
    s = 1 + 2.0 ** -23
    got = quantize_dequantize(x, QuantSpec.per_block("fp8_e4m3", 128))
    assert got[0, 1].item() == np.float32(1.125 * s)
    codes, scales = fp8_blockwise_reference(x)
    assert (codes.float() * scales)[0, 1].item() == np.float32(1.25 * s)


# --------------------------------------------------------------------------
# Hand-made rounding tables: ties, carries, saturation, signed zeros
# --------------------------------------------------------------------------

def test_e4m3_per_tensor_table():
    # amax 448 makes the scale exactly 1, so the values are rounded as they are.
    # ties to even: 1.0625 (1 | 1.125), 1.1875 (1.125 | 1.25), 2^-10 (0 | 2^-9, subnormal), 17, 19, 232;
    # 1.9375 carries into the next binade; -2^-11 underflows to -0
    x = torch.tensor([448.0, 1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 17.0, 19.0, 232.0, 1.9375, -2.0 ** -11, -0.0])
    want = torch.tensor([448.0, 1.0, 1.25, 0.0, 2.0 ** -8, 16.0, 20.0, 224.0, 2.0, -0.0, -0.0])
    got = quantize_dequantize(x, QuantSpec.per_tensor("fp8_e4m3"))
    assert_same(got, want)
    assert_same(got, as_dtype(reference(x, QuantSpec.per_tensor("fp8_e4m3")), torch.float32))


def test_int8_per_tensor_table():
    x = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, -0.0, 126.5])
    want = torch.tensor([127.0, 2.0, 4.0, -2.0, 0.0, 0.0, 126.0])  # integers have no -0
    assert_same(quantize_dequantize(x, QuantSpec.per_tensor("int8")), want)


def test_mxfp4_table():
    # amax 4: scale 2^(2 - 2) = 1. 7 saturates to 6; 5 is the tie between 4 and 6.
    x = torch.tensor([[4.0, 0.25, 0.75, 2.5, 3.5, 5.0, -7.0, -0.1]])
    want = torch.tensor([[4.0, 0.0, 1.0, 2.0, 4.0, 4.0, -6.0, -0.0]])
    assert_same(quantize_dequantize(x, QuantSpec.mx("fp4_e2m1", block_size=8)), want)
    # The floor rule clips: amax 7.5 keeps the scale 1, and 7.5 saturates to 6.
    assert quantize_dequantize(torch.tensor([7.5, 1.0]), QuantSpec.mx("fp4_e2m1", 2)).tolist() == [6.0, 1.0]


def test_all_zero_and_tiny_blocks():
    x = torch.zeros(4, 64)
    x[1, :] = -0.0
    x[2, 3] = 2.0 ** -149  # the smallest float32 subnormal
    x[3, 5] = -3 * 2.0 ** -140
    for spec in SPECS:
        if spec.granularity == "tile" and spec.tile[0] > 4 and spec.scale != "e4m3":
            continue
        assert_same(quantize_dequantize(x, spec), as_dtype(reference(x, spec), torch.float32))


@pytest.mark.parametrize("spec", [QuantSpec.per_tensor("fp8_e4m3"), QuantSpec.per_block("fp8_e5m2", 16),
                                  QuantSpec.mx("fp8_e4m3"), QuantSpec.mx("fp4_e2m1"), QuantSpec.nvfp4()], ids=str)
def test_inf_and_nan_as_the_definitions_treat_them(spec):
    x = spread((8, 64), seed=2)
    x[1, 3], x[2, 40], x[5, 17] = float("inf"), float("-inf"), float("nan")
    got = quantize_dequantize(x, spec)
    assert_same(got, as_dtype(reference(x, spec), torch.float32))
    if spec.scale == "fp32":  # Inf saturates to the largest value of its block, NaN stays NaN
        first, third = (slice(0, 16), slice(32, 48)) if spec.block_size else (slice(None), slice(None))
        assert got[1, 3] == got[1, first].abs().max() and got[2, 40] == -got[2, third].abs().max()
        assert torch.isnan(got[5, 17]) and torch.isnan(got).sum() == 1
    else:  # the block holding Inf or NaN dequantizes to NaN
        assert torch.isnan(got[1, 3]) and torch.isnan(got[1]).sum() == spec.block_size


@pytest.mark.parametrize("spec", [QuantSpec.per_tensor("int8"), QuantSpec.per_block("fp4_e2m1", 16)], ids=str)
def test_nan_is_refused_by_formats_without_nan(spec):
    x = torch.ones(4, 16)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_dequantize(x, spec)


# --------------------------------------------------------------------------
# The API: identity, dtypes, axes, bad input
# --------------------------------------------------------------------------

def test_identity_and_trivial_inputs():
    x = torch.randn(3, 5)
    assert quantize_dequantize(x, IDENTITY) is x
    assert quantize_dequantize(x, QuantSpec.identity(), out_dtype=torch.float64).dtype == torch.float64
    empty = torch.empty(0, 32)
    for spec in (QuantSpec.per_tensor("fp8_e4m3"), QuantSpec.mx("fp8_e4m3"), QuantSpec.nvfp4(), BF16):
        out = quantize_dequantize(empty, spec)
        assert out.shape == (0, 32) and out.dtype == torch.float32
    scalar = torch.tensor(3.3)
    assert quantize_dequantize(scalar, QuantSpec.per_tensor("fp8_e4m3")).item() == pytest.approx(3.3, rel=1e-6)
    x = spread((6, 40), seed=4).t()  # non-contiguous
    spec = QuantSpec.mx("fp8_e4m3")
    assert_same(quantize_dequantize(x, spec), as_dtype(reference(x, spec), torch.float32))


def test_bad_specs_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown format"):
        QuantSpec("fp7")
    with pytest.raises(ValueError, match="signed"):
        QuantSpec.per_tensor("uint4")
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec("fp8_e4m3", "row")
    with pytest.raises(ValueError, match="rounding"):
        QuantSpec.per_tensor("fp8_e4m3", rounding="up")
    with pytest.raises(ValueError, match="block_size"):
        QuantSpec("fp8_e4m3", "block")
    with pytest.raises(ValueError, match="positive"):
        QuantSpec.per_block("fp8_e4m3", 0)
    with pytest.raises(ValueError, match="MX"):
        QuantSpec.mx("int4")
    with pytest.raises(ValueError, match="NVFP4"):
        QuantSpec.per_block("fp8_e4m3", 16, scale="e4m3")
    with pytest.raises(ValueError, match="identity"):
        QuantSpec(None, rounding="stochastic")
    with pytest.raises(ValueError, match="scale format"):
        QuantSpec.per_tensor("fp8_e4m3").__class__("fp8_e4m3", scale="e5m2")


def test_bad_inputs_are_refused_clearly():
    spec = QuantSpec.mx("fp8_e4m3")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_dequantize(torch.arange(32), spec)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_dequantize(np.ones(32), spec)
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize_dequantize(torch.ones(32), "mxfp8")
    with pytest.raises(ValueError, match="out of range"):
        quantize_dequantize(torch.ones(4, 32), spec, axis=2)
    with pytest.raises(TypeError, match="axis"):
        quantize_dequantize(torch.ones(4, 32), spec, axis=1.0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_dequantize(torch.ones(2, 4, 32), QuantSpec.per_tile("fp8_e4m3"), axis=-1)


def test_spec_reads_well():
    assert str(QuantSpec.mx("fp4_e2m1")) == "fp4_e2m1, blocks of 32, e8m0 (MX) scales, nearest_even"
    assert str(IDENTITY) == "identity" and str(BF16) == "bf16 (nearest_even)"
    assert QuantSpec.nvfp4(rounding="stochastic") == QuantSpec.nvfp4().with_rounding("stochastic")


# --------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------

def reference_scales(x, spec, axis=-1):
    """The scale applied to each element (float64, x's shape), from the definitions."""
    xn = x.double().numpy()
    if spec.scale == "fp32":
        qt = scaling.quantize(xn, spec.format, scaling.per_block(spec.block_size, axis) if spec.block_size
                              else scaling.per_tensor(), pad=True)
        return qt.layout.expand(qt.scales)
    if spec.scale == "e8m0":
        qt = mx.quantize_mx(xn, spec.format, spec.block_size, axis)
        per_block = qt.scale_values() * qt.element_type.unit
    else:
        qt = mx.quantize_nvfp4(xn, axis=axis)
        per_block = qt.scale_values()
    return np.repeat(per_block, spec.block_size, axis=axis)[tuple(slice(0, n) for n in x.shape)]


def neighbours(x, spec, axis=-1):
    """The grid values just below and above each element (equal when it is on the grid)."""
    s = reference_scales(x, spec, axis)
    fmt = spec.element_format
    grid = fmt.values()
    if spec.scale == "e8m0" and spec.format == "int8":
        grid = grid[1:]  # MXINT8 is symmetric: -128 is never produced
    y = np.clip(x.double().numpy() / s, grid[0], grid[-1])
    lo = grid[np.searchsorted(grid, y, side="right") - 1]
    hi = grid[np.searchsorted(grid, y, side="left")]
    return torch.from_numpy(lo * s), torch.from_numpy(hi * s)


def exact_scale_input(shape, amax, seed):
    """Uniform values in (-amax, amax) with +-amax at every (i + j) % 16 == 0: each block of 16 or 32
    along either axis reaches amax, so the scales are exact and nothing saturates."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * amax
    i, j = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    corner = (i + j) % 16 == 0
    x[corner] = amax * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)[corner].double()
    return x.float()


# amax chosen so that the scale is exact: 448 * 2^-9 (FP32, E4M3), 1.0 (MX), 2688 * 2^-12 (NVFP4)
SR_CASES = [
    (QuantSpec.per_tensor("fp8_e4m3", rounding="stochastic"), 448 * 2.0 ** -9),
    (QuantSpec.per_block("int8", 32, rounding="stochastic"), 127 * 2.0 ** -7),
    (QuantSpec.mx("fp8_e4m3", rounding="stochastic"), 1.0),
    (QuantSpec.mx("fp4_e2m1", rounding="stochastic"), 1.0),
    (QuantSpec.mx("int8", rounding="stochastic"), 1.0),
    (QuantSpec.nvfp4(rounding="stochastic"), 2688 * 2.0 ** -12),
]


@pytest.mark.parametrize("spec, amax", SR_CASES, ids=lambda v: str(v) if isinstance(v, QuantSpec) else "")
@pytest.mark.parametrize("axis", [0, 1])
def test_stochastic_rounding_is_adjacent_reproducible_and_unbiased(spec, amax, axis):
    x = exact_scale_input((32, 64), amax, seed=axis)
    lo, hi = (t.float() for t in neighbours(x, spec, axis))
    draws = 300
    g = torch.Generator().manual_seed(1234)
    samples = torch.stack([quantize_dequantize(x, spec, axis, generator=g) for _ in range(draws)])
    # adjacency: every draw is one of the two neighbours, and a value on the grid stays put
    assert ((samples == lo) | (samples == hi)).all()
    assert (samples[:, lo == hi] == lo[lo == hi]).all()
    # both neighbours occur
    between = lo != hi
    assert (samples[:, between] == hi[between]).any() and (samples[:, between] == lo[between]).any()
    # unbiased: Hoeffding, P(|mean - x| >= t) <= 2 exp(-2 n t^2 / gap^2) per element; with the union
    # bound over all elements, the chance that this fails for an unbiased rounding is below 1e-6.
    t = (hi - lo).double() * math.sqrt(math.log(2 * x.numel() / 1e-6) / (2 * draws))
    error = (samples.double().mean(0) - x.double()).abs()
    assert (error <= t).all()
    # reproducible with the same seed, different with another
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (7, 7, 8))
    a, b, c = (quantize_dequantize(x, spec, axis, generator=gen) for gen in (g1, g2, g3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the scales are those of nearest rounding: the nearest result is one of the neighbours too
    rtn = quantize_dequantize(x, spec.with_rounding("nearest_even"), axis)
    assert ((rtn == lo) | (rtn == hi)).all()


def test_nearest_is_biased_where_stochastic_is_not():
    # Every value sits 0.3 of the way from 2 to 3 (FP4, scale 1): nearest always gives 2.
    x = torch.full((64, 32), 2.3)
    x[:, 0] = 4.0  # amax 4: MX scale 1
    rtn = quantize_dequantize(x, QuantSpec.mx("fp4_e2m1"))[:, 1:]
    g = torch.Generator().manual_seed(0)
    sr = torch.stack([quantize_dequantize(x, QuantSpec.mx("fp4_e2m1", rounding="stochastic"), generator=g)[:, 1:]
                      for _ in range(50)])
    assert (rtn == 2.0).all()                                # bias -0.3 on every element
    # 50 * 64 * 31 Bernoulli(0.3) draws: the mean is 2.3 within 0.02 (Hoeffding: P < 1e-10)
    assert abs(sr.double().mean().item() - 2.3) < 0.02


# --------------------------------------------------------------------------
# On the GPU: the same bits as on the CPU
# --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_cuda_equals_cpu(spec):
    x = spread((130, 300), seed=21)
    for axis in (0, 1):
        assert_same(quantize_dequantize(x.cuda(), spec, axis).cpu(), quantize_dequantize(x, spec, axis))


@pytest.mark.gpu
def test_cuda_stochastic_rounding_is_reproducible_with_a_cuda_generator():
    spec = QuantSpec.nvfp4(rounding="stochastic")
    x = exact_scale_input((64, 64), 2688 * 2.0 ** -12, seed=0).cuda()
    a, b = (quantize_dequantize(x, spec, generator=torch.Generator("cuda").manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    lo, hi = (t.float().cuda() for t in neighbours(x.cpu(), spec))
    assert ((a == lo) | (a == hi)).all()
