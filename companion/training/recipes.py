"""Recipes for fully quantized training: how each operand of a linear layer's three GEMMs is quantized.

A linear layer ``Y = X W^T`` (X: tokens x in, W: out x in) runs three matrix products per step:

    forward    Y  = X  W^T     contraction over in   (K)   X along axis 1, W along axis 1
    dgrad      dX = dY W       contraction over out  (N)   dY along axis 1, W along axis 0
    wgrad      dW = dY^T X     contraction over tokens (M) dY along axis 0, X along axis 0

A block scale can only be pulled out of a dot product if it is constant along that product's
contraction axis, so each operand is quantized with its blocks running along the contraction axis of
the GEMM it feeds. The same tensor therefore needs different blocks in different GEMMs: W is blocked
along its rows for the forward product and along its columns for dgrad; X and dY are blocked along
the feature axes for two products and along the token axis for wgrad. A transpose is not free: it
needs column-wise scales, a second quantization of the same tensor. Square 128 x 128 weight tiles
(DeepSeek-V3) are the exception: the tiles of W^T are the transposed tiles of W, so one quantization
serves both products.

A :class:`Recipe` names one :class:`~companion.training.QuantSpec` per operand (six), plus how the
forward output is rounded (kept FP32 unless the recipe says otherwise). Every recipe runs *simulated*
in :class:`~companion.training.QuantLinear`: the operands are quantized and dequantized in torch and
the GEMMs run in FP32, so any format runs on any device. ``fp8_deepseek`` can also run its GEMMs on
Hopper's FP8 Tensor Cores (``backend="kernels"``, CUDA only).
"""
from __future__ import annotations

import dataclasses
import types

from companion.training.quantizers import BF16, IDENTITY, QuantSpec

__all__ = ["Recipe", "RECIPES", "get_recipe", "OPERANDS", "DEEPSEEK_ACTIVATION", "DEEPSEEK_WEIGHT"]

