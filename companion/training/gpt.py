"""A small GPT trained on bytes, and the loop that trains it under any recipe of ``companion.training``.

In the style of nanoGPT: a decoder of pre-LayerNorm blocks (causal self-attention, then a GELU MLP),
learned token and position embeddings, a linear head over the 256 byte values. Every matrix
multiplication with a weight is an ``nn.Linear``, so that :func:`companion.training.quantize_model`
(fully quantized training) or :func:`companion.training.prepare_qat` (fake quantization) can swap it.
The attention products (QKᵀ, PV), the softmax, the norms, the residual stream and the embeddings are
left in float32: the high-precision glue of every low-precision recipe.

The corpus needs no download: the docstrings of a fixed list of standard-library modules, read from
the running Python (:func:`corpus`). Their text differs a little between Python versions; for a
given version it is fixed, and :data:`CORPUS_SHA256` records the hashes seen.

Pieces, in order: :func:`documents`, :func:`corpus` and :func:`split` (the data); :class:`GPTConfig`
and :class:`GPT` (the model); :func:`get_batch`, :func:`lr_at`, :func:`evaluate`,
:func:`gradient_noise` and :func:`train` (the loop), which returns a :class:`TrainResult`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.transformer import MLP

__all__ = [
    "CORPUS_MODULES",
    "CORPUS_SHA256",
    "documents",
    "corpus",
    "corpus_sha256",
    "split",
    "GPTConfig",
    "CPU_CONFIG",
    "GPU_CONFIG",
    "GPT",
    "get_batch",
    "gradient_noise",
    "lr_at",
    "evaluate",
    "TrainResult",
    "train",
]

# --------------------------------------------------------------------------
# Data: docstrings of the standard library, as bytes
# --------------------------------------------------------------------------

# Pure-Python modules with long docstrings, present in Python 3.10 to 3.13. The list is fixed; the text
# is the running Python's.
CORPUS_MODULES = (
    "argparse", "ast", "base64", "bdb", "calendar", "cmd", "code", "codecs", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "doctest", "enum",
    "fileinput", "fractions", "ftplib", "functools", "gettext", "graphlib", "heapq", "imaplib",
    "inspect", "ipaddress", "json", "logging", "mailbox", "mimetypes", "optparse", "pathlib", "pdb",
    "pickletools", "pkgutil", "pprint", "queue", "random", "re", "shelve", "shlex", "shutil",
    "smtplib", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "uuid", "wave",
    "zipfile",
)

# SHA-256 of corpus() by Python version (platform.python_version()), for the versions it was computed on.
# Docstrings change between versions, so each has its own corpus; each one is fixed.
CORPUS_SHA256 = {
    "3.10.13": "42257f09035045d85e1f9a11000ccb851477e3ef38ca8d42562d86adc3d0c0f9",
    "3.11.7": "05984286d33573315faccdc01d089f88f0de6319451447df4894fa1d67c48bfc",
    "3.12.1": "7a4a6a23940d4f780eb651a56c0edf973f6b2a96117591c18c7463a68ad5d206",
    "3.12.3": "62d2a7160fc43e1d815fd1b641627e906580dc1a36815f9c876838bdc5c9547a",
    "3.13.0": "f54d29610961a4002ba588dd030614b8c8eb7d520c6a91bc702daa8168f75b42",
}


def _docstrings(module_name):
    """{qualified name: cleaned docstring} of a module, its public classes and functions, their methods."""
    module = importlib.import_module(module_name)
    found = {module_name: module.__doc__}
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue  # private, or imported from elsewhere
        if inspect.isfunction(obj):
            found[f"{module_name}.{name}"] = obj.__doc__
        elif inspect.isclass(obj):
            found[f"{module_name}.{name}"] = obj.__doc__
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    found[f"{module_name}.{name}.{attr}"] = member.__doc__
    return {key: inspect.cleandoc(doc) for key, doc in found.items() if doc and doc.strip()}


# Run in a fresh interpreter (see documents) after the source of _docstrings.
_COLLECT = """
named = {}
for module_name in sys.argv[1:]:
    named.update(_docstrings(module_name))
documents = []
for key in sorted(named):
    if named[key] not in documents:
        documents.append(named[key])
