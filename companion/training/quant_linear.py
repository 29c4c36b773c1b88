"""Fully quantized training: a linear layer whose three GEMMs take quantized operands.

:class:`QuantLinear` keeps FP32 master weights (and bias). In each step, following a
:class:`~companion.training.Recipe` (see :mod:`companion.training.recipes` for the axes)::

    forward   Y  = Q(X, axis 1) Q(W, axis 1)^T + b         (then the recipe's output rounding)
    dgrad     dX = Q(dY, axis 1) Q(W, axis 0)
    wgrad     dW = Q(dY, axis 0)^T Q(X, axis 0)
    bias      db = sum of dY over tokens                    (FP32: a reduction, not a GEMM)

Each Q quantizes from the FP32 (or unrounded) tensor, with its own scales: X and dY are quantized
twice, W twice, each time along the contraction axis of the GEMM they feed. The output gradient that
arrives, dY, is used as it comes (FP32).

Two backends:

* ``"simulated"`` (default, any recipe, any device): each Q is
  :func:`~companion.training.quantize_dequantize` and the GEMMs run in FP32 on the dequantized
  operands. Nothing runs in a narrow format; the numbers are those of the format, the speed is not.
* ``"kernels"`` (``fp8_deepseek`` only, CUDA tensors only): the operands are quantized to E4M3 codes
  by :func:`companion.kernels.quantize_fp8_blockwise` and the GEMMs run on the FP8 Tensor Cores of a
  Hopper GPU with :func:`companion.kernels.fp8_gemm.fp8_blockwise_matmul`, FP32 output. The codes
  come from a float32 division (the hardware's), so rarely one differs by a step from the
  simulated path's, which divides in float64; the sums differ by the order of accumulation.

Inputs of any leading shape ``(..., in_features)`` are flattened to ``(tokens, in_features)`` for the
GEMMs. The output is FP32 (holding BF16 values when the recipe rounds the output to BF16).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.training.fake_quant import QATLinear, linear_like, swap_linears
from companion.training.quantizers import quantize_dequantize
from companion.training.recipes import DEEPSEEK_ACTIVATION, DEEPSEEK_WEIGHT, IDENTITY, OPERANDS, Recipe, get_recipe

__all__ = ["BACKENDS", "runs_on_kernels", "QuantLinearFunction", "quant_linear", "QuantLinear", "quantize_model",
           "dequantize_model"]

BACKENDS = ("simulated", "kernels")
_KERNEL_SPECS = dict(forward_x=DEEPSEEK_ACTIVATION, forward_w=DEEPSEEK_WEIGHT, dgrad_dy=DEEPSEEK_ACTIVATION,
                     dgrad_w=DEEPSEEK_WEIGHT, wgrad_dy=DEEPSEEK_ACTIVATION, wgrad_x=DEEPSEEK_ACTIVATION,
                     output=IDENTITY)


def runs_on_kernels(recipe: Recipe) -> bool:
    """True when every operand of ``recipe`` is quantized as the FP8 blockwise kernels quantize it."""
    return all(getattr(recipe, field) == spec for field, spec in _KERNEL_SPECS.items())


def _check_backend(backend, recipe, device=None):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "kernels":
        if not runs_on_kernels(recipe):
            raise ValueError(f"backend='kernels' runs the fp8_deepseek recipe only (E4M3, 1x128 and 128x128 "
                             f"FP32 scales, nearest); recipe {recipe.name!r} runs with backend='simulated'")
        if device is not None and device.type != "cuda":
            raise ValueError(f"backend='kernels' runs on CUDA tensors (FP8 Tensor Cores); got a tensor on {device}")


# --------------------------------------------------------------------------
# The three GEMMs, simulated
# --------------------------------------------------------------------------

def _q(x, recipe, field, generator):
    """Operand ``field`` of ``recipe``: x quantized along the axis that field's GEMM contracts."""
    axis = next(a for f, _, _, a in OPERANDS if f == field)
    return quantize_dequantize(x, getattr(recipe, field), axis, generator, out_dtype=torch.float32)


