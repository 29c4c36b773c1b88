"""The training chapter's GPU measurements: loss curves of the byte-level GPT under each recipe, and
the time of one training step of a transformer block with BF16 and with FP8 GEMMs.

    python -m companion.book bench training        # -> book/data/training.json  (under 4 minutes on an H200)

Loss curves: :data:`companion.training.gpt.GPU_CONFIG`, every recipe of :data:`RUNS` from the same
seed, the simulated recipes of :mod:`companion.training.recipes` (quantize, dequantize, FP32 GEMM), with
the gradient noise of each recipe measured at every evaluation.

Step time: one pre-LayerNorm block (:class:`companion.training.gpt.Block`) at ``width`` 4096 on 8192
tokens (4 sequences of 2048), forward and backward, under ``torch.autocast`` to BF16, with its four
linear layers as ``nn.Linear`` (BF16 cuBLAS GEMMs) or as :class:`companion.training.QuantLinear` with the
``fp8_deepseek`` recipe on FP8 Tensor Cores (``backend="kernels"``). Each of the block's linear layers is
also timed alone, to separate the GEMMs from everything else a step does, and the pieces of one layer
(:func:`gemm_times`): its three GEMMs in BF16 and in FP8, and each FP8 quantization. Median of
``triton.testing.do_bench``.
"""
from __future__ import annotations

import dataclasses
import platform

import torch

from companion.book.bench import _median_ms
from companion.training import gpt
from companion.training.quant_linear import _dgrad_kernels, _forward_kernels, _fp8, _wgrad_kernels

__all__ = ["RUNS", "STEPS", "measure_training", "loss_curves", "block_step_ms", "linear_step_ms", "gemm_times",
           "step_times"]

STEPS = 280
# (name in the JSON, recipe, recipe of the last fifth of the steps or None)
RUNS = (
    ("fp32", "fp32", None),
    ("bf16", "bf16", None),
    ("fp8_hybrid", "fp8_hybrid", None),
    ("fp8_deepseek", "fp8_deepseek", None),
    ("mxfp4", "mxfp4", None),
    ("nvfp4_sr", "nvfp4_sr", None),
    ("nvfp4_rtn", "nvfp4_rtn", None),
    ("nvfp4_sr_then_forward", "nvfp4_sr", "nvfp4_forward"),
)


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU; torch.cuda.is_available() is False")


def loss_curves(config: gpt.GPTConfig = gpt.GPU_CONFIG, steps: int = STEPS, seed: int = 0, runs=RUNS, log=None) -> dict:
    """{run name: TrainResult.to_dict()} for the runs of ``runs``, trained on the GPU."""
    _require_cuda("training the GPU configuration")
    data = gpt.split()
    curves = {}
    for name, recipe, final in runs:
        result = gpt.train(config, recipe, steps, seed, final_recipe=final, final_steps=steps // 5 if final else 0,
                           measure_noise=True, device="cuda", data=data, log=log)
        curves[name] = result.to_dict()
    return curves


def _quantized(module, fp8: bool):
    if fp8:
        from companion.training import quantize_model

        return quantize_model(module, "fp8_deepseek", backend="kernels")
    return module


def block_step_ms(fp8: bool, width: int = 4096, heads: int = 32, sequences: int = 4, context: int = 2048) -> float:
    """Forward + backward of one :class:`~companion.training.gpt.Block` (FP32 master weights, BF16 autocast)."""
    _require_cuda("timing a block")
    config = gpt.GPTConfig(context=context, layers=1, heads=heads, width=width)
    torch.manual_seed(0)
    block = _quantized(gpt.Block(config).cuda(), fp8)
    x = torch.randn(sequences, context, width, device="cuda", requires_grad=True)  # (batch, time, width)
    dy = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)
        y.backward(dy)
        x.grad = None
        for p in block.parameters():
            p.grad = None

    return _median_ms(step)


