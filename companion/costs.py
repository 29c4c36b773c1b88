"""What a number format costs: bytes to store, bytes moved per FLOP, and the roofline.

Every function here takes number formats the way the rest of the package names them (``"bf16"``,
``"fp8_e4m3"``, a :class:`companion.formats.NumberFormat`) and reads their width from
:mod:`companion.formats`, so a table of costs can never disagree with the formats' definitions. Where
a block format spends extra bits on shared scales (MXFP4: 4 + 8/32 bits per element, see
:func:`companion.mx.bits_per_element`), pass the bits per element as a number instead of a format.

Conventions
-----------
* A multiply-add is two FLOPs, so C = A @ B with A m×k and B k×n costs ``2·m·n·k`` FLOPs.
* The bytes of a kernel are its **compulsory traffic**: every input read once and every output
  written once. A real kernel moves at least that much, so the arithmetic intensity computed here,
  FLOPs per byte, is the most a kernel of that shape can reach.
* The roofline {Williams, Waterman and Patterson, CACM 2009}: a kernel of intensity ``I`` on a device
  with peak ``P`` FLOP/s and memory bandwidth ``B`` byte/s runs at most at ``min(P, I·B)``.

Transformer shapes
------------------
:func:`transformer_block_flops` counts the matrix-multiply FLOPs of one transformer block by
operation, analytically; :mod:`companion.transformer` builds the same block from ``torch.nn`` modules
so that PyTorch's FLOP counter can check these formulas. :func:`llama_parameters` counts the
weights of a LLaMA-style decoder (RMSNorm, SwiGLU, no biases, untied embeddings).
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Real

import numpy as np

from companion.formats import FloatFormat, NumberFormat, get_format

__all__ = [
    "element_bits",
    "storage_bytes",
    "elementwise_intensity",
    "gemm_flops",
    "gemm_bytes",
    "gemm_intensity",
    "gemv_intensity",
    "ridge_point",
    "attainable_flops",
    "roofline_time",
    "significand_bits",
    "partial_products",
    "transformer_block_flops",
    "llama_intermediate_size",
    "llama_parameters",
]


# --------------------------------------------------------------------------
# Bits and bytes
# --------------------------------------------------------------------------

def element_bits(fmt) -> Fraction:
    """Storage bits of one element: ``fmt.bits`` for a format (or its name), or a positive number
    of bits per element passed through unchanged (for block formats, whose scales add a fraction)."""
    if isinstance(fmt, (str, NumberFormat)):
        return Fraction(get_format(fmt).bits)
    if isinstance(fmt, Real) and not isinstance(fmt, bool) and fmt > 0:
        return Fraction(fmt)
    raise TypeError(f"expected a number format, its name, or a positive number of bits; got {fmt!r}")


def storage_bytes(num_elements, fmt) -> float:
    """Bytes that ``num_elements`` values take in ``fmt`` (packed, no padding)."""
    if num_elements < 0:
        raise ValueError(f"num_elements must be non-negative, got {num_elements!r}")
    return float(Fraction(num_elements) * element_bits(fmt) / 8)


def _bytes_per_element(fmt) -> float:
    return float(element_bits(fmt) / 8)


# --------------------------------------------------------------------------
# Arithmetic intensity: FLOPs per byte of compulsory traffic
# --------------------------------------------------------------------------

def elementwise_intensity(fmt, *, inputs: int = 2, outputs: int = 1, flops_per_element: float = 1.0,
                          out_format=None) -> float:
    """FLOPs per byte of an elementwise operation: each output element costs ``flops_per_element``
    and needs ``inputs`` elements read (in ``fmt``) and ``outputs`` written (in ``out_format``,
    default ``fmt``). Independent of the tensor size: no element is used twice.

    The default, ``z = x + y``, is one FLOP per three elements moved.
    """
    out_format = fmt if out_format is None else out_format
    moved = inputs * _bytes_per_element(fmt) + outputs * _bytes_per_element(out_format)
    return flops_per_element / moved


def gemm_flops(m, n, k):
    """FLOPs of C = A @ B with A m×k and B k×n: one multiply and one add per term, 2·m·n·k."""
    return 2 * m * n * k


def gemm_bytes(m, n, k, a_format, b_format=None, c_format=None):
    """Compulsory traffic of C = A @ B: A (m×k), B (k×n) read once, C (m×n) written once.

    ``b_format`` and ``c_format`` default to ``a_format``. Works elementwise on NumPy arrays of sizes.
    """
    b_format = a_format if b_format is None else b_format
    c_format = a_format if c_format is None else c_format
    return (m * k * _bytes_per_element(a_format) + k * n * _bytes_per_element(b_format)
            + m * n * _bytes_per_element(c_format))


def gemm_intensity(m, n, k, a_format, b_format=None, c_format=None):
    """Most FLOPs per byte a GEMM of this shape can reach: gemm_flops / gemm_bytes.

    For square n×n×n GEMMs in one format of b bytes it is 2n/(3b): it grows with the size, which is
    why large GEMMs can be compute-bound. With m = 1 (one token) it is the GEMV's, about 2/b.
    """
    return gemm_flops(m, n, k) / gemm_bytes(m, n, k, a_format, b_format, c_format)


def tile_bytes_per_flop(block_m, block_n, a_format, b_format=None):
    """Operand bytes a GEMM kernel loads per FLOP when each program computes a block_m × block_n tile of
    C: per step along K it reads block_m elements of A and block_n of B for 2·block_m·block_n FLOPs, so
    (block_m·a + block_n·b) / (2·block_m·block_n) for a and b bytes per element -- the traffic from L2 (or
    HBM) into shared memory that larger tiles cut. ``b_format`` defaults to ``a_format``."""
    b_format = a_format if b_format is None else b_format
    return ((block_m * _bytes_per_element(a_format) + block_n * _bytes_per_element(b_format))
            / (2 * block_m * block_n))


def gemv_intensity(n, k, weight_format, activation_format=None, out_format=None):
    """y = W x with W n×k in ``weight_format`` and x, y in ``activation_format`` (default: the
    weight's): a GEMM with one column, so every weight is read once and used for one multiply-add."""
    activation_format = weight_format if activation_format is None else activation_format
    out_format = activation_format if out_format is None else out_format
    # As a GEMM: A = x^T (1×k), B = W^T (k×n), C = y^T (1×n).
    return gemm_intensity(1, n, k, activation_format, weight_format, out_format)


# --------------------------------------------------------------------------
# The roofline
# --------------------------------------------------------------------------

def ridge_point(peak_flops, bandwidth):
    """Intensity (FLOP/byte) above which a kernel can be compute-bound: peak / bandwidth."""
    return peak_flops / bandwidth


def attainable_flops(intensity, peak_flops, bandwidth):
    """The roofline: min(peak, intensity · bandwidth) FLOP/s; NumPy arrays welcome."""
    return np.minimum(peak_flops, np.asarray(intensity, dtype=np.float64) * bandwidth)


def roofline_time(flops, nbytes, peak_flops, bandwidth):
    """Least time (s) for a kernel that does ``flops`` and moves ``nbytes``: the slower of the two."""
    return np.maximum(np.asarray(flops, dtype=np.float64) / peak_flops,
                      np.asarray(nbytes, dtype=np.float64) / bandwidth)


# --------------------------------------------------------------------------
# Multipliers
# --------------------------------------------------------------------------

def significand_bits(fmt) -> int:
    """Width of the operand a multiplier array sees: m + 1 for a float with m mantissa bits (the
    hidden leading 1 takes part in the product; E8M0 has only it), ``bits`` for an integer."""
    fmt = get_format(fmt)
    if isinstance(fmt, FloatFormat):
        return fmt.man_bits + 1
    return fmt.bits


def partial_products(a_format, b_format=None) -> int:
    """Partial-product bits of an array multiplier for a × b: one AND gate (and about one full
    adder to sum it) per pair of significand bits, (m_a + 1)·(m_b + 1) for floats."""
    b_format = a_format if b_format is None else b_format
    return significand_bits(a_format) * significand_bits(b_format)


# --------------------------------------------------------------------------
# Transformers
# --------------------------------------------------------------------------

def transformer_block_flops(seq: int, hidden: int, heads: int, intermediate: int, *,
                            mlp: str = "gelu", batch: int = 1) -> dict[str, int]:
    """Matrix-multiply FLOPs of one transformer block on ``batch`` sequences of ``seq`` tokens.

    Multi-head attention (``heads`` heads of size hidden / heads) with full (unmasked) score
    matrices, then an MLP: ``mlp="gelu"`` has two matrices (up, down), ``"swiglu"`` three (gate,
    up, down). Keys are the operations of :mod:`companion.transformer`'s block; the elementwise
    work (norms, softmax, activation, residuals) is not included.
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if mlp not in ("gelu", "swiglu"):
        raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
    tokens = batch * seq
    head_dim = hidden // heads
    mlp_matrices = 2 if mlp == "gelu" else 3
    return {
        "QKV projections": 3 * gemm_flops(tokens, hidden, hidden),
        "attention scores QKᵀ": batch * heads * gemm_flops(seq, seq, head_dim),
        "attention × V": batch * heads * gemm_flops(seq, head_dim, seq),
        "output projection": gemm_flops(tokens, hidden, hidden),
        "MLP matmuls": mlp_matrices * gemm_flops(tokens, intermediate, hidden),
    }


def llama_intermediate_size(hidden: int, multiple_of: int = 256) -> int:
    """SwiGLU width of LLaMA: 2/3 of 4·hidden, rounded up to a multiple of ``multiple_of``."""
    return multiple_of * math.ceil(Fraction(8 * hidden, 3) / multiple_of)


def llama_parameters(hidden: int, layers: int, vocab: int, intermediate: int | None = None) -> dict[str, int]:
    """Weights of a LLaMA-style decoder: untied input embedding and output head, per layer four
    hidden×hidden attention matrices, three SwiGLU matrices and two RMSNorm weight vectors, and a
    final RMSNorm. Returns the parts and their ``"total"``.
    """
    intermediate = llama_intermediate_size(hidden) if intermediate is None else intermediate
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    parts = {
        "embedding": vocab * hidden,
        "layers": layers * per_layer,
        "final norm": hidden,
        "output head": vocab * hidden,
    }
    parts["total"] = sum(parts.values())
    return parts
