"""Benchmark of the GEMM kernels against cuBLAS, and the accumulation-error measurement, in one run.

* FP8 block-scaled GEMM (DeepSeek-V3 recipe; the Triton kernel and the warp-specialized Gluon kernel)
  next to ``torch._scaled_mm`` (cuBLAS FP8, per-row and per-tensor scales) and bf16 cuBLAS, at square
  and DeepSeek-like shapes; the Triton kernel with per-row scales, with and without promotion. Timed
  as CUDA graphs (GPU time) and, for comparison, launched call by call from Python.
* W4A16 decode (bf16 activations, MXFP4 / NVFP4 weights): time next to bf16 cuBLAS on the same shapes,
  replayed as CUDA graphs (and, for comparison, launched call by call from Python), and weight bytes
  per second next to the copy bandwidth.
* MXFP4 x MXFP4 through ``tl.dot_scaled`` (emulated on Hopper).
* The error of an FP8 GEMM whose Tensor Core sum runs over all of K against one that promotes every
  128, as K grows.

    python -m companion.book bench gemm      # -> book/data/gemm.json
"""
from __future__ import annotations

FP8_SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192), (4096, 7168, 16384))
DECODE_N, DECODE_K = 8192, 8192
DECODE_M = (1, 2, 4, 8, 16, 32, 64)
COPIES = 4  # weight matrices per format in the decode benchmark (see _decode)
ERROR_K = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _tflops(m, n, k, ms):
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def _fp8_gemms(median_ms):
    import torch

    from companion.book.bench import graph_ms_per_call, rotation_count
    from companion.kernels.fp8_gemm import fp8_blockwise_matmul, fp8_rowwise_matmul, random_fp8_operands

    rows = []
    for M, N, K in FP8_SHAPES:
        # Operand sets used in turn, enough that a call never finds the previous call's operands in the
        # 50 MB L2 cache (the FP8 codes of A and B, 100 MB between them, and their BF16 copies).
        sets = []
        for seed in range(rotation_count((M + N) * K, 100_000_000)):
            a, sa, b, sb = random_fp8_operands(M, N, K, seed=1 + seed, device="cuda")
            sets.append({
                "a": a, "sa": sa, "b": b, "sb": sb, "bt": b.t(),  # cuBLAS wants B column-major: a view
                "a16": (a.float() * sa.repeat_interleave(128, 1)[:, :K]).bfloat16(),
                "b16": torch.randn(N, K, device="cuda").bfloat16(),
                "row_a": torch.rand(M, 1, device="cuda") + 0.5, "row_b": torch.rand(N, 1, device="cuda") + 0.5})
        one = torch.ones((), device="cuda")
        calls = {
            "bf16_cublas": lambda o: o["a16"] @ o["b16"].t(),
            "fp8_scaled_mm_rowwise": lambda o: torch._scaled_mm(o["a"], o["bt"], scale_a=o["row_a"],
                                                                scale_b=o["row_b"].t(), out_dtype=torch.bfloat16),
            "fp8_scaled_mm_tensorwise": lambda o: torch._scaled_mm(o["a"], o["bt"], scale_a=one, scale_b=one,
                                                                   out_dtype=torch.bfloat16),
            "fp8_blockwise_triton": lambda o: fp8_blockwise_matmul(o["a"], o["sa"], o["b"], o["sb"], kernel="triton"),
            "fp8_blockwise_gluon": lambda o: fp8_blockwise_matmul(o["a"], o["sa"], o["b"], o["sb"], kernel="gluon"),
            "fp8_rowwise_triton_promote": lambda o: fp8_rowwise_matmul(o["a"], o["row_a"], o["b"], o["row_b"],
                                                                       promote=True),
            "fp8_rowwise_triton_no_promote": lambda o: fp8_rowwise_matmul(o["a"], o["row_a"], o["b"], o["row_b"],
                                                                          promote=False),
        }
        # GPU time per call, replayed as a CUDA graph (no launch gaps from the host, whose Python
        # overhead -- checks, TMA descriptors -- outlasts the GPU time of a 4096^3 product), and, for
        # comparison, launched call by call from Python (do_bench, L2 flushed before each call)
        times = {name: graph_ms_per_call([lambda o=o, fn=fn: fn(o) for o in sets], rounds=5)
                 for name, fn in calls.items()}
        eager = {name: median_ms(lambda fn=fn: fn(sets[0])) for name, fn in calls.items()}
        rows.append({"M": M, "N": N, "K": K, "ms": times, "ms_launched_from_python": eager,
                     "tflops": {name: _tflops(M, N, K, ms) for name, ms in times.items()}})
        del sets
    return rows


