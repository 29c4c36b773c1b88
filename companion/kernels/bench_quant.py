"""Benchmark of the quantization kernels: achieved bandwidth next to copy and torch.compile, one run.

Bytes that must move: the input read once, the codes and the scales written once (NVFP4's amax pass
reads the input a second time; that read is timed but not counted, so its ratio shows the cost of
the extra pass). Two copy ceilings: the device's copy bandwidth (1 GiB, its best rate) and a copy of
exactly the kernel's bytes, which pays the same fixed costs of a launch and its tail. The baseline a
user would otherwise write is the obvious PyTorch code for the same recipe, compiled with
``torch.compile``; it is timed on the same inputs in the same process.

Kernel, copy of the same bytes and compiled baseline are each timed as GPU time: calls captured in a
CUDA graph and replayed, on enough copies of the input that no call finds its data in the L2 cache.
Timed one call at a time from Python instead (``triton.testing.do_bench``, which clears the L2 before
each call), a call whose launcher takes longer on the host than the GPU needs for the work queued
before it starts late, and the wait is timed as if it were the kernel's; that rate is recorded too
(``*_from_python``), as what a caller launching one quantization at a time would see, with the host
time a call takes (``*_host_us``).

    python -m companion.book bench quant_kernels      # -> book/data/quant_kernels.json
"""
from __future__ import annotations

SIZES = ((4096, 4096), (8192, 8192), (16384, 16384))
COMPILE_SIZE = (8192, 8192)
# Inputs cycled through in a timed graph hold at least this many bytes, four times the H100's and
# H200's 50 MB L2 cache, so each call reads its input from HBM.
ROTATION_BYTES = 200_000_000


