"""Simulated quantization in torch: quantize, then dequantize at once, on any device.

Training with a narrow format needs, many times per step, the values a tensor would have after a
round trip through that format: ``dequantize(quantize(x))``. This module computes them with torch
operations only, so the same code runs on CPU and CUDA tensors without leaving the device. The
NumPy quantizers of :mod:`companion.scaling` and :mod:`companion.mx` are the definitions, and the
results here are equal to theirs bit for bit (``tests/test_training_quantizers.py``).

A :class:`QuantSpec` names one operand's quantization:

    format        element format: "fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1",
                  "int8", "int4", "bf16", "fp16", ... (any signed format of companion.formats of at
                  most 16 bits); None is the identity
    granularity   which elements share a scale: "tensor", "channel" (one scale per vector along
                  ``axis``), "block" (``block_size`` consecutive elements along ``axis``) or "tile"
                  (``tile = (rows, cols)``: ``cols`` elements along ``axis`` times ``rows`` along the
                  other axis of a 2-D tensor)
    scale         "fp32"  s = amax / max rounded to FP32, as companion.scaling.quantize computes it
                  "e8m0"  MX: s = 2^(floor(log2 amax) - emax), the OCP rule of companion.mx.quantize_mx
                          (blocks only; elements of companion.mx.ELEMENT_TYPES)
                  "e4m3"  NVFP4: an E4M3 scale per block (or tile) times one FP32 scale per tensor, as
                          companion.mx.quantize_nvfp4 computes them (FP4 E2M1 elements)
                  "none"  no scale: round each value to the format (e.g. bf16), overflow as the format
                          does (Inf for bf16 and fp16)
    rounding      "nearest_even", or "stochastic": round up with probability equal to the distance to
                  the lower neighbour over the gap, so that E[Q(x)] = x wherever nothing saturates
                  (one float64 uniform draw per element from a torch.Generator: floor(y / step + u));
                  the scales are those of nearest rounding

Blocks run along ``axis``, which for an operand of a matrix product is its contraction axis: then
every scale multiplies whole products of the dot product and can be applied after the narrow sum.

Arithmetic
----------
The input is converted to float64 (exactly; MX and NVFP4 first round float64 inputs to float32 as
their definitions do), the scales are computed by the rules above, and ``x / s`` is rounded to the
element grid. These are the operations of the NumPy definitions, in the same precision, which is why
the bits agree. The float64 quotient is also the exact quotient for float32 and bf16 inputs: ``x``
and ``s`` carry 24 bits each, so ``x - t * s`` for a grid midpoint ``t`` is either 0 or far larger
than float64's rounding error, and rounding the float64 quotient to the grid gives what rounding the
exact quotient would. (Hardware and the Triton kernels divide in float32 instead, which, rarely,
moves a quotient onto a rounding tie; ``companion.kernels.fp8_blockwise_reference`` states that
variant.) The dequantized values ``q * s`` are exact in float64 and are rounded once to the output
dtype (``x.dtype`` unless ``out_dtype`` is given; to bf16 and fp16 through float32 rounded to odd,
so that it is one rounding); they are exact in float32 for "e8m0" and "none".

Special values (as the references):
    * "fp32": NaN and +-Inf are left out of the amax; +-Inf then saturates to +-max * s. NaN stays
      NaN where the element format has a NaN; for formats without one (integers, FP4, FP6) a NaN
      raises ValueError, as companion.scaling does (this check reads one flag back from the device).
    * "e8m0" and "e4m3": a block holding a NaN or an Inf dequantizes to NaN (its scale is NaN).
    * All-zero blocks give zeros. Negative values that round to zero keep their sign in float formats
      (-0.0), and become +0.0 in integer formats, as decoding the codes does.
    * Padding: an axis whose length is not a multiple of the block is padded with zeros, which cannot
      change an amax; the padding is cut off again.
    * Empty tensors come back empty. Non-float tensors raise TypeError.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from companion import mx
from companion.formats import FloatFormat, IntFormat, get_format
from companion.training.loss_scaling import round_to_format

__all__ = [
    "GRANULARITIES",
    "SCALE_FORMATS",
    "ROUNDINGS",
    "QuantSpec",
    "IDENTITY",
    "BF16",
    "quantize_dequantize",
]

GRANULARITIES = ("tensor", "channel", "block", "tile")
SCALE_FORMATS = ("fp32", "e8m0", "e4m3", "none")
ROUNDINGS = ("nearest_even", "stochastic")
_FP32 = get_format("fp32")
_E4M3 = get_format("fp8_e4m3")
_E2M1 = get_format("fp4_e2m1")


# --------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------

def _element_format(name):
    fmt = get_format(name)  # UnknownFormatError (a ValueError) lists the known names
    signed = isinstance(fmt, IntFormat) and fmt.signed or isinstance(fmt, FloatFormat) and fmt.signed
    if not signed or fmt.bits > 16 or isinstance(fmt, FloatFormat) and not fmt.subnormals:
        raise ValueError(f"{name!r} cannot be a simulated element format: it must be a signed float "
                         "(with zero and subnormals) or a signed integer of at most 16 bits")
    return fmt


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one operand is quantized: element format, granularity, scale format, rounding.

    Build one with the class methods (``QuantSpec.per_tensor("fp8_e4m3")``, ``QuantSpec.mx("fp4_e2m1")``,
    ``QuantSpec.nvfp4()``, ...); ``QuantSpec()`` is the identity. The module docstring defines the fields.
    """

    format: str | None = None
    granularity: str = "tensor"
    block_size: int | None = None
    tile: tuple[int, int] | None = None
    scale: str = "fp32"
    rounding: str = "nearest_even"

    def __post_init__(self):
        if self.format is None:
            if (self.granularity, self.block_size, self.tile, self.scale, self.rounding) != (
                    "tensor", None, None, "fp32", "nearest_even"):
                raise ValueError("the identity spec (format=None) takes no other fields")
            return
        fmt = _element_format(self.format)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; expected one of {', '.join(ROUNDINGS)}")
        if self.scale not in SCALE_FORMATS:
            raise ValueError(f"unknown scale format {self.scale!r}; expected one of {', '.join(SCALE_FORMATS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; expected one of {', '.join(GRANULARITIES)}")
        if (self.granularity == "block") != (self.block_size is not None):
            raise ValueError("block_size goes with granularity='block', and only with it")
        if (self.granularity == "tile") != (self.tile is not None):
            raise ValueError("tile goes with granularity='tile', and only with it")
        if self.block_size is not None:
            object.__setattr__(self, "block_size", _positive_int(self.block_size, "block_size"))
        if self.tile is not None:
            if not isinstance(self.tile, (tuple, list)) or len(self.tile) != 2:
                raise ValueError(f"tile must be a pair (rows, cols), got {self.tile!r}")
            object.__setattr__(self, "tile", tuple(_positive_int(n, "tile size") for n in self.tile))
        if self.scale == "none" and (not isinstance(fmt, FloatFormat) or self.granularity != "tensor"):
            raise ValueError("scale='none' rounds values to a float format as they are: "
                             "it needs a float format and granularity='tensor'")
        if self.scale == "e8m0":
            mx.element_type(self.format)  # raises for formats MX does not define
            if self.granularity != "block":
                raise ValueError("E8M0 (MX) scales are per block: use granularity='block'")
        if self.scale == "e4m3":
            if self.format != "fp4_e2m1" or self.granularity not in ("block", "tile"):
                raise ValueError("E4M3 block scales (NVFP4) go with fp4_e2m1 elements in blocks or tiles")

    # -- constructors ---------------------------------------------------------
    @classmethod
    def identity(cls) -> "QuantSpec":
        return cls()

    @classmethod
    def rounded(cls, fmt="bf16", rounding="nearest_even") -> "QuantSpec":
        """Round every value to the float format ``fmt``, no scale (bf16 training)."""
        return cls(fmt, scale="none", rounding=rounding)

    @classmethod
    def per_tensor(cls, fmt, rounding="nearest_even") -> "QuantSpec":
        return cls(fmt, "tensor", rounding=rounding)

    @classmethod
    def per_channel(cls, fmt, rounding="nearest_even") -> "QuantSpec":
        """One FP32 scale per vector along the axis (per row of X, per output channel of W)."""
        return cls(fmt, "channel", rounding=rounding)

    @classmethod
    def per_block(cls, fmt, block_size, scale="fp32", rounding="nearest_even") -> "QuantSpec":
        return cls(fmt, "block", block_size=block_size, scale=scale, rounding=rounding)

    @classmethod
    def per_tile(cls, fmt, rows=128, cols=128, scale="fp32", rounding="nearest_even") -> "QuantSpec":
        return cls(fmt, "tile", tile=(rows, cols), scale=scale, rounding=rounding)

    @classmethod
    def mx(cls, elem="fp8_e4m3", block_size=mx.MX_BLOCK_SIZE, rounding="nearest_even") -> "QuantSpec":
        """OCP MX: ``elem`` elements, one E8M0 scale per ``block_size`` (floor rule)."""
        return cls.per_block(elem, block_size, scale="e8m0", rounding=rounding)

    @classmethod
    def nvfp4(cls, rounding="nearest_even", tile=False) -> "QuantSpec":
        """NVFP4: E2M1 elements, an E4M3 scale per 16 elements (or 16 x 16 tile), an FP32 tensor scale."""
        n = mx.NVFP4_BLOCK_SIZE
        if tile:
            return cls.per_tile("fp4_e2m1", n, n, scale="e4m3", rounding=rounding)
        return cls.per_block("fp4_e2m1", n, scale="e4m3", rounding=rounding)

    def with_rounding(self, rounding) -> "QuantSpec":
        return dataclasses.replace(self, rounding=rounding)

    # -- reading --------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return self.format is None

    @property
    def element_format(self):
        return None if self.format is None else get_format(self.format)

    def __str__(self):
        if self.format is None:
            return "identity"
        if self.scale == "none":
            return f"{self.format} ({self.rounding})"
        where = {"tensor": "per tensor", "channel": "per channel",
                 "block": f"blocks of {self.block_size}",
                 "tile": f"{self.tile[0]}x{self.tile[1]} tiles" if self.tile else ""}[self.granularity]
        scale = {"e4m3": "e4m3 x fp32 (NVFP4)", "e8m0": "e8m0 (MX)"}.get(self.scale, self.scale)
        return f"{self.format}, {where}, {scale} scales, {self.rounding}"


