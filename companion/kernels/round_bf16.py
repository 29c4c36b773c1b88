"""The smallest useful kernel: round float32 to bfloat16, nearest-even, with integer arithmetic.

bfloat16 is the upper half of a float32, so rounding is done on the bit pattern: add 0x7FFF plus the
lowest kept bit (which turns "round half up" into "round half to even"), then keep the upper 16 bits.
A carry out of the mantissa moves into the exponent by itself, which is why this trick also rounds
the largest values correctly up to Inf. NaN needs care: adding to a NaN's pattern could carry it into
Inf, so NaN becomes the canonical quiet NaN 0x7FC0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from companion import runtime
from companion.formats import get_format


@triton.jit
def _round_to_bf16_kernel(
    x_ptr,  # *float32, n elements to round
    out_ptr,  # *bfloat16, n results
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program instance
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    bits = tl.load(x_ptr + offsets, mask=mask).to(tl.uint32, bitcast=True)
    lowest_kept_bit = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lowest_kept_bit) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, 0x7FC0, rounded)
    out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + offsets, out, mask=mask)


def round_to_bf16(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Round a float32 tensor of any shape to bfloat16 (nearest-even) with a Triton kernel."""
    runtime.check_tensor(x, "x", dtypes=(torch.float32,))
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, block),)
    _round_to_bf16_kernel[grid](x, out, n, BLOCK=block)
    return out


def round_to_bf16_reference(x: torch.Tensor) -> torch.Tensor:
    """The definition: bfloat16 codes from :mod:`companion.formats`, viewed as a bfloat16 tensor."""
    codes = get_format("bf16").encode(x.detach().cpu())
    return codes.view(torch.bfloat16).to(x.device)
