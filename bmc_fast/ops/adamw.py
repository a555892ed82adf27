"""adamw_step: one AdamW update over a list of tensors in one kernel call (the trainer's
optimizer, :class:`bmc_fast.optim.AdamW`, runs on it)."""
from __future__ import annotations

import numbers

import torch

from .. import _ext, reference

OP = "bmc_fast::adamw_step"


def _check(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps, step):
    for name, lst in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if not isinstance(lst, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in lst):
            raise TypeError(f"{name} must be a list of tensors, got {type(lst).__name__}")
        if len(lst) != len(params):
            raise ValueError(f"{name} must hold {len(params)} tensors like params, got {len(lst)}")
    for name, val, ok, what in (("lr", lr, lambda v: v >= 0, ">= 0"),
                                ("beta1", beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
                                ("beta2", beta2, lambda v: 0 <= v < 1, "in [0, 1)"),
                                ("weight_decay", weight_decay, lambda v: v >= 0, ">= 0"),
                                ("eps", eps, lambda v: v > 0, "> 0")):
        if not (isinstance(val, numbers.Real) and not isinstance(val, bool) and val == val and abs(val) != float("inf")
                and ok(val)):
            raise ValueError(f"{name} must be a finite number {what}, got {val!r}")
    if not (isinstance(step, numbers.Integral) and not isinstance(step, bool) and step >= 1):
        raise ValueError(f"step must be an integer >= 1 (the step being taken), got {step!r}")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for name, t in (("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"{name}[{i}] must have the shape, dtype and device of params[{i}] "
                                 f"({list(p.shape)}, {p.dtype}, {p.device}), "
                                 f"got ({list(t.shape)}, {t.dtype}, {t.device})")


def _fused_ok(params, exp_avgs, exp_avg_sqs) -> bool:
    if not params or not _ext.HAVE_EXTENSION:
        return False
    dtype = params[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        p.device.type == "cpu" and p.dtype == dtype and p.is_contiguous() and m.is_contiguous() and v.is_contiguous()
        for p, m, v in zip(params, exp_avgs, exp_avg_sqs))


@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr: float, beta1: float = 0.9, beta2: float = 0.999,
               weight_decay: float = 1e-2, eps: float = 1e-8, step: int = 1) -> None:
    """One AdamW step in place (torch.optim.AdamW's update, amsgrad and maximize off): for each
    tensor ``p -= lr * weight_decay * p``, the moment updates, then
    ``p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``.

    ``step`` is the step being taken (1 for the first). Float32/float64 contiguous CPU tensors
    of one dtype run the fused kernel (one parallel pass over every tensor); anything else runs
    the reference (same math, torch ops).
    """
    _check(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps, step)
    adamw_step_unchecked(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), float(lr), float(beta1),
                         float(beta2), float(weight_decay), float(eps), int(step))


def adamw_step_unchecked(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps, step):
    """:func:`adamw_step` without the Python argument checks (lists of tensors, Python numbers)."""
    if _fused_ok(params, exp_avgs, exp_avg_sqs):
        adamw_step_kernel(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps, step)
    else:
        reference.adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps, step)


def adamw_step_kernel(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps, step):
    """The fused kernel itself, for callers that know its preconditions hold (``_fused_ok``);
    it checks them again and raises if they do not."""
    torch.ops.bmc_fast.adamw_step.default(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps,
                                          step)


def _fake(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay, eps, step):
    return None


FAKE = (OP, _fake)
