"""FP8 E4M3 quantization with DeepSeek-V3's block scales: 1 x 128 for activations, 128 x 128 for weights.

One program owns a ``BLOCK_M x BLOCK_K`` tile of the input, ``BLOCK_K`` a multiple of 128, viewed as
``(BLOCK_M, BLOCK_K / 128, 128)``: for 1 x 128 scales one amax per row and block, for 128 x 128 scales
(``BLOCK_M = 128``) one amax per block over all of the tile's rows. The arithmetic, all in float32:

    amax  = max |x| over the finite elements of the block      (exact: a max of bit patterns)
    s     = amax / 448                                          (IEEE division, nearest-even)
    s     = max(s, 2^-149)                                      (a tiny block keeps a positive scale)
    s     = 2^ceil(log2 s), at least 2^-126                     (only with power_of_two_scales)
    s     = 1                                                   (an all-zero or all-non-finite block)
    code  = E4M3(x / s)                                         (IEEE division, then nearest-even,
                                                                 saturating at +-448, NaN -> 0x7F)

which is what :func:`companion.scaling.quantize` defines for ``fp8_e4m3`` with ``per_tile(1, 128)``
or ``per_tile(128, 128)`` and fp32 scales, where it computes in float64 (the tests show the bits
agree). ``fp8_blockwise_reference`` states the float32 arithmetic directly; it is also the
definition of the power-of-two variant, which ``companion.scaling`` does not have (its e8m0 scales
round to nearest, not up). Divisions use ``tl.math.div_rn``: Triton's ``/`` on float32 may compile to
an approximate division.

The NVFP4 kernel divides with one reciprocal per block and a correction per element
(:func:`companion.kernels.float_codes.divide_by_scale`). This kernel keeps ``div_rn``: measured in one
run on an H100 (8192 x 8192 bf16, fractions of the copy rate), that division in its compiled form
(``fma.rm`` for the remainder, 56 and 59 registers) gave 0.89 against 0.88 for 1 x 128 blocks and
0.70 against 0.83 for 128 x 128 tiles, with the same bits on every special value; the form that puts
the sign back as a bit gave 0.89 and 0.69. An earlier run on an H200 had the reciprocal ahead for
128 x 128 tiles (0.77 against 0.71) in a form that lost the sign of -0, so the gain is not robust.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from companion import runtime
from companion.formats import get_format
from companion.kernels.float_codes import (
    load_tile_fp32, tile_coordinates, tile_random_bits, to_e4m3, to_e4m3_stochastic,
)

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TILES = ((1, 128), (128, 128))
E4M3_MAX = 448.0
# Launch configurations: (BLOCK_M, BLOCK_K, num_warps, programs per SM, pipeline stages, tiles numbered
# down columns). 0 programs per SM starts one program per tile and no loop; otherwise that many
# programs per SM walk the tiles in a tl.range loop with that many stages (see _fp8_blockwise_kernel).
# 1 x 128 blocks: a program quantizes BLOCK_K / 128 blocks of each of its rows. Wide rows read longer
# contiguous runs: on an H200, bf16 8192 x 8192 (16384 x 16384), in TB/s, 32 x 128 3.29 (3.60),
# 16 x 256 3.36 (3.69), 8 x 512 3.43 (3.72), 4 x 1024 3.47 (3.71); 8 warps and 2 x 2048 were slower.
# With two warps, as fractions of the 1 GiB copy rate in one run: 2 x 1024 0.84, 4 x 512 0.84, against
# 0.82 for 8 x 512 with four. Tile order and walks, on an H100 (2026-12-05, two interleaved rounds,
# fractions of the copy rate; `python -m companion.book bench tile_walks` repeats it): tiles numbered
# along rows 0.93, down columns (the order of the earlier two-dimensional grid) 0.89; 4 x 512 along
# rows 0.91; 8 programs per SM walking with 2 stages 0.71, 4 with 3 stages 0.64. Those runs kept the
# loop even for one tile per program, which cost registers (below); for 1 x 128 blocks, 63 against 56.
ROW_BLOCK_CONFIG = (2, 1024, 2, 0, 1, False)
# 128 x 128 tiles: BLOCK_K / 128 tiles side by side per program. One tile and 16 warps is best on an
# H200 (8192^2 bf16: 2.93 TB/s; 32 warps 1.97; two tiles with 16 or 32 warps 2.17 and 2.29; four tiles
# 1.85). On an H100, one run: a program per tile without a loop, the tiles down columns, 0.83 of the
# copy rate (the same arithmetic as a kernel on a two-dimensional grid); the same programs inside a
# loop that runs once, 0.57 down columns and 0.55 along rows -- the loop takes the kernel from 56 to 76
# registers, and at 512 threads a program that leaves room for one program per SM instead of two
# (Nsight Compute: 25% occupancy, no eligible warp in 57% of the cycles). Walks: one program per SM
# with 3 stages 0.70, two with 2 stages 0.51. Without the loop (H100, 2026-12-05, second run): along
# rows 0.87, down columns 0.83; walks 0.70 (one program per SM, 3 stages) and 0.70 (two, 2 stages).
TILE_CONFIG = (128, 128, 16, 0, 1, False)


@triton.jit
def _fp8_blockwise_kernel(
    x_ptr,  # *bf16/fp16/fp32, (M, K) with strides (stride_xm, stride_xk)
    codes_ptr,  # *uint8, (M, K) contiguous: E4M3 codes
    scales_ptr,  # *float32, (cdiv(M, TILE_ROWS), cdiv(K, 128)) contiguous
    M, K,  # shape of x
    stride_xm, stride_xk,  # strides of x, in elements
    n_scale_cols,  # cdiv(K, 128)
    TILE_ROWS: tl.constexpr,  # 1 (activations) or 128 (weights): rows that share a scale
    BLOCK_M: tl.constexpr,  # rows per program (TILE_ROWS when that is 128)
    BLOCK_K: tl.constexpr,  # columns per program: a multiple of 128
    POW2: tl.constexpr,  # round each scale up to a power of two
    seed, offset,  # stochastic rounding: Philox seed, and an offset added to every Philox counter
    STOCHASTIC: tl.constexpr,  # round the codes stochastically instead of to nearest-even
    WALK: tl.constexpr,  # the programs walk the tiles in a loop (False: one program per tile)
    STAGES: tl.constexpr,  # when walking, tiles in flight per program (2 or more prefetch the next tile)
    COLUMN_MAJOR: tl.constexpr,  # number the tiles down columns instead of along rows
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    if WALK:  # program p of P quantizes tiles p, p + P, p + 2P, ...
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_k, tl.num_programs(0), num_stages=STAGES):
            pid_m, pid_k = tile_coordinates(tile, tiles_m, tiles_k, COLUMN_MAJOR)
            _fp8_tile(x_ptr, codes_ptr, scales_ptr, M, K, stride_xm, stride_xk, n_scale_cols, pid_m, pid_k,
                      TILE_ROWS, BLOCK_M, BLOCK_K, POW2, seed, offset, STOCHASTIC)
    else:  # no loop: a loop the compiler cannot prove runs once costs registers (76 against 56 at 128 x 128)
        pid_m, pid_k = tile_coordinates(tl.program_id(0), tiles_m, tiles_k, COLUMN_MAJOR)
        _fp8_tile(x_ptr, codes_ptr, scales_ptr, M, K, stride_xm, stride_xk, n_scale_cols, pid_m, pid_k,
                  TILE_ROWS, BLOCK_M, BLOCK_K, POW2, seed, offset, STOCHASTIC)


@triton.jit
def _fp8_tile(x_ptr, codes_ptr, scales_ptr, M, K, stride_xm, stride_xk, n_scale_cols, pid_m, pid_k,
              TILE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, POW2: tl.constexpr,
              seed, offset, STOCHASTIC: tl.constexpr):
    """Quantize the tile (pid_m, pid_k) of x: BLOCK_M rows from pid_m * BLOCK_M, BLOCK_K columns."""
    NB: tl.constexpr = BLOCK_K // 128  # scale blocks per row of the tile
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    x = load_tile_fp32(x_ptr, rows, cols, M, K, stride_xm, stride_xk)  # (BLOCK_M, BLOCK_K)

    # amax over finite elements, as a max of bit patterns (order-preserving for non-negative floats)
    magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    finite = tl.where(magnitude < 0x7F800000, magnitude, 0)
    amax_bits = tl.max(tl.reshape(finite, (BLOCK_M, NB, 128)), axis=2)  # (BLOCK_M, NB): per row block
    if TILE_ROWS == 128:
        amax_bits = tl.max(amax_bits, axis=0)  # (NB,): per 128 x 128 tile
    amax = amax_bits.to(tl.float32, bitcast=True)

    s_bits = tl.math.div_rn(amax, 448.0).to(tl.int32, bitcast=True)
    s_bits = tl.maximum(s_bits, 1)  # at least 2^-149
    if POW2:
        rounded_up = (s_bits + 0x7FFFFF) & 0x7F800000
        s_bits = tl.where(s_bits < 0x00800000, 0x00800000, rounded_up)
    s_bits = tl.where(amax_bits == 0, 0x3F800000, s_bits)  # empty block: scale 1
    s = s_bits.to(tl.float32, bitcast=True)

    blocks = pid_k * NB + tl.arange(0, NB)
    if TILE_ROWS == 1:
        den = s[:, :, None]
        tl.store(scales_ptr + rows[:, None].to(tl.int64) * n_scale_cols + blocks[None, :], s,
                 mask=(rows[:, None] < M) & (blocks[None, :] < n_scale_cols))
    else:
        den = s[None, :, None]
        tl.store(scales_ptr + pid_m * n_scale_cols + blocks, s, mask=blocks < n_scale_cols)
    y = tl.reshape(tl.math.div_rn(tl.reshape(x, (BLOCK_M, NB, 128)), den), (BLOCK_M, BLOCK_K))
    c_offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    if STOCHASTIC:
        # Random bits keyed by each element's position: the same seed gives the same bits.
        rand = tile_random_bits(seed, offset, rows, pid_k * BLOCK_K, K, BLOCK_M, BLOCK_K)
        codes = to_e4m3_stochastic(y, rand).to(tl.uint8)
    else:
        codes = to_e4m3(y).to(tl.uint8)
    tl.store(codes_ptr + c_offsets, codes, mask=(rows[:, None] < M) & (cols[None, :] < K))


def check_rounding(rounding: str) -> bool:
    """True for "stochastic", False for "nearest_even"; anything else is refused."""
    if rounding not in ("nearest_even", "stochastic"):
        raise ValueError(f"rounding must be 'nearest_even' or 'stochastic', got {rounding!r}")
    return rounding == "stochastic"


def _check_tile(tile):
    tile = tuple(tile)
    if tile not in TILES:
        raise ValueError(f"tile must be (1, 128) (activations) or (128, 128) (weights), got {tile}")
    return tile


def quantize_fp8_blockwise(x: torch.Tensor, tile=(1, 128), power_of_two_scales: bool = False,
                           rounding: str = "nearest_even", seed: int = 0, offset: int = 0):
    """Quantize a 2-D bf16/fp16/fp32 tensor to FP8 E4M3 with one float32 scale per ``tile``.

    ``rounding="stochastic"`` rounds each quotient x / s up or down with probability given by its
    distance to the two neighbouring E4M3 values (unbiased), drawing Philox random numbers keyed by
    ``seed`` and each element's position (``offset`` shifts the Philox counters; see
    :func:`companion.kernels.float_codes.tile_random_bits`): reproducible for a given seed, different for another. Scales are the same as with nearest-even rounding.

    Returns ``(codes, scales)``: codes of x's shape as ``torch.float8_e4m3fn``, and float32 scales of
    shape ``(ceil(M / tile[0]), ceil(K / tile[1]))`` with ``x ~= codes * scales`` (expanded). Any
    strides and any shape work; partial tiles at the edges use only their real elements.
    """
    tile = _check_tile(tile)
    stochastic = check_rounding(rounding)
    runtime.check_tensor(x, "x", dtypes=INPUT_DTYPES, contiguous=False, ndim=2)
    M, K = x.shape
    rows, cols = tile
    codes = torch.empty((M, K), dtype=torch.uint8, device=x.device)
    scales = torch.empty((triton.cdiv(M, rows), triton.cdiv(K, cols)), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return codes.view(torch.float8_e4m3fn), scales
    block_m, block_k, warps, per_sm, stages, column_major = ROW_BLOCK_CONFIG if rows == 1 else TILE_CONFIG
    if runtime.INTERPRET:  # small tiles (two blocks per row) where the tile allows: the multi-block path runs in CI
        block_m, block_k = (4, 256) if rows == 1 else (128, 256)
    n_tiles = triton.cdiv(M, block_m) * triton.cdiv(K, block_k)
    _fp8_blockwise_kernel[(runtime.persistent_programs(n_tiles, per_sm),)](
        x, codes, scales, M, K, x.stride(0), x.stride(1), scales.shape[1],
        TILE_ROWS=rows, BLOCK_M=block_m, BLOCK_K=block_k, POW2=bool(power_of_two_scales),
        seed=int(seed), offset=int(offset), STOCHASTIC=stochastic, WALK=per_sm > 0,
        STAGES=stages, COLUMN_MAJOR=column_major, num_warps=warps,
    )
    return codes.view(torch.float8_e4m3fn), scales


def fp8_blockwise_reference(x, tile=(1, 128), power_of_two_scales: bool = False):
    """The definition, in NumPy float32 (see the module docstring); E4M3 rounding from companion.formats.

    Returns ``(codes, scales)`` like :func:`quantize_fp8_blockwise`, as CPU tensors.
    """
    rows, cols = _check_tile(tile)
    xf = torch.as_tensor(x).detach().to("cpu", torch.float32).numpy()
    M, K = xf.shape
    gm, gk = -(-M // rows), -(-K // cols)
    padded = np.zeros((gm * rows, gk * cols), dtype=np.float32)
    padded[:M, :K] = xf
    blocks = padded.reshape(gm, rows, gk, cols)
    with np.errstate(invalid="ignore"):
        magnitude = np.where(np.isfinite(blocks), np.abs(blocks), np.float32(0))
    amax = magnitude.max(axis=(1, 3)).astype(np.float32)
    s = np.maximum(amax / np.float32(E4M3_MAX), np.float32(2.0 ** -149))  # float32 division
    if power_of_two_scales:
        m, e = np.frexp(s)
        s = np.where(m == 0.5, s, np.ldexp(np.float32(1), e)).astype(np.float32)
        s = np.maximum(s, np.float32(2.0 ** -126))
    s = np.where(amax > 0, s, np.float32(1)).astype(np.float32)
    expanded = np.repeat(np.repeat(s, rows, axis=0), cols, axis=1)[:M, :K]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y = xf / expanded  # float32 division
    codes = get_format("fp8_e4m3").encode(y, saturate=True).astype(np.uint8)
    return torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(s)
