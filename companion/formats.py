"""Binary number formats: definitions, exact decoding and correctly rounded encoding.

Every format in this module is a rule that maps bit patterns ("codes", unsigned
integers of ``bits`` bits) to real numbers, plus the inverse rule that maps a
real number to the code of a nearby representable value.

Floating-point formats (``FloatFormat``)
----------------------------------------
A code of a format with E exponent bits, M mantissa bits and bias b is laid out,
most significant bit first, as ::

    [S][ E exponent bits ][ M mantissa bits ]       (no S in unsigned formats)

With e the exponent field and m the mantissa field (both unsigned integers)::

    normal,    e >= 1:   (-1)^S * 2^(e - b) * (1 + m / 2^M)
    subnormal, e == 0:   (-1)^S * 2^(1 - b) * (0 + m / 2^M)   (m == 0 is zero)

The default bias is 2^(E-1) - 1; "fnuz" formats default to one more, 2^(E-1).
Subnormals continue the smallest normal binade with the same spacing, so
underflow is gradual.  A format may also declare ``subnormals=False``: then
e == 0 is an ordinary binade (value 2^(0 - b) * (1 + m / 2^M)) and the format
has neither subnormals nor zero; E8M0 is such a format.

How the remaining codes are spent on special values is set by ``specials``:

    ieee   e all ones: m == 0 is +-Inf, m != 0 is NaN (fp64 ... fp16, bf16, E5M2).
    fn     no Inf; only S.1...1.1...1 is NaN, the rest of the top binade is
           finite (OCP FP8 E4M3: max 448, NaN S.1111.111).
    fnuz   no Inf and no negative zero: the single NaN is the code 1.0...0.0
           that would otherwise be -0 (E4M3FNUZ, E5M2FNUZ, bias one larger).
    none   every code is a finite number (the MX formats FP6 and FP4).

E8M0 (the OCP MX scale format) is ``FloatFormat("e8m0", 8, 0, bias=127,
specials="fn", signed=False, subnormals=False)``: value 2^(code - 127) for
codes 0..254, NaN = 0xFF, no sign, no zero.

Integer formats (``IntFormat``)
-------------------------------
A ``bits``-wide code holds a two's complement integer (signed) or a plain
binary one (unsigned).  Signed ranges are asymmetric, [-2^(b-1), 2^(b-1) - 1]:
int4 -1 has code 0b1111 and -8 (code 0b1000) has no positive counterpart.

Encoding: one rounding
----------------------
``encode`` first converts its input exactly to float64 (every float of at most
64 bits, and every integer of magnitude up to 2^53, is a float64; other
integers raise ValueError rather than being rounded twice).  The float64 value
is then rounded once to the target, as if the target had an unbounded exponent
range above (so mantissa carries move into the next binade) and its subnormals
below.  Rounding modes: "nearest_even" (IEEE 754 default), "toward_zero",
"nearest_away" (ties away from zero) and "stochastic" (round up with
probability equal to the distance to the lower neighbour divided by the gap,
resolution 2^-53; needs ``rng``, an int seed or ``numpy.random.Generator``).

Overflow follows IEEE 754: a finite value overflows when its rounded value,
exponent unbounded, exceeds ``max``.  ``saturate=True`` gives +-max (and maps
+-Inf inputs to +-max, like CUDA's __NV_SATFINITE).  Otherwise the result is
the format's own: +-Inf where it has Inf, NaN where it has NaN but no Inf (fn,
fnuz), and +-max in formats with neither (FP6, FP4), max being their only
possible answer.  Under "toward_zero" finite overflow gives +-max, as in IEEE
roundTowardZero; under "stochastic" a draw that rounds up past max overflows
like any other.  Integer formats clamp out-of-range values (and +-Inf) to
[min, max] under every setting: they have no code for an overflowed value.

NaN inputs encode to the format's canonical positive NaN whatever their sign or
payload: 0x7FF8000000000000, 0x7FC00000, tf32 0x3FE00, 0x7E00, bf16 0x7FC0,
E5M2 0x7E, E4M3 0x7F, fnuz 0x80, E8M0 0xFF.  Formats without NaN (FP6, FP4,
integers) reject NaN with ValueError.  Zero keeps its sign where the format has
-0; fnuz and unsigned formats map -0, and negative values that round to zero,
to code 0.

E8M0 rounds positive values to a power of two.  With no mantissa bits the
significand of 2^k is the single implicit 1, so the tie 1.5 * 2^k sits between
significands 1 (odd) and 2 (even): ties round up, to 2^(k+1).  Positive values
below 2^-127 become 2^-127, the nearest value, under every rounding mode.
Zero (log2 0 = -inf) and negative numbers, which E8M0 cannot approximate,
encode to NaN.

Comparison with other libraries (ml_dtypes 0.6, torch 2.13)
-----------------------------------------------------------
For float32 inputs, codes agree bit for bit with ml_dtypes and torch casts,
except where noted here.

* Both libraries' array casts convert float64 via float32, which rounds twice
  (ml_dtypes' scalar constructor rounds once); numpy's
  float64 -> float16 cast and this module round once (tf32 included: a float64
  input is not first rounded to float32).
* NaN: both keep the sign of a NaN (-NaN -> 0xFF in E4M3); torch gives 0x7F
  for E5M2 and 0xFFFF for bfloat16 (vectorised CPU path).  Here NaN is always
  canonical.  ml_dtypes turns NaN into -0 (positive NaN) or +0 (negative NaN)
  in FP6/FP4; here that raises.
* float8_e4m3fn overflow and +-Inf: torch 2.11 casts (CPU and CUDA) give NaN
  with the input's sign, torch 2.13 CPU casts saturate to +-448 (PyTorch
  PR #178817); ``saturate=True`` matches the latter.
* E8M0: ml_dtypes and torch send float32 subnormals in (2^-127, 1.5 * 2^-127)
  to 2^-126; the nearest value, and the result here, is 2^-127.  torch casts 0
  to code 0 (2^-127) and negative x to the code of |x|; here, as in ml_dtypes,
  both give NaN.

Containers
----------
``decode``, ``encode`` and ``round`` accept numpy arrays and scalars, Python
scalars and lists, and torch tensors, and return the same kind: a tensor comes
back on its own device (the arithmetic runs in numpy on the CPU).  torch is
never imported here.  Codes come back as uint8, uint16, uint32 or uint64,
the narrowest that holds ``bits``; values as float64.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import types
from collections.abc import Sequence

import numpy as np

__all__ = [
    "ROUNDING_MODES",
    "SPECIALS",
    "NumberFormat",
    "FloatFormat",
    "IntFormat",
    "CodeSet",
    "FormatTable",
    "BitFields",
    "UnknownFormatError",
    "FORMATS",
    "get_format",
    "list_formats",
    "describe",
    "bit_fields",
]

ROUNDING_MODES = ("nearest_even", "toward_zero", "nearest_away", "stochastic")
SPECIALS = ("ieee", "fn", "fnuz", "none")

# values() enumerates every code; beyond this width that is no longer cheap.
_MAX_ENUMERABLE_BITS = 20


# --------------------------------------------------------------------------
# Containers: everything is computed on numpy arrays; these helpers remember
# what the caller passed so the result can be handed back in the same form.
# --------------------------------------------------------------------------

def _unwrap(x):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        device = x.device

        def wrap(r):
            return torch.from_numpy(np.ascontiguousarray(r)).to(device)

        return x, wrap
    if isinstance(x, np.ndarray):
        return x, lambda r: r
    if isinstance(x, np.generic):
        return np.asarray(x), lambda r: r[()]
    if isinstance(x, (list, tuple)):
        return _asarray(x), lambda r: r.tolist()
    if isinstance(x, (bool, int, float, complex)):
        return _asarray(x), lambda r: r.item()
    return _asarray(x), lambda r: r


def _asarray(x):
    try:
        return np.asarray(x)
    except (ValueError, OverflowError) as err:  # ragged lists, etc.
        raise TypeError(f"cannot interpret {type(x).__name__} as an array: {err}") from None


def _tensor_to_numpy(t, who, codes):
    t = t.detach()
    if t.is_complex() or (codes and (t.is_floating_point() or t.dtype == _torch_bool())):
        kind = "an integer" if codes else "a real"
        raise TypeError(f"{who}: expected {kind} dtype, got {t.dtype}")
    if t.is_floating_point():
        # Every torch float dtype (float8 ... float64) converts exactly.
        t = t.to(dtype=sys.modules["torch"].float64)
    return t.cpu().numpy()


def _torch_bool():
    return sys.modules["torch"].bool


def _ml_dtypes_kind(dtype):
    """'f' or 'i' for ml_dtypes' bfloat16/float8/int4-like dtypes, else None."""
    ml = sys.modules.get("ml_dtypes")
    if ml is None or dtype.kind != "V":
        return None
    for kind, info in (("f", ml.finfo), ("i", ml.iinfo)):
        try:
            info(dtype)
            return kind
        except (ValueError, TypeError, KeyError):
            pass
    return None


