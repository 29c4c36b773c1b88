"""E2M1 codes from bfloat16 inputs, two elements per instruction.

A bfloat16 tensor whose rows are contiguous can be read as int32 words, each holding two neighbouring
elements (the first in the low half). The GPU has arithmetic on such pairs: ``fma.rn.bf16x2`` and
``min``/``max.bf16x2`` work on both halves at once, and plain 32-bit integer instructions (and, add,
shift) work on both halves at once too, as long as nothing carries from the low half into the high one.
:func:`to_e2m1_pairs` rounds to E2M1 that way, with the same trick as
:func:`companion.kernels.float_codes.to_e2m1`, moved from float32 to bfloat16:

    y      = |x| * 2^-e                        exact (bf16 times a power of two, both halves)
    y      = min(y, 6)                         saturation: the code count below then stops at 7
    binade = max(y & 0x7F80, 1.0)              2^b with b = floor(log2 y) in [0, 2]; below 1, b = 0
    magic  = binade + 0x0340                   1.5 * 2^(6 + b): a binade whose bf16 spacing is 2^(b-1),
                                               E2M1's step at y
    steps  = bits(y + magic) - bits(magic)     the FMA rounds y to a whole number of steps, nearest-even
    code   = steps + 2b                        (binade >> 6) - 254 = 2b

and ``y + magic`` stays in magic's binade (y <= 6), so ``steps`` is a small integer in the low bits of
each half and no subtraction borrows across halves. The sign bit of each half goes to bit 3 of its code,
also when the value rounds to zero (FP4's -0), as :mod:`companion.formats` encodes.

Compiled, the three float operations are one PTX instruction each (sm_80 and later), and so is
:func:`max_halves`, the lane-wise integer maximum that finds a block's largest magnitude (``max.u16x2``,
sm_90, where two of them merge into one three-operand instruction). Under the interpreter they are
emulated on the halves, which gives the same bits here: the products are exact, and a sum
``y + magic`` that float32 has to round lies far from any bfloat16 tie (y < 2^-8, where the nearest tie
is 0.25 away). Everything else is the same integer code in both modes, so CI tests it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from companion import runtime

PTX = tl.constexpr(not runtime.INTERPRET)  # compiled for the GPU: the pair instructions themselves


@triton.jit
def _halves(w):
    """int32 words of bf16 pairs -> (low, high) halves as float32 (exact)."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _to_pair(low, high):
    """Two float32 values -> their bfloat16s (nearest-even; finite values) as one int32 word."""
    lb = low.to(tl.int32, bitcast=True)
    hb = high.to(tl.int32, bitcast=True)
    lb = ((lb + 0x7FFF + ((lb >> 16) & 1)) >> 16) & 0xFFFF
    hb = ((hb + 0x7FFF + ((hb >> 16) & 1)) >> 16) & 0xFFFF
    return lb | (hb << 16)


@triton.jit
def _fma_pairs(a, b, c):
    """a * b + c on bf16 pairs, rounded once to nearest-even."""
    if PTX:
        return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        al, ah = _halves(a)
        bl, bh = _halves(b)
        cl, ch = _halves(c)
        return _to_pair(al * bl + cl, ah * bh + ch)


@triton.jit
def _min_max_pairs(a, b, MAX: tl.constexpr):
    """min(a, b), or max(a, b) with MAX, on bf16 pairs."""
    if PTX:
        return tl.inline_asm_elementwise("max.bf16x2 $0, $1, $2;" if MAX else "min.bf16x2 $0, $1, $2;", "=r,r,r",
                                         [a, b], dtype=tl.int32, is_pure=True, pack=1)
    else:
        al, ah = _halves(a)
        bl, bh = _halves(b)
        if MAX:
            return _to_pair(tl.maximum(al, bl), tl.maximum(ah, bh))
        else:
            return _to_pair(tl.minimum(al, bl), tl.minimum(ah, bh))


@triton.jit
def max_halves(a, b):
    """Lane-wise maximum of two words as unsigned 16-bit halves (a combine function for tl.reduce)."""
    if PTX:
        return tl.inline_asm_elementwise("max.u16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.maximum(a & 0xFFFF, b & 0xFFFF) | (tl.maximum((a >> 16) & 0xFFFF, (b >> 16) & 0xFFFF) << 16)


# bf16 pairs of constants, as signed int32 words: -0 (the FMA's addend for a plain product), 1 and 6.
NEG_ZERO_PAIR = tl.constexpr(-0x7FFF8000)  # 0x80008000
ONE_PAIR = tl.constexpr(0x3F803F80)
SIX_PAIR = tl.constexpr(0x40C040C0)


@triton.jit
def to_e2m1_pairs(
    w,  # int32 words, each two bf16 elements (first in the low half)
    multiplier,  # int32 words: 2^-e as bf16 in both halves (broadcast against w), a normal bf16
):
    """E2M1 codes of ``x * 2^-e`` for both halves: nearest-even, saturating at +-6, the sign kept; the
    first element's code in bits 0-3, the second's in bits 16-19. NaN or Inf give meaningless codes,
    which callers replace."""
    y = _fma_pairs(w & 0x7FFF7FFF, multiplier + tl.zeros_like(w), tl.full(w.shape, NEG_ZERO_PAIR, tl.int32))
    y = _min_max_pairs(y, tl.full(w.shape, SIX_PAIR, tl.int32), False)
    binade = _min_max_pairs(y & 0x7F807F80, tl.full(w.shape, ONE_PAIR, tl.int32), True)
    magic = binade + 0x03400340
    steps = _fma_pairs(y, tl.full(w.shape, ONE_PAIR, tl.int32), magic) - magic
    code = steps + (binade >> 6) - 0x00FE00FE
    return code | ((w >> 12) & 0x00080008)
