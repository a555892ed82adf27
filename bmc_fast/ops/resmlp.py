"""resmlp: the training-mode forward and backward of a (stacked) ResMLP in one op call each.

The fused ResMLP (bmc_fast/backbone/resmlp.py) trains through it: one autograd node per model
(or per K stacked models) instead of ~25 ops and a dozen nodes, whose Python and autograd-engine
overhead is of the order of the math at the trainer's batch size (64 rows)."""
from __future__ import annotations

import torch

from .. import _ext, _torch_compat as compat, _validate, reference
from ._common import blend_running_stats
from .bn_relu_dropout import new_seed

OP = "bmc_fast::resmlp_forward"
BACKWARD_OP = "bmc_fast::resmlp_backward"


def resmlp(x, weights, biases, bn_weights, bn_biases, running_means=None, running_vars=None, momentum: float = 0.1,
           eps: float = 1e-5, p=None, seeds=None, first_model: int = 0):
    r"""Training-mode forward of a ResMLP (BMC-SPEC §2; :class:`bmc_fast.backbone.ResMLP`):
    ``h = x Wp^T + bp``, then per residual block
    ``h = drop(relu(BN2(fc2(relu(BN1(fc1(h))))) + BNs(short(h))))``, then ``logits = h Wh^T + bh``.
    BatchNorm uses the batch statistics (training mode).

    Args:
        x: ``[B, I]`` (one model, weights ``[O, I]``, per-channel tensors ``[O]``) or ``[K, B, I]``
            (K stacked models, weights ``[K, O, I]``, per-channel tensors ``[K, O]``); B >= 2.
            float32/float64; the fused kernels run on the CPU, other devices run the reference.
        weights, biases: the Linear layers: proj, then fc1, fc2, short of each block, then head
            (2 + 3 * blocks tensors each). A block's fc1 may map to an inner width other than
            its output width (fc2 maps it back).
        bn_weights, bn_biases: the BatchNorm affine parameters: bn1, bn2, bn_s of each block.
        running_means, running_vars: the BatchNorm running statistics in the same order, updated
            in place with ``momentum`` (unbiased variance, as BatchNorm); None to skip.
        p: the dropout probability after each block (a sequence, one per block; default 0).
        seeds: one dropout seed per block (the mask is a hash of (seed, element index), see
            :func:`bmc_fast.ops.bn_relu_dropout`); None draws them from torch's default generator
            for the blocks with ``p > 0``.
        first_model: the index of the first model in the dropout counters: model k (0 for one
            model) draws the masks of model ``first_model + k``, so a slice of a stack starting
            at model f, run with ``first_model=f``, gets the masks the whole stack gets.

    Returns ``(logits, features)``, differentiable in x and every parameter (first order). The
    Linear biases before a BatchNorm cancel in it and get exact zero gradients.
    """
    nb = _validate.resmlp_args(x, weights, biases, bn_weights, bn_biases, running_means, running_vars, momentum, eps,
                               p, seeds, first_model)
    first_model = int(first_model)
    p = [float(v) for v in p] if p is not None else [0.0] * nb
    seeds = [int(s) for s in seeds] if seeds is not None else [new_seed() if v > 0 else 0 for v in p]
    running_means, running_vars = list(running_means or []), list(running_vars or [])
    if (x.dtype not in (torch.float32, torch.float64) or x.device.type not in ("cpu", "meta")
            or not _ext.use_kernel("resmlp", x)):
        return reference.resmlp(x, weights, biases, bn_weights, bn_biases, running_means, running_vars, momentum, eps,
                                p, seeds, first_model)
    if not torch.compiler.is_compiling():
        return resmlp_unchecked(x, list(weights), list(biases), list(bn_weights), list(bn_biases), running_means,
                                running_vars, float(momentum), float(eps), p, seeds, first_model)
    return _registered(x, list(weights), list(biases), list(bn_weights), list(bn_biases), running_means, running_vars,
                       momentum, float(eps), p, seeds, first_model)


def _registered(x, weights, biases, bn_weights, bn_biases, running_means, running_vars, momentum, eps, p, seeds,
                first_model):
    """The registered op (fake kernel, registered autograd): traced, or without the eager path."""
    logits, features, _, means, variances = torch.ops.bmc_fast.resmlp_forward(
        x, weights, biases, bn_weights, bn_biases, eps, p, seeds, first_model)
    blend_running_stats(running_means, running_vars, means, variances, momentum)
    return logits, features