def _to_float64(arr, who):
    dt = arr.dtype
    if dt.kind in "biuf" or _ml_dtypes_kind(dt) is not None:
        with np.errstate(invalid="ignore"):  # signalling NaNs set the flag; they stay NaN
            out = arr.astype(np.float64)
        if (dt.kind in "iu" and dt.itemsize > 4) or (dt.kind == "f" and dt.itemsize > 8):
            _require_exact(arr, out, who)
        return out
    raise TypeError(
        f"{who}: cannot encode values of dtype {dt}; "
        "expected real numbers (bool, integer or floating point)"
    )


def _require_exact(arr, out, who):
    with np.errstate(invalid="ignore", over="ignore"):
        back = out.astype(arr.dtype)
    bad = back != arr
    if arr.dtype.kind == "f":
        bad &= ~np.isnan(arr)
    else:
        # 2^63 (2^64 for unsigned) is what the largest integers round up to;
        # casting it back is undefined, so flag it explicitly.
        bad |= out >= 2.0 ** (8 * arr.dtype.itemsize - (arr.dtype.kind == "i"))
    if bad.any():
        raise ValueError(
            f"{who}: input {arr[bad].flat[0]!r} is not exactly representable in float64; "
            "encode rounds once from an exact float64 value"
        )


def _check_rounding(rounding):
    if rounding not in ROUNDING_MODES:
        raise ValueError(
            f"unknown rounding mode {rounding!r}; expected one of: {', '.join(ROUNDING_MODES)}"
        )