def _torch_baselines():
    """The PyTorch recipes (bf16 in, codes and scales out), written the obvious way."""
    import torch

    f8 = torch.float8_e4m3fn

    def fp8_rows(x):
        M, K = x.shape
        xb = x.float().view(M, K // 128, 128)
        amax = xb.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, amax / 448.0, 1.0)
        return (xb / s).clamp(-448, 448).to(f8).view(M, K), s.squeeze(-1)

    def fp8_tiles(x):
        M, K = x.shape
        xb = x.float().view(M // 128, 128, K // 128, 128)
        amax = xb.abs().amax(dim=(1, 3), keepdim=True)
        s = torch.where(amax > 0, amax / 448.0, 1.0)
        return (xb / s).clamp(-448, 448).to(f8).view(M, K), s.view(M // 128, K // 128)

    def mx_scale(amax, emax):
        e = ((amax.view(torch.int32) >> 23) - 127 - emax).clamp(-127, 127)
        inv = ((127 - e) << 23).view(torch.float32)
        return (e + 127).to(torch.uint8), inv

    def mxfp8_rows(x):
        M, K = x.shape
        xb = x.float().view(M, K // 32, 32)
        code, inv = mx_scale(xb.abs().amax(-1, keepdim=True), 8)
        return (xb * inv).clamp(-448, 448).to(f8).view(M, K), code.squeeze(-1)

    def mxfp8_rows_and_columns(x):
        M, K = x.shape
        rows = mxfp8_rows(x)
        xc = x.float().view(M // 32, 32, K)
        code, inv = mx_scale(xc.abs().amax(1, keepdim=True), 8)
        return rows + ((xc * inv).clamp(-448, 448).to(f8).view(M, K), code.squeeze(1))

    def e2m1(v):  # nearest-even onto 0, .5, 1, 1.5, 2, 3, 4, 6: count the boundaries passed
        a = v.abs()
        mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5)
               + (a >= 3.5) + (a > 5))
        return mag | ((v < 0).to(torch.uint8) << 3)

    def pack(codes):
        return codes[..., 0::2] | (codes[..., 1::2] << 4)

    def mxfp4_rows(x):
        M, K = x.shape
        xb = x.float().view(M, K // 32, 32)
        code, inv = mx_scale(xb.abs().amax(-1, keepdim=True), 2)
        return pack(e2m1(xb * inv).view(M, K)), code.squeeze(-1)

    def nvfp4(x):
        M, K = x.shape
        xf = x.float()
        s_t = xf.abs().amax() / 2688.0
        s_t = torch.where(s_t > 0, s_t, 1.0)
        xb = xf.view(M, K // 16, 16)
        sb = (xb.abs().amax(-1, keepdim=True) / (6.0 * s_t)).clamp(max=448).to(f8)
        scale = sb.float() * s_t
        v = torch.where(scale > 0, xb / scale, 0.0)
        return pack(e2m1(v).view(M, K)), sb.squeeze(-1), s_t

    return {"fp8_1x128": fp8_rows, "fp8_128x128": fp8_tiles, "mxfp8_rows": mxfp8_rows,
            "mxfp8_rows_and_columns": mxfp8_rows_and_columns, "mxfp4_rows": mxfp4_rows, "nvfp4": nvfp4}


def _kernels(x):
    from companion import kernels as k

    amax = x.float().abs().amax()  # known in advance and kept on the device, as delayed scaling does
    return {
        "fp8_1x128": lambda x: k.quantize_fp8_blockwise(x, (1, 128)),
        "fp8_128x128": lambda x: k.quantize_fp8_blockwise(x, (128, 128)),
        "mxfp8_rows": lambda x: k.quantize_mx_rows(x, "fp8_e4m3"),
        "mxfp8_rows_and_columns": lambda x: k.quantize_mx_rows_and_columns(x, "fp8_e4m3"),
        "mxfp4_rows": lambda x: k.quantize_mx_rows(x, "fp4_e2m1"),
        "nvfp4": lambda x: k.quantize_nvfp4_kernel(x),
        # Stochastic rounding: same bytes, plus one Philox call per 4 elements.
        "fp8_1x128_stochastic": lambda x: k.quantize_fp8_blockwise(x, (1, 128), rounding="stochastic", seed=1),
        "mxfp4_rows_stochastic": lambda x: k.quantize_mx_rows(x, "fp4_e2m1", rounding="stochastic", seed=1),
        "nvfp4_stochastic": lambda x: k.quantize_nvfp4_kernel(x, rounding="stochastic", seed=1),
        # The tensor scale from an amax known in advance: no amax pass, one read of the input.
        "nvfp4_static_amax": lambda x: k.quantize_nvfp4_kernel(x, global_amax=amax),
    }


def bytes_moved(name: str, M: int, K: int) -> int:
    """Input (bf16) read once plus codes and scales written once."""
    n = M * K
    return {
        "fp8_1x128": 2 * n + n + 4 * M * -(-K // 128),
        "fp8_128x128": 2 * n + n + 4 * -(-M // 128) * -(-K // 128),
        "mxfp8_rows": 2 * n + n + n // 32,
        "mxfp8_rows_and_columns": 2 * n + 2 * n + 2 * n // 32,
        "mxfp4_rows": 2 * n + n // 2 + n // 32,
        "nvfp4": 2 * n + n // 2 + n // 16 + 4,
    }[name.removesuffix("_stochastic").removesuffix("_static_amax")]


def random_input(M: int, K: int, seed: int = 0):
    """The benchmarks' input: a random normal bf16 (M, K) tensor on the GPU."""
    import torch

    return torch.randn(M, K, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).bfloat16()


def _inputs(M: int, K: int, seed: int = 0) -> list:
    """Copies of one random_input, enough of them to hold ROTATION_BYTES between them."""
    from companion.book import bench

    x = random_input(M, K, seed)
    return [x] + [x.clone() for _ in range(bench.rotation_count(x.nbytes, ROTATION_BYTES) - 1)]


def _graph_bytes_per_s(fn, xs, nbytes: int) -> float:
    """``nbytes`` per call of ``fn`` on each of ``xs`` in turn, timed as a CUDA graph (GPU time)."""
    from companion.book import bench

    return nbytes / (bench.graph_ms_per_call([lambda x=x: fn(x) for x in xs]) * 1e-3)


def _host_us(fn, calls: int = 100) -> float:
    """Microseconds of host time per call of ``fn``: the launcher's own cost, the GPU left to run behind."""
    import time

    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def measure_quant_kernels() -> dict:
    import torch

    from companion.book import bench

    if not torch.cuda.is_available():
        raise RuntimeError("the quantization benchmark needs a CUDA GPU")
    copy = bench.copy_bandwidth()
    baselines = _torch_baselines()
    results = {"copy_bytes_per_s": copy, "kernels": {}}
    for M, K in SIZES:
        xs = _inputs(M, K)
        kernels = _kernels(xs[0])
        for name, fn in kernels.items():
            row = results["kernels"].setdefault(name, {})
            nbytes = bytes_moved(name, M, K)
            entry = {"bytes": nbytes, "kernel_bytes_per_s": _graph_bytes_per_s(fn, xs, nbytes),
                     "kernel_from_python_bytes_per_s": nbytes / (bench._median_ms(lambda: fn(xs[0])) * 1e-3)}
            entry["kernel_vs_copy"] = entry["kernel_bytes_per_s"] / copy
            entry["kernel_from_python_vs_copy"] = entry["kernel_from_python_bytes_per_s"] / copy
            entry["launcher_host_us"] = _host_us(lambda: fn(xs[0]))
            # A copy of exactly these bytes: the same launch and tail costs, so the fair ceiling at this size.
            entry["copy_same_bytes_per_s"] = bench.copy_bandwidth(nbytes, ROTATION_BYTES)
            entry["kernel_vs_copy_same_bytes"] = entry["kernel_bytes_per_s"] / entry["copy_same_bytes_per_s"]
            if (M, K) == COMPILE_SIZE and name in baselines:  # no compiled baseline for stochastic rounding
                try:
                    compiled = torch.compile(baselines[name], dynamic=False)
                    compiled(xs[0])
                    entry["compile_bytes_per_s"] = _graph_bytes_per_s(compiled, xs, nbytes)
                    entry["kernel_vs_compile"] = entry["kernel_bytes_per_s"] / entry["compile_bytes_per_s"]
                    entry["compile_from_python_bytes_per_s"] = nbytes / (
                        bench._median_ms(lambda: compiled(xs[0])) * 1e-3)
                    entry["compile_host_us"] = _host_us(lambda: compiled(xs[0]))
                except Exception as error:  # record why the baseline could not run, keep measuring
                    entry["compile_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            row[f"{M}x{K}"] = entry
        del xs, kernels
        torch.cuda.empty_cache()
    return {"environment": bench.environment(), "results": results}


# How else the launchers may walk the tiles: (BLOCK_M, BLOCK_K, num_warps, programs per SM, pipeline
# stages, tiles numbered down columns), as in companion.kernels.fp8_blockwise and mx_quant; 0 programs per
# SM starts one program per tile. Each kernel is measured under its launcher's current configuration
# first, then under these. The results of a run on an H100 are recorded beside the configurations.
TILE_WALKS = {
    "fp8_1x128": ("fp8_blockwise", "ROW_BLOCK_CONFIG", None, [
        (2, 1024, 2, 0, 1, True), (4, 512, 2, 0, 1, False), (2, 1024, 2, 8, 2, False),
        (2, 1024, 2, 4, 3, False)]),
    "fp8_128x128": ("fp8_blockwise", "TILE_CONFIG", None, [
        (128, 128, 16, 0, 1, True), (128, 128, 16, 2, 2, False), (128, 128, 16, 1, 3, False)]),
    "mxfp8_rows": ("mx_quant", "ROWS_CONFIG", "fp8", [(8, 512, 4, 0, 1, True), (8, 512, 4, 8, 2, False)]),
    "mxfp8_rows_and_columns": ("mx_quant", "ROWS_AND_COLUMNS_CONFIG", None, [
        (32, 128, 2, 0, 1, True), (32, 128, 2, 8, 3, False), (32, 128, 2, 8, 3, True)]),
}


def measure_tile_walks(rounds: int = 2) -> dict:
    """Each kernel under its launcher's configuration and then each walk of TILE_WALKS, 8192 x 8192
    bf16, as fractions of the copy rate (GPU time, as in measure_quant_kernels; ``rounds`` interleaved
    measurements per walk, so that drift hits all walks alike), and the number of code and scale bytes
    that differ from the launcher's configuration's on an input full of special values (zero wherever
    the walk is right)."""
    import importlib

    import torch

    from companion.book import bench

    if not torch.cuda.is_available():
        raise RuntimeError("the tile-walk benchmark needs a CUDA GPU")
    copy = bench.copy_bandwidth()
    M = K = 8192
    xs = _inputs(M, K)
    g = torch.Generator("cuda").manual_seed(1)
    odd = torch.randn(1000, 1100, device="cuda", generator=g) * torch.exp2(
        torch.randint(-30, 30, (1000, 1100), device="cuda", generator=g).float())
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-39, 3e38],
                            device="cuda")
    odd.view(-1)[torch.randint(0, odd.numel(), (4000,), device="cuda", generator=g)] = specials.repeat(500)
    odd[:128, :128] = 0.0
    odd = odd.bfloat16()
    kernels = _kernels(xs[0])
    results = {"copy_bytes_per_s": copy, "walks": {}}
    for name, (module_name, attr, key, others) in TILE_WALKS.items():
        module = importlib.import_module(f"companion.kernels.{module_name}")
        saved = getattr(module, attr) if key is None else getattr(module, attr)[key]
        walks = [saved] + [walk for walk in others if walk != saved]

        def use(walk):
            if key is None:
                setattr(module, attr, walk)
            else:
                getattr(module, attr)[key] = walk

        fn, nbytes = kernels[name], bytes_moved(name, M, K)
        reference = [t.view(torch.uint8).clone() for t in fn(odd)]  # under the launcher's configuration
        try:
            rows = {str(walk): {"vs_copy": [], "bytes_differing": 0} for walk in walks}
            for _ in range(rounds):
                for walk in walks:
                    use(walk)
                    got = fn(odd)
                    rows[str(walk)]["bytes_differing"] += sum(
                        int((a.view(torch.uint8) != b).sum()) for a, b in zip(got, reference))
                    rows[str(walk)]["vs_copy"].append(_graph_bytes_per_s(fn, xs, nbytes) / copy)
        finally:
            use(saved)
        results["walks"][name] = rows
    return {"environment": bench.environment(), "results": results}
