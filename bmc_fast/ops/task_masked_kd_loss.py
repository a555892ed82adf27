"""task_masked_kd_loss: knowledge distillation over each sample's own task range."""
from __future__ import annotations

import torch

from .. import _ext, _validate, reference
from ._common import light_call, grad_like, loss_like, scale_rows

OP = "bmc_fast::task_masked_kd_loss"


def task_masked_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, task_offset, task_len,
                        temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    r"""Temperature-scaled KL distillation restricted to each row's task range.

    .. math:: \ell_i = \tau^2 \sum_{c=o_i}^{o_i+l_i-1} p^t_c (\log p^t_c - \log p^s_c),\quad
              p = \operatorname{softmax}(x_{i, o_i:o_i+l_i} / \tau)

    Args:
        student_logits, teacher_logits: ``[N, C]``.
        task_offset, task_len: int ``[N]`` (or Python ints): the range of each row.
        temperature: ``tau > 0``.
        reduction: ``"mean"`` (default, sum over rows / N), ``"sum"`` or ``"none"`` (``[N]``).

    Teacher logits of ``-inf`` are allowed (``0 log 0 = 0``). Mixed dtypes of the two logits
    promote as in their difference; under autocast the loss computes in float32. First-order
    differentiable in both logits (the teacher's gradient is computed in the backward only when
    it is needed); each gradient has its input's dtype.
    """
    off, ln = _validate.kd_args(student_logits, teacher_logits, task_offset, task_len, temperature, reduction)
    # Cast inside the autograd graph: the casts' backward returns each gradient in its input's dtype.
    dt = _validate.loss_dtype(student_logits, teacher_logits)
    student_logits, teacher_logits = _validate.cast(student_logits, dt), _validate.cast(teacher_logits, dt)
    if not _ext.use_kernel("task_masked_kd_loss", student_logits):
        return reference.task_masked_kd_loss(student_logits, teacher_logits, off, ln, temperature, reduction)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _call(
        student_logits, teacher_logits, off, ln, float(temperature), reduction, compute_grad)[0]


def _task_masked_kd_loss_fake(student_logits, teacher_logits, task_offset, task_len, temperature, reduction,
                              compute_grad):
    return loss_like(student_logits, student_logits.shape[0], reduction), grad_like(student_logits, compute_grad)


def _task_masked_kd_loss_setup_context(ctx, inputs, output):
    student_logits, teacher_logits, task_offset, task_len, temperature, reduction, _ = inputs
    _, grad = output
    ctx.reduction = reduction
    ctx.temperature = temperature
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # else autograd allocates zeros of input size for grad
    # Both logits are read only by the teacher's gradient; not saving them otherwise keeps the
    # (usually frozen) teacher logits and any promoted copies unheld.
    teacher = ctx.needs_input_grad[1]
    ctx.save_for_backward(grad, student_logits if teacher else None, teacher_logits if teacher else None,
                          task_offset, task_len)


def _teacher_grad(student_logits, teacher_logits, off, ln, tau, row_factor):
    # d(tau^2 KL_i)/d t_ij = tau * p_t,ij * ((log p_t,ij - log p_s,ij) - KL_i), KL_i without tau^2.
    ls, mask = reference.masked_log_softmax(student_logits, off, ln, tau)
    lt, _ = reference.masked_log_softmax(teacher_logits, off, ln, tau)
    pt = lt.exp()
    keep = mask & (pt > 0)
    diff = torch.where(keep, lt.masked_fill(~keep, 0) - ls.masked_fill(~mask, 0), torch.zeros_like(pt))
    kl = (pt * diff).sum(1, keepdim=True)
    g = tau * pt * (diff - kl) * row_factor[:, None]
    return torch.where(keep, g, torch.zeros_like(g)).to(teacher_logits.dtype)


def _task_masked_kd_loss_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:  # the loss was not used (grads are not materialised)
        return (None, None, None, None, None, None, None)
    grad, student_logits, teacher_logits, off, ln = ctx.saved_tensors
    g_student = g_teacher = None
    if ctx.needs_input_grad[0]:
        g_student = scale_rows(ctx, grad, grad_loss, ctx.reduction)
    if ctx.needs_input_grad[1]:
        n = student_logits.shape[0]
        acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        factor = grad_loss.to(acc).expand(n) if ctx.reduction != "none" else grad_loss.to(acc)
        if ctx.reduction == "mean":
            factor = factor / max(n, 1)
        g_teacher = _teacher_grad(student_logits, teacher_logits, off, ln, ctx.temperature, factor)
    return g_student, g_teacher, None, None, None, None, None


# Registered by bmc_fast/ops/__init__.py (the module named by set_python_module in csrc/library.cpp).
REGISTRATION = (OP, _task_masked_kd_loss_fake, _task_masked_kd_loss_backward, _task_masked_kd_loss_setup_context)
_call = light_call(REGISTRATION)