def _uniforms(rng, shape):
    if rng is None:
        raise ValueError(
            "stochastic rounding needs rng: an int seed or a numpy.random.Generator"
        )
    if isinstance(rng, np.random.Generator):
        gen = rng
    elif isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        gen = np.random.default_rng(int(rng))
    else:
        raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {type(rng).__name__}")
    return np.asarray(gen.random(shape), dtype=np.float64)


def _round_integral(y, rounding, u):
    """Round non-negative float64 y to an integer-valued float64 (exact)."""
    if rounding == "nearest_even":
        return np.rint(y)
    lower = np.floor(y)
    if rounding == "toward_zero":
        return lower
    frac = y - lower  # exact: y and floor(y) share their binade
    if rounding == "nearest_away":
        return lower + (frac >= 0.5)
    return lower + (u < frac)


# --------------------------------------------------------------------------
# Code sets
# --------------------------------------------------------------------------

class CodeSet(Sequence):
    """Sorted, immutable collection of codes, stored as ranges.

    Behaves like a list of ints (len, indexing, iteration, ``in``, equality
    with lists) without materialising fp32's 2^24 - 2 or fp64's 2^53 - 2 NaN
    codes.
    """

    __slots__ = ("_ranges",)

    def __init__(self, ranges=()):
        self._ranges = tuple(r for r in ranges if len(r))

    def __len__(self):
        return sum(len(r) for r in self._ranges)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError("CodeSet index out of range")
        for r in self._ranges:
            if i < len(r):
                return r[i]
            i -= len(r)

    def __contains__(self, code):
        return any(code in r for r in self._ranges)

    def __iter__(self):
        return itertools.chain.from_iterable(self._ranges)

    def __eq__(self, other):
        if isinstance(other, CodeSet):
            return self._ranges == other._ranges
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self):
        return hash(self._ranges)

    def __repr__(self):
        if len(self) <= 16:
            return repr(list(self))
        spans = ", ".join(f"{r.start:#x}..{r.stop - 1:#x}" for r in self._ranges)
        return f"CodeSet({len(self)} codes: {spans})"


# --------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------

