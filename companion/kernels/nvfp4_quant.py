"""NVFP4 quantization: FP4 (E2M1) codes packed two per byte, an E4M3 scale per 16 elements along rows,
one FP32 scale per tensor.

Two kernels: an amax pass (each program reduces its tile to one max of bit patterns and combines it
with ``atomic_max``), then the quantize pass, which reads the tensor's amax back on the device, so the
whole thing runs without a host round trip. The arithmetic, all in float32 (IEEE divisions):

    s_tensor = amax_tensor / 2688                  (448 * 6; 1 when this is 0)
    s_block  = E4M3(amax_block / fp32(6 * s_tensor))  nearest-even, saturating; NaN/Inf block -> 0x7F
    scale    = fp32(s_block * s_tensor)
    P_i      = E2M1(x_i / scale)                   nearest-even, saturating at +-6; 0 where scale is 0

``nvfp4_reference`` states this in NumPy float32. :func:`companion.mx.quantize_nvfp4` defines the same
recipe with float64 quotients (``6 * s_tensor`` and ``s_block * s_tensor`` exact, each quotient rounded
once). On float32 inputs the two agree (tested). They differ where the exact quotient is a rounding tie
of E2M1, which bf16 inputs make common (x, amax and the E4M3 block scale are all short numbers): the
rounding error of the float32 scale (here) or of the float64 one (companion.mx) then decides the side,
and the codes differ by one step (about 1 in 10^4 codes on random bf16 data; tested).

The kernel divides each element by its block's scale without a division per element: one IEEE
reciprocal per block, then two products, a clamp and two FMAs per element
(:func:`companion.kernels.float_codes.divide_by_scale`), which give the IEEE quotient bit for bit
wherever it decides the code.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from companion import runtime
from companion.formats import get_format
from companion.kernels.float_codes import (
    divide_by_scale, from_e4m3, load_tile_fp32, tile_random_bits, to_e2m1,
    to_e2m1_stochastic, to_e4m3,
)
from companion.kernels.fp8_blockwise import check_rounding
from companion.mx import pack_fp4

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TENSOR_SCALE_DIVISOR = 2688.0  # E4M3 max * E2M1 max
# (BLOCK_M, BLOCK_K, num_warps) of the two passes, from sweeps on an H200 (8192 x 8192 bf16).
CONFIG = (16, 256, 4)
AMAX_CONFIG = (128, 256, 4)


@triton.jit
def _amax_kernel(
    x_ptr,  # *bf16/fp16/fp32, (M, K) with strides (stride_xm, stride_xk)
    amax_ptr,  # *int32, one element, zeroed: the bit pattern of the largest finite |x|
    M, K, stride_xm, stride_xk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    x = load_tile_fp32(x_ptr, rows, cols, M, K, stride_xm, stride_xk)
    magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    finite = tl.where(magnitude < 0x7F800000, magnitude, 0)
    tl.atomic_max(amax_ptr, tl.max(tl.max(finite, axis=1), axis=0))


@triton.jit
def _nvfp4_kernel(
    x_ptr,  # *bf16/fp16/fp32, (M, K) with strides (stride_xm, stride_xk)
    codes_ptr,  # *uint8, (M, Kp / 2): E2M1 codes packed two per byte, Kp = K padded to 16
    block_scales_ptr,  # *uint8, (M, Kp / 16): E4M3 codes
    tensor_scale_ptr,  # *float32, one element (written by program (0, 0))
    amax_ptr,  # *int32, one element: bit pattern of the tensor's amax
    M, K, Kp, stride_xm, stride_xk,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per program, a multiple of 16
    seed, offset,  # stochastic rounding: Philox seed, and an offset added to every Philox counter
    STOCHASTIC: tl.constexpr,  # round the element codes stochastically instead of to nearest-even
    PTX: tl.constexpr,  # compiled for the GPU (the division's PTX form; False under the interpreter)
):
    amax_t = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    s_t = tl.math.div_rn(amax_t, 2688.0)
    s_t = tl.where(s_t > 0, s_t, 1.0)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(tensor_scale_ptr, s_t)

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    x = load_tile_fp32(x_ptr, rows, cols, M, K, stride_xm, stride_xk)
    NB: tl.constexpr = BLOCK_K // 16
    x3 = tl.reshape(x, (BLOCK_M, NB, 16))
    amax_bits = tl.max(tl.reshape(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, (BLOCK_M, NB, 16)), axis=2)
    special = amax_bits >= 0x7F800000  # the block holds NaN or Inf
    t = tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), s_t * 6.0)
    sb_code = tl.where(special, 0x7F, to_e4m3(t))
    s_block = tl.where(special, 0.0, from_e4m3(sb_code))
    scale = s_block * s_t
    live = scale > 0
    den = tl.where(live, scale, 1.0)[:, :, None]
    v = divide_by_scale(x3, den, PTX)  # Inf/NaN blocks are masked below
    if STOCHASTIC:
        rand = tl.reshape(tile_random_bits(seed, offset, rows, tl.program_id(1) * BLOCK_K, K, BLOCK_M, BLOCK_K),
                          (BLOCK_M, NB, 16))
        q = tl.where(live[:, :, None], to_e2m1_stochastic(v, rand), 0)
    else:
        q = tl.where(live[:, :, None], to_e2m1(v), 0)

    blocks = tl.program_id(1) * NB + tl.arange(0, NB)
    s_mask = (rows[:, None] < M) & (blocks[None, :] < Kp // 16)
    tl.store(block_scales_ptr + rows[:, None].to(tl.int64) * (Kp // 16) + blocks[None, :],
             sb_code.to(tl.uint8), mask=s_mask)
    low, high = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_K // 2, 2)))
    half = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    p_mask = (rows[:, None] < M) & (half[None, :] < Kp // 2)
    tl.store(codes_ptr + rows[:, None].to(tl.int64) * (Kp // 2) + half[None, :],
             (low | (high << 4)).to(tl.uint8), mask=p_mask)


def quantize_nvfp4_kernel(x: torch.Tensor, global_amax=None, rounding: str = "nearest_even",
                          seed: int = 0, offset: int = 0):
    """NVFP4-quantize a 2-D tensor along its rows: amax pass and quantize pass, both on the device.

    Returns ``(codes, block_scales, tensor_scale)``: packed codes ``(M, Kp / 2)`` as
    ``float4_e2m1fn_x2`` (Kp = K padded to 16), E4M3 block scales ``(M, Kp / 16)`` as
    ``float8_e4m3fn`` and the float32 tensor scale as a 0-d tensor, as
    :meth:`companion.mx.NVFP4Tensor.to_torch` returns them. ``global_amax`` (rounded to float32)
    replaces the amax pass (static scaling): a number, or a one-element float32 tensor on x's device
    (delayed scaling keeps it there; then it is not read back to check it). ``rounding="stochastic"`` rounds the E2M1 element codes
    stochastically (unbiased; Philox draws keyed by ``seed`` and each element's position, ``offset``
    shifting the counters), as the FP4 training recipes do for gradients; block scales stay nearest-even.
    """
    stochastic = check_rounding(rounding)
    runtime.check_tensor(x, "x", dtypes=INPUT_DTYPES, contiguous=False, ndim=2)
    M, K = x.shape
    Kp = -(-K // 16) * 16
    dev = x.device
    codes = torch.empty((M, Kp // 2), dtype=torch.uint8, device=dev)  # the kernel writes every byte
    block_scales = torch.empty((M, Kp // 16), dtype=torch.uint8, device=dev)
    # Program (0, 0) writes the tensor scale; with no programs to run, it is 1 (a fill is a launch of its own).
    tensor_scale = torch.empty((), dtype=torch.float32, device=dev) if x.numel() else torch.ones((), device=dev)
    if isinstance(global_amax, torch.Tensor):
        # Kept on the device (delayed scaling): no host round trip; its value is the caller's to vouch for.
        runtime.check_tensor(global_amax, "global_amax", dtypes=(torch.float32,), contiguous=False)
        if global_amax.numel() != 1:
            raise ValueError(f"global_amax must hold one value, got shape {tuple(global_amax.shape)}")
        amax_bits = global_amax.reshape(1).view(torch.int32)
    elif global_amax is not None:
        amax = float(np.float32(global_amax))
        if not np.isfinite(amax) or amax < 0:
            raise ValueError(f"global_amax must be finite and non-negative, got {global_amax!r}")
        amax_bits = torch.tensor([amax], dtype=torch.float32, device=dev).view(torch.int32)
    else:
        amax_bits = torch.zeros(1, dtype=torch.int32, device=dev)
    if x.numel():
        if global_amax is None:
            am, ak, aw = AMAX_CONFIG
            _amax_kernel[(triton.cdiv(M, am), triton.cdiv(K, ak))](
                x, amax_bits, M, K, x.stride(0), x.stride(1), BLOCK_M=am, BLOCK_K=ak, num_warps=aw)
        block_m, block_k, warps = CONFIG
        _nvfp4_kernel[(triton.cdiv(M, block_m), triton.cdiv(Kp, block_k))](
            x, codes, block_scales, tensor_scale, amax_bits, M, K, Kp, x.stride(0), x.stride(1),
            BLOCK_M=block_m, BLOCK_K=block_k, seed=int(seed), offset=int(offset), STOCHASTIC=stochastic,
            PTX=not runtime.INTERPRET, num_warps=warps)
    fp4 = getattr(torch, "float4_e2m1fn_x2", torch.uint8)
    return codes.view(fp4), block_scales.view(torch.float8_e4m3fn), tensor_scale


def nvfp4_reference(x, global_amax=None):
    """The definition, in NumPy float32 (see the module docstring); returns CPU tensors like the kernel."""
    xf = torch.as_tensor(x).detach().to("cpu", torch.float32).numpy()
    M, K = xf.shape
    Kp = -(-K // 16) * 16
    f32 = np.float32
    if global_amax is None:
        finite = np.abs(xf[np.isfinite(xf)])
        amax = finite.max() if finite.size else f32(0)
    else:
        amax = f32(global_amax)
    s_t = f32(amax) / f32(TENSOR_SCALE_DIVISOR)
    s_t = s_t if s_t > 0 else f32(1)
    xb = np.zeros((M, Kp), dtype=np.float32)
    xb[:, :K] = xf
    xb = xb.reshape(M, Kp // 16, 16)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax_b = np.abs(xb).max(axis=-1)
        special = ~np.isfinite(amax_b)
        t = np.where(special, f32(0), amax_b) / f32(s_t * f32(6))
        e4m3 = get_format("fp8_e4m3")
        sb_code = np.where(special, e4m3.nan_code, e4m3.encode(t, saturate=True)).astype(np.uint8)
        s_block = np.where(special, 0, e4m3.decode(sb_code)).astype(np.float32)
        scale = (s_block * s_t).astype(np.float32)
        live = scale > 0
        v = np.where(live[..., None], xb / np.where(live, scale, f32(1))[..., None], f32(0)).astype(np.float32)
    codes = get_format("fp4_e2m1").encode(v, saturate=True).astype(np.uint8).reshape(M, Kp)
    fp4 = getattr(torch, "float4_e2m1fn_x2", torch.uint8)
    return (torch.from_numpy(pack_fp4(codes)).view(fp4), torch.from_numpy(sb_code).view(torch.float8_e4m3fn),
            torch.tensor(s_t, dtype=torch.float32))