sys.stdout.write(json.dumps(documents))
"""


@functools.lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """The corpus's documents: docstrings sorted by qualified name, each text once.

    They are read in a fresh, isolated interpreter (``python -I``), because a library imported into
    this process may patch a standard-library function and its docstring (some do).
    """
    script = "import importlib, inspect, json, sys, warnings\nwarnings.simplefilter('ignore')\n"
    script += inspect.getsource(_docstrings) + _COLLECT
    run = subprocess.run([sys.executable, "-I", "-c", script, *CORPUS_MODULES], capture_output=True,
                         text=True, check=True)
    return tuple(json.loads(run.stdout))


def corpus() -> bytes:
    """Every document, UTF-8 encoded, separated by blank lines. Deterministic for a Python version."""
    return "\n\n".join(documents()).encode("utf-8")


def corpus_sha256() -> str:
    return hashlib.sha256(corpus()).hexdigest()


def split(every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors (uint8): every ``every``-th document goes to validation."""
    docs = documents()
    val = [d for i, d in enumerate(docs) if i % every == 0]
    train_docs = [d for i, d in enumerate(docs) if i % every != 0]

    def as_tensor(parts):
        return torch.frombuffer(bytearray("\n\n".join(parts).encode("utf-8")), dtype=torch.uint8)

    return as_tensor(train_docs), as_tensor(val)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GPTConfig:
    context: int = 32          # tokens (bytes) a sequence sees
    layers: int = 2
    heads: int = 4
    width: int = 64            # d_model; the MLP is 4 * width wide
    vocab: int = 256           # byte values
    batch: int = 16            # sequences per step
    lr: float = 3e-3           # peak learning rate of AdamW
    warmup: int = 50           # steps of linear warm-up, then cosine decay to lr / 10
    eval_every: int = 25       # steps between validation losses
    eval_batches: int = 4      # fixed validation batches per evaluation


# 135k parameters, 512 tokens a step: seconds per recipe on two CPU cores for a few hundred steps
# (simulated FP4 costs ten times what FP32 does: every operand is quantized in float64).
CPU_CONFIG = GPTConfig()
# 3.2M parameters, 8192 tokens a step: 280 steps are about six passes over the corpus.
GPU_CONFIG = GPTConfig(context=128, layers=4, heads=4, width=256, batch=64, lr=2e-3, warmup=50,
                       eval_every=20, eval_batches=8)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width ({config.width}) must be a multiple of heads ({config.heads})")
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)

    def forward(self, x):                                       # x: (batch, time, width)
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)                   # each (batch, time, width)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, time, head_dim)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``. The residual stream stays float32."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config.width, 4 * config.width, kind="gelu", bias=True)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Embeddings, ``config.layers`` blocks, a final LayerNorm and an (untied) linear head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token = nn.Embedding(config.vocab, config.width)
        self.position = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():   # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):                       # idx: (batch, time) int64
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.config.context})")
        x = self.token(idx) + self.position(torch.arange(t, device=idx.device))  # (batch, time, width)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))                        # (batch, time, vocab)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