class NumberFormat:
    """Interface shared by FloatFormat and IntFormat."""

    @property
    def code_dtype(self):
        """Narrowest numpy unsigned dtype holding a code."""
        for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
            if self.bits <= 8 * np.dtype(dt).itemsize:
                return np.dtype(dt)

    @property
    def num_codes(self):
        return 1 << self.bits

    @property
    def min_positive(self):
        """Smallest positive value."""
        return next(v for v in (self.min_subnormal, self.min_normal, 1.0) if v is not None)

    @property
    def dynamic_range_binades(self):
        """log2(max / smallest positive value)."""
        return math.log2(self.max) - math.log2(self.min_positive)

    @property
    def num_finite(self):
        """Number of codes that encode finite values (+0 and -0 count as two)."""
        return self.num_codes - len(self.nan_codes) - len(self.inf_codes)

    def decode(self, codes):
        """Bit patterns -> exact float64 values, in the container passed in."""
        arr, wrap = _unwrap(codes)
        return wrap(self._decode(self._check_codes(arr)))

    def encode(self, x, rounding="nearest_even", saturate=False, rng=None):
        """Values -> codes, rounded once; see the module docstring for the rules."""
        arr, wrap = _unwrap(x)
        return wrap(self._encode_any(arr, rounding, saturate, rng).astype(self.code_dtype))

    def round(self, x, rounding="nearest_even", saturate=False, rng=None):
        """decode(encode(x)) as float64, in the container passed in."""
        arr, wrap = _unwrap(x)
        return wrap(self._decode(self._encode_any(arr, rounding, saturate, rng)))

    def values(self):
        """All distinct finite values, ascending, as float64 (zero once, as +0)."""
        if self.bits > _MAX_ENUMERABLE_BITS:
            raise ValueError(
                f"{self.name} has 2^{self.bits} codes; values() enumerates formats of "
                f"at most {_MAX_ENUMERABLE_BITS} bits"
            )
        v = self._decode(np.arange(self.num_codes, dtype=np.uint64))
        # Adding +0.0 turns -0.0 into +0.0, so np.unique keeps a single, positive zero.
        return np.unique(v[np.isfinite(v)] + 0.0)

    def _encode_any(self, arr, rounding, saturate, rng):
        _check_rounding(rounding)
        who = f"{self.name}.encode"
        if not isinstance(arr, np.ndarray):
            arr = _tensor_to_numpy(arr, who, codes=False)
        x = _to_float64(arr, who)
        u = _uniforms(rng, x.shape) if rounding == "stochastic" else None
        return self._encode(x, rounding, bool(saturate), u)

    def _check_codes(self, arr):
        who = f"{self.name}.decode"
        if not isinstance(arr, np.ndarray):
            arr = _tensor_to_numpy(arr, who, codes=True)
        if arr.dtype == object and all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in arr.flat
        ):
            ints = [int(c) for c in arr.flat]
            self._check_code_range(min(ints, default=0), max(ints, default=0))
            return np.array(ints, dtype=np.uint64).reshape(arr.shape)
        kind = arr.dtype.kind if arr.dtype.kind in "iu" else _ml_dtypes_kind(arr.dtype)
        if kind not in ("i", "u"):
            raise TypeError(f"{who}: codes must have an integer dtype, got {arr.dtype}")
        if arr.size:
            self._check_code_range(int(arr.min()), int(arr.max()))
        return arr.astype(np.int64).astype(np.uint64) if arr.dtype.kind == "V" else arr.astype(np.uint64)

    def _check_code_range(self, lo, hi):
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(
                f"{self.name}: codes of this {self.bits}-bit format must lie in "
                f"[0, {self.num_codes - 1}], got values from {lo} to {hi}"
            )


