"""Codebook (non-uniform) element formats: NF4, blockwise NF4 with double quantization, fitted codebooks.

A codebook format stores, for each element, the index of one of a fixed list of values: code ``i``
means ``values[i]``, the values sorted ascending.  It plugs into :func:`companion.scaling.quantize`
wherever a number format does: a block's scale maps its largest magnitude onto the codebook's largest
magnitude (``Codebook.max``), and each scaled element is rounded to a value of the list.

Rounding: "nearest_even" (the name every format accepts) and its alias "nearest" round to the
nearest value; an input exactly halfway between two values goes to the lower one, as in
bitsandbytes' NF4 kernels, which compare ``x > midpoint``.  "stochastic" rounds to one of the two
neighbours, up with probability (x - lower) / (upper - lower), so it is unbiased between the ends.
Inputs beyond the ends, +-Inf included, saturate to the end values; a codebook has no NaN code, so
NaN raises ValueError.

NF4 (4-bit NormalFloat) is the codebook of QLoRA (Dettmers et al. 2023, arXiv 2305.14314): 16 values
in [-1, 1] placed at quantiles of a standard normal distribution, with an exact zero and one more
positive value than negative ones.  ``NF4_VALUES`` is the table that bitsandbytes ships
(``bitsandbytes.functional.get_4bit_type("nf4")``, the values printed in QLoRA's appendix); the
tests check it against the literal numbers, and :func:`normal_float_values` rebuilds it from normal
quantiles the way bitsandbytes' ``create_normal_map`` does.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np

from companion.scaling import QuantizedTensor, per_block, quantize, quantize_scales

__all__ = [
    "NF4_VALUES",
    "NF4_OFFSET",
    "Codebook",
    "NF4",
    "normal_float_values",
    "quantize_nf4",
    "fit_lloyd_max",
]

# bitsandbytes.functional.get_4bit_type("nf4"), code 0b0000 first (QLoRA, appendix E).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# The probability of the outermost quantile: 1 - (1/30 + 1/32) / 2 = 0.96770833..., which
# bitsandbytes' create_normal_map writes rounded to 7 digits (and from which the table was made).
NF4_OFFSET = 0.9677083

_NEAREST = ("nearest_even", "nearest")


def _generator(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        return np.random.default_rng(int(rng))
    if rng is None:
        raise ValueError("stochastic rounding needs rng: an int seed or a numpy.random.Generator")
    raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {type(rng).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
    """An element format given by its list of values (sorted ascending, distinct, finite).

    ``table_bits`` is what a tensor quantized with this codebook must store for the table itself:
    0 for a fixed, published codebook such as NF4, ``len(values) * 32`` for one fitted to the data.
    """

    name: str
    values: tuple
    table_bits: int = 0

    def __post_init__(self):
        v = np.asarray(self.values, dtype=np.float64)
        if v.ndim != 1 or v.size < 2:
            raise ValueError(f"{self.name}: a codebook needs at least two values in a flat list")
        if not np.isfinite(v).all():
            raise ValueError(f"{self.name}: codebook values must be finite")
        if not (np.diff(v) > 0).all():
            raise ValueError(f"{self.name}: codebook values must be sorted ascending and distinct")
        if v.size > 1 << 16:
            raise ValueError(f"{self.name}: at most 2^16 values")
        object.__setattr__(self, "values", tuple(float(a) for a in v))

    # -- the format interface used by companion.scaling -----------------------
    @property
    def array(self) -> np.ndarray:
        """The values as a float64 array (code i -> array[i])."""
        return np.asarray(self.values, dtype=np.float64)

    @property
    def bits(self) -> int:
        """Bits per code: ceil(log2(number of values))."""
        return max(1, math.ceil(math.log2(len(self.values))))

    @property
    def code_dtype(self):
        return np.dtype(np.uint8 if self.bits <= 8 else np.uint16)

    @property
    def max(self) -> float:
        """Largest magnitude: a block's absmax is scaled onto it."""
        return max(abs(self.values[0]), abs(self.values[-1]))

    @property
    def min(self) -> float:
        """Smallest (most negative) value."""
        return self.values[0]

    has_nan = False

    def encode(self, x, rounding="nearest_even", saturate=True, rng=None):
        """Values -> codes (indices into ``values``); see the module docstring for the rules.

        ``saturate`` is accepted for compatibility with number formats: a codebook always saturates.
        """
        x = np.asarray(x, dtype=np.float64)
        if np.isnan(x).any():
            raise ValueError(f"{self.name} has no NaN code, so NaN inputs cannot be encoded "
                             f"({int(np.isnan(x).sum())} NaN value(s) found)")
        v = self.array
        x = np.clip(x, v[0], v[-1])
        if rounding in _NEAREST:
            # The midpoints are exact in float64 for float32 values; side="left" sends ties down.
            codes = np.searchsorted((v[:-1] + v[1:]) / 2, x, side="left")
        elif rounding == "stochastic":
            lower = np.clip(np.searchsorted(v, x, side="right") - 1, 0, v.size - 2)
            frac = (x - v[lower]) / (v[lower + 1] - v[lower])
            u = _generator(rng).random(x.shape)
            codes = lower + (u < frac)
        else:
            raise ValueError(f"{self.name}: rounding must be 'nearest_even' (or 'nearest') or 'stochastic', "
                             f"got {rounding!r}")
        return codes.astype(self.code_dtype)

    def decode(self, codes):
        """Codes -> values (float64)."""
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise TypeError(f"{self.name}.decode: codes must have an integer dtype, got {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= len(self.values)):
            raise ValueError(f"{self.name}: codes must lie in [0, {len(self.values) - 1}]")
        return self.array[codes]

    def round(self, x, rounding="nearest_even", saturate=True, rng=None):
        """decode(encode(x))."""
        return self.decode(self.encode(x, rounding=rounding, saturate=saturate, rng=rng))

    def __repr__(self):
        return f"Codebook({self.name!r}, {len(self.values)} values in [{self.values[0]:g}, {self.values[-1]:g}])"


NF4 = Codebook("nf4", NF4_VALUES)


def _linspace_float32(start, end, steps):
    """torch.linspace in float32: the first half counted up from start, the second down from end."""
    start, end = np.float32(start), np.float32(end)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps)
    up = start + step * i.astype(np.float32)
    down = end - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, up, down)


