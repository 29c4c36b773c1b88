"""K-means weight sharing: cluster a tensor's weights, store a small codebook and one index per weight.

Deep Compression (Han et al. 2016, arXiv 1510.00149) replaces the n weights of a layer by k shared
values: the weights are clustered by 1-D K-means (Lloyd's algorithm), each weight is stored as the
index of its cluster (log2 k bits) and the k centroids once, at the weights' own width b::

    stored bits = n * log2(k) + k * b          compression ratio r = n * b / (n * log2(k) + k * b)

Here k = 2^bits, so log2(k) = bits exactly and :func:`compression_ratio` is an exact Fraction.
The index stream can be entropy-coded on top: :func:`huffman_bits` gives its Huffman-coded size.

The clustering is :func:`companion.codebooks.fit_lloyd_max` (Lloyd's algorithm in one dimension,
on the sorted weights with prefix sums); this module chooses its start and stores the result:

    "linear"    k values evenly spaced over [min w, max w]   (Deep Compression's recommendation)
    "random"    Forgy: k distinct weights drawn at random (``seed``)
    "density"   the weights' quantiles at (i + 1/2) / k: evenly spaced on the weights' CDF

A cluster that loses all its weights keeps its centroid where it was (it stays a valid, unused code).
The centroids are then rounded to float32 (the b = 32 bits of the stored table) and every weight is
assigned to its nearest stored centroid, ties to the lower one: :meth:`Codebook.encode`, the same
rule as the Triton kernel :mod:`companion.kernels.kmeans_assign`.  Everything is deterministic; only
"random" uses ``seed``.

Fine-tuning (Deep Compression, section 3.3): with the indices fixed, the weights are a function of the
centroids, w = c[idx], so the gradient of the loss with respect to centroid j is the sum of the
gradients of the weights that share it.  :func:`share_weights` installs exactly that on a torch model:
the chosen layers' ``weight`` parameter is replaced by a ``weight_centroids`` parameter (k values) and a
``weight_indices`` buffer, and a forward pre-hook rebuilds ``weight = weight_centroids[weight_indices]``
before every call (the pattern of ``torch.nn.utils.prune``).  Autograd's backward of that gather is
the grouped sum; any optimizer then trains the centroids.  :func:`centroid_gradient` is the
definition, for tests.

Bad input: bits must be an int in [1, 16]; the tensor needs at least k distinct, finite values
(NaN or Inf raise ValueError).
"""
from __future__ import annotations

import dataclasses
import heapq
import sys
from fractions import Fraction

import numpy as np

from companion.codebooks import Codebook, fit_lloyd_max

__all__ = [
    "INITS",
    "KMeansTensor",
    "kmeans_init",
    "kmeans_quantize",
    "compression_ratio",
    "huffman_code_lengths",
    "huffman_bits",
    "centroid_gradient",
    "share_weights",
    "shared_layers",
    "unshare_weights",
]

INITS = ("linear", "random", "density")
CENTROID_BITS = 32  # the table is stored as float32


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must lie in [1, 16] (k = 2^bits centroids), got {bits}")
    return int(bits)