def _decode(median_ms, copy_bytes_per_s):
    import torch

    from companion.book.bench import graph_ms_per_call
    from companion.kernels import quantize_mx_rows, quantize_nvfp4_kernel
    from companion.kernels.fp4_gemm import DECODE_CONFIG, GEMV_MAX_M, quantize_int4_weights, w4a16_matmul

    N, K = DECODE_N, DECODE_K
    # COPIES different weight matrices, used in turn: when a call comes round to a matrix again, more
    # than the L2 cache's 50 MB has been read since, so every call reads its weights from HBM (one 4-bit
    # matrix alone, 36 MB, would stay in L2 between back-to-back calls).
    ws = [torch.randn(N, K, device="cuda").bfloat16() for _ in range(COPIES)]
    mx = [quantize_mx_rows(w, "fp4_e2m1") for w in ws]
    nv = [quantize_nvfp4_kernel(w) for w in ws]
    i4 = [quantize_int4_weights(w) for w in ws]
    weight_bytes = {"bf16": N * K * 2, "mxfp4": N * K // 2 + N * K // 32, "nvfp4": N * K // 2 + N * K // 16,
                    "int4": N * K // 2 + N * K // 64}
    rows = []
    for M in DECODE_M:
        x = torch.randn(M, K, device="cuda").bfloat16()
        calls = {
            "bf16_cublas": [lambda w=w: x @ w.t() for w in ws],
            "mxfp4": [lambda q=q: w4a16_matmul(x, *q) for q in mx],
            "nvfp4": [lambda q=q: w4a16_matmul(x, q[0], q[1], format="nvfp4", tensor_scale=q[2]) for q in nv],
            "int4": [lambda q=q: w4a16_matmul(x, *q, format="int4") for q in i4],
        }
        if M <= 16:
            # the tile kernels (Triton's dot_scaled and the NVFP4 decode kernel at their decode tiles),
            # which the MMA kernel replaces for M <= 16, and the large-M NVFP4 kernel at decode tiles
            # (decoding bit by bit, X the wide operand)
            calls["mxfp4_tile_kernel"] = [lambda q=q: w4a16_matmul(x, *q, _config=DECODE_CONFIG["mxfp4"]) for q in mx]
            calls["nvfp4_tile_kernel"] = [lambda q=q: w4a16_matmul(x, q[0], q[1], format="nvfp4", tensor_scale=q[2],
                                                                   _config=DECODE_CONFIG["nvfp4"]) for q in nv]
            calls["nvfp4_bitwise_kernel"] = [lambda q=q: _nvfp4_bitwise(x, *q) for q in nv]
            # the GEMV with two tiles of 16 weight rows per program (the activations read from L2 half as often)
            calls["mxfp4_two_row_tiles"] = [lambda q=q: w4a16_matmul(x, *q, _gemv_config=(8, 1, 2, 1)) for q in mx]
            calls["int4_two_row_tiles"] = [lambda q=q: w4a16_matmul(x, *q, format="int4", _gemv_config=(8, 1, 2, 1))
                                           for q in i4]
            if M > 8:  # the GEMV with one tile of 16 weight rows per warp (the default takes two for M > 8)
                calls["mxfp4_one_warp_tile"] = [lambda q=q: w4a16_matmul(x, *q, _gemv_config=(4, 1, 1, 1)) for q in mx]
                calls["int4_one_warp_tile"] = [lambda q=q: w4a16_matmul(x, *q, format="int4", _gemv_config=(4, 1, 1, 1))
                                               for q in i4]
        elif M <= GEMV_MAX_M:
            # the tile kernels that the GEMV run on slices of 16 rows replaces here (autotuned large-M tiles)
            calls["mxfp4_tile_kernel"] = [lambda q=q: w4a16_matmul(x, *q, _config=DECODE_CONFIG["mxfp4"]) for q in mx]
            calls["nvfp4_tile_kernel"] = [lambda q=q: w4a16_matmul(x, q[0], q[1], format="nvfp4", tensor_scale=q[2],
                                                                   _config=DECODE_CONFIG["nvfp4"]) for q in nv]
        # Replayed as a CUDA graph, as decode loops run in serving: GPU time without the host's launch
        # gaps. Launched one by one from Python (do_bench, L2 flushed before each call), a call of two
        # kernels (split K) can leave the GPU idle between them, and the idle time is timed too.
        times = {name: graph_ms_per_call(fns) for name, fns in calls.items()}
        eager = {name: median_ms(fns[0]) for name, fns in calls.items()}
        rows.append({
            "M": M, "ms": times, "ms_launched_from_python": eager,
            "speedup_vs_bf16": {k: times["bf16_cublas"] / v for k, v in times.items()},
            "weight_bytes_per_s": {k: weight_bytes[k.split("_")[0]] / (v * 1e-3)
                                   for k, v in times.items()},
            "weight_bandwidth_vs_copy": {k: weight_bytes[k.split("_")[0]] / (v * 1e-3)
                                         / copy_bytes_per_s for k, v in times.items()},
        })
    return {"N": N, "K": K, "weight_bytes": weight_bytes, "rows": rows}


def _nvfp4_bitwise(x, codes, scales, ts):
    """W4A16 NVFP4 through _nvfp4_w4a16_kernel (each E2M1 value built from its bits, about a dozen
    instructions per weight, activations as the MMA's wide operand) with decode tiles: the comparison
    for the decode kernel's byte-permute lookup and transposed product."""
    import torch

    from companion.kernels import fp4_gemm

    M, N, Kp = x.shape[0], codes.shape[0], 2 * codes.shape[1]
    c = torch.empty((M, N), dtype=torch.bfloat16, device=x.device)
    w, s = codes.view(torch.uint8), scales.view(torch.uint8)
    args = (x, w, s, ts, M, N, Kp, x.shape[1], *x.stride(), *w.stride(), *s.stride(), *c.stride())
    return fp4_gemm._launch(fp4_gemm._nvfp4_w4a16_kernel, None, args, M, N, Kp, x.device, c, "nvfp4",
                            (64, 256, 8, 4, 3), UPCAST_DOT=False)


def _mxfp4_dot_scaled(median_ms):
    import torch

    from companion.kernels import quantize_mx_rows
    from companion.kernels.fp4_gemm import mxfp4_matmul

    rows = []
    for size in (4096, 8192):
        a = torch.randn(size, size, device="cuda").bfloat16()
        b = torch.randn(size, size, device="cuda").bfloat16()
        ac, as_ = quantize_mx_rows(a, "fp4_e2m1")
        bc, bs = quantize_mx_rows(b, "fp4_e2m1")
        times = {"bf16_cublas": median_ms(lambda: a @ b.t()), "mxfp4_dot_scaled": median_ms(lambda: mxfp4_matmul(ac, as_, bc, bs))}
        rows.append({"M": size, "N": size, "K": size, "ms": times,
                     "tflops": {k: _tflops(size, size, size, v) for k, v in times.items()}})
    return rows


def accumulation_error(k_values=ERROR_K, m: int = 256, n: int = 256, seed: int = 0) -> list:
    """Relative error of the rowwise FP8 GEMM with and without promotion, against float64, per K.

    Operands are random positive E4M3 values (all products add up, as in a sum of squares or a
    softmax-weighted average), so a narrow accumulator loses the most; the error is the median over
    outputs of |C - exact| / |exact|, with a float32 output so that no bf16 rounding hides it.
    """
    import torch

    from companion.kernels.fp8_gemm import fp8_blockwise_matmul_reference, fp8_rowwise_matmul

    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for K in k_values:
        a = (torch.rand(m, K, generator=g) * 2 + 0.5).to(torch.float8_e4m3fn)
        b = (torch.rand(n, K, generator=g) * 2 + 0.5).to(torch.float8_e4m3fn)
        sa, sb = torch.ones(m, 1), torch.ones(n, 1)
        exact = fp8_blockwise_matmul_reference(a, sa, b, sb)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        row = {"K": K}
        for promote in (True, False):
            c = fp8_rowwise_matmul(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev), out_dtype=torch.float32,
                                   promote=promote).cpu().double()
            rel = ((c - exact).abs() / exact.abs()).flatten()
            row["promote" if promote else "no_promote"] = {"median": float(rel.median()), "max": float(rel.max())}
        rows.append(row)
    return rows


def measure_gemm() -> dict:
    import torch

    from companion.book.bench import _median_ms, copy_bandwidth, environment

    if not torch.cuda.is_available():
        raise RuntimeError("the GEMM benchmark needs a CUDA GPU")
    copy = copy_bandwidth()
    return {
        "environment": environment(),
        "results": {
            "copy_bytes_per_s": copy,
            "decode": _decode(_median_ms, copy),
            "fp8_gemm": _fp8_gemms(_median_ms),
            "mxfp4_dot_scaled": _mxfp4_dot_scaled(_median_ms),
            "accumulation_error": accumulation_error(),
            "tuned_configs": _tuned_configs(),
        },
    }


def _tuned_configs() -> dict:
    """The tile each autotuned kernel chose, per problem key (so a reader can see what ran)."""
    from companion.kernels import fp4_gemm, fp8_gemm

    out = {}
    for name, tuner in (("fp8_gemm", fp8_gemm._fp8_gemm_tuned), ("dot_scaled", fp4_gemm._dot_scaled_tuned),
                        ("nvfp4_w4a16", fp4_gemm._nvfp4_w4a16_tuned)):
        out[name] = {str(key): str(cfg) for key, cfg in getattr(tuner, "cache", {}).items()}
    return out
