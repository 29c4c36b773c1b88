"""The FP8 block-scaled GEMM of :mod:`companion.kernels.fp8_gemm`, written for Hopper in Gluon.

The arithmetic is the same -- each 128-wide slice of K summed on the Tensor Core, then scaled and added
into an FP32 accumulator -- but the schedule is not. In the Triton kernel every warp of a program loads,
waits and multiplies in step, so while the program scales one slice's partial sums on the CUDA cores
its Tensor Core work has drained and nothing refills it. Here a 128 x 256 tile of C is split between
two warp groups (64 rows each) that never wait for each other:

* the tiles of A and B arrive by TMA, and their scales by ``cp.async``, into a ring of ``STAGES``
  shared-memory buffers, each with a "ready" barrier (all those bytes have landed) and an "empty"
  barrier (both warp groups are done with it); the first warp group issues the copies of slice
  i + STAGES - 1 when it has finished slice i;
* each warp group, per slice and per 128-column half of its 64 x 256 piece: issues a ``wgmma``
  (64 x 128 x 128, A and B read from shared memory), waits for it, and scales its partial sums into
  that half's accumulator -- and while it does that, the other warp group's ``wgmma`` keeps the Tensor
  Core busy, which is the whole point (DeepSeek-V3 does the same with its two math warp groups).

The tile is 256 columns wide because every slice of A that crosses from L2 then feeds twice the work
of a 128 x 128 tile: at 128 x 128 the copies kept the L2 at 78% of its throughput while the Tensor
Cores idled a third of the time. A thread then holds two 64 x 128 FP32 accumulators and one partial
sum, 192 registers; with no third partition the kernel runs 8 warps, so it may use 255 registers a
thread (12 warps, with a copying warp of its own, cap it at 168).

Gluon (``triton.experimental.gluon``) is Triton's lower-level dialect: layouts, shared memory,
barriers and warp specialization are written out instead of chosen by the compiler. It compiles only
for the GPU, so :func:`companion.kernels.fp8_blockwise_matmul` uses this kernel on a Hopper GPU when
the operands suit TMA, and the Triton kernel everywhere else (the interpreter included); both sum in
the same order.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# The TMA copies were renamed after triton 3.6 (async_copy_* -> async_load / async_store).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

BLOCK_K = 128  # the scale block: one wgmma sum per slice of K
ROWS = 64  # rows of the tile per warp group: wgmma's M
BLOCK_M = 128
REGS = 232  # registers a thread asked for the second warp group
# (STAGES, GROUP_M, BLOCK_N) by the layout of B's scales and the output's width. With 128 x 128 blocks
# of B and a 16-bit output, four stages of 48 KB, the two 16 KB store buffers and the scales take
# 231,700 of the 232,448 bytes of shared memory a program may have; an FP32 output's store buffers
# leave room for three. With one scale per row of B the promotion multiplies a 64 x 128 tile of scale
# products, which with two accumulators does not fit in registers: 128 columns, four stages.
CONFIGS = {(128, 2): (4, 16, 256), (128, 4): (3, 16, 256), (1, 2): (4, 16, 128), (1, 4): (4, 16, 128)}
# The stored benchmark (H100, 2026-12-05, GPU time from CUDA graphs): 0.95 / 0.86 / 0.89 of
# torch._scaled_mm rowwise at 4096^3 / 8192^3 / 4096 x 7168 x 16384. The trials below were timed with
# do_bench on an H100 (the same day; launch overhead included, which costs the 4096^3 product a few
# percent), as fractions of _scaled_mm at the same shapes, bits identical in every variant, two runs each:
#   this kernel, 128 x 256, 4 stages: 0.90 / 0.82 / 0.85 and 0.89 / 0.82 / 0.89; 3 stages 0.85-0.88 /
#   0.80-0.83 / 0.81-0.87; 2 stages 0.51 / 0.50 / 0.49; GROUP_M 8 within 3%; copies for slice i + 2
#   instead of i + 3 (a slot the other warp group surely released) 0.85-0.87 / 0.82 / 0.84-0.88;
#   the same with 128 x 128 tiles: 0.73 / 0.67-0.69 / 0.67-0.72; A read into registers once per slice
#   (ldmatrix) instead of from shared memory by each half's wgmma: 0.83-0.84 / 0.75-0.77 / 0.80 against
#   0.89-0.91 / 0.79-0.80 / 0.85 in the same run;
#   the previous kernel, 128 x 128 tiles, a one-warp copying partition (12 warps, so 168 registers a
#   thread): 0.78-0.80 / 0.73-0.79 / 0.74-0.80 -- its profile (Nsight Compute, 8192^3): L2 78% busy,
#   Tensor pipe 63%, the math warps' stalls split between barriers, the ready wait and the scale loads;
#   moving its scale loads into the ring (cp.async) changed nothing, and 128 x 256 tiles there spilled.
# Earlier, with 128 x 128 tiles and the scales read from global memory, none faster than that: warp groups
# taking strict turns on the Tensor Core 0.71 / 0.70 / 0.69; two wgmma sums in flight per warp group
# 0.54-0.70 (the compiler copies the in-flight registers); three warp groups on 192 x 128 tiles
# 0.74 / 0.73 / 0.72; persistent programs 0.66 / 0.61 / 0.62. The Triton kernel: 0.60-0.69.


@gluon.jit
def _load_slice(a_desc, b_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, sa_ptrs, sb_ptrs, stride_sak,
                stride_sbk, off_m, off_n, j):
    """Slice j of A's and B's tiles (TMA) and of their scales (cp.async, four bytes a thread) into buffer
    j % STAGES once both warp groups have released it (the buffer's previous slice was j - STAGES; a
    fresh barrier passes the first wait). The buffer's "ready" barrier completes when the TMA's bytes
    and the scales have all landed: the cp.async arrive counts itself in before the expect arrives."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    BK: gl.constexpr = a_bufs.type.shape[2]
    s = j % STAGES
    mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
    async_copy.async_copy_global_to_shared(sa_bufs.index(s), sa_ptrs + j * stride_sak)
    async_copy.async_copy_global_to_shared(sb_bufs.index(s), sb_ptrs + j * stride_sbk)
    async_copy.mbarrier_arrive(ready.index(s))
    mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    _tma_load(a_desc, [off_m, j * BK], ready.index(s), a_bufs.index(s))
    _tma_load(b_desc, [off_n, j * BK], ready.index(s), b_bufs.index(s))