def _weights(x) -> tuple[np.ndarray, tuple]:
    """Float64 copy of a float numpy array or torch tensor, checked finite."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"K-means needs floating-point weights, got {x.dtype}")
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"K-means needs floating-point weights, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError("K-means needs at least one weight")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"K-means needs finite weights: found {int(np.isnan(arr).sum())} NaN and "
                         f"{int(np.isinf(arr).sum())} infinite value(s)")
    return arr, arr.shape


def kmeans_init(x, k: int, init: str = "linear", seed: int = 0) -> np.ndarray:
    """The k starting centroids (float64, ascending, distinct) of ``init`` for the weights ``x``."""
    w, _ = _weights(x)
    w = w.ravel()
    distinct = np.unique(w)
    if k > distinct.size:
        raise ValueError(f"k = {k} centroids, but the weights have only {distinct.size} distinct value(s)")
    if init == "linear":
        return np.linspace(distinct[0], distinct[-1], k)
    if init == "random":
        # Forgy: walk through the weights in a random order and keep the first k distinct values.
        order = np.random.default_rng(seed).permutation(w.size)
        values, first = np.unique(w[order], return_index=True)
        return np.sort(values[np.argsort(first, kind="stable")[:k]])
    if init == "density":
        # fit_lloyd_max's own start: quantiles at (i + 1/2) / k, moved onto distinct weights.
        return np.asarray(fit_lloyd_max(w, k, iterations=0).values)
    raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")


@dataclasses.dataclass(frozen=True, eq=False)
class KMeansTensor:
    """A weight tensor as k shared values: ``codebook.values[indices]``.

    ``indices`` has the tensor's shape (uint8 for k <= 256, else uint16); ``codebook`` holds the k
    centroids as float32 values, ascending, with ``table_bits`` = k * 32.
    """

    indices: np.ndarray
    codebook: Codebook
    bits: int
    init: str

    @property
    def shape(self) -> tuple:
        return self.indices.shape

    @property
    def k(self) -> int:
        return len(self.codebook.values)

    @property
    def centroids(self) -> np.ndarray:
        return self.codebook.array

    @property
    def num_elements(self) -> int:
        return int(self.indices.size)

    def dequantize(self) -> np.ndarray:
        """The shared weights, float64 (exactly the float32 centroids)."""
        return self.codebook.decode(self.indices)

    def counts(self) -> np.ndarray:
        """How many weights share each centroid (zeros for unused ones)."""
        return np.bincount(self.indices.ravel(), minlength=self.k)

    def storage_bits(self, weight_bits: int = CENTROID_BITS) -> dict:
        """Exact bits of the two parts: n * log2(k) index bits and k centroids of ``weight_bits``."""
        return {"indices": self.num_elements * self.bits, "codebook": self.k * weight_bits}

    def compression_ratio(self, weight_bits: int = CENTROID_BITS) -> Fraction:
        """n * b / (n * log2 k + k * b), exactly."""
        return compression_ratio(self.num_elements, self.bits, weight_bits)

    def huffman_bits(self) -> int:
        """Bits of the index stream when Huffman-coded (the code table itself not counted)."""
        return huffman_bits(self.indices, self.k)

    def __repr__(self):
        return (f"KMeansTensor(shape {self.shape}, k = {self.k} ({self.bits} bits), init {self.init!r}, "
                f"ratio {float(self.compression_ratio()):.3f}x)")


def kmeans_quantize(x, bits: int, *, init: str = "linear", seed: int = 0, iterations: int = 100) -> KMeansTensor:
    """Cluster the weights of ``x`` into k = 2^bits shared float32 values (see the module docstring).

    ``x``: a float numpy array or torch tensor of any shape.  ``iterations`` bounds Lloyd's loop,
    which stops earlier when no centroid moves.
    """
    bits = _check_bits(bits)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    w, shape = _weights(x)
    k = 1 << bits
    start = kmeans_init(w, k, init, seed)
    fitted = fit_lloyd_max(w, k, init=start, iterations=iterations)
    # The stored table is float32; two centroids closer than float32 can tell apart are nudged apart.
    c = fitted.array.astype(np.float32)
    for i in range(1, k):
        if c[i] <= c[i - 1]:
            c[i] = np.nextafter(c[i - 1], np.float32(np.inf))
    codebook = Codebook(f"kmeans-{bits}bit", tuple(c.astype(np.float64)), table_bits=k * CENTROID_BITS)
    return KMeansTensor(codebook.encode(w).reshape(shape), codebook, bits, init)


def compression_ratio(n: int, bits: int, weight_bits: int = CENTROID_BITS) -> Fraction:
    """Deep Compression's r = n * b / (n * log2 k + k * b) with k = 2^bits, as an exact Fraction."""
    bits = _check_bits(bits)
    if n < 1 or weight_bits < 1:
        raise ValueError(f"need n >= 1 weights and weight_bits >= 1, got n={n}, weight_bits={weight_bits}")
    return Fraction(n * weight_bits, n * bits + (1 << bits) * weight_bits)


