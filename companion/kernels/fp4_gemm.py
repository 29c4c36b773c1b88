"""4-bit GEMMs: weight-only W4A16 for decoding (MXFP4, NVFP4 or INT4 weights), and MXFP4 x MXFP4.

Weights are stored like ``nn.Linear.weight``: (N, K) E2M1 codes packed two per byte along K (first
element in the low nibble, torch's ``float4_e2m1fn_x2``) with one scale per block of K — E8M0 per 32
(MXFP4, as :func:`companion.kernels.quantize_mx_rows` returns) or E4M3 per 16 times an FP32 tensor scale
(NVFP4, as :func:`companion.kernels.quantize_nvfp4_kernel` returns). INT4 weights are two's complement
codes (-8..7) packed the same way, with a bf16 scale per group of 128 (symmetric, as
:func:`quantize_int4_weights` makes them). The output is C = X @ W^T.

Two ways to reach the Tensor Cores:

* ``tl.dot_scaled`` takes MX operands as they are stored (packed E2M1 and E8M0 scales). On Blackwell it
  is one block-scaled MMA instruction; on Hopper, which has no FP4 Tensor Core path, Triton upcasts the
  tiles to bf16 in registers and runs a bf16 MMA. W4A16 with MXFP4 weights and MXFP4 x MXFP4 both use it.
* NVFP4's E4M3 scales are not a ``dot_scaled`` format in Triton 3.6, so its W4A16 kernels decode in
  registers: each E2M1 code becomes a bf16 value (by bit placement, or for decoding by a byte-permute
  lookup in PTX), is multiplied by its block's E4M3 scale (exact: at most 2 x 4 significant bits),
  and the FP32 tensor scale multiplies the FP32 sum once at the end. For M <= 16 the product is
  computed transposed, C^T = W X^T, so that the decoded weights are the MMA's wide operand.

* INT4's products q * s are not always bf16 numbers, so its scale stays out of the MMA: each group of
  128 codes (q exact in bf16) is multiplied on the Tensor Cores into FP32, and the partial sum is
  multiplied by the group's scale and added, once per group.

For decoding (M <= 16) on the GPU, every format runs :mod:`companion.kernels.fp4_gemv` instead, which
decodes each weight in the registers that the Tensor Core's warp-level MMA reads; up to GEMV_MAX_M rows
it runs once per slice of 16 rows.

Decoding is exact (every E2M1 x scale product is a bf16 number for scales between 2^-126 and 2^125;
INT4 codes are decoded without their scale, which multiplies an FP32 sum),
so the results differ from exact arithmetic only by the FP32 sums on the Tensor Cores and the final
rounding to ``out_dtype`` — the bound :func:`gemm_error_bound` states.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from companion import runtime
from companion.kernels.float_codes import round_for_store, to_fp32
from companion.kernels.fp4_gemv import INT4_GROUP, _E2M1_LOOKUP_PTX, _e2m1_value, _gemv_mma, _sum_splits
from companion.formats import get_format
from companion.mx import pack_fp4, unpack_fp4

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MX_BLOCK, NVFP4_BLOCK = 32, 16
BLOCKS = {"mxfp4": MX_BLOCK, "nvfp4": NVFP4_BLOCK, "int4": INT4_GROUP}  # codes per scale
_FP4 = getattr(torch, "float4_e2m1fn_x2", None)

# Tiles for M > 16 (autotuned per shape); decode shapes use DECODE_CONFIG below.
_LARGE_M = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4)]]


@triton.jit
def _k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K range [k_lo, k_hi) of this program: whole BLOCK_K tiles, split as evenly as possible."""
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = tl.program_id(2) * per_split
    return k_lo, tl.minimum(K, k_lo + per_split)