def get_batch(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    """``batch`` random windows of ``data``: inputs and the next bytes, each (batch, context) int64."""
    starts = torch.randint(len(data) - context - 1, (batch,), generator=generator)
    windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()]).long()  # (batch, context+1)
    return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, steps: int, config: GPTConfig) -> float:
    """Linear warm-up over ``config.warmup`` steps, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model: GPT, batches) -> float:
    """Mean loss over fixed (inputs, targets) batches, computed the way the model computes now."""
    was_training = model.training
    model.eval()
    loss = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    model.train(was_training)
    return loss


@dataclasses.dataclass
class TrainResult:
    recipe: str                  # the recipe, "a -> b" when the last steps switched
    steps: int
    train_loss: list             # one per step
    val_steps: list              # steps after which the validation loss (and gradient noise) was measured
    val_loss: list
    grad_norm: list              # ||g||, full-precision gradient, at val_steps (with measure_noise)
    noise_norm: list             # ||ĝ - g||, error of the recipe's gradient, at val_steps (with measure_noise)
    seconds: float

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _use_recipe(model: GPT, recipe: str, skip) -> None:
    """Make every ``nn.Linear`` of ``model`` (but ``skip``) compute with ``recipe``, keeping the parameters.

    The parameters are the same tensors before and after, so the optimizer's state carries over
    when a run switches recipe. "fp32" is plain ``nn.Linear``.
    """
    from companion.training import dequantize_model, quantize_model

    dequantize_model(model)
    if recipe != "fp32":
        quantize_model(model, recipe, skip=skip)


def _gradient(model: GPT, x, y) -> torch.Tensor:
    """All parameter gradients of the loss on (x, y), flattened into one vector."""
    model.zero_grad(set_to_none=True)
    model(x, y)[1].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def gradient_noise(model: GPT, x, y, recipe: str, skip=("head",)) -> tuple[float, float]:
    """``(||g||, ||ĝ - g||)`` on one batch: g in FP32, ĝ as ``recipe`` computes it, at the same weights.

    ĝ - g is everything the recipe changes in the gradient: the rounding of the forward pass and the
    noise of the backward one. The model is left computing with ``recipe`` and with no gradients.
    """
    _use_recipe(model, "fp32", skip)
    g = _gradient(model, x, y)
    _use_recipe(model, recipe, skip)
    g_hat = _gradient(model, x, y)
    model.zero_grad(set_to_none=True)
    return float(g.norm()), float((g_hat - g).norm())


def train(config: GPTConfig, recipe: str = "fp32", steps: int = 300, seed: int = 0, *,
          final_recipe: str | None = None, final_steps: int = 0, measure_noise: bool = False,
          device="cpu", skip=("head",), data=None, log=None) -> TrainResult:
    """Train a fresh :class:`GPT` for ``steps`` steps with ``recipe``; the last ``final_steps`` with ``final_recipe``.

    ``recipe`` names an entry of ``companion.training.RECIPES`` ("fp32" trains plain float32). The
    linear layers named in ``skip`` stay in float32 (by default the head, as the FP8 and FP4 recipes
    keep it). AdamW, gradient clipping at 1, the schedule of :func:`lr_at`. Every
    ``config.eval_every`` steps the validation loss is measured on fixed batches, and with
    ``measure_noise`` also :func:`gradient_noise` on that step's batch at the updated weights (two
    more backward passes, which draw random bits: a run that measures differs from one that does not).
    On the CPU a run is deterministic for a given seed: the same initial weights, batches and random
    bits for stochastic rounding. ``data`` is ``split()``'s pair, to reuse across runs.
    """
    if final_recipe is None and final_steps:
        raise ValueError("final_steps needs a final_recipe")
    if not 0 <= final_steps <= steps:
        raise ValueError(f"final_steps must lie in [0, steps={steps}], got {final_steps}")
    train_data, val_data = data if data is not None else split()
    torch.manual_seed(seed)                           # the initial weights and the bits of stochastic rounding
    model = GPT(config).to(device)
    _use_recipe(model, recipe, skip)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches = torch.Generator().manual_seed(seed)
    val_gen = torch.Generator().manual_seed(12345)    # the same validation windows for every run
    val_batches = [tuple(t.to(device) for t in get_batch(val_data, config.batch, config.context, val_gen))
                   for _ in range(config.eval_batches)]
    name = recipe if not final_steps else f"{recipe} -> {final_recipe}"
    result = TrainResult(name, steps, [], [], [], [], [], 0.0)
    current = recipe
    start = time.perf_counter()
    for step in range(steps):
        if final_steps and step == steps - final_steps:
            current = final_recipe
            _use_recipe(model, current, skip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, config)
        x, y = (t.to(device) for t in get_batch(train_data, config.batch, config.context, batches))
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        result.train_loss.append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            result.val_steps.append(step + 1)
            result.val_loss.append(evaluate(model, val_batches))
            if measure_noise:
                g, e = gradient_noise(model, x, y, current, skip)
                result.grad_norm.append(g)
                result.noise_norm.append(e)
            if log is not None:
                print(f"{name}: step {step + 1} train {loss.item():.3f} val {result.val_loss[-1]:.3f}",
                      file=log, flush=True)
    result.seconds = time.perf_counter() - start
    return result