def _forward_simulated(x, weight, bias, recipe, generator):
    return F.linear(_q(x, recipe, "forward_x", generator), _q(weight, recipe, "forward_w", generator), bias)


def _dgrad_simulated(dy, weight, recipe, generator):
    return _q(dy, recipe, "dgrad_dy", generator).mm(_q(weight, recipe, "dgrad_w", generator))  # (M, N) @ (N, K)


def _wgrad_simulated(dy, x, recipe, generator):
    return _q(dy, recipe, "wgrad_dy", generator).t().mm(_q(x, recipe, "wgrad_x", generator))  # (N, M) @ (M, K)


# --------------------------------------------------------------------------
# The three GEMMs on FP8 Tensor Cores (fp8_deepseek)
# --------------------------------------------------------------------------

def _fp8(t, tile):
    """E4M3 codes and FP32 scales of t, blocks along its rows: (1, 128) blocks or (128, 128) tiles."""
    from companion.kernels import quantize_fp8_blockwise

    return quantize_fp8_blockwise(t, tile=tile)


def _gemm(a, b):
    """A @ B^T for (codes, scales) pairs: A (M, K) in 1x128 blocks, B (N, K) in tiles or 1x128 blocks."""
    from companion.kernels.fp8_gemm import fp8_blockwise_matmul

    return fp8_blockwise_matmul(*a, *b, out_dtype=torch.float32)


def _forward_kernels(x, bias, w_fp8):
    y = _gemm(_fp8(x, (1, 128)), w_fp8)  # X blocked along K, W in 128 x 128 tiles
    return y if bias is None else y + bias


def _dgrad_kernels(dy, w_fp8):
    # B = W^T (K, N): the transposed codes and tile scales of W. The 128 x 128 tiles of W^T are W's
    # tiles transposed, so the forward quantization serves here too. The kernel reads B's tiles along
    # K fastest; a transposed view would make every load a strided gather, so the codes are copied
    # once into W^T's row-major layout (one pass over a byte per weight).
    codes, scales = w_fp8
    return _gemm(_fp8(dy, (1, 128)), (codes.t().contiguous(), scales.t().contiguous()))


def _wgrad_kernels(dy, x):
    # dW = dY^T X: A = dY^T (N, M) and B = X^T (K, M), both in 1 x 128 blocks along the tokens M
    # (column-wise blocks of dY and X: a second quantization of each).
    return _gemm(_fp8(dy.t(), (1, 128)), _fp8(x.t(), (1, 128)))


# --------------------------------------------------------------------------
# The autograd function, the functional form and the module
# --------------------------------------------------------------------------

