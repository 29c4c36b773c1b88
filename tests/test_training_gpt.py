"""companion.training.gpt and toy: the corpus is fixed, the model has the right shapes, training learns,
is deterministic for a seed, and can switch recipe for its last steps; the toy problems behave."""
import dataclasses
import hashlib
import math
import platform

import pytest
import torch

from companion.training import QuantLinear, QuantSpec, gpt, toy

TINY = dataclasses.replace(gpt.CPU_CONFIG, context=16, batch=4, layers=1, width=32, heads=2, eval_every=5,
                           eval_batches=2)


@pytest.fixture(scope="module")
def data():
    return gpt.split()


def test_corpus_is_fixed_for_this_python():
    text = gpt.corpus()
    assert text == "\n\n".join(gpt.documents.__wrapped__()).encode("utf-8")  # read afresh: the same bytes
    digest = hashlib.sha256(text).hexdigest()
    assert digest == gpt.corpus_sha256()
    known = gpt.CORPUS_SHA256.get(platform.python_version())
    if known is None:
        pytest.skip(f"no recorded SHA-256 for Python {platform.python_version()} (this one is {digest})")
    assert digest == known


def test_corpus_is_text_and_the_split_is_disjoint(data):
    text = gpt.corpus()
    assert len(text) > 300_000 and text.decode("utf-8")
    train, val = data
    assert train.dtype == val.dtype == torch.uint8
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.2
    documents = gpt.documents()
    assert len(set(documents)) == len(documents)
    assert bytes(val[: len(documents[0].encode())].tolist()) == documents[0].encode()  # document 0 is held out


def test_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = gpt.GPT(TINY)
    idx = torch.randint(256, (3, TINY.context))
    logits = model(idx)
    assert logits.shape == (3, TINY.context, 256)
    logits, loss = model(idx, idx)
    assert abs(loss.item() - math.log(256)) < 0.1  # small initial weights: nearly uniform over the bytes
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, TINY.context + 1, dtype=torch.long))
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.0.mlp.up", "blocks.0.mlp.down", "head"]


def test_attention_is_causal():
    torch.manual_seed(0)
    model = gpt.GPT(TINY).eval()
    idx = torch.randint(256, (1, TINY.context))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 256
    assert torch.equal(model(idx)[0, :-1], model(changed)[0, :-1])


def test_batches_are_next_byte_windows(data):
    x, y = gpt.get_batch(data[0], 5, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_schedule():
    cfg = gpt.CPU_CONFIG
    assert gpt.lr_at(0, 100, cfg) == cfg.lr / cfg.warmup
    assert gpt.lr_at(cfg.warmup - 1, 100, cfg) == cfg.lr
    assert gpt.lr_at(100, 100, cfg) == pytest.approx(cfg.lr / 10)


def test_training_learns_and_is_deterministic(data):
    a = gpt.train(TINY, "fp32", 30, seed=0, data=data)
    b = gpt.train(TINY, "fp32", 30, seed=0, data=data)
    c = gpt.train(TINY, "fp32", 30, seed=1, data=data)
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert a.train_loss != c.train_loss
    assert a.val_steps == [5, 10, 15, 20, 25, 30]
    assert a.val_loss[-1] < a.val_loss[0] < math.log(256)


def test_stochastic_rounding_runs_are_deterministic_for_a_seed(data):
    a = gpt.train(TINY, "nvfp4_sr", 6, seed=0, data=data)
    b = gpt.train(TINY, "nvfp4_sr", 6, seed=0, data=data)
    assert a.train_loss == b.train_loss


def test_switching_recipe_for_the_last_steps(data, monkeypatch):
    seen = []
    use = gpt._use_recipe

    def spy(model, recipe, skip):
        use(model, recipe, skip)
        seen.append((recipe, sorted({m.recipe.name for m in model.modules() if isinstance(m, QuantLinear)})))
        assert not isinstance(model.head, QuantLinear)  # skipped: stays float32

    monkeypatch.setattr(gpt, "_use_recipe", spy)
    switched = gpt.train(TINY, "nvfp4_sr", 10, seed=0, final_recipe="nvfp4_forward", final_steps=4, data=data)
    assert seen == [("nvfp4_sr", ["nvfp4_sr"]), ("nvfp4_forward", ["nvfp4_forward"])]
    assert switched.recipe == "nvfp4_sr -> nvfp4_forward"
    monkeypatch.setattr(gpt, "_use_recipe", use)
    plain = gpt.train(TINY, "nvfp4_sr", 10, seed=0, data=data)
    assert switched.train_loss[:6] == plain.train_loss[:6]  # the same run until the switch
    assert switched.train_loss[6:] != plain.train_loss[6:]
    with pytest.raises(ValueError, match="final_recipe"):
        gpt.train(TINY, "fp32", 10, final_steps=2, data=data)


def test_gradient_noise(data):
    torch.manual_seed(0)
    model = gpt.GPT(TINY)
    x, y = gpt.get_batch(data[0], 4, TINY.context, torch.Generator().manual_seed(0))
    norm, noise = gpt.gradient_noise(model, x, y, "fp32")
    assert norm > 0 and noise == 0
    norm8, noise8 = gpt.gradient_noise(model, x, y, "fp8_deepseek")
    norm4, noise4 = gpt.gradient_noise(model, x, y, "nvfp4_sr")
    assert norm8 == norm4 == norm and 0 < noise8 < noise4
    assert all(p.grad is None for p in model.parameters())
    run = gpt.train(TINY, "nvfp4_sr", 10, seed=0, data=data, measure_noise=True)
    assert len(run.grad_norm) == len(run.noise_norm) == len(run.val_steps) == 2


def test_digits_helpers():
    X, y, Xt, yt = toy.digits_split()
    assert X.shape == (1347, 64) and Xt.shape == (450, 64) and X.dtype == torch.float64
    model = toy.fit(toy.digits_mlp(), X, y, steps=30, lr=1e-2)
    assert toy.correct(model, Xt, yt) > 0.8 * len(yt)


def test_least_squares_descent():
    problem = toy.least_squares(n=64, d=4)
    exact = toy.descend(problem, 60, lr=0.3)
    assert exact.loss[-1] < 1e-6 * exact.loss[0] and exact.noise_norm == [0.0] * 60
    w = torch.zeros(4, dtype=torch.float64)
    assert torch.allclose(problem.gradient(w), problem.X.T @ (-problem.y) / 64)
    fp4 = toy.descend(problem, 60, lr=0.3, spec=QuantSpec.nvfp4("stochastic"))
    assert fp4.loss[0] == exact.loss[0] and fp4.loss[-1] > exact.loss[-1] and min(fp4.noise_norm) > 0
    back = toy.descend(problem, 60, lr=0.3, spec=QuantSpec.nvfp4("stochastic"), switch_at=30)
    assert back.loss[:31] == fp4.loss[:31] and back.noise_norm[30:] == [0.0] * 30
