"""task_masked_cross_entropy: cross-entropy over each sample's own task range of a shared head."""
from __future__ import annotations

import torch

from .. import _ext, _validate, reference
from ._common import light_call, grad_like, loss_like, scale_rows

OP = "bmc_fast::task_masked_cross_entropy"


def task_masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, task_offset, task_len,
                              reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    r"""Cross-entropy restricted to each row's task range.

    .. math:: \ell_i = \log \sum_{c=o_i}^{o_i+l_i-1} e^{x_{i,c}} - x_{i,y_i}

    Args:
        logits: ``[N, C]``.
        labels: int ``[N]`` global labels with ``o_i <= y_i < o_i + l_i`` (or ``ignore_index``).
        task_offset, task_len: int ``[N]`` (or Python ints for every row): the range
            ``[o_i, o_i + l_i)``, with ``0 <= o_i``, ``l_i >= 1``, ``o_i + l_i <= C``.
        reduction: ``"mean"`` (default, over rows not ignored; NaN if there is none, as
            :func:`torch.nn.functional.cross_entropy`), ``"sum"`` or ``"none"`` (``[N]``).
        ignore_index: rows with this label give 0.

    The logits outside a row's range are never read into the softmax and get zero gradient; no
    masked copy of the logits is made. Under autocast the loss computes in float32 (as
    :func:`torch.nn.functional.cross_entropy`); otherwise in the logits' dtype. First-order
    differentiable in ``logits``; the gradient has the logits' dtype.
    """
    off, ln = _validate.cross_entropy_args(logits, labels, task_offset, task_len, reduction, ignore_index)
    # Cast inside the autograd graph: the cast's backward returns the gradient in the logits' dtype.
    logits = _validate.cast(logits, _validate.loss_dtype(logits))
    if not _ext.use_kernel("task_masked_cross_entropy", logits):
        return reference.task_masked_cross_entropy(logits, labels, off, ln, reduction, ignore_index)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    return _call(
        logits, labels, off, ln, reduction, int(ignore_index), compute_grad)[0]


def _task_masked_cross_entropy_fake(logits, labels, task_offset, task_len, reduction, ignore_index, compute_grad):
    return loss_like(logits, logits.shape[0], reduction), grad_like(logits, compute_grad)


def _task_masked_cross_entropy_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[4]
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # else autograd allocates zeros of input size for grad
    ctx.save_for_backward(grad)


def _task_masked_cross_entropy_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:  # the loss was not used (grads are not materialised)
        return (None, None, None, None, None, None, None)
    (grad,) = ctx.saved_tensors
    g_logits = scale_rows(ctx, grad, grad_loss, ctx.reduction) if ctx.needs_input_grad[0] else None
    return g_logits, None, None, None, None, None, None


# Registered by bmc_fast/ops/__init__.py (the module named by set_python_module in csrc/library.cpp).
REGISTRATION = (OP, _task_masked_cross_entropy_fake, _task_masked_cross_entropy_backward, _task_masked_cross_entropy_setup_context)
_call = light_call(REGISTRATION)