@dataclasses.dataclass(frozen=True)
class FloatFormat(NumberFormat):
    """A binary floating-point format (see the module docstring for the encoding).

    ``bias=None`` means 2^(E-1) - 1, or 2^(E-1) for ``specials="fnuz"``.
    ``subnormals=False`` makes exponent field 0 an ordinary binade: no zero, no
    subnormals (E8M0).
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int | None = None
    specials: str = "ieee"
    signed: bool = True
    subnormals: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a format needs a non-empty name")
        for field, low in (("exp_bits", 1), ("man_bits", 0)):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{self.name}: {field} must be an int >= {low}, got {v!r}")
        if self.specials not in SPECIALS:
            raise ValueError(f"{self.name}: specials must be one of {', '.join(SPECIALS)}")
        if not isinstance(self.signed, bool) or not isinstance(self.subnormals, bool):
            raise ValueError(f"{self.name}: signed and subnormals must be bools")
        if self.bias is None:
            default = 2 ** (self.exp_bits - 1) - (self.specials != "fnuz")
            object.__setattr__(self, "bias", default)
        elif not isinstance(self.bias, int) or isinstance(self.bias, bool):
            raise ValueError(f"{self.name}: bias must be an int, got {self.bias!r}")
        if self.specials == "ieee" and (self.man_bits < 1 or self.exp_bits < 2):
            raise ValueError(f"{self.name}: 'ieee' specials need exp_bits >= 2 and man_bits >= 1")
        if self.specials == "fnuz" and not (self.signed and self.subnormals):
            raise ValueError(f"{self.name}: 'fnuz' puts NaN on the -0 code, so it needs a sign and a zero")
        if self.bits > 64 or self.man_bits > 52:
            raise ValueError(f"{self.name}: at most 64 bits and 52 mantissa bits")
        # Decoding and rounding are exact only if every value is a float64.
        if self.emin - self.man_bits < -1074 or self.emax > 1023:
            raise ValueError(f"{self.name}: the value range must lie within float64's")

    # -- layout -----------------------------------------------------------
    @property
    def bits(self):
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def precision(self):
        """Significand bits, the implicit leading one included."""
        return self.man_bits + 1

    @property
    def emin(self):
        """Exponent of the smallest normal binade."""
        return int(self.subnormals) - self.bias

    @property
    def emax(self):
        """Exponent of the largest finite binade."""
        return (self._max_code_magnitude >> self.man_bits) - self.bias

    @property
    def _sign_bit(self):
        return 1 << (self.bits - 1) if self.signed else 0

    @property
    def _max_code_magnitude(self):
        """Code of +max."""
        all_ones = (1 << (self.exp_bits + self.man_bits)) - 1
        return {
            "ieee": all_ones - (1 << self.man_bits),  # exponent all ones is reserved
            "fn": all_ones - 1,                       # only S.1...1.1...1 is reserved
        }.get(self.specials, all_ones)

    # -- specials -----------------------------------------------------------
    @property
    def has_inf(self):
        return self.specials == "ieee"

    @property
    def has_nan(self):
        return self.specials != "none"

    @property
    def has_zero(self):
        return self.subnormals

    @property
    def has_negative_zero(self):
        return self.signed and self.has_zero and self.specials != "fnuz"

    @property
    def inf_codes(self):
        if not self.has_inf:
            return CodeSet()
        pos = ((1 << self.exp_bits) - 1) << self.man_bits
        return CodeSet([range(pos, pos + 1), range(pos + self._sign_bit, pos + self._sign_bit + 1)])

    @property
    def nan_codes(self):
        top = 1 << (self.exp_bits + self.man_bits)
        if self.specials == "ieee":
            first = ((1 << self.exp_bits) - 1) << self.man_bits | 1
            spans = [range(first, top)]
        elif self.specials == "fn":
            spans = [range(top - 1, top)]
        elif self.specials == "fnuz":
            return CodeSet([range(self._sign_bit, self._sign_bit + 1)])
        else:
            return CodeSet()
        if self.signed:
            spans.append(range(spans[0].start + self._sign_bit, spans[0].stop + self._sign_bit))
        return CodeSet(spans)

    @property
    def nan_code(self):
        """Canonical (positive, quiet) NaN code that encode produces."""
        if not self.has_nan:
            return None
        if self.specials == "ieee":
            return self.inf_codes[0] | (1 << (self.man_bits - 1))
        return self.nan_codes[0]

    # -- range --------------------------------------------------------------
    def _field_value(self, exp_field, man_field):
        if self.subnormals and exp_field == 0:
            return math.ldexp(man_field, self.emin - self.man_bits)
        return math.ldexp((1 << self.man_bits) + man_field, exp_field - self.bias - self.man_bits)

    @property
    def max(self):
        c = self._max_code_magnitude
        return self._field_value(c >> self.man_bits, c & ((1 << self.man_bits) - 1))

    @property
    def min(self):
        """Most negative value (the smallest value in unsigned formats)."""
        if self.signed:
            return -self.max
        return 0.0 if self.has_zero else self.min_normal

    @property
    def min_normal(self):
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self):
        """Smallest positive subnormal; None where there are none."""
        if not self.subnormals or self.man_bits == 0:
            return None
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def eps(self):
        """Machine epsilon: the gap between 1 and the next larger value.

        2^-man_bits when 1 is a normal number, as in every named format; in a user-defined format
        whose 1.0 falls among the subnormals the gap is the subnormal spacing, and where 1 or the
        value above it is out of range there is no such gap: None.
        """
        if self.subnormals and self.emin > 0:  # 1.0 lies below the normal range
            gap = math.ldexp(1.0, self.emin - self.man_bits)
        else:
            gap = math.ldexp(1.0, -self.man_bits)
        return gap if 1.0 + gap <= self.max and 1.0 >= self.min_positive else None

    # -- decode / encode ------------------------------------------------------
    def _decode(self, c):
        m, e = self.man_bits, self.exp_bits
        man = (c & np.uint64((1 << m) - 1)).astype(np.int64)
        expf = ((c >> np.uint64(m)) & np.uint64((1 << e) - 1)).astype(np.int64)
        sig = man + (1 << m)
        scale = expf - (self.bias + m)
        if self.subnormals:
            sub = expf == 0
            sig = np.where(sub, man, sig)
            scale = np.where(sub, self.emin - m, scale)
        with np.errstate(over="ignore"):  # fp64's reserved top exponent; replaced below
            val = np.ldexp(sig.astype(np.float64), scale.astype(np.int32))
        if self.signed:
            val = np.where(c & np.uint64(self._sign_bit) != 0, -val, val)
        if self.specials == "ieee":
            top = expf == (1 << e) - 1
            val = np.where(top, np.where(man == 0, np.copysign(np.inf, val), np.nan), val)
        elif self.specials == "fn":
            body = (1 << (e + m)) - 1
            val = np.where(c & np.uint64(body) == body, np.nan, val)
        elif self.specials == "fnuz":
            val = np.where(c == self._sign_bit, np.nan, val)
        return val

    def _encode(self, x, rounding, saturate, u):
        m = self.man_bits
        nan = np.isnan(x)
        if not self.has_nan and nan.any():
            raise ValueError(
                f"{self.name} has no NaN encoding, so NaN inputs cannot be encoded "
                f"({int(nan.sum())} NaN value(s) found)"
            )
        neg = np.signbit(x) & ~nan
        a = np.abs(x)
        inf = np.isinf(a)
        a = np.where(nan | inf, 0.0, a)

        # Round the magnitude on the grid of its own binade (never below emin):
        # y = a / ulp is exact, so a single integer rounding of y is the only one.
        _, frexp_exp = np.frexp(a)
        e = np.maximum(frexp_exp.astype(np.int64) - 1, self.emin)
        y = np.ldexp(a, (m - e).astype(np.int32))
        r = _round_integral(y, rounding, u)
        carry = r >= 2.0 ** (m + 1)
        e = e + carry
        r = np.where(carry, r * 0.5, r)
        if not self.subnormals:
            # Nothing lies below the smallest binade, not even zero.
            r = np.maximum(r, 2.0 ** m)
        with np.errstate(over="ignore"):
            v = np.ldexp(r, (e - m).astype(np.int32))
        normal = r >= 2.0 ** m
        overflow = (v > self.max) & ~inf & ~nan
        ok = ~(overflow | inf | nan)
        zero = ok & (r == 0)

        expf = np.where(ok & normal, e + self.bias, 0).astype(np.uint64)
        manf = np.where(ok, np.where(normal, r - 2.0 ** m, r), 0).astype(np.uint64)
        code = (expf << np.uint64(m)) | manf

        max_code = self._max_code_magnitude
        if saturate or rounding == "toward_zero" or not (self.has_inf or self.has_nan):
            overflow_code = max_code
        else:
            overflow_code = self.inf_codes[0] if self.has_inf else self.nan_code
        if self.has_inf and not saturate:
            inf_code = self.inf_codes[0]
        else:
            inf_code = self.nan_code if self.has_nan and not saturate else max_code
        code = np.where(overflow, overflow_code, code)
        code = np.where(inf, inf_code, code).astype(np.uint64)

        if self.signed:
            signed_result = ~zero | self.has_negative_zero
            if self.has_nan:
                signed_result &= code != self.nan_code
            code = np.where(neg & signed_result, code | np.uint64(self._sign_bit), code)
        else:
            # Out of an unsigned format's range: NaN where it has one, else its
            # smallest value, which is code 0 in every unsigned format.
            below = neg & ~zero
            if not self.has_zero:
                below |= (a == 0) & ~inf & ~nan
            if self.has_nan:
                code = np.where(below, self.nan_code, code)
            elif not self.has_zero and below.any():
                raise ValueError(f"{self.name} has neither zero nor NaN to encode 0 or negative values")
            else:
                code = np.where(below, 0, code)
        if self.has_nan:
            code = np.where(nan, self.nan_code, code)
        return code.astype(np.uint64)


@dataclasses.dataclass(frozen=True)
class IntFormat(NumberFormat):
    """A two's complement (signed) or plain binary (unsigned) integer format."""

    name: str
    bits: int
    signed: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a format needs a non-empty name")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 53:
            raise ValueError(f"{self.name}: bits must be an int in [1, 53] (values are exact in float64)")
        if not isinstance(self.signed, bool):
            raise ValueError(f"{self.name}: signed must be a bool")

    exp_bits = property(lambda self: 0)
    man_bits = property(lambda self: self.bits - int(self.signed), doc="Magnitude bits.")
    bias = property(lambda self: None)
    has_inf = property(lambda self: False)
    has_nan = property(lambda self: False)
    has_zero = property(lambda self: True)
    has_negative_zero = property(lambda self: False)
    inf_codes = property(lambda self: CodeSet())
    nan_codes = property(lambda self: CodeSet())
    nan_code = property(lambda self: None)
    min_normal = property(lambda self: None, doc="None: integers have no exponent.")
    min_subnormal = property(lambda self: None)
    eps = property(lambda self: 1.0)

    @property
    def max(self):
        return float((1 << (self.bits - int(self.signed))) - 1)

    @property
    def min(self):
        return float(-(1 << (self.bits - 1))) if self.signed else 0.0

    def _decode(self, c):
        v = c.astype(np.int64)
        if self.signed:
            v = np.where(v >= 1 << (self.bits - 1), v - (1 << self.bits), v)
        return v.astype(np.float64)

    def _encode(self, x, rounding, saturate, u):
        if np.isnan(x).any():
            raise ValueError(f"{self.name} has no NaN encoding, so NaN inputs cannot be encoded")
        # Anything beyond 2^bits clamps anyway; capping first keeps Inf out of the rounding.
        a = np.minimum(np.abs(x), 2.0 ** self.bits)
        r = _round_integral(a, rounding, u)
        v = np.clip(np.where(x < 0, -r, r), self.min, self.max)
        return (v.astype(np.int64) & ((1 << self.bits) - 1)).astype(np.uint64)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

