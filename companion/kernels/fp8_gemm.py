"""FP8 GEMM with DeepSeek-V3's block scales: C = (A * sa) @ (B * sb)^T, promoted to FP32 every 128 of K.

A is an activation, (M, K) E4M3 codes with one float32 scale per 1 x 128 block of a row; B is a weight
stored like ``nn.Linear.weight``, (N, K) E4M3 codes with one float32 scale per 128 x 128 tile (or, for
the weight-gradient GEMM where both operands are activations, per 1 x 128 block of a row). Because
both operands are scaled along K, no single scale can be pulled out of the sum: the product of each
128-wide slice of K is taken on the Tensor Cores,

    p[m, n, j] = sum_{k in slice j} a[m, k] * b[n, k]                 (FP8 x FP8 -> Tensor Core sum)

and then scaled and added into an FP32 accumulator held in registers by the CUDA cores,

    c[m, n]   += p[m, n, j] * sa[m, j] * sb[n // 128, j]              (FP32, once per slice)

which is also the remedy DeepSeek-V3 describes for Hopper's FP8 Tensor Core accumulator, whose sum keeps
only about 14 bits: a partial sum is never longer than 128 products before it reaches FP32.

One program owns a ``BLOCK_M x BLOCK_N`` tile of C and walks K in slices of ``BLOCK_K = 128`` (the
scale block). Programs are ordered in groups of ``GROUP_M`` tile-rows so that neighbouring programs
share the tiles of A and B they read through L2.

The same kernel with per-row scales (a single scale column: ``(M, 1)`` and ``(N, 1)``) is the
"rowwise" FP8 GEMM that ``torch._scaled_mm`` also offers; there the scales can be applied once at the
end, and ``promote=False`` lets the Tensor Core keep one running sum over all of K instead of
restarting it every 128 — the configuration whose error the book measures.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from companion import runtime
from companion.kernels.float_codes import round_for_store

SCALE_BLOCK = 128
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Candidate tiles for the compiled kernel; autotuning picks per shape. From sweeps on an H200 at 8192^3
# (TFLOP/s of the blockwise GEMM): 128 x 128 with 8 warps and 4 stages 760; 64 x 128, 4 warps, 5 stages
# 660; 128 x 64 588; 128 x 256 and 256 x 128 spill registers (220 and 361; with 16 warps 128 and 443);
# 128 x 128 with 4 warps 207.
# Also tried and dropped: applying slice j - 1's scales after issuing slice j's MMA (software
# pipelining by hand: 666, slower), and Triton 3.6's warp specialization of the loop (fails to compile).
# Kept: loading the next slice's scales one iteration early (8192^3: 0.59 -> 0.61 of _scaled_mm
# rowwise; with 1 x 128 scales on both operands, the wgrad shape 16384 x 4096 x 8192: 3.46 -> 2.42 ms).
# Column-major scale arrays, as DeepGEMM asks for, were slower here with 128 x 128 tiles for B.
# Two slices per iteration, both Tensor Core sums issued before either is scaled (H100, 2026-12-05,
# same bits): 8192^3 772 TFLOP/s with 3 stages against 772 for this kernel, 0.61 of _scaled_mm rowwise
# (1260); 4096 x 7168 x 16384 775 against 796; 2 stages 0.47-0.51, 4 stages exceed shared memory.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 128, 8, 4), (128, 128, 8, 3), (64, 128, 4, 5)]
]
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2}


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr,  # *fp8 A (M, K), *fp8 B (N, K), *out C (M, N)
    sa_ptr, sb_ptr,  # *float32 scales of A and of B
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,  # element strides
    stride_sam, stride_sak, stride_sbn, stride_sbk,  # strides of the scale arrays
    B_TILE_ROWS: tl.constexpr,  # rows of B sharing one scale: 128 (weight tiles) or 1 (row blocks)
    PER_ROW: tl.constexpr,  # one scale per row for all of K (rowwise GEMM): scale at the end
    PROMOTE: tl.constexpr,  # rowwise only: restart the Tensor Core sum every BLOCK_K (True) or not
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M tile-rows are swept together along N, so A's rows stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past the edge re-read row 0 (always valid) instead of masking every load; never stored.
    rows_a = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rows_b = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None] * stride_bk  # (BLOCK_K, BLOCK_N) = B^T
    sa_ptrs = sa_ptr + rows_a * stride_sam
    sb_ptrs = sb_ptr + (rows_b // B_TILE_ROWS) * stride_sbn

    # With 128 x 128 weight tiles and BLOCK_N <= 128, the whole tile of C shares one scale of B per slice.
    SCALAR_B: tl.constexpr = B_TILE_ROWS == 128 and BLOCK_N <= 128
    if SCALAR_B:
        sb_ptrs = sb_ptr + ((pid_n * BLOCK_N) // 128) * stride_sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.cdiv(K, BLOCK_K)
    if not PER_ROW:  # the scales of slice j + 1 are loaded during slice j, off the MMA's critical path
        sa_next = tl.load(sa_ptrs)
        sb_next = tl.load(sb_ptrs)
    for j in range(0, num_k):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - j * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if PER_ROW:
            if PROMOTE:
                acc += tl.dot(a, b)  # a fresh Tensor Core sum per slice, added in FP32
            else:
                acc = tl.dot(a, b, acc)  # one Tensor Core sum over all of K
        else:
            sa, sb = sa_next, sb_next  # (BLOCK_M,) scales of A's rows, and B's (one, or BLOCK_N)
            j_next = tl.minimum(j + 1, num_k - 1)  # the last iteration re-reads its own slice
            sa_next = tl.load(sa_ptrs + j_next * stride_sak)
            sb_next = tl.load(sb_ptrs + j_next * stride_sbk)
            if SCALAR_B:
                s = (sa * sb)[:, None]  # (BLOCK_M, 1)
            else:
                s = sa[:, None] * sb[None, :]  # (BLOCK_M, BLOCK_N)
            acc += tl.dot(a, b) * s  # the Tensor Core's partial sum, promoted: one FMA per element
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if PER_ROW:
        acc = acc * (tl.load(sa_ptrs)[:, None] * tl.load(sb_ptrs)[None, :])

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, round_for_store(acc, c_ptr), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_fp8_gemm_tuned = _fp8_gemm_kernel if runtime.INTERPRET else triton.autotune(
    configs=_CONFIGS, key=["M", "N", "K", "B_TILE_ROWS", "PER_ROW", "PROMOTE"])(_fp8_gemm_kernel)


def _check_scales(scales, name, want):
    runtime.check_tensor(scales, name, dtypes=(torch.float32,), contiguous=False, ndim=2)
    if tuple(scales.shape) != want:
        raise ValueError(f"{name} has shape {tuple(scales.shape)}; expected {want} for these codes")


def _b_scale_layout(b_scales, N, K):
    """128 for 128 x 128 tile scales, 1 for 1 x 128 row-block scales; anything else is refused."""
    kb = triton.cdiv(K, SCALE_BLOCK)
    tile, rows = (triton.cdiv(N, SCALE_BLOCK), kb), (N, kb)
    shape = tuple(b_scales.shape) if isinstance(b_scales, torch.Tensor) else None
    if shape == rows:  # when N <= 128 both readings agree only if N == 1; rows win (exact)
        return 1
    if shape == tile:
        return SCALE_BLOCK
    raise ValueError(f"b_scales has shape {shape}; expected {tile} (128 x 128 tiles) or {rows} (1 x 128 blocks)")


def _check_codes(a_codes, b_codes):
    for name, t in (("a_codes", a_codes), ("b_codes", b_codes)):
        runtime.check_tensor(t, name, dtypes=(torch.float8_e4m3fn,), contiguous=False, ndim=2)
    if a_codes.shape[1] != b_codes.shape[1]:
        raise ValueError(f"a_codes is {tuple(a_codes.shape)} and b_codes is {tuple(b_codes.shape)}: "
                         f"both must have K columns (C = A @ B^T, B stored as (N, K) like nn.Linear.weight)")
    return a_codes.shape[0], b_codes.shape[0], a_codes.shape[1]


def _launch(a_codes, b_codes, a_scales, b_scales, out_dtype, b_tile_rows, per_row, promote):
    M, N, K = a_codes.shape[0], b_codes.shape[0], a_codes.shape[1]
    c = torch.empty((M, N), dtype=out_dtype, device=a_codes.device)
    if c.numel() == 0:
        return c
    if K == 0:
        return c.zero_()
    args = (a_codes, b_codes, c, a_scales, b_scales, M, N, K, *a_codes.stride(), *b_codes.stride(),
            *c.stride(), *a_scales.stride(), *b_scales.stride())
    meta = dict(B_TILE_ROWS=b_tile_rows, PER_ROW=per_row, PROMOTE=promote,
                EVEN_K=K % SCALE_BLOCK == 0, BLOCK_K=SCALE_BLOCK)
    if runtime.INTERPRET:
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _fp8_gemm_kernel[grid](*args, **meta, **cfg)
    else:
        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

        _fp8_gemm_tuned[grid](*args, **meta)
    return c


KERNELS = ("auto", "triton", "gluon")


def fp8_blockwise_matmul(a_codes: torch.Tensor, a_scales: torch.Tensor, b_codes: torch.Tensor,
                         b_scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                         kernel: str = "auto") -> torch.Tensor:
    """C = dequant(A) @ dequant(B)^T with DeepSeek-V3 block scales, FP32 accumulation, ``out_dtype`` output.

    ``a_codes`` (M, K) and ``b_codes`` (N, K) are ``torch.float8_e4m3fn``; ``a_scales`` is float32
    ``(M, ceil(K/128))`` (1 x 128 blocks, as :func:`companion.kernels.quantize_fp8_blockwise` returns with
    ``tile=(1, 128)``) and ``b_scales`` is float32 ``(ceil(N/128), ceil(K/128))`` (128 x 128 tiles) or
    ``(N, ceil(K/128))`` (1 x 128 blocks). Any M, N, K and any strides; a partial slice of K at the end
    is padded with zeros. The result differs from exact arithmetic only by the Tensor Core's sum of each
    128-wide slice, the FP32 sum over slices and the final rounding to ``out_dtype``.

    ``kernel``: "triton" runs the Triton kernel of this module (on any GPU, and under the interpreter);
    "gluon" the warp-specialized Hopper kernel of :mod:`companion.kernels.fp8_gemm_hopper` (compiled,
    on a Hopper GPU, row-major codes whose rows are whole 16 bytes); "auto" the Gluon kernel wherever
    it runs and the Triton kernel elsewhere. Both sum in the same order: their results are the same bits.
    """
    M, N, K = _check_codes(a_codes, b_codes)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    _check_scales(a_scales, "a_scales", (M, triton.cdiv(K, SCALE_BLOCK)))
    b_tile_rows = _b_scale_layout(b_scales, N, K)
    _check_scales(b_scales, "b_scales", tuple(b_scales.shape))
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "triton" and not runtime.INTERPRET:
        from companion.kernels import fp8_gemm_hopper

        if fp8_gemm_hopper.supported(a_codes, b_codes, out_dtype):
            return fp8_gemm_hopper.fp8_gemm_hopper(a_codes, a_scales, b_codes, b_scales, out_dtype, b_tile_rows)
    if kernel == "gluon" and min(M, N, K) > 0:  # (empty products need no kernel)
        raise ValueError("kernel='gluon' needs a compiled Hopper GPU (not the interpreter), row-major FP8 codes "
                         "whose rows start on 16-byte boundaries, and output rows that are whole 16 bytes")
    return _launch(a_codes, b_codes, a_scales, b_scales, out_dtype, b_tile_rows, False, True)


def fp8_rowwise_matmul(a_codes: torch.Tensor, a_scales: torch.Tensor, b_codes: torch.Tensor,
                       b_scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                       promote: bool = True) -> torch.Tensor:
    """C = (a_scales * A) @ (b_scales * B)^T with one float32 scale per row: ``(M, 1)`` and ``(N, 1)``.

    With ``promote=True`` each 128-wide slice of K is summed on the Tensor Core and added in FP32; with
    ``promote=False`` the Tensor Core keeps one sum over all of K (on Hopper, Triton's default for FP8,
    whose accumulator keeps fewer bits than FP32 — the error the book measures).
    """
    M, N, K = _check_codes(a_codes, b_codes)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    _check_scales(a_scales, "a_scales", (M, 1))
    _check_scales(b_scales, "b_scales", (N, 1))
    return _launch(a_codes, b_codes, a_scales, b_scales, out_dtype, 1, True, bool(promote))


def fp8_blockwise_matmul_reference(a_codes, a_scales, b_codes, b_scales) -> torch.Tensor:
    """The definition in float64 (CPU): each 128-slice's exact product, times its two scales, summed.

    Accepts the scale layouts of :func:`fp8_blockwise_matmul` and of :func:`fp8_rowwise_matmul`.
    Returns the unrounded (M, N) float64 result; FP8 x FP8 products and their sums over 128 terms are
    exact in float64, so this is the exact value up to the float64 sum over slices.
    """
    a = a_codes.detach().cpu().float().double()
    b = b_codes.detach().cpu().float().double()
    sa = a_scales.detach().cpu().double()
    sb = b_scales.detach().cpu().double()
    M, K = a.shape
    N = b.shape[0]
    if sa.shape[1] == 1 and sb.shape[1] == 1 and K > SCALE_BLOCK:  # rowwise: one scale for all of K
        sa, sb = sa.expand(M, triton.cdiv(K, SCALE_BLOCK)), sb.expand(N, triton.cdiv(K, SCALE_BLOCK))
    sb_rows = sb if sb.shape[0] == N else sb.repeat_interleave(SCALE_BLOCK, dim=0)[:N]
    c = torch.zeros((M, N), dtype=torch.float64)
    for j in range(triton.cdiv(K, SCALE_BLOCK)):
        ks = slice(j * SCALE_BLOCK, (j + 1) * SCALE_BLOCK)
        c += (a[:, ks] @ b[:, ks].T) * sa[:, j:j + 1] * sb_rows[:, j][None, :]
    return c


def accumulation_error_bound(a_codes, a_scales, b_codes, b_scales, unit_roundoff: float,
                             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A bound on |kernel - reference| for each output, from the order of the sums (Higham's gamma_n).

    Each slice's Tensor Core sum of n <= 128 exact products has error at most gamma_{n-1}(u) * sum|a b|
    for an accumulator with unit roundoff ``u``; the FP32 sum over the J slices adds at most
    gamma_{J+2}(2^-24) * sum_j |scaled partial|, and rounding to ``out_dtype`` half an ULP of the result.
    """
    def gamma(n, u):
        return n * u / (1 - n * u)

    K = a_codes.shape[1]
    J = triton.cdiv(K, SCALE_BLOCK)
    magnitudes = fp8_blockwise_matmul_reference(a_codes.float().abs().to(torch.float8_e4m3fn), a_scales.abs(),
                                                b_codes.float().abs().to(torch.float8_e4m3fn), b_scales.abs())
    exact = fp8_blockwise_matmul_reference(a_codes, a_scales, b_codes, b_scales)
    out_u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[out_dtype]
    inner = gamma(min(K, SCALE_BLOCK) - 1, unit_roundoff) * magnitudes
    # per slice: the product of the two scales, the scaling and the addition are three FP32 roundings
    outer = gamma(J + 2, 2.0 ** -24) * (magnitudes * (1 + gamma(min(K, SCALE_BLOCK), unit_roundoff)))
    return (inner + outer) * (1 + out_u) + out_u * exact.abs()


def random_fp8_operands(M: int, N: int, K: int, seed: int = 0, device=None, b_tiles: bool = True):
    """Random FP8 GEMM operands as the quantization kernel produces them (for tests and benchmarks)."""
    from companion.kernels.fp8_blockwise import quantize_fp8_blockwise

    device = runtime.kernel_device() if device is None else device
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Rows and columns with different magnitudes, so that the scales matter.
    a = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-4, 5, (M, 1), generator=g).float())
    b = torch.randn(N, K, generator=g) * torch.exp2(torch.randint(-4, 5, (1, K), generator=g).float())
    a_codes, a_scales = quantize_fp8_blockwise(a.to(device, torch.bfloat16), tile=(1, 128))
    b_codes, b_scales = quantize_fp8_blockwise(b.to(device, torch.bfloat16), tile=(128, 128) if b_tiles else (1, 128))
    return a_codes, a_scales, b_codes, b_scales


__all__ = ["fp8_blockwise_matmul", "fp8_rowwise_matmul", "fp8_blockwise_matmul_reference",
           "accumulation_error_bound", "random_fp8_operands"]
