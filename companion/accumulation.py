"""Accumulating a dot product in a narrow format: reference simulations of what GEMM hardware adds.

Every element of a matrix product is a dot product, ``c = a_1 b_1 + a_2 b_2 + ... + a_K b_K``, and the
hardware computes it in two parts: the products, and the running sum they are added into, the
**accumulator**. Low-precision GEMMs take narrow inputs, but how accurate ``c`` is depends mostly on the
accumulator: each addition rounds the running sum to the accumulator's format, and K additions add up
K rounding errors. This module simulates that running sum, exactly as defined below, for many dot
products at once (vectorised over every axis but the last), so that error-versus-K experiments run in
seconds on a CPU.

The models
----------
:func:`accumulate` adds ``terms`` (``(..., K)``) along the last axis with ``s`` starting at zero:

* **Sequential** (``chunk=1``): ``s <- round(s + t_i)`` for i = 1..K, the textbook recursive summation
  whose error Higham analyses {Higham, SIAM J. Sci. Comput. 14(4), 1993}.
* **In groups** (``chunk=c``), a model of a Tensor Core: the c terms of a group are added exactly and
  the group's sum enters the accumulator with one rounding, ``s <- round(s + t_1 + ... + t_c)``. With
  ``align_bits=b`` the terms of a group are first aligned to the exponent of the largest and truncated
  to ``b`` bits below its leading bit — what the DeepSeek-V3 report describes for the FP8 Tensor
  Cores of Hopper: "After aligning 32 mantissa products by right-shifting based on the maximum
  exponent, the Tensor Core only uses the highest 14 bits of each mantissa product for addition, and
  truncates bits exceeding this range. The accumulation of addition results into registers also
  employs 14-bit precision." {DeepSeek-AI, arXiv 2412.19437, section 3.5.2}. That is ``chunk=32,
  align_bits=14`` and an accumulator with a 14-bit significand, ``accumulator=13``. How the register
  rounds is not documented; ``rounding`` chooses nearest-even (default) or toward zero.
* **Promotion** (``promote_every=n``, a multiple of ``chunk``): every n terms the partial sum is added
  into an FP32 total (one float32 rounding, as CUDA cores add) and restarts from zero; the last partial
  sum is added at the end. DeepSeek-V3 promotes every 128 elements, four WGMMA instructions
  {DeepSeek-AI, arXiv 2412.19437, section 3.3.2}. Without promotion the result is the accumulator's.

The accumulator is a format of :mod:`companion.formats` (``"fp32"``, ``"fp16"``, ``"bf16"``, or any
``FloatFormat``), with its exponent range, subnormals and overflow; or an integer ``p``: a float with p
mantissa bits whose exponent never limits (a ``FloatFormat`` with float64's 11 exponent bits).

One rounding per addition
-------------------------
``round(s + t)`` means the exact sum rounded once. Computing ``s + t`` in float64 first would round
twice whenever the exact sum needs more than 53 bits. So the float64 sum is replaced by its
*round-to-odd* value — the float64 neighbour with an odd last bit when the sum is inexact (its error
is recovered exactly with TwoSum) — and a second rounding of a round-to-odd value to a format with at
most 51 significand bits equals one rounding of the exact sum {Boldo and Melquiond, IEEE Trans.
Computers 57(4), 2008}. Hence accumulators have at most 50 mantissa bits.

A group's sum is formed in float64: exactly after alignment (b-bit terms on one grid, at most
2^(53 - b) of them), otherwise with float64's relative error 2^-53, far below any accumulator's.
:func:`dot` and :func:`matmul` take inputs that float32 represents (float32, bfloat16, float16, FP8
values), so every product is exact in float64.
"""
from __future__ import annotations

import numbers

import numpy as np

from companion.formats import FloatFormat, get_format

__all__ = ["ROUNDINGS", "accumulator_format", "accumulate", "dot", "matmul"]

ROUNDINGS = ("nearest_even", "toward_zero")
MAX_MANTISSA_BITS = 50  # one rounding of a round-to-odd float64 is exact for <= 51 significand bits
_FP32 = get_format("fp32")


def accumulator_format(accumulator) -> FloatFormat:
    """The format a running sum is kept in: a float format or its name, or an int p for a float with
    p mantissa bits and an exponent range that never limits (11 exponent bits, as float64)."""
    if isinstance(accumulator, numbers.Integral) and not isinstance(accumulator, bool):
        p = int(accumulator)
        if not 1 <= p <= MAX_MANTISSA_BITS:
            raise ValueError(f"an accumulator of p mantissa bits needs 1 <= p <= {MAX_MANTISSA_BITS}, got {p}")
        return FloatFormat(f"p{p}", 11, p)
    fmt = get_format(accumulator)  # raises for an unknown name
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"the accumulator must be a float format, got {fmt.name}")
    if fmt.man_bits > MAX_MANTISSA_BITS:
        raise ValueError(f"{fmt.name} has {fmt.man_bits} mantissa bits; the model simulates at most {MAX_MANTISSA_BITS}")
    return fmt


