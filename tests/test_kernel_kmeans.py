"""The K-means assignment kernel equals its reference: indices and counts bit for bit, sums within the stated bound."""
import numpy as np
import pytest
import torch

from companion import runtime
from companion.kernels.kmeans_assign import (
    kmeans_assign, kmeans_assign_reference, kmeans_assign_torch, kmeans_lloyd_step, kmeans_thresholds, sum_tolerance,
)
from companion.kmeans import kmeans_quantize

DEVICE = runtime.kernel_device()


def check(x, c):
    """Run kernel and reference; demand equal indices and counts, sums within sum_tolerance."""
    idx, sums, counts = kmeans_assign(x.to(DEVICE), c.to(DEVICE))
    want_idx, want_sums, want_counts = kmeans_assign_reference(x, c)
    assert idx.dtype == torch.uint8 and idx.shape == x.shape
    bad = (idx.cpu() != want_idx).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} indices differ, first at {bad[0].tolist()}"
    assert torch.equal(counts.cpu(), want_counts)
    err = (sums.cpu() - want_sums).abs()
    assert (err <= sum_tolerance(x, want_idx, c.numel())).all(), err.max()
    return idx.cpu(), sums.cpu(), counts.cpu()


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 333), (1025,), (2, 0), (4097,)])
@pytest.mark.parametrize("k", [2, 5, 16, 256])
def test_matches_reference_on_ragged_shapes(shape, k):
    gen = torch.Generator().manual_seed(k * 100 + len(shape))
    x = torch.randn(shape, generator=gen)
    c = torch.sort(torch.randn(k, generator=gen) * 1.5).values
    check(x, c)


def test_ties_go_to_the_lower_centroid_and_midpoints_are_exact():
    # Centroids 0 and 1: the midpoint 0.5 is a float32, and x = 0.5 is a tie -> index 0.
    # Centroids 1 and 1 + 2^-22: the exact midpoint 1 + 2^-23 is a float32 too; x on it -> 0, one ulp above -> 1.
    # Centroids 1 + 2^-23 and 1 + 2^-22: the midpoint 1 + 3 * 2^-24 is not a float32 and rounds *up* to
    # nearest; x = 1 + 2^-22 (above the midpoint) must still go to 1, x = 1 + 2^-23 to 0.
    cases = [
        ([0.0, 1.0], [0.5, np.nextafter(np.float32(0.5), np.float32(1)), np.nextafter(np.float32(0.5), np.float32(0))],
         [0, 1, 0]),
        ([1.0, 1 + 2**-22], [1 + 2**-23, 1 + 2**-22, 1.0], [0, 1, 0]),
        ([1 + 2**-23, 1 + 2**-22], [1 + 2**-22, 1 + 2**-23], [1, 0]),
        ([-1.0, 0.0, 2.0], [-np.inf, -0.5, -0.0, 1.0, np.inf], [0, 0, 1, 1, 2]),
    ]
    for centroids, xs, want in cases:
        c, x = torch.tensor(centroids, dtype=torch.float32), torch.tensor(xs, dtype=torch.float32)
        idx = kmeans_assign(x.to(DEVICE), c.to(DEVICE))[0].cpu()
        assert idx.tolist() == want, (centroids, xs)
        assert kmeans_assign_reference(x, c)[0].tolist() == want


def test_thresholds_round_down():
    # Midpoints 1 + 2^-24 and 1 + 3 * 2^-24 are not float32 (the spacing is 2^-23). Round to nearest
    # even would send the first down to 1 but the second up to 1 + 2^-22; thresholds round both down.
    c = np.array([1.0, 1 + 2**-23, 1 + 2**-22], dtype=np.float32)
    t = kmeans_thresholds(c)
    assert t.dtype == np.float32
    assert t.tolist() == [1.0, 1 + 2**-23]
    assert (t.astype(np.float64) <= (c[:-1].astype(np.float64) + c[1:]) / 2).all()


