"""Pieces shared by the op modules: output-gradient broadcasting and the fake-kernel helpers."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_like(x: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    return x.new_empty((n,) if reduction == "none" else ())


def grad_like(x: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad else x.new_empty((0,))


def scale_rows(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str, index=None) -> torch.Tensor:
    """``grad`` (d loss / d input, precomputed in the forward) times the upstream gradient.

    For "none" the upstream gradient has one entry per leading row (or per expert, then ``index``
    maps rows to experts) and is broadcast over the remaining dimensions.
    """
    if grad.numel() == 0 and grad.dim() == 1:
        raise RuntimeError(
            "bmc_fast: backward through a forward that ran without gradient (grad mode was off "
            "or no input required grad when the loss was computed)"
        )
    if reduction == "none":
        g = grad_output if index is None else grad_output[index]
        return grad * g.reshape(g.shape[0], *([1] * (grad.dim() - 1))).to(grad.dtype)
    return grad * grad_output.to(grad.dtype)