class UnknownFormatError(KeyError, ValueError):
    """An unknown format name (catchable as KeyError or ValueError)."""

    def __str__(self):
        return str(self.args[0])


FORMATS = types.MappingProxyType({
    f.name: f
    for f in (
        FloatFormat("fp64", 11, 52),
        FloatFormat("fp32", 8, 23),
        FloatFormat("tf32", 8, 10),
        FloatFormat("fp16", 5, 10),
        FloatFormat("bf16", 8, 7),
        FloatFormat("fp8_e4m3", 4, 3, specials="fn"),
        FloatFormat("fp8_e5m2", 5, 2),
        FloatFormat("fp8_e4m3fnuz", 4, 3, specials="fnuz"),
        FloatFormat("fp8_e5m2fnuz", 5, 2, specials="fnuz"),
        FloatFormat("fp6_e2m3", 2, 3, specials="none"),
        FloatFormat("fp6_e3m2", 3, 2, specials="none"),
        FloatFormat("fp4_e2m1", 2, 1, specials="none"),
        FloatFormat("e8m0", 8, 0, bias=127, specials="fn", signed=False, subnormals=False),
        IntFormat("int8", 8),
        IntFormat("int4", 4),
        IntFormat("uint4", 4, signed=False),
        IntFormat("int2", 2),
    )
})


