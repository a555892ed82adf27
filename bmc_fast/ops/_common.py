"""Pieces shared by the op modules: output-gradient broadcasting and the fake-kernel helpers."""
from __future__ import annotations

import torch

from .. import _torch_compat as compat


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_like(x: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    return x.new_empty((n,) if reduction == "none" else ())


def grad_like(x: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad else x.new_empty((0,))


def _graph_is_freed_after_this_backward() -> bool:
    """True when the running backward frees the graph (no retain_graph/create_graph), so no
    later backward can read this node's saved buffers again."""
    if torch.compiler.is_compiling() or compat.in_dispatch_mode():
        return False  # traced (compile, fake or proxy mode): the graph owns buffer reuse
    return not compat.backward_keeps_graph()


def scale_rows(ctx, grad: torch.Tensor, grad_output: torch.Tensor, reduction: str, index=None) -> torch.Tensor:
    """``grad`` (d loss / d input, precomputed in the forward) times the upstream gradient.

    When the backward frees the graph, the product is written into ``grad`` itself: the buffer
    belongs to this graph node and is never seen by the user, and scaling it in place saves a
    pass and an allocation of input size (page faults on a fresh buffer cost more than the
    multiply). With ``retain_graph``/``create_graph`` (gradcheck, repeated backward) the product
    is a new tensor. For "none" the upstream gradient has one entry per leading row (or per
    expert, then ``index`` maps rows to experts), broadcast over the remaining dimensions.
    """
    if grad.numel() == 0 and grad.dim() == 1:
        raise RuntimeError(
            "bmc_fast: backward through a forward that ran without gradient (grad mode was off "
            "or no input required grad when the loss was computed)"
        )
    if reduction == "none":
        g = grad_output if index is None else grad_output[index]
        g = g.reshape(g.shape[0], *([1] * (grad.dim() - 1))).to(grad.dtype)
    else:
        g = grad_output.to(grad.dtype)
    return grad.mul_(g) if _graph_is_freed_after_this_backward() else grad * g


@torch.no_grad()
def blend_running_stats(running_means, running_vars, means, variances, momentum: float) -> None:
    """BatchNorm's running-statistics update from a functional op's batch statistics:
    ``running = (1 - momentum) * running + momentum * batch``, in place, one foreach call."""
    if running_means:
        torch._foreach_lerp_(list(running_means) + list(running_vars), list(means) + list(variances),
                             float(momentum))


def light_call(registration):
    """The op of ``registration`` (name, fake, backward, setup_context) as a function that, in
    eager mode, runs its kernel under a plain :class:`torch.autograd.Function` built from the
    same setup_context/backward. torch.library's generic autograd wrapper costs ~70 us a call
    (argument flattening in Python, also when nothing needs a gradient), more than the kernels
    at small sizes. Under torch.compile or a functorch transform the registered op (fake kernel,
    registered autograd) runs as before.

    The callers (the public losses) have already applied autocast to the inputs, inside the
    autograd graph, so the eager calls also skip the op's autocast rule (a Python kernel)."""
    name, _fake, backward, setup_context = registration
    short = name.split("::")[1]

    def op(*inputs):  # looked up at call time: without the extension there is no such op (and no call)
        return getattr(torch.ops.bmc_fast, short).default(*inputs)

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with compat.below_autograd(skip_autocast=True):
                out = op(*inputs)
            setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Fn.__name__ = _Fn.__qualname__ = "".join(w.capitalize() for w in short.split("_"))

    def call(*inputs):
        if not compat.FAST_EAGER or torch.compiler.is_compiling() or compat.in_transform():
            return op(*inputs)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return _Fn.apply(*inputs)
        # nothing to record: straight to the kernel
        with compat.below_autograd(skip_autocast=True):
            return op(*inputs)

    return call
