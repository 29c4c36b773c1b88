"""The quantization kernels equal their references bit for bit: FP8 blockwise, MXFP8, MXFP4, NVFP4.

Under the interpreter (CI, CPU) the shapes stay tiny; larger shapes run compiled (marker ``gpu``).
References: ``fp8_blockwise_reference`` and ``nvfp4_reference`` state the kernels' float32 arithmetic
and are checked against companion.scaling / companion.mx; the MX kernels equal companion.mx directly.
"""
import numpy as np
import pytest
import torch

import triton
import triton.language as tl

from companion import mx, runtime, scaling
from companion.formats import get_format
from companion.kernels import float_codes, mx_quant
from companion.kernels import (
    dequantize_fp8_blockwise, dequantize_mx, dequantize_nvfp4, fp8_blockwise_reference, nvfp4_reference,
    quantize_fp8_blockwise, quantize_mx_rows, quantize_mx_rows_and_columns, quantize_nvfp4_kernel,
)

DEVICE = runtime.kernel_device()
SHAPES = [(1, 1), (3, 130), (130, 5), (2, 257)]  # 1x1, ragged tails, tall/skinny
NAN, INF = float("nan"), float("inf")


def sample(shape, seed, dtype=torch.float32, specials=True):
    """Values over a wide range of magnitudes, with NaN/Inf/-0/subnormals/an all-zero row mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    if specials and x.shape[0] > 2 and x.shape[1] > 6:
        x[0, :6] = torch.tensor([NAN, INF, -0.0, 1e-40, -INF, -1e-45])  # one block with NaN/Inf
        x[1] = 0.0  # all-zero blocks
        x[2] = torch.randn(x.shape[1], generator=g) * 1e-39  # subnormal blocks
    return x.to(dtype)


def bits(t):
    t = t.detach().cpu()
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_bits(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        gb, wb = bits(g), bits(w)
        bad = (gb != wb).nonzero()
        assert bad.numel() == 0, f"{bad.shape[0]} codes differ, first at {bad[0].tolist()}: {gb[tuple(bad[0])]} vs {wb[tuple(bad[0])]}"


def assert_same_values(got, want):
    """Equal floats, NaN where the other has NaN (NaN payloads are not compared)."""
    got, want = got.detach().cpu().float(), want.detach().cpu().float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


# ---------------------------------------------------------------- rounding by hand (carries, ties, saturation)

def test_e4m3_rounding_table_by_hand():
    # With 448 in the row the scale is exactly 1, so the codes are E4M3(x) itself.
    table = [  # value, expected code
        (448.0, 0x7E), (INF, 0x7E), (-INF, 0xFE),  # Inf saturates (and is left out of the amax)
        (1.9375, 0x40),  # tie between 1.875 (odd) and 2: carries into the exponent
        (127.96, 0x70),  # the case the triton 3.9 interpreter's cast gets wrong: 128, not 64
        (0.0150146484375, 0x08),  # 7.6875 * 2^-9: the largest subnormal carries into the smallest normal
        (2.0 ** -10, 0x00), (3 * 2.0 ** -10, 0x02), (-2.0 ** -10, 0x80),  # subnormal ties to even
        (-0.0, 0x80), (NAN, 0x7F), (1.0625, 0x38), (1.1875, 0x3A), (-240.0, 0xF7),
    ]
    x = torch.tensor([[v for v, _ in table]], dtype=torch.float32)
    codes, scales = quantize_fp8_blockwise(x.to(DEVICE))
    assert scales.item() == 1.0
    assert bits(codes)[0].tolist() == [c for _, c in table]
    assert_same_bits((codes,), fp8_blockwise_reference(x)[:1])
    back = dequantize_fp8_blockwise(codes, scales, out_dtype=torch.float32).cpu()
    assert torch.signbit(back[0, [c == 0x80 for _, c in table]]).all()  # -0 comes back as -0


def test_e2m1_rounding_table_by_hand():
    # amax 4 gives the MXFP4 floor scale 2^(2 - 2) = 1, so the codes are E2M1(x) itself: every tie, the
    # carries into the next binade, saturation, and signed zeros.
    table = [  # value, expected code
        (4.0, 0x6), (0.25, 0x0), (0.2500001, 0x1), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4),
        (3.5, 0x6), (5.0, 0x6), (5.0000005, 0x7), (6.0, 0x7), (7.9, 0x7), (-0.0, 0x8), (-0.1, 0x8),
        (1e-40, 0x0), (-1.5, 0xB), (-3.0, 0xD), (0.7499999, 0x1), (2.9999998, 0x5), (1.0, 0x2),
    ]
    x = torch.tensor([[v for v, _ in table] + [0.0] * (32 - len(table))], dtype=torch.float32)
    codes, scales = quantize_mx_rows(x.to(DEVICE), "fp4_e2m1")
    assert bits(scales).item() == 127
    got = mx.unpack_fp4(bits(codes).numpy())[0, : len(table)]
    assert got.tolist() == [c for _, c in table]


# ---------------------------------------------------------------- FP8 blockwise (DeepSeek-V3)

@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_blockwise_matches_reference(tile, pow2, shape):
    x = sample(shape, seed=sum(shape))
    got = quantize_fp8_blockwise(x.to(DEVICE), tile, power_of_two_scales=pow2)
    assert_same_bits(got, fp8_blockwise_reference(x, tile, pow2))
    if pow2:
        m, _ = np.frexp(got[1].cpu().numpy())
        assert (m == 0.5).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_blockwise_reads_half_precision(dtype):
    x = sample((5, 200), seed=3, dtype=dtype)
    assert_same_bits(quantize_fp8_blockwise(x.to(DEVICE)), fp8_blockwise_reference(x))


@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
def test_fp8_reference_equals_companion_scaling(tile):
    """The float32 definition gives the bits of companion.scaling's float64 one (fp32 scales)."""
    for seed, shape in enumerate([(130, 300), (7, 1000), (257, 129)]):
        x = sample(shape, seed)
        codes, scales = fp8_blockwise_reference(x, tile)
        qt = scaling.quantize(x, "fp8_e4m3", scaling.per_tile(*tile), pad=True)
        assert np.array_equal(bits(codes).numpy(), qt.codes.astype(np.uint8))
        assert np.array_equal(scales.numpy().astype(np.float64), qt.scales)


