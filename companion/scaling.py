"""Linear quantization: scales, zero points, granularity, calibration and error metrics.

A quantizer turns real numbers into the codes of a narrow element format (any format of
:mod:`companion.formats`, or a :class:`companion.codebooks.Codebook`) by dividing by a scale ``s``::

    symmetric:   q = Q(r / s)                              r^ = s * q
    affine:      q = clamp(round(r / s) + z, qmin, qmax)   r^ = s * (q - z)

``Q`` rounds onto the element format's grid and saturates at its largest magnitude; ``z`` (the zero
point) is an integer, so that the real number 0 is exactly representable (``q = z``).  Affine
quantization needs an integer element format.

Granularity
-----------
Which elements share one scale is described by a *block shape*: the tensor is cut into blocks of
that shape and every block gets its own scale (and zero point).  All granularities are such blocks:

    per_tensor()               one block: the whole tensor
    per_channel(axis)          one scale per index along ``axis`` (a block is 1 along ``axis``, full
                               elsewhere); for a Linear weight (out, in), axis=0 is per output channel
    per_block(size, axis)      1-D blocks of ``size`` consecutive elements along ``axis`` (1 elsewhere),
                               e.g. groups of 32/64/128 along the reduction dimension
    per_tile(rows, cols)       2-D tiles over the last two axes, e.g. 128 x 128 for DeepSeek-V3's FP8
                               weights, 1 x 128 for its activations

The scales form an array of the tensor's rank whose shape is the number of blocks along each axis.
A block size that does not divide its axis is refused unless ``pad=True``; then the last block is
partial: its statistics use only the real elements and the codes are stored for the real elements
only (nothing is stored for the padding).

Calibration (how each block's scale is chosen)
----------------------------------------------
    "absmax"      symmetric: s = max|r| / fmt.max (nothing clips)
    "minmax"      affine: [lo, hi] = [min(min r, 0), max(max r, 0)], s = (hi - lo) / (qmax - qmin)
    "percentile"  the range of "absmax"/"minmax" taken at a percentile (clips the tail)
    "mse"         the clipping ratio alpha in {1, 1 - 1/n, ..., 1/n} (n = ``mse_grid``) that minimises
                  each block's squared error, given the scale format and the rounding of the codes
                  (the round-to-nearest error is used in the search; ties keep the larger alpha)

``scales=`` (and ``zero_points=``) give the scales directly instead: *static* scaling, with scales
calibrated once on other data; calibrating on the tensor itself is *dynamic* scaling.

Scales are stored in ``scale_format`` (default fp32): every scale is rounded to it (to nearest,
clamped to its positive range), and codes are computed with the stored scale, so ``dequantize``
reproduces exactly what was stored.  A rounded-down scale can make the block's largest element
saturate; that is the stored format's doing and is not corrected.

Special inputs
--------------
* An all-zero block (or one with no finite element) gets scale 1 (affine: with the zero point that
  makes 0 exact, q_min), so it round-trips to zeros, never NaN.
* NaN and +-Inf are ignored when scales are chosen.  +-Inf then saturates to +-fmt.max * s, like any
  value beyond the clipping range.  NaN becomes the element format's NaN code where it has one (and
  dequantizes to NaN); formats without NaN (integers, FP4, FP6, codebooks) raise ValueError.
* Input must be floating point (numpy or torch, any float dtype); anything else raises TypeError.
  An axis out of range, a non-positive block size, or an unknown calibration raises ValueError.

Storage accounting is exact: ``QuantizedTensor.storage_bits()`` counts the element codes, the scales
(or their second-level quantization, see :func:`quantize_scales`), the zero points and a fitted
codebook's table, and ``bits_per_element`` is that total over the number of elements, as a Fraction.
"""
from __future__ import annotations

import dataclasses
import sys
from fractions import Fraction

import numpy as np

from companion.formats import FloatFormat, IntFormat, NumberFormat, get_format

__all__ = [
    "CALIBRATIONS",
    "Granularity",
    "Layout",
    "QuantizedTensor",
    "per_tensor",
    "per_channel",
    "per_block",
    "per_tile",
    "calibrate",
    "quantize",
    "quantize_scales",
    "mse",
    "sqnr_db",
    "max_abs_error",
    "relative_error",
    "error_metrics",
]

