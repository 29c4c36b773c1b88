"""Two small problems for the training chapter: a digits classifier and a least-squares fit.

**Digits.** scikit-learn's bundled handwritten digits (1797 images of 8×8 pixels), split three to one,
and a two-layer perceptron 64 → 128 → 10 trained full-batch with Adam in float64 — the network of the
K-means chapter. On one thread the sums come out in the same order on every machine, so accuracies are
exact counts that do not depend on the CPU.

**Least squares.** ``L(w) = ||X w - y||² / (2n)`` is a quadratic whose gradient is the weight gradient
of a linear layer, ``Xᵀ dY`` with ``dY = (X w - y) / n``. Fully quantized training computes that product
from quantized operands, so the optimizer receives ``ĝ = Q(X)ᵀ Q(dY)`` instead of ``g = Xᵀ dY``. The
quantization noise ``ĝ - g`` is set by the size of X and of the residuals, which do not vanish at the
minimum (the targets are noisy), while ``g`` does: late in training the noise wins.
:func:`descend` runs gradient descent with either gradient and records the loss, ``||g||`` and
``||ĝ - g||`` at every step.
"""
from __future__ import annotations

import dataclasses

import torch

from companion.training.quantizers import QuantSpec, quantize_dequantize

__all__ = [
    "digits_split",
    "digits_mlp",
    "fit",
    "correct",
    "LeastSquares",
    "least_squares",
    "Descent",
    "descend",
]

# --------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------


def digits_split(train: int = 1347, seed: int = 0):
    """``(X_train, y_train, X_test, y_test)``: pixels scaled to [0, 1] (float64), labels (int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)           # (1797, 64)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return X[order[:train]], y[order[:train]], X[order[train:]], y[order[train:]]


def digits_mlp(seed: int = 0, hidden: int = 128) -> torch.nn.Sequential:
    """64 → ``hidden`` → ReLU → 10, float64, initialised from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)).double()


def fit(model, X, y, steps: int, lr: float, params=None) -> torch.nn.Module:
    """Full-batch Adam on the cross-entropy for ``steps`` steps (all parameters unless ``params``)."""
    optimizer = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model


@torch.no_grad()
def correct(model, X, y) -> int:
    """How many of the images ``model`` classifies right."""
    return int((model(X).argmax(1) == y).sum())


# --------------------------------------------------------------------------
# Least squares with a quantized weight gradient
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeastSquares:
    X: torch.Tensor          # (n, d) inputs
    y: torch.Tensor          # (n,) targets: X w_true + noise
    minimum: float           # the least loss, at the least-squares solution

    def loss(self, w) -> float:
        """L(w) - min L: the excess loss, zero at the solution."""
        return float(((self.X @ w - self.y) ** 2).mean() / 2) - self.minimum

    def gradient(self, w, spec: QuantSpec | None = None, generator=None) -> torch.Tensor:
        """``Xᵀ dY``, or with ``spec`` ``Q(X)ᵀ Q(dY)``: both operands blocked along n, the contraction axis."""
        dY = (self.X @ w - self.y) / len(self.y)                        # (n,)
        if spec is None:
            return self.X.T @ dY                                         # (d,)
        Xq = quantize_dequantize(self.X, spec, axis=0, generator=generator)
        return Xq.T @ quantize_dequantize(dY, spec, axis=0, generator=generator)


def least_squares(n: int = 512, d: int = 32, noise: float = 0.5, seed: int = 0) -> LeastSquares:
    """A random problem in float64: Gaussian X, y = X w_true + ``noise`` · Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(d, generator=gen, dtype=torch.float64) + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    solution = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)
    return LeastSquares(X, y, float(((X @ solution - y) ** 2).mean() / 2))


@dataclasses.dataclass
class Descent:
    loss: list              # excess loss before each step
    grad_norm: list         # ||g||, the full-precision gradient, before each step
    noise_norm: list        # ||ĝ - g||, the quantization error of the gradient used (0 in full precision)

    @property
    def ratio(self) -> list:
        """||g|| / ||ĝ - g|| at each quantized step."""
        return [g / e if e else float("inf") for g, e in zip(self.grad_norm, self.noise_norm)]


def descend(problem: LeastSquares, steps: int, lr: float, spec: QuantSpec | None = None,
            switch_at: int | None = None, seed: int = 1) -> Descent:
    """Gradient descent from w = 0 with the gradient computed under ``spec`` (full precision from ``switch_at`` on).

    ``seed`` seeds the generator of stochastic rounding.
    """
    generator = torch.Generator().manual_seed(seed)
    w = torch.zeros(problem.X.shape[1], dtype=torch.float64)
    out = Descent([], [], [])
    for step in range(steps):
        g = problem.gradient(w)
        quantized = spec is not None and (switch_at is None or step < switch_at)
        g_hat = problem.gradient(w, spec, generator) if quantized else g
        out.loss.append(problem.loss(w))
        out.grad_norm.append(float(g.norm()))
        out.noise_norm.append(float((g_hat - g).norm()))
        w = w - lr * g_hat
    return out
