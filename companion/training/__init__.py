"""Training in low precision: activation gradients rounded to a narrow format, and loss scaling."""
from companion.training.loss_scaling import (
    DynamicLossScaler,
    GradientRounding,
    LossScaler,
    StepResult,
    round_to_format,
    training_step,
)

__all__ = [
    "DynamicLossScaler",
    "GradientRounding",
    "LossScaler",
    "StepResult",
    "round_to_format",
    "training_step",
]
