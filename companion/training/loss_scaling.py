"""Gradients stored in a narrow format, and loss scaling to keep them from underflowing.

Mixed-precision training keeps FP32 master weights but stores activations and their gradients in FP16.
FP16's smallest positive value is 2^-24, and activation gradients are often smaller: they round to zero
and the layers below stop learning. Loss scaling (Micikevicius et al., "Mixed Precision Training", 2018)
multiplies the loss by a factor S before the backward pass, which multiplies every gradient by S and
lifts the small ones into range, and divides the FP32 weight gradients by S before the optimizer uses
them. A *static* scaler uses one S throughout; a *dynamic* one grows S after a run of good steps and, when
a gradient overflows to Inf or NaN, skips the step and halves S.

Pieces, smallest first:

* ``round_to_format(x, fmt)``: round a float tensor to a format of ``companion.formats``.
* ``GradientRounding(fmt)``: a layer that is the identity going forward and rounds the gradient that
  flows back through it, counting how many values underflowed to zero or overflowed.
* ``LossScaler(scale)`` and ``DynamicLossScaler(...)``: ``scale_loss``, ``unscale_``, ``update``.
* ``training_step(...)``: one step of forward, scaled backward, unscale, step or skip.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from companion.formats import FloatFormat, get_format

__all__ = [
    "round_to_format",
    "GradientRounding",
    "LossScaler",
    "DynamicLossScaler",
    "StepResult",
    "training_step",
]


# --------------------------------------------------------------------------
# Rounding a tensor to a format
# --------------------------------------------------------------------------

def _float_format(fmt) -> FloatFormat:
    fmt = get_format(fmt)  # raises for unknown names
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"gradients are rounded to floating-point formats, got {fmt.name}")
    return fmt


def _check_holds(fmt: FloatFormat, dtype: torch.dtype) -> None:
    """Every value of ``fmt`` must be exactly a value of ``dtype``, or rounding to it would round twice."""
    info = torch.finfo(dtype)
    smallest = info.tiny * info.eps  # dtype's smallest subnormal
    if fmt.eps < info.eps or fmt.max > info.max or fmt.min_positive < smallest:
        raise ValueError(f"{dtype} cannot hold every {fmt.name} value exactly; use a wider tensor dtype")


# Fast paths, each equal bit for bit to the formats module (tests/test_loss_scaling.py checks it;
# NaN payloads aside). From float32, torch's cast rounds once, ties to even, overflow to Inf.
_TORCH_CASTS = {
    (get_format("fp16"), torch.float32): torch.float16,
    (get_format("bf16"), torch.float32): torch.bfloat16,
    (get_format("fp32"), torch.float32): torch.float32,  # nothing to round
    (get_format("fp64"), torch.float64): torch.float64,
}
# From float64, torch's cast goes through float32 and rounds twice (1 + 2^-11 + 2^-40 becomes 1, not
# 1 + 2^-10), so these go through float32 rounded to odd first.
_VIA_ODD_FLOAT32 = {
    (get_format("fp16"), torch.float64): torch.float16,
    (get_format("bf16"), torch.float64): torch.bfloat16,
}


def _cast_float64_via_odd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 ``x`` once to fp16 or bf16: to float32 with rounding to odd, then torch's cast.

    Rounding to odd truncates and then sets the last bit when anything was cut off. float32 keeps at
    least two bits more than fp16 or bf16 at every magnitude, so the odd value is never a midpoint of
    the narrow format and lies on the same side of every midpoint as ``x``: the second rounding gives
    what one rounding would (Boldo and Melquiond, IEEE Trans. Computers 57(4), 2008).
    """
    y = x.to(torch.float32)  # nearest, ties to even; beyond float32's range: Inf
    y64 = y.to(torch.float64)
    bits = y.view(torch.int32)
    bits = bits - (y64.abs() > x.abs()).to(torch.int32)  # rounded away from zero: one step back
    bits = bits | (y64 != x).to(torch.int32)  # inexact (or NaN): last bit 1
    return bits.view(torch.float32).to(dtype).to(torch.float64)


def round_to_format(x: torch.Tensor, fmt) -> torch.Tensor:
    """Round each element of the float tensor ``x`` to the nearest value of ``fmt`` (ties to even).

    The rounding is ``companion.formats``' ``fmt.round``: overflow gives Inf or NaN as the format does,
    no saturation. The result keeps ``x``'s dtype and device. For fp16 and bf16, torch casts that
    give the same bits are used instead, for speed.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"round_to_format expects a floating-point torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    fmt = _float_format(fmt)
    _check_holds(fmt, x.dtype)
    x = x.detach()
    cast = _TORCH_CASTS.get((fmt, x.dtype))
    if cast is not None:
        return x.to(cast).to(x.dtype)
    if (fmt, x.dtype) in _VIA_ODD_FLOAT32:
        return _cast_float64_via_odd(x, _VIA_ODD_FLOAT32[fmt, x.dtype])
    return fmt.round(x).to(x.dtype)  # float64 values of fmt, exact in x.dtype


# --------------------------------------------------------------------------
# A layer that stores the gradient flowing through it in a narrow format
# --------------------------------------------------------------------------

class _RoundGradient(torch.autograd.Function):
    """Identity forward; backward hands the incoming gradient to ``layer._round``."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x.view_as(x)  # a new tensor object, so autograd records this node

    @staticmethod
    def backward(ctx, grad):
        return ctx.layer._round(grad), None