CALIBRATIONS = ("absmax", "minmax", "percentile", "mse")

# Rounds r/s to an integer (for affine codes, before the zero point is added) with the rounding
# machinery of companion.formats; its range is far beyond any code.
_WIDE_INT = IntFormat("int32", 32)
_FP32 = get_format("fp32")


# --------------------------------------------------------------------------
# Granularity
# --------------------------------------------------------------------------

def _check_axis(axis, ndim, what):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what}: axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for a tensor with {ndim} dimension(s)")
    return int(axis) % ndim


def _check_size(size, what):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{what} must be a positive int, got {size!r}")
    return int(size)


@dataclasses.dataclass(frozen=True)
class Granularity:
    """Which elements share a scale; build one with per_tensor/per_channel/per_block/per_tile."""

    kind: str
    axis: int | None = None
    block_size: int | None = None
    tile: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in ("tensor", "channel", "block", "tile"):
            raise ValueError(f"unknown granularity {self.kind!r}; expected tensor, channel, block or tile")

    def block_shape(self, shape) -> tuple[int, ...]:
        """The shape of one block for a tensor of ``shape`` (before any padding)."""
        shape, ndim = tuple(shape), len(shape)
        if self.kind == "tensor":
            return shape
        if self.kind == "channel":
            axis = _check_axis(self.axis, ndim, "per_channel")
            return tuple(1 if d == axis else n for d, n in enumerate(shape))
        if self.kind == "block":
            axis = _check_axis(self.axis, ndim, "per_block")
            return tuple(self.block_size if d == axis else 1 for d in range(ndim))
        if ndim < 2:
            raise ValueError(f"per_tile needs a tensor of at least 2 dimensions, got {ndim}")
        return (1,) * (ndim - 2) + tuple(self.tile)

    def __str__(self):
        if self.kind == "tensor":
            return "per tensor"
        if self.kind == "channel":
            return f"per channel (axis {self.axis})"
        if self.kind == "block":
            return f"per block of {self.block_size} (axis {self.axis})"
        return f"per tile {self.tile[0]}x{self.tile[1]}"


def per_tensor() -> Granularity:
    """One scale for the whole tensor."""
    return Granularity("tensor")


def per_channel(axis: int = 0) -> Granularity:
    """One scale per index along ``axis`` (axis=0 of a (out, in) weight: per output channel)."""
    return Granularity("channel", axis=axis)


def per_block(block_size: int, axis: int = -1) -> Granularity:
    """One scale per ``block_size`` consecutive elements along ``axis``."""
    return Granularity("block", axis=axis, block_size=_check_size(block_size, "block_size"))