def test_every_float32_near_a_midpoint():
    # All 2 * 512 float32 values around each midpoint of a fitted codebook: not one index differs.
    c = torch.tensor(kmeans_quantize(np.random.default_rng(0).normal(size=4096), 4).centroids, dtype=torch.float32)
    mids = kmeans_thresholds(c.numpy())
    around = [m.view(np.int32) + np.arange(-512, 512, dtype=np.int32) for m in mids]
    x = torch.from_numpy(np.concatenate(around).view(np.float32))
    check(x, c)


def test_a_lloyd_step_on_the_kernel_matches_numpy():
    x = torch.from_numpy(np.random.default_rng(1).standard_t(4, size=3000).astype(np.float32))
    c = torch.linspace(float(x.min()), float(x.max()), 8)
    idx, new = kmeans_lloyd_step(x.to(DEVICE), c.to(DEVICE))
    ref_idx, sums, counts = kmeans_assign_reference(x, c)
    want = torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).float()
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.allclose(new.cpu(), want, rtol=1e-6, atol=0)


def test_torch_baseline_agrees_away_from_midpoints():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(3))
    c = torch.linspace(-2, 2, 16)
    idx, sums, counts = kmeans_assign_torch(x, c)
    ref = kmeans_assign_reference(x, c)
    assert torch.equal(idx.to(torch.uint8), ref[0]) and torch.equal(counts, ref[2])


def test_bad_input_is_refused_clearly():
    x = torch.ones(10, device=DEVICE)
    c = torch.tensor([0.0, 1.0], device=DEVICE)
    with pytest.raises(TypeError, match="dtype float16"):
        kmeans_assign(x.half(), c)
    with pytest.raises(ValueError, match="contiguous"):
        kmeans_assign(torch.ones(4, 4, device=DEVICE).t(), c)
    with pytest.raises(ValueError, match="ascending"):
        kmeans_assign(x, torch.tensor([1.0, 0.0], device=DEVICE))
    with pytest.raises(ValueError, match="2 to 256"):
        kmeans_assign(x, torch.arange(257, dtype=torch.float32, device=DEVICE))
    with pytest.raises(TypeError, match="dtype float64"):
        kmeans_assign(x, c.double())


@pytest.mark.gpu
def test_compiled_kernel_on_ten_million_weights():
    x = torch.randn(10_000_000, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    c = torch.tensor(kmeans_quantize(x[:100_000].cpu(), 4).centroids, dtype=torch.float32, device="cuda")
    idx, sums, counts = kmeans_assign(x, c)
    ref_idx, ref_sums, ref_counts = kmeans_assign_reference(x, c)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(counts.cpu(), ref_counts)
    assert ((sums.cpu() - ref_sums).abs() <= sum_tolerance(x, ref_idx, 16)).all()
    again = kmeans_assign(x, c)
    assert torch.equal(again[1], sums)  # deterministic: no atomics


def test_thresholds_computed_in_the_kernel_are_exact():
    # The kernel derives its thresholds from the centroids; every float32 within 3 ulps of each
    # threshold (either side) must land where the float64 reference puts it, for several k, with
    # centroid pairs whose midpoints are and are not float32 numbers, negative, and around zero.
    rng = np.random.default_rng(5)
    for k in (2, 3, 16, 200):
        c = np.sort(rng.normal(size=k)).astype(np.float32)
        c = np.unique(np.concatenate([c, np.float32([1 + 2**-23, 1 + 2**-22, -(2.0**-149), 2.0**-149])]))
        t = kmeans_thresholds(c)
        near = (t.view(np.int32)[:, None] + np.arange(-3, 4, dtype=np.int32)[None, :]).ravel().view(np.float32)
        near = near[np.isfinite(near)]  # stepping bit patterns past -0 can reach NaN codes
        x = torch.from_numpy(np.concatenate([near, np.float32([0.0, -0.0])]))
        got = kmeans_assign(x.to(DEVICE), torch.from_numpy(c).to(DEVICE))[0].cpu()
        assert torch.equal(got, kmeans_assign_reference(x, torch.from_numpy(c))[0])
    x = torch.ones(4, device=DEVICE)
    assert kmeans_assign(x, torch.tensor([0.0, 2.0], device=DEVICE), check_values=False)[0].tolist() == [0] * 4