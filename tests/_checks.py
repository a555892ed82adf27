"""Shared parity machinery for the per-op test files."""
from __future__ import annotations

import torch

from conftest import TOL


def close(actual, expected, dtype, msg=""):
    torch.testing.assert_close(actual, expected, **TOL[dtype], equal_nan=True, msg=lambda m: f"{msg}: {m}")


def fwd_bwd(fn, args, diff, upstream=None, mult=1.0):
    """Runs fn(*args) with fresh leaf copies of args[i] for i in diff; returns loss, grads, upstream."""
    leaves = list(args)
    for i in diff:
        leaves[i] = args[i].detach().clone().requires_grad_(True)
    loss = fn(*leaves) * mult
    if upstream is None:
        upstream = torch.randn(loss.shape, dtype=torch.float32, device=loss.device).to(loss.dtype)
    grads = torch.autograd.grad(loss, [leaves[i] for i in diff], upstream, allow_unused=True)
    return loss.detach(), grads, upstream


def assert_matches_reference(fused, ref, args, diff, dtype, mult=1.0):
    loss, grads, g = fwd_bwd(fused, args, diff, mult=mult)
    loss_r, grads_r, _ = fwd_bwd(ref, args, diff, upstream=g, mult=mult)
    close(loss, loss_r, dtype, "loss")
    for i, a, b in zip(diff, grads, grads_r):
        assert a is not None and b is not None, f"no gradient for input {i}"
        assert a.dtype == b.dtype and a.shape == b.shape
        close(a, b, dtype, f"grad of input {i}")
    return loss
