"""nn.Module wrappers of the bmc_fast losses. They hold configuration only and call the functions,
so mixed dtypes promote and autocast computes in float32 as there; a ``weights`` or ``importance``
buffer of another floating dtype (e.g. float32 in a bfloat16 model) does not change the loss's."""
from __future__ import annotations

import torch

from . import _validate
from .ops import (
    batched_distillation_loss,
    stability_loss,
    task_masked_cross_entropy,
    task_masked_kd_loss,
    weight_stability_loss,
)

__all__ = ["StabilityLoss", "WeightStabilityLoss", "BatchedDistillationLoss", "TaskMaskedCrossEntropy",
           "TaskMaskedKDLoss"]


class _WeightedLoss(torch.nn.Module):
    def __init__(self, weights: torch.Tensor | None, reduction: str):
        super().__init__()
        _validate.reduction(reduction)
        if weights is not None:
            _validate.floating(weights, "weights")
            if weights.dim() != 1:
                raise ValueError(f"weights must have shape [K], got {list(weights.shape)}")
        self.reduction = reduction
        self.register_buffer("weights", weights)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class StabilityLoss(_WeightedLoss):
    """Module form of :func:`bmc_fast.stability_loss`."""

    def __init__(self, weights: torch.Tensor | None = None, reduction: str = "sum"):
        super().__init__(weights, reduction)

    def forward(self, expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return stability_loss(expert, base, self.weights, self.reduction)


class WeightStabilityLoss(_WeightedLoss):
    """Module form of :func:`bmc_fast.weight_stability_loss`; ``importance`` is a buffer."""

    def __init__(self, importance: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                 reduction: str = "sum"):
        super().__init__(weights, reduction)
        if importance is not None:
            _validate.floating(importance, "importance")
        self.register_buffer("importance", importance)

    def forward(self, expert_params: torch.Tensor, base_params: torch.Tensor) -> torch.Tensor:
        return weight_stability_loss(expert_params, base_params, self.importance, self.weights, self.reduction)


class BatchedDistillationLoss(_WeightedLoss):
    """Module form of :func:`bmc_fast.batched_distillation_loss`."""

    def __init__(self, num_experts: int, weights: torch.Tensor | None = None, reduction: str = "sum"):
        super().__init__(weights, reduction)
        self.num_experts = _validate.positive_int(num_experts, "num_experts")
        if weights is not None and weights.shape[0] != self.num_experts:
            raise ValueError(f"weights must have shape [{self.num_experts}], got {list(weights.shape)}")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return batched_distillation_loss(student, teacher, expert_ids, self.num_experts, self.weights, self.reduction)


class TaskMaskedCrossEntropy(torch.nn.Module):
    """Module form of :func:`bmc_fast.task_masked_cross_entropy`."""

    def __init__(self, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        self.reduction = _validate.reduction(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index

    def forward(self, logits, labels, task_offset, task_len) -> torch.Tensor:
        return task_masked_cross_entropy(logits, labels, task_offset, task_len, self.reduction, self.ignore_index)


class TaskMaskedKDLoss(torch.nn.Module):
    """Module form of :func:`bmc_fast.task_masked_kd_loss`."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.temperature = _validate.temperature(temperature)
        self.reduction = _validate.reduction(reduction)

    def forward(self, student_logits, teacher_logits, task_offset, task_len) -> torch.Tensor:
        return task_masked_kd_loss(student_logits, teacher_logits, task_offset, task_len, self.temperature,
                                   self.reduction)
