"""The GEMM kernels against their float64 references, within the bound their summation order allows.

FP8 x FP8 and decoded FP4 x bf16 products are exact in FP32, so a kernel can differ from the exact
result only by how its sums are rounded: the tests hold every output to Higham's bound for that sum
(``accumulation_error_bound``, ``gemm_error_bound``), taken with the accumulator's unit roundoff —
FP32's 2^-24 where the sum is in FP32, and 2^-13 for the Tensor Core's FP8 sum of up to 128 products on
Hopper (about 14 bits kept, as the DeepSeek-V3 report describes; a deliberate, stated assumption).
A wrong scale, block or transpose breaks these bounds by orders of magnitude (the last tests check
that the bound would catch one). Under the interpreter (CI) shapes stay tiny; ``gpu`` runs larger ones.
"""
import numpy as np
import pytest
import torch

from companion import runtime
from companion.kernels import quantize_mx_rows, quantize_nvfp4_kernel
from companion.kernels.fp4_gemm import (
    dequantize_fp4_reference, gemm_error_bound, matmul_reference, mxfp4_matmul, quantize_int4_weights, w4a16_matmul,
)
from companion.kernels.fp8_gemm import (
    accumulation_error_bound, fp8_blockwise_matmul, fp8_blockwise_matmul_reference, fp8_rowwise_matmul,
    random_fp8_operands,
)

DEVICE = runtime.kernel_device()
TENSOR_CORE_FP8_U = 2.0 ** -13 if runtime.MODE == "compiled" else 2.0 ** -24
# (M, N, K): 1 x 1, tails in every dimension (K not a multiple of 128 or 32), tall and skinny.
FP8_SHAPES = [(1, 1, 16), (16, 16, 128), (17, 33, 300), (5, 130, 144), (48, 16, 272)]
# M = 17 and 40 run the MMA GEMV on slices of 16 rows, M = 70 the tile kernels for large M.
FP4_SHAPES = [(1, 16, 64), (1, 37, 224), (1, 8, 48), (3, 40, 100), (17, 33, 96), (16, 1, 32), (2, 5, 16),
              (8, 20, 200), (40, 12, 64), (70, 9, 64)]
GPU_FP8_SHAPES = [(256, 384, 1024), (1000, 777, 1040), (4096, 512, 4096)]
GPU_FP4_SHAPES = [(1, 8192, 8192), (1, 1000, 4128), (12, 777, 4128), (16, 4096, 4096), (7, 1000, 1000),
                  (40, 1000, 4128), (64, 2048, 2048), (300, 512, 2048)]


def assert_within(got, exact, bound):
    got = np.asarray(got.detach().cpu().double())
    exact, bound = np.asarray(exact, np.float64), np.asarray(bound, np.float64)
    err = np.abs(got - exact)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


# ------------------------------------------------------------------------------------- FP8 blockwise


def check_fp8(M, N, K, b_tiles, out_dtype, seed=0, transform=lambda t: t):
    a, sa, b, sb = random_fp8_operands(M, N, K, seed=seed, device=DEVICE, b_tiles=b_tiles)
    c = fp8_blockwise_matmul(transform(a), sa, transform(b), sb, out_dtype=out_dtype)
    assert c.shape == (M, N) and c.dtype == out_dtype
    assert_within(c, fp8_blockwise_matmul_reference(a, sa, b, sb),
                  accumulation_error_bound(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), TENSOR_CORE_FP8_U, out_dtype))