def huffman_code_lengths(counts) -> np.ndarray:
    """Huffman code length of each symbol, from how often it occurs (0 for a symbol that never does).

    Deterministic: equal weights are merged in order of first appearance.  A single used symbol
    gets a 1-bit code.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a flat list of non-negative integers")
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    heap = [(int(counts[i]), order, [int(i)]) for order, i in enumerate(used)]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1  # every symbol under the merged node moves one level deeper
        heapq.heappush(heap, (c1 + c2, order, s1 + s2))
        order += 1
    return lengths


def huffman_bits(indices, k: int) -> int:
    """Total bits of the Huffman-coded index stream: sum over symbols of count * code length."""
    counts = np.bincount(np.asarray(indices).ravel(), minlength=k)
    return int((counts * huffman_code_lengths(counts)).sum())


def centroid_gradient(weight_grad, indices, k: int) -> np.ndarray:
    """The definition: dL/dc_j = sum of dL/dw over the weights with index j (float64, length k)."""
    g = np.asarray(weight_grad, dtype=np.float64).ravel()
    return np.bincount(np.asarray(indices).ravel(), weights=g, minlength=k)


# --------------------------------------------------------------------------
# A torch model with shared weights (the pattern of torch.nn.utils.prune)
# --------------------------------------------------------------------------

class _SharedWeight:
    """Forward pre-hook: rebuild ``module.<name>`` from its centroids and indices before each call."""

    def __init__(self, name: str):
        self.name = name

    def weight(self, module):
        return getattr(module, self.name + "_centroids")[getattr(module, self.name + "_indices")]

    def __call__(self, module, inputs):
        setattr(module, self.name, self.weight(module))


def _default_layers(model):
    import torch.nn as nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def share_weights(model, bits, *, layers=None, init: str = "linear", seed: int = 0,
                  iterations: int = 100, name: str = "weight") -> dict:
    """Replace the ``name`` parameter of the chosen layers by K-means shared weights, in place.

    ``layers``: submodule names as in ``model.named_modules()`` (default: every Linear and Conv
    layer); ``bits``: one int for all, or a dict layer name -> bits.  Each layer's parameter becomes
    ``<name>_centroids`` (a trainable Parameter of k values, the weight's dtype and device) and
    ``<name>_indices`` (an int64 buffer, fixed); ``model.<layer>.<name>`` is rebuilt from them
    before every forward.  Returns {layer name: KMeansTensor}.
    """
    import torch

    layers = _default_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("no layers to share: the model has no Linear or Conv layer; name them in layers=")
    per_layer = bits if isinstance(bits, dict) else {layer: bits for layer in layers}
    missing = [layer for layer in layers if layer not in per_layer]
    if missing:
        raise ValueError(f"bits has no entry for layers {missing}")
    result = {}
    for layer in layers:
        module = model.get_submodule(layer)
        if hasattr(module, name + "_indices"):
            raise ValueError(f"{layer}.{name} already shares its weights")
        param = module._parameters.get(name)
        if not isinstance(param, torch.nn.Parameter):
            raise ValueError(f"{layer} has no parameter {name!r}")
        q = kmeans_quantize(param, per_layer[layer], init=init, seed=seed, iterations=iterations)
        del module._parameters[name]
        module.register_parameter(name + "_centroids", torch.nn.Parameter(
            torch.tensor(q.centroids, dtype=param.dtype, device=param.device)))
        module.register_buffer(name + "_indices", torch.as_tensor(q.indices.astype(np.int64), device=param.device))
        hook = _SharedWeight(name)
        hook(module, None)
        module._kmeans_hook = (name, module.register_forward_pre_hook(hook))
        result[layer] = q
    return result


def shared_layers(model) -> list:
    """Names of the submodules whose weights are shared (in ``named_modules`` order)."""
    return [n for n, m in model.named_modules() if hasattr(m, "_kmeans_hook")]


def unshare_weights(model) -> list:
    """Turn every shared weight back into an ordinary Parameter holding centroids[indices]."""
    import torch

    done = []
    for layer in shared_layers(model):
        module = model.get_submodule(layer)
        name, handle = module._kmeans_hook
        handle.remove()
        weight = _SharedWeight(name).weight(module).detach().clone()
        delattr(module, name)
        del module._parameters[name + "_centroids"]
        del module._buffers[name + "_indices"]
        del module._kmeans_hook
        module.register_parameter(name, torch.nn.Parameter(weight))
        done.append(layer)
    return done
