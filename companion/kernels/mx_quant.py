"""MX quantization kernels (OCP MX v1.0): MXFP8 (E4M3, E5M2) and MXFP4, blocks of 32, E8M0 scales.

One program loads a ``BLOCK_M x BLOCK_K`` tile (multiples of 32) once and may quantize it two ways:

* along rows (``axis=-1``): the tile viewed as ``(BLOCK_M, BLOCK_K / 32, 32)``, one scale per row block;
* along columns (``axis=0``): the tile viewed as ``(BLOCK_M / 32, 32, BLOCK_K)``, one scale per column
  block, which the backward pass needs for the transposed GEMM.

Doing both from one read is the point of :func:`quantize_mx_rows_and_columns`: the input, the larger
side of the traffic, is read once for the two outputs.

The arithmetic equals :func:`companion.mx.quantize_mx` bit for bit, with no float64 anywhere:

* ``amax`` is the max of the blocks' bit patterns (order-preserving for non-negative floats); a block
  holding NaN or Inf (pattern >= 0x7F800000) gets the NaN scale 0xFF and zero codes;
* ``"floor"``: ``e = (exponent field of amax) - 127 - emax``, which is ``floor(log2 amax) - emax`` for a
  normal amax; a subnormal amax gives ``e <= -127 - emax``, clamped to -127 as the reference clamps;
* ``"rceil"``: ``d = amax * fp32(1 / max)`` (one float32 multiplication, as the reference computes it),
  ``e = ceil(log2 d)`` read from d's bit pattern (exponent + 1 if any mantissa bit is set);
* ``x * 2^-e`` is exact in float32: ``2^-e`` is a normal float32 for every ``e`` these element types
  reach (``e <= 120``), and a product that falls below float32's normal range is far below the
  element format's smallest subnormal, so it rounds to a signed zero either way;
* codes are rounded by :func:`companion.kernels.float_codes.round_to_code` (nearest-even, saturating).

``rounding="stochastic"`` rounds the codes stochastically instead (the scales do not change), from 16
Philox bits per element keyed by ``seed`` and the element's position (``offset`` shifts the counters),
as :func:`companion.kernels.float_codes.tile_random_bits` draws them. When one call writes both
directions, an element's row-wise and column-wise codes use the same draw: each is unbiased, one
Philox call serves both, and the two copies feed different GEMMs.

Codes use the reference's layout: the blocked axis is padded with zeros to a multiple of 32, FP4 codes
are packed two per byte along rows (first element in the low nibble, torch's ``float4_e2m1fn_x2``).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from companion import runtime
from companion.kernels.bf16_pairs import max_halves, to_e2m1_pairs
from companion.kernels.fp8_blockwise import check_rounding
from companion.kernels.float_codes import (
    load_tile_fp32, tile_coordinates, tile_random_bits, to_e2m1, to_e2m1_stochastic, to_e4m3,
    to_e4m3_stochastic, to_e5m2, to_e5m2_stochastic,
)

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MX_ELEMENTS = {  # name -> (kernel id, emax, fp32(1 / max), torch dtype of the codes)
    "fp8_e4m3": (0, 8, float(np.float32(1 / 448.0)), torch.float8_e4m3fn),
    "fp8_e5m2": (1, 15, float(np.float32(1 / 57344.0)), torch.float8_e5m2),
    "fp4_e2m1": (2, 2, float(np.float32(1 / 6.0)), getattr(torch, "float4_e2m1fn_x2", torch.uint8)),
}
SCALE_ROUNDINGS = ("floor", "rceil")
# Launch configurations: (BLOCK_M, BLOCK_K, num_warps, programs per SM, pipeline stages, tiles numbered
# down columns), as in fp8_blockwise (the bf16-pair MXFP4 kernel takes the first three only). From
# sweeps on an H200 (8192 x 8192 bf16, fraction of the copy rate measured in the same run). Row blocks:
# wide rows; MXFP8 8 x 512 0.86 (16 x 256 0.83, 4 x 1024 0.54), MXFP4 4 x 1024 0.59 (8 x 512 0.57,
# 16 x 256 0.50-0.58). Both directions: 32 x 128 with two warps 0.74 (four warps 0.59, 32 x 64 with
# two 0.68, 32 x 32 with one 0.54, 64 x 64 with two 0.63), as the column maxima cross fewer warps.
# Repeated runs differ by a few percent. MXFP4 from bf16 pairs (2026-12-05): 4 x 1024 0.85, the same
# within 0.02 for 8 x 512, 2 x 2048, 8 x 1024 (8 warps), 2 x 1024 (2 warps), 16 x 512 (8 warps) and
# 8 x 256 (2 warps); at 4096 x 4096, 0.54-0.60 for all but 8 x 512 and 8 x 256 (0.26 and 0.21).
# Tile order and walks on an H100 (2026-12-05, two interleaved rounds, with a loop around every tile;
# `python -m companion.book bench tile_walks`): MXFP8 rows numbered along rows 0.92, down columns 0.88,
# 8 programs per SM with 2 stages 0.88; both directions along rows 0.79, down columns 0.81, 8 programs
# per SM with 3 stages 0.83 along rows and 0.78 down columns. With that loop the kernel for both
# directions held 167 registers (Nsight Compute: 19% occupancy); without it, 128. Without the loop
# (second run): both directions along rows 0.90, down columns 0.83, 8 programs per SM with 3 stages
# 0.82 along rows and 0.77 down columns; MXFP8 rows along rows 0.92, down columns 0.88.
ROWS_CONFIG = {"fp8": (8, 512, 4, 0, 1, False), "fp4": (4, 1024, 4, 0, 1, False), "fp4_bf16": (4, 1024, 4)}
ROWS_AND_COLUMNS_CONFIG = (32, 128, 2, 0, 1, False)


@triton.jit
def _mx_scale(amax_bits, EMAX: tl.constexpr, INV_MAX: tl.constexpr, RCEIL: tl.constexpr):
    """int32 patterns of block maxima -> E8M0 codes (0xFF for NaN/Inf blocks) and 2^-e as float32."""
    special = amax_bits >= 0x7F800000
    if RCEIL:
        d = tl.where(special, 0, amax_bits).to(tl.float32, bitcast=True) * INV_MAX  # no NaN arithmetic
        d_bits = d.to(tl.int32, bitcast=True)
        exp_field = d_bits >> 23
        e = tl.where(exp_field > 0, exp_field - 127 + ((d_bits & 0x7FFFFF) != 0).to(tl.int32),
                     tl.where(d_bits > 0x00400000, -126, -127))
    else:
        e = (amax_bits >> 23) - 127 - EMAX
    e = tl.minimum(tl.maximum(e, -127), 127)
    e = tl.where(special, 0, e)
    inv_scale = ((127 - e) << 23).to(tl.float32, bitcast=True)
    code = tl.where(special, 255, e + 127)
    return code, inv_scale, special


@triton.jit
def _mx_codes(y, rand, ELEM: tl.constexpr, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        if ELEM == 0:
            return to_e4m3_stochastic(y, rand)
        elif ELEM == 1:
            return to_e5m2_stochastic(y, rand)
        else:
            return to_e2m1_stochastic(y, rand)
    elif ELEM == 0:
        return to_e4m3(y)
    elif ELEM == 1:
        return to_e5m2(y)
    else:
        return to_e2m1(y)


@triton.jit
def _mx_kernel(
    x_ptr,  # *bf16/fp16/fp32, (M, K) with strides (stride_xm, stride_xk)
    row_codes_ptr,  # *uint8, (M, Kp) with Kp = K padded to 32 (FP4: (M, Kp / 2), packed)
    row_scales_ptr,  # *uint8, (M, Kp / 32): E8M0 codes
    col_codes_ptr,  # *uint8, (Mp, K) with Mp = M padded to 32
    col_scales_ptr,  # *uint8, (Mp / 32, K)
    M, K, Mp, Kp,  # shape of x and its padded extents
    stride_xm, stride_xk,  # strides of x, in elements
    seed, offset,  # stochastic rounding: Philox seed, and an offset added to every Philox counter
    ELEM: tl.constexpr,  # 0 E4M3, 1 E5M2, 2 E2M1 (packed, rows only)
    EMAX: tl.constexpr,  # exponent of the element format's top binade
    INV_MAX: tl.constexpr,  # fp32(1 / max), for rceil
    RCEIL: tl.constexpr,  # scale rounding: True rceil, False floor
    ROWS: tl.constexpr,  # write the row-wise (axis -1) quantization
    COLS: tl.constexpr,  # write the column-wise (axis 0) quantization
    BLOCK_M: tl.constexpr,  # rows per program (a multiple of 32 when COLS)
    BLOCK_K: tl.constexpr,  # columns per program (a multiple of 32)
    STOCHASTIC: tl.constexpr,  # round the codes stochastically instead of to nearest-even
    WALK: tl.constexpr,  # the programs walk the tiles in a loop (False: one program per tile)
    STAGES: tl.constexpr,  # when walking, tiles in flight per program (2 or more prefetch the next tile)
    COLUMN_MAJOR: tl.constexpr,  # number the tiles down columns instead of along rows
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(Kp, BLOCK_K)
    if WALK:  # program p of P quantizes tiles p, p + P, p + 2P, ... (see fp8_blockwise)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_k, tl.num_programs(0), num_stages=STAGES):
            pid_m, pid_k = tile_coordinates(tile, tiles_m, tiles_k, COLUMN_MAJOR)
            _mx_tile(x_ptr, row_codes_ptr, row_scales_ptr, col_codes_ptr, col_scales_ptr, M, K, Mp, Kp,
                     stride_xm, stride_xk, seed, offset, pid_m, pid_k, ELEM, EMAX, INV_MAX, RCEIL, ROWS, COLS,
                     BLOCK_M, BLOCK_K, STOCHASTIC)
    else:
        pid_m, pid_k = tile_coordinates(tl.program_id(0), tiles_m, tiles_k, COLUMN_MAJOR)
        _mx_tile(x_ptr, row_codes_ptr, row_scales_ptr, col_codes_ptr, col_scales_ptr, M, K, Mp, Kp,
                 stride_xm, stride_xk, seed, offset, pid_m, pid_k, ELEM, EMAX, INV_MAX, RCEIL, ROWS, COLS,
                 BLOCK_M, BLOCK_K, STOCHASTIC)


@triton.jit
def _mx_tile(x_ptr, row_codes_ptr, row_scales_ptr, col_codes_ptr, col_scales_ptr, M, K, Mp, Kp,
             stride_xm, stride_xk, seed, offset, pid_m, pid_k, ELEM: tl.constexpr, EMAX: tl.constexpr,
             INV_MAX: tl.constexpr, RCEIL: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Quantize the tile (pid_m, pid_k) of x: BLOCK_M rows from pid_m * BLOCK_M, BLOCK_K columns."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    x = load_tile_fp32(x_ptr, rows, cols, M, K, stride_xm, stride_xk)  # (BLOCK_M, BLOCK_K)
    magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    rand = 0
    if STOCHASTIC:  # one draw per element, shared by the two directions
        rand = tile_random_bits(seed, offset, rows, pid_k * BLOCK_K, K, BLOCK_M, BLOCK_K)

    if ROWS:
        NB: tl.constexpr = BLOCK_K // 32
        amax = tl.max(tl.reshape(magnitude, (BLOCK_M, NB, 32)), axis=2)  # (BLOCK_M, NB)
        code, inv_scale, special = _mx_scale(amax, EMAX, INV_MAX, RCEIL)
        y = tl.reshape(x, (BLOCK_M, NB, 32)) * inv_scale[:, :, None]
        r = tl.reshape(rand, (BLOCK_M, NB, 32)) if STOCHASTIC else 0
        q = tl.where(special[:, :, None], 0, _mx_codes(y, r, ELEM, STOCHASTIC))
        q = tl.reshape(q, (BLOCK_M, BLOCK_K))
        blocks = pid_k * NB + tl.arange(0, NB)
        s_mask = (rows[:, None] < M) & (blocks[None, :] < Kp // 32)
        s_offsets = rows[:, None].to(tl.int64) * (Kp // 32) + blocks[None, :]
        tl.store(row_scales_ptr + s_offsets, code.to(tl.uint8), mask=s_mask)
        if ELEM == 2:
            low, high = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_K // 2, 2)))
            packed = (low | (high << 4)).to(tl.uint8)
            half = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            p_mask = (rows[:, None] < M) & (half[None, :] < Kp // 2)
            p_offsets = rows[:, None].to(tl.int64) * (Kp // 2) + half[None, :]
            tl.store(row_codes_ptr + p_offsets, packed, mask=p_mask)
        else:
            c_mask = (rows[:, None] < M) & (cols[None, :] < Kp)
            c_offsets = rows[:, None].to(tl.int64) * Kp + cols[None, :]
            tl.store(row_codes_ptr + c_offsets, q.to(tl.uint8), mask=c_mask)

    if COLS:
        MB: tl.constexpr = BLOCK_M // 32
        amax = tl.max(tl.reshape(magnitude, (MB, 32, BLOCK_K)), axis=1)  # (MB, BLOCK_K)
        code, inv_scale, special = _mx_scale(amax, EMAX, INV_MAX, RCEIL)
        y = tl.reshape(x, (MB, 32, BLOCK_K)) * inv_scale[:, None, :]
        r = tl.reshape(rand, (MB, 32, BLOCK_K)) if STOCHASTIC else 0
        q = tl.where(special[:, None, :], 0, _mx_codes(y, r, ELEM, STOCHASTIC))
        q = tl.reshape(q, (BLOCK_M, BLOCK_K))
        blocks = pid_m * MB + tl.arange(0, MB)
        s_mask = (blocks[:, None] < Mp // 32) & (cols[None, :] < K)
        s_offsets = blocks[:, None].to(tl.int64) * K + cols[None, :]
        tl.store(col_scales_ptr + s_offsets, code.to(tl.uint8), mask=s_mask)
        c_mask = (rows[:, None] < Mp) & (cols[None, :] < K)
        c_offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
        tl.store(col_codes_ptr + c_offsets, q.to(tl.uint8), mask=c_mask)


@triton.jit
def _mxfp4_bf16_kernel(
    x_ptr,  # *int32: a bf16 (M, K) tensor with contiguous rows, read as pairs: (M, K / 2) words
    codes_ptr,  # *uint8, (M, Kp / 2): E2M1 codes packed two per byte, Kp = K padded to 32
    scales_ptr,  # *uint8, (M, Kp / 32): E8M0 codes
    M, K_WORDS, Kp,  # rows, K / 2, padded K
    stride_xm,  # row stride of x, in words
    EMAX: tl.constexpr, INV_MAX: tl.constexpr, RCEIL: tl.constexpr,  # as in _mx_kernel
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # elements per row per program (a multiple of 32)
):
    """MXFP4 along rows from bf16 pairs: the whole element pass two elements per instruction."""
    NB: tl.constexpr = BLOCK_K // 32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    words = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask = (rows[:, None] < M) & (words[None, :] < K_WORDS)
    w = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + words[None, :], mask=mask, other=0)
    w = tl.reshape(w, (BLOCK_M, NB, 16))  # 16 words = one block of 32
    amax = tl.reduce(w & 0x7FFF7FFF, 2, max_halves)  # the block's largest magnitude in each half
    amax = tl.maximum(amax & 0xFFFF, amax >> 16)
    code, inv_scale, special = _mx_scale(amax << 16, EMAX, INV_MAX, RCEIL)  # as float32 patterns
    half = inv_scale.to(tl.int32, bitcast=True) >> 16  # 2^-e as bf16 (normal: e <= 126 for bf16 input)
    q = to_e2m1_pairs(w, (half | (half << 16))[:, :, None])
    keep = tl.where(special, 0, 0xFF)[:, :, None]  # NaN/Inf blocks: zero codes
    packed = tl.reshape((q | (q >> 12)) & keep, (BLOCK_M, BLOCK_K // 2))  # first code low nibble, second high
    blocks = tl.program_id(1) * NB + tl.arange(0, NB)
    s_mask = (rows[:, None] < M) & (blocks[None, :] < Kp // 32)
    tl.store(scales_ptr + rows[:, None].to(tl.int64) * (Kp // 32) + blocks[None, :], code.to(tl.uint8), mask=s_mask)
    p_mask = (rows[:, None] < M) & (words[None, :] < Kp // 2)
    tl.store(codes_ptr + rows[:, None].to(tl.int64) * (Kp // 2) + words[None, :], packed.to(tl.uint8), mask=p_mask)


def _as_bf16_pairs(x):
    """x viewed as int32 words of bf16 pairs, or None where the view does not exist (odd K, odd strides
    or offset, non-contiguous rows)."""
    if x.dtype != torch.bfloat16 or x.shape[1] % 2 or x.stride(1) != 1 or x.stride(0) % 2 or x.storage_offset() % 2:
        return None
    return x.view(torch.int32)


def _check(x, elem, scale_rounding, rounding, who):
    check_rounding(rounding)
    if elem not in MX_ELEMENTS:
        raise ValueError(f"{who}: elem must be one of {', '.join(MX_ELEMENTS)}, got {elem!r}")
    if scale_rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"{who}: scale_rounding must be 'floor' or 'rceil', got {scale_rounding!r}")
    runtime.check_tensor(x, "x", dtypes=INPUT_DTYPES, contiguous=False, ndim=2)


def _launch(x, elem, scale_rounding, rounding, seed, offset, rows, cols):
    M, K = x.shape
    Mp, Kp = -(-M // 32) * 32, -(-K // 32) * 32
    kind, emax, inv_max, code_dtype = MX_ELEMENTS[elem]
    dev = x.device
    # Every element of the outputs is written by the kernel (padding included), so no memset is needed.
    # A direction not asked for gets no buffers: its pointers are never read or written (the kernel's
    # ROWS / COLS branches are compiled out), so any tensor stands in (each allocation costs host time).
    row_codes = torch.empty((M, Kp // 2 if kind == 2 else Kp), dtype=torch.uint8, device=dev) if rows else None
    row_scales = torch.empty((M, Kp // 32), dtype=torch.uint8, device=dev) if rows else None
    col_codes = torch.empty((Mp, K), dtype=torch.uint8, device=dev) if cols else None
    col_scales = torch.empty((Mp // 32, K), dtype=torch.uint8, device=dev) if cols else None
    pairs = _as_bf16_pairs(x) if kind == 2 and rows and not cols and rounding == "nearest_even" else None
    if x.numel() and pairs is not None:
        block_m, block_k, warps = ROWS_CONFIG["fp4_bf16"]
        # NaN and Inf go through the pair arithmetic (their codes are discarded); the interpreter, which
        # emulates it with NumPy, is told not to warn about what the GPU does silently.
        with np.errstate(invalid="ignore", over="ignore"):
            _mxfp4_bf16_kernel[(triton.cdiv(M, block_m), triton.cdiv(Kp, block_k))](
                pairs, row_codes, row_scales, M, K // 2, Kp, pairs.stride(0),
                EMAX=emax, INV_MAX=inv_max, RCEIL=scale_rounding == "rceil", BLOCK_M=block_m, BLOCK_K=block_k,
                num_warps=warps)
    elif x.numel():
        block_m, block_k, warps, per_sm, stages, column_major = (
            ROWS_AND_COLUMNS_CONFIG if cols else ROWS_CONFIG["fp4" if kind == 2 else "fp8"])
        n_tiles = triton.cdiv(M, block_m) * triton.cdiv(Kp, block_k)
        dummy = row_codes if rows else col_codes
        _mx_kernel[(runtime.persistent_programs(n_tiles, per_sm),)](
            x, row_codes if rows else dummy, row_scales if rows else dummy,
            col_codes if cols else dummy, col_scales if cols else dummy,
            M, K, Mp, Kp, x.stride(0), x.stride(1), int(seed), int(offset),
            ELEM=kind, EMAX=emax, INV_MAX=inv_max, RCEIL=scale_rounding == "rceil",
            ROWS=rows, COLS=cols, BLOCK_M=block_m, BLOCK_K=block_k, STOCHASTIC=rounding == "stochastic",
            WALK=per_sm > 0, STAGES=stages, COLUMN_MAJOR=column_major, num_warps=warps,
        )
    out = []
    if rows:
        out += [row_codes.view(code_dtype), row_scales.view(torch.float8_e8m0fnu)]
    if cols:
        out += [col_codes.view(code_dtype), col_scales.view(torch.float8_e8m0fnu)]
    return tuple(out)


def quantize_mx_rows(x: torch.Tensor, elem: str = "fp8_e4m3", scale_rounding: str = "floor", *,
                     rounding: str = "nearest_even", seed: int = 0, offset: int = 0):
    """MX-quantize a 2-D tensor along its rows (blocks of 32 along the last axis).

    Returns ``(codes, scales)`` as :meth:`companion.mx.MXTensor.to_torch` would: codes of shape
    ``(M, K padded to 32)`` (``float8_e4m3fn``/``float8_e5m2``; FP4 packed to ``float4_e2m1fn_x2`` of
    half that width) and E8M0 scales ``(M, K_padded / 32)`` as ``float8_e8m0fnu``.
    ``rounding="stochastic"`` rounds the element codes stochastically (unbiased; Philox draws keyed by
    ``seed`` and each element's position, ``offset`` shifting the counters); the scales stay as they are.
    """
    _check(x, elem, scale_rounding, rounding, "quantize_mx_rows")
    return _launch(x, elem, scale_rounding, rounding, seed, offset, rows=True, cols=False)


def quantize_mx_rows_and_columns(x: torch.Tensor, elem: str = "fp8_e4m3", scale_rounding: str = "floor", *,
                                 rounding: str = "nearest_even", seed: int = 0, offset: int = 0):
    """MXFP8 along rows and along columns from one read of ``x``.

    Returns ``(row_codes, row_scales, col_codes, col_scales)``: the first pair as
    :func:`quantize_mx_rows`; the second as ``quantize_mx(x, elem, axis=0)`` lays them out, codes
    ``(M padded to 32, K)`` and scales ``(M_padded / 32, K)``. ``rounding``, ``seed`` and ``offset`` as
    in :func:`quantize_mx_rows`; an element's two codes are rounded with the same random draw.
    """
    _check(x, elem, scale_rounding, rounding, "quantize_mx_rows_and_columns")
    if elem == "fp4_e2m1":
        raise ValueError("quantize_mx_rows_and_columns: MXFP4 column-wise codes are not supported; use fp8_e4m3 or fp8_e5m2")
    return _launch(x, elem, scale_rounding, rounding, seed, offset, rows=True, cols=True)
