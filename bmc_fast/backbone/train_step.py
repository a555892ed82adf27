"""A whole training step of the default ResMLP in one C++ call.

The trainer's steps on the CPU are small (64 rows): besides the fused kernels, a step through
autograd pays about a millisecond of Python and engine work (the forward's autograd.Function
with 37 inputs, the loss functions, the backward's nodes, the optimizer's wrapper), a fifth of
a consolidation step. :func:`fused_train_step` hands the model's
tensors, the optimizer's state and the loss description (a ``torch.classes.bmc_fast.StepLoss``)
to ``torch.classes.bmc_fast.ResMLPTrainStep`` (csrc/cpu/resmlp_train_step.h) once; each step is
then one call, with the batch's tensors as a dict, that runs the same ops --
the fused forward, the loss kernels with their gradients, the fused backward, the BatchNorm
running statistics and the AdamW kernel -- and returns the loss. Same math and same dropout
seeds as the autograd path (tested); parameter gradients are not stored in ``.grad``.

Stacked experts (K >= the number of threads, a loss summed over experts) are split over the
threads: each thread runs the whole step of its own experts single-threaded, instead of every
matmul and kernel forking and joining over all threads (docs/performance.md has the figures).
Same dropout masks and the same parameters as one call over the stack (bitwise
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

__all__ = ["FusedTrainStep", "fused_train_step", "unfused_reason"]


# The batch keys the step's loss terms read (csrc/cpu/resmlp_train_step.h).
_BATCH_KEYS = ("labels", "ce_offset", "ce_len", "teacher_features", "buffer_id", "base_features", "teacher_logits",
               "kd_offset", "kd_len", "mix_labels", "mix_ce_offset", "mix_ce_len", "mix_weight")


def _step_loss(loss):
    """``loss`` as the C++ step's ``torch.classes.bmc_fast.StepLoss`` (whose constructor checks
    every field). ``num_buffers`` and ``kd_temperature`` may be None where their term is off."""
    nb, tau = loss.num_buffers, loss.kd_temperature
    return torch.classes.bmc_fast.StepLoss(
        ce_scale=float(loss.ce_scale), ce_reduction=str(loss.ce_reduction), distill_coef=float(loss.distill_coef),
        num_buffers=0 if nb is None else int(nb), stability_coef=float(loss.stability_coef),
        kd_coef=float(loss.kd_coef), kd_temperature=1.0 if tau is None else float(tau))


class FusedTrainStep:
    """Callable training step; build it with :func:`fused_train_step`. It holds the optimizer's
    moment tensors as they were when it was built: build a new one after
    ``opt.load_state_dict`` (the trainer builds one per phase).

    ``loss`` describes the loss terms (:class:`bmc_fast.train.step.LossSpec` or any object with
    its fields): ``ce_scale * task_masked_cross_entropy(logits, labels, ce_offset, ce_len,
    ce_reduction)`` over the logits' rows, plus ``distill_coef * batched_distillation_loss(
    features, teacher_features, buffer_id, num_buffers, "mean")``, ``stability_coef *
    stability_loss(features, base_features, "sum")`` and ``kd_coef * task_masked_kd_loss(logits,
    teacher_logits, kd_offset, kd_len, kd_temperature, "mean")`` where their coefficients are
    not zero. A batch of mixed inputs ``w x_a + (1 - w) x_b`` also brings ``mix_labels``,
    ``mix_ce_offset``, ``mix_ce_len`` (x_b's rows) and ``mix_weight`` (w, a 0-dim tensor): its CE
    term is ``w CE(labels, ...) + (1 - w) CE(mix_labels, ...)``; ``step.mixup`` (a
    :class:`bmc_fast.train.step.Mixup`, set by the trainer) mixes every batch so before the step.
    The loss description is handed to C++ once (a ``torch.classes.bmc_fast.StepLoss``, whose
    construction checks the fields); assigning ``step.loss`` hands over the new one."""

    def __init__(self, hyper: ResMLP, lists: tuple, cache, group: dict, loss):
        self.after = None  # called after every step (the trainer's thread tuner)
        self.mixup = None  # (x, batch) -> (mixed x, batch with the mix_* tensors), before every step
        weights, biases, bn_w, bn_b, rmean, rvar, tracked = lists
        pos = {id(p): i for i, p in enumerate(cache.params)}
        flat = weights + biases + bn_w + bn_b
        self._cache, self._group = cache, group
        self.loss = loss
        self._tracked = tracked[0]
        bn0 = hyper.block1.bn1
        self._momentum = None if bn0.momentum is None else float(bn0.momentum)
        self.p = [float(hyper.block1.drop.p), float(hyper.block2.drop.p)]
        self._obj = torch.classes.bmc_fast.ResMLPTrainStep(
            weights, biases, bn_w, bn_b, rmean, rvar, tracked, [cache.exp_avgs[pos[id(t)]] for t in flat],
            [cache.exp_avg_sqs[pos[id(t)]] for t in flat], float(bn0.eps), self.p)
        if os.environ.get("BMC_FAST_SPLIT") == "0":
            self._obj.set_split(False)

    @property
    def loss(self):
        return self._loss

    @loss.setter
    def loss(self, loss):
        self._step_loss = _step_loss(loss)
        self._loss = loss

    @classmethod
    def of(cls, hyper: ResMLP, lists: tuple, opt, loss) -> "FusedTrainStep":
        """The step of ``opt`` (its one parameter group and fused cache); the caller has checked
        :func:`unfused_reason`."""
        group = opt.param_groups[0]
        return cls(hyper, lists, opt._cache(0, list(group["params"])), group, loss)

    def __call__(self, x: torch.Tensor, batch: dict, seeds: list[int] | None = None,
                 first_model: int = 0) -> torch.Tensor:
        """One step on ``x`` (``[B, I]``, or ``[K, B, I]`` for stacked models) and the tensors of
        ``batch`` the loss terms read (``labels``, ``ce_offset``, ``ce_len``, and per term its
        own: see the class; a missing one raises a ValueError naming it, other keys are
        ignored); returns the loss. ``seeds``: one dropout seed per block (None draws them from
        torch's default generator); ``first_model``: the index of the first model in the dropout
        counters (masks of model k are those of model ``first_model + k``)."""
        if self._momentum is None:  # cumulative moving average, as BatchNorm
            momentum = 1.0 / (float(self._tracked.reshape(-1)[0]) + 1)
        else:
            momentum = self._momentum
        if seeds is None:
            seeds = [new_seed() if v > 0 else 0 for v in self.p]
        if self.mixup is not None:
            x, batch = self.mixup(x, batch)
        tensors = {}
        for k in _BATCH_KEYS:
            v = batch.get(k)
            if v is not None:
                tensors[k] = v
        g, c = self._group, self._cache
        b1, b2 = g["betas"]
        c.count += 1
        try:
            loss = self._obj.step(
                x, tensors, self._step_loss, seeds=list(seeds), first_model=int(first_model), momentum=momentum,
                adamw=[float(g["lr"]), float(b1), float(b2), float(g["weight_decay"]), float(g["eps"])],
                step_count=int(c.count))
        except Exception:
            c.count -= 1  # no parameter or moment was written (every check runs before the update)
            raise
        if self.after is not None:
            self.after()
        return loss


def unfused_reason(hyper: nn.Module, lists: tuple, opt, x: torch.Tensor) -> str | None:
    """Why the one-call step cannot train the ResMLP ``hyper`` (its hyper-parameters; it may be
    on "meta" for stacked models) whose tensors are ``lists`` (:func:`bmc_fast.backbone.fused_args`)
    with ``opt`` on inputs like ``x``; None when it can. It needs the extension, a float32 CPU
    ResMLP in training mode on its fused path, and ``opt`` a one-group
    :class:`bmc_fast.optim.AdamW` over exactly the model's parameters, all trainable."""
    if not _ext.HAVE_EXTENSION:
        return "the compiled extension is not loaded"
    if not isinstance(hyper, ResMLP):
        return f"the model is a {type(hyper).__name__}, not the fused ResMLP"
    if not (hyper.fused and hyper.training):
        return "the ResMLP is not on its fused training path (fused=False or eval mode)"
    if not (isinstance(opt, AdamW) and len(opt.param_groups) == 1):
        return "the optimizer is not one parameter group of bmc_fast.optim.AdamW"
    flat = [t for lst in lists[:4] for t in lst]
    x0 = x if lists[0][0].dim() == 2 else x[0]  # stacked: one model's rows, for the checks
    if x.dtype != torch.float32 or not fused_path_available(hyper, x0):
        return f"inputs of {x.dtype} on {x.device.type} (the step is float32 on the CPU)"
    group = opt.param_groups[0]
    params = list(group["params"])
    if len(params) != len(flat) or {id(p) for p in params} != {id(t) for t in flat}:
        return "the optimizer does not hold exactly the model's parameters"
    if not all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
        return "a parameter is frozen, not float32 or not on the CPU"
    cache = opt._cache(0, params)
    if cache is None or not cache.fused:
        return "the optimizer's state does not fit its fused kernel"
    return None


def fused_train_step(hyper: nn.Module, lists: tuple, opt, x: torch.Tensor, loss) -> FusedTrainStep | None:
    """A :class:`FusedTrainStep` with the loss terms ``loss``, or None where
    :func:`unfused_reason` gives a reason."""
    if unfused_reason(hyper, lists, opt, x) is not None:
        return None
    return FusedTrainStep.of(hyper, lists, opt, loss)