def test_fp8_signed_zeros_subnormals_huge_values_and_quotients_at_midpoints():
    """-0 and float32 subnormals inside ordinary blocks, values near float32's largest, a block of tiny
    numbers, and quotients that land on E4M3 midpoints keep the reference's bits."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(8, 512, generator=g) * torch.exp2(torch.randint(-30, 30, (8, 4), generator=g).float()).repeat_interleave(128, 1)
    x[0, :5] = torch.tensor([-0.0, 0.0, -1e-42, 1e-45, -3e-39])   # signed zeros and subnormals beside normal numbers
    x[1, :128] = 3.0e38 * torch.rand(128, generator=g)             # near float32's largest
    x[5, 384:512] = 1e-30 * torch.randn(128, generator=g)          # a tiny block
    for tile in [(1, 128), (128, 128)]:
        for pow2 in (False, True):
            got = quantize_fp8_blockwise(x.to(DEVICE), tile, power_of_two_scales=pow2)
            assert_same_bits(got, fp8_blockwise_reference(x, tile, pow2))
    assert bits(quantize_fp8_blockwise(x.to(DEVICE))[0])[0, 0] == 0x80  # -0 stays -0

    # Quotients that land on or next to E4M3 midpoints, with scales that are not powers of two: here a
    # quotient one float32 ulp off changes the code, as multiplying by 1/s instead of dividing would.
    e4m3 = get_format("fp8_e4m3")
    values = np.unique(np.abs(e4m3.values()[np.isfinite(e4m3.values())]))
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(4)
    amax = (np.float32(448) * (1 + rng.random(64))).astype(np.float32)  # one block per row
    s = amax / np.float32(448)
    y = (rng.choice(mids[mids > 2**-6], (64, 128)).astype(np.float32) * s[:, None]).astype(np.float32)
    y[:, 0] = amax
    uncorrected = e4m3.encode(y * (np.float32(1) / s)[:, None], saturate=True)
    assert (uncorrected != e4m3.encode(y / s[:, None], saturate=True)).sum() > 500  # the case has teeth
    y = torch.from_numpy(y)
    assert_same_bits(quantize_fp8_blockwise(y.to(DEVICE)), fp8_blockwise_reference(y))


def test_fp8_blockwise_non_contiguous_and_dequantize():
    base = sample((260, 9), seed=11)
    x = base.t()  # (9, 260), strides (1, 9)
    assert_same_bits(quantize_fp8_blockwise(x.to(DEVICE).t().contiguous().t()), fp8_blockwise_reference(x))
    y = sample((6, 400), seed=12)[:, ::3]
    codes, scales = quantize_fp8_blockwise(y.to(DEVICE), (128, 128))
    assert_same_bits((codes, scales), fp8_blockwise_reference(y, (128, 128)))
    want = scaling.quantize(y, "fp8_e4m3", scaling.per_tile(128, 128), pad=True).dequantize()
    want = torch.from_numpy(want).float()
    assert_same_values(dequantize_fp8_blockwise(codes, scales, (128, 128), torch.float32), want)
    assert_same_values(dequantize_fp8_blockwise(codes, scales, (128, 128)), want.bfloat16())


# ---------------------------------------------------------------- MX

@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
@pytest.mark.parametrize("scale_rounding", ["floor", "rceil"])
@pytest.mark.parametrize("shape", SHAPES)
def test_mx_rows_match_companion_mx(elem, scale_rounding, shape):
    x = sample(shape, seed=7 + sum(shape))
    got = quantize_mx_rows(x.to(DEVICE), elem, scale_rounding)
    ref = mx.quantize_mx(x, elem, axis=-1, scale_rounding=scale_rounding)
    if elem == "fp4_e2m1":
        want = (torch.from_numpy(mx.pack_fp4(ref.elements)), torch.from_numpy(ref.scales))
    else:
        want = ref.to_torch()
    assert_same_bits(got, want)
    deq = dequantize_mx(*got, shape, out_dtype=torch.float32)
    assert_same_values(deq, torch.from_numpy(ref.dequantize()).float())


@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("scale_rounding", ["floor", "rceil"])
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (100, 3)])
def test_mx_rows_and_columns_at_once(elem, scale_rounding, shape):
    x = sample(shape, seed=100 + sum(shape), dtype=torch.bfloat16)
    got = quantize_mx_rows_and_columns(x.to(DEVICE), elem, scale_rounding)
    rows = mx.quantize_mx(x, elem, axis=-1, scale_rounding=scale_rounding).to_torch()
    cols = mx.quantize_mx(x, elem, axis=0, scale_rounding=scale_rounding)
    assert_same_bits(got, rows + cols.to_torch())
    deq = dequantize_mx(got[2], got[3], shape, axis=0, out_dtype=torch.bfloat16)
    assert_same_values(deq, torch.from_numpy(cols.dequantize()).float().bfloat16())


@pytest.mark.parametrize("walk", [(3, 2, False), (0, 1, True), (2, 3, True)])  # (per SM, stages, column-major)
def test_tile_walk_does_not_change_the_bits(monkeypatch, walk):
    # The launchers may start one program per tile or a few per SM that walk the tiles in a strided
    # loop (tl.range, pipelined with stages >= 2), numbering the tiles along rows or down columns; every
    # walk covers each tile once, so the bits are those of the reference.
    from companion.kernels import fp8_blockwise
    x = sample((300, 700), seed=77, dtype=torch.bfloat16)
    monkeypatch.setattr(fp8_blockwise, "ROW_BLOCK_CONFIG", (2, 1024, 2) + walk)
    monkeypatch.setattr(fp8_blockwise, "TILE_CONFIG", (128, 128, 16) + walk)
    monkeypatch.setitem(mx_quant.ROWS_CONFIG, "fp8", (8, 512, 4) + walk)
    monkeypatch.setattr(mx_quant, "ROWS_AND_COLUMNS_CONFIG", (32, 128, 2) + walk)
    for tile in [(1, 128), (128, 128)]:
        assert_same_bits(quantize_fp8_blockwise(x.to(DEVICE), tile), fp8_blockwise_reference(x, tile))
    rows = mx.quantize_mx(x, "fp8_e4m3", axis=-1).to_torch()
    assert_same_bits(quantize_mx_rows(x.to(DEVICE), "fp8_e4m3"), rows)
    cols = mx.quantize_mx(x, "fp8_e4m3", axis=0).to_torch()
    assert_same_bits(quantize_mx_rows_and_columns(x.to(DEVICE), "fp8_e4m3"), rows + cols)


def test_mx_special_blocks():
    x = torch.ones(4, 64)
    x[0, 3], x[1, 40], x[2] = NAN, -INF, 0.0
    x[3, :32] = 2.0 ** -140  # below E8M0's range: scale 2^-127, codes round to zero
    codes, scales = quantize_mx_rows(x.to(DEVICE))
    s = bits(scales)
    assert s[0, 0] == 0xFF and s[1, 1] == 0xFF and (s[2] == 0).all() and s[3, 0] == 0
    assert (bits(codes)[0, :32] == 0).all() and (bits(codes)[3, :32] == 0).all()
    assert_same_bits((codes, scales), mx.quantize_mx(x, "fp8_e4m3").to_torch())


def test_mx_non_contiguous():
    x = sample((70, 40), seed=5).t()  # (40, 70), column-major
    assert_same_bits(quantize_mx_rows(x.to(DEVICE), "fp4_e2m1"),
                     (torch.from_numpy(mx.pack_fp4(mx.quantize_mx(x, "fp4_e2m1").elements)),
                      torch.from_numpy(mx.quantize_mx(x, "fp4_e2m1").scales)))


def _mxfp4_reference(x, scale_rounding="floor"):
    ref = mx.quantize_mx(x, "fp4_e2m1", scale_rounding=scale_rounding)
    return torch.from_numpy(mx.pack_fp4(ref.elements)), torch.from_numpy(ref.scales)


@pytest.mark.parametrize("scale_rounding", ["floor", "rceil"])
def test_mxfp4_from_bf16_pairs_every_bf16_value(scale_rounding):
    # Every bf16 bit pattern once (NaN and Inf blocks included), in blocks of neighbouring patterns
    # (every exponent as the block maximum, most codes near the top) and shuffled (wide blocks, ties
    # and values rounding to zero), through the kernel that rounds two elements per instruction.
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    shuffled = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(0))]
    for x in (every.reshape(64, 1024), shuffled.reshape(64, 1024)):
        assert mx_quant._as_bf16_pairs(x) is not None
        assert_same_bits(quantize_mx_rows(x.to(DEVICE), "fp4_e2m1", scale_rounding),
                         _mxfp4_reference(x, scale_rounding))


def test_mxfp4_from_bf16_ragged_strided_and_odd():
    # Pairs where the view exists (even K, even strides and offset), the element path where it does not.
    base = sample((37, 200), seed=12, dtype=torch.bfloat16)
    cases = {"ragged tail": (base[:, :34], True), "strided rows": (base[:, 2:132], True),
             "odd K": (base[:, :35], False), "odd offset": (base[:, 1:35], False), "column-major": (base[:, :40].t(), False),
             "1 x 2": (base[:1, :2], True)}
    for name, (x, paired) in cases.items():
        assert (mx_quant._as_bf16_pairs(x) is not None) == paired, name
        assert_same_bits(quantize_mx_rows(x.to(DEVICE), "fp4_e2m1"), _mxfp4_reference(x))


# ---------------------------------------------------------------- NVFP4

@pytest.mark.parametrize("shape", SHAPES + [(40, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_matches_reference(shape, dtype):
    x = sample(shape, seed=50 + sum(shape), dtype=dtype)
    got = quantize_nvfp4_kernel(x.to(DEVICE))
    want = nvfp4_reference(x)
    assert_same_bits(got[:2], want[:2])
    assert bits(got[2]) == bits(want[2])
    ref = mx.quantize_nvfp4(x)
    expected = torch.from_numpy(mx.pack_fp4(ref.elements)), torch.from_numpy(ref.block_scales)
    if dtype == torch.float32:  # full-precision inputs: the float32 and float64 definitions coincide
        assert_same_bits(want[:2], expected)
        assert_same_values(dequantize_nvfp4(*got, shape, torch.float32), torch.from_numpy(ref.dequantize()).float())
    assert want[2].item() == ref.tensor_scale


@triton.jit
def _divide_kernel(x_ptr, den_ptr, out_ptr, BLOCK: tl.constexpr, PTX: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offsets = rows[:, None, None] * 16 + tl.arange(0, 16)[None, None, :]  # (BLOCK, 1, 16): one block each
    den = tl.load(den_ptr + rows)[:, None, None]
    tl.store(out_ptr + offsets, float_codes.divide_by_scale(tl.load(x_ptr + offsets), den, PTX))


# Compiled, both forms of the zero's sign run (the kernels use the PTX one); the interpreter runs only
# the other, as PTX needs a GPU.
@pytest.mark.parametrize("ptx", [False] + ([True] if not runtime.INTERPRET else []))
def test_division_by_a_block_scale_is_correctly_rounded(ptx):
    # The NVFP4 kernel divides by a block's scale with one reciprocal per block and a Markstein
    # correction per element; it must equal IEEE division bit for bit for every quotient that decides a
    # code (2^-11 up to 2^98), on random significands and on the awkward ones: divisors just above 1 and
    # just below 2 (their reciprocals round the most), dividends just below a power of two, NVFP4's own
    # scales (an E4M3 value times amax / 2688) with bf16 dividends, and divisors from the smallest
    # subnormal to the largest float32.
    g = torch.Generator().manual_seed(21)
    n = 1 << 12  # blocks of 16

    def significands(size, lo=1.0, hi=2.0):
        return lo + (hi - lo) * torch.rand(size, generator=g, dtype=torch.float64)

    def exponents(size, span):
        size = size if isinstance(size, tuple) else (size,)
        return torch.exp2(torch.randint(-span, span + 1, size, generator=g).double())

    ulp = 2.0 ** -23
    den = torch.cat([significands(n), 1 + ulp * torch.randint(1, 64, (n,), generator=g),
                     2 - ulp * torch.randint(1, 64, (n,), generator=g)]) * exponents(3 * n, 30)
    den = den[:, None]
    x = torch.cat([significands((n, 16)), 2 - ulp * torch.randint(1, 64, (n, 16), generator=g),
                   significands((n, 16))]) * exponents((3 * n, 16), 60)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.5, -x, x)
    e4m3 = (torch.rand(n, generator=g) * 448).to(torch.float8_e4m3fn).float().clamp(min=2.0 ** -9)
    nv_den = e4m3 * (torch.rand(n, generator=g) * 8).bfloat16().float().clamp(min=0.01) / 2688
    nv_x = torch.randn(n, 16, generator=g).bfloat16().float() * 4
    # Divisors over the whole float32 range, subnormals and the binades at both ends included, with
    # quotients from 2^-11 up (dividends kept finite); then special and tiny dividends.
    ends = torch.cat([torch.tensor([2.0 ** -149, 3 * 2.0 ** -149, 2.0 ** -127, 1.9 * 2.0 ** -127, 2.0 ** -126,
                                    1.5 * 2.0 ** 126, 2.0 ** 127, 1.99 * 2.0 ** 127, 3.4e38, 2.0 ** -90, 2.0 ** 90]),
                      torch.exp2(torch.randint(-149, 128, (53,), generator=g).double()) * significands(53)])[:, None]
    end_x = (significands((64, 16)) * torch.exp2(torch.randint(-11, 9, (64, 16), generator=g).double()) * ends
             ).clamp(max=3.4e38)
    special = torch.tensor([0.0, -0.0, 0.0, -0.0, 1e-38, 1e-45, -1e-40, 3e-39, -2.0 ** -100, 2.0 ** -90,
                            1.0, -448.0, 7.5e-37, -1e-30, 3.4e38, -3.0])
    spec_den = torch.exp2(torch.linspace(-149, 127, 64).round().double())[:, None]
    nonfinite = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 4)
    x = torch.cat([x, end_x, special.double().repeat(64, 1), nonfinite.double().repeat(64, 1)]).float()
    den = torch.cat([den, ends, spec_den, spec_den]).float()
    x, den = torch.cat([x, nv_x]), torch.cat([den, nv_den[:, None]])
    assert (den > 0).all() and torch.isfinite(den).all() and (den < 2.0 ** -126).sum() >= 8
    out = torch.empty_like(x, device=DEVICE)
    with np.errstate(over="ignore"):  # the interpreter's x * p overflows before the clamp, as it may
        _divide_kernel[(x.shape[0] // 64,)](x.to(DEVICE), den.reshape(-1).contiguous().to(DEVICE), out, BLOCK=64, PTX=ptx)
    got, want = out.cpu(), x / den
    magnitude = want.abs()
    exact = (magnitude >= 2.0 ** -11) & (magnitude < 2.0 ** 98)
    assert_same_values(got[exact], want[exact])
    small, huge, nan = magnitude < 2.0 ** -11, magnitude >= 2.0 ** 98, torch.isnan(want)
    assert torch.equal(torch.signbit(got[small]), torch.signbit(want[small])) and (got[small].abs() < 2.0 ** -11).all()
    assert torch.equal(torch.signbit(got[huge]), torch.signbit(want[huge])) and (got[huge].abs() >= 2.0 ** 98).all()
    assert torch.isnan(got[nan]).all()
    assert small.sum() > 64 and (want == 0).sum() >= 256 and torch.signbit(want[want == 0]).sum() >= 128
    assert torch.isinf(want).sum() >= 64 and nan.sum() >= 64
    assert exact[3 * n:3 * n + 64].float().mean() > 0.8  # most quotients at the ends of the range are ones to match


def test_nvfp4_float32_and_float64_definitions_differ_only_next_to_a_tie():
    """bf16 inputs make x / (s_block * s_tensor) land exactly on an E2M1 tie in exact arithmetic; then
    the rounding error of the float32 scale (kernel) or of the float64 one (companion.mx) picks the
    side. Such codes differ by one step; everything else agrees."""
    x = sample((64, 512), seed=309, dtype=torch.bfloat16, specials=False)
    want = mx.quantize_nvfp4(x)
    codes, scales, _ = nvfp4_reference(x)
    assert np.array_equal(bits(scales).numpy(), want.block_scales)
    got = mx.unpack_fp4(bits(codes).numpy())[:, : x.shape[1]].astype(np.int64)
    ref = want.elements.astype(np.int64)
    differ = got != ref
    assert differ.mean() < 1e-3
    assert (np.abs(got[differ] - ref[differ]) == 1).all()  # same sign, adjacent magnitudes
def test_nvfp4_static_amax_and_zeros():
    x = sample((3, 40), seed=9, specials=False)
    got = quantize_nvfp4_kernel(x.to(DEVICE), global_amax=1.5)
    assert_same_bits(got[:2], nvfp4_reference(x, global_amax=1.5)[:2])
    z = quantize_nvfp4_kernel(torch.zeros(2, 16, device=DEVICE))
    assert z[2].item() == 1.0 and (bits(z[0]) == 0).all() and (bits(z[1]) == 0).all()


# ---------------------------------------------------------------- launchers

def test_empty_tensors():
    for shape in [(0, 5), (3, 0)]:
        x = torch.empty(shape, device=DEVICE)
        codes, scales = quantize_fp8_blockwise(x)
        assert codes.shape == shape and scales.shape == (shape[0], -(-shape[1] // 128))
        assert quantize_mx_rows(x)[0].shape == (shape[0], -(-shape[1] // 32) * 32)
        assert quantize_nvfp4_kernel(x)[0].shape == (shape[0], -(-shape[1] // 16) * 8)
        assert float(quantize_nvfp4_kernel(x)[2]) == float(nvfp4_reference(x)[2]) == 1.0  # no amax: scale 1
        assert dequantize_fp8_blockwise(codes, scales).shape == shape


def test_bad_input_is_refused_clearly():
    x = torch.ones(4, 4, device=DEVICE)
    with pytest.raises(TypeError, match="dtype int32"):
        quantize_fp8_blockwise(x.int())
    with pytest.raises(ValueError, match="2 dimensions"):
        quantize_mx_rows(x[None])
    with pytest.raises(ValueError, match="tile"):
        quantize_fp8_blockwise(x, (32, 32))
    with pytest.raises(ValueError, match="scale_rounding"):
        quantize_mx_rows(x, scale_rounding="even")
    with pytest.raises(ValueError, match="MXFP4"):
        quantize_mx_rows_and_columns(x, "fp4_e2m1")
    codes, scales = quantize_fp8_blockwise(x)
    with pytest.raises(ValueError, match="shape"):
        dequantize_fp8_blockwise(codes, scales[:, :0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nvfp4_kernel(np.ones((2, 2), dtype=np.float32))


# ---------------------------------------------------------------- compiled, larger shapes

@pytest.mark.gpu
def test_compiled_kernels_on_large_random_inputs():
    x = sample((1031, 4133), seed=1, dtype=torch.float32)
    raw = torch.from_numpy(np.random.default_rng(2).integers(0, 2**32, (64, 4133), dtype=np.uint64)
                           .astype(np.uint32).view(np.float32))
    raw = torch.where(torch.isfinite(raw), raw, torch.zeros(()))  # every finite bit pattern
    x = torch.cat([x, raw])
    xd = x.cuda()
    for tile in [(1, 128), (128, 128)]:
        for pow2 in (False, True):
            assert_same_bits(quantize_fp8_blockwise(xd, tile, pow2), fp8_blockwise_reference(x, tile, pow2))
    for elem in ["fp8_e4m3", "fp8_e5m2"]:
        for sr in ["floor", "rceil"]:
            got = quantize_mx_rows_and_columns(xd.bfloat16(), elem, sr)
            xb = x.bfloat16()
            want = mx.quantize_mx(xb, elem, axis=-1, scale_rounding=sr).to_torch() + \
                mx.quantize_mx(xb, elem, axis=0, scale_rounding=sr).to_torch()
            assert_same_bits(got, want)
    ref = mx.quantize_mx(x, "fp4_e2m1", scale_rounding="rceil")
    assert_same_bits(quantize_mx_rows(xd, "fp4_e2m1", "rceil"),
                     (torch.from_numpy(mx.pack_fp4(ref.elements)), torch.from_numpy(ref.scales)))
    xb = x[:, :4132].bfloat16()  # even K: the bf16 pair kernel
    for sr in ["floor", "rceil"]:
        assert_same_bits(quantize_mx_rows(xb.cuda(), "fp4_e2m1", sr), _mxfp4_reference(xb, sr))
    got = quantize_nvfp4_kernel(xd)
    want = nvfp4_reference(x)
    assert_same_bits(got[:2], want[:2])
    assert bits(got[2]) == bits(want[2])


# ---------------------------------------------------------------- stochastic rounding

def _stochastic_case(rows=512, seed=3):
    """One row of values spread over E4M3's range (amax 1, so scale 1/448), repeated `rows` times."""
    g = torch.Generator().manual_seed(seed)
    row = (torch.rand(128, generator=g) * 2 - 1) * torch.exp2(-torch.randint(0, 10, (128,), generator=g).float())
    row[0] = 1.0
    row[1:4] = torch.tensor([0.0, -0.0, 2.0**-20])
    return row.repeat(rows, 1)