@pytest.mark.parametrize("M,N,K", FP8_SHAPES)
@pytest.mark.parametrize("b_tiles", [True, False], ids=["B-128x128", "B-1x128"])
def test_fp8_blockwise_within_bound(M, N, K, b_tiles):
    check_fp8(M, N, K, b_tiles, torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fp8_blockwise_narrow_outputs(out_dtype):
    check_fp8(20, 24, 260, True, out_dtype, seed=3)


def test_fp8_blockwise_non_contiguous_operands():
    # the codes as column slices of wider buffers: row strides differ from K
    check_fp8(18, 20, 144, True, torch.float32, seed=4,
              transform=lambda t: torch.cat([t.view(torch.uint8), t.view(torch.uint8)[:, :16]], 1)[:, :t.shape[1]]
              .view(torch.float8_e4m3fn))


def test_fp8_blockwise_zero_rows_and_blocks():
    a, sa, b, sb = random_fp8_operands(16, 16, 256, seed=5, device=DEVICE)
    a, b = a.clone(), b.clone()
    a.view(torch.uint8)[5] = 0  # an all-zero row of A
    b.view(torch.uint8)[:, :128] = 0  # an all-zero slice of B
    c = fp8_blockwise_matmul(a, sa, b, sb, out_dtype=torch.float32)
    assert torch.equal(c.cpu()[5], torch.zeros(16))
    assert_within(c, fp8_blockwise_matmul_reference(a, sa, b, sb),
                  accumulation_error_bound(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), TENSOR_CORE_FP8_U, torch.float32))


def test_fp8_blockwise_nan_propagates():
    if runtime.INTERPRET:
        pytest.xfail("triton's interpreter (3.9) converts the E4M3 NaN code 0x7F to a finite number before tl.dot")
    a, sa, b, sb = random_fp8_operands(16, 16, 256, seed=5, device=DEVICE)
    a = a.clone()
    a.view(torch.uint8)[3, 7] = 0x7F  # E4M3 NaN in row 3
    c = fp8_blockwise_matmul(a, sa, b, sb, out_dtype=torch.float32).cpu()
    assert torch.isnan(c[3]).all() and not torch.isnan(c[torch.arange(16) != 3]).any()


def test_fp8_rowwise_promote_and_not_within_bound():
    g = torch.Generator().manual_seed(6)
    a = (torch.rand(32, 640, generator=g) * 4 - 2).to(torch.float8_e4m3fn)
    b = (torch.rand(48, 640, generator=g) * 4 - 2).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(32, 1, generator=g) + 0.5, torch.rand(48, 1, generator=g) + 0.5
    exact = fp8_blockwise_matmul_reference(a, sa, b, sb)
    # promoting: the bound with 128-term Tensor Core sums; not promoting: one sum over all of K
    bound = accumulation_error_bound(a, sa.expand(32, 5).contiguous(), b, sb.expand(48, 5).contiguous(),
                                     TENSOR_CORE_FP8_U, torch.float32)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    assert_within(fp8_rowwise_matmul(on(a), on(sa), on(b), on(sb), out_dtype=torch.float32), exact, bound)
    u_whole = TENSOR_CORE_FP8_U
    loose = 640 * u_whole * fp8_blockwise_matmul_reference(a.float().abs().to(torch.float8_e4m3fn), sa,
                                                         b.float().abs().to(torch.float8_e4m3fn), sb) * 1.01
    assert_within(fp8_rowwise_matmul(on(a), on(sa), on(b), on(sb), out_dtype=torch.float32, promote=False),
                  exact, loose + 1e-30)


def test_fp8_bound_detects_a_wrong_scale():
    a, sa, b, sb = (t.cpu() for t in random_fp8_operands(16, 16, 256, seed=7, device=DEVICE))
    wrong = sa.clone()
    wrong[0, 1] *= 1.0078125  # one block's scale off by one bf16 ULP
    with pytest.raises(AssertionError):
        assert_within(fp8_blockwise_matmul_reference(a, wrong, b, sb), fp8_blockwise_matmul_reference(a, sa, b, sb),
                      accumulation_error_bound(a, sa, b, sb, 2.0 ** -24, torch.float32))