def _positive_int(n, what):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
    return int(n)


IDENTITY = QuantSpec()
BF16 = QuantSpec.rounded("bf16")


# --------------------------------------------------------------------------
# Blocks: a view of the tensor as (number of blocks, elements per block)
# --------------------------------------------------------------------------

def _check_axis(axis, ndim, spec):
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimension(s)")
    if spec.granularity == "tile" and ndim != 2:
        raise ValueError(f"tiles need a 2-D tensor, got {ndim} dimension(s)")
    return axis % ndim


def _to_blocks(x, spec, axis):
    """(blocks, elements per block) view of x (zero-padded), and the function that undoes it."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1), lambda xb: xb.reshape(x.shape)
    xt = x.movedim(axis, -1)  # the blocked axis last: (..., K)
    if spec.granularity == "tile":
        rows, cols = spec.tile
        R, K = xt.shape
        xt = F.pad(xt, (0, -K % cols, 0, -R % rows))
        gr, gc = xt.shape[0] // rows, xt.shape[1] // cols
        xb = xt.reshape(gr, rows, gc, cols).transpose(1, 2).reshape(gr * gc, rows * cols)

        def undo(yb):
            tiles = yb.reshape(gr, gc, rows, cols).transpose(1, 2).reshape(gr * rows, gc * cols)
            return tiles[:R, :K].movedim(-1, axis)
        return xb, undo
    K = xt.shape[-1]
    n = K if spec.granularity == "channel" else spec.block_size
    padded = F.pad(xt, (0, -K % n))
    xb = padded.reshape(-1, n)
    return xb, lambda yb: yb.reshape(padded.shape)[..., :K].movedim(-1, axis)


# --------------------------------------------------------------------------
# Rounding onto an element grid
# --------------------------------------------------------------------------

def _pow2(e):
    """2^e as float64, exactly, for an integer tensor e in [-1022, 1023] (built from the bits)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _round_integral(r, uniform):
    """Round r (float64) to an integer: ties to even, or stochastically with uniform draws in [0, 1)."""
    return torch.round(r) if uniform is None else torch.floor(r + uniform)


