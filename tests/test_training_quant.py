"""Tests of fake quantization (QAT) and of QuantLinear (fully quantized training).

Oracles: nn.Linear and autograd (the fp32 recipe must be them exactly); the three GEMMs derived by
hand from quantize_dequantize with the axes written out here (forward along in-features, dgrad along
out-features, wgrad along tokens); the expectation of stochastic rounding (the exact product) with a
stated statistical bound; on the GPU, the float64 reference of the FP8 GEMM with its error bound.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.training import (
    BF16,
    IDENTITY,
    RECIPES,
    FakeQuantize,
    QATLinear,
    QuantLinear,
    QuantSpec,
    Recipe,
    dequantize_model,
    fake_quantize,
    get_recipe,
    prepare_qat,
    ptq,
    quant_linear,
    quantize_dequantize,
    quantize_model,
    runs_on_kernels,
)


def linear_pair(in_features=150, out_features=70, bias=True, seed=0):
    torch.manual_seed(seed)
    reference = nn.Linear(in_features, out_features, bias=bias)
    layer = QuantLinear(in_features, out_features, bias=bias)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


def run(layer, x, dy):
    """Forward and backward; returns (y, dx, dw, db)."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


# --------------------------------------------------------------------------
# fp32: exactly nn.Linear
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 150), (3, 13, 150), (150,)])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_recipe_is_nn_linear_exactly(shape, bias):
    reference, layer = linear_pair(bias=bias)
    x = torch.randn(shape)
    dy = torch.randn(shape[:-1] + (70,))
    for got, want in zip(run(layer, x, dy), run(reference, x, dy)):
        assert (got is None and want is None) or torch.equal(got, want)


# --------------------------------------------------------------------------
# The three GEMMs, derived by hand
# --------------------------------------------------------------------------

def by_hand(recipe, x, w, b, dy, generator=None):
    """Y, dX, dW, db from quantize_dequantize, with each GEMM's contraction axis spelled out."""
    q = lambda t, spec, axis: quantize_dequantize(t, spec, axis, generator)  # noqa: E731
    y = F.linear(q(x, recipe.forward_x, 1), q(w, recipe.forward_w, 1), b)    # contracts in-features
    y = quantize_dequantize(y, recipe.output)
    dx = q(dy, recipe.dgrad_dy, 1) @ q(w, recipe.dgrad_w, 0)                # contracts out-features
    dw = q(dy, recipe.wgrad_dy, 0).T @ q(x, recipe.wgrad_x, 0)              # contracts tokens
    return y, dx, dw, dy.sum(0)


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "fp32"])
def test_gradients_are_the_hand_derived_quantized_gemms(name):
    recipe = get_recipe(name)
    _, layer = linear_pair()
    layer.recipe = recipe
    x = torch.randn(3, 13, 150) * torch.exp2(torch.randint(-6, 6, (3, 13, 1)).float())
    dy = torch.randn(3, 13, 70) * 1e-3
    layer.generator = torch.Generator().manual_seed(5)
    got = run(layer, x, dy)
    want = by_hand(recipe, x.reshape(39, 150), layer.weight.detach(), layer.bias.detach(), dy.reshape(39, 70),
                   torch.Generator().manual_seed(5))  # the same draws, in the same order
    assert torch.equal(got[0].reshape(39, 70), want[0])
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.reshape(w.shape), w)
    # every recipe but nvfp4_forward changes the gradients; all change the output
    assert not torch.equal(got[0].reshape(39, 70), F.linear(x.reshape(39, 150), layer.weight, layer.bias))


def test_recipe_axes_follow_the_contraction_axes():
    # A spec whose blocks are whole rows along the axis: quantizing along the wrong axis changes the
    # result, so the hand derivation above pins each operand's axis. Here, per-channel int4.
    spec = QuantSpec.per_channel("int4")
    recipe = Recipe("probe", "per-channel int4 everywhere", *([spec] * 6))
    x, w, dy = torch.randn(24, 40), torch.randn(30, 40), torch.randn(24, 30)
    dx = quant_linear(x.requires_grad_(), w.requires_grad_(), None, recipe)
    dx.backward(dy)
    assert torch.equal(x.grad, quantize_dequantize(dy, spec, 1) @ quantize_dequantize(w, spec, 0))
    assert not torch.equal(x.grad, quantize_dequantize(dy, spec, 0) @ quantize_dequantize(w, spec, 1))
    assert torch.equal(w.grad, quantize_dequantize(dy, spec, 0).T @ quantize_dequantize(x, spec, 0))


