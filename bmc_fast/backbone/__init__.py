"""The default backbone: a residual MLP whose CPU training runs through fused kernels, and its
whole training step in one C++ call."""
from .resmlp import ResMLP, fused_args, fused_path_available, inference_rows, resmlp_forward, resmlp_train_forward
from .train_step import FusedTrainStep, fused_train_step, unfused_reason

__all__ = ["ResMLP", "fused_args", "fused_path_available", "inference_rows", "resmlp_forward", "resmlp_train_forward",
           "FusedTrainStep", "fused_train_step", "unfused_reason"]