def _neighbour_check(codes, exact, fmt, rows):
    """Every code is one of the two neighbours of `exact`; the mean over rows is `exact`.

    The number of rows that round up is Binomial(rows, p). Bernstein's inequality bounds its deviation
    from rows * p by sqrt(2 v L) + 2L/3 (v = rows p (1 - p), L = ln(2 / 1e-6)) except with probability
    1e-6 per column, for every p: a plain 5-sigma bound is not one for p so small that a single
    round-up among the rows is already many sigmas."""
    lower = fmt.encode(exact, rounding="toward_zero", saturate=True).astype(np.int64)
    got = codes.astype(np.int64)
    sign = 1 << (fmt.bits - 1)
    magnitude, lower_magnitude = got & (sign - 1), lower & (sign - 1)
    assert np.isin(magnitude - lower_magnitude, [0, 1]).all()
    exact_hit = fmt.decode(lower) == exact
    assert (magnitude[:, exact_hit[0]] == lower_magnitude[:, exact_hit[0]]).all()  # representable: never moves
    low_v = np.abs(fmt.decode(lower[0]))
    high_v = np.abs(fmt.decode(np.minimum(lower_magnitude[0] + 1, sign - 1)))
    inside = np.abs(exact[0]) <= fmt.max  # beyond max both roundings saturate
    assert (np.abs(fmt.decode(codes[:, ~inside])) == fmt.max).all()
    gap = np.where(exact_hit[0] | ~inside, 0.0, high_v - low_v)
    p = np.where(gap > 0, (np.abs(exact[0]) - low_v) / np.where(gap > 0, gap, 1), 0.0)
    mean = np.abs(fmt.decode(codes)).mean(axis=0)
    log_term = np.log(2 / 1e-6)
    bound = (np.sqrt(2 * rows * p * (1 - p) * log_term) + 2 * log_term / 3) / rows * gap + 1e-12
    assert (np.abs(mean - np.abs(exact[0])) <= bound)[inside].all()
    assert (0 < p[inside & ~exact_hit[0]]).all()  # the case is not degenerate: real coin flips