def test_bf16_recipe_rounds_the_output_only_when_it_says_so():
    _, layer = linear_pair()
    x = torch.randn(8, 150)
    y = layer(x)
    assert y.dtype == torch.float32
    layer.recipe = get_recipe("bf16")
    y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, y.to(torch.bfloat16).float())
    layer.recipe = get_recipe("mxfp8")
    assert not torch.equal(layer(x), layer(x).to(torch.bfloat16).float())  # FP32 output


# --------------------------------------------------------------------------
# Stochastic rounding makes the gradients unbiased
# --------------------------------------------------------------------------

def no_saturation(shape, seed):
    """Values in (-A, A), A = 2688 * 2^-12, with +-A in every 16-block along both axes: every NVFP4
    scale is exact (tensor 2^-12, blocks 448) and no element saturates, so E[Q_sr(t)] = t."""
    A = 2688 * 2.0 ** -12
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g) * 2 - 1) * A
    i, j = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    t[(i + j) % 16 == 0] = A
    return t


def test_stochastic_rounding_gradients_are_unbiased_and_nearest_is_biased():
    M, K, N, draws = 32, 48, 32, 200
    A = 2688 * 2.0 ** -12
    x, w, dy = no_saturation((M, K), 0), no_saturation((N, K), 1), no_saturation((M, N), 2)
    # A constructed case for nearest rounding: positive operands, and every gradient element but the
    # block maxima at 4.8 in units of the block scale A / 6. E2M1 has 4 and 6 there: nearest rounds
    # every one of them down to 4, so the errors of a dot product all have one sign and add up.
    dy_biased = torch.where(dy.abs() == A, A, 4.8 * A / 6)
    w_positive = w.abs()
    cases = {"unbiased": (dy, w), "biased": (dy_biased, w_positive)}

    def grads(recipe, dy_, w_, generator):
        xs, ws = x.clone().requires_grad_(), w_.clone().requires_grad_()
        quant_linear(xs, ws, None, recipe, generator).backward(dy_)
        return xs.grad.double(), ws.grad.double()

    g = torch.Generator().manual_seed(0)
    for case, (dy_, w_) in cases.items():
        exact = {"dx": (dy_ @ w_).double(), "dw": (dy_.T @ x).double()}
        samples = [grads("nvfp4_sr", dy_, w_, g) for _ in range(draws)]
        for i, name in enumerate(("dx", "dw")):
            s = torch.stack([sample[i] for sample in samples])
            # Each gradient element is a sum of independent, unbiased roundings: a z-test per
            # element with 6 standard errors (a Gaussian exceeds that with probability 2e-9).
            z = (s.mean(0) - exact[name]).abs() / (s.std(0) / math.sqrt(draws) + 1e-12)
            assert z.max() < 6, f"{case} {name}: off by {z.max():.1f} standard errors"
        if case == "biased":
            rtn_dx, _ = grads("nvfp4_rtn", dy_, w_, None)
            sr_dx = torch.stack([sample[0] for sample in samples]).mean(0)
            # nearest rounding is biased: its error is systematic, far beyond the averaged SR error
            assert (rtn_dx - exact["dx"]).abs().mean() > 20 * (sr_dx - exact["dx"]).abs().mean()


# --------------------------------------------------------------------------
# quantize_model and dequantize_model
# --------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_quantize_model_swaps_in_place_and_keeps_the_parameters():
    torch.manual_seed(0)
    model = Tiny()
    params = list(model.parameters())
    x = torch.randn(5, 16)
    before = model(x)
    assert quantize_model(model, "mxfp4", skip=("head",)) is model
    assert isinstance(model.body[0], QuantLinear) and isinstance(model.body[2], QuantLinear)
    assert type(model.head) is nn.Linear
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert not torch.equal(model(x), before)
    quantize_model(model, get_recipe("fp32"), skip="head")  # a QuantLinear takes the new recipe
    assert model.body[0].recipe.name == "fp32" and torch.equal(model(x), before)
    assert dequantize_model(model) is model and type(model.body[0]) is nn.Linear
    assert all(a is b for a, b in zip(model.parameters(), params))
    layer = quantize_model(nn.Linear(4, 3), "fp8_hybrid")  # a bare layer cannot be swapped in place
    assert isinstance(layer, QuantLinear) and layer.recipe.name == "fp8_hybrid"
    with pytest.raises(ValueError, match="matches none"):
        quantize_model(Tiny(), "mxfp4", skip=("haed",))
    # subclasses of nn.Linear that are not ours (attention's output projection) are left alone
    attention = nn.MultiheadAttention(16, 2)
    kind = type(attention.out_proj)
    assert type(dequantize_model(quantize_model(attention, "mxfp8")).out_proj) is kind