def test_fp8_gemm_bad_input():
    a, sa, b, sb = random_fp8_operands(16, 16, 256, seed=8, device=DEVICE)
    with pytest.raises(TypeError, match="a_codes has dtype"):
        fp8_blockwise_matmul(a.float(), sa, b, sb)
    with pytest.raises(ValueError, match="both must have K columns"):
        fp8_blockwise_matmul(a[:, :128], sa, b, sb)
    with pytest.raises(ValueError, match="a_scales has shape"):
        fp8_blockwise_matmul(a, sa[:, :1], b, sb)
    with pytest.raises(ValueError, match="b_scales has shape"):
        fp8_blockwise_matmul(a, sa, b, sb[:, :1])
    with pytest.raises(TypeError, match="a_scales has dtype"):
        fp8_blockwise_matmul(a, sa.double(), b, sb)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_blockwise_matmul(a, sa, b, sb, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        fp8_blockwise_matmul(a[None], sa, b, sb)
    with pytest.raises(ValueError, match=r"a_scales has shape"):
        fp8_rowwise_matmul(a, sa, b, sb)


def test_fp8_blockwise_kernel_choice():
    a, sa, b, sb = random_fp8_operands(32, 32, 256, seed=10, device=DEVICE)
    with pytest.raises(ValueError, match="kernel must be one of"):
        fp8_blockwise_matmul(a, sa, b, sb, kernel="cublas")
    c = fp8_blockwise_matmul(a, sa, b, sb, out_dtype=torch.float32, kernel="triton")
    assert_within(c, fp8_blockwise_matmul_reference(a, sa, b, sb),
                  accumulation_error_bound(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), TENSOR_CORE_FP8_U, torch.float32))
    # column-major codes: no TMA descriptor can read them, on any machine
    with pytest.raises(ValueError, match="kernel='gluon' needs"):
        fp8_blockwise_matmul(a.t().contiguous().t(), sa, b, sb, kernel="gluon")
    if runtime.INTERPRET:
        with pytest.raises(ValueError, match="kernel='gluon' needs a compiled Hopper GPU"):
            fp8_blockwise_matmul(a, sa, b, sb, kernel="gluon")