class QuantLinearFunction(torch.autograd.Function):
    """Y = X W^T + b with the operands of all three GEMMs quantized by ``recipe``.

    ``apply(x, weight, bias, recipe, generator, backend)``: x (M, K) and weight (N, K) float32, bias
    (N,) or None, ``recipe`` a Recipe, ``generator`` a torch.Generator for stochastic rounding (or
    None), ``backend`` "simulated" or "kernels". Gradients for x, weight and bias.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recipe, generator, backend):
        ctx.recipe, ctx.generator, ctx.backend = recipe, generator, backend
        ctx.has_bias = bias is not None
        if backend == "kernels":
            w_fp8 = _fp8(weight, (128, 128))
            y = _forward_kernels(x, bias, w_fp8)
            ctx.save_for_backward(x, *w_fp8)
        else:
            y = _forward_simulated(x, weight, bias, recipe, generator)
            ctx.save_for_backward(x, weight)
        # Rounding the output (bf16 recipe) is treated as the identity in the backward pass.
        return quantize_dequantize(y, recipe.output, -1, generator)

    @staticmethod
    def backward(ctx, dy):
        recipe, generator = ctx.recipe, ctx.generator
        dx = dw = db = None
        if ctx.backend == "kernels":
            x, w_codes, w_scales = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                dx = _dgrad_kernels(dy, (w_codes, w_scales))
            if ctx.needs_input_grad[1]:
                dw = _wgrad_kernels(dy, x)
        else:
            x, weight = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                dx = _dgrad_simulated(dy, weight, recipe, generator)
            if ctx.needs_input_grad[1]:
                dw = _wgrad_simulated(dy, x, recipe, generator)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None, None, None


def _check_float(t, name):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {kind}")


def quant_linear(x, weight, bias=None, recipe="fp32", generator=None, backend="simulated"):
    """Functional :class:`QuantLinear`: x (..., K) float, weight (N, K) and bias (N,) float32.

    Returns (..., N) float32.
    """
    recipe = get_recipe(recipe)
    _check_float(x, "x")
    _check_float(weight, "weight")
    if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        raise TypeError("QuantLinear keeps FP32 master weights and bias; convert them with .float()")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input of shape {tuple(x.shape)} does not end in in_features = {weight.shape[1]}")
    _check_backend(backend, recipe, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()  # (..., K) -> (M, K): tokens x in-features
    y = QuantLinearFunction.apply(x2, weight, bias, recipe, generator, backend)
    return y.reshape(*lead, weight.shape[0])


class QuantLinear(nn.Linear):
    """A linear layer trained with quantized GEMMs (see the module docstring).

    ``recipe`` is a :class:`Recipe` or the name of one in ``RECIPES``; ``backend`` is "simulated"
    (FP32 GEMMs on quantize-dequantized operands, any recipe) or "kernels" (FP8 Tensor Cores, the
    fp8_deepseek recipe on CUDA); ``generator`` drives stochastic rounding (None: torch's default).
    """

    def __init__(self, in_features, out_features, bias=True, recipe="fp32", backend="simulated",
                 generator: torch.Generator | None = None, device=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=torch.float32)
        self.recipe = get_recipe(recipe)
        _check_backend(backend, self.recipe)
        self.backend, self.generator = backend, generator

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe="fp32", backend="simulated", generator=None) -> "QuantLinear":
        """A QuantLinear holding ``linear``'s very Parameters (FP32)."""
        if linear.weight.dtype != torch.float32:
            raise TypeError(f"QuantLinear keeps FP32 master weights; this layer's are {linear.weight.dtype}")
        recipe = get_recipe(recipe)
        _check_backend(backend, recipe)
        return linear_like(cls, linear, recipe=recipe, backend=backend, generator=generator)

    def forward(self, x):
        return quant_linear(x, self.weight, self.bias, self.recipe, self.generator, self.backend)

    def extra_repr(self):
        return f"{super().extra_repr()}, recipe={self.recipe.name}, backend={self.backend}"


def quantize_model(model: nn.Module, recipe, skip=(), backend="simulated", generator=None) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` of ``model`` (and every QuantLinear, to change its recipe)
    for a :class:`QuantLinear` with ``recipe``, except the layers named in ``skip`` (names or fnmatch
    patterns of ``model.named_modules()``).

    The new layers hold the same Parameter objects (weights and optimizer state carry over). Returns
    ``model``, or the new layer when ``model`` is itself a linear layer. :func:`dequantize_model`
    swaps them back.
    """
    recipe = get_recipe(recipe)
    _check_backend(backend, recipe)
    return swap_linears(model, lambda m: QuantLinear.from_linear(m, recipe, backend, generator),
                        lambda m: type(m) in (nn.Linear, QuantLinear), skip)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every QuantLinear and QATLinear of ``model`` back to a plain ``nn.Linear``, in place.

    The layers keep their Parameter objects. Returns ``model`` (or the new layer when ``model`` is
    itself one of them).
    """
    return swap_linears(model, lambda m: linear_like(nn.Linear, m), lambda m: isinstance(m, (QuantLinear, QATLinear)))