def test_fp8_stochastic_rounding_is_adjacent_unbiased_and_reproducible():
    rows = 512
    x = _stochastic_case(rows)
    xd = x.to(DEVICE)
    codes, scales = quantize_fp8_blockwise(xd, rounding="stochastic", seed=11)
    _, rtn_scales = fp8_blockwise_reference(x)
    assert torch.equal(scales.cpu(), rtn_scales)  # scales do not depend on the rounding
    exact = (x / rtn_scales).numpy()  # float32 division, as the kernel divides
    _neighbour_check(bits(codes).numpy(), exact, get_format("fp8_e4m3"), rows)
    again, _ = quantize_fp8_blockwise(xd, rounding="stochastic", seed=11)
    other, _ = quantize_fp8_blockwise(xd, rounding="stochastic", seed=12)
    assert torch.equal(bits(again), bits(codes)) and not torch.equal(bits(other), bits(codes))
    with pytest.raises(ValueError, match="rounding"):
        quantize_fp8_blockwise(xd, rounding="toward_zero")


def test_nvfp4_stochastic_rounding_is_adjacent_unbiased_and_reproducible():
    rows = 512
    x = _stochastic_case(rows, seed=5)[:, :64] * 3.0
    xd = x.to(DEVICE)
    codes, block_scales, tensor_scale = quantize_nvfp4_kernel(xd, rounding="stochastic", seed=1)
    rtn = nvfp4_reference(x)
    assert torch.equal(bits(block_scales), bits(rtn[1])) and bits(tensor_scale) == bits(rtn[2])
    scale = (torch.from_numpy(get_format("fp8_e4m3").decode(bits(block_scales).numpy())).float()
             * tensor_scale.cpu())  # float32, per block of 16
    exact = (x / scale.repeat_interleave(16, dim=1)).numpy()
    unpacked = mx.unpack_fp4(bits(codes).numpy())
    _neighbour_check(unpacked, exact, get_format("fp4_e2m1"), rows)
    again = quantize_nvfp4_kernel(xd, rounding="stochastic", seed=1)[0]
    other = quantize_nvfp4_kernel(xd, rounding="stochastic", seed=2)[0]
    assert torch.equal(bits(again), bits(codes)) and not torch.equal(bits(other), bits(codes))


