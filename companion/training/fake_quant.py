"""Quantization-aware training (QAT): fake quantization with the straight-through estimator.

Fake quantization puts ``x -> dequantize(quantize(x))`` into the forward pass, so that the loss sees
the values a quantized model will compute with, while the parameters stay in FP32 and keep learning.
Rounding has derivative zero almost everywhere, so the backward pass pretends it is the identity:
the *straight-through estimator* (STE, Bengio et al. 2013) passes the incoming gradient on unchanged.

Why no clipping mask: some QAT methods zero the gradient of elements outside the clipping range
[-max * s, max * s]. Here every scale is computed from the tensor itself (absmax, dynamic), so by
construction nothing lies outside that range except an element that saturates because its stored
scale was rounded down (FP32, E4M3) or because the MX floor rule clips the top of a binade. Those
elements are the block's largest, the ones a mask would silence most wrongly, so the gradient passes
through everywhere.

Pieces: :func:`fake_quantize` (the autograd function), :class:`FakeQuantize` (a module),
:class:`QATLinear` (``nn.Linear`` whose weight, and optionally input, are fake-quantized along the
in-features axis), :func:`prepare_qat` (swap the ``nn.Linear`` layers of a model), :func:`ptq`
(post-training quantization: round the weights once, no training);
:func:`companion.training.dequantize_model` swaps the layers back to ``nn.Linear``. The workflow: ``ptq(model, spec)`` to see
what quantization costs, then ``prepare_qat(model, spec)`` and a few steps of fine-tuning with the
same spec to win some of it back.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.training.quantizers import QuantSpec, quantize_dequantize

__all__ = ["fake_quantize", "FakeQuantize", "QATLinear", "prepare_qat", "ptq"]


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward: quantize-dequantize. Backward: the gradient, unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x, spec, axis, generator):
        return quantize_dequantize(x, spec, axis, generator)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec, axis: int = -1, generator: torch.Generator | None = None):
    """``dequantize(quantize(x))`` with the straight-through gradient; blocks along ``axis``.

    Same dtype and shape as ``x``. The identity spec returns ``x`` itself. Errors (unknown spec, bad
    axis, non-float tensor) are those of :func:`companion.training.quantize_dequantize`.
    """
    if isinstance(spec, QuantSpec) and spec.is_identity and isinstance(x, torch.Tensor) and x.is_floating_point():
        return x
    return _FakeQuantizeSTE.apply(x, spec, axis, generator)


class FakeQuantize(nn.Module):
    """A layer that fake-quantizes its input: ``fake_quantize(x, spec, axis, generator)``."""

    def __init__(self, spec: QuantSpec, axis: int = -1, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec, self.axis, self.generator = spec, axis, generator

    def forward(self, x):
        return fake_quantize(x, self.spec, self.axis, self.generator)

    def extra_repr(self):
        return f"{self.spec}, axis={self.axis}"


# --------------------------------------------------------------------------
# Linear layers and swapping them in a model
# --------------------------------------------------------------------------

def linear_like(cls, linear: nn.Linear, **attributes):
    """A ``cls`` (a subclass of nn.Linear) holding the very Parameters of ``linear`` (no copy, no init).

    Sharing the Parameter objects keeps the weights, their gradients and any optimizer state.
    """
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.weight = linear.weight
    layer.bias = linear.bias
    for name, value in attributes.items():
        setattr(layer, name, value)
    layer.train(linear.training)
    return layer


def swap_linears(model: nn.Module, convert, wanted, skip=()):
    """Replace, in place, every submodule ``m`` with ``wanted(m)`` true by ``convert(m)``.

    ``skip`` holds names (as in ``model.named_modules()``) or fnmatch patterns of layers to leave
    alone; a pattern that matches no such layer raises ValueError (a typo would otherwise go unseen).
    When ``model`` itself is such a layer the converted layer is returned (it cannot be swapped in
    place); otherwise ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    targets = [(name, m) for name, m in model.named_modules() if wanted(m)]
    names = [name for name, _ in targets]
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"skip pattern {pattern!r} matches none of the layers {names}")
    for name, module in targets:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            continue
        if name == "":
            return convert(module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, convert(module))
    return model


def _is_plain_linear(m):
    return type(m) is nn.Linear


class QATLinear(nn.Linear):
    """``nn.Linear`` whose weight (and input, if ``activation_spec`` is given) are fake-quantized.

    Both are quantized along the in-features axis, the contraction axis of ``x @ W^T``: per row of the
    (flattened) input and per output channel of W, so that every block scale factors out of the dot
    products. Gradients pass straight through the quantizers.
    """

    def __init__(self, in_features, out_features, bias=True, weight_spec: QuantSpec = QuantSpec(),
                 activation_spec: QuantSpec | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_spec, self.activation_spec = _check_specs(weight_spec, activation_spec)
        self.generator = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantSpec, activation_spec: QuantSpec | None = None,
                    generator: torch.Generator | None = None) -> "QATLinear":
        """A QATLinear sharing ``linear``'s parameters."""
        weight_spec, activation_spec = _check_specs(weight_spec, activation_spec)
        return linear_like(cls, linear, weight_spec=weight_spec, activation_spec=activation_spec, generator=generator)

    def forward(self, x):
        w = fake_quantize(self.weight, self.weight_spec, -1, self.generator)
        if self.activation_spec is not None:
            lead = x.shape[:-1]  # (..., in) -> (tokens, in): the rows of the input matrix
            x = fake_quantize(x.reshape(-1, x.shape[-1]), self.activation_spec, -1, self.generator).reshape(*lead, -1)
        return F.linear(x, w, self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, weight: {self.weight_spec}, input: {self.activation_spec or 'not quantized'}"


def _check_specs(weight_spec, activation_spec):
    for name, spec in (("weight_spec", weight_spec), ("activation_spec", activation_spec)):
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"{name} must be a QuantSpec, got {type(spec).__name__}")
    if weight_spec is None:
        raise TypeError("weight_spec must be a QuantSpec, got None")
    return weight_spec, activation_spec


def prepare_qat(model: nn.Module, weight_spec: QuantSpec, activation_spec: QuantSpec | None = None,
                skip=(), generator: torch.Generator | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (except ``skip``) for a :class:`QATLinear`, in place.

    The new layers hold the same Parameter objects, so weights and optimizer state carry over.
    Returns ``model`` (or the new layer when ``model`` is itself an ``nn.Linear``).
    """
    _check_specs(weight_spec, activation_spec)
    return swap_linears(model, lambda m: QATLinear.from_linear(m, weight_spec, activation_spec, generator),
                        _is_plain_linear, skip)


@torch.no_grad()
def ptq(model: nn.Module, spec: QuantSpec, skip=()) -> nn.Module:
    """Post-training quantization of the weights: replace each linear weight, once, by its quantized values.

    Every ``nn.Linear`` (QATLinear and QuantLinear included) except ``skip`` gets
    ``W <- dequantize(quantize(W))`` along the in-features axis (nearest rounding for a deterministic
    result is the caller's choice of ``spec``). Nothing else changes; returns ``model``.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")

    def round_weight(linear):
        linear.weight.copy_(quantize_dequantize(linear.weight, spec, -1))
        return linear

    swap_linears(model, round_weight, lambda m: isinstance(m, nn.Linear), skip)
    return model

