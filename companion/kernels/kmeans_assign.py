"""The hot loop of K-means: assign every weight to its nearest centroid, and sum each cluster.

One Lloyd iteration over n weights and k sorted centroids c_0 < ... < c_{k-1} needs, per weight, the
index of the nearest centroid (ties to the lower index) and, per cluster, the sum and the count of
its weights; the new centroids are sums / counts.

The definition (:func:`kmeans_assign_reference`) is :meth:`companion.codebooks.Codebook.encode`:
with sorted centroids, the nearest one is found from the midpoints m_j = (c_j + c_{j+1}) / 2, and

    index(x) = number of midpoints m_j with x > m_j          (x exactly on a midpoint goes down)

with m_j exact (float64 holds the midpoint of two float32 numbers exactly).  The kernel compares in
float32 and is still bit-exact: for a float32 x and any real m, ``x > m`` holds exactly when
``x > t``, t being m rounded down to float32 (:func:`kmeans_thresholds`).  So the kernel computes the
k - 1 float32 thresholds from the centroids and counts, per weight, those below it — no distances, no
rounding, no ties to
break differently.  -Inf goes to index 0 and +Inf to k - 1, as in the reference; the kernel does not
look for NaN (a NaN compares false and lands in cluster 0), the reference refuses it.

The counts are integers and exact.  The sums are not bit-exact: each program adds its block's
weights in float32 (a fixed reduction tree, so the result is deterministic for a given block size
and device), and the per-block partial sums are added in float64.  The error of a cluster's sum is
at most BLOCK * 2^-24 * (sum of |x| in that cluster) — the textbook bound (m - 1) u sum |x| for a
float32 sum of m terms — which the tests check against the float64 reference.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from companion import runtime
from companion.codebooks import Codebook

MAX_K = 256  # uint8 indices; the one-hot reduction holds BLOCK x K values per program
TILE = 16384  # BLOCK * K_PAD: elements of the one-hot tile per program (from a sweep on an H200)


@triton.jit
def _kmeans_assign_kernel(
    x_ptr,  # *float32, n weights
    c_ptr,  # *float32, k centroids, sorted strictly ascending
    idx_ptr,  # *uint8, n indices out
    sums_ptr,  # *float32, (programs, K) per-block cluster sums out
    counts_ptr,  # *int32, (programs, K) per-block cluster counts out
    n,  # number of weights
    k,  # number of centroids
    K: tl.constexpr,  # k padded to a power of two
    BLOCK: tl.constexpr,  # weights per program
):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    clusters = tl.arange(0, K)
    # The thresholds of kmeans_thresholds, computed here from the centroids (K values per program
    # cost nothing, and the launcher needs no extra kernels): the exact float64 midpoint, rounded to
    # float32, stepped one float32 down where that rounding went up; +inf beyond the k - 1 midpoints.
    valid = clusters < k - 1
    lo = tl.load(c_ptr + clusters, mask=valid, other=0.0).to(tl.float64)
    hi = tl.load(c_ptr + clusters + 1, mask=valid, other=0.0).to(tl.float64)
    mid = (lo + hi) * 0.5
    t = mid.to(tl.float32)
    t_bits = t.to(tl.int32, bitcast=True)
    below = tl.where(t > 0, t_bits - 1, tl.where(t < 0, t_bits + 1, -2147483647))  # -2147483647: -2^-149
    t = tl.where(t.to(tl.float64) > mid, below.to(tl.float32, bitcast=True), t)
    t = tl.where(valid, t, float("inf"))
    # index = how many thresholds lie below x: exact comparisons, padding (+inf) never counts.
    # Clusters run along the first axis and weights along the second, so each thread holds all K
    # comparisons of its weights: counting them is a reduction inside the thread, and only the K
    # per-cluster totals need the costlier reduction across threads.
    idx = tl.sum((x[None, :] > t[:, None]).to(tl.int32), axis=0)  # (BLOCK,)
    tl.store(idx_ptr + offsets, idx.to(tl.uint8), mask=mask)
    member = (clusters[:, None] == idx[None, :]) & mask[None, :]  # (K, BLOCK) one-hot
    sums = tl.sum(tl.where(member, x[None, :], 0.0), axis=1)  # (K,)
    counts = tl.sum(member.to(tl.int32), axis=1)
    tl.store(sums_ptr + pid * K + clusters, sums)
    tl.store(counts_ptr + pid * K + clusters, counts)


def kmeans_thresholds(centroids) -> np.ndarray:
    """The k - 1 midpoints of sorted float32 centroids, rounded down to float32.

    For every float32 x: ``x > thresholds[j]`` exactly when x lies above the exact midpoint j.
    """
    c = np.asarray(centroids, dtype=np.float64)
    mid = (c[:-1] + c[1:]) / 2  # exact for float32 centroids
    t = mid.astype(np.float32)  # rounded to nearest; step down where that went up
    up = t.astype(np.float64) > mid
    t[up] = np.nextafter(t[up], np.float32(-np.inf))
    return t


def _check_centroids(centroids: torch.Tensor, check_values: bool) -> int:
    runtime.check_tensor(centroids, "centroids", dtypes=(torch.float32,), ndim=1)
    k = centroids.numel()
    if not 2 <= k <= MAX_K:
        raise ValueError(f"the kernel handles 2 to {MAX_K} centroids (uint8 indices), got {k}")
    if check_values:  # reads the values back to the host: a device synchronisation
        c = centroids.detach().cpu().numpy().astype(np.float64)
        if not np.isfinite(c).all() or (np.diff(c) <= 0).any():
            raise ValueError("centroids must be finite and sorted strictly ascending")
    return k


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, check_values: bool = True):
    """Nearest-centroid indices (uint8, x's shape) and per-cluster sums (float64) and counts (int64).

    ``x``: float32, contiguous, any shape; ``centroids``: float32, 1-D, sorted strictly ascending,
    2 to 256 of them, on the same device.  See the module docstring for the exactness of each output.
    ``check_values=False`` skips the check that the centroids are finite and sorted, which needs
    their values on the host (a synchronisation); the caller then guarantees it.
    """
    runtime.check_tensor(x, "x", dtypes=(torch.float32,))
    k = _check_centroids(centroids, check_values)
    if centroids.device != x.device:
        raise ValueError(f"x is on {x.device} but centroids on {centroids.device}")
    K = max(2, triton.next_power_of_2(k))
    block = TILE // K
    n = x.numel()
    idx = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    programs = triton.cdiv(n, block)
    sums = torch.empty((programs, K), dtype=torch.float32, device=x.device)
    counts = torch.empty((programs, K), dtype=torch.int32, device=x.device)
    if n:
        _kmeans_assign_kernel[(programs,)](x, centroids, idx, sums, counts, n, k, K=K, BLOCK=block)
    return idx, sums.sum(0, dtype=torch.float64)[:k], counts.sum(0, dtype=torch.int64)[:k]


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor):
    """The definition: Codebook.encode for the indices (uint8), float64 sums and int64 counts (CPU)."""
    c = centroids.detach().cpu().numpy().astype(np.float64)
    k = c.size
    xs = x.detach().cpu().numpy().astype(np.float64).ravel()
    idx = Codebook("centroids", tuple(c)).encode(xs).astype(np.uint8)
    sums = np.bincount(idx, weights=xs, minlength=k)
    counts = np.bincount(idx, minlength=k)
    return (torch.from_numpy(idx).reshape(x.shape), torch.from_numpy(sums),
            torch.from_numpy(counts.astype(np.int64)))


def sum_tolerance(x: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """The stated bound on each cluster sum's error: BLOCK * 2^-24 * sum of |x| in the cluster."""
    K = max(2, triton.next_power_of_2(k))
    absx = x.detach().cpu().double().abs().ravel()
    per_cluster = torch.zeros(k, dtype=torch.float64).index_add_(0, idx.cpu().long().ravel(), absx)
    return (TILE // K) * 2.0**-24 * per_cluster


def kmeans_lloyd_step(x: torch.Tensor, centroids: torch.Tensor, *, check_values: bool = True):
    """One Lloyd iteration on the kernel: (indices, new float32 centroids; empty clusters stay put)."""
    idx, sums, counts = kmeans_assign(x, centroids, check_values=check_values)
    new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.double()).float()
    return idx, new


def kmeans_assign_torch(x: torch.Tensor, centroids: torch.Tensor):
    """What one would write in PyTorch: argmin of |x - c| (a (n, k) temporary), index_add, bincount.

    The baseline of the benchmark.  Not the definition: |x - c| is rounded in float32, so a weight
    within rounding of a midpoint can go the other way.
    """
    xf = x.reshape(-1)
    idx = (xf[:, None] - centroids[None, :]).abs().argmin(dim=1)
    sums = torch.zeros(centroids.numel(), dtype=torch.float64, device=x.device).index_add_(0, idx, xf.double())
    return idx.reshape(x.shape), sums, torch.bincount(idx, minlength=centroids.numel())


def kmeans_assign_bucketize(x: torch.Tensor, thresholds: torch.Tensor, k: int):
    """The definition in PyTorch: torch.bucketize counts the thresholds strictly below each x."""
    xf = x.reshape(-1)
    idx = torch.bucketize(xf, thresholds)
    sums = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, idx, xf.double())
    return idx.reshape(x.shape), sums, torch.bincount(idx, minlength=k)