def _mx_exact(x, scales):
    """x / 2^e per block of 32 along rows, from E8M0 scale codes (exact in float32)."""
    e = bits(scales).numpy().astype(np.int32) - 127
    return np.ldexp(x.numpy(), -np.repeat(e, 32, axis=1)[:, :x.shape[1]])


@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_mx_stochastic_rounding_is_adjacent_unbiased_and_reproducible(elem):
    rows = 512
    x = _stochastic_case(rows, seed=7) * 3.0  # amax 3: FP4's floor scale puts 3 at 6, E4M3's at 384
    xd = x.to(DEVICE)
    fmt = get_format(elem)
    unpack = mx.unpack_fp4 if elem == "fp4_e2m1" else (lambda c: c)
    codes, scales = quantize_mx_rows(xd, elem, rounding="stochastic", seed=3)
    _, rtn_scales = quantize_mx_rows(xd, elem)
    assert torch.equal(bits(scales), bits(rtn_scales))  # scales do not depend on the rounding
    exact = _mx_exact(x, scales)
    _neighbour_check(unpack(bits(codes).numpy()), exact, fmt, rows)
    # The reference rounds stochastically too (its own draws), with the same scales.
    ref = mx.quantize_mx(x, elem, rounding="stochastic", rng=5)
    assert np.array_equal(ref.scales, bits(scales).numpy())
    _neighbour_check(ref.elements, exact, fmt, rows)
    again = quantize_mx_rows(xd, elem, rounding="stochastic", seed=3)[0]
    other = quantize_mx_rows(xd, elem, rounding="stochastic", seed=4)[0]
    shifted = quantize_mx_rows(xd, elem, rounding="stochastic", seed=3, offset=1)[0]
    assert torch.equal(bits(again), bits(codes))
    assert not torch.equal(bits(other), bits(codes)) and not torch.equal(bits(shifted), bits(codes))
    with pytest.raises(ValueError, match="rounding"):
        quantize_mx_rows(xd, elem, rounding="nearest_away")