def list_formats():
    """Names of the built-in formats, widest float first, integers last."""
    return list(FORMATS)


def get_format(name):
    """The built-in format called ``name`` (a NumberFormat is returned unchanged)."""
    if isinstance(name, NumberFormat):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UnknownFormatError(
            f"unknown format {name!r}; known formats: {', '.join(FORMATS)}"
        ) from None


# --------------------------------------------------------------------------
# Spec table
# --------------------------------------------------------------------------

def _num(v):
    """Deterministic text for a non-negative table entry: 2^k for far powers of two, else %.6g."""
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    if v == 0:
        return "0"
    mant, k = math.frexp(v)
    if mant == 0.5 and not -4 <= k - 1 <= 10:
        return f"2^{k - 1}"
    return "%.6g" % v


def _bit_run(bit, n):
    return bit * n if n <= 8 else f"{bit}..{bit}"


def _pattern(fmt, exp, man):
    parts = (["S"] if fmt.signed else []) + [exp] + ([man] if fmt.man_bits else [])
    return ".".join(parts)


def _spec_row(fmt):
    if isinstance(fmt, IntFormat):
        layout, inf, nan = ("int" if fmt.signed else "uint"), "-", "-"
    else:
        layout = f"{int(fmt.signed)}/{fmt.exp_bits}/{fmt.man_bits}"
        ones, e, m = _bit_run("1", fmt.exp_bits), fmt.exp_bits, fmt.man_bits
        inf = _pattern(fmt, ones, _bit_run("0", m)) if fmt.has_inf else "-"
        nan = {
            "ieee": _pattern(fmt, ones, "nonzero"),
            "fn": _pattern(fmt, ones, _bit_run("1", m)),
            "fnuz": "1." + _bit_run("0", e) + "." + _bit_run("0", m),
            "none": "-",
        }[fmt.specials]
    return {
        "name": fmt.name,
        "bits": fmt.bits,
        "S/E/M": layout,
        "bias": fmt.bias,
        "max": fmt.max,
        "min normal": fmt.min_normal,
        "min subnormal": fmt.min_subnormal,
        "eps": fmt.eps,
        "finite codes": fmt.num_finite,
        "binades": fmt.dynamic_range_binades,
        "Inf": inf,
        "NaN": nan,
    }


