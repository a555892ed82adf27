"""batched_distillation_loss: one distillation loss over samples of many experts, reduced per expert."""
from __future__ import annotations

import torch

from .. import _ext, _validate, reference
from ._common import light_call, acc_dtype, grad_like, loss_like, scale_rows

OP = "bmc_fast::batched_distillation_loss"


def batched_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, expert_ids: torch.Tensor,
                              num_experts: int, weights: torch.Tensor | None = None,
                              reduction: str = "sum") -> torch.Tensor:
    r"""Batched distillation loss of BMC's consolidation phase.

    .. math:: L_j = w_j \frac{1}{|S_j|} \sum_{i \in S_j} \operatorname{mean}_{\dots} (s_i - t_i)^2,
              \quad S_j = \{i : \mathrm{expert\_ids}_i = j\}

    Args:
        student: ``[N, ...]`` e.g. the base model's features on a memory minibatch.
        teacher: same shape: the stored targets of the experts that made the samples.
        expert_ids: int32/int64 ``[N]`` in ``[0, num_experts)``; need not be sorted.
        num_experts: number of experts (fixes the output shape; never inferred from the data).
        weights: optional ``[num_experts]`` per-expert weights.
        reduction: ``"sum"`` (default), ``"mean"`` (divided by the number of experts that have at
            least one sample; 0 if none) or ``"none"`` (``[num_experts]``).

    An expert with no sample contributes 0. The per-expert reduction has a fixed order, so the
    result has the same bits on every run and for any thread count. Mixed dtypes of ``student``
    and ``teacher`` promote as in ``student - teacher`` (bfloat16 features with stored float32
    targets give a float32 loss); under autocast the loss computes in float32. First-order
    differentiable in ``student``, ``teacher`` and ``weights``; each gradient has its input's dtype.
    """
    _validate.distillation_args(student, teacher, expert_ids, num_experts, weights, reduction)
    # Cast inside the autograd graph: the casts' backward returns each gradient in its input's dtype.
    dt = _validate.loss_dtype(student, teacher)
    student, teacher = _validate.cast(student, dt), _validate.cast(teacher, dt)
    weights = _validate.autocast_aux(weights)
    if not _ext.use_kernel("batched_distillation_loss", student):
        return reference.batched_distillation_loss(student, teacher, expert_ids, num_experts, weights, reduction)
    compute_grad = torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)
    return _call(
        student, teacher, expert_ids, num_experts, weights, reduction, compute_grad)[0]


def _batched_distillation_loss_fake(student, teacher, expert_ids, num_experts, weights, reduction, compute_grad):
    return (loss_like(student, num_experts, reduction), grad_like(student, compute_grad),
            student.new_empty((num_experts,), dtype=acc_dtype(student.dtype)))


def _batched_distillation_loss_setup_context(ctx, inputs, output):
    student, teacher, expert_ids, num_experts, weights, reduction, _ = inputs
    _, grad, per_expert = output
    ctx.reduction = reduction
    ctx.num_experts = num_experts
    ctx.has_weights = weights is not None
    ctx.mark_non_differentiable(grad, per_expert)
    ctx.set_materialize_grads(False)  # else autograd allocates zeros of input size for grad
    ctx.save_for_backward(grad, per_expert, expert_ids, weights)


def _batched_distillation_loss_backward(ctx, grad_loss, _grad_grad, _grad_per_expert):
    if grad_loss is None:  # the loss was not used (grads are not materialised)
        return (None, None, None, None, None, None, None)
    grad, per_expert, expert_ids, weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g_student = g_teacher = g_weights = None
    if needs[0] or needs[1]:
        scaled = scale_rows(ctx, grad, grad_loss, ctx.reduction, index=expert_ids.long())
        g_student = scaled if needs[0] else None
        g_teacher = -scaled if needs[1] else None
    if ctx.has_weights and needs[4]:
        g = per_expert * grad_loss.to(per_expert.dtype)
        if ctx.reduction == "mean":
            ones = torch.ones_like(expert_ids, dtype=per_expert.dtype)
            counts = torch.zeros_like(per_expert).index_add(0, expert_ids.long(), ones)
            g = g / (counts > 0).sum().clamp_min(1).to(g.dtype)
        g_weights = g.to(weights.dtype)
    return g_student, g_teacher, None, None, g_weights, None, None


# Registered by bmc_fast/ops/__init__.py (the module named by set_python_module in csrc/library.cpp).
REGISTRATION = (OP, _batched_distillation_loss_fake, _batched_distillation_loss_backward, _batched_distillation_loss_setup_context)
_call = light_call(REGISTRATION)