def test_training_a_quantized_model_learns():
    torch.manual_seed(0)
    model = quantize_model(Tiny(), "nvfp4_sr", skip=("head",))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    target = x[:, :4] * 2
    losses = []
    for _ in range(25):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_empty_batch_gives_empty_output_and_zero_gradients():
    _, layer = linear_pair()
    layer.recipe = get_recipe("nvfp4_rtn")
    y, dx, dw, db = run(layer, torch.empty(0, 150), torch.empty(0, 70))
    assert y.shape == (0, 70) and dx.shape == (0, 150)
    assert not dw.any() and not db.any()


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="unknown recipe 'fp3'.*fp32, bf16"):
        get_recipe("fp3")
    with pytest.raises(ValueError, match="unknown recipe"):
        QuantLinear(4, 3, recipe="mxfp5")
    with pytest.raises(ValueError, match="unknown backend"):
        QuantLinear(4, 3, backend="cuda")
    with pytest.raises(ValueError, match="fp8_deepseek recipe only"):
        QuantLinear(4, 3, recipe="mxfp8", backend="kernels")
    with pytest.raises(ValueError, match="CUDA"):
        QuantLinear(4, 3, recipe="fp8_deepseek", backend="kernels")(torch.randn(2, 4))
    layer = QuantLinear(4, 3)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="FP32"):
        QuantLinear.from_linear(nn.Linear(4, 3).to(torch.bfloat16))
    with pytest.raises(TypeError, match="QuantSpec"):
        Recipe("bad", "a string is not a spec", forward_x="fp8_e4m3")


def test_recipes_are_described():
    assert list(RECIPES) == ["fp32", "bf16", "fp8_hybrid", "fp8_deepseek", "mxfp8", "mxfp4", "nvfp4_sr",
                             "nvfp4_rtn", "nvfp4_forward"]
    for name, recipe in RECIPES.items():
        assert recipe.name == name and get_recipe(recipe) is recipe
        assert name == "fp32" or "simulated" in recipe.description
        assert runs_on_kernels(recipe) == (name == "fp8_deepseek")
        assert len(str(recipe).splitlines()) == 8
    sr = RECIPES["nvfp4_sr"]
    assert sr.forward_x.rounding == sr.forward_w.rounding == "nearest_even"
    assert {sr.dgrad_dy.rounding, sr.dgrad_w.rounding, sr.wgrad_dy.rounding, sr.wgrad_x.rounding} == {"stochastic"}
    assert RECIPES["nvfp4_forward"].dgrad_dy == IDENTITY and RECIPES["bf16"].output == BF16


# --------------------------------------------------------------------------
# Fake quantization (QAT)
# --------------------------------------------------------------------------

def test_fake_quantize_is_quantize_dequantize_with_a_straight_through_gradient():
    spec = QuantSpec.nvfp4()
    x = (torch.randn(8, 48) * 3).requires_grad_()
    y = fake_quantize(x, spec)
    assert torch.equal(y, quantize_dequantize(x, spec))
    g = torch.randn(8, 48)
    y.backward(g)
    assert torch.equal(x.grad, g)  # the STE: the gradient passes through unchanged
    assert torch.autograd.gradcheck(lambda t: fake_quantize(t, QuantSpec.per_tensor("int8")) * 0 + t,
                                    torch.randn(3, 4, dtype=torch.float64, requires_grad=True))
    assert fake_quantize(x, IDENTITY) is x
    layer = FakeQuantize(QuantSpec.mx("fp8_e4m3"), axis=0)
    assert torch.equal(layer(x), quantize_dequantize(x, QuantSpec.mx("fp8_e4m3"), 0))
    with pytest.raises(TypeError, match="QuantSpec"):
        FakeQuantize("mxfp8")
    with pytest.raises(TypeError, match="floating-point"):
        fake_quantize(torch.ones(4, dtype=torch.int32), spec)


def test_qat_linear_forward_and_gradients():
    torch.manual_seed(0)
    wspec, aspec = QuantSpec.per_channel("int4"), QuantSpec.per_tensor("fp8_e4m3")
    layer = QATLinear.from_linear(nn.Linear(24, 10), wspec, aspec)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y = layer(x)
    xq = quantize_dequantize(x.detach().reshape(10, 24), aspec)
    wq = quantize_dequantize(layer.weight.detach(), wspec)
    assert torch.equal(y, F.linear(xq, wq, layer.bias).reshape(2, 5, 10))
    dy = torch.randn(2, 5, 10)
    y.backward(dy)
    # straight through both quantizers: the gradients of F.linear at the quantized operands
    assert torch.equal(x.grad, (dy.reshape(10, 10) @ wq).reshape(2, 5, 24))
    assert torch.equal(layer.weight.grad, dy.reshape(10, 10).T @ xq)


