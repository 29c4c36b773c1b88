"""Tests of companion.training.loss_scaling: gradient rounding, static and dynamic loss scaling.

Oracles: the formats module (the definition of rounding) and torch's own float16/bfloat16 casts,
torch.amp.GradScaler for the dynamic scaler's rule, and plain float arithmetic for hand-made sequences.
"""
import math

import numpy as np
import pytest
import torch

from companion.formats import get_format
from companion.training import (
    DynamicLossScaler,
    GradientRounding,
    LossScaler,
    StepResult,
    round_to_format,
    training_step,
)


def random_float32(n, seed=0):
    """float32 values with random bit patterns (every exponent, subnormals, Inf, NaN) plus edge cases."""
    bits = np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001,
                      3 * 2.0**-26, 2.0**-14, np.inf, -np.inf, np.nan, 1 + 2.0**-11, 1 + 3 * 2.0**-11],
                     dtype=np.float32)
    return torch.from_numpy(np.concatenate([bits.view(np.float32), edges]))


def same_values(a, b):
    """Bit-for-bit equal, except that any NaN matches any NaN (payloads are not rounded values)."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


# --------------------------------------------------------------------------
# round_to_format
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_rounding_float32_equals_torch_cast_and_formats_module(name, dtype):
    x = random_float32(200_000)
    got = round_to_format(x, name)
    assert got.dtype == torch.float32
    assert same_values(got, x.to(dtype).to(torch.float32))
    reference = torch.from_numpy(get_format(name).round(x.numpy()).astype(np.float32))
    assert same_values(got, reference)


def random_float64(n, seed=0):
    """float64 values with random bit patterns, values spread over fp16's and bf16's ranges, and edges."""
    gen = np.random.default_rng(seed)
    bits = gen.integers(0, 2**64, size=n, dtype=np.uint64).view(np.float64)
    spread = gen.standard_normal(n) * 2.0 ** gen.integers(-140, 130, size=n)
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 1e-300, -1e-300, 2.0**-149, 2.0**-150,
             1 + 2**-11 + 2**-40, 1 + 2**-11, 1 + 3 * 2**-11, 65520.0, 65520.0 - 2**-30, 2.0**-25,
             2.0**-25 + 2**-70, 2.0**-24 * 1.5, 2.0**-133, 2.0**-134, 2.0**-134 * 1.5, 3.3961e38, 3.4e38]
    return torch.from_numpy(np.concatenate([bits, spread, edges, np.negative(edges)]))


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp4_e2m1"])
def test_rounding_float64_equals_the_formats_module(name):
    fmt = get_format(name)
    x = random_float64(300_000)
    if not fmt.has_nan:
        x = x[~torch.isnan(x)]
    got = round_to_format(x, fmt)
    assert got.dtype == torch.float64
    want = torch.from_numpy(fmt.round(x.numpy()))
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int64), want[~nan].view(torch.int64))  # -0 stays -0


def test_rounding_float64_to_fp16_rounds_once():
    # just above the tie between 1 and 1 + 2^-10: up. Rounded to float32 first it would become the tie
    # itself, and then go to the even neighbour, 1.
    x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert round_to_format(x, "fp16").item() == 1 + 2**-10


def test_rounding_keeps_shape_device_and_identity_formats():
    x = torch.randn(3, 4, 5, dtype=torch.float32).transpose(0, 2)  # non-contiguous
    assert round_to_format(x, "fp16").shape == x.shape
    assert torch.equal(round_to_format(x, "fp32"), x)
    x64 = x.double()
    assert torch.equal(round_to_format(x64, "fp64"), x64)
    assert torch.equal(round_to_format(x64, "fp32"), x.double())  # float32 values are already fp32


def test_rounding_rejects_bad_inputs():
    with pytest.raises(TypeError, match="floating-point torch.Tensor"):
        round_to_format(np.zeros(3, dtype=np.float32), "fp16")
    with pytest.raises(TypeError, match="dtype torch.int32"):
        round_to_format(torch.zeros(3, dtype=torch.int32), "fp16")
    with pytest.raises(TypeError, match="floating-point formats"):
        round_to_format(torch.zeros(3), "int8")
    with pytest.raises(KeyError, match="unknown format"):
        round_to_format(torch.zeros(3), "fp12")
    with pytest.raises(ValueError, match="cannot hold every fp32 value"):
        round_to_format(torch.zeros(3, dtype=torch.float16), "fp32")
    with pytest.raises(ValueError, match="cannot hold every bf16 value"):
        round_to_format(torch.zeros(3, dtype=torch.float16), "bf16")  # range, not precision, is missing


# --------------------------------------------------------------------------
# GradientRounding
# --------------------------------------------------------------------------

def test_gradient_rounding_is_identity_forward_and_rounds_backward():
    layer = GradientRounding("fp16")
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x)
    upstream = torch.tensor([2.0**-26, 3 * 2.0**-26, 1e5, 0.0, 1 + 2.0**-12])
    y.backward(upstream)
    assert x.grad.tolist() == [0.0, 2.0**-24, math.inf, 0.0, 1.0]
    assert (layer.seen, layer.nonzero, layer.underflowed, layer.zeros, layer.overflowed) == (5, 4, 1, 2, 1)
    assert layer.underflow_fraction == 0.25 and layer.zero_fraction == 0.4
    assert torch.equal(layer.last_gradient, upstream)
    layer.reset_counts()
    assert (layer.seen, layer.underflow_fraction, layer.zero_fraction) == (0, 0.0, 0.0)
    assert "fp16" in repr(layer)


def test_gradient_rounding_in_a_network_equals_rounding_by_hand():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    rounding = GradientRounding("fp8_e5m2")  # through the formats module (float32 tensors)
    x = torch.randn(32, 8)
    (lin2(torch.tanh(rounding(lin1(x)))) * 1e-3).sum().backward()
    grads = {n: p.grad.clone() for n, p in [("w1", lin1.weight), ("b1", lin1.bias)]}
    # the same by hand: round the gradient at lin1's output, then backpropagate it through lin1
    lin1.zero_grad()
    h = lin1(x)
    g = torch.autograd.grad((lin2(torch.tanh(h)) * 1e-3).sum(), h)[0]
    h.backward(torch.from_numpy(get_format("fp8_e5m2").round(g.numpy()).astype(np.float32)))
    assert torch.equal(lin1.weight.grad, grads["w1"]) and torch.equal(lin1.bias.grad, grads["b1"])


def test_gradient_rounding_rejects_integer_formats():
    with pytest.raises(TypeError, match="floating-point formats"):
        GradientRounding("int4")


# --------------------------------------------------------------------------
# Scalers on hand-made sequences
# --------------------------------------------------------------------------

def test_static_scaler_skips_non_finite_steps_and_keeps_its_scale():
    scaler = LossScaler(1024)
    assert [scaler.update(f) for f in (True, False, True, False, False)] == [True, False, True, False, False]
    assert scaler.scale == 1024.0


def test_dynamic_scaler_grows_backs_off_and_skips():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    finite = [True, True, True,      # 3 good steps: grow to 16
              True, False,           # overflow: skip, back off to 8, count restarts
              True, True, False,     # overflow again before 3 good steps: 4
              False,                 # and again: 2
              True, True, True,      # grow to 4
              True, True, True]      # grow to 8
    applied, scales = [], []
    for f in finite:
        applied.append(scaler.update(f))
        scales.append(scaler.scale)
    assert applied == finite
    assert scales == [8, 8, 16, 16, 8, 8, 8, 4, 2, 2, 2, 4, 4, 4, 8]
    assert scaler.good_steps == 0


def test_dynamic_scaler_factors():
    scaler = DynamicLossScaler(init_scale=100.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=1)
    for f in (True, True, False):
        scaler.update(f)
    assert scaler.scale == 100.0 * 3 * 3 / 4


def test_dynamic_scaler_defaults_are_gradscalers():
    import inspect

    ours = inspect.signature(DynamicLossScaler).parameters
    theirs = inspect.signature(torch.amp.GradScaler).parameters
    for name in ("init_scale", "growth_factor", "backoff_factor", "growth_interval"):
        assert ours[name].default == theirs[name].default, name


def test_dynamic_scaler_follows_torch_gradscaler():
    """Same rule as torch.amp.GradScaler on a sequence of finite and infinite gradients."""
    pattern = [True] * 5 + [False] + [True] * 2 + [False, False] + [True] * 9 + [False] + [True] * 4
    ours = DynamicLossScaler(init_scale=2.0**10, growth_interval=4)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for finite in pattern:
        opt.zero_grad()
        theirs.scale(p.sum()).backward()
        if not finite:
            p.grad[1] = math.inf
        before = p.detach().clone()
        theirs.step(opt)
        theirs.update()
        assert ours.update(finite) == (not torch.equal(before, p.detach()))
        assert ours.scale == theirs.get_scale()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                        (math.nan, ValueError), ("1024", TypeError), (True, TypeError),
                                        (torch.tensor(2.0), TypeError), (None, TypeError)])
def test_scalers_reject_bad_scales(bad, error):
    with pytest.raises(error, match="scale"):
        LossScaler(bad)
    with pytest.raises(error, match="init_scale"):
        DynamicLossScaler(init_scale=bad)


def test_dynamic_scaler_rejects_bad_settings():
    with pytest.raises(ValueError, match="growth_factor"):
        DynamicLossScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        DynamicLossScaler(backoff_factor=1.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        DynamicLossScaler(backoff_factor=0.0)
    with pytest.raises(ValueError, match="growth_interval"):
        DynamicLossScaler(growth_interval=0)
    with pytest.raises(TypeError, match="growth_interval"):
        DynamicLossScaler(growth_interval=2.5)
    with pytest.raises(TypeError, match="bool"):
        DynamicLossScaler().update(1)
    with pytest.raises(TypeError, match="one-element tensor"):
        LossScaler(2.0).scale_loss(3.0)
    with pytest.raises(TypeError, match="tensors"):
        LossScaler(2.0).unscale_([1.0])


def test_unscale_divides_and_reports_non_finite():
    p, q, unused = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    p.grad = torch.tensor([8.0, -4.0])
    q.grad = torch.tensor([2.0, 6.0])
    assert LossScaler(4.0).unscale_([p, q, unused]) is True
    assert p.grad.tolist() == [2.0, -1.0] and q.grad.tolist() == [0.5, 1.5] and unused.grad is None
    q.grad = torch.tensor([math.inf, 1.0])
    assert LossScaler(4.0).unscale_([p, q]) is False


# --------------------------------------------------------------------------
# training_step
# --------------------------------------------------------------------------

def small_problem(fmt="fp16", seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), GradientRounding(fmt), torch.nn.Tanh(),
                                torch.nn.Linear(12, 3), GradientRounding(fmt))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    return model, x, y


def gradients_after_one_step(scaler):
    model, x, y = small_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: look at the gradients, keep the weights
    result = training_step(model, torch.nn.functional.mse_loss, x, y * 1000, opt, scaler)
    for layer in (model[1], model[4]):  # every stored gradient is a normal fp16 number
        stored = layer.last_gradient.abs()
        assert stored.min() >= 2.0**-14 and stored.max() <= 65504
    return result, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("scale", [2.0**-3, 2.0**4, 2.0**8])
def test_scaled_gradients_equal_unscaled_when_nothing_underflows(scale):
    # Scaling by a power of two changes no rounding of normal numbers (it only shifts the exponent),
    # and every product and sum of the backward pass scales exactly: the unscaled gradients are
    # the same bits.
    plain, grads_plain = gradients_after_one_step(None)
    scaled, grads_scaled = gradients_after_one_step(LossScaler(scale))
    assert scaled == StepResult(plain.loss, True, scale)
    for a, b in zip(grads_plain, grads_scaled):
        assert torch.equal(a, b)


def test_scaling_rescues_gradients_that_underflow():
    model, x, y = small_problem()
    y = y * 1e-5  # tiny targets ...
    with torch.no_grad():  # ... and a last layer to match: output gradients near 2^-24, hidden ones far below
        model[3].weight.mul_(1e-5)
        model[3].bias.mul_(1e-5)
    reference = torch.nn.Sequential(*[m for m in model if not isinstance(m, GradientRounding)])

    def grads(scaler, net):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        training_step(net, torch.nn.functional.mse_loss, x, y, opt, scaler)
        return net[0].weight.grad.clone()

    exact = grads(None, reference)
    assert torch.count_nonzero(grads(None, model)) == 0          # every first-layer gradient lost
    rescued = grads(LossScaler(2.0**30), model)
    assert torch.linalg.norm(rescued - exact) < 2e-3 * torch.linalg.norm(exact)  # fp16 precision


def test_dynamic_scaler_skips_the_overflowing_steps():
    model, x, y = small_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler(init_scale=2.0**20, growth_interval=100)  # too large for fp16
    before = [p.detach().clone() for p in model.parameters()]
    results = [training_step(model, torch.nn.functional.mse_loss, x, y, opt, scaler) for _ in range(3)]
    # the largest output gradient is 0.137 before scaling: times 2^20 or 2^19 it overflows fp16's
    # 65504, times 2^18 it does not
    largest = model[4].last_gradient.abs().max().item() / 2**18
    assert 65520 / 2**19 <= largest < 65520 / 2**18  # 65520 and above round to Inf
    assert [(r.applied, r.scale) for r in results] == [(False, 2.0**20), (False, 2.0**19), (True, 2.0**18)]
    assert results[0].loss == results[1].loss == results[2].loss  # nothing moved before the third step
    assert scaler.scale == 2.0**18 and scaler.good_steps == 1
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_training_step_rejects_bad_arguments():
    model, x, y = small_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        training_step(model, torch.nn.functional.mse_loss, x, y, "sgd")
    with pytest.raises(TypeError, match="scaler"):
        training_step(model, torch.nn.functional.mse_loss, x, y, opt, scaler=1024.0)
