"""MX block formats (OCP Microscaling Formats v1.0) and NVFP4: quantize, dequantize, pack, account.

An MX block is ``k`` elements of a narrow format (k = 32 in the spec) that share one scale
``X = 2^e``, stored as an 8-bit E8M0 code ``e + 127`` (0xFF is NaN).  The value of element ``i`` is
``X * P_i``.  NVFP4 is NVIDIA's variant: FP4 (E2M1) elements in blocks of 16, an FP8 E4M3 scale per
block (a real number, not only a power of two) and one FP32 scale per tensor.

Element types (``ELEMENT_TYPES``)
---------------------------------
    name       bits  emax   max      format
    fp8_e4m3     8     8    448      OCP E4M3 (no Inf, NaN S.1111.111)       MXFP8
    fp8_e5m2     8    15    57344    OCP E5M2 (IEEE-like Inf and NaN)        MXFP8
    fp6_e2m3     6     2    7.5      no Inf, no NaN                          MXFP6
    fp6_e3m2     6     4    28       no Inf, no NaN                          MXFP6
    fp4_e2m1     4     2    6        no Inf, no NaN                          MXFP4
    int8         8     0    127/64   two's complement, implicit scale 2^-6   MXINT8

``emax`` is the exponent of the largest binade of the element format (for MXINT8, whose values are
``code * 2^-6``, the binade [1, 2)).  The element codes are those of :mod:`companion.formats`.

The shared scale (``scale_rounding``)
-------------------------------------
With ``amax`` the largest magnitude in the block:

    "floor"  the spec's algorithm (section 6.3): ``e = floor(log2(amax)) - emax``.  It maps amax into
             the element format's top binade [2^emax, 2^(emax+1)).  Every format stops short of the
             top of that binade (FP4 at 6 of [4, 8), E4M3 at 448 of [256, 512)), so a block whose
             amax has a large enough significand *clips*: its largest element saturates.
    "rceil"  the rule of cuBLAS, cuDNN and Transformer Engine for MXFP8 (torchao's RCEIL):
             ``d = amax * (1 / max)`` computed in float32 as Transformer Engine and torchao compute
             it (``1 / max`` rounded to float32, the product rounded to float32), then rounded *up*
             to a power of two (PTX ``cvt.rp.satfinite.ue8m0x2.f32``): ``e = ceil(log2(d))``.
             Nothing clips; the price is that the block sometimes uses only the lower part of the
             element range.  The float32 product can differ from the exact quotient: for MXINT8 an
             amax one float32 step above 127/64 gives d = 1 exactly, so e = 0 (the element then
             rounds to 127/64 anyway), where the exact ceil(log2(amax / max)) would be 1.
    "even"   torchao's EVEN: amax is first rounded to the element format's precision (man_bits + 1
             significant bits, halves rounded up, so that a carry moves it to the next binade), then
             ``e = floor(log2(rounded amax)) - emax``.  It avoids the worst clipping of "floor".

In every mode ``e`` is clamped to E8M0's range [-127, 127] (an all-zero block, whose log2 is -inf,
gets e = -127, code 0).  The upper clamp is only reachable with MXINT8 and magnitudes near float32's
largest; it saturates, like ``satfinite``.

Elements
--------
``P_i = Q(V_i / X)`` where Q rounds to nearest, ties to even (as torch casts and ``cvt.rn`` do), and
saturates to +-max (the spec's "clamping normal numbers"). V_i / X is exact (X is a power of two), so
each element is rounded once. ``rounding="stochastic"`` replaces Q by stochastic rounding (the scale is
unchanged): V_i / X goes to one of its two neighbours, up with probability equal to its distance above
the lower one divided by their gap, so that it is unbiased. MXINT8 codes are kept symmetric, in
[-127, 127]; the code 0x80 (-2) is never produced but decodes. Negative values that round to zero keep
their sign in the float formats (code 0x8 is FP4's -0), as in torch and ml_dtypes.

Special values
--------------
* A block holding a NaN or an Inf gets the NaN scale 0xFF, and all of its elements dequantize to NaN
  (the spec: a NaN scale makes every element of the block NaN).  Its element codes are 0 and carry no
  information.  The spec authors' reference library (microxcaling) and current torchao do the same.
* An all-zero block gets scale code 0 (2^-127) and zero codes; it dequantizes to zeros.
* A block whose amax is below the scale range (2^e < 2^-127) is quantized with X = 2^-127; elements
  too small for the element format at that scale become (signed) zeros or subnormals.
* Element overflow saturates to +-max; the element codes never hold Inf or NaN.

Inputs, padding, layout
-----------------------
Inputs are numpy arrays or torch tensors (on any device) of a floating-point dtype; anything else
raises TypeError.  They are converted to float32: exactly for float16, bfloat16 and float32; float64
is rounded to the nearest float32 first (values beyond float32's range become +-Inf, and their block
NaN), as every MX quantizer reads float32 at most.  An axis whose length is not a multiple of the
block size is padded with zeros (which cannot change a block's amax) up to the next multiple; the
codes are stored for the padded shape and ``dequantize`` slices the padding off.

Codes are numpy uint8 arrays in the tensor's own layout (the blocked axis padded); scales have the
tensor's rank, with the blocked axis replaced by the number of blocks.  FP4 codes are held one per
byte; ``pack_fp4`` puts two per byte, the first element in the low nibble, which is the layout of
torch's ``float4_e2m1fn_x2`` (and of Triton's ``dot_scaled`` and torchao).  FP6 codes stay one per
byte (torch has no FP6 dtype); the storage accounting counts 6 bits for them, as a packed layout
would store them.

NVFP4 (``quantize_nvfp4``)
--------------------------
Two levels of scale, as in Transformer Engine and torchao:

    s_tensor = fp32(amax_tensor / (448 * 6))              per tensor, FP32 (1.0 if amax_tensor == 0)
    s_block  = E4M3(amax_block / 6 / s_tensor)            per block of 16, round to nearest, saturating
    P_i      = E2M1(V_i / (s_tensor * s_block))           round to nearest even, saturating at +-6
    V_i     ~= P_i * s_block * s_tensor

``amax_tensor`` is the largest finite magnitude (or ``global_amax=`` given, for calibrated static
scaling; larger values then saturate).  The quotients are computed in float64 and rounded once;
Transformer Engine and torchao multiply by float32 reciprocals instead, which can differ in the last
bit of a quotient and so, rarely, in a code next to a rounding boundary.  A block holding NaN or Inf
gets the E4M3 NaN scale (0x7F) and dequantizes to NaN; a block whose scale rounds to zero (an
all-zero block, or one far below the tensor's amax) gets scale 0 and zero codes.
``blocks="2d"`` uses 16 x 16 tiles over the last two axes (Transformer Engine's recipe for weights,
so that a weight and its transpose quantize alike); the hardware still reads one scale per 16
elements along a row, so the accounting counts one E4M3 scale per 16 elements either way.

Random Hadamard rotation
------------------------
``random_hadamard(x, size, axis, seed)`` multiplies consecutive groups of ``size`` elements along
``axis`` (size a power of two dividing the axis) by ``diag(signs) H / sqrt(size)``, H the Sylvester
Hadamard matrix and the signs random but fixed by ``seed``; ``inverse=True`` undoes it.  The matrix is
orthogonal, so it preserves the squared error, and it spreads an outlier over the whole group before
quantization (QuaRot; the NVFP4 training recipe uses 16 x 16 rotations).  It is computed with the
fast Walsh-Hadamard butterfly (additions and subtractions only), in float64, so its result is the
same on every machine.

Storage accounting
------------------
``storage_bits()`` counts the element codes (at the element format's width, padding included), the
scales (8 bits each) and NVFP4's FP32 tensor scale; ``bits_per_element`` divides by the number of
elements, exactly (a Fraction): MXFP4 is 4 + 8/32 = 4.25, NVFP4 4 + 8/16 + 32/n = 4.5 + 32/n.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
from fractions import Fraction

import numpy as np

from companion.formats import IntFormat, UnknownFormatError, get_format
from companion.scaling import _as_float64, _check_axis as _check_axis_in_range, _check_size

__all__ = [
    "ELEMENT_TYPES",
    "SCALE_ROUNDINGS",
    "MX_BLOCK_SIZE",
    "NVFP4_BLOCK_SIZE",
    "E8M0_NAN",
    "ElementType",
    "element_type",
    "shared_exponent",
    "scale_codes",
    "MXTensor",
    "quantize_mx",
    "NVFP4Tensor",
    "quantize_nvfp4",
    "nvfp4_tensor_scale",
    "pack_fp4",
    "unpack_fp4",
    "bits_per_element",
    "hadamard_transform",
    "random_hadamard",
]

SCALE_ROUNDINGS = ("floor", "rceil", "even")
MX_BLOCK_SIZE = 32
NVFP4_BLOCK_SIZE = 16
E8M0_BIAS = 127
E8M0_NAN = 0xFF
_E8M0 = get_format("e8m0")
_E4M3 = get_format("fp8_e4m3")
_E2M1 = get_format("fp4_e2m1")


# --------------------------------------------------------------------------
# Element types
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ElementType:
    """An MX element type: a format of companion.formats and the value of one code step.

    For the float formats ``unit`` is 1; MXINT8 stores ``code * 2^-6``, so its unit is 2^-6.
    """

    name: str
    format_name: str
    unit: float = 1.0

    @property
    def format(self):
        return get_format(self.format_name)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def is_int(self) -> bool:
        return isinstance(self.format, IntFormat)

    @property
    def man_bits(self) -> int:
        """Fraction bits below the leading one in the top binade (MXINT8: 6)."""
        return round(-math.log2(self.unit)) if self.is_int else self.format.man_bits

    @property
    def emax(self) -> int:
        """Exponent of the largest binade: floor(log2(max))."""
        return 0 if self.is_int else self.format.emax

    @property
    def max(self) -> float:
        return self.format.max * self.unit

    @property
    def min_positive(self) -> float:
        return self.format.min_positive * self.unit

    def decode(self, codes) -> np.ndarray:
        """Element codes -> float64 values (before the block scale)."""
        return self.format.decode(np.asarray(codes)) * self.unit

    def encode(self, v, rounding="nearest_even", rng=None) -> np.ndarray:
        """Values (already divided by the block scale) -> codes, saturating; nearest-even unless
        ``rounding`` says otherwise (``"stochastic"`` draws from ``rng``, an int seed or a Generator)."""
        v = np.asarray(v, dtype=np.float64)
        if self.is_int:
            limit = self.format.max  # symmetric: -127 .. 127, as microxcaling clamps
            return self.format.encode(np.clip(v / self.unit, -limit, limit), rounding=rounding,
                                      rng=rng).astype(np.uint8)
        return self.format.encode(v, rounding=rounding, saturate=True, rng=rng).astype(np.uint8)

    def ulp(self, v) -> np.ndarray:
        """Spacing of the element grid around |v| (the binade's spacing; the subnormal one near 0)."""
        a = np.abs(np.asarray(v, dtype=np.float64))
        if self.is_int:
            return np.full(a.shape, self.unit)
        fmt = self.format
        _, exp = np.frexp(a)
        e = np.maximum(exp.astype(np.int64) - 1, fmt.emin)
        return np.ldexp(1.0, (e - fmt.man_bits).astype(np.int32))


ELEMENT_TYPES = types.MappingProxyType({
    t.name: t
    for t in (
        ElementType("fp8_e4m3", "fp8_e4m3"),
        ElementType("fp8_e5m2", "fp8_e5m2"),
        ElementType("fp6_e2m3", "fp6_e2m3"),
        ElementType("fp6_e3m2", "fp6_e3m2"),
        ElementType("fp4_e2m1", "fp4_e2m1"),
        ElementType("int8", "int8", unit=2.0 ** -6),
    )
})


def element_type(elem) -> ElementType:
    """The MX element type called ``elem`` (an ElementType is returned unchanged)."""
    if isinstance(elem, ElementType):
        return elem
    try:
        return ELEMENT_TYPES[elem]
    except (KeyError, TypeError):
        raise UnknownFormatError(
            f"unknown MX element format {elem!r}; expected one of: {', '.join(ELEMENT_TYPES)}"
        ) from None


# --------------------------------------------------------------------------
# Input checks and blocking
# --------------------------------------------------------------------------

def _as_float32(x, who):
    """x (numpy, torch, list) -> float32 numpy array; float64 is rounded to nearest and values beyond
    float32's range become +-Inf, as documented."""
    with np.errstate(over="ignore"):
        return _as_float64(x, who).astype(np.float32)


def _check_axis(axis, ndim, who):
    if ndim == 0:
        raise ValueError(f"{who}: a block format needs at least one dimension, got a 0-d input")
    return _check_axis_in_range(axis, ndim, who)


def _check_block_size(block_size, who):
    return _check_size(block_size, f"{who}: block_size")


def _check_scale_rounding(mode, who):
    if mode not in SCALE_ROUNDINGS:
        raise ValueError(f"{who}: unknown scale_rounding {mode!r}; expected one of: {', '.join(SCALE_ROUNDINGS)}")
    return mode


def _padded_shape(shape, block_shape):
    return tuple(-(-n // b) * b for n, b in zip(shape, block_shape))


def _to_blocks(x, block_shape):
    """Pad with zeros, then (n0*b0, n1*b1, ...) -> (n0, n1, ..., b0*b1*...)."""
    padded = _padded_shape(x.shape, block_shape)
    if padded != x.shape:
        x = np.pad(x, [(0, p - n) for n, p in zip(x.shape, padded)])
    grid = tuple(p // b for p, b in zip(padded, block_shape))
    split = [d for n, b in zip(grid, block_shape) for d in (n, b)]
    nd = len(grid)
    order = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    return x.reshape(split).transpose(order).reshape(grid + (math.prod(block_shape),))


def _from_blocks(xb, block_shape, shape):
    """Inverse of _to_blocks: (n0, n1, ..., B) -> the padded layout, sliced to ``shape``."""
    grid = xb.shape[:-1]
    nd = len(grid)
    order = [i for pair in zip(range(nd), range(nd, 2 * nd)) for i in pair]
    padded = tuple(n * b for n, b in zip(grid, block_shape))
    out = xb.reshape(grid + tuple(block_shape)).transpose(order).reshape(padded)
    return out[tuple(slice(0, n) for n in shape)]


def _block_amax(xb):
    """Largest magnitude per block (NaN if the block holds a NaN); 0 for empty blocks."""
    return np.max(np.abs(xb), axis=-1, initial=0.0)


# --------------------------------------------------------------------------
# The shared scale
# --------------------------------------------------------------------------

def _floor_log2(a):
    """floor(log2(a)) for finite a > 0, exactly (from the float's exponent)."""
    _, exp = np.frexp(a)
    return exp.astype(np.int64) - 1


def shared_exponent(amax, elem, scale_rounding="floor"):
    """The block scale exponent e (X = 2^e) for block maxima ``amax`` (float32 values).

    Returns int64 exponents clamped to [-127, 127]; entries whose amax is NaN or Inf are
    meaningless (their scale is NaN, see :func:`scale_codes`).
    """
    et = element_type(elem)
    _check_scale_rounding(scale_rounding, "shared_exponent")
    a = np.asarray(amax, dtype=np.float32)
    finite = np.isfinite(a)
    a64 = np.where(finite & (a > 0), a, 1.0).astype(np.float64)  # placeholders are overwritten below
    if scale_rounding == "floor":
        e = _floor_log2(a64) - et.emax
    elif scale_rounding == "even":
        # Round amax to man_bits + 1 significant bits, halves up; a carry moves it up a binade.
        m, exp = np.frexp(a64)  # a64 = m * 2^exp, 0.5 <= m < 1
        r = np.floor(np.ldexp(m, et.man_bits + 1) + 0.5)
        e = exp.astype(np.int64) - 1 + (r >= 2.0 ** (et.man_bits + 1)) - et.emax
    else:  # rceil: d = amax * fp32(1 / max) in float32, rounded up to a power of two
        inv_max = np.float32(1.0 / et.max)
        with np.errstate(over="ignore", under="ignore"):
            d = (np.where(finite, a, np.float32(0)) * inv_max).astype(np.float32)
        m, exp = np.frexp(d.astype(np.float64))
        e = exp.astype(np.int64) - (m == 0.5)  # an exact power of two needs no rounding up
        e = np.where(d > 0, e, -E8M0_BIAS)
    e = np.where(finite & (a > 0), e, -E8M0_BIAS)
    return np.clip(e, -E8M0_BIAS, E8M0_BIAS)


def scale_codes(amax, elem, scale_rounding="floor"):
    """E8M0 codes (uint8) of the block scales for block maxima ``amax``; 0xFF where amax is NaN/Inf."""
    e = shared_exponent(amax, elem, scale_rounding)
    finite = np.isfinite(np.asarray(amax, dtype=np.float32))
    return np.where(finite, e + E8M0_BIAS, E8M0_NAN).astype(np.uint8)


# --------------------------------------------------------------------------
# FP4 packing and torch views
# --------------------------------------------------------------------------

def _torch():
    import torch
    return torch


def pack_fp4(codes):
    """Two FP4 codes per byte along the last axis, the first element in the low nibble.

    ``codes`` is a uint8 array (numpy or torch) of 4-bit codes whose last axis has even length; the
    result has half that length and the same container.  This is the byte layout of torch's
    ``float4_e2m1fn_x2``.
    """
    torch = sys.modules.get("torch")
    is_torch = torch is not None and isinstance(codes, torch.Tensor)
    c = codes.cpu().numpy() if is_torch else np.asarray(codes)
    if c.dtype != np.uint8:
        raise TypeError(f"pack_fp4: expected uint8 codes, got {c.dtype}")
    if c.ndim == 0 or c.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last axis must have even length, got shape {c.shape}")
    if c.size and c.max() > 0xF:
        raise ValueError(f"pack_fp4: FP4 codes lie in [0, 15], got {int(c.max())}")
    packed = c[..., 0::2] | (c[..., 1::2] << 4)
    return torch.from_numpy(np.ascontiguousarray(packed)).to(codes.device) if is_torch else packed


def unpack_fp4(packed):
    """Inverse of :func:`pack_fp4`; also accepts a torch ``float4_e2m1fn_x2`` tensor (gives uint8 codes)."""
    torch = sys.modules.get("torch")
    is_torch = torch is not None and isinstance(packed, torch.Tensor)
    if is_torch:
        p = packed
        if p.dtype == getattr(torch, "float4_e2m1fn_x2", None):
            p = p.view(torch.uint8)
        if p.dtype != torch.uint8:
            raise TypeError(f"unpack_fp4: expected uint8 or float4_e2m1fn_x2, got {p.dtype}")
        p = p.cpu().numpy()
    else:
        p = np.asarray(packed)
        if p.dtype != np.uint8:
            raise TypeError(f"unpack_fp4: expected uint8 bytes, got {p.dtype}")
    if p.ndim == 0:
        raise ValueError("unpack_fp4: expected at least one dimension")
    codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
    return torch.from_numpy(codes).to(packed.device) if is_torch else codes


_TORCH_ELEMENT_DTYPES = {  # element type -> name of the torch dtype that views its codes
    "fp4_e2m1": "float4_e2m1fn_x2",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "int8": "int8",
}


# --------------------------------------------------------------------------
# MX tensors
# --------------------------------------------------------------------------

def bits_per_element(elem, block_size=MX_BLOCK_SIZE, scale_bits=8) -> Fraction:
    """Storage of an MX format per element, without padding: elem bits + scale_bits / block_size."""
    return Fraction(element_type(elem).bits) + Fraction(scale_bits, _check_block_size(block_size, "bits_per_element"))


class _StorageAccounting:
    """Exact storage of a block-scaled tensor, from the ``storage_bits()`` of its parts."""

    @property
    def total_bits(self) -> int:
        return sum(self.storage_bits().values())

    @property
    def bits_per_element(self) -> Fraction:
        return Fraction(self.total_bits, max(math.prod(self.shape), 1))


@dataclasses.dataclass(frozen=True, eq=False)
class MXTensor(_StorageAccounting):
    """An MX-quantized tensor: element codes, E8M0 scale codes and what is needed to read them.

    ``elements`` has the tensor's shape with ``axis`` padded to a multiple of ``block_size``;
    ``scales`` has the tensor's shape with ``axis`` replaced by the number of blocks.
    """

    elements: np.ndarray
    scales: np.ndarray
    elem: str
    block_size: int
    axis: int
    shape: tuple
    scale_rounding: str = "floor"

    @property
    def element_type(self) -> ElementType:
        return element_type(self.elem)

    @property
    def block_shape(self) -> tuple:
        return tuple(self.block_size if i == self.axis else 1 for i in range(len(self.shape)))

    def scale_values(self) -> np.ndarray:
        """The block scales X = 2^(code - 127) as float64 (NaN for 0xFF)."""
        return _E8M0.decode(self.scales)

    def element_values(self) -> np.ndarray:
        """The element values P_i (decoded codes, before the scale), in the padded layout."""
        return self.element_type.decode(self.elements)

    def dequantize(self) -> np.ndarray:
        """X * P_i as a float64 array of the original shape (exact: every value is a float32)."""
        bs = self.block_shape
        pb = _to_blocks(self.element_values(), bs)
        return _from_blocks(pb * self.scale_values()[..., None], bs, self.shape)

    def storage_bits(self) -> dict:
        return {"elements": int(self.elements.size) * self.element_type.bits,
                "scales": int(self.scales.size) * 8}

    def to_torch(self):
        """(elements, scales) as torch tensors of the dtypes the hardware reads.

        FP4 codes are packed two per byte along the last axis and viewed as ``float4_e2m1fn_x2``
        (the last axis must have even length); E4M3/E5M2 codes are viewed as ``float8_e4m3fn`` /
        ``float8_e5m2``, MXINT8 codes as ``int8``, FP6 codes stay ``uint8`` (torch has no FP6 dtype).
        Scales are viewed as ``float8_e8m0fnu``.
        """
        torch = _torch()
        codes = self.elements
        if self.elem == "fp4_e2m1":
            if codes.ndim == 0 or codes.shape[-1] % 2:
                raise ValueError(
                    f"float4_e2m1fn_x2 packs pairs along the last axis, whose padded length here is "
                    f"{codes.shape[-1]} (odd); quantize along the last axis or use an even length"
                )
            codes = pack_fp4(codes)
        elements = torch.from_numpy(np.ascontiguousarray(codes))
        dtype_name = _TORCH_ELEMENT_DTYPES.get(self.elem)
        if dtype_name is not None:
            elements = elements.view(getattr(torch, dtype_name))
        scales = torch.from_numpy(np.ascontiguousarray(self.scales)).view(torch.float8_e8m0fnu)
        return elements, scales

    @classmethod
    def from_torch(cls, elements, scales, shape, *, elem=None, block_size=MX_BLOCK_SIZE, axis=-1,
                   scale_rounding="floor"):
        """Build an MXTensor from torch tensors such as :meth:`to_torch` returns.

        ``elem`` is inferred from a ``float4_e2m1fn_x2`` / ``float8_e4m3fn`` / ``float8_e5m2`` /
        ``int8`` element dtype and must be given for ``uint8`` codes (FP6).  ``shape`` is the
        original (unpadded) shape.
        """
        torch = _torch()
        who = "MXTensor.from_torch"
        by_dtype = {getattr(torch, d): e for e, d in _TORCH_ELEMENT_DTYPES.items()}
        inferred = by_dtype.get(elements.dtype)
        if elem is None:
            if inferred is None:
                raise ValueError(f"{who}: cannot infer the element format from {elements.dtype}; pass elem=")
            elem = inferred
        et = element_type(elem)
        if (inferred is not None and inferred != et.name) or (inferred is None and elements.dtype != torch.uint8):
            raise TypeError(f"{who}: elements of dtype {elements.dtype} do not hold {et.name} codes")
        if scales.dtype not in (torch.float8_e8m0fnu, torch.uint8):
            raise TypeError(f"{who}: scales must be float8_e8m0fnu (or uint8), got {scales.dtype}")
        if et.name == "fp4_e2m1":
            codes = unpack_fp4(elements.view(torch.uint8)).cpu().numpy()
        else:
            codes = elements.view(torch.uint8).cpu().numpy()
        shape = tuple(int(n) for n in shape)
        block_size = _check_block_size(block_size, who)
        axis = _check_axis(axis, len(shape), who)
        bs = tuple(block_size if i == axis else 1 for i in range(len(shape)))
        padded = _padded_shape(shape, bs)
        grid = tuple(p // b for p, b in zip(padded, bs))
        sc = scales.view(torch.uint8).cpu().numpy()
        if codes.shape != padded or sc.shape != grid:
            raise ValueError(f"{who}: expected elements of shape {padded} and scales of shape {grid} "
                             f"for shape {shape}, got {codes.shape} and {sc.shape}")
        if et.bits < 8 and codes.size and codes.max() >= 1 << et.bits:
            raise ValueError(f"{who}: {et.name} codes must be below {1 << et.bits}")
        return cls(codes.copy(), sc.copy(), et.name, block_size, axis, shape, scale_rounding)

    def __repr__(self):
        return (f"MXTensor({self.elem}, shape {self.shape}, block {self.block_size} along axis {self.axis}, "
                f"{self.scale_rounding} scales, {float(self.bits_per_element):.4f} bits/element)")


def quantize_mx(x, elem, block_size=MX_BLOCK_SIZE, axis=-1, scale_rounding="floor",
                rounding="nearest_even", rng=None) -> MXTensor:
    """Quantize ``x`` to the MX format with element type ``elem``, one E8M0 scale per block.

    Blocks are ``block_size`` consecutive elements along ``axis``; see the module docstring for
    the scale rules, special values and padding. ``rounding`` rounds the elements (the scales do not
    depend on it): ``"nearest_even"``, the spec's, or ``"stochastic"`` with ``rng`` (an int seed or a
    numpy Generator), which rounds each ``V_i / X`` to one of its two neighbours with probabilities
    that make the expected value ``V_i / X``, as FP4 training recipes do for gradients.
    """
    who = "quantize_mx"
    et = element_type(elem)
    block_size = _check_block_size(block_size, who)
    _check_scale_rounding(scale_rounding, who)
    xf = _as_float32(x, who)
    axis = _check_axis(axis, xf.ndim, who)
    bs = tuple(block_size if i == axis else 1 for i in range(xf.ndim))

    xb = _to_blocks(xf, bs).astype(np.float64)        # (grid..., block_size)
    amax = _block_amax(xb)                             # (grid...)
    scales = scale_codes(amax, et, scale_rounding)
    nan_block = scales == E8M0_NAN
    e = np.where(nan_block, 0, scales.astype(np.int64) - E8M0_BIAS)
    v = np.where(nan_block[..., None], 0.0, np.ldexp(xb, -e[..., None].astype(np.int32)))  # exact
    codes = et.encode(v, rounding, rng)
    padded = _padded_shape(xf.shape, bs)
    elements = np.ascontiguousarray(_from_blocks(codes, bs, padded))
    return MXTensor(elements, np.ascontiguousarray(scales), et.name, block_size, axis,
                    tuple(xf.shape), scale_rounding)


# --------------------------------------------------------------------------
# NVFP4
# --------------------------------------------------------------------------

NVFP4_TENSOR_SCALE_DIVISOR = 448.0 * 6.0  # E4M3 max * E2M1 max


def nvfp4_tensor_scale(amax) -> float:
    """The FP32 per-tensor scale amax / (448 * 6), rounded to float32 (1.0 for amax 0)."""
    amax = float(amax)
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"nvfp4_tensor_scale: amax must be finite and non-negative, got {amax!r}")
    s = float(np.float32(amax / NVFP4_TENSOR_SCALE_DIVISOR))
    return s if s > 0 else 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class NVFP4Tensor(_StorageAccounting):
    """An NVFP4 tensor: E2M1 codes, E4M3 block scale codes and the FP32 tensor scale.

    With ``blocks="1d"`` the blocks are 16 elements along ``axis``; with ``"2d"`` they are 16 x 16
    tiles over the last two axes.  ``block_scales`` has one code per block (per tile for "2d").
    """

    elements: np.ndarray
    block_scales: np.ndarray
    tensor_scale: float
    shape: tuple
    axis: int
    blocks: str = "1d"

    @property
    def block_shape(self) -> tuple:
        nd = len(self.shape)
        if self.blocks == "2d":
            return (1,) * (nd - 2) + (NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
        return tuple(NVFP4_BLOCK_SIZE if i == self.axis else 1 for i in range(nd))

    def scale_values(self) -> np.ndarray:
        """Each block's full scale s_block * s_tensor (float64; NaN for a NaN block)."""
        return _E4M3.decode(self.block_scales) * self.tensor_scale

    def dequantize(self) -> np.ndarray:
        """P_i * s_block * s_tensor as a float64 array of the original shape."""
        bs = self.block_shape
        pb = _to_blocks(_E2M1.decode(self.elements), bs)
        return _from_blocks(pb * self.scale_values()[..., None], bs, self.shape)

    def storage_bits(self) -> dict:
        # The MMA reads one E4M3 scale per 16 elements along the reduction axis, also for 2-D tiles.
        return {"elements": int(self.elements.size) * 4,
                "block scales": int(self.elements.size) // NVFP4_BLOCK_SIZE * 8,
                "tensor scale": 32}

    def to_torch(self):
        """(elements as float4_e2m1fn_x2, block scales as float8_e4m3fn, tensor scale as float32)."""
        torch = _torch()
        if self.elements.ndim == 0 or self.elements.shape[-1] % 2:
            raise ValueError("float4_e2m1fn_x2 packs pairs along the last axis, whose padded length is odd here")
        elements = torch.from_numpy(np.ascontiguousarray(pack_fp4(self.elements))).view(torch.float4_e2m1fn_x2)
        scales = torch.from_numpy(np.ascontiguousarray(self.block_scales)).view(torch.float8_e4m3fn)
        return elements, scales, torch.tensor(self.tensor_scale, dtype=torch.float32)

    def __repr__(self):
        return (f"NVFP4Tensor(shape {self.shape}, {self.blocks} blocks, tensor scale {self.tensor_scale!r}, "
                f"{float(self.bits_per_element):.4f} bits/element)")


def quantize_nvfp4(x, axis=-1, blocks="1d", global_amax=None) -> NVFP4Tensor:
    """Quantize ``x`` to NVFP4: E2M1 elements, an E4M3 scale per 16 elements, an FP32 tensor scale.

    ``blocks`` is "1d" (16 consecutive elements along ``axis``) or "2d" (16 x 16 tiles over the last
    two axes; ``axis`` must then be the last).  ``global_amax`` fixes the tensor's amax (static
    scaling); by default it is the largest finite magnitude of ``x``.
    """
    who = "quantize_nvfp4"
    xf = _as_float32(x, who)
    axis = _check_axis(axis, xf.ndim, who)
    if blocks == "2d":
        if xf.ndim < 2:
            raise ValueError(f"{who}: 16 x 16 blocks need at least two dimensions, got shape {xf.shape}")
        if axis != xf.ndim - 1:
            raise ValueError(f"{who}: 2-D blocks tile the last two axes; axis must be -1, got {axis}")
        bs = (1,) * (xf.ndim - 2) + (NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    elif blocks == "1d":
        bs = tuple(NVFP4_BLOCK_SIZE if i == axis else 1 for i in range(xf.ndim))
    else:
        raise ValueError(f"{who}: blocks must be '1d' or '2d', got {blocks!r}")

    if global_amax is None:
        finite = np.abs(xf[np.isfinite(xf)])
        global_amax = float(finite.max()) if finite.size else 0.0
    s_tensor = nvfp4_tensor_scale(global_amax)

    xb = _to_blocks(xf, bs).astype(np.float64)
    with np.errstate(invalid="ignore"):
        amax = _block_amax(xb)
    special = ~np.isfinite(amax)
    # 6 * s_tensor is exact, so the quotient is rounded once in float64 and once to E4M3.
    block_codes = _E4M3.encode(np.where(special, 0.0, amax / (6.0 * s_tensor)), saturate=True).astype(np.uint8)
    block_codes = np.where(special, _E4M3.nan_code, block_codes).astype(np.uint8)
    s_block = np.where(special, 0.0, _E4M3.decode(block_codes))
    scale = s_block * s_tensor                         # exact in float64
    live = scale > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(live[..., None], xb / np.where(live, scale, 1.0)[..., None], 0.0)
    codes = _E2M1.encode(v, saturate=True).astype(np.uint8)
    padded = _padded_shape(xf.shape, bs)
    elements = np.ascontiguousarray(_from_blocks(codes, bs, padded))
    return NVFP4Tensor(elements, np.ascontiguousarray(block_codes), s_tensor, tuple(xf.shape), axis, blocks)


# --------------------------------------------------------------------------
# Random Hadamard rotation
# --------------------------------------------------------------------------

def _check_power_of_two(size, who):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size & (size - 1):
        raise ValueError(f"{who}: size must be a power of two, got {size!r}")
    return int(size)


def hadamard_transform(x, axis=-1):
    """x @ H / sqrt(n) along ``axis`` (length n, a power of two), H the Sylvester Hadamard matrix.

    The fast Walsh-Hadamard butterfly: log2(n) rounds of (a + b, a - b), then one scaling.  The
    orthonormal matrix is symmetric and its own inverse.  Returns float64.
    """
    y = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = _check_power_of_two(y.shape[-1], "hadamard_transform")
    lead = y.shape[:-1]
    h = 1
    while h < n:
        pairs = y.reshape(lead + (n // (2 * h), 2, h))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
        h *= 2
    return np.moveaxis(y * (1.0 / math.sqrt(n)), -1, axis)


def random_hadamard(x, size=32, axis=-1, seed=0, inverse=False):
    """Rotate groups of ``size`` elements along ``axis`` by diag(signs) H / sqrt(size) (float64).

    The same random signs (from ``seed``) serve every group; ``inverse=True`` applies the transpose,
    H diag(signs) / sqrt(size), which undoes the rotation.
    """
    who = "random_hadamard"
    size = _check_power_of_two(size, who)
    xf = np.asarray(x, dtype=np.float64)
    axis = _check_axis(axis, xf.ndim, who)
    if xf.shape[axis] % size:
        raise ValueError(f"{who}: axis {axis} has length {xf.shape[axis]}, not a multiple of size {size}")
    signs = np.where(np.random.default_rng(seed).random(size) < 0.5, -1.0, 1.0)
    y = np.moveaxis(xf, axis, -1)
    groups = y.reshape(y.shape[:-1] + (-1, size))
    if inverse:
        out = hadamard_transform(groups) * signs
    else:
        out = hadamard_transform(groups * signs)
    return np.moveaxis(out.reshape(y.shape), -1, axis)
