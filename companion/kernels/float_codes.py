"""Device functions shared by the quantization kernels: loading a tile, float32 -> narrow codes and back.

Every rounding here is done on the float32 bit pattern with integer arithmetic, so that a kernel gives
the same bits compiled on the GPU and under the Triton interpreter (whose ``x.to(tl.float8e4nv)`` in
triton 3.9 rounds wrongly when the mantissa carries into the exponent).

A narrow format ``1.E.M`` with exponent bias ``B`` is handled in two ranges:

* normal targets (``|y| >= 2^(1-B)``): subtract ``(127 - B) << 23`` from the float32 pattern, which
  re-biases the exponent field in place, then drop ``23 - M`` mantissa bits with round-to-nearest-even
  (add ``half - 1`` plus the lowest kept bit, shift). A carry out of the mantissa moves into the
  exponent by itself: 1.9375 rounds to the code of 2.0, and 464 to the code just above 448 (which the
  saturation below clamps);
* subnormal targets: ``|y| / min_subnormal`` is exact (a power-of-two scale); adding ``2^23`` in
  float32 rounds it to an integer, nearest-even, and that integer, read off the sum's bit pattern,
  is the code.

Then the magnitude saturates at the format's largest finite code (Inf too: the recipes here saturate),
the sign bit is put back (so -0 and negatives that round to zero keep their sign, as in
:mod:`companion.formats`) and NaN becomes the format's canonical NaN code (``fmt.nan_code``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from companion import runtime

# Compiled for the GPU, float32 -> E4M3 and -> E5M2 are one hardware conversion each (on Hopper
# cvt.rn.satfinite.e4m3x2.f32 / .e5m2x2.f32, converting two values per instruction): round to nearest
# even, saturate to the largest finite value (Inf too), exactly the rule below. The interpreter
# (triton 3.9) gets mantissa carries wrong, so there the integer rounding is used. The GPU tests check
# the two paths give the same bits on random float32 bit patterns, which cover every exponent.
HARDWARE_FP8 = tl.constexpr(not runtime.INTERPRET)


@triton.jit
def round_to_code(
    y,  # float32 values to round
    rand,  # int32 random numbers in [0, 2^16), one per value (used only when STOCHASTIC)
    BITS: tl.constexpr,  # width of the code (8 or 4); its top bit is the sign
    MAN_BITS: tl.constexpr,  # mantissa bits M of the target
    BIAS: tl.constexpr,  # exponent bias B of the target
    SUB_SCALE: tl.constexpr,  # 1 / min_subnormal = 2^(B - 1 + M), a float
    MAX_CODE: tl.constexpr,  # code of the largest finite magnitude (saturation)
    NAN_CODE: tl.constexpr,  # code for NaN, or -1 when the format has none
    STOCHASTIC: tl.constexpr,  # False: nearest-even; True: stochastic rounding driven by `rand`
):
    """float32 -> int32 codes of a 1.E.M format, saturating, NaN to NAN_CODE.

    Nearest-even as described in the module docstring. Stochastic: |y| rounds up with probability
    equal to its distance above the lower neighbour divided by the gap, so the expected value is y,
    to within 2^-16 of a step: the distance is read to 16 bits and a 16-bit random number is added to
    it, a carry out of those 16 bits rounding up. For normal targets those are the top 16 of the
    23 - M bits that nearest-even rounding would drop. For subnormal targets they are the fraction of
    |y| / min_subnormal, which adding 128 in float32 puts at the bottom of the sum's mantissa (ulp
    2^-16 in [128, 256)), so integer arithmetic does the rest; no float-to-integer conversions, which
    issue at a quarter of the rate of integer instructions on the GPU.
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF
    SHIFT: tl.constexpr = 23 - MAN_BITS
    rebased = mag - ((127 - BIAS) << 23)
    q = tl.abs(y) * SUB_SCALE  # exact: a power of two, and only used below the normal range
    if STOCHASTIC:
        normal = (rebased + (rand << (SHIFT - 16))) >> SHIFT
        fixed = (q + 128.0).to(tl.int32, bitcast=True) - 0x43000000  # q * 2^16 for q < 128 (128 = 0x43000000)
        subnormal = (fixed + rand) >> 16
    else:
        normal = (rebased + ((1 << (SHIFT - 1)) - 1) + ((rebased >> SHIFT) & 1)) >> SHIFT
        subnormal = (q + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(mag >= ((128 - BIAS) << 23), normal, subnormal)
    code = tl.minimum(code, MAX_CODE) | (sign << (BITS - 1))
    if NAN_CODE >= 0:
        code = tl.where(mag > 0x7F800000, NAN_CODE, code)
    return code


@triton.jit
def to_e4m3(y):
    """float32 -> OCP FP8 E4M3 codes (max 448 = 0x7E, NaN 0x7F, no Inf)."""
    if HARDWARE_FP8:  # NaN -> 0x7F as below
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        return round_to_code(y, 0, 8, 3, 7, 512.0, 0x7E, 0x7F, False)


@triton.jit
def to_e5m2(y):
    """float32 -> OCP FP8 E5M2 codes (max 57344 = 0x7B; Inf saturates). No NaN: callers keep NaN out
    (the MX kernel zeroes the codes of NaN blocks); the hardware would give 0x7F and -NaN 0xFF, the
    integer path 0x7E, and mapping one to the other costs a fifth of the kernel's instructions."""
    if HARDWARE_FP8:
        return y.to(tl.float8e5).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        return round_to_code(y, 0, 8, 2, 15, 65536.0, 0x7B, 0x7E, False)


@triton.jit
def to_e2m1(y):
    """float32 -> FP4 E2M1 codes, nearest-even, saturating at +-6 (Inf too); no NaN: callers keep NaN out.

    The FPU does the rounding, with one float addition (about ten instructions per element in all
    when compiled for Hopper, a few fewer than :func:`round_to_code`'s integer rounding). E2M1's step
    is 0.5 below 2, 1 in [2, 4) and 2 in [4, 8): ``2^(e - 1)`` with ``e = floor(log2 |y|)`` clamped to
    [0, 3]. Adding ``magic = 1.5 * 2^(22 + e)`` puts ``|y|`` in a binade whose float32 spacing is
    exactly that step, so the FPU's own nearest-even rounding of the sum rounds ``|y|`` to a whole
    number of steps ``n``, read off as the sum's bits minus magic's (the 1.5 keeps the sum inside
    magic's binade). Counting codes from zero, ``n`` steps of binade ``e`` are code ``n + 2e``; ties go
    to the even ``n``, which is the even code. Beyond 8, or for Inf, the count only grows and the code
    saturates at 7.
    """
    bits = y.to(tl.int32, bitcast=True)
    binade = tl.minimum(tl.maximum(bits & 0x7F800000, 0x3F800000), 0x41000000)  # 2^e, e in [0, 3]
    magic = binade + ((22 << 23) | 0x400000)  # 1.5 * 2^(22 + e)
    steps = (tl.abs(y) + magic.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - magic
    code = tl.minimum(steps + ((binade >> 22) - 254), 7)  # (binade >> 22) - 254 = 2e
    return code | ((bits >> 28) & 8)  # the sign bit of y, also for values that round to zero


@triton.jit
def to_e4m3_stochastic(y, rand):
    return round_to_code(y, rand, 8, 3, 7, 512.0, 0x7E, 0x7F, True)


@triton.jit
def to_e5m2_stochastic(y, rand):
    return round_to_code(y, rand, 8, 2, 15, 65536.0, 0x7B, 0x7E, True)


@triton.jit
def to_e2m1_stochastic(y, rand):
    return round_to_code(y, rand, 4, 1, 1, 2.0, 0x7, -1, True)


# divide_by_scale clamps x * 2^-E (den's binade brought to [1, 2)) to +-this, so that no step overflows.
DIVIDE_CLAMP = tl.constexpr(2.0 ** 100)


@triton.jit
def divide_by_scale(
    x,  # float32 values, any (NaN, Inf, subnormals)
    den,  # positive finite float32 scales (subnormal too), one per block, broadcast against x
    PTX: tl.constexpr = False,  # compiled for the GPU: the remainder's FMA rounds toward -Inf (see below)
):
    """x / den rounded once to nearest-even without a division per element: bit for bit what IEEE
    division (``tl.math.div_rn``) gives wherever the quotient's magnitude lies in [2^-11, 2^98); below
    that the same sign and a magnitude below 2^-11, above it (and for x = +-Inf) the same sign and a
    magnitude of 2^98 or more; NaN for NaN. So any rounding to a narrow format that saturates gets the
    same code as from the IEEE quotient. Per block: a power of two ``p = 2^-E`` that brings ``den`` to
    ``d = den * p`` in [1, 2) (exact; clamped so that p stays a normal number, which leaves d in
    [2^-23, 4) at the ends of the range) and one IEEE reciprocal ``r = RN(1 / d)``. Per element: two
    products, a clamp and two FMAs, no branch.

    ``a = clamp(x * p, +-2^100)`` is exact wherever it matters (x * p rounds only where it falls below
    2^-126, and then the quotient is below 2^-103), and ``a / d = x / den``. With ``y = RN(a * r)``,
    y is within an ulp of a / d, so the remainder ``a - d * y`` is a float32 number, which one FMA gives
    exactly; ``RN(y + remainder * r)``, one more FMA, is then the correctly rounded quotient
    (Markstein's correction step). The bound on d keeps r, the remainder and the products clear of
    overflow and underflow for every quotient of 2^-11 or more; the clamp turns Inf (whose remainder
    would be NaN) and products that would overflow into a large finite quotient.

    The sign of a zero quotient needs care: for x = -0 the FMAs, rounding to nearest, give a zero whose
    sign depends on how the compiler arranges their negations (compiled for the GPU, +0). Compiled
    (``PTX``), the remainder's FMA rounds toward -Inf (``fma.rm``): the remainder is exact, so only an
    exact zero notices, and it becomes -0, after which ``y + (-0) = y`` keeps y's sign, the dividend's,
    in both FMAs; inline PTX leaves the compiler nothing to rearrange. Under the interpreter, which
    cannot run PTX, the sign is put back from a as a bit (the same result, one more value kept alive)."""
    exponent = tl.minimum(tl.maximum((den.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
    p = ((254 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(127 - exponent)
    d = den * p
    r = tl.math.div_rn(1.0, d)
    a = tl.maximum(tl.minimum(x * p, DIVIDE_CLAMP, propagate_nan=tl.PropagateNan.ALL), -DIVIDE_CLAMP,
                   propagate_nan=tl.PropagateNan.ALL)
    y = a * r
    if PTX:
        remainder = tl.inline_asm_elementwise("fma.rm.f32 $0, $1, $2, $3;", "=r,r,r,r",
                                              [-y, tl.broadcast_to(d, y.shape), a], dtype=tl.float32,
                                              is_pure=True, pack=1)
        return tl.fma(remainder, tl.broadcast_to(r, y.shape), y)
    q = tl.fma(tl.fma(-y, d, a), r, y)
    return ((q.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (a.to(tl.int32, bitcast=True) & -0x80000000)
            ).to(tl.float32, bitcast=True)


@triton.jit
def decode_code(
    code,  # int32 codes
    BITS: tl.constexpr,  # width of the code
    MAN_BITS: tl.constexpr,  # mantissa bits M
    BIAS: tl.constexpr,  # exponent bias B
    MIN_SUBNORMAL: tl.constexpr,  # 2^(1 - B - M), a float
    NAN_CODE: tl.constexpr,  # smallest magnitude code that means NaN (all above too), or -1
    INF_CODE: tl.constexpr,  # magnitude code of Inf, or -1
):
    """int32 codes of a 1.E.M format -> float32 values (exact)."""
    MAG_MASK: tl.constexpr = (1 << (BITS - 1)) - 1
    mag = code & MAG_MASK
    negative = (code >> (BITS - 1)) & 1
    exp_field = mag >> MAN_BITS
    normal = ((mag + ((127 - BIAS) << MAN_BITS)) << (23 - MAN_BITS)).to(tl.float32, bitcast=True)
    value = tl.where(exp_field > 0, normal, mag.to(tl.float32) * MIN_SUBNORMAL)
    if INF_CODE >= 0:
        value = tl.where(mag == INF_CODE, float("inf"), value)
    if NAN_CODE >= 0:
        value = tl.where(mag >= NAN_CODE, float("nan"), value)
    # The sign goes on as a bit: compiled, `-value` is `0 - value`, which turns -0 into +0.
    return (value.to(tl.int32, bitcast=True) | (negative << 31)).to(tl.float32, bitcast=True)


@triton.jit
def from_e4m3(code):
    return decode_code(code, 8, 3, 7, 0.001953125, 0x7F, -1)


@triton.jit
def from_e5m2(code):
    return decode_code(code, 8, 2, 15, 1.52587890625e-05, 0x7D, 0x7C)


@triton.jit
def from_e2m1(code):
    return decode_code(code, 4, 1, 1, 0.5, -1, -1)


@triton.jit
def from_e8m0(code):
    """int32 E8M0 codes -> 2^(code - 127) as float32 (code 0 is 2^-127, a float32 subnormal; 255 is NaN)."""
    bits = tl.where(code == 0, 0x00400000, tl.where(code == 255, 0x7FC00000, code << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_bf16(x):
    """float32 -> bfloat16, nearest-even, on the bit pattern (see companion.kernels.round_bf16)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_for_store(x, out_ptr):
    """float32 -> the element type behind ``out_ptr``, nearest-even in both modes (the interpreter's own
    float32 -> bfloat16 conversion truncates)."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        return fp32_to_bf16(x)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def to_fp32(x):
    """bf16/fp16/fp32 -> float32, exactly. bfloat16 is widened on its bit pattern: the interpreter's own
    bf16 -> fp32 conversion (triton 3.9) mishandles subnormals."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def load_tile_fp32(x_ptr, rows, cols, M, K, stride_xm, stride_xk):
    """The (rows, cols) tile of an (M, K) bf16/fp16/fp32 tensor of any strides, as float32; 0 outside."""
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offsets = rows[:, None].to(tl.int64) * stride_xm + cols[None, :].to(tl.int64) * stride_xk
    return to_fp32(tl.load(x_ptr + offsets, mask=mask, other=0.0))


@triton.jit
def tile_coordinates(tile, tiles_m, tiles_k, COLUMN_MAJOR: tl.constexpr):
    """(row, column) of tile number ``tile`` in a grid of tiles_m x tiles_k tiles, numbered along rows
    (neighbouring numbers share rows: their programs read one long stretch of memory together) or,
    with COLUMN_MAJOR, down columns."""
    if COLUMN_MAJOR:
        return tile % tiles_m, tile // tiles_m
    return tile // tiles_k, tile % tiles_k


@triton.jit
def tile_random_bits(seed, offset, rows, col_start, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 random numbers in [0, 2^16) for a (BLOCK_M, BLOCK_K) tile starting at column ``col_start``
    (a multiple of 8): one Philox call per 8 consecutive columns of a row (counter = row * ceil(K / 8)
    + column / 8, plus ``offset``, modulo 2^32); its four 32-bit outputs, halved, go to those columns
    in order, low half first. Sixteen bits per element make the rounding unbiased to within 2^-16 of
    a step, and halve the Philox calls, the costliest part of stochastic rounding."""
    groups = col_start // 8 + tl.arange(0, BLOCK_K // 8)
    counter = rows[:, None].to(tl.int64) * ((K + 7) // 8) + groups[None, :]
    # Philox's ten rounds are about half of what stochastic rounding adds. H100, 2026-12-05, 8192^2 bf16,
    # fraction of the copy rate with 10 / 7 / 4 rounds: FP8 1 x 128 0.63 / 0.67 / 0.71, MXFP4 0.64 / 0.69 /
    # 0.73, NVFP4 0.36 / 0.38 / 0.39 (nearest-even FP8: 0.99). Ten, the generator's default, is kept.
    r0, r1, r2, r3 = tl.randint4x(seed, (counter + offset).to(tl.int32))
    r = tl.join(tl.join(r0, r1), tl.join(r2, r3)).to(tl.int32, bitcast=True)  # (BLOCK_M, BLOCK_K / 8, 2, 2)
    r = tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)  # (BLOCK_M, BLOCK_K / 8, 2, 2, 2): low half, then high
    return tl.reshape(r, (BLOCK_M, BLOCK_K))
