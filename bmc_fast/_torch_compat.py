"""The private torch internals bmc_fast's eager fast paths use, in one place, behind one gate.

The fused ops run in eager mode under a plain ``torch.autograd.Function`` that calls the kernel
below the autograd dispatch key (torch.library's generic autograd wrapper costs ~70 us a call,
more than the kernels at the trainer's sizes). That needs a handful of private functions of ``torch._C``.
:data:`FAST_EAGER` is True only on the torch versions CI tests (>= :data:`TESTED_FROM`) when all
of them exist; otherwise every op takes its registered path (``torch.library.register_autograd``
and the fake kernels), which is public API and merely slower.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["FAST_EAGER", "TESTED_FROM", "below_autograd", "in_transform", "is_transform_wrapped",
           "in_dispatch_mode", "backward_keeps_graph"]

TESTED_FROM = (2, 13)


def _version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _lookup():
    try:
        autocast_keys = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                         | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))
        return (torch._C._AutoDispatchBelowAutograd, torch._C._functorch.peek_interpreter_stack,
                torch._C._functorch.is_functorch_wrapped_tensor, torch._C._len_torch_dispatch_stack,
                torch._C._autograd._get_current_graph_task_keep_graph, torch._C._ExcludeDispatchKeyGuard,
                autocast_keys)
    except AttributeError:
        return None


_INTERNALS = _lookup() if _version() >= TESTED_FROM else None
FAST_EAGER = _INTERNALS is not None


def below_autograd(skip_autocast: bool = False):
    """A context that dispatches below autograd (the caller records the graph itself) and, with
    ``skip_autocast``, past the ops' autocast rules (the caller has cast the inputs already)."""
    if not FAST_EAGER:
        return contextlib.nullcontext()
    if not skip_autocast:
        return _INTERNALS[0]()
    stack = contextlib.ExitStack()
    stack.enter_context(_INTERNALS[0]())
    stack.enter_context(_INTERNALS[5](_INTERNALS[6]))
    return stack


def in_transform() -> bool:
    """Inside a functorch transform (vmap, grad, ...)."""
    return FAST_EAGER and _INTERNALS[1]() is not None


def is_transform_wrapped(t: torch.Tensor) -> bool:
    """``t`` is a functorch wrapper (batched, grad-tracking) rather than a plain tensor."""
    return FAST_EAGER and _INTERNALS[2](t)


def in_dispatch_mode() -> bool:
    """A torch dispatch mode (fake, proxy, ...) is active."""
    return FAST_EAGER and _INTERNALS[3]() > 0


def backward_keeps_graph() -> bool:
    """The running backward keeps its graph (retain_graph / create_graph), or this cannot be
    told: buffers saved for backward must not be reused in place."""
    if not FAST_EAGER:
        return True
    try:
        return bool(_INTERNALS[4]())
    except RuntimeError:  # not inside a graph task
        return True
