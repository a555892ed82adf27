"""bmc_fast: Batch Model Consolidation for continual learning, with fused CPU/CUDA losses."""
import torch  # noqa: F401  (loads libtorch before the extension, which has no RPATH to it)

from . import _ext  # noqa: F401  (loads _C first: registers torch.ops.bmc_fast)
from ._ext import backend_info, set_cpu_matmul
from .ops import (
    batched_distillation_loss,
    stability_loss,
    task_masked_cross_entropy,
    task_masked_kd_loss,
    weight_stability_loss,
)
from . import nn, optim, reference  # noqa: E402
from .backbone import ResMLP  # noqa: E402
from .train import BMC, BMCConfig, Result  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "stability_loss",
    "weight_stability_loss",
    "batched_distillation_loss",
    "task_masked_cross_entropy",
    "task_masked_kd_loss",
    "backend_info",
    "set_cpu_matmul",
    "BMC",
    "BMCConfig",
    "Result",
    "ResMLP",
    "nn",
    "optim",
    "reference",
]