@gluon.jit
def _scale_ptrs(sa_ptr, sb_ptr, off_m, off_n, M, N, stride_sam, stride_sbn, BM: gl.constexpr, SB: gl.constexpr,
                B_TILE_ROWS: gl.constexpr, layout: gl.constexpr):
    """Where the copies of a slice's scales come from: A's per row of the tile; B's per column of the
    tile (1 x 128 blocks), or each 128-column half's one scale twice (128 x 128 blocks)."""
    rows = off_m + gl.arange(0, BM, layout=layout)
    sa_ptrs = sa_ptr + gl.where(rows < M, rows, 0).to(gl.int64) * stride_sam
    if B_TILE_ROWS == 128:
        block = gl.minimum(off_n // 128 + gl.arange(0, SB, layout=layout) // 2, (N - 1) // 128)
        sb_ptrs = sb_ptr + block.to(gl.int64) * stride_sbn
    else:
        cols = off_n + gl.arange(0, SB, layout=layout)
        sb_ptrs = sb_ptr + gl.where(cols < N, cols, 0).to(gl.int64) * stride_sbn
    return sa_ptrs, sb_ptrs


@gluon.jit
def _half_mma(a_tile, b_bufs, s, part, HALF: gl.constexpr):
    """The wgmma of one 128-column half of the tile: A's 64 x 128 times that half of B's slice, a fresh sum."""
    b_tile = b_bufs.index(s).slice(HALF * 128, 128, dim=0).permute((1, 0))  # (128, 128) view, K-major
    return warpgroup_mma(a_tile, b_tile, part, use_acc=False, is_async=True)


@gluon.jit
def _half_scale(sa, sb_bufs, s, HALF: gl.constexpr, SCALAR_B: gl.constexpr, layout: gl.constexpr):
    """The scales that multiply one half's partial sums, as an (R, 1) tensor (A's per row times B's one
    number) or an (R, 128) one (per row and column: 1 x 128 blocks of B)."""
    if SCALAR_B:  # the half's scale is stored twice: the larger of the two is it, exactly
        pair: gl.constexpr = gl.BlockedLayout([2], [32], [4], [0])
        sb = gl.max(sb_bufs.index(s).slice(HALF * 2, 2).load(pair), axis=0)
        return (sa * sb)[:, None]
    else:
        sb = sb_bufs.index(s).slice(HALF * 128, 128).load(gl.SliceLayout(0, layout))
        return sa[:, None] * sb[None, :]


@gluon.jit
def _store_half(acc, c_desc, c_buf, row, col):
    """One 64 x 128 piece of C: rounded once, and stored by TMA, which clips rows and columns past C."""
    c_buf.store(acc.to(c_desc.dtype))
    fence_async_shared()
    _tma_store(c_desc, [row, col], c_buf)
    tma.store_wait(0)


@gluon.jit
def _warp_group(a_desc, b_desc, c_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr,
                off_m, off_n, M, N, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk,
                WARP_GROUP: gl.constexpr, B_TILE_ROWS: gl.constexpr):
    """Rows [64 WARP_GROUP, 64 WARP_GROUP + 64) of the tile of C: per slice and 128-column half, one
    wgmma and its promotion. Warp group 0 also issues the copies, STAGES - 1 slices ahead."""
    HALVES: gl.constexpr = b_bufs.type.shape[1] // 128
    NUM_STAGES: gl.constexpr = b_bufs.type.shape[0]
    BM: gl.constexpr = sa_bufs.type.shape[1]
    SB: gl.constexpr = sb_bufs.type.shape[1]
    R: gl.constexpr = 64
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128, 32])
    SCALAR_B: gl.constexpr = B_TILE_ROWS == 128  # each half's columns share one 128 x 128 block of B per slice
    COPIES: gl.constexpr = WARP_GROUP == 0
    copy_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    sa_ptrs, sb_ptrs = _scale_ptrs(sa_ptr, sb_ptr, off_m, off_n, M, N, stride_sam, stride_sbn, BM, SB, B_TILE_ROWS,
                                   copy_layout)
    if COPIES:
        for j in range(gl.minimum(NUM_STAGES - 1, num_k)):
            _load_slice(a_desc, b_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, sa_ptrs, sb_ptrs, stride_sak,
                        stride_sbk, off_m, off_n, j)

    acc0 = gl.zeros((R, 128), dtype=gl.float32, layout=mma_layout)
    acc1 = gl.zeros((R, 128), dtype=gl.float32, layout=mma_layout)  # the second half (HALVES == 2)
    part = gl.zeros((R, 128), dtype=gl.float32, layout=mma_layout)
    for i in range(num_k):
        s = i % NUM_STAGES
        mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
        a_tile = a_bufs.index(s).slice(WARP_GROUP * R, R, dim=0)  # (64, 128): this warp group's rows
        part = _half_mma(a_tile, b_bufs, s, part, 0)
        sa = sa_bufs.index(s).slice(WARP_GROUP * R, R).load(gl.SliceLayout(1, mma_layout))
        scale0 = _half_scale(sa, sb_bufs, s, 0, SCALAR_B, mma_layout)  # read while the wgmma runs
        if HALVES == 2:
            part = warpgroup_mma_wait(0, deps=(part,))
            acc0 += part * scale0
            # An empty asm that takes the new acc0 pins the order: without it the compiler moves these
            # FMAs below the next wgmma, which then needs 64 more registers for its sum, and spills.
            acc0 = gl.inline_asm_elementwise("", "=f,0", [acc0], dtype=gl.float32, is_pure=False, pack=1)
            part = _half_mma(a_tile, b_bufs, s, part, 1)
            scale1 = _half_scale(sa, sb_bufs, s, 1, SCALAR_B, mma_layout)
            part = warpgroup_mma_wait(0, deps=(part,))
            mbarrier.arrive(empty.index(s), count=1)
            acc1 += part * scale1
        else:
            part = warpgroup_mma_wait(0, deps=(part,))
            mbarrier.arrive(empty.index(s), count=1)
            acc0 += part * scale0
        if COPIES:  # the slot of slice i - 1, which this warp group released last iteration
            j = i + NUM_STAGES - 1
            if j < num_k:
                _load_slice(a_desc, b_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, sa_ptrs, sb_ptrs,
                            stride_sak, stride_sbk, off_m, off_n, j)

    c_buf = c_bufs.index(WARP_GROUP)
    _store_half(acc0, c_desc, c_buf, off_m + WARP_GROUP * R, off_n)
    if HALVES == 2:
        _store_half(acc1, c_desc, c_buf, off_m + WARP_GROUP * R, off_n + 128)