def linear_step_ms(fp8: bool, in_features: int, out_features: int, tokens: int = 8192) -> float:
    """Forward + backward (three GEMMs) of one linear layer on ``tokens`` rows, BF16 autocast or FP8."""
    _require_cuda("timing a linear layer")
    torch.manual_seed(0)
    layer = _quantized(torch.nn.Linear(in_features, out_features).cuda(), fp8)
    x = torch.randn(tokens, in_features, device="cuda", requires_grad=True)
    dy = torch.randn(tokens, out_features, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dy.to(y.dtype))
        x.grad = layer.weight.grad = layer.bias.grad = None

    return _median_ms(step)


def gemm_times(in_features: int = 4096, out_features: int = 16384, tokens: int = 8192) -> dict:
    """Milliseconds of the pieces of one linear layer's step: the three GEMMs in BF16 (cuBLAS), the same
    three as ``QuantLinear(backend="kernels")`` runs them (each quantizing its activation and gradient
    operands; the weight's tiles are quantized once, beforehand), and each FP8 quantization alone."""
    _require_cuda("timing GEMMs")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, in_features, device="cuda", generator=gen)         # (M, K)
    w = torch.randn(out_features, in_features, device="cuda", generator=gen)   # (N, K)
    dy = torch.randn(tokens, out_features, device="cuda", generator=gen)       # (M, N)
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    bf16 = {"forward": lambda: xb @ wb.t(), "dgrad": lambda: dyb @ wb, "wgrad": lambda: dyb.t() @ xb}
    w_fp8 = _fp8(w, (128, 128))
    fp8 = {"forward": lambda: _forward_kernels(x, None, w_fp8), "dgrad": lambda: _dgrad_kernels(dy, w_fp8),
           "wgrad": lambda: _wgrad_kernels(dy, x)}
    operands = {"x": (x, (1, 128)), "w": (w, (128, 128)), "dy": (dy, (1, 128)),
                "x_t": (x.t(), (1, 128)), "dy_t": (dy.t(), (1, 128))}
    return {
        "shape": {"tokens": tokens, "in": in_features, "out": out_features},
        "flops_per_gemm": 2 * tokens * in_features * out_features,
        "bf16_gemm": {name: _median_ms(fn) for name, fn in bf16.items()},
        "fp8_gemm": {name: _median_ms(fn) for name, fn in fp8.items()},
        "fp8_quantize": {name: _median_ms(lambda t=t, tile=tile: _fp8(t, tile)) for name, (t, tile) in operands.items()},
    }


def step_times(width: int = 4096, tokens: int = 8192) -> dict:
    """Milliseconds per forward + backward, BF16 and FP8, for a block and for each of its linear layers."""
    shapes = {"qkv": (width, 3 * width), "out": (width, width), "mlp.up": (width, 4 * width),
              "mlp.down": (4 * width, width)}
    times = {"width": width, "tokens": tokens, "block": {}, "linear": {}}
    for label, fp8 in (("bf16", False), ("fp8_deepseek", True)):
        times["block"][label] = block_step_ms(fp8, width, sequences=tokens // 2048, context=2048)
        times["linear"][label] = {name: linear_step_ms(fp8, *shape, tokens=tokens) for name, shape in shapes.items()}
        torch.cuda.empty_cache()
    # Three GEMMs of 2 * tokens * in * out FLOPs each, per linear layer.
    times["linear_flops"] = {name: 6 * tokens * i * o for name, (i, o) in shapes.items()}
    times["mlp_up_pieces"] = gemm_times(width, 4 * width, tokens)
    return times


def measure_training(steps: int = STEPS) -> dict:
    """Everything the chapter plots from the GPU, as a JSON-able dict."""
    from companion.book.bench import environment

    _require_cuda("the training benchmark")
    return {
        "environment": environment(),
        "corpus": {"python": platform.python_version(), "sha256": gpt.corpus_sha256(), "bytes": len(gpt.corpus())},
        "config": dataclasses.asdict(gpt.GPU_CONFIG),
        "steps": steps,
        "runs": loss_curves(steps=steps),
        "step_time_ms": step_times(),
    }
