"""Dequantization kernel for every quantized layout of this package: codes times block scale.

Element ``(r, c)`` of the output is ``decode(code[r, c]) * scale[r // BR, c // BC]`` with the block
shape ``(BR, BC)``: (1, 128) or (128, 128) with float32 scales (FP8 blockwise), (1, 32) or (32, 1)
with E8M0 scales (MX along rows / columns), (1, 16) with E4M3 scales times the float32 tensor scale
(NVFP4). The product is one float32 multiplication (NVFP4: ``(P * s_block) * s_tensor``, whose first
product is exact), i.e. the exact product rounded once to float32; a bfloat16 output is that float32
rounded to nearest-even. A NaN scale (E8M0 0xFF, E4M3 0x7F) gives NaN for its whole block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from companion import runtime
from companion.kernels.float_codes import fp32_to_bf16, from_e2m1, from_e4m3, from_e5m2, from_e8m0

OUTPUT_DTYPES = (torch.float32, torch.bfloat16)
_ELEMENTS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
_FP4 = getattr(torch, "float4_e2m1fn_x2", None)


@triton.jit
def _dequantize_kernel(
    codes_ptr,  # *uint8, (M, code_cols): one code per byte, or two FP4 codes per byte
    scales_ptr,  # *float32 or *uint8 (E8M0 / E4M3 codes), (cdiv(M, BR), scale_cols)
    tensor_scale_ptr,  # *float32, one element (NVFP4 only)
    out_ptr,  # *float32 or *bfloat16, (M, K) contiguous
    M, K, code_cols, scale_cols,
    ELEM: tl.constexpr,  # 0 E4M3, 1 E5M2, 2 E2M1 packed
    SCALE: tl.constexpr,  # 0 float32, 1 E8M0, 2 E4M3 x tensor scale
    BR: tl.constexpr, BC: tl.constexpr,  # elements per scale along rows and columns
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    r64 = rows[:, None].to(tl.int64)
    if ELEM == 2:
        byte = tl.load(codes_ptr + r64 * code_cols + cols[None, :] // 2, mask=mask, other=0).to(tl.int32)
        value = from_e2m1((byte >> ((cols[None, :] & 1) * 4)) & 0xF)
    else:
        code = tl.load(codes_ptr + r64 * code_cols + cols[None, :], mask=mask, other=0).to(tl.int32)
        value = from_e4m3(code) if ELEM == 0 else from_e5m2(code)
    s_offsets = (rows[:, None] // BR).to(tl.int64) * scale_cols + cols[None, :] // BC
    raw = tl.load(scales_ptr + s_offsets, mask=mask, other=0)
    if SCALE == 0:
        out = value * raw
    elif SCALE == 1:
        e = raw.to(tl.int32)
        out = tl.where(e == 255, float("nan"), value * from_e8m0(e))  # NaN whatever the value, 0 included
    else:
        s_t = tl.load(tensor_scale_ptr)
        out = (value * from_e4m3(raw.to(tl.int32))) * s_t
    if OUT_BF16:
        tl.store(out_ptr + r64 * K + cols[None, :], fp32_to_bf16(out), mask=mask)
    else:
        tl.store(out_ptr + r64 * K + cols[None, :], out, mask=mask)


def _launch(codes, scales, tensor_scale, shape, elem, scale_kind, block, out_dtype):
    if out_dtype not in OUTPUT_DTYPES:
        raise TypeError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    M, K = (int(n) for n in shape)
    out = torch.empty((M, K), dtype=out_dtype, device=codes.device)
    if out.numel():
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 128))
        scales = scales if scale_kind == 0 else scales.view(torch.uint8)
        _dequantize_kernel[grid](
            codes.view(torch.uint8), scales, tensor_scale if tensor_scale is not None else scales, out,
            M, K, codes.shape[1], scales.shape[1], ELEM=elem, SCALE=scale_kind, BR=block[0], BC=block[1],
            OUT_BF16=out_dtype == torch.bfloat16, BLOCK_M=32, BLOCK_K=128, num_warps=4,
        )
    return out


def _check_pair(codes, scales, code_dtypes, scale_dtypes, want_codes, want_scales):
    runtime.check_tensor(codes, "codes", dtypes=code_dtypes, ndim=2)
    runtime.check_tensor(scales, "scales", dtypes=scale_dtypes, ndim=2)
    if tuple(codes.shape) != want_codes or tuple(scales.shape) != want_scales:
        raise ValueError(f"expected codes of shape {want_codes} and scales of shape {want_scales}, "
                         f"got {tuple(codes.shape)} and {tuple(scales.shape)}")


def dequantize_fp8_blockwise(codes, scales, tile=(1, 128), out_dtype=torch.bfloat16):
    """Inverse of :func:`companion.kernels.quantize_fp8_blockwise`: codes * scales, shape of codes."""
    from companion.kernels.fp8_blockwise import _check_tile

    rows, cols = _check_tile(tile)
    M, K = codes.shape if codes.ndim == 2 else (0, 0)
    _check_pair(codes, scales, (torch.float8_e4m3fn,), (torch.float32,), (M, K),
                (-(-M // rows), -(-K // cols)))
    return _launch(codes, scales, None, (M, K), 0, 0, (rows, cols), out_dtype)


def dequantize_mx(codes, scales, shape, axis=-1, out_dtype=torch.bfloat16):
    """Inverse of the MX kernels: ``shape`` is the original (unpadded) 2-D shape, ``axis`` -1 or 0."""
    M, K = (int(n) for n in shape)
    if axis not in (-1, 1, 0):
        raise ValueError(f"axis must be -1 (rows) or 0 (columns), got {axis}")
    Mp, Kp = -(-M // 32) * 32, -(-K // 32) * 32
    fp4 = _FP4 is not None and codes.dtype == _FP4
    if axis == 0:
        if fp4:
            raise ValueError("FP4 codes are quantized along rows only")
        want, want_s, block = (Mp, K), (Mp // 32, K), (32, 1)
    else:
        want, want_s, block = (M, Kp // 2 if fp4 else Kp), (M, Kp // 32), (1, 32)
    dtypes = tuple(_ELEMENTS) + ((_FP4,) if _FP4 is not None and axis != 0 else ())
    _check_pair(codes, scales, dtypes, (torch.float8_e8m0fnu,), want, want_s)
    return _launch(codes, scales, None, (M, K), 2 if fp4 else _ELEMENTS[codes.dtype], 1, block, out_dtype)


def dequantize_nvfp4(codes, block_scales, tensor_scale, shape, out_dtype=torch.bfloat16):
    """Inverse of :func:`companion.kernels.quantize_nvfp4_kernel`; ``shape`` is the original 2-D shape."""
    M, K = (int(n) for n in shape)
    Kp = -(-K // 16) * 16
    _check_pair(codes, block_scales, (_FP4,), (torch.float8_e4m3fn,), (M, Kp // 2), (M, Kp // 16))
    runtime.check_tensor(tensor_scale, "tensor_scale", dtypes=(torch.float32,), ndim=0)
    return _launch(codes, block_scales, tensor_scale, (M, K), 2, 2, (1, 16), out_dtype)