def normal_float_values(offset: float = NF4_OFFSET) -> np.ndarray:
    """Rebuild the 16 NF4 values from quantiles of N(0, 1), as bitsandbytes' create_normal_map does.

    8 positive values at the normal quantiles of 8 probabilities evenly spaced from ``offset`` down
    towards 1/2 (9 points, the 1/2 itself, which would give 0, left out), 7 negative values likewise
    (8 points), and an exact 0; everything is then divided by the largest value.  bitsandbytes
    spaces the probabilities with ``torch.linspace`` in float32 and keeps the values in float32;
    doing the same here reproduces its table bit for bit.
    """
    inv_cdf = statistics.NormalDist().inv_cdf

    def quantiles(count):
        p = _linspace_float32(offset, 0.5, count + 1)[:-1]
        return [inv_cdf(float(q)) for q in p]

    v = np.sort(np.array(quantiles(8) + [0.0] + [-q for q in quantiles(7)], dtype=np.float32))
    return (v / v.max()).astype(np.float64)


def quantize_nf4(x, block_size: int = 64, *, double_quant: bool = True, dq_block_size: int = 256,
                 dq_format="fp8_e4m3", pad: bool = True) -> QuantizedTensor:
    """Blockwise NF4 as in QLoRA: absmax blocks of ``block_size`` along the last axis, NF4 codes.

    For a contiguous tensor whose last axis is a multiple of ``block_size`` these are bitsandbytes'
    blocks of consecutive elements.  Without double quantization every block stores an fp32 absmax:
    32 / 64 = 0.5 bits per element.  With it (``double_quant``), the absmax values are centred on
    their mean and quantized to 8 bits (``dq_format``) in blocks of ``dq_block_size`` with fp32
    second-level scales: 8/64 + 32/(64 * 256) = 0.127 bits per element, plus one fp32 offset.
    (bitsandbytes uses its own 8-bit "dynamic" code for that step; the storage is the same.)
    """
    qt = quantize(x, NF4, per_block(block_size, axis=-1), scale_format="fp32", pad=pad)
    if double_quant:
        qt = quantize_scales(qt, dq_format, dq_block_size, center=True, scale_format="fp32")
    return qt