def test_ptq_then_qat_workflow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(256, 8)
    target = torch.sin(x.sum(1, keepdim=True))

    def fit(steps, lr):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def loss():
        with torch.no_grad():
            return F.mse_loss(model(x), target).item()

    fit(300, 1e-2)
    float_loss = loss()
    spec = QuantSpec.per_channel("int4")
    params = list(model.parameters())
    weights = [m.weight.detach().clone() for m in (model[0], model[2])]
    ptq(model, spec)  # round the weights once
    for m, w in zip((model[0], model[2]), weights):
        assert torch.equal(m.weight, quantize_dequantize(w, spec))
    ptq_loss = loss()
    assert ptq_loss > 10 * float_loss  # rounding to int4 costs accuracy (about 0.07 against 0.0002)
    assert prepare_qat(model, spec) is model and all(isinstance(model[i], QATLinear) for i in (0, 2))
    assert all(a is b for a, b in zip(model.parameters(), params))
    fit(200, 1e-3)  # QAT: the same spec in the forward pass, straight-through gradients
    qat_loss = loss()
    assert qat_loss < 0.5 * ptq_loss  # QAT wins back much of what PTQ lost (about 0.02)
    ptq(model, spec)  # what the QAT model computes is what its quantized weights compute
    assert type(dequantize_model(model)[0]) is nn.Linear and loss() == qat_loss


def test_prepare_qat_skips_and_refuses_bad_specs():
    model = prepare_qat(Tiny(), QuantSpec.mx("fp4_e2m1"), QuantSpec.mx("fp8_e4m3"), skip=["head"])
    assert isinstance(model.body[0], QATLinear) and type(model.head) is nn.Linear
    assert "fp4_e2m1" in repr(model.body[0])
    with pytest.raises(TypeError, match="QuantSpec"):
        prepare_qat(Tiny(), "int4")
    with pytest.raises(TypeError, match="Module"):
        prepare_qat(torch.ones(3), QuantSpec.per_channel("int4"))


# --------------------------------------------------------------------------
# On the GPU: the FP8 Tensor Core path of fp8_deepseek
# --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("M, K, N", [(256, 384, 256), (200, 300, 130)])
def test_kernels_backend_runs_the_fp8_gemms(M, K, N):
    from companion.kernels import quantize_fp8_blockwise
    from companion.kernels.fp8_gemm import accumulation_error_bound, fp8_blockwise_matmul_reference

    torch.manual_seed(0)
    layer = QuantLinear(K, N, recipe="fp8_deepseek", backend="kernels", device="cuda")
    x = torch.randn(M, K, device="cuda", requires_grad=True)
    dy = torch.randn(M, N, device="cuda")
    y = layer(x)
    y.backward(dy)
    w = layer.weight.detach()
    operands = {
        "y": (quantize_fp8_blockwise(x.detach(), (1, 128)), quantize_fp8_blockwise(w, (128, 128))),
        "dx": (quantize_fp8_blockwise(dy, (1, 128)), quantize_fp8_blockwise(w.t(), (128, 128))),
        "dw": (quantize_fp8_blockwise(dy.t(), (1, 128)), quantize_fp8_blockwise(x.detach().t(), (1, 128))),
    }
    got = {"y": y.detach() - layer.bias.detach(), "dx": x.grad, "dw": layer.weight.grad}
    for name, (a, b) in operands.items():
        a, b = tuple(t.cpu() for t in a), tuple(t.cpu() for t in b)
        exact = fp8_blockwise_matmul_reference(*a, *b)
        bound = accumulation_error_bound(*a, *b, unit_roundoff=2.0 ** -13, out_dtype=torch.float32)
        error = (got[name].double().cpu() - exact).abs()
        assert (error <= bound + 1e-6 * exact.abs().max()).all(), name
    assert torch.equal(layer.bias.grad, dy.sum(0))
    # the simulated recipe computes the same products up to rounding (float64 vs float32 quotients)
    sim = QuantLinear.from_linear(layer, "fp8_deepseek")
    torch.testing.assert_close(sim(x), y, rtol=2e-2, atol=2e-2 * y.abs().max().item())