def _round_to_grid(y, fmt, uniform, saturate=True, element_type=None):
    """float64 y -> values of ``fmt``, rounded once, as float64.

    For a float format, |y| is divided by the spacing of its own binade (never below the subnormal
    spacing), which is exact, rounded to an integer and multiplied back; a carry to 2^(m+1) is simply
    the next binade's first value. Saturating: beyond +-max gives +-max (Inf too). An MX
    ``element_type`` (MXINT8) scales the integers by its unit and keeps them symmetric, in [-127, 127].
    """
    if isinstance(fmt, IntFormat):
        unit = 1.0 if element_type is None else element_type.unit
        lo = fmt.min if element_type is None else -fmt.max
        r = _round_integral(y / unit, uniform)  # exact: unit is a power of two
        return torch.clamp(r, lo, fmt.max) * unit + 0.0  # + 0.0 turns -0.0 into 0.0: integers have no -0
    m = fmt.man_bits
    a = y.abs()
    e = torch.clamp(torch.frexp(a).exponent - 1, min=fmt.emin)  # binade of |y|, subnormals in emin's
    v = _round_integral(a * _pow2(m - e), uniform) * _pow2(e - m)
    if saturate:
        v = torch.clamp(v, max=fmt.max)
    else:  # overflow as the format does: Inf, else NaN, else max
        overflow = fmt.max if not (fmt.has_inf or fmt.has_nan) else float("inf") if fmt.has_inf else float("nan")
        v = torch.where(v > fmt.max, overflow, v)
    v = torch.copysign(v, y)
    return v if fmt.has_negative_zero else v + 0.0