def fit_lloyd_max(samples, size: int = 16, *, weights=None, iterations: int = 50, pin=(),
                  init=None, name="lloyd-max") -> Codebook:
    """A codebook of ``size`` values fitted to ``samples`` by Lloyd's algorithm in one dimension.

    Lloyd-Max quantization (1-D k-means): start from the samples' quantiles at (i + 1/2) / size,
    then alternately assign every sample to its nearest value and move each value to the mean of
    its samples, until nothing moves or ``iterations`` are done.  Values in ``pin`` (for example
    the ends -1 and 1 of absmax-normalised data) stay fixed and take part in the assignment; a
    value left without samples stays where it was.  ``weights`` (one per sample, non-negative)
    make the means weighted means, so the fit minimises the weighted squared error: for
    absmax-normalised blocks, weighting each sample by its block's scale squared minimises the
    squared error of the tensor itself.  Deterministic.  A fitted codebook is stored with the
    tensor, so its ``table_bits`` is size * 32 (fp32 values).

    ``init`` replaces the quantile start with given starting values for the free (unpinned) values:
    size - len(pin) finite, distinct numbers (any order), for example the evenly spaced or random
    starts of K-means weight sharing (:mod:`companion.kmeans`).
    """
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError("fit_lloyd_max needs a non-empty set of finite samples")
    w = np.ones_like(x) if weights is None else np.broadcast_to(
        np.asarray(weights, dtype=np.float64), np.shape(samples)).ravel()
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError("weights must be finite, non-negative and not all zero")
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    pin = np.unique(np.asarray(pin, dtype=np.float64))
    free = size - pin.size
    if free < 1:
        raise ValueError(f"size {size} leaves no free value besides the {pin.size} pinned ones")
    candidates = np.setdiff1d(np.unique(x), pin)
    if candidates.size < free:
        raise ValueError(f"the samples have only {candidates.size} distinct values besides the pinned ones; "
                         f"{free} are needed")
    cum_w = np.cumsum(w)
    if init is None:
        # Start at the weighted quantiles, moved to distinct sample values (not pinned ones).
        start = np.searchsorted(cum_w, (np.arange(free) + 0.5) / free * cum_w[-1])
        picks = np.searchsorted(candidates, x[np.minimum(start, x.size - 1)])
        steps = np.arange(free)  # make the picks strictly increasing, within range
        picks = np.minimum(np.maximum.accumulate(picks - steps), candidates.size - free) + steps
        centres = candidates[picks]
    else:
        centres = np.sort(np.asarray(init, dtype=np.float64).ravel())
        if centres.size != free or not np.isfinite(centres).all() or (np.diff(centres) <= 0).any() \
                or np.isin(centres, pin).any():
            raise ValueError(f"init must hold {free} finite, distinct values (none of them pinned), "
                             f"got {np.asarray(init).ravel()[:8]}")
    prefix_w = np.concatenate([[0.0], cum_w])
    prefix_wx = np.concatenate([[0.0], np.cumsum(w * x)])
    for _ in range(iterations):
        allv = np.concatenate([centres, pin])
        order = np.argsort(allv, kind="stable")
        allv, is_free = allv[order], order < free
        edges = np.searchsorted(x, (allv[:-1] + allv[1:]) / 2, side="right")
        lo, hi = np.concatenate([[0], edges]), np.concatenate([edges, [x.size]])
        mass = prefix_w[hi] - prefix_w[lo]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(mass > 0, (prefix_wx[hi] - prefix_wx[lo]) / np.where(mass > 0, mass, 1.0), allv)
        new = means[is_free]
        if np.array_equal(new, allv[is_free]) or np.unique(np.concatenate([new, pin])).size < size:
            break  # converged, or two values would merge: keep the last distinct set
        centres = new
    return Codebook(name, tuple(np.sort(np.concatenate([centres, pin]))), table_bits=size * 32)