def per_tile(rows: int = 128, cols: int = 128) -> Granularity:
    """One scale per ``rows`` x ``cols`` tile of the last two axes (1 x 128: per token and 128 channels)."""
    return Granularity("tile", tile=(_check_size(rows, "rows"), _check_size(cols, "cols")))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor was cut into blocks: its shape, the block shape and the grid of blocks."""

    granularity: Granularity
    shape: tuple[int, ...]
    block_shape: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of blocks along each axis (the shape of the scales)."""
        return tuple(-(-n // b) if n else 0 for n, b in zip(self.shape, self.block_shape))

    @property
    def padded(self) -> bool:
        """True when some block is partial (the block size does not divide its axis)."""
        return any(n % b for n, b in zip(self.shape, self.block_shape))

    @property
    def num_blocks(self) -> int:
        return int(np.prod(self.grid, dtype=np.int64))

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def expand(self, per_block_values):
        """Repeat one value per block onto every element: an array of ``shape``."""
        out = np.asarray(per_block_values)
        for d, b in enumerate(self.block_shape):
            out = np.repeat(out, b, axis=d)
        return out[tuple(slice(0, n) for n in self.shape)]

    def __str__(self):
        grid = "x".join(map(str, self.grid)) or "1"
        block = "x".join(map(str, self.block_shape)) or "1"
        return f"{self.granularity}: {grid} blocks of {block}" + (" (last ones partial)" if self.padded else "")


def _layout(shape, granularity, pad):
    if isinstance(granularity, str):
        if granularity not in ("tensor", "channel"):
            raise ValueError("granularity strings are 'tensor' or 'channel'; use per_block(...) or per_tile(...)")
        granularity = per_tensor() if granularity == "tensor" else per_channel()
    if not isinstance(granularity, Granularity):
        raise TypeError(f"granularity must be a Granularity (per_tensor(), ...), got {type(granularity).__name__}")
    block_shape = granularity.block_shape(shape)
    layout = Layout(granularity, tuple(shape), tuple(max(b, 1) for b in block_shape))
    if layout.padded and not pad:
        bad = [(d, n, b) for d, (n, b) in enumerate(zip(shape, layout.block_shape)) if n % b]
        d, n, b = bad[0]
        raise ValueError(
            f"{granularity}: block size {b} does not divide axis {d} of length {n}; "
            "pass pad=True to let the last block be partial"
        )
    return layout


def _to_blocks(x, layout, fill):
    """(grid..., elements per block) view of x, padded with ``fill`` up to whole blocks."""
    grid, block = layout.grid, layout.block_shape
    widths = [(0, g * b - n) for g, b, n in zip(grid, block, layout.shape)]
    if any(w for _, w in widths):
        x = np.pad(x, widths, constant_values=fill)
    interleaved = [v for g, b in zip(grid, block) for v in (g, b)]
    ndim = len(grid)
    order = list(range(0, 2 * ndim, 2)) + list(range(1, 2 * ndim, 2))
    per_block_count = int(np.prod(block, dtype=np.int64))
    return x.reshape(interleaved).transpose(order).reshape(tuple(grid) + (per_block_count,))


def _from_blocks(xb, layout):
    """Inverse of _to_blocks, cropped to the tensor's shape."""
    grid, block = layout.grid, layout.block_shape
    ndim = len(grid)
    x = xb.reshape(tuple(grid) + tuple(block))
    order = [v for d in range(ndim) for v in (d, ndim + d)]
    x = x.transpose(order).reshape([g * b for g, b in zip(grid, block)])
    return x[tuple(slice(0, n) for n in layout.shape)]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def _as_float64(x, who):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{who}: expected a floating-point tensor, got {x.dtype}")
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(x)
    floating = arr.dtype.kind == "f"
    if not floating and arr.dtype.kind == "V":  # ml_dtypes floats (bfloat16, float8_*)
        ml = sys.modules.get("ml_dtypes")
        try:
            floating = ml is not None and ml.finfo(arr.dtype) is not None
        except (ValueError, TypeError, KeyError):
            floating = False
    if not floating:
        raise TypeError(f"{who}: expected floating-point values, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _element_format(fmt):
    from companion.codebooks import Codebook  # codebooks builds on this module

    if isinstance(fmt, Codebook):
        return fmt
    return get_format(fmt)


def _check_element_format(fmt, affine):
    if affine and not isinstance(fmt, IntFormat):
        raise ValueError(
            f"a zero point needs an integer element format, got {fmt.name}; "
            "float formats and codebooks are quantized symmetrically"
        )
    if not affine and fmt.min >= 0:
        raise ValueError(
            f"symmetric quantization needs a signed element format, got {fmt.name}; "
            "use zero_point=True for an unsigned integer format"
        )


def _scale_format(scale_format):
    fmt = get_format(scale_format)
    if fmt.min_positive <= 0 or not isinstance(fmt, (FloatFormat, IntFormat)):
        raise ValueError(f"{fmt.name} cannot hold a positive scale")
    return fmt


# --------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------

def _store_scale(s, scale_fmt):
    """Round raw scales to the scale format; empty blocks (s == 0 or not finite) get 1."""
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    s = np.clip(s, scale_fmt.min_positive, scale_fmt.max)
    return scale_fmt.round(s, saturate=True)


def _affine_params(lo, hi, fmt, scale_fmt):
    """Scale and integer zero point for the range [lo, hi] (which is widened to contain 0)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = _store_scale((hi - lo) / (fmt.max - fmt.min), scale_fmt)
    z = np.clip(fmt.min - np.rint(lo / s), fmt.min, fmt.max)
    return s, z


def _masked(xb, valid):
    return np.where(valid, xb, 0.0)


def _range(xb, valid, affine):
    """Per-block (lo, hi) for affine, or (None, absmax) for symmetric, over the valid elements."""
    if affine:
        lo = np.where(valid, xb, np.inf).min(axis=-1, initial=np.inf)
        hi = np.where(valid, xb, -np.inf).max(axis=-1, initial=-np.inf)
        empty = ~valid.any(axis=-1)
        return np.where(empty, 0.0, lo), np.where(empty, 0.0, hi)
    return None, np.abs(_masked(xb, valid)).max(axis=-1, initial=0.0)


def _percentile_range(xb, valid, affine, percentile):
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile!r}")
    data = xb if affine else np.abs(xb)
    if valid.all():
        pct = lambda q: np.percentile(data, q, axis=-1)  # noqa: E731
    else:
        data = np.where(valid, data, np.nan)
        empty = ~valid.any(axis=-1, keepdims=True)
        data = np.where(empty, 0.0, data)  # an empty block would make nanpercentile warn
        pct = lambda q: np.nanpercentile(data, q, axis=-1)  # noqa: E731
    if affine:
        return pct(100.0 - percentile), pct(percentile)
    return None, pct(percentile)


def _params_from_range(lo, hi, fmt, scale_fmt, affine):
    if affine:
        return _affine_params(lo, hi, fmt, scale_fmt)
    return _store_scale(hi / fmt.max, scale_fmt), None


def _round_codes(yb, fmt, z, rounding, rng):
    """Element values (on the format's grid, float64) for y = r / s, with zero point z if affine."""
    if z is None:
        return fmt.round(yb, rounding=rounding, saturate=True, rng=rng)
    q = _WIDE_INT.round(yb, rounding=rounding, rng=rng) + z[..., None]
    return np.clip(q, fmt.min, fmt.max)


def _dequant_blocks(qv, s, z):
    return (qv if z is None else qv - z[..., None]) * s[..., None]


def _mse_search(xb, valid, fmt, scale_fmt, affine, grid):
    grid = _check_size(grid, "mse_grid")
    lo, hi = _range(xb, valid, affine)
    xv = _masked(xb, valid)
    best_err = best_s = best_z = None
    for k in range(grid):  # alpha = 1 first: ties keep the larger alpha (less clipping)
        alpha = 1.0 - k / grid
        s, z = _params_from_range(None if lo is None else alpha * lo, alpha * hi, fmt, scale_fmt, affine)
        qv = _round_codes(xv / s[..., None], fmt, z, "nearest_even", None)
        err = np.where(valid, (_dequant_blocks(qv, s, z) - xv) ** 2, 0.0).sum(axis=-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        if affine:
            best_z = np.where(better, z, best_z)
    return best_s, best_z


def _given_params(scales, zero_points, layout, fmt, scale_fmt, affine):
    grid = layout.grid
    try:
        s = np.broadcast_to(np.asarray(scales, dtype=np.float64), grid)
    except ValueError:
        raise ValueError(f"scales of shape {np.shape(scales)} do not broadcast to the {grid} blocks of {layout}") from None
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("given scales must be finite and positive")
    s = scale_fmt.round(np.clip(s, scale_fmt.min_positive, scale_fmt.max), saturate=True)
    if not affine:
        if zero_points is not None:
            raise ValueError("zero_points were given but zero_point=False")
        return s, None
    if zero_points is None:
        raise ValueError("static affine quantization needs zero_points as well as scales")
    z = np.broadcast_to(np.asarray(zero_points, dtype=np.float64), grid)
    if not (np.rint(z) == z).all() or z.min(initial=fmt.min) < fmt.min or z.max(initial=fmt.max) > fmt.max:
        raise ValueError(f"zero points must be integers in [{fmt.min:g}, {fmt.max:g}] for {fmt.name}")
    return s, z.copy()


def calibrate(x, fmt, granularity=None, *, method="absmax", zero_point=False, percentile=99.9,
              mse_grid=100, scale_format="fp32", pad=False):
    """Choose the scales (and zero points) of ``x`` for ``fmt`` without quantizing it.

    Returns ``(scales, zero_points)``: arrays of the block grid's shape (zero_points is None when
    symmetric), ready to pass to :func:`quantize` as static scales for other data.
    """
    qt = quantize(x, fmt, granularity, method=method, zero_point=zero_point, percentile=percentile,
                  mse_grid=mse_grid, scale_format=scale_format, pad=pad)
    return qt.scales, qt.zero_points


# --------------------------------------------------------------------------
# The quantized tensor
# --------------------------------------------------------------------------

OFFSET_BITS = 32  # the fp32 offset that double quantization subtracts from the scales


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Codes, scales, zero points, layout and formats of a quantized tensor.

    ``scales`` holds the values that ``dequantize`` multiplies by (as stored: already rounded to
    ``scale_format``, or reconstructed from ``scale_storage`` after double quantization).
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    format: object
    layout: Layout
    scale_format: NumberFormat | None
    scale_storage: "QuantizedTensor | None" = None
    scale_offset: float = 0.0

    @property
    def shape(self):
        return self.layout.shape

    def values(self):
        """The element values (decoded codes), before the scales are applied."""
        return self.format.decode(self.codes)

    def dequantize(self):
        """s * q (symmetric) or s * (q - z) (affine), as a float64 array of the original shape."""
        q = self.values()
        if self.zero_points is not None:
            q = q - self.layout.expand(self.zero_points)
        return q * self.layout.expand(self.scales)

    def storage_bits(self) -> dict:
        """Bits needed to store each part (exact integers)."""
        n, blocks = self.layout.num_elements, self.layout.num_blocks
        parts = {"codes": n * self.format.bits}
        if self.scale_storage is None:
            parts["scales"] = blocks * self.scale_format.bits
        else:
            nested = self.scale_storage.storage_bits()
            parts["scales"] = nested["codes"]
            parts["scales of the scales"] = sum(v for k, v in nested.items() if k != "codes")
            parts["scale offset"] = OFFSET_BITS
        if self.zero_points is not None:
            parts["zero points"] = blocks * self.format.bits
        table = getattr(self.format, "table_bits", 0)
        if table:
            parts["codebook"] = table
        return parts

    @property
    def total_bits(self) -> int:
        return sum(self.storage_bits().values())

    @property
    def bits_per_element(self) -> Fraction:
        """Total stored bits over the number of elements, exactly."""
        return Fraction(self.total_bits, max(self.layout.num_elements, 1))

    def __repr__(self):
        scale = self.scale_format.name if self.scale_storage is None else "double-quantized"
        zp = ", zero points" if self.zero_points is not None else ""
        return (f"QuantizedTensor({self.format.name}, shape {self.shape}, {self.layout}, "
                f"{scale} scales{zp}, {float(self.bits_per_element):.4f} bits/element)")


def quantize(x, fmt, granularity=None, *, method="absmax", zero_point=False, scales=None,
             zero_points=None, rounding="nearest_even", rng=None, percentile=99.9, mse_grid=100,
             scale_format="fp32", pad=False) -> QuantizedTensor:
    """Quantize ``x`` to ``fmt`` with one scale per block of ``granularity`` (default per tensor).

    ``x`` is a floating-point numpy array or torch tensor; the result holds numpy arrays.  ``fmt``
    is a format name, a NumberFormat or a Codebook; ``granularity`` a Granularity (or "tensor",
    "channel" for axis 0).  ``method`` picks the calibration (see the module docstring);
    ``scales``/``zero_points`` given explicitly override it (static scaling).  ``rounding`` is
    "nearest_even" or "stochastic" (with ``rng``, an int seed or numpy Generator), or any other
    mode of companion.formats.
    """
    who = "quantize"
    fmt = _element_format(fmt)
    scale_fmt = _scale_format(scale_format)
    affine = bool(zero_point)
    _check_element_format(fmt, affine)
    if method not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {method!r}; expected one of {', '.join(CALIBRATIONS)}")
    if scales is None and (method == "absmax" and affine or method == "minmax" and not affine):
        raise ValueError(
            f"calibration {method!r} is for {'symmetric' if method == 'absmax' else 'affine'} quantization; "
            f"use method={'minmax' if affine else 'absmax'!r} or zero_point={not affine}"
        )
    r = _as_float64(x, who)
    layout = _layout(r.shape, granularity if granularity is not None else per_tensor(), pad)

    nan = np.isnan(r)
    if nan.any() and not getattr(fmt, "has_nan", False):
        raise ValueError(f"{who}: {int(nan.sum())} NaN input(s), and {fmt.name} has no NaN code")
    # View the tensor as (grid of blocks..., elements of one block).  Padding and non-finite
    # values are masked out of the statistics that choose the scales.
    xb = _to_blocks(r, layout, 0.0)
    real = _to_blocks(np.ones(r.shape, dtype=bool), layout, False)
    valid = real & np.isfinite(xb)

    # One scale (and zero point) per block: given (static scaling) or calibrated on x (dynamic).
    if scales is not None:
        s, z = _given_params(scales, zero_points, layout, fmt, scale_fmt, affine)
    elif zero_points is not None:
        raise ValueError("zero_points are given together with scales (static scaling)")
    elif method in ("absmax", "minmax"):
        lo, hi = _range(xb, valid, affine)
        s, z = _params_from_range(lo, hi, fmt, scale_fmt, affine)
    elif method == "percentile":
        lo, hi = _percentile_range(xb, valid, affine, percentile)
        s, z = _params_from_range(lo, hi, fmt, scale_fmt, affine)
    else:
        s, z = _mse_search(xb, valid, fmt, scale_fmt, affine, mse_grid)

    # The codes come from the scales as stored, so dequantize() gives back exactly what was stored.
    with np.errstate(invalid="ignore"):  # NaN / s stays NaN; it is encoded as the format's NaN
        yb = xb / s[..., None]
    if z is None:
        codes_b = fmt.encode(yb, rounding=rounding, saturate=True, rng=rng)
    else:
        codes_b = fmt.encode(_round_codes(yb, fmt, z, rounding, rng))
    codes = np.ascontiguousarray(_from_blocks(codes_b, layout))
    return QuantizedTensor(codes, s, z, fmt, layout, scale_fmt)


def quantize_scales(qt: QuantizedTensor, fmt="fp8_e4m3", block_size=256, *, center=True,
                    scale_format="fp32") -> QuantizedTensor:
    """Double quantization (QLoRA): quantize the scales of ``qt`` themselves, blockwise.

    The scales, flattened, are centred on their mean (one fp32 offset, when ``center``), quantized
    to ``fmt`` (absmax) in blocks of ``block_size`` with ``scale_format`` second-level scales, and
    replaced by the fp32 values that decode from that.  The element codes are kept as they were
    (computed with the original scales), as in bitsandbytes; the storage accounting then counts
    ``fmt.bits`` per scale, the second-level scales and the offset.
    """
    if qt.scale_storage is not None:
        raise ValueError("the scales of this tensor are already quantized")
    flat = qt.scales.reshape(-1)
    offset = float(_FP32.round(flat.mean())) if center and flat.size else 0.0
    nested = quantize(flat - offset, fmt, per_block(block_size), scale_format=scale_format, pad=True)
    scales = _FP32.round(nested.dequantize() + offset).reshape(qt.scales.shape)
    return dataclasses.replace(qt, scales=scales, scale_format=None, scale_storage=nested,
                               scale_offset=offset)


# --------------------------------------------------------------------------
# Error metrics (float64; NaN in either input gives NaN)
# --------------------------------------------------------------------------

def _pair(x, y):
    x, y = _as_float64(x, "metric"), _as_float64(y, "metric")
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} and {y.shape}")
    return x, y


def mse(x, x_hat) -> float:
    """Mean squared error."""
    x, y = _pair(x, x_hat)
    return float(np.mean((x - y) ** 2))


def sqnr_db(x, x_hat) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - x_hat)^2), in dB (inf if exact)."""
    x, y = _pair(x, x_hat)
    signal, noise = float(np.sum(x * x)), float(np.sum((x - y) ** 2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def max_abs_error(x, x_hat) -> float:
    """Largest absolute error."""
    x, y = _pair(x, x_hat)
    return float(np.max(np.abs(x - y), initial=0.0))


def relative_error(x, x_hat) -> float:
    """Norm-wise relative error ||x - x_hat|| / ||x|| (inf for a zero x with a non-zero error)."""
    x, y = _pair(x, x_hat)
    # Plain sums rather than np.linalg.norm (BLAS): the same result on every machine.
    num, den = float(np.sqrt(np.sum((x - y) ** 2))), float(np.sqrt(np.sum(x * x)))
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def error_metrics(x, x_hat) -> dict:
    """MSE, SQNR (dB), max abs error and relative error in one dict."""
    return {"mse": mse(x, x_hat), "sqnr_db": sqnr_db(x, x_hat),
            "max_abs": max_abs_error(x, x_hat), "relative": relative_error(x, x_hat)}