def _uniform_like(y, spec, generator):
    if spec.rounding != "stochastic":
        return None
    return torch.rand(y.shape, dtype=torch.float64, device=y.device, generator=generator)


# --------------------------------------------------------------------------
# The three scale rules, each on (blocks, elements) float64 views
# --------------------------------------------------------------------------

def _fp32_scaled(xb, fmt, uniform):
    """companion.scaling.quantize with absmax calibration and FP32 scales."""
    finite = torch.isfinite(xb)
    amax = torch.where(finite, xb.abs(), 0.0).amax(dim=-1, keepdim=True)
    s = amax / fmt.max
    s = torch.where(s > 0, s, 1.0)  # an all-zero (or all non-finite) block gets scale 1
    s = s.clamp(_FP32.min_positive, _FP32.max).to(torch.float32).to(torch.float64)  # stored in FP32
    return _round_to_grid(xb / s, fmt, uniform) * s


def _mx_scaled(xb, elem, uniform):
    """companion.mx.quantize_mx with the "floor" scale rule (the same as companion.mx.shared_exponent)."""
    et = mx.element_type(elem)
    amax = xb.abs().amax(dim=-1, keepdim=True)  # NaN if the block holds one
    special = ~torch.isfinite(amax)
    live = (amax > 0) & ~special
    e = torch.frexp(torch.where(live, amax, 1.0)).exponent - 1 - et.emax  # floor(log2 amax) - emax
    e = torch.where(live, e, -mx.E8M0_BIAS).clamp(-mx.E8M0_BIAS, mx.E8M0_BIAS)
    x_over_scale = torch.where(special, 0.0, xb) * _pow2(-e)  # exact: a power of two
    out = _round_to_grid(x_over_scale, et.format, uniform, element_type=et) * _pow2(e)
    return torch.where(special, float("nan"), out)