@gluon.jit
def _fp8_gemm_hopper_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, M, N, K,
                            stride_sam, stride_sak, stride_sbn, stride_sbk,
                            B_TILE_ROWS: gl.constexpr, NUM_STAGES: gl.constexpr, GROUP: gl.constexpr,
                            REGS: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    first_m = pid // (GROUP * num_pid_n) * GROUP
    group_rows = gl.minimum(num_pid_m - first_m, GROUP)
    pid_m = first_m + (pid % (GROUP * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP * num_pid_n)) // group_rows

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BN, BK], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, 64, 128], c_desc.layout)
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    SB: gl.constexpr = 2 * (BN // 128) if B_TILE_ROWS == 128 else BN
    sa_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BM], flat)
    sb_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, SB], flat)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # one arrive per warp group
    fence_async_shared()
    num_k = gl.cdiv(K, BK)
    off_m = pid_m * BM
    off_n = pid_n * BN
    # (the argument tuples are written inline: a tuple assigned to a name first would turn the constexpr
    # arguments, WARP_GROUP and B_TILE_ROWS, into tensors)
    gl.warp_specialize([
        (_warp_group, (a_desc, b_desc, c_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr,
                       off_m, off_n, M, N, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, 0, B_TILE_ROWS)),
        (_warp_group, (a_desc, b_desc, c_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr,
                       off_m, off_n, M, N, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, 1, B_TILE_ROWS)),
    ], [4], [REGS])


