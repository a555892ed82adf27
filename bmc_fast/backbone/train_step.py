"""A whole training step of the default ResMLP in one C++ call.

The trainer's steps on the CPU are small (64 rows): besides the fused kernels, a step through
autograd paid ~1.3 ms of Python and engine work on a 2 GHz core (the forward's
autograd.Function with 37 inputs, the loss functions, the backward's nodes, the optimizer's
wrapper), about a fifth of a consolidation step. :func:`fused_train_step` hands the model's
tensors and the optimizer's state to ``torch.classes.bmc_fast.ResMLPTrainStep``
(csrc/cpu/resmlp_train_step.cpp) once; each step is then one call that runs the same ops --
the fused forward, the loss kernels with their gradients, the fused backward, the BatchNorm
running statistics and the AdamW kernel -- and returns the loss. Same math and same dropout
seeds as the autograd path (tested); parameter gradients are not stored in ``.grad``.

Stacked experts (K >= the number of threads, a loss summed over experts) are split over the
threads: each thread runs the whole step of its own experts single-threaded, instead of every
matmul and kernel forking and joining over all threads (K = 4 on 2 threads: 8.8 -> 6.0 ms a step
on a 2-core Zen 5). Same dropout masks and the same parameters as one call over the stack (bitwise
at the trainer's shapes with either matmul library there; tested to 1e-6).
``BMC_FAST_SPLIT=0`` in the environment turns it off (for comparisons).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import _ext
from .resmlp import ResMLP, fused_path_available
from ..ops.bn_relu_dropout import new_seed
from ..optim import AdamW

__all__ = ["FusedTrainStep", "fused_train_step"]


class FusedTrainStep:
    """Callable training step; build it with :func:`fused_train_step`. It holds the optimizer's
    moment tensors as they were when it was built: build a new one after
    ``opt.load_state_dict`` (the trainer builds one per phase)."""

    def __init__(self, hyper: ResMLP, lists: tuple, cache, group: dict):
        weights, biases, bn_w, bn_b, rmean, rvar, tracked = lists
        pos = {id(p): i for i, p in enumerate(cache.params)}
        flat = weights + biases + bn_w + bn_b
        self._cache, self._group = cache, group
        self._tracked = tracked[0]
        bn0 = hyper.block1.bn1
        self._momentum = None if bn0.momentum is None else float(bn0.momentum)
        self._p = [float(hyper.block1.drop.p), float(hyper.block2.drop.p)]
        self._obj = torch.classes.bmc_fast.ResMLPTrainStep(
            weights, biases, bn_w, bn_b, rmean, rvar, tracked, [cache.exp_avgs[pos[id(t)]] for t in flat],
            [cache.exp_avg_sqs[pos[id(t)]] for t in flat], float(bn0.eps), self._p)
        if os.environ.get("BMC_FAST_SPLIT") == "0":
            self._obj.set_split(False)

    def __call__(self, x, labels, ce_offset, ce_len, ce_scale: float = 1.0, ce_reduction: str = "mean",
                 distill=None, stability=None, kd=None) -> torch.Tensor:
        """One step on ``x`` (``[B, I]``, or ``[K, B, I]`` for stacked models); returns the loss.

        Loss terms (each as the trainer writes it with the fused ops):
        ``ce_scale * task_masked_cross_entropy(logits, labels, ce_offset, ce_len, ce_reduction)``
        over the logits' rows; ``distill=(teacher_features, buffer_ids, n_buffers, coef)``:
        ``coef * batched_distillation_loss(features, ..., reduction="mean")``;
        ``stability=(base_features, coef)``: ``coef * stability_loss(features, base, "sum")``;
        ``kd=(teacher_logits, offset, length, temperature, coef)``:
        ``coef * task_masked_kd_loss(logits, ...)``."""
        if self._momentum is None:  # cumulative moving average, as BatchNorm
            momentum = 1.0 / (float(self._tracked.reshape(-1)[0]) + 1)
        else:
            momentum = self._momentum
        seeds = [new_seed() if v > 0 else 0 for v in self._p]
        dt, di, dn, dc = distill if distill is not None else (None, None, 0, 0.0)
        sb, sc = stability if stability is not None else (None, 0.0)
        kt, ko, kl, ktemp, kc = kd if kd is not None else (None, None, None, 1.0, 0.0)
        g, c = self._group, self._cache
        b1, b2 = (float(b) for b in g["betas"])
        c.count += 1
        try:
            return self._obj.step(x, seeds, momentum, labels, ce_offset, ce_len, float(ce_scale), ce_reduction,
                                  dt, di, int(dn), float(dc), sb, float(sc), kt, ko, kl, float(ktemp), float(kc),
                                  float(g["lr"]), b1, b2, float(g["weight_decay"]), float(g["eps"]), int(c.count))
        except Exception:
            c.count -= 1  # no parameter or moment was written (every check runs before the update)
            raise


def fused_train_step(hyper: nn.Module, lists: tuple, opt, x: torch.Tensor, cfg) -> FusedTrainStep | None:
    """A :class:`FusedTrainStep` for the ResMLP ``hyper`` (its hyper-parameters; it may be on
    "meta" for stacked models) whose tensors are ``lists`` (:func:`bmc_fast.backbone.fused_args`),
    trained by ``opt`` on inputs like ``x``; None when the step cannot run fused: the fused
    losses, backbone and optimizer must all be on in ``cfg`` (and ``cfg.fused_step``), the
    model a float32 CPU ResMLP on its fused path, ``opt`` a one-group
    :class:`bmc_fast.optim.AdamW` over exactly the model's parameters, all trainable."""
    if not (cfg.fused_step and cfg.losses == "fused" and cfg.fused_backbone
            and cfg.fused_optimizer and _ext.HAVE_EXTENSION):
        return None
    if not (isinstance(hyper, ResMLP) and hyper.fused and hyper.training and isinstance(opt, AdamW)
            and len(opt.param_groups) == 1):
        return None
    flat = [t for lst in lists[:4] for t in lst]
    x0 = x if lists[0][0].dim() == 2 else x[0]  # stacked: one model's rows, for the checks
    if x.dtype != torch.float32 or not fused_path_available(hyper, x0):
        return None
    group = opt.param_groups[0]
    params = list(group["params"])
    if len(params) != len(flat) or {id(p) for p in params} != {id(t) for t in flat}:
        return None
    if not all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
        return None
    cache = opt._cache(0, params)
    if cache is None or not cache.fused:
        return None
    return FusedTrainStep(hyper, lists, cache, group)
