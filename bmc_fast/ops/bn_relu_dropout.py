"""bn_relu_dropout: the training-mode BatchNorm + (sum) + ReLU + dropout of a (stacked) ResMLP
layer in one kernel. The building block of the fused ResMLP (bmc_fast/backbone/resmlp.py)."""
from __future__ import annotations

import torch

from .. import _ext, _torch_compat as compat, _validate, reference
from ._common import blend_running_stats

OP = "bmc_fast::bn_relu_dropout"
BACKWARD_OP = "bmc_fast::bn_relu_dropout_backward"


def new_seed() -> int:
    """A dropout seed drawn from torch's default generator (so ``torch.manual_seed`` and saved
    RNG states reproduce the masks)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def bn_relu_dropout(inputs, weights, biases, running_means=None, running_vars=None, pre_biases=None,
                    momentum: float = 0.1, eps: float = 1e-5, p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    r"""``dropout_p(relu(sum_i BN_i(inputs[i])))`` for K stacked models at once.

    .. math:: \mathrm{out} = \mathrm{drop}_p\Big(\max\big(0, \textstyle\sum_i
       \frac{a_i - \mu_i}{\sqrt{\sigma_i^2 + \epsilon}}\, \gamma_i + \beta_i\big)\Big)

    Args:
        inputs: 1 to 4 tensors ``[K, B, C]`` (K models, B >= 2 rows, C channels; or one model's
            ``[B, C]``, then every per-channel tensor below is ``[C]``). The fused kernel runs
            float32/float64 on the CPU; other dtypes and devices run the reference (same
            semantics). Statistics are per (model, channel) over the B rows, with the biased
            variance, as BatchNorm in training.
        weights, biases: one ``[K, C]`` (or ``[C]``) tensor per input (the BatchNorm affine
            parameters).
        running_means, running_vars: ``[K, C]`` per input, updated in place like BatchNorm's
            buffers (``momentum``, unbiased variance); None to skip.
        pre_biases: ``[K, C]`` per input or None: a bias added to the input before the BN (a
            Linear bias). It cancels in the normalisation (its gradient is exactly zero) but
            enters the running mean, so the eval-mode model is the same as with the bias added.
        p: dropout probability in [0, 1); kept outputs are scaled by ``1 / (1 - p)``.
        seed: the dropout mask is a hash of (seed, element index), the same on every backend and
            thread count; None draws one from torch's default generator.

    Differentiable in inputs, weights, biases and pre_biases (first order).
    """
    running_means, running_vars, pre_biases = running_means or [], running_vars or [], pre_biases or []
    _validate.bn_relu_dropout_args(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p)
    if seed is None:
        seed = new_seed() if p > 0 else 0
    a0 = inputs[0]
    # CPU kernel only (for now): other devices and dtypes run the reference, same semantics.
    if (a0.dtype not in (torch.float32, torch.float64) or a0.device.type not in ("cpu", "meta")
            or not _ext.use_kernel("bn_relu_dropout", a0)):
        return reference.bn_relu_dropout(inputs, weights, biases, running_means, running_vars, pre_biases,
                                         momentum, eps, p, seed)
    if not torch.compiler.is_compiling():  # eager: the light autograd wrapper (see _BnReluDropout)
        return bn_relu_dropout_unchecked(list(inputs), list(weights), list(biases), list(running_means),
                                         list(running_vars), list(pre_biases), float(momentum), float(eps),
                                         float(p), int(seed))
    return _registered(list(inputs), list(weights), list(biases), list(running_means), list(running_vars),
                       list(pre_biases), momentum, float(eps), float(p), int(seed))


def _registered(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p, seed):
    """The registered op, its fake kernel and registered autograd: traced, or without the eager path."""
    out, _, _, _, means, variances = torch.ops.bmc_fast.bn_relu_dropout(inputs, weights, biases, pre_biases, eps, p,
                                                                        seed)
    blend_running_stats(running_means, running_vars, means, variances, momentum)
    return out


def _stat_shape(a):  # [K, C] per-channel tensors for [K, B, C] inputs, [C] for one model's [B, C]
    return (a.shape[-1],) if a.dim() == 2 else (a.shape[0], a.shape[2])


def _fake(inputs, weights, biases, pre_biases, eps, p, seed):
    a = inputs[0]
    stats = lambda: [a.new_empty(_stat_shape(a)) for _ in inputs]  # noqa: E731
    return (torch.empty_like(a, memory_format=torch.contiguous_format), a.new_empty(a.shape, dtype=torch.uint8),
            [torch.empty_like(a, memory_format=torch.contiguous_format) for _ in inputs], stats(), stats(), stats())


def _backward_fake(grad_out, mask, xhats, invstds, weights, p):
    shape = _stat_shape(xhats[0])
    return ([torch.empty_like(x, memory_format=torch.contiguous_format) for x in xhats],
            [xhats[0].new_empty(shape) for _ in xhats],
            [xhats[0].new_empty(shape) for _ in xhats])


def _grads(grad_out, saved, n, p, pre_needed):
    """(grad inputs, grad weights, grad biases, grad pre_biases) from the saved (mask, *xhats,
    *invstds, *weights) of a forward with n inputs. pre_biases cancel in the normalisation:
    their gradient is exactly zero (so an optimizer still applies weight decay to them, as it
    would after BatchNorm's autograd); they have the weights' shapes."""
    mask, xhats, invstds, weights = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:1 + 3 * n]
    gi, gw, gb = torch.ops.bmc_fast.bn_relu_dropout_backward.default(grad_out, mask, list(xhats), list(invstds),
                                                                     list(weights), p)
    return gi, gw, gb, [torch.zeros_like(w) if need else None for w, need in zip(weights, pre_needed)]


def _setup_context(ctx, inputs, output):
    _, weights, _, pre_biases, _, p, _ = inputs
    _, mask, xhats, invstds, means, variances = output
    ctx.p, ctx.n, ctx.n_pre = p, len(weights), len(pre_biases)
    ctx.mark_non_differentiable(mask, *xhats, *invstds, *means, *variances)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(mask, *xhats, *invstds, *weights)


def _backward(ctx, grad_out, *_unused):
    n = ctx.n
    if grad_out is None:  # only the statistics were used
        return [None] * n, [None] * n, [None] * n, [None] * ctx.n_pre, None, None, None
    gi, gw, gb, g_pre = _grads(grad_out, ctx.saved_tensors, n, ctx.p, [True] * ctx.n_pre)
    return gi, gw, gb, g_pre, None, None, None


# Registered by bmc_fast/ops/__init__.py. The backward op has no autograd of its own (first order).
REGISTRATION = (OP, _fake, _backward, _setup_context)
BACKWARD_FAKE = (BACKWARD_OP, _backward_fake)


class _BnReluDropout(torch.autograd.Function):
    """The op with a plain autograd.Function around it: the same kernels as the registered
    autograd, without its generic argument flattening (~150 us a call at ResMLP sizes, more
    than the kernels themselves)."""

    @staticmethod
    def forward(ctx, n, eps, p, seed, *tensors):
        inputs, weights, biases = (list(tensors[i * n:(i + 1) * n]) for i in range(3))
        pre = list(tensors[3 * n:])  # n tensors or none
        with compat.below_autograd():
            out, mask, xhats, invstds, means, variances = torch.ops.bmc_fast.bn_relu_dropout.default(
                inputs, weights, biases, pre, eps, p, seed)
        ctx.n, ctx.p = n, p
        ctx.save_for_backward(mask, *xhats, *invstds, *weights)
        ctx.mark_non_differentiable(mask, *means, *variances)
        return (out, mask, *means, *variances)

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        n = ctx.n
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        # the pre_biases' flags: n of them, or none when the forward had no pre_biases
        gi, gw, gb, g_pre = _grads(grad_out, ctx.saved_tensors, n, ctx.p, ctx.needs_input_grad[4 + 3 * n:])
        return (None, None, None, None, *gi, *gw, *gb, *g_pre)


def bn_relu_dropout_unchecked(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p,
                              seed):
    """The fused op (eager mode) without the Python argument checks (the kernel still checks
    shapes and dtypes), for callers that built the arguments themselves, e.g. the fused ResMLP.
    Lists, not None; running_means/running_vars and pre_biases hold one tensor per input or none."""
    if not compat.FAST_EAGER:
        return _registered(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p, seed)
    res = _BnReluDropout.apply(len(inputs), eps, p, seed, *inputs, *weights, *biases, *pre_biases)
    n = len(inputs)
    blend_running_stats(running_means, running_vars, res[2:2 + n], res[2 + n:], momentum)
    return res[0]