_GL_OUT = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


def supported(a_codes, b_codes, out_dtype) -> bool:
    """Whether this kernel takes these operands: a Hopper GPU, row-major codes whose rows start on
    16-byte boundaries (TMA), and output rows of whole 16 bytes."""
    if not (a_codes.is_cuda and torch.cuda.get_device_capability(a_codes.device)[0] == 9):
        return False
    M, K = a_codes.shape
    N = b_codes.shape[0]
    rows_ok = all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a_codes, b_codes))
    return rows_ok and min(M, N, K) > 0 and N * out_dtype.itemsize % 16 == 0


def fp8_gemm_hopper(a_codes, a_scales, b_codes, b_scales, out_dtype, b_tile_rows, config=None):
    """C = dequant(A) @ dequant(B)^T on the warp-specialized kernel; see :func:`supported`. ``config``:
    (STAGES, GROUP_M, BLOCK_N), by default from ``CONFIGS``."""
    stages, group_m, block_n = config or CONFIGS[b_tile_rows, out_dtype.itemsize]
    M, K = a_codes.shape
    N = b_codes.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_codes.device)
    fp8 = gl.float8e4nv
    a_desc = TensorDescriptor.from_tensor(a_codes, [BLOCK_M, BLOCK_K],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], fp8))
    b_desc = TensorDescriptor.from_tensor(b_codes, [block_n, BLOCK_K],
                                          gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], fp8))
    c_desc = TensorDescriptor.from_tensor(c, [ROWS, 128],
                                          gl.NVMMASharedLayout.get_default_for([ROWS, 128], _GL_OUT[out_dtype]))
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, block_n),)
    _fp8_gemm_hopper_kernel[grid](a_desc, b_desc, c_desc, a_scales, b_scales, M, N, K, *a_scales.stride(),
                                  *b_scales.stride(), B_TILE_ROWS=b_tile_rows, NUM_STAGES=stages, GROUP=group_m,
                                  REGS=REGS, num_warps=4)
    return c