def _nvfp4_scaled(xb, tensor_amax, uniform):
    """companion.mx.quantize_nvfp4: E2M1 elements, E4M3 block scales, one FP32 tensor scale."""
    s_tensor = (tensor_amax / mx.NVFP4_TENSOR_SCALE_DIVISOR).to(torch.float32).to(torch.float64)
    s_tensor = torch.where(s_tensor > 0, s_tensor, 1.0)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    special = ~torch.isfinite(amax)
    # 6 * s_tensor is exact, so the quotient is rounded once in float64 and once to E4M3.
    s_block = _round_to_grid(torch.where(special, 0.0, amax) / (6.0 * s_tensor), _E4M3, None)
    scale = s_block * s_tensor  # exact
    live = scale > 0  # a block far below the tensor's amax gets scale 0: zeros
    v = _round_to_grid(xb / torch.where(live, scale, 1.0), _E2M1, uniform) * scale
    v = torch.where(live, v, 0.0)
    return torch.where(special, float("nan"), v)


# --------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------

def _to_dtype(v, dtype):
    """float64 values -> dtype, rounded once (torch's float64 -> bf16/fp16 cast would round twice)."""
    if dtype in (torch.bfloat16, torch.float16):
        return round_to_format(v, "bf16" if dtype == torch.bfloat16 else "fp16").to(dtype)
    return v.to(dtype)


def _check_input(x, spec):
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")


def quantize_dequantize(x: torch.Tensor, spec: QuantSpec, axis: int = -1, generator: torch.Generator | None = None,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` for ``spec``, blocks along ``axis``, in torch on x's device.

    ``generator`` drives stochastic rounding (a ``torch.Generator`` on x's device; None uses torch's
    default one). The result has x's shape and ``out_dtype`` (default x's dtype); it is not connected
    to autograd (see :func:`companion.training.fake_quantize` for the straight-through version). The
    identity spec returns ``x`` itself.
    """
    _check_input(x, spec)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if spec.is_identity:
        return x if out_dtype == x.dtype else x.to(out_dtype)
    axis = _check_axis(axis, x.ndim, spec) if x.ndim or spec.granularity != "tensor" else 0
    if x.numel() == 0:
        return x.detach().to(out_dtype, copy=True)
    x = x.detach()
    fmt = spec.element_format
    if spec.scale in ("fp32", "none") and not fmt.has_nan and torch.isnan(x).any():
        raise ValueError(f"quantize_dequantize: NaN input, and {fmt.name} has no NaN code")
    if spec.scale == "none":
        if spec.rounding == "nearest_even" and x.dtype == torch.float32 and fmt.name in ("bf16", "fp16"):
            return round_to_format(x, fmt).to(out_dtype)  # torch's cast: one rounding, ties to even
        x64 = x.to(torch.float64)
        return _to_dtype(_round_to_grid(x64, fmt, _uniform_like(x64, spec, generator), saturate=False), out_dtype)

    if spec.scale == "fp32":
        x64 = x.to(torch.float64)
    else:  # MX and NVFP4 read float32, as their definitions do
        x64 = x.to(torch.float32).to(torch.float64)
    xb, undo = _to_blocks(x64, spec, axis)
    uniform = _uniform_like(xb, spec, generator)
    if spec.scale == "fp32":
        yb = _fp32_scaled(xb, fmt, uniform)
    elif spec.scale == "e8m0":
        yb = _mx_scaled(xb, spec.format, uniform)
    else:
        tensor_amax = torch.where(torch.isfinite(x64), x64.abs(), 0.0).amax()
        yb = _nvfp4_scaled(xb, tensor_amax, uniform)
    return _to_dtype(undo(yb), out_dtype)
