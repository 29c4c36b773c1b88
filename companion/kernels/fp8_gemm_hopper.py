"""The FP8 block-scaled GEMM of :mod:`companion.kernels.fp8_gemm`, written for Hopper in Gluon.

The arithmetic is the same -- each 128-wide slice of K summed on the Tensor Core, then scaled and added
into an FP32 accumulator -- but the schedule is not. In the Triton kernel every warp of a program loads,
waits and multiplies in step, so while the program scales one slice's partial sums on the CUDA cores
its Tensor Core work has drained and nothing refills it. Here the 128-row tile of C is split between
two warp groups (64 rows each) that never wait for each other:

* the tiles of A and B arrive by TMA into a ring of ``STAGES`` shared-memory buffers, each with a
  "ready" barrier (the TMA's bytes have landed) and an "empty" barrier (both warp groups are done
  with it); a third, one-warp partition does nothing but issue those copies, each as soon as its
  buffer is free;
* each warp group, per slice: waits for "ready", issues its ``wgmma`` (64 x BLOCK_N x 128, A and B
  read from shared memory), waits for it, marks the buffer empty, and scales its partial sums into
  its accumulator -- and while it does that, the other warp group's ``wgmma`` keeps the Tensor Core
  busy, which is the whole point (DeepSeek-V3 does the same with its two math warp groups).

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
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# The TMA copies were renamed after triton 3.6 (async_copy_* -> async_load / async_store).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

BLOCK_K = 128  # the scale block: one wgmma sum per slice of K
ROWS = 64  # rows of the tile per warp group: wgmma's M
BLOCK_M, BLOCK_N = 128, 128
# (STAGES, GROUP_M, registers per thread asked for the second warp group, and for the copying warp).
# Measured on an H100 (2026-12-05, TFLOP/s as a fraction of torch._scaled_mm rowwise at 4096^3 / 8192^3 / 4096 x 7168 x 16384,
# bits identical in every variant): with the copies issued by the first warp group instead of a warp of
# their own, 0.75-0.78 / 0.67-0.76 / 0.70-0.74 over five runs; with the copying warp (this kernel, in the
# same run as 0.77 / 0.69 / 0.71 without it) 0.79 / 0.75 / 0.78, and 0.75-0.79 / 0.69-0.74 / 0.71-0.78
# with 3, 5 or 6 stages, groups of 8 or 24 registers for the copier. The whole kernel is then compiled
# for 168 registers a thread (.maxnreg for 12 warps; setmaxnreg hands the warp groups more at run time):
# no spills with 128 x 128 scales of B, a few bytes with per-row scales of B and an FP32 output.
# Tried before the copying warp, none faster: warp groups taking strict turns on the Tensor Core (a pair
# of barriers): 0.71 / 0.70 / 0.69; two wgmma sums in flight per warp group (slice i issued before slice i - 1 is
# scaled): 0.54-0.65, the compiler copies the in-flight registers, and 0.65-0.70 with the loop unrolled
# by two so that each sum keeps its registers; three warp groups, 192 x 128 tiles
# (168 registers each): 0.74 / 0.73 / 0.72; persistent programs, one per SM, the slices of successive
# tiles one stream through the ring and each tile's store overlapping the next tile: 0.66 / 0.61 / 0.62
# (the tile bookkeeping in the loop costs more than the fill and the store it hides). The Triton
# kernel: 0.60-0.69.
CONFIG = (4, 16, 240, 40)


@gluon.jit
def _load_slice(a_desc, b_desc, a_bufs, b_bufs, ready, empty, off_m, off_n, j):
    """TMA slice j of A's and B's tiles into buffer j % STAGES once both warp groups have released it
    (the buffer's previous slice was j - STAGES; a fresh barrier passes the first wait)."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    BK: gl.constexpr = a_bufs.type.shape[2]
    s = j % STAGES
    mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    _tma_load(a_desc, [off_m, j * BK], ready.index(s), a_bufs.index(s))
    _tma_load(b_desc, [off_n, j * BK], ready.index(s), b_bufs.index(s))


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, off_m, off_n, num_k):
    """One warp that only copies: every slice, as soon as its buffer is free."""
    for j in range(num_k):
        _load_slice(a_desc, b_desc, a_bufs, b_bufs, ready, empty, off_m, off_n, j)


