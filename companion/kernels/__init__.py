"""Triton kernels, each beside the companion reference it must equal bit for bit.

Importing this package first imports :mod:`companion.runtime`, which decides whether the kernels run
compiled on the GPU or under the Triton interpreter on the CPU.
"""
from companion import runtime  # noqa: F401  (must precede every triton.jit below)
from companion.kernels.round_bf16 import round_to_bf16, round_to_bf16_reference

__all__ = ["round_to_bf16", "round_to_bf16_reference"]