BENCH_N = 10_000_000
BENCH_K = 16


def measure_kmeans_assign(n: int = BENCH_N, k: int = BENCH_K) -> dict:
    """One assignment pass over n float32 weights with k centroids: the kernel, PyTorch, torch.compile.

    Bytes that must move: the weights read once (4n) and the uint8 indices written once (n); the
    per-cluster sums are a few kilobytes.  Copy bandwidth is measured in the same run.  The kernel is
    timed without the host-side check of the centroids (``check_values=False``): it was checked once.
    """
    from companion.book import bench
    from companion.kmeans import kmeans_quantize

    if not torch.cuda.is_available():
        raise RuntimeError("the K-means benchmark needs a CUDA GPU")
    x = torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fit = kmeans_quantize(x[:1_000_000].cpu(), int(np.log2(k)))
    c = torch.tensor(fit.centroids, dtype=torch.float32, device="cuda")
    t = torch.from_numpy(kmeans_thresholds(fit.centroids)).cuda()
    want = kmeans_assign_reference(x[:1 << 20], c)[0]
    assert torch.equal(kmeans_assign(x[:1 << 20], c)[0].cpu(), want), "kernel differs from the reference"
    nbytes = 5 * n
    copy = bench.copy_bandwidth()
    timings = {
        "triton_kernel": lambda: kmeans_assign(x, c, check_values=False),  # checked once above
        "torch_argmin": lambda: kmeans_assign_torch(x, c),
        "torch_bucketize": lambda: kmeans_assign_bucketize(x, t, k),
    }
    results = {"n": n, "k": k, "bytes": nbytes, "copy_bytes_per_s": copy, "ms": {}}
    for name, fn in timings.items():
        results["ms"][name] = bench._median_ms(fn)
    for name, fn in (("compiled_argmin", kmeans_assign_torch), ("compiled_bucketize", kmeans_assign_bucketize)):
        try:
            compiled = torch.compile(fn, dynamic=False)
            args = (x, c) if name == "compiled_argmin" else (x, t, k)
            compiled(*args)
            results["ms"][name] = bench._median_ms(lambda: compiled(*args))
        except Exception as error:  # record why the baseline could not run, keep measuring
            results.setdefault("errors", {})[name] = f"{type(error).__name__}: {str(error)[:300]}"
    results["bytes_per_s"] = {name: nbytes / (ms * 1e-3) for name, ms in results["ms"].items()}
    results["vs_copy"] = {name: bw / copy for name, bw in results["bytes_per_s"].items()}
    return {"environment": bench.environment(), "results": results}
