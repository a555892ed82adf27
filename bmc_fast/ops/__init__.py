"""The fused bmc_fast losses: public functions, fake kernels and autograd of torch.ops.bmc_fast.

Fake kernels and autograd formulas are registered here, in the module that csrc/library.cpp
names with ``set_python_module``, so torch can find them for any op of the library.
"""
import torch

from .. import _ext
from . import (
    adamw as _adam,
    batched_distillation_loss as _bdl,
    bn_relu_dropout as _bn,
    resmlp as _mlp,
    stability_loss as _sl,
    task_masked_cross_entropy as _ce,
    task_masked_kd_loss as _kd,
    weight_stability_loss as _wsl,
)
from .adamw import adamw_step
from .batched_distillation_loss import batched_distillation_loss
from .bn_relu_dropout import bn_relu_dropout
from .resmlp import resmlp
from .stability_loss import stability_loss
from .task_masked_cross_entropy import task_masked_cross_entropy
from .task_masked_kd_loss import task_masked_kd_loss
from .weight_stability_loss import weight_stability_loss

if _ext.HAVE_EXTENSION:
    for _op, _fake, _backward, _setup in (m.REGISTRATION for m in (_sl, _wsl, _bdl, _ce, _kd, _bn, _mlp)):
        torch.library.register_fake(_op)(_fake)
        torch.library.register_autograd(_op, _backward, setup_context=_setup)
    for _op, _fake in (_bn.BACKWARD_FAKE, _mlp.BACKWARD_FAKE, _adam.FAKE):
        torch.library.register_fake(_op)(_fake)
    # The losses run in float32 under autocast, as torch's own losses do. The public functions
    # cast their inputs themselves (bmc_fast._validate.loss_dtype), on every path; this rule makes
    # direct torch.ops.bmc_fast calls, eager or traced by torch.compile, do the same. Like autocast,
    # it leaves float64 and integer tensors as they are. torch.library.register_autocast needs
    # torch >= 2.7; on older torch only the public functions autocast.
    if hasattr(torch.library, "register_autocast"):
        for _op in (_sl.OP, _wsl.OP, _bdl.OP, _ce.OP, _kd.OP):
            for _device in ("cpu", "cuda"):
                torch.library.register_autocast(_op, _device, torch.float32)

__all__ = [
    "stability_loss",
    "weight_stability_loss",
    "batched_distillation_loss",
    "task_masked_cross_entropy",
    "task_masked_kd_loss",
    "bn_relu_dropout",
    "resmlp",
    "adamw_step",
]