class FormatTable(list):
    """Rows (dicts) of format properties; ``str()`` renders a plain-text table."""

    def __str__(self):
        if not self:
            return ""
        headers = list(self[0])
        cells = [
            ["%.2f" % v if h == "binades" else v if isinstance(v, str) else _num(v)
             for h, v in row.items()]
            for row in self
        ]
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        left = {"name", "S/E/M", "Inf", "NaN"}

        def line(items):
            return "  ".join(
                s.ljust(w) if h in left else s.rjust(w) for h, s, w in zip(headers, items, widths)
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(headers), rule] + [line(r) for r in cells])

    __repr__ = __str__


def describe(names=None):
    """Spec table of the named formats (names or NumberFormats; default: all built-in)."""
    return FormatTable(_spec_row(get_format(n)) for n in (list_formats() if names is None else names))


# --------------------------------------------------------------------------
# Bit fields
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BitFields:
    """The fields of one code.  Integer formats leave sign/exponent/mantissa
    empty (their fields are None): the whole code is in ``bits``."""

    format: str
    code: int
    bits: str
    sign: str
    exponent: str
    mantissa: str
    sign_value: int | None
    exponent_value: int | None
    mantissa_value: int | None
    value: float
    is_zero: bool
    is_subnormal: bool
    is_inf: bool
    is_nan: bool
    formula: str

    @property
    def layout(self):
        """Fields separated by spaces, e.g. '0 1000 101'."""
        return " ".join(p for p in (self.sign, self.exponent, self.mantissa) if p) or self.bits

    def __str__(self):
        return f"{self.format} {self.layout}: {self.formula}"


def _single(result, what):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(result, torch.Tensor):
        result = result.cpu().numpy()
    arr = np.asarray(result)
    if arr.size != 1:
        raise ValueError(f"bit_fields describes one {what}, got {arr.size}")
    return arr.reshape(())


def bit_fields(fmt, x=None, code=None):
    """Sign, exponent and mantissa of one value (encoded with default settings) or code."""
    fmt = get_format(fmt)
    if (x is None) == (code is None):
        raise TypeError("bit_fields takes exactly one of x= or code=")
    if code is None:
        code = _single(fmt.encode(x), "value")
    code = _single(code, "code")
    value = float(fmt.decode(code))  # also checks the code's type and range
    code = int(code)
    bits = format(code, f"0{fmt.bits}b")
    shown = repr(value) if isinstance(fmt, FloatFormat) else str(int(value))
    if isinstance(fmt, IntFormat):
        body = f"0b{bits[1:]}" if fmt.bits > 1 else "0"
        formula = (f"-2^{fmt.bits - 1}·{bits[0]} + {body}" if fmt.signed else f"0b{bits}") + f" = {shown}"
        return BitFields(fmt.name, code, bits, "", "", "", None, None, None, value,
                         value == 0, False, False, False, formula)
    s = int(fmt.signed)
    sign, exponent, mantissa = bits[:s], bits[s:s + fmt.exp_bits], bits[s + fmt.exp_bits:]
    sv = int(sign, 2) if sign else None
    ev, mv = int(exponent, 2), int(mantissa or "0", 2)
    is_nan, is_inf = math.isnan(value), math.isinf(value)
    is_zero = value == 0
    is_sub = fmt.subnormals and ev == 0 and not is_zero and not is_nan
    prefix = f"(-1)^{sv} · " if sign else ""
    if is_nan:
        formula = "NaN"
    elif is_inf:
        formula = f"{prefix}Inf = {shown}"
    else:
        low = fmt.subnormals and ev == 0
        power = f"2^({1 if low else ev}-{fmt.bias})"
        frac = f" · ({0 if low else 1} + {mv}/{1 << fmt.man_bits})" if fmt.man_bits else ""
        formula = f"{prefix}{power}{frac} = {shown}"
    return BitFields(fmt.name, code, bits, sign, exponent, mantissa, sv, ev, mv, value,
                     is_zero, is_sub, is_inf, is_nan, formula)
