"""A transformer block built from ``torch.nn`` modules, and where its FLOPs and bytes go.

The block is written so that every operation worth naming runs in a submodule of its own — the
projections, the score and mixing matmuls, the softmax, the norms, the activation — because PyTorch's
:class:`torch.utils.flop_counter.FlopCounterMode` attributes FLOPs to the module that runs them.
:func:`count_by_operation` runs a model under that counter and under a byte counter and sums both by
operation. Build the block on the ``meta`` device to count a 7B-sized layer without allocating it.

Two styles:

* ``"bert"`` (BERT, MiniLM): post-norm LayerNorm, biases, a GELU MLP of two matrices;
* ``"llama"`` (LLaMA): pre-norm RMSNorm, no biases, a SwiGLU MLP of three matrices. Rotary position
  embeddings are left out: they are elementwise work of the size of a residual add.

FLOPs of elementwise operations
-------------------------------
The counter knows only matrix products; elementwise operations are counted here with the
conventions of :data:`ELEMENTWISE_FLOPS` (FLOPs per element of the largest tensor the operation reads
or writes: one for an add, five for a softmax, ...). They are conventions, not measurements — an
exponential costs a GPU more than an add — and the chapter checks that its conclusions survive
multiplying them tenfold.

Bytes
-----
Each operation is charged its compulsory traffic as if it ran alone: every tensor it reads and
every tensor it writes, once (an embedding lookup reads only the rows it gathers). Views cost
nothing. Fused kernels move less; this is what an unfused run must move.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

__all__ = [
    "MatMul",
    "SelfAttention",
    "MLP",
    "TransformerBlock",
    "ELEMENTWISE_FLOPS",
    "OPERATIONS",
    "OTHER",
    "count_by_operation",
]

aten = torch.ops.aten


class MatMul(nn.Module):
    """``a @ b`` as a module, so that the FLOP counter can name it."""

    def forward(self, a, b):
        return a @ b


class SelfAttention(nn.Module):
    """Multi-head self-attention with the score matrix computed explicitly."""

    def __init__(self, hidden: int, heads: int, *, bias: bool):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(hidden, hidden, bias=bias)
        self.k = nn.Linear(hidden, hidden, bias=bias)
        self.v = nn.Linear(hidden, hidden, bias=bias)
        self.scores = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.mix = MatMul()
        self.out = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x):                                        # x: (batch, seq, hidden)
        b, s, h = x.shape

        def split(t):                                            # -> (batch, heads, seq, head_dim)
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        q = q * (1.0 / math.sqrt(h // self.heads))
        p = self.softmax(self.scores(q, k.transpose(-2, -1)))   # (batch, heads, seq, seq)
        y = self.mix(p, v)                                       # (batch, heads, seq, head_dim)
        return self.out(y.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    """``down(act(up(x)))`` (GELU) or ``down(act(gate(x)) * up(x))`` (SwiGLU)."""

    def __init__(self, hidden: int, intermediate: int, *, kind: str, bias: bool):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"MLP kind must be 'gelu' or 'swiglu', got {kind!r}")
        self.kind = kind
        if kind == "swiglu":
            self.gate = nn.Linear(hidden, intermediate, bias=bias)
        self.up = nn.Linear(hidden, intermediate, bias=bias)
        self.act = nn.GELU() if kind == "gelu" else nn.SiLU()
        self.down = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        if self.kind == "gelu":
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    """One encoder (``style="bert"``) or decoder (``style="llama"``) layer; see the module docstring."""

    def __init__(self, hidden: int, heads: int, intermediate: int, *, style: str = "bert"):
        super().__init__()
        if style not in ("bert", "llama"):
            raise ValueError(f"style must be 'bert' or 'llama', got {style!r}")
        self.style = style
        bert = style == "bert"
        self.attn = SelfAttention(hidden, heads, bias=bert)
        self.mlp = MLP(hidden, intermediate, kind="gelu" if bert else "swiglu", bias=bert)
        norm = nn.LayerNorm if bert else nn.RMSNorm
        self.norm1, self.norm2 = norm(hidden), norm(hidden)

    def forward(self, x):                                        # x: (batch, seq, hidden)
        if self.style == "bert":                                 # post-norm
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x))                         # pre-norm
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------

# FLOPs per element (of the largest tensor an operation reads or writes), by convention; keyed, as
# the counter's own formulas are, by operator overload packet.
ELEMENTWISE_FLOPS = {
    aten.add: 1, aten.add_: 1, aten.mul: 1, aten.div: 1, aten.pow: 1, aten.rsqrt: 1,
    aten.mean: 1,                  # one add per element read
    aten._softmax: 5,              # max, subtract, exp, sum, divide
    aten.native_layer_norm: 7,     # mean, subtract, square, sum, scale, weight, bias
    aten.gelu: 5,                  # x/√2, erf, +1, ·½, ·x
    aten.silu: 4,                  # negate, exp, +1, divide
}

# The leaf module that runs an operation names it; anything else (residual adds, the query
# scaling, the SwiGLU product, copies) is elementwise work of the block itself.
OPERATIONS = {
    "embed": "embedding lookup",
    "q": "QKV projections", "k": "QKV projections", "v": "QKV projections",
    "scores": "attention scores QKᵀ",
    "softmax": "softmax",
    "mix": "attention × V",
    "out": "output projection",
    "gate": "MLP matmuls", "up": "MLP matmuls", "down": "MLP matmuls",
    "act": "MLP activation",
    "norm1": "norms", "norm2": "norms", "norm": "norms",
    "head": "output head",
}
OTHER = "residuals, scaling, copies"

# Operations that only reinterpret memory.
_VIEWS = {
    aten.view, aten._unsafe_view, aten.t, aten.transpose, aten.expand, aten.permute, aten.unsqueeze,
    aten.squeeze, aten.detach, aten.alias, aten.lift_fresh, aten.slice, aten.select, aten.split,
}


def _shapes(obj):
    """The torch.Size objects in nested args (pytree would flatten a Size into its ints)."""
    if isinstance(obj, torch.Size):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _shapes(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _shapes(item)


def _largest_numel(*shapes_and_more):
    return max((math.prod(s) for s in _shapes(shapes_and_more)), default=0)


def _elementwise_formula(per_element):
    def formula(*args, out_shape=None, **kwargs):
        return per_element * _largest_numel(args, kwargs, out_shape)
    return formula


def _operation(module_names) -> str:
    """The operation an aten call belongs to, from the names of the modules it runs inside."""
    inside = [name for name in module_names if name != "Global"]
    if not inside:
        return OTHER
    deepest = max(inside, key=lambda name: name.count("."))
    return OPERATIONS.get(deepest.rsplit(".", 1)[-1], OTHER)


class _TrafficMode(TorchDispatchMode):
    """Elements read and written by every non-view aten call, by operation."""

    def __init__(self, tracker: ModuleTracker):
        super().__init__()
        self.tracker = tracker
        self.elements = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in _VIEWS:
            return out
        written = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func.overloadpacket is aten.embedding:
            weight, indices = args[0], args[1]
            read = [indices.numel(), indices.numel() * weight.shape[-1]]  # only the gathered rows
        else:
            read = [t.numel() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func.overloadpacket is aten.native_layer_norm:
            written = written[:1]  # the saved mean and 1/std are per row: negligible, and kept on chip
        self.elements[_operation(self.tracker.parents)] += sum(read) + sum(written)
        return out


def count_by_operation(model: nn.Module, *inputs) -> dict[str, dict[str, int]]:
    """Run ``model(*inputs)`` and return ``{operation: {"flops": ..., "elements": ...}}``.

    FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (its own formulas for matrix
    products, :data:`ELEMENTWISE_FLOPS` for the rest); ``elements`` are the tensor elements the
    operation reads and writes, unfused (see the module docstring). Every operation of
    :data:`OPERATIONS` that has a module in ``model`` is listed, with zeros if it did no work, and
    the FLOPs sum to the counter's total. Runs under ``torch.no_grad()``; meta tensors are fine.
    """
    custom = {op: _elementwise_formula(n) for op, n in ELEMENTWISE_FLOPS.items()}
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    tracker = ModuleTracker()
    with torch.no_grad():
        with counter:
            model(*inputs)
        with tracker, _TrafficMode(tracker) as traffic:
            model(*inputs)

    present = {OPERATIONS[name.rsplit(".", 1)[-1]] for name, _ in model.named_modules()
               if name.rsplit(".", 1)[-1] in OPERATIONS}
    flops = defaultdict(int)
    counts = counter.get_flop_counts()
    for name, by_op in counts.items():
        leaf = name.rsplit(".", 1)[-1]
        if name != "Global" and leaf in OPERATIONS:
            flops[OPERATIONS[leaf]] += sum(by_op.values())
    total = counter.get_total_flops()
    other = total - sum(flops.values())
    if other:
        flops[OTHER] += other
    names = [op for op in dict.fromkeys(OPERATIONS.values()) if op in present or flops[op] or traffic.elements[op]]
    if flops[OTHER] or traffic.elements[OTHER]:
        names.append(OTHER)
    result = {op: {"flops": int(flops[op]), "elements": int(traffic.elements[op])} for op in names}
    assert sum(r["flops"] for r in result.values()) == total
    return result