@gluon.jit
def _warp_group(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr, off_m, off_n, M, N,
                num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, WARP_GROUP: gl.constexpr,
                B_TILE_ROWS: gl.constexpr):
    """Rows [64 WARP_GROUP, 64 WARP_GROUP + 64) of the tile of C: per slice, one wgmma and its promotion."""
    BN: gl.constexpr = b_bufs.type.shape[1]
    NUM_STAGES: gl.constexpr = b_bufs.type.shape[0]
    R: gl.constexpr = 64
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 32])
    rows = off_m + WARP_GROUP * R + gl.arange(0, R, layout=gl.SliceLayout(1, mma_layout))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
    sa_ptrs = sa_ptr + gl.where(rows < M, rows, 0).to(gl.int64) * stride_sam
    SCALAR_B: gl.constexpr = B_TILE_ROWS == 128  # the tile's columns share one 128 x 128 block of B per slice
    if SCALAR_B:
        sb_ptrs = sb_ptr + (off_n // 128) * stride_sbn
    else:  # one scale per row of B (1 x 128 blocks): per column of C
        sb_ptrs = sb_ptr + gl.where(cols < N, cols, 0).to(gl.int64) * stride_sbn

    acc = gl.zeros((R, BN), dtype=gl.float32, layout=mma_layout)
    part = gl.zeros((R, BN), dtype=gl.float32, layout=mma_layout)
    sa_next = gl.load(sa_ptrs)
    sb_next = gl.load(sb_ptrs)
    for i in range(num_k):
        s = i % NUM_STAGES
        mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
        a_tile = a_bufs.index(s).slice(WARP_GROUP * R, R, dim=0)  # (64, 128): this warp group's rows
        b_tile = b_bufs.index(s).permute((1, 0))  # (128, BN) view of B's (BN, 128) K-major tile
        part = warpgroup_mma(a_tile, b_tile, part, use_acc=False, is_async=True)  # a fresh sum per slice
        sa, sb = sa_next, sb_next  # the next slice's scales load while the wgmma runs
        i_next = gl.minimum(i + 1, num_k - 1)
        sa_next = gl.load(sa_ptrs + i_next * stride_sak)
        sb_next = gl.load(sb_ptrs + i_next * stride_sbk)
        part = warpgroup_mma_wait(0, deps=(part,))
        mbarrier.arrive(empty.index(s), count=1)
        if SCALAR_B:
            acc += part * (sa * sb)[:, None]
        else:
            acc += part * (sa[:, None] * sb[None, :])

    c_buf = c_bufs.index(WARP_GROUP)  # rounded once, and stored by TMA, which clips rows and columns past C
    c_buf.store(acc.to(c_desc.dtype))
    fence_async_shared()
    _tma_store(c_desc, [off_m + WARP_GROUP * R, off_n], c_buf)
    tma.store_wait(0)


@gluon.jit
def _fp8_gemm_hopper_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, M, N, K,
                            stride_sam, stride_sak, stride_sbn, stride_sbk,
                            B_TILE_ROWS: gl.constexpr, NUM_STAGES: gl.constexpr, GROUP: gl.constexpr,
                            REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
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
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, 64, BN], c_desc.layout)
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
        (_warp_group, (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr, off_m, off_n,
                       M, N, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, 0, B_TILE_ROWS)),
        (_warp_group, (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr, off_m, off_n,
                       M, N, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, 1, B_TILE_ROWS)),
        (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, off_m, off_n, num_k)),
    ], [4, 1], [REGS, PRODUCER_REGS])


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


def fp8_gemm_hopper(a_codes, a_scales, b_codes, b_scales, out_dtype, b_tile_rows, config=CONFIG):
    """C = dequant(A) @ dequant(B)^T on the warp-specialized kernel; see :func:`supported`."""
    stages, group_m, regs, producer_regs = config
    M, K = a_codes.shape
    N = b_codes.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_codes.device)
    fp8 = gl.float8e4nv
    a_desc = TensorDescriptor.from_tensor(a_codes, [BLOCK_M, BLOCK_K],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], fp8))
    b_desc = TensorDescriptor.from_tensor(b_codes, [BLOCK_N, BLOCK_K],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], fp8))
    c_desc = TensorDescriptor.from_tensor(c, [ROWS, BLOCK_N],
                                          gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_N], _GL_OUT[out_dtype]))
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    _fp8_gemm_hopper_kernel[grid](a_desc, b_desc, c_desc, a_scales, b_scales, M, N, K, *a_scales.stride(),
                                  *b_scales.stride(), B_TILE_ROWS=b_tile_rows, NUM_STAGES=stages, GROUP=group_m,
                                  REGS=regs, PRODUCER_REGS=producer_regs, num_warps=4)
    return c
