"""K-means weight sharing: the algorithm, storage accounting, Huffman sizes, fine-tuning, errors."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from companion.codebooks import fit_lloyd_max
from companion.kmeans import (
    INITS, centroid_gradient, compression_ratio, huffman_bits, huffman_code_lengths, kmeans_init, kmeans_quantize,
    share_weights, shared_layers, unshare_weights,
)
from companion.scaling import sqnr_db

# The 4 x 4 example of Deep Compression (Han et al. 2016, figure 3): 2 bits, centroids 2, 1.5, 0, -1.
TOY = np.array([[2.09, -0.98, 1.48, 0.09], [0.05, -0.14, -1.08, 2.12],
                [-0.91, 1.92, 0.0, -1.03], [1.87, 0.0, 1.53, 1.49]], dtype=np.float32)


def test_toy_matrix_by_hand():
    q = kmeans_quantize(TOY, 2)
    assert np.round(q.centroids, 6).tolist() == [-1.0, 0.0, 1.5, 2.0]
    assert q.indices.tolist() == [[3, 0, 2, 1], [1, 1, 0, 3], [0, 3, 1, 0], [3, 1, 2, 2]]
    assert q.counts().tolist() == [4, 5, 3, 4]
    assert q.storage_bits() == {"indices": 32, "codebook": 128}
    assert q.compression_ratio() == Fraction(16 * 32, 16 * 2 + 4 * 32)
    assert q.indices.dtype == np.uint8 and q.centroids.dtype == np.float64
    assert (q.centroids.astype(np.float32) == q.centroids).all()  # the table is float32


@pytest.mark.parametrize("init", INITS)
def test_lloyd_fixed_point_and_determinism(init):
    x = np.random.default_rng(0).standard_t(5, size=5000).astype(np.float32)
    a, b = kmeans_quantize(x, 3, init=init, seed=4), kmeans_quantize(torch.from_numpy(x), 3, init=init, seed=4)
    assert a.centroids.tolist() == b.centroids.tolist() and np.array_equal(a.indices, b.indices)
    # Converged: each used centroid is its cluster's mean (to float32), and each weight its nearest centroid.
    counts = a.counts()
    means = np.bincount(a.indices, weights=x.astype(np.float64), minlength=8) / np.maximum(counts, 1)
    used = counts > 0
    assert np.allclose(a.centroids[used], means[used], rtol=2**-22, atol=0)
    dist = np.abs(x.astype(np.float64)[:, None] - a.centroids[None, :])
    assert (dist[np.arange(x.size), a.indices] <= dist.min(axis=1)).all()


def test_inits():
    x = np.arange(100, dtype=np.float32)
    assert kmeans_init(x, 4, "linear").tolist() == [0.0, 33.0, 66.0, 99.0]
    assert kmeans_init(x, 4, "density").tolist() == [12.0, 37.0, 62.0, 87.0]
    r1, r2 = kmeans_init(x, 4, "random", seed=1), kmeans_init(x, 4, "random", seed=2)
    assert len(set(r1)) == 4 and set(r1) <= set(x.tolist()) and r1.tolist() != r2.tolist()
    assert kmeans_init(x, 4, "random", seed=1).tolist() == r1.tolist()
    # Forgy keeps distinct values even when the weights repeat.
    assert len(set(kmeans_init(np.repeat([1.0, 2.0, 3.0], 50), 3, "random", seed=0))) == 3
    # The density start is fit_lloyd_max's quantile start (one idea, one place).
    assert kmeans_init(x, 4, "density").tolist() == list(fit_lloyd_max(x, 4, iterations=0).values)


def test_kmeans_beats_linear_grid_in_sqnr():
    x = np.random.default_rng(2).laplace(size=20000)
    grid = np.linspace(x.min(), x.max(), 16)
    linear = grid[np.abs(x[:, None] - grid).argmin(1)]
    assert sqnr_db(x, kmeans_quantize(x, 4).dequantize()) > sqnr_db(x, linear) + 3


def test_empty_cluster_keeps_its_centroid():
    # Linear start over [0, 100] with weights only near the ends: the middle centroids get nothing.
    x = np.concatenate([np.linspace(0, 1, 50), np.linspace(99, 100, 50)]).astype(np.float32)
    q = kmeans_quantize(x, 2, init="linear")
    assert q.counts().tolist() == [50, 0, 0, 50]
    assert np.allclose(q.centroids, [0.5, 100 / 3, 200 / 3, 99.5], rtol=1e-6)


def test_compression_ratio_exact():
    assert compression_ratio(1_000_000, 4) == Fraction(32_000_000, 4_000_000 + 512)
    assert compression_ratio(16, 2) == Fraction(512, 160)
    assert compression_ratio(10, 1, weight_bits=16) == Fraction(160, 10 + 32)
    with pytest.raises(ValueError, match="n >= 1"):
        compression_ratio(0, 4)


def test_huffman():
    # Counts 45, 13, 12, 16, 9, 5 (the CLRS example): lengths 1, 3, 3, 3, 4, 4 -> 224 bits.
    counts = [45, 13, 12, 16, 9, 5]
    assert huffman_code_lengths(counts).tolist() == [1, 3, 3, 3, 4, 4]
    idx = np.repeat(np.arange(6), counts)
    assert huffman_bits(idx, 6) == 224
    assert huffman_code_lengths([0, 7, 0]).tolist() == [0, 1, 0]
    assert huffman_code_lengths([4, 4, 4, 4]).tolist() == [2, 2, 2, 2]
    lengths = huffman_code_lengths(np.random.default_rng(0).integers(0, 1000, 64))
    assert np.sum(2.0 ** -lengths[lengths > 0]) == 1.0  # a complete prefix code (Kraft equality)
    q = kmeans_quantize(np.random.default_rng(1).normal(size=4096), 4, init="linear")
    assert q.huffman_bits() < q.storage_bits()["indices"]


def test_bad_input():
    x = np.random.default_rng(0).normal(size=100)
    for bits in (0, 17, -1):
        with pytest.raises(ValueError, match=r"\[1, 16\]"):
            kmeans_quantize(x, bits)
    with pytest.raises(TypeError, match="int"):
        kmeans_quantize(x, 2.0)
    with pytest.raises(ValueError, match="only 3 distinct"):
        kmeans_quantize(np.array([1.0, 2.0, 3.0, 3.0, 1.0]), 2)
    with pytest.raises(ValueError, match="1 NaN"):
        kmeans_quantize(np.array([1.0, np.nan, 2.0]), 1)
    with pytest.raises(ValueError, match="1 infinite"):
        kmeans_quantize(np.array([1.0, np.inf, 2.0]), 1)
    with pytest.raises(ValueError, match="unknown init"):
        kmeans_quantize(x, 2, init="kmeans++")
    with pytest.raises(TypeError, match="floating"):
        kmeans_quantize(np.arange(10), 2)
    with pytest.raises(ValueError, match="init must hold"):
        fit_lloyd_max(x, 4, init=[0.0, 0.0, 1.0, 2.0])


def test_sixteen_bits():
    x = np.random.default_rng(0).normal(size=70_000).astype(np.float32)
    q = kmeans_quantize(x, 16, iterations=3)
    assert q.k == 65536 and q.indices.dtype == np.uint16
    assert sqnr_db(x, q.dequantize()) > 80


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)).double()


def test_share_weights_is_a_drop_in_and_gradients_are_grouped_sums():
    model = _mlp()
    x = torch.randn(20, 6, dtype=torch.float64)
    layers = share_weights(model, {"0": 2, "2": 3})
    assert shared_layers(model) == ["0", "2"] and layers["0"].k == 4 and layers["2"].k == 8
    names = sorted(n for n, _ in model.named_parameters())
    assert names == ["0.bias", "0.weight_centroids", "2.bias", "2.weight_centroids"]
    # The forward uses exactly the shared weights.
    w0 = torch.from_numpy(layers["0"].dequantize())
    assert torch.equal(model[0].weight, w0)
    out = model(x)
    # Gradient of each centroid = sum of the gradients its weights would get.
    out.square().sum().backward()
    plain = _mlp()
    with torch.no_grad():
        plain[0].weight.copy_(w0)
        plain[2].weight.copy_(torch.from_numpy(layers["2"].dequantize()))
    plain(x).square().sum().backward()
    for i in ("0", "2"):
        want = centroid_gradient(getattr(plain, i).weight.grad.numpy(), layers[i].indices, layers[i].k)
        assert np.allclose(getattr(model, i).weight_centroids.grad.numpy(), want, rtol=1e-12, atol=1e-12)


def test_fine_tuning_moves_centroids_keeps_indices_and_lowers_the_loss():
    model = _mlp()
    torch.manual_seed(1)
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    share_weights(model, 2)
    idx_before = model[0].weight_indices.clone()
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n.endswith("centroids")], lr=1e-2)
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    start = loss().item()
    for _ in range(50):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < start
    assert torch.equal(model[0].weight_indices, idx_before)
    assert len(torch.unique(model[0].weight)) <= 4  # still 4 shared values
    assert unshare_weights(model) == ["0", "2"] and shared_layers(model) == []
    assert isinstance(model[0].weight, torch.nn.Parameter) and len(torch.unique(model[0].weight)) <= 4
    assert loss().item() < start


def test_share_weights_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="no entry"):
        share_weights(model, {"0": 2})
    share_weights(model, 2, layers=["0"])
    with pytest.raises(ValueError, match="already shares"):
        share_weights(model, 2, layers=["0"])
    with pytest.raises(ValueError, match="no parameter"):
        share_weights(model, 2, layers=["1"])
