"""Training in low precision: gradient rounding and loss scaling, fake quantization (QAT), and fully
quantized training with quantized linear layers."""
from companion.training.fake_quant import (
    FakeQuantize,
    QATLinear,
    fake_quantize,
    prepare_qat,
    ptq,
)
from companion.training.loss_scaling import (
    DynamicLossScaler,
    GradientRounding,
    LossScaler,
    StepResult,
    round_to_format,
    training_step,
)
from companion.training.quant_linear import (
    BACKENDS,
    QuantLinear,
    QuantLinearFunction,
    dequantize_model,
    quant_linear,
    quantize_model,
    runs_on_kernels,
)
from companion.training.quantizers import (
    BF16,
    IDENTITY,
    QuantSpec,
    quantize_dequantize,
)
from companion.training.recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "DynamicLossScaler",
    "GradientRounding",
    "LossScaler",
    "StepResult",
    "round_to_format",
    "training_step",
    "QuantSpec",
    "IDENTITY",
    "BF16",
    "quantize_dequantize",
    "fake_quantize",
    "FakeQuantize",
    "QATLinear",
    "prepare_qat",
    "ptq",
    "dequantize_model",
    "Recipe",
    "RECIPES",
    "get_recipe",
    "BACKENDS",
    "QuantLinearFunction",
    "QuantLinear",
    "quant_linear",
    "quantize_model",
    "runs_on_kernels",
]