def test_fp8_gemm_empty_shapes():
    a, sa, b, sb = random_fp8_operands(16, 16, 128, seed=9, device=DEVICE)
    assert fp8_blockwise_matmul(a[:0], sa[:0], b, sb).shape == (0, 16)
    empty_k = torch.empty(4, 0, dtype=torch.float8_e4m3fn, device=DEVICE)
    c = fp8_blockwise_matmul(empty_k, torch.empty(4, 0, device=DEVICE), empty_k, torch.empty(1, 0, device=DEVICE))
    assert torch.equal(c.cpu(), torch.zeros(4, 4, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------ FP4


def fp4_weights(N, K, seed, fmt):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * torch.exp2(torch.randint(-3, 4, (N, 1), generator=g).float())).bfloat16()
    if fmt == "mxfp4":
        codes, scales = quantize_mx_rows(w.to(DEVICE), "fp4_e2m1")
        return codes, scales, None, dequantize_fp4_reference(codes, scales)
    if fmt == "int4":
        codes, scales = quantize_int4_weights(w.to(DEVICE))
        return codes, scales, None, dequantize_fp4_reference(codes, scales, format="int4")
    codes, scales, ts = quantize_nvfp4_kernel(w.to(DEVICE))
    return codes, scales, ts, dequantize_fp4_reference(codes, scales, format="nvfp4", tensor_scale=ts)


def check_w4a16(M, N, K, fmt, out_dtype=torch.float32, seed=0, x_transform=lambda t: t):
    codes, scales, ts, W = fp4_weights(N, K, seed, fmt)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    c = w4a16_matmul(x_transform(x.to(DEVICE)), codes, scales, format=fmt, tensor_scale=ts, out_dtype=out_dtype)
    assert c.shape == (M, N) and c.dtype == out_dtype
    xd = x.double().numpy()
    assert_within(c, matmul_reference(xd, W), gemm_error_bound(xd, W[:, :K], out_dtype))


@pytest.mark.parametrize("M,N,K", FP4_SHAPES)
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_w4a16_within_bound(M, N, K, fmt):
    check_w4a16(M, N, K, fmt)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_w4a16_bf16_output_and_strided_activations(fmt):
    check_w4a16(5, 24, 64, fmt, out_dtype=torch.bfloat16, seed=2, x_transform=lambda t: t.t().contiguous().t())
    check_w4a16(5, 24, 64, fmt, seed=3, x_transform=lambda t: torch.cat([t, t], 1)[:, :64])


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_w4a16_tile_kernels_within_bound(fmt):
    """The tile kernels that the MMA kernel replaced for M <= 16 (the GEMM benchmark's comparison rows,
    reached with an explicit decode config) still hold the bound."""
    from companion.kernels.fp4_gemm import DECODE_CONFIG

    codes, scales, ts, W = fp4_weights(24, 96, 6, fmt)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(7)).bfloat16()
    c = w4a16_matmul(x.to(DEVICE), codes, scales, format=fmt, tensor_scale=ts, out_dtype=torch.float32,
                     _config=DECODE_CONFIG[fmt])
    xd = x.double().numpy()
    assert_within(c, matmul_reference(xd, W), gemm_error_bound(xd, W[:, :96], torch.float32))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_w4a16_small_m_reads_weight_views(fmt):
    """M <= 16 reads the codes as 32-bit words: codes whose rows are not 4-byte aligned (a row stride
    of 2 bytes more) are copied first, a slice of the first blocks of wider rows is read in place, and
    both give what the contiguous codes give."""
    k = 128 if fmt == "int4" else 64  # the slice: whole blocks, half of each row
    codes, scales, ts, _ = fp4_weights(24, 2 * k, 4, fmt)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEVICE)
    blocks = k // {"mxfp4": 32, "nvfp4": 16, "int4": 128}[fmt]
    want = w4a16_matmul(x, codes[:, :k // 2].contiguous(), scales[:, :blocks].contiguous(), format=fmt,
                        tensor_scale=ts)
    padded = torch.zeros(24, k // 2 + 2, dtype=torch.uint8, device=DEVICE)
    padded[:, :k // 2] = codes.view(torch.uint8)[:, :k // 2]
    for view in (codes[:, :k // 2], padded[:, :k // 2]):
        got = w4a16_matmul(x, view, scales[:, :blocks], format=fmt, tensor_scale=ts)
        assert torch.equal(got, want)


@pytest.mark.parametrize("M,N,K", FP4_SHAPES)
def test_mxfp4_dot_scaled_within_bound(M, N, K):
    codes_b, scales_b, _, B = fp4_weights(N, K, 10, "mxfp4")
    codes_a, scales_a, _, A = fp4_weights(M, K, 11, "mxfp4")
    c = mxfp4_matmul(codes_a, scales_a, codes_b, scales_b, out_dtype=torch.float32)
    assert_within(c, matmul_reference(A, B), gemm_error_bound(A, B, torch.float32))


@pytest.mark.parametrize("rows", [1, 9, 16, 40, 70], ids=["one", "nine", "sixteen", "slices", "large_m"])
def test_fp4_decoding_covers_every_code(rows):
    """Each of the 16 E2M1 codes, with scales from tiny to large (a float32 subnormal 2^-127 result
    included): the W4A16 paths (M <= 16 the MMA kernel, with one or two tiles of 8 activation rows, its
    MMAs emulated under the interpreter; up to GEMV_MAX_M the same on slices of 16 rows; and beyond,
    the tile kernels) decode them exactly."""
    from companion.mx import pack_fp4

    codes = torch.arange(16, dtype=torch.uint8).repeat(4, 2)  # (4, 32): every code twice per row
    packed = pack_fp4(codes).to(DEVICE)
    mx_scales = torch.tensor([[1], [127], [140], [100]], dtype=torch.uint8).to(DEVICE)  # 2^-126 .. 2^13
    nv_scales = torch.tensor([[0x38, 0x01], [0x7E, 0x30], [0x08, 0x44], [0x00, 0x3F]], dtype=torch.uint8).to(DEVICE)
    eye = torch.eye(32, dtype=torch.bfloat16, device=DEVICE).repeat(3, 1)[:rows]  # row i picks column i % 32
    got = w4a16_matmul(eye, packed, mx_scales, out_dtype=torch.float32).t().cpu().double().numpy()
    np.testing.assert_array_equal(got, np.tile(dequantize_fp4_reference(packed, mx_scales), 3)[:, :rows])
    ts = torch.tensor(1.0, device=DEVICE)
    got = w4a16_matmul(eye, packed, nv_scales, format="nvfp4", tensor_scale=ts, out_dtype=torch.float32)
    np.testing.assert_array_equal(got.t().cpu().double().numpy(), np.tile(
        dequantize_fp4_reference(packed, nv_scales, format="nvfp4", tensor_scale=ts), 3)[:, :rows])


@pytest.mark.parametrize("rows", [1, 9], ids=["one", "nine"])
def test_fp4_fast_decode_scale_range(rows):
    """The MMA kernel's bit-placement decode carries every E4M3 scale, and E8M0 scales from code 16 to
    136; a program (16 weight rows) that meets an E8M0 scale outside that range reruns with the lookup.
    Every code times: every E4M3 scale code, and E8M0 scales at and just beyond both ends of the range
    (programs 1 and 2 hold one such row each), exactly."""
    from companion.mx import pack_fp4

    eye = torch.eye(32, dtype=torch.bfloat16, device=DEVICE)[3:3 + rows]  # codes 3 (1.5), 4, ...
    e8m0 = [16, 136, 127, 100, 60, 130, 17, 135] * 2
    mx_scales = torch.tensor(e8m0 + e8m0[:7] + [15] + e8m0[:7] + [137], dtype=torch.uint8)[:, None]
    nv_scales = torch.cat([torch.arange(0, 0x7F), torch.tensor([0xB8, 0x81, 0xFE])]).to(torch.uint8)[:, None]
    for fmt, scales in (("mxfp4", mx_scales), ("nvfp4", nv_scales.repeat(1, 2))):
        packed = pack_fp4(torch.arange(16, dtype=torch.uint8).repeat(scales.shape[0], 2)).to(DEVICE)
        scales = scales.to(DEVICE)
        ts = torch.tensor(0.5, device=DEVICE) if fmt == "nvfp4" else None
        got = w4a16_matmul(eye, packed, scales, format=fmt, tensor_scale=ts, out_dtype=torch.float32)
        want = dequantize_fp4_reference(packed, scales, format=fmt, tensor_scale=ts)[:, 3:3 + rows]
        np.testing.assert_array_equal(got.t().cpu().double().numpy(), want)


@pytest.mark.parametrize("rows", [1, 9, 40, 70], ids=["one", "nine", "slices", "large_m"])
def test_int4_decoding_covers_every_code(rows):
    """Each of the 16 INT4 codes (-8..7) with bf16 group scales from tiny to large, full significands
    among them: each group's FP32 sum times its scale is exact here (one nonzero product), so the
    GEMV (one and two tiles of activation rows, and slices of 16 rows) and the tile kernel give q * s
    exactly."""
    from companion.mx import pack_fp4

    codes = torch.arange(16, dtype=torch.uint8).repeat(4, 16)  # (4, 256): two groups of 128 per row
    packed = pack_fp4(codes).to(DEVICE)
    scales = torch.tensor([[2.0 ** -120, 0.3330], [1.0, 2.0 ** 100], [-0.0117, 3.0], [1e-30, 65504.0]]
                          ).bfloat16().to(DEVICE)
    eye = torch.zeros(rows, 256, dtype=torch.bfloat16, device=DEVICE)
    eye[torch.arange(rows), torch.arange(rows) * 7 % 256] = 1.0  # codes from both groups
    got = w4a16_matmul(eye, packed, scales, format="int4", out_dtype=torch.float32).t().cpu().double().numpy()
    want = dequantize_fp4_reference(packed, scales, format="int4")[:, (torch.arange(rows) * 7 % 256).numpy()]
    np.testing.assert_array_equal(got, want)
    assert len(set((np.arange(rows) * 7 % 256) % 16)) == min(rows, 16)  # the codes reached: all from 16 rows


def test_fp4_gemm_bad_input():
    codes, scales, ts, _ = fp4_weights(16, 64, 12, "nvfp4")
    mx_codes, mx_scales, _, _ = fp4_weights(16, 64, 13, "mxfp4")
    x = torch.randn(2, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="format must be"):
        w4a16_matmul(x, codes, scales, format="int3")
    with pytest.raises(TypeError, match="x has dtype"):
        w4a16_matmul(x.float(), mx_codes, mx_scales)
    with pytest.raises(ValueError, match="do not match"):
        w4a16_matmul(x[:, :16], mx_codes, mx_scales)
    with pytest.raises(ValueError, match="w_scales has shape"):
        w4a16_matmul(x, mx_codes, mx_scales[:, :1])
    with pytest.raises(TypeError, match="w_scales has dtype"):
        w4a16_matmul(x, codes, scales, format="mxfp4")  # E4M3 scales handed to MXFP4
    with pytest.raises(ValueError, match="tensor_scale belongs to NVFP4"):
        w4a16_matmul(x, mx_codes, mx_scales, tensor_scale=ts)
    with pytest.raises(TypeError, match="tensor_scale must be a torch.Tensor"):
        w4a16_matmul(x, codes, scales, format="nvfp4")
    with pytest.raises(ValueError, match="same number of packed columns"):
        mxfp4_matmul(mx_codes[:, :16], mx_scales[:, :1], mx_codes, mx_scales)
    i4_codes, i4_scales, _, _ = fp4_weights(16, 128, 14, "int4")
    x128 = torch.randn(2, 128, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of the int4 block"):
        w4a16_matmul(x, mx_codes, mx_scales, format="int4")  # 64 codes per row: not whole groups
    with pytest.raises(TypeError, match="w_scales has dtype"):
        w4a16_matmul(x128, i4_codes, i4_scales.float(), format="int4")
    with pytest.raises(ValueError, match="w_scales has shape"):
        w4a16_matmul(x128, i4_codes, i4_scales.repeat(1, 2), format="int4")
    with pytest.raises(ValueError, match="tensor_scale belongs to NVFP4"):
        w4a16_matmul(x128, i4_codes, i4_scales, format="int4", tensor_scale=ts)
    assert w4a16_matmul(x[:0], mx_codes, mx_scales).shape == (0, 16)


@pytest.mark.parametrize("config", [(2, 1, 2, 1), (4, 2, 2, 1), (2, 1, 1, 1), (2, 1, 1, 2), (4, 2, 2, 2)],
                         ids=["two_groups", "two_groups_split", "one_group", "two_warp_tiles", "two_by_two_split"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_w4a16_gemv_row_tiles(config, fmt):
    """The GEMV with one or two groups of warps per program (each with its own weight rows), one or two
    tiles of 16 weight rows per warp, K split or not, for one and two tiles of activation rows, and N not a
    multiple of 32. The second tile only shares the activation registers: each row's sum is the one a
    warp with one tile makes, bit for bit."""
    for M in (3, 16):
        codes, scales, ts, W = fp4_weights(40, 256, 16, fmt)
        x = torch.randn(M, 256, generator=torch.Generator().manual_seed(17)).bfloat16()
        c = w4a16_matmul(x.to(DEVICE), codes, scales, format=fmt, tensor_scale=ts, out_dtype=torch.float32,
                         _gemv_config=config)
        xd = x.double().numpy()
        assert_within(c, matmul_reference(xd, W), gemm_error_bound(xd, W[:, :256], torch.float32))
        if config[3] == 2:
            one = w4a16_matmul(x.to(DEVICE), codes, scales, format=fmt, tensor_scale=ts, out_dtype=torch.float32,
                               _gemv_config=config[:3] + (1,))
            assert torch.equal(c, one)
    with pytest.raises(ValueError, match="do not split"):
        w4a16_matmul(x.to(DEVICE), codes, scales, format=fmt, tensor_scale=ts, _gemv_config=(3, 1, 2, 1))
    with pytest.raises(ValueError, match="1 or 2 tiles"):
        w4a16_matmul(x.to(DEVICE), codes, scales, format=fmt, tensor_scale=ts, _gemv_config=(2, 1, 1, 3))


# ------------------------------------------------------------------------------------ compiled only


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GPU_FP8_SHAPES)
def test_fp8_blockwise_gpu(M, N, K):
    check_fp8(M, N, K, True, torch.bfloat16, seed=M)
    check_fp8(M, N, K, False, torch.float32, seed=N)


# shapes the Gluon kernel takes (K and the output rows whole 16 bytes), ragged in every dimension
GLUON_SHAPES = [(1, 16, 16), (64, 48, 16), (200, 272, 1040), (333, 160, 2048), (129, 136, 4112), (1000, 1024, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GLUON_SHAPES)
def test_fp8_blockwise_gluon_equals_triton(M, N, K):
    """The warp-specialized Hopper kernel and the Triton kernel sum in the same order: same bits,
    NaN, zero rows and zero slices included, for each of the Hopper kernel's configurations (256-column
    tiles with 128 x 128 blocks of B, four stages for 16-bit outputs and three for FP32; 128-column tiles
    with 1 x 128 blocks of B) and for 128-column tiles with 128 x 128 blocks."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    from companion.kernels import fp8_gemm_hopper

    for b_tiles, out_dtype in [(True, torch.bfloat16), (False, torch.float32), (True, torch.float16),
                               (True, torch.float32), (False, torch.bfloat16)]:
        a, sa, b, sb = random_fp8_operands(M, N, K, seed=M + K, device=DEVICE, b_tiles=b_tiles)
        a, b = a.clone(), b.clone()
        a.view(torch.uint8)[M // 2] = 0  # a zero row
        b.view(torch.uint8)[:, : min(K, 128)] = 0  # a zero slice of K
        a.view(torch.uint8)[M - 1, K - 1] = 0x7F  # NaN in the last row
        got = fp8_blockwise_matmul(a, sa, b, sb, out_dtype=out_dtype, kernel="gluon")
        want = fp8_blockwise_matmul(a, sa, b, sb, out_dtype=out_dtype, kernel="triton")
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(got[M - 1]).all() and not torch.isnan(got[: M - 1]).any()
        if b_tiles:
            narrow = fp8_gemm_hopper.fp8_gemm_hopper(a, sa, b, sb, out_dtype, 128, config=(4, 16, 128))
            torch.testing.assert_close(narrow, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GPU_FP4_SHAPES)
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_w4a16_gpu(M, N, K, fmt):
    check_w4a16(M, N, K, fmt, out_dtype=torch.bfloat16, seed=M)


@pytest.mark.gpu
def test_mxfp4_dot_scaled_gpu():
    codes_b, scales_b, _, B = fp4_weights(512, 1024, 14, "mxfp4")
    codes_a, scales_a, _, A = fp4_weights(300, 1024, 15, "mxfp4")
    c = mxfp4_matmul(codes_a, scales_a, codes_b, scales_b, out_dtype=torch.float32)
    assert_within(c, matmul_reference(A, B), gemm_error_bound(A, B, torch.float32))