@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp8_e5m2"])
def test_mx_rows_and_columns_stochastic_rounding(elem):
    rows = 256
    x = _stochastic_case(rows, seed=8)[:, :64]  # the row pattern repeated down the columns
    fmt = get_format(elem)
    rc, rs, _, _ = quantize_mx_rows_and_columns(x.to(DEVICE), elem, rounding="stochastic", seed=9)
    _neighbour_check(bits(rc).numpy(), _mx_exact(x, rs), fmt, rows)
    xt = x.T.contiguous()  # now each column repeats the pattern down its rows, for the column blocks
    _, _, cc, cs = quantize_mx_rows_and_columns(xt.to(DEVICE), elem, rounding="stochastic", seed=9)
    assert torch.equal(bits(cs), bits(quantize_mx_rows_and_columns(xt.to(DEVICE), elem)[3]))
    _neighbour_check(bits(cc).numpy().T, _mx_exact(x, bits(cs).T.contiguous()), fmt, rows)
    again = quantize_mx_rows_and_columns(xt.to(DEVICE), elem, rounding="stochastic", seed=9)[2]
    assert torch.equal(bits(again), bits(cc))


def test_stochastic_rounding_draws_independently_per_element():
    # Every element is 1 + 2^-4, halfway between E4M3 1.0 and 1.125: each code is a fair coin. If
    # neighbouring columns (which share one Philox call) or rows shared their random bits, their codes
    # would agree far more often than half the time.
    x = torch.full((64, 128), 1.0 + 2**-4)
    x[:, 0] = 448.0  # block amax 448, so the scale is exactly 1
    codes = bits(quantize_fp8_blockwise(x.to(DEVICE), rounding="stochastic", seed=4)[0]).numpy()[:, 4:].astype(int)
    assert set(np.unique(codes)) == {0x38, 0x39}
    for a, b in [(codes[:, 0::2], codes[:, 1::2]), (codes[:, 0::4], codes[:, 3::4]), (codes[0::2], codes[1::2])]:
        agree = (a == b).mean()
        assert abs(agree - 0.5) < 5 * np.sqrt(0.25 / a.size)
    assert abs((codes == 0x39).mean() - 0.5) < 5 * np.sqrt(0.25 / codes.size)


def test_nvfp4_amax_given_as_a_device_tensor_or_a_number():
    x = sample((7, 50), seed=9, specials=False)
    amax = float(x.abs().max()) * 1.5  # a static amax larger than this batch's
    want = nvfp4_reference(x, global_amax=amax)
    for given in (amax, torch.tensor(amax, dtype=torch.float32, device=DEVICE)):
        assert_same_bits(quantize_nvfp4_kernel(x.to(DEVICE), global_amax=given), want)
    with pytest.raises(ValueError, match="one value"):
        quantize_nvfp4_kernel(x.to(DEVICE), global_amax=torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        quantize_nvfp4_kernel(x.to(DEVICE), global_amax=torch.ones((), dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="finite"):
        quantize_nvfp4_kernel(x.to(DEVICE), global_amax=float("inf"))