# The six operands: (field, GEMM, operand, the axis of the 2-D operand that its blocks run along).
OPERANDS = (
    ("forward_x", "forward Y = X W^T", "X", 1),
    ("forward_w", "forward Y = X W^T", "W", 1),
    ("dgrad_dy", "dgrad dX = dY W", "dY", 1),
    ("dgrad_w", "dgrad dX = dY W", "W", 0),
    ("wgrad_dy", "wgrad dW = dY^T X", "dY", 0),
    ("wgrad_x", "wgrad dW = dY^T X", "X", 0),
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Quantization of the six GEMM operands of a linear layer, and of its forward output."""

    name: str
    description: str
    forward_x: QuantSpec = IDENTITY
    forward_w: QuantSpec = IDENTITY
    dgrad_dy: QuantSpec = IDENTITY
    dgrad_w: QuantSpec = IDENTITY
    wgrad_dy: QuantSpec = IDENTITY
    wgrad_x: QuantSpec = IDENTITY
    output: QuantSpec = IDENTITY  # the forward output Y; BF16 for bf16 training, else FP32 (identity)

    def __post_init__(self):
        for field, *_ in OPERANDS + (("output",),):
            if not isinstance(getattr(self, field), QuantSpec):
                raise TypeError(f"Recipe.{field} must be a QuantSpec, got {type(getattr(self, field)).__name__}")
        if self.output.granularity != "tensor":
            raise ValueError("the output is rounded as a whole: use a per-tensor or scale-free spec")

    def operands(self) -> dict:
        """{field: (GEMM, operand, axis, spec)} for the six operands, in the order of OPERANDS."""
        return {field: (gemm, operand, axis, getattr(self, field)) for field, gemm, operand, axis in OPERANDS}

    def __str__(self):
        lines = [f"{self.name}: {self.description}"]
        lines += [f"  {gemm:<18} {operand:<2} (axis {axis}): {spec}"
                  for gemm, operand, axis, spec in self.operands().values()]
        lines.append(f"  output Y: {self.output if not self.output.is_identity else 'fp32'}")
        return "\n".join(lines)


def _everywhere(name, description, spec, **overrides):
    fields = {field: spec for field, *_ in OPERANDS}
    return Recipe(name, description, **{**fields, **overrides})


def _backward_stochastic(spec):
    return dict(dgrad_dy=spec.with_rounding("stochastic"), dgrad_w=spec.with_rounding("stochastic"),
                wgrad_dy=spec.with_rounding("stochastic"), wgrad_x=spec.with_rounding("stochastic"))


E4M3_TENSOR = QuantSpec.per_tensor("fp8_e4m3")
E5M2_TENSOR = QuantSpec.per_tensor("fp8_e5m2")
DEEPSEEK_ACTIVATION = QuantSpec.per_block("fp8_e4m3", 128)     # 1 x 128 along the contraction axis
DEEPSEEK_WEIGHT = QuantSpec.per_tile("fp8_e4m3", 128, 128)     # 128 x 128, the same for W and W^T
NVFP4 = QuantSpec.nvfp4()

RECIPES = types.MappingProxyType({r.name: r for r in (
    _everywhere("fp32", "no quantization: FP32 GEMMs, exactly nn.Linear", IDENTITY),
    _everywhere("bf16", "every operand and the output rounded to BF16 (nearest even), FP32 GEMMs; simulated",
                BF16, output=BF16),
    Recipe("fp8_hybrid", "FP8 'hybrid': E4M3 for X and W, E5M2 for dY, one FP32 scale per tensor "
           "(current scaling), nearest; simulated",
           forward_x=E4M3_TENSOR, forward_w=E4M3_TENSOR, dgrad_dy=E5M2_TENSOR, dgrad_w=E4M3_TENSOR,
           wgrad_dy=E5M2_TENSOR, wgrad_x=E4M3_TENSOR),
    Recipe("fp8_deepseek", "DeepSeek-V3 FP8: E4M3 everywhere, FP32 scales per 1x128 block of activations and "
           "gradients and per 128x128 weight tile, nearest; simulated, or FP8 Tensor Cores with backend='kernels'",
           forward_x=DEEPSEEK_ACTIVATION, forward_w=DEEPSEEK_WEIGHT, dgrad_dy=DEEPSEEK_ACTIVATION,
           dgrad_w=DEEPSEEK_WEIGHT, wgrad_dy=DEEPSEEK_ACTIVATION, wgrad_x=DEEPSEEK_ACTIVATION),
    _everywhere("mxfp8", "MXFP8: E4M3 in blocks of 32 with E8M0 scales (floor rule), nearest; simulated",
                QuantSpec.mx("fp8_e4m3")),
    _everywhere("mxfp4", "MXFP4: E2M1 in blocks of 32 with E8M0 scales (floor rule), nearest; simulated",
                QuantSpec.mx("fp4_e2m1")),
    _everywhere("nvfp4_sr", "FP4 all the way: NVFP4 everywhere, nearest in the forward GEMM, stochastic "
                "rounding for the operands of both backward GEMMs; simulated",
                NVFP4, **_backward_stochastic(NVFP4)),
    _everywhere("nvfp4_rtn", "NVFP4 everywhere, nearest rounding in all three GEMMs; simulated", NVFP4),
    Recipe("nvfp4_forward", "quantization-aware fine-tuning: NVFP4 (nearest) forward GEMM, backward GEMMs "
           "in FP32; simulated", forward_x=NVFP4, forward_w=NVFP4),
)})


def get_recipe(recipe) -> Recipe:
    """The recipe called ``recipe`` (a Recipe is returned unchanged)."""
    if isinstance(recipe, Recipe):
        return recipe
    try:
        return RECIPES[recipe]
    except (KeyError, TypeError):
        raise ValueError(f"unknown recipe {recipe!r}; expected one of: {', '.join(RECIPES)}") from None