def _saved_like(x, weights):
    """Fake tensors of resmlp_forward's saved list (layout: csrc/cpu/resmlp.cpp)."""
    lead, models = tuple(x.shape[:-1]), tuple(x.shape[:-2])  # (K, B) / (B,) and (K,) / ()
    saved = []
    d_in = weights[0].shape[-2]
    for b in range((len(weights) - 2) // 3):
        m, w = weights[1 + 3 * b].shape[-2], weights[2 + 3 * b].shape[-2]  # inner and output widths
        act = lambda c: x.new_empty(lead + (c,))  # noqa: E731
        mask = lambda c: x.new_empty(lead + (c,), dtype=torch.uint8)  # noqa: E731
        stat = lambda c: x.new_empty(models + (c,))  # noqa: E731
        saved += [x.new_empty(lead + (d_in,)), mask(m), act(m), stat(m), act(m), mask(w), act(w), act(w), stat(w),
                  stat(w)]
        d_in = w
    return saved


def _fake(x, weights, biases, bn_weights, bn_biases, eps, p, seeds, first_model=0):
    lead = tuple(x.shape[:-1])
    stats = lambda: [torch.empty_like(w) for w in bn_weights]  # noqa: E731
    return (x.new_empty(lead + (weights[-1].shape[-2],)), x.new_empty(lead + (weights[-1].shape[-1],)),
            _saved_like(x, weights), stats(), stats())


def _backward_fake(grad_logits, grad_features, x, features, weights, bn_weights, saved, p, compute_input_grad):
    return ([torch.empty_like(w) for w in weights], [w.new_empty(w.shape[:-1]) for w in weights],
            [torch.empty_like(w) for w in bn_weights], [torch.empty_like(w) for w in bn_weights],
            torch.empty_like(x) if compute_input_grad else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weights, _, bn_weights, _, _, p, *_ = inputs
    _, features, saved, means, variances = output
    ctx.p, ctx.nw, ctx.nbn = list(p), len(weights), len(bn_weights)
    ctx.mark_non_differentiable(*saved, *means, *variances)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, features, *weights, *bn_weights, *saved)


def _grads(ctx, grad_logits, grad_features, input_grad: bool):
    t = ctx.saved_tensors
    x, features = t[0], t[1]
    weights, bn_weights, saved = t[2:2 + ctx.nw], t[2 + ctx.nw:2 + ctx.nw + ctx.nbn], t[2 + ctx.nw + ctx.nbn:]
    return torch.ops.bmc_fast.resmlp_backward.default(grad_logits, grad_features, x, features, list(weights),
                                                      list(bn_weights), list(saved), ctx.p, input_grad)


def _backward(ctx, grad_logits, grad_features, *_unused):
    # One gradient per argument the op was called with: the dispatcher leaves out first_model
    # when it has its default value.
    rest = (None,) * (len(ctx.needs_input_grad) - 5)
    if grad_logits is None and grad_features is None:
        return (None,) * 5 + rest
    gw, gb, gbw, gbb, gx = _grads(ctx, grad_logits, grad_features, ctx.needs_input_grad[0])
    return (gx if ctx.needs_input_grad[0] else None, gw, gb, gbw, gbb) + rest


# Registered by bmc_fast/ops/__init__.py. The backward op has no autograd of its own (first order).
REGISTRATION = (OP, _fake, _backward, _setup_context)
BACKWARD_FAKE = (BACKWARD_OP, _backward_fake)


class _ResMLP(torch.autograd.Function):
    """The op under a plain autograd.Function (eager mode): the tensor lists flattened into
    arguments so autograd sees every parameter, without torch.library's generic wrapper."""

    @staticmethod
    def forward(ctx, nw, nbn, eps, p, seeds, first_model, x, *tensors):
        weights, biases = list(tensors[:nw]), list(tensors[nw:2 * nw])
        bn_weights, bn_biases = list(tensors[2 * nw:2 * nw + nbn]), list(tensors[2 * nw + nbn:])
        with compat.below_autograd():
            logits, features, saved, means, variances = torch.ops.bmc_fast.resmlp_forward.default(
                x, weights, biases, bn_weights, bn_biases, eps, p, seeds, first_model)
        ctx.p, ctx.nw, ctx.nbn = p, nw, nbn
        ctx.save_for_backward(x, features, *weights, *bn_weights, *saved)
        ctx.mark_non_differentiable(*means, *variances)
        ctx.set_materialize_grads(False)
        return (logits, features, *means, *variances)

    @staticmethod
    def backward(ctx, grad_logits, grad_features, *_unused):
        if grad_logits is None and grad_features is None:
            return (None,) * len(ctx.needs_input_grad)
        gw, gb, gbw, gbb, gx = _grads(ctx, grad_logits, grad_features, ctx.needs_input_grad[6])
        return (None, None, None, None, None, None, gx if ctx.needs_input_grad[6] else None, *gw, *gb, *gbw, *gbb)


def resmlp_unchecked(x, weights, biases, bn_weights, bn_biases, running_means, running_vars, momentum, eps, p, seeds,
                     first_model=0):
    """:func:`resmlp` in eager mode without the Python argument checks (the kernel still checks
    shapes, dtypes and ``first_model >= 0``), for callers that built the arguments themselves
    (the fused ResMLP). Lists, not None; p and seeds one per block; running_* one per BatchNorm
    or empty; first_model an int."""
    if not compat.FAST_EAGER:
        return _registered(x, weights, biases, bn_weights, bn_biases, running_means, running_vars, momentum, eps, p,
                           seeds, first_model)
    res = _ResMLP.apply(len(weights), len(bn_weights), eps, p, seeds, first_model, x, *weights, *biases, *bn_weights,
                        *bn_biases)
    nbn = len(bn_weights)
    blend_running_stats(running_means, running_vars, res[2:2 + nbn], res[2 + nbn:], momentum)
    return res[0], res[1]
