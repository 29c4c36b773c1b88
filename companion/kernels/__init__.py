"""Triton kernels, each beside the companion reference it must equal bit for bit.

Importing this package first imports :mod:`companion.runtime`, which decides whether the kernels run
compiled on the GPU or under the Triton interpreter on the CPU.
"""
from companion import runtime  # noqa: F401  (must precede every triton.jit below)
from companion.kernels.dequantize import dequantize_fp8_blockwise, dequantize_mx, dequantize_nvfp4
from companion.kernels.fp4_gemm import mxfp4_matmul, w4a16_matmul
from companion.kernels.fp8_blockwise import fp8_blockwise_reference, quantize_fp8_blockwise
from companion.kernels.fp8_gemm import fp8_blockwise_matmul, fp8_blockwise_matmul_reference, fp8_rowwise_matmul
from companion.kernels.mx_quant import quantize_mx_rows, quantize_mx_rows_and_columns
from companion.kernels.nvfp4_quant import nvfp4_reference, quantize_nvfp4_kernel
from companion.kernels.round_bf16 import round_to_bf16, round_to_bf16_reference

__all__ = [
    "round_to_bf16", "round_to_bf16_reference",
    "fp8_blockwise_matmul", "fp8_rowwise_matmul", "fp8_blockwise_matmul_reference", "w4a16_matmul", "mxfp4_matmul",
    "quantize_fp8_blockwise", "fp8_blockwise_reference", "dequantize_fp8_blockwise",
    "quantize_mx_rows", "quantize_mx_rows_and_columns", "dequantize_mx",
    "quantize_nvfp4_kernel", "nvfp4_reference", "dequantize_nvfp4",
]
