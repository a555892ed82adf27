"""stability_loss: keeps K experts' features (or any [K, ...] tensors) near the base model's."""
from __future__ import annotations

import torch

from .. import _ext, _validate, reference
from ._common import light_call, acc_dtype, grad_like, loss_like, scale_rows

OP = "bmc_fast::stability_loss"


def stability_loss(expert: torch.Tensor, base: torch.Tensor, weights: torch.Tensor | None = None,
                   reduction: str = "sum") -> torch.Tensor:
    r"""Multi-expert stability loss.

    .. math:: L_k = w_k \cdot \operatorname{mean}_{\dots} (\mathrm{expert}_k - \mathrm{base}_k)^2

    Args:
        expert: ``[K, ...]`` float32/float16/bfloat16/float64, e.g. the K experts' features
            ``[K, B, D]``.
        base: same shape as ``expert`` (e.g. the frozen base model's features on the same
            batch, repeated or expanded over K).
        weights: optional ``[K]`` per-expert weights (finite, any floating dtype).
        reduction: ``"sum"`` (default) over experts, ``"mean"`` over experts, or ``"none"`` (``[K]``).

    Mixed dtypes of ``expert`` and ``base`` promote as in ``expert - base``; under autocast the
    loss computes in float32. Returns the loss in that dtype, accumulated in float32 (float64
    for float64). Differentiable in ``expert``, ``base`` and ``weights`` (first order only: the
    gradient is computed in the forward pass); each gradient has its input's dtype.
    """
    _validate.stability_args(expert, base, weights, reduction)
    # Cast here, inside the autograd graph, so the casts' backward returns each gradient in its
    # input's dtype; the op itself takes one dtype.
    dt = _validate.loss_dtype(expert, base)
    expert, base = _validate.cast(expert, dt), _validate.cast(base, dt)
    weights = _validate.autocast_aux(weights)
    if not _ext.use_kernel("stability_loss", expert):
        return reference.stability_loss(expert, base, weights, reduction)
    compute_grad = torch.is_grad_enabled() and (expert.requires_grad or base.requires_grad)
    return _call(expert, base, weights, reduction, compute_grad)[0]


def _stability_loss_fake(expert, base, weights, reduction, compute_grad):
    k = expert.shape[0]
    return (loss_like(expert, k, reduction), grad_like(expert, compute_grad),
            expert.new_empty((k,), dtype=acc_dtype(expert.dtype)))


def _stability_loss_setup_context(ctx, inputs, output):
    expert, base, weights, reduction, _ = inputs
    _, grad, per_expert = output
    ctx.reduction = reduction
    ctx.k = expert.shape[0]
    ctx.has_weights = weights is not None
    ctx.mark_non_differentiable(grad, per_expert)
    ctx.set_materialize_grads(False)  # else autograd allocates zeros of input size for grad
    ctx.save_for_backward(grad, per_expert, weights)


def _stability_loss_backward(ctx, grad_loss, _grad_grad, _grad_per_expert):
    if grad_loss is None:  # the loss was not used (grads are not materialised)
        return (None, None, None, None, None)
    grad, per_expert, weights = ctx.saved_tensors
    g_expert = g_base = g_weights = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        scaled = scale_rows(ctx, grad, grad_loss, ctx.reduction)
        g_expert = scaled if ctx.needs_input_grad[0] else None
        g_base = -scaled if ctx.needs_input_grad[1] else None
    if ctx.has_weights and ctx.needs_input_grad[2]:
        g = per_expert * grad_loss.to(per_expert.dtype)
        if ctx.reduction == "mean":
            g = g / max(ctx.k, 1)
        g_weights = g.to(weights.dtype)
    return g_expert, g_base, g_weights, None, None


# Registered by bmc_fast/ops/__init__.py (the module named by set_python_module in csrc/library.cpp).
REGISTRATION = (OP, _stability_loss_fake, _stability_loss_backward, _stability_loss_setup_context)
_call = light_call(REGISTRATION)