def _as_float64(x, who) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device and of any float dtype
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{who}: expected real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _round_sum(fmt, s, t, rounding):
    """``fmt.round(s + t)`` with the exact sum rounded once (see the module docstring)."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in TwoSum; such sums are not adjusted
        hi = s + t
        z = hi - s
        lo = (s - (hi - z)) + (t - z)  # TwoSum: s + t == hi + lo exactly
        inexact = (lo != 0) & np.isfinite(hi)
    even = (hi.view(np.int64) & 1) == 0
    odd = np.where(inexact & even, np.nextafter(hi, np.where(lo > 0, np.inf, -np.inf)), hi)
    return fmt.round(odd, rounding=rounding)


def _aligned(group, align_bits):
    """Truncate each term toward zero to ``align_bits`` bits below the leading bit of the group's largest."""
    _, exponent = np.frexp(np.max(np.abs(group), axis=-1, keepdims=True))  # largest < 2^exponent
    quantum = np.ldexp(1.0, exponent - align_bits)
    return np.trunc(group / quantum) * quantum


def _check_positive_int(value, name):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def accumulate(terms, accumulator="fp32", *, chunk=1, align_bits=None, rounding="nearest_even",
               promote_every=None, checkpoints=None) -> np.ndarray:
    """Sum ``terms`` along the last axis in an accumulator of the given format; float64 results.

    ``terms``: ``(..., K)`` real numbers (NumPy or torch), taken exactly. ``chunk``, ``align_bits``,
    ``rounding`` and ``promote_every`` select the model (module docstring). Returns the sums,
    ``(...)``; with ``checkpoints`` (increasing term counts, each a multiple of ``chunk`` or K), the
    sums of the first k terms for each k, ``(..., len(checkpoints))``, from one pass.
    """
    fmt = accumulator_format(accumulator)
    t = _as_float64(terms, "accumulate")
    if t.ndim == 0 or t.shape[-1] == 0:
        raise ValueError(f"accumulate: terms need a last axis with at least one term, got shape {t.shape}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    chunk = _check_positive_int(chunk, "chunk")
    if align_bits is not None:
        align_bits = _check_positive_int(align_bits, "align_bits")
        if chunk > 2 ** (53 - align_bits):
            raise ValueError(f"chunk {chunk} of {align_bits}-bit terms would not add exactly in float64")
    if promote_every is not None:
        promote_every = _check_positive_int(promote_every, "promote_every")
        if promote_every % chunk:
            raise ValueError(f"promote_every ({promote_every}) must be a multiple of chunk ({chunk})")
    k_total = t.shape[-1]
    wanted = [k_total] if checkpoints is None else [int(k) for k in checkpoints]
    if not wanted or any(b <= a for a, b in zip(wanted, wanted[1:])) or not 1 <= wanted[0] <= wanted[-1] <= k_total \
            or any(k % chunk and k != k_total for k in wanted):
        raise ValueError(f"checkpoints must increase within [1, {k_total}], each a multiple of chunk ({chunk}) "
                         f"or {k_total}; got {checkpoints!r}")

    groups = -(-k_total // chunk)
    padded = np.zeros(t.shape[:-1] + (groups * chunk,))
    padded[..., :k_total] = t  # zeros added to a sum change nothing
    blocks = padded.reshape(t.shape[:-1] + (groups, chunk))
    with np.errstate(invalid="ignore"):  # inf - inf in a group gives NaN, as the sum would
        if align_bits is not None:
            blocks = _aligned(blocks, align_bits)
        group_sums = blocks.sum(axis=-1) if chunk > 1 else blocks[..., 0]

    s = np.zeros(t.shape[:-1])
    total = np.zeros(t.shape[:-1]) if promote_every else None
    out = []
    for g in range(groups):
        s = _round_sum(fmt, s, group_sums[..., g], rounding)
        done = min((g + 1) * chunk, k_total)
        if promote_every and done % promote_every == 0:
            total, s = _round_sum(_FP32, total, s, "nearest_even"), np.zeros_like(s)
        if done == wanted[len(out)]:
            out.append(_round_sum(_FP32, total, s, "nearest_even") if promote_every else s)
            if len(out) == len(wanted):
                break
    return out[0] if checkpoints is None else np.stack(out, axis=-1)


def _exact_products(a, b, who):
    a, b = _as_float64(a, who), _as_float64(b, who)
    for name, x in (("a", a), ("b", b)):
        if not np.array_equal(x.astype(np.float32).astype(np.float64), x, equal_nan=True):
            raise ValueError(f"{who}: {name} holds values float32 cannot represent, whose products "
                             "would not be exact; round the inputs to the format they are stored in")
    return a, b


def dot(a, b, accumulator="fp32", **model) -> np.ndarray:
    """Dot products along the last axis, ``(..., K) x (..., K) -> (...)``: exact products, then
    :func:`accumulate` with ``accumulator`` and the keyword arguments of the model."""
    a, b = _exact_products(a, b, "dot")
    return accumulate(a * b, accumulator, **model)


def matmul(a, b, accumulator="fp32", **model) -> np.ndarray:
    """C = A B with A ``(M, K)`` and B ``(K, N)``, every element a dot product accumulated as in
    :func:`accumulate`. Holds all M·N·K products in memory: meant for small shapes."""
    a, b = _exact_products(a, b, "matmul")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: expected A (M, K) and B (K, N), got shapes {a.shape} and {b.shape}")
    return accumulate(a[:, None, :] * b.T[None, :, :], accumulator, **model)  # (M, N, K) -> (M, N)