@triton.jit
def _program_tile(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    """This program's output rows and columns, the same clamped into range for loading (edge rows and
    columns re-read row 0; they are never stored), and its K range."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # N first: consecutive programs stream
    rows_m = tl.where(offs_m < M, offs_m, 0).to(tl.int64)         # consecutive weights in decode
    rows_n = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    k_lo, k_hi = _k_range(K, BLOCK_K, SPLIT_K)
    return offs_m, offs_n, rows_m, rows_n, k_lo, k_hi


@triton.jit
def _store_tile(acc, c_ptr, ws_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, SPLIT_K: tl.constexpr):
    """The finished tile to C (rounded), or, when K is split, this split's float32 partial to the workspace."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, round_for_store(acc, c_ptr), mask=mask)
    else:
        ws = ws_ptr + (tl.program_id(2) * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(ws, acc, mask=mask)


@triton.jit
def _dot_scaled_kernel(
    a_ptr, sa_ptr,  # A: bf16 (M, K), or packed E2M1 (M, K/2) with E8M0 scales (M, K/32)
    b_ptr, sb_ptr,  # B: packed E2M1 (N, K/2) with E8M0 scales (N, K/32)
    c_ptr, ws_ptr,  # C (M, N); float32 partial sums (SPLIT_K, M, N) when K is split
    M, N, K,  # K counts elements (codes), a multiple of 32
    K_A,  # columns of A that hold data (bf16 A may be shorter than the padded K: zeros beyond)
    stride_am, stride_ak, stride_sam, stride_sak,
    stride_bn, stride_bk, stride_sbn, stride_sbk,
    stride_cm, stride_cn,
    A_FP4: tl.constexpr,  # A is MXFP4 (True) or bf16 (False: weight-only W4A16)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs sharing one output tile, each summing a contiguous range of K
):
    offs_m, offs_n, rows_a, rows_b, k_lo, k_hi = _program_tile(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)  # packed bytes along K
    offs_ks = tl.arange(0, BLOCK_K // 32)  # scales along K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kb_ok = (k0 // 2 + offs_kb) < K // 2
        ks_ok = (k0 // 32 + offs_ks) < K // 32
        # B^T tile (BLOCK_K/2, BLOCK_N) of packed bytes, and B's scales as (BLOCK_N, BLOCK_K/32)
        b = tl.load(b_ptr + rows_b[None, :] * stride_bn + (k0 // 2 + offs_kb)[:, None] * stride_bk,
                    mask=kb_ok[:, None], other=0)
        sb = tl.load(sb_ptr + rows_b[:, None] * stride_sbn + (k0 // 32 + offs_ks)[None, :] * stride_sbk,
                     mask=ks_ok[None, :], other=127)
        if A_FP4:
            a = tl.load(a_ptr + rows_a[:, None] * stride_am + (k0 // 2 + offs_kb)[None, :] * stride_ak,
                        mask=kb_ok[None, :], other=0)
            sa = tl.load(sa_ptr + rows_a[:, None] * stride_sam + (k0 // 32 + offs_ks)[None, :] * stride_sak,
                         mask=ks_ok[None, :], other=127)
            acc = tl.dot_scaled(a, sa, "e2m1", b, sb, "e2m1", acc)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=offs_k[None, :] < K_A, other=0.0)
            acc = tl.dot_scaled(a, None, "bf16", b, sb, "e2m1", acc)
    _store_tile(acc, c_ptr, ws_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, SPLIT_K)


@triton.jit
def _nvfp4_w4a16_kernel(
    x_ptr,  # bf16 (M, K_X)
    w_ptr, sw_ptr,  # packed E2M1 (N, K/2); E4M3 block scales (N, K/16) as uint8
    ts_ptr,  # float32 tensor scale (one element)
    c_ptr, ws_ptr,  # C (M, N); float32 partial sums (SPLIT_K, M, N) when K is split
    M, N, K, K_X,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_cm, stride_cn,
    UPCAST_DOT: tl.constexpr,  # True under the interpreter only (see below)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    offs_m, offs_n, rows_x, rows_w, k_lo, k_hi = _program_tile(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j holds elements 2j (low nibble) and 2j + 1 (high)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        j = k0 // 2 + offs_j
        j_ok = j < K // 2
        w = tl.load(w_ptr + rows_w[:, None] * stride_wn + j[None, :] * stride_wk, mask=j_ok[None, :], other=0)
        # each byte's block scale: element 2j lies in block 2j // 16 = j // 8 (L1 serves the repeats)
        s = tl.load(sw_ptr + rows_w[:, None] * stride_sn + (j // 8)[None, :] * stride_sk, mask=j_ok[None, :], other=0)
        s = s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        w = w.to(tl.int32)
        w_lo = (_e2m1_value(w & 0xF) * s).to(tl.bfloat16)  # (BLOCK_N, BLOCK_K/2), exact products
        w_hi = (_e2m1_value(w >> 4) * s).to(tl.bfloat16)
        x_lo = tl.load(x_ptr + rows_x[:, None] * stride_xm + (2 * j)[None, :] * stride_xk,
                       mask=(2 * j)[None, :] < K_X, other=0.0)
        x_hi = tl.load(x_ptr + rows_x[:, None] * stride_xm + (2 * j + 1)[None, :] * stride_xk,
                       mask=(2 * j + 1)[None, :] < K_X, other=0.0)
        if UPCAST_DOT:  # the interpreter multiplies bf16 bit patterns as integers: give it the same values in fp32
            x_lo, x_hi, w_lo, w_hi = x_lo.to(tl.float32), x_hi.to(tl.float32), w_lo.to(tl.float32), w_hi.to(tl.float32)
        acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision="ieee")
        acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision="ieee")
    acc = acc * tl.load(ts_ptr)
    _store_tile(acc, c_ptr, ws_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, SPLIT_K)


@triton.jit
def _int4_w4a16_kernel(
    x_ptr,  # bf16 (M, K_X)
    w_ptr, sw_ptr,  # packed INT4 (N, K/2); bf16 group scales (N, K/128) as int16 bits
    ts_ptr,  # unused (the launcher's argument order is NVFP4's)
    c_ptr, ws_ptr,  # C (M, N); float32 partial sums (SPLIT_K, M, N) when K is split
    M, N, K, K_X,  # K a multiple of 128
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_cm, stride_cn,
    UPCAST_DOT: tl.constexpr,  # True under the interpreter only (see _nvfp4_w4a16_kernel)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """INT4 W4A16 for any M: per group of 128 codes (one BLOCK_K), the MMAs of the exact codes q into a
    fresh FP32 tile, which is then multiplied by the groups' scales (one per row of W) and added."""
    tl.static_assert(BLOCK_K == 128)
    offs_m, offs_n, rows_x, rows_w, k_lo, k_hi = _program_tile(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j holds elements 2j (low nibble) and 2j + 1 (high)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        j = k0 // 2 + offs_j
        w = tl.load(w_ptr + rows_w[:, None] * stride_wn + j[None, :] * stride_wk).to(tl.int32)
        s = tl.load(sw_ptr + rows_w * stride_sn + (k0 // BLOCK_K) * stride_sk).to(tl.int32)
        s = ((s & 0xFFFF) << 16).to(tl.float32, bitcast=True)  # (BLOCK_N,) bf16 scales, widened
        q_lo = ((w & 0xF) ^ 8) - 8  # (BLOCK_N, BLOCK_K/2): two's complement nibbles
        q_hi = (((w >> 4) & 0xF) ^ 8) - 8
        x_lo = tl.load(x_ptr + rows_x[:, None] * stride_xm + (2 * j)[None, :] * stride_xk,
                       mask=(2 * j)[None, :] < K_X, other=0.0)
        x_hi = tl.load(x_ptr + rows_x[:, None] * stride_xm + (2 * j + 1)[None, :] * stride_xk,
                       mask=(2 * j + 1)[None, :] < K_X, other=0.0)
        if UPCAST_DOT:
            part = tl.dot(to_fp32(x_lo), tl.trans(q_lo.to(tl.float32)), input_precision="ieee")
            part = tl.dot(to_fp32(x_hi), tl.trans(q_hi.to(tl.float32)), part, input_precision="ieee")
        else:
            part = tl.dot(x_lo, tl.trans(q_lo.to(tl.bfloat16)))
            part = tl.dot(x_hi, tl.trans(q_hi.to(tl.bfloat16)), part)
        acc += part * s[None, :]
    _store_tile(acc, c_ptr, ws_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, SPLIT_K)


# Eight E2M1 codes (one 32-bit register of packed bytes) -> eight bf16 values, by the byte-permute
# lookup of companion.kernels.fp4_gemv. Results come out split by nibble: $0, $1 hold the low nibbles
# of bytes 0..3 (elements 2j), $2, $3 the high ones.
_E2M1_TO_BF16_PTX = tl.constexpr("""
{
.reg .b32 mag, mag_hi, sgn, sgn_lo, sgn_hi, lo0, lo1, hi0, hi1, s0, s1;""" + _E2M1_LOOKUP_PTX.format(src="$4") + """prmt.b32 $0, lo0, hi0, 0x6240;
prmt.b32 $1, lo1, hi1, 0x6240;
prmt.b32 $2, lo0, hi0, 0x7351;
prmt.b32 $3, lo1, hi1, 0x7351;
}
""")


@triton.jit
def _e2m1_bytes_to_bf16(w, PTX: tl.constexpr):
    """uint8 bytes of packed E2M1 -> (value of the low nibble, value of the high nibble), each bf16.

    Compiled: the PTX above, four bytes per call. Interpreted: the same values in float32 (exact), as
    the interpreter cannot run PTX and multiplies bf16 tensors wrongly (see _nvfp4_w4a16_kernel)."""
    if PTX:
        return tl.inline_asm_elementwise(_E2M1_TO_BF16_PTX, "=r,=r,=r,=r,r", [w], dtype=(tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=4)
    else:
        w = w.to(tl.int32)
        return _e2m1_value(w & 0xF), _e2m1_value(w >> 4)


@triton.jit
def _nvfp4_decode_kernel(
    x_ptr,  # bf16 (M, K_X), M <= 16 per program
    w_ptr, sw_ptr,  # packed E2M1 (N, K/2); E4M3 block scales (N, K/16) as uint8
    ts_ptr,  # float32 tensor scale (one element)
    c_ptr, ws_ptr,  # C (M, N); float32 partial sums (SPLIT_K, M, N) when K is split
    M, N, K, K_X,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_cm, stride_cn,
    PTX: tl.constexpr,  # compiled for the GPU (False under the interpreter: float32 operands)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """NVFP4 W4A16 for decoding, as C^T = W X^T: the weights are the MMA's wide operand (BLOCK_N rows,
    decoded in registers) and the few activation rows its narrow one (16, the smallest MMA width).

    The weight tile is read as (BLOCK_N, scale blocks, 8 bytes), so each E4M3 scale is converted once
    and multiplies its 16 values by broadcasting (exact in bf16: at most 2 x 4 significant bits); the
    low- and high-nibble values are then interleaved back into K order for one MMA over BLOCK_K."""
    offs_m, offs_n, rows_x, rows_w, k_lo, k_hi = _program_tile(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    NSB: tl.constexpr = BLOCK_K // 16  # NVFP4 scale blocks per tile, 8 bytes each
    offs_b = tl.arange(0, NSB)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        b = k0 // 16 + offs_b
        b_ok = b < K // 16  # K is a multiple of 16: a block is wholly in or out
        j = b[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        w = tl.load(w_ptr + rows_w[:, None, None] * stride_wn + j * stride_wk, mask=b_ok[None, :, None], other=0)
        s = tl.load(sw_ptr + rows_w[:, None] * stride_sn + b[None, :] * stride_sk, mask=b_ok[None, :], other=0)
        s = s.to(tl.float8e4nv, bitcast=True)
        w_lo, w_hi = _e2m1_bytes_to_bf16(w, PTX)  # (BLOCK_N, NSB, 8) each
        s = (s.to(tl.bfloat16) if PTX else s.to(tl.float32))[:, :, None]
        w_k = tl.reshape(tl.join(w_lo * s, w_hi * s), (BLOCK_N, BLOCK_K))  # byte j -> elements 2j, 2j + 1
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_k = tl.load(x_ptr + rows_x[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                      mask=offs_k[:, None] < K_X, other=0.0)  # (BLOCK_K, BLOCK_M)
        if not PTX:  # float32 operands with the same values (widened on the bits: see to_fp32)
            x_k = to_fp32(x_k)
        acc = tl.dot(w_k, x_k, acc, input_precision="ieee")
    acc = acc * tl.load(ts_ptr)
    _store_tile(tl.trans(acc), c_ptr, ws_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, SPLIT_K)


def _tuned(kernel):
    if runtime.INTERPRET:
        return kernel
    return triton.autotune(configs=_LARGE_M, key=["M", "N", "K"])(kernel)


_dot_scaled_tuned = _tuned(_dot_scaled_kernel)
_nvfp4_w4a16_tuned = _tuned(_nvfp4_w4a16_kernel)
_int4_w4a16_tuned = _tuned(_int4_w4a16_kernel)

# Decode (M <= 16): the weights are read once and nothing is reused, so the tile only has to keep
# enough bytes in flight on every SM: narrow tiles of N, deep tiles of K, and K split across programs
# when N alone gives too few (partials summed in a fixed order by a second, tiny kernel).
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): the fastest of sweeps on an H200 at N = K = 8192
# (BLOCK_N 32..128, BLOCK_K 128..1024, SPLIT_K 1..8, 4 or 8 warps, 2..4 stages). MXFP4 runs on
# dot_scaled; NVFP4 on _nvfp4_decode_kernel, which was also tried for MXFP4 (E8M0 scales) and with the
# nibbles kept apart (two MMAs over K/2, the activations read at stride 2): 55-90 us against dot_scaled's
# 46. Neither is limited by memory there (see the GEMM chapter's measurements).
DECODE_CONFIG = {"mxfp4": (64, 256, 4, 4, 3), "nvfp4": (32, 256, 8, 4, 3)}


# Up to this many activation rows, W4A16 runs the MMA GEMV on slices of 16 rows, one launch each, which
# decodes the weights once per slice; the tile kernels' large-M tiles leave most SMs idle at such M. On
# an H200 at N = K = 8192 (2026-12-05, CUDA graphs): M = 32 in 54-58 us (tile kernels 138-337), M = 64
# in 106-115 us (135-458), BF16 cuBLAS 34-37 us.
GEMV_MAX_M = 64


def _gemv_slices(x, codes, scales, tensor_scale, out, fmt, config):
    for i in range(0, x.shape[0], 16):
        _gemv_mma(x[i:i + 16], codes, scales, tensor_scale, out[i:i + 16], fmt, config)
    return out


def _launch(kernel, tuned, args, M, N, K, device, out, fmt, config=None, **meta):
    if runtime.INTERPRET:  # tiny tiles, and K split in two so that CI runs the split path as well
        bk = INT4_GROUP if fmt == "int4" else 64
        bn, split, warps, stages = 16, 2 if K > bk else 1, 4, 1
    elif M <= 16:
        bn, bk, split, warps, stages = config or DECODE_CONFIG[fmt]
    else:
        tuned[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), 1)](
            *args[:4], out, out, *args[4:], **meta, SPLIT_K=1)
        return out
    ws = torch.empty((split, M, N) if split > 1 else (1,), dtype=torch.float32, device=device)
    kernel[(triton.cdiv(N, bn), triton.cdiv(M, 16), split)](
        *args[:4], out, ws, *args[4:], **meta, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
        num_warps=warps, num_stages=stages)
    return _sum_splits(ws, out, M, N, split)


def _packed(codes, name):
    """Packed FP4 codes as uint8 (accepts float4_e2m1fn_x2 or uint8), 2-D, innermost stride 1."""
    runtime.check_tensor(codes, name, dtypes=tuple(d for d in (_FP4, torch.uint8) if d is not None),
                         contiguous=False, ndim=2)
    return codes.view(torch.uint8)


def _scales(scales, name, dtypes, want):
    runtime.check_tensor(scales, name, dtypes=dtypes, contiguous=False, ndim=2)
    if tuple(scales.shape) != want:
        raise ValueError(f"{name} has shape {tuple(scales.shape)}; expected {want} for these codes")
    return scales.view(torch.uint8) if scales.element_size() == 1 else scales


def _x_operand(x, k_codes, name="x", block=MX_BLOCK):
    runtime.check_tensor(x, name, dtypes=(torch.bfloat16,), contiguous=False, ndim=2)
    if not (k_codes - max(block, MX_BLOCK) < x.shape[1] <= k_codes):
        raise ValueError(f"{name} has {x.shape[1]} columns but the weight codes hold {k_codes} "
                         f"(the row length padded to the block); they do not match")


def _output(M, N, out_dtype, device):
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    return torch.empty((M, N), dtype=out_dtype, device=device)


def w4a16_matmul(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor, *, format: str = "mxfp4",
                 tensor_scale: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 _config=None, _gemv_config=None) -> torch.Tensor:
    """C = x @ dequant(W)^T with bf16 activations ``x`` (M, K) and 4-bit weights decoded in registers.

    ``format="mxfp4"``: ``w_codes`` (N, Kp/2) packed E2M1 (float4_e2m1fn_x2 or uint8), ``w_scales``
    (N, Kp/32) E8M0 (float8_e8m0fnu or uint8), where Kp is K rounded up to 32. ``format="nvfp4"``:
    ``w_codes`` (N, Kp/2) with Kp a multiple of 16, ``w_scales`` (N, Kp/16) E4M3 (float8_e4m3fn or
    uint8) and ``tensor_scale`` a one-element float32 tensor on the same device. ``format="int4"``:
    ``w_codes`` (N, Kp/2) uint8, two's complement codes packed two per byte, with Kp a multiple of 128,
    and ``w_scales`` (N, Kp/128) bf16 (see :func:`quantize_int4_weights`).
    """
    if format not in BLOCKS:
        raise ValueError(f"format must be one of {', '.join(map(repr, BLOCKS))}, got {format!r}")
    codes = _packed(w_codes, "w_codes")
    N, Kp = codes.shape[0], 2 * codes.shape[1]
    block = BLOCKS[format]
    if Kp % block:
        raise ValueError(f"w_codes hold {Kp} elements per row, not a multiple of the {format} block ({block})")
    _x_operand(x, Kp, block=block)
    M = x.shape[0]
    c = _output(M, N, out_dtype, x.device)
    if c.numel() == 0:
        return c
    if format != "nvfp4" and tensor_scale is not None:
        raise ValueError(f"tensor_scale belongs to NVFP4; {format} has only block scales")
    if format == "int4":
        s = _scales(w_scales, "w_scales", (torch.bfloat16,), (N, Kp // INT4_GROUP)).view(torch.int16)
        if M <= GEMV_MAX_M and _config is None:
            return _gemv_slices(x, codes, s, None, c, format, _gemv_config)
        args = (x, codes, s, s, M, N, Kp, x.shape[1], *x.stride(), *codes.stride(), *s.stride(), *c.stride())
        return _launch(_int4_w4a16_kernel, _int4_w4a16_tuned, args, M, N, Kp, x.device, c, format,
                       UPCAST_DOT=runtime.INTERPRET)
    if format == "mxfp4":
        s = _scales(w_scales, "w_scales", (torch.float8_e8m0fnu, torch.uint8), (N, Kp // MX_BLOCK))
        if M <= GEMV_MAX_M and _config is None:
            return _gemv_slices(x, codes, s, None, c, format, _gemv_config)
        args = (x, x, codes, s, M, N, Kp, x.shape[1], *x.stride(), 0, 0, *codes.stride(), *s.stride(), *c.stride())
        return _launch(_dot_scaled_kernel, _dot_scaled_tuned, args, M, N, Kp, x.device, c, format, _config,
                       A_FP4=False)
    s = _scales(w_scales, "w_scales", (torch.float8_e4m3fn, torch.uint8), (N, Kp // NVFP4_BLOCK))
    runtime.check_tensor(tensor_scale, "tensor_scale", dtypes=(torch.float32,), contiguous=False)
    if tensor_scale.numel() != 1:
        raise ValueError(f"tensor_scale must hold one element, got shape {tuple(tensor_scale.shape)}")
    if M <= GEMV_MAX_M and Kp % 32 == 0 and _config is None:  # the MMA kernel reads chunks of 32 codes
        return _gemv_slices(x, codes, s, tensor_scale, c, format, _gemv_config)
    args = (x, codes, s, tensor_scale, M, N, Kp, x.shape[1], *x.stride(), *codes.stride(), *s.stride(), *c.stride())
    if M <= 16:
        return _launch(_nvfp4_decode_kernel, None, args, M, N, Kp, x.device, c, format, _config,
                       PTX=not runtime.INTERPRET)
    return _launch(_nvfp4_w4a16_kernel, _nvfp4_w4a16_tuned, args, M, N, Kp, x.device, c, format, _config,
                   UPCAST_DOT=runtime.INTERPRET)


def mxfp4_matmul(a_codes: torch.Tensor, a_scales: torch.Tensor, b_codes: torch.Tensor, b_scales: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """C = dequant(A) @ dequant(B)^T for MXFP4 A (M, Kp/2 packed; scales (M, Kp/32)) and B (N, Kp/2; (N, Kp/32))."""
    a, b = _packed(a_codes, "a_codes"), _packed(b_codes, "b_codes")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a_codes is {tuple(a.shape)} and b_codes is {tuple(b.shape)}: both must hold the "
                         f"same number of packed columns (C = A @ B^T)")
    M, N, Kp = a.shape[0], b.shape[0], 2 * a.shape[1]
    if Kp % MX_BLOCK:
        raise ValueError(f"the codes hold {Kp} elements per row, not a multiple of the MX block (32)")
    e8m0 = (torch.float8_e8m0fnu, torch.uint8)
    sa = _scales(a_scales, "a_scales", e8m0, (M, Kp // MX_BLOCK))
    sb = _scales(b_scales, "b_scales", e8m0, (N, Kp // MX_BLOCK))
    c = _output(M, N, out_dtype, a.device)
    if c.numel() == 0:
        return c
    args = (a, sa, b, sb, M, N, Kp, Kp, *a.stride(), *sa.stride(), *b.stride(), *sb.stride(), *c.stride())
    return _launch(_dot_scaled_kernel, _dot_scaled_tuned, args, M, N, Kp, a.device, c, "mxfp4", A_FP4=True)


# ---------------------------------------------------------------------------------------------------
# References: decode in float64, multiply in float64
# ---------------------------------------------------------------------------------------------------

_E2M1, _E8M0, _E4M3, _INT4 = (get_format(f) for f in ("fp4_e2m1", "e8m0", "fp8_e4m3", "int4"))


def dequantize_fp4_reference(codes, scales, *, format: str = "mxfp4", tensor_scale=None) -> np.ndarray:
    """(N, Kp) float64 values of packed 4-bit codes with their block scales (the definition)."""
    nibbles = unpack_fp4(torch.as_tensor(codes).detach().cpu().view(torch.uint8)).numpy()
    if format == "int4":
        values = _INT4.decode(nibbles)
        scale = torch.as_tensor(scales).detach().cpu().double().numpy()
    else:
        values = _E2M1.decode(nibbles)
        s = torch.as_tensor(scales).detach().cpu().view(torch.uint8).numpy()
        if format == "mxfp4":
            scale = _E8M0.decode(s)
        elif format == "nvfp4":
            scale = _E4M3.decode(s) * float(torch.as_tensor(tensor_scale).float().item())
        else:
            raise ValueError(f"format must be 'mxfp4', 'nvfp4' or 'int4', got {format!r}")
    block = values.shape[1] // scale.shape[1]
    return values * np.repeat(scale, block, axis=1)


def quantize_int4_weights(w, group_size: int = INT4_GROUP):
    """Symmetric INT4 weights for :func:`w4a16_matmul`: per group of ``group_size`` codes along K, the
    bf16 scale ``absmax / 7`` and codes ``round(w / s)`` (nearest-even, clamped to -8..7), from
    :func:`companion.scaling.quantize`. K is zero-padded to a multiple of the group. Returns
    ``(codes, scales)``: uint8 (N, Kp / 2), two's complement codes packed two per byte (the first in
    the low nibble), and bf16 (N, Kp / group_size), on ``w``'s device."""
    from companion import scaling

    w = torch.as_tensor(w)
    N, K = w.shape
    Kp = -(-K // group_size) * group_size
    padded = torch.nn.functional.pad(w.detach().cpu().float(), (0, Kp - K))
    qt = scaling.quantize(padded, "int4", scaling.per_block(group_size), scale_format="bf16")
    codes = torch.from_numpy(pack_fp4(qt.codes.astype(np.uint8)))
    scales = torch.from_numpy(qt.scales).to(torch.bfloat16)  # exact: already rounded to bf16
    return codes.to(w.device), scales.to(w.device)


def matmul_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A @ B^T in float64 for float64 (M, K) and (N, K') arrays; B's padding columns beyond K are dropped."""
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)[:, :a.shape[1]].T


def gemm_error_bound(a: np.ndarray, b: np.ndarray, out_dtype: torch.dtype = torch.bfloat16,
                     unit_roundoff: float = 2.0 ** -24) -> np.ndarray:
    """|kernel - exact| <= gamma_{K+2}(u) * (|A| @ |B|^T) + half an ULP of ``out_dtype`` (Higham's bound).

    Products of the decoded operands are exact in FP32 (bf16 x bf16, or E2M1 x bf16); only the K-term
    FP32 sum (``unit_roundoff``) and the final rounding to ``out_dtype`` add error, in any summation
    order — plus, in the GEMV, one rounding where a block's sum is multiplied by its E4M3 scale and one
    where the total is multiplied by NVFP4's tensor scale: K + 2 roundings on any path in all.
    """
    K = a.shape[1] + 2
    gamma = K * unit_roundoff / (1 - K * unit_roundoff)
    out_u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[out_dtype]
    magnitude = matmul_reference(np.abs(a), np.abs(b))
    return gamma * magnitude * (1 + out_u) + out_u * np.abs(matmul_reference(a, b))


__all__ = ["w4a16_matmul", "mxfp4_matmul", "dequantize_fp4_reference", "quantize_int4_weights", "matmul_reference",
           "gemm_error_bound"]
