"""The fused bmc_fast losses: public functions, fake kernels and autograd of torch.ops.bmc_fast."""
from .batched_distillation_loss import batched_distillation_loss
from .stability_loss import stability_loss
from .task_masked_cross_entropy import task_masked_cross_entropy
from .task_masked_kd_loss import task_masked_kd_loss
from .weight_stability_loss import weight_stability_loss

__all__ = [
    "stability_loss",
    "weight_stability_loss",
    "batched_distillation_loss",
    "task_masked_cross_entropy",
    "task_masked_kd_loss",
]
