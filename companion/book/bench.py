"""Benchmarks whose results the book stores as data, and the device ceilings they are measured against.

A benchmark runs on the GPU and writes a JSON file under ``book/data/`` with the device, the library
versions and the date; chapters plot from those files, so a reader without a GPU sees the stored
measurements and a reader with one regenerates them with one call::

    python -m companion.book bench ceilings        # -> book/data/ceilings.json

Timing follows the book's rules: ``triton.testing.do_bench`` (median of many runs after warm-up), random
data (never zeros), operands far larger than the L2 cache.
"""
from __future__ import annotations

import datetime
import json
import pathlib

DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "book" / "data"


def _median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def graph_ms_per_call(fns, rounds: int = 20, replays: int = 15) -> float:
    """Milliseconds per call of ``fns`` (called in turn, ``rounds`` times) captured in one CUDA graph;
    the median over ``replays`` replays. The GPU's time alone: no launch gaps from the host, which a
    Python launcher can leave when its own overhead exceeds the GPU time of the work queued before it.
    Give ``fns`` several inputs that together exceed the L2 cache, so no call finds its data there."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, autotunes) outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in fns:
                fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(fns)))
    return float(sorted(times)[len(times) // 2])


def rotation_count(set_bytes: int, rotation_bytes: int) -> int:
    """How many input sets of ``set_bytes`` a benchmark cycles through so that together they hold at least
    ``rotation_bytes`` (more than the L2 cache keeps), and never fewer than two."""
    return max(2, -(-rotation_bytes // set_bytes))


def copy_bandwidth(nbytes: int = 1 << 30, rotation_bytes: int = 0) -> float:
    """Device-to-device copy, in bytes moved (read + written) per second.

    With ``rotation_bytes``, GPU time as :func:`graph_ms_per_call` measures it, the copies cycling through
    enough buffer pairs to hold that many bytes (the ceiling for kernels timed the same way); without,
    one buffer pair timed call by call with ``triton.testing.do_bench``."""
    import torch

    copies = rotation_count(nbytes, rotation_bytes) if rotation_bytes else 1
    src = [torch.randint(-128, 127, (nbytes // 2,), dtype=torch.int8, device="cuda") for _ in range(copies)]
    dst = [torch.empty_like(s) for s in src]
    if not rotation_bytes:
        return nbytes / (_median_ms(lambda: dst[0].copy_(src[0])) * 1e-3)
    return nbytes / (graph_ms_per_call([lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)]) * 1e-3)


def gemm_flops(m: int, n: int, k: int, dtype: str = "bf16") -> float:
    """FLOP/s of cuBLAS for C = A @ B with A m×k, B k×n (row-major A, column-major B as cuBLAS likes).

    ``dtype``: "bf16" (``A @ B``), "fp8_tensor" and "fp8_row" (``torch._scaled_mm`` with E4M3 operands,
    bf16 output, per-tensor or per-row/column float32 scales).
    """
    import torch

    if dtype not in ("bf16", "fp8_tensor", "fp8_row"):
        raise ValueError(f"unknown GEMM dtype {dtype!r}; expected bf16, fp8_tensor or fp8_row")
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", generator=gen)
    b = torch.randn(n, k, device="cuda", generator=gen)
    if dtype == "bf16":
        a16, b16 = a.bfloat16(), b.bfloat16().t()
        fn = lambda: a16 @ b16  # noqa: E731
    else:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        if dtype == "fp8_tensor":
            sa = torch.ones((), device="cuda")
            sb = torch.ones((), device="cuda")
        else:
            sa = torch.ones(m, 1, device="cuda")
            sb = torch.ones(1, n, device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    return 2 * m * n * k / (_median_ms(fn) * 1e-3)


def gemv_weight_bandwidth(n: int = 8192, k: int = 8192) -> float:
    """bf16 decode GEMV (one token, M=1) through cuBLAS, as weight bytes read per second."""
    import torch

    w = torch.randn(n, k, device="cuda").bfloat16()
    x = torch.randn(1, k, device="cuda").bfloat16()
    return n * k * 2 / (_median_ms(lambda: x @ w.t()) * 1e-3)


def environment() -> dict:
    from companion import runtime

    return {"device": runtime.device_description(), "date": datetime.date.today().isoformat(),
            **runtime.versions()}


def measure_ceilings() -> dict:
    """The device's ceilings, measured in one run: copy bandwidth and cuBLAS GEMM throughput."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("measuring the ceilings needs a CUDA GPU")
    results = {
        "copy_bytes_per_s": copy_bandwidth(),
        "gemv_bf16_weight_bytes_per_s": gemv_weight_bandwidth(),
        "gemm_flops_per_s": {},
    }
    for size in (4096, 8192):
        for dtype in ("bf16", "fp8_tensor", "fp8_row"):
            results["gemm_flops_per_s"][f"{dtype}_{size}"] = gemm_flops(size, size, size, dtype)
    return {"environment": environment(), "results": results}


def save(name: str, data: dict, directory: pathlib.Path = DATA_DIR) -> pathlib.Path:
    """Write benchmark data as ``<directory>/<name>.json`` (sorted keys, stable for diffs)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def load(name: str, directory: pathlib.Path = DATA_DIR) -> dict:
    """Read stored benchmark data; a clear error says how to produce it when it is missing."""
    path = directory / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `python -m companion.book bench {name}` on a GPU")
    return json.loads(path.read_text())


def measure_quant_kernels() -> dict:
    """The quantization kernels of companion.kernels against copy bandwidth and torch.compile."""
    from companion.kernels.bench_quant import measure_quant_kernels as measure

    return measure()


def measure_tile_walks() -> dict:
    """The quantization kernels under each way of walking their tiles (order, programs, pipelining)."""
    from companion.kernels.bench_quant import measure_tile_walks as measure

    return measure()


def measure_quant_profile() -> dict:
    """Nsight Compute's counters for each quantization kernel: DRAM and issue utilisation, instructions."""
    from companion.kernels.profile_quant import measure_quant_profile as measure

    return measure()


def measure_kmeans() -> dict:
    """K-means assignment (10M weights, k = 16): the Triton kernel against PyTorch and torch.compile."""
    from companion.kernels.kmeans_assign import measure_kmeans_assign

    return measure_kmeans_assign()


def measure_gemm() -> dict:
    """FP8 block-scaled, W4A16 and MXFP4 GEMMs against cuBLAS, and the FP8 accumulation error vs K."""
    from companion.kernels.bench_gemm import measure_gemm as measure

    return measure()


def measure_training() -> dict:
    """Loss curves of the GPU-sized GPT under every recipe, and the step time of a block with bf16 vs FP8."""
    from companion.training.bench_training import measure_training as measure

    return measure()


BENCHMARKS = {"ceilings": measure_ceilings, "quant_kernels": measure_quant_kernels, "tile_walks": measure_tile_walks,
              "quant_profile": measure_quant_profile,
              "kmeans": measure_kmeans, "gemm": measure_gemm, "training": measure_training}
