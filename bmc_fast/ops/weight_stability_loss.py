"""weight_stability_loss: keeps K experts' parameters near the base model's ("weight similarity")."""
from __future__ import annotations

import torch

from .. import _ext, _validate, reference
from ._common import light_call, acc_dtype, grad_like, loss_like, scale_rows

OP = "bmc_fast::weight_stability_loss"


def weight_stability_loss(expert_params: torch.Tensor, base_params: torch.Tensor,
                          importance: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                          reduction: str = "sum") -> torch.Tensor:
    r"""Multi-expert weight-space stability loss.

    .. math:: L_k = w_k \sum_p I_p (\theta_{k,p} - \theta_{\mathrm{base},p})^2

    Args:
        expert_params: ``[K, P]`` flattened parameters of K experts (see
            :func:`bmc_fast.train.experts.flat_params`).
        base_params: ``[P]`` the base model's parameters.
        importance: optional ``[P]`` non-negative per-parameter importance (e.g. a Fisher
            diagonal); 1 when omitted.
        weights: optional ``[K]`` per-expert weights.
        reduction: ``"sum"`` (default), ``"mean"`` over experts, or ``"none"`` (``[K]``).

    Mixed dtypes of ``expert_params`` and ``base_params`` promote as in their difference; under
    autocast the loss computes in float32; ``importance`` and ``weights`` may have any floating
    dtype and do not change the loss's. Differentiable in every floating input (first order
    only); each gradient has its input's dtype.
    """
    _validate.weight_stability_args(expert_params, base_params, importance, weights, reduction)
    # Cast inside the autograd graph: the casts' backward returns each gradient in its input's dtype.
    dt = _validate.loss_dtype(expert_params, base_params)
    expert_params, base_params = _validate.cast(expert_params, dt), _validate.cast(base_params, dt)
    importance, weights = _validate.autocast_aux(importance), _validate.autocast_aux(weights)
    if not _ext.use_kernel("weight_stability_loss", expert_params):
        return reference.weight_stability_loss(expert_params, base_params, importance, weights, reduction)
    compute_grad = torch.is_grad_enabled() and (expert_params.requires_grad or base_params.requires_grad)
    return _call(
        expert_params, base_params, importance, weights, reduction, compute_grad)[0]


def _weight_stability_loss_fake(expert_params, base_params, importance, weights, reduction, compute_grad):
    k = expert_params.shape[0]
    return (loss_like(expert_params, k, reduction), grad_like(expert_params, compute_grad),
            expert_params.new_empty((k,), dtype=acc_dtype(expert_params.dtype)))


def _weight_stability_loss_setup_context(ctx, inputs, output):
    expert_params, base_params, importance, weights, reduction, _ = inputs
    _, grad, per_expert = output
    ctx.reduction = reduction
    ctx.k = expert_params.shape[0]
    ctx.has_importance = importance is not None
    ctx.has_weights = weights is not None
    ctx.mark_non_differentiable(grad, per_expert)
    ctx.set_materialize_grads(False)  # else autograd allocates zeros of input size for grad
    # The parameters are read only by the gradients of base_params and importance (the kernel's
    # gradient covers expert_params); not saving them otherwise keeps promoted copies unheld.
    recompute = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(grad, per_expert, expert_params if recompute else None,
                          base_params if recompute else None, importance, weights)


def _expert_factors(ctx, grad_loss, weights, dtype):
    """Per-expert d loss / d L_k times the upstream gradient: [K]."""
    g = grad_loss.to(dtype).expand(ctx.k) if ctx.reduction != "none" else grad_loss.to(dtype)
    if ctx.reduction == "mean":
        g = g / max(ctx.k, 1)
    return g if weights is None else g * weights.to(dtype)


def _weight_stability_loss_backward(ctx, grad_loss, _grad_grad, _grad_per_expert):
    if grad_loss is None:  # the loss was not used (grads are not materialised)
        return (None, None, None, None, None, None)
    grad, per_expert, expert_params, base_params, importance, weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g_expert = g_base = g_imp = g_weights = None
    if needs[0]:
        g_expert = scale_rows(ctx, grad, grad_loss, ctx.reduction)
    if needs[1]:
        # Recomputed from the inputs in the accumulation dtype (rare: the base is usually
        # frozen): summing K gradients already rounded to float16 would cancel badly.
        acc = per_expert.dtype
        f = _expert_factors(ctx, grad_loss, weights, acc)
        d = (expert_params.to(acc) - base_params.to(acc)) * f[:, None]
        g = -2 * d.sum(0)
        g_base = (g if importance is None else g * importance.to(acc)).to(base_params.dtype)
    if ctx.has_importance and needs[2]:
        acc = per_expert.dtype
        f = _expert_factors(ctx, grad_loss, weights, acc)
        d = expert_params.to(acc) - base_params.to(acc)
        g_imp = (f[:, None] * d * d).sum(0).to(importance.dtype)
    if ctx.has_weights and needs[3]:
        g = per_expert * _expert_factors(ctx, grad_loss, None, per_expert.dtype)
        g_weights = g.to(weights.dtype)
    return g_expert, g_base, g_imp, g_weights, None, None


# Registered by bmc_fast/ops/__init__.py (the module named by set_python_module in csrc/library.cpp).
REGISTRATION = (OP, _weight_stability_loss_fake, _weight_stability_loss_backward, _weight_stability_loss_setup_context)
_call = light_call(REGISTRATION)