class GradientRounding(torch.nn.Module):
    """Identity in the forward pass; rounds the gradient flowing back through it to ``fmt``.

    Placed after a layer, it makes the backward pass use that layer's output gradient (an activation
    gradient) as it would be stored in ``fmt``. It counts, since the last ``reset_counts()``, the
    values it has ``seen``; those ``nonzero`` before rounding; those ``underflowed`` (non-zero before,
    zero after); the ``zeros`` it passed on (underflowed, or zero already); and those ``overflowed``
    (finite before, Inf or NaN after). ``last_gradient`` is the latest gradient as it arrived.
    """

    def __init__(self, fmt="fp16"):
        super().__init__()
        self.format = _float_format(fmt)
        self.last_gradient = None
        self.reset_counts()

    def reset_counts(self) -> None:
        self.seen = self.nonzero = self.underflowed = self.zeros = self.overflowed = 0

    @property
    def underflow_fraction(self) -> float:
        """Share of the non-zero gradient values that rounding turned into zeros (0 if none came)."""
        return self.underflowed / self.nonzero if self.nonzero else 0.0

    @property
    def zero_fraction(self) -> float:
        """Share of the values passed on that are zero."""
        return self.zeros / self.seen if self.seen else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RoundGradient.apply(x, self)

    def _round(self, grad: torch.Tensor) -> torch.Tensor:
        rounded = round_to_format(grad, self.format)
        self.last_gradient = grad.detach()
        was_nonzero = grad != 0
        self.seen += grad.numel()
        self.nonzero += int(was_nonzero.sum())
        self.underflowed += int((was_nonzero & (rounded == 0)).sum())
        self.zeros += int((rounded == 0).sum())
        self.overflowed += int((torch.isfinite(grad) & ~torch.isfinite(rounded)).sum())
        return rounded

    def extra_repr(self) -> str:
        return f"format={self.format.name}"


# --------------------------------------------------------------------------
# Loss scalers
# --------------------------------------------------------------------------

def _positive(value, name: str, above: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > above):
        raise ValueError(f"{name} must be finite and > {above:g}, got {value!r}")
    return float(value)


class LossScaler:
    """Static loss scaling with a constant factor ``scale``.

    Per step: ``scale_loss(loss).backward()``; then ``finite = unscale_(parameters)`` divides every
    gradient by ``scale`` and reports whether all of them are finite; then ``update(finite)`` says
    whether to apply the optimizer step. A static scaler skips steps with Inf or NaN gradients and
    never changes ``scale``. Powers of two are the natural choice: scaling by them is exact.
    """

    def __init__(self, scale: float):
        self.scale = _positive(scale, "scale")

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("scale_loss expects the loss as a one-element tensor")
        return loss * self.scale

    def unscale_(self, parameters) -> bool:
        """Divide each parameter's gradient by ``scale`` in place; True if every gradient is finite."""
        finite = True
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"unscale_ expects tensors (parameters), got {type(p).__name__}")
            if p.grad is not None:
                p.grad.div_(self.scale)
                finite = finite and bool(torch.isfinite(p.grad).all())
        return finite

    def update(self, grads_finite: bool) -> bool:
        """Whether to apply this step: only when every gradient was finite."""
        if not isinstance(grads_finite, bool):
            raise TypeError(f"update expects a bool (were all gradients finite?), got {type(grads_finite).__name__}")
        return grads_finite

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:g})"


class DynamicLossScaler(LossScaler):
    """Loss scaling that looks for the largest scale that does not overflow.

    ``update(grads_finite)``: after a step with an Inf or NaN gradient, skip the step, multiply ``scale``
    by ``backoff_factor`` and restart the count of good steps; after ``growth_interval`` good steps in a
    row, multiply ``scale`` by ``growth_factor``. The defaults are those of ``torch.amp.GradScaler``.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        super().__init__(_positive(init_scale, "init_scale"))
        self.growth_factor = _positive(growth_factor, "growth_factor", above=1.0)
        self.backoff_factor = _positive(backoff_factor, "backoff_factor")
        if self.backoff_factor >= 1:
            raise ValueError(f"backoff_factor must be < 1, got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int):
            raise TypeError(f"growth_interval must be an int, got {type(growth_interval).__name__}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.growth_interval = growth_interval
        self.good_steps = 0  # finite steps since the last change of scale

    def update(self, grads_finite: bool) -> bool:
        apply = super().update(grads_finite)
        if not apply:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            if math.isfinite(self.scale * self.growth_factor):
                self.scale *= self.growth_factor
            self.good_steps = 0
        return True

    def __repr__(self) -> str:
        return (f"DynamicLossScaler(scale={self.scale:g}, growth_factor={self.growth_factor:g}, "
                f"backoff_factor={self.backoff_factor:g}, growth_interval={self.growth_interval})")


# --------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------

class StepResult(NamedTuple):
    loss: float     # the loss of this step, unscaled
    applied: bool   # False when the step was skipped for non-finite gradients
    scale: float    # the loss scale this step used (1.0 without a scaler)


def training_step(model, loss_fn, inputs, targets, optimizer, scaler: LossScaler | None = None) -> StepResult:
    """Forward, (scaled) backward, unscale, then step or skip. Without a scaler the step is plain."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scaler is not None and not isinstance(scaler, LossScaler):
        raise TypeError(f"scaler must be a LossScaler or None, got {type(scaler).__name__}")
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return StepResult(loss.item(), True, 1.0)
    scale = scaler.scale
    scaler.scale_loss(loss).backward()        # every gradient is now multiplied by scale
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    applied = scaler.update(scaler.unscale_(parameters))
    if applied:
        optimizer.step()
    return StepResult(loss.item(), applied, scale)
