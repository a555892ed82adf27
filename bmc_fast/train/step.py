"""One place that resolves a run's fast paths and builds its training steps: :class:`FastPaths`.

A step trains a model (or K stacked models) on one batch with the loss a :class:`LossSpec`
describes. Where the default ResMLP, bmc_fast's AdamW and the fused losses all apply on the CPU,
it is the one-call C++ step (:class:`bmc_fast.backbone.FusedTrainStep`); otherwise the autograd
step below computes the same terms with the loss ops. The choice is made once, when the step is
built, and its reason is kept in ``step.reason`` (the trainer reports it in its events).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .. import _ext
from ..backbone import (FusedTrainStep, ResMLP, fused_args, fused_path_available, resmlp_train_forward,
                        unfused_reason)
from ..optim import AdamW
from . import threads

__all__ = ["FastPaths", "LossSpec", "build_step", "describe", "adamw", "loss_ops", "backbone_mode"]


@dataclass(frozen=True)
class LossSpec:
    """The loss of a training step: which terms, their coefficients and reductions. Both the
    autograd step and the one-call C++ step read it.

    ``ce_scale * task_masked_cross_entropy(logits, labels, ce_offset, ce_len, ce_reduction)``
    + ``distill_coef * batched_distillation_loss(features, teacher_features, buffer_id,
    num_buffers, "mean")`` + ``stability_coef * stability_loss(features, base_features, "sum")``
    (``stability="weight"``: ``weight_stability_loss(expert parameters, base parameters, "sum")``)
    + ``kd_coef * task_masked_kd_loss(logits, teacher_logits, kd_offset, kd_len,
    kd_temperature)``. A term with a zero coefficient is not computed; a term with a non-zero
    coefficient whose batch tensors are missing is an error, never skipped. ``mixup_alpha > 0``
    mixes each batch's inputs with a permutation of them (weight from Beta(alpha, alpha), both
    drawn from the step's ``mixup_generator``, a numpy Generator) and its CE labels; it needs the
    other terms off (their stored targets belong to unmixed inputs). ``mixup="uniform"`` draws
    the weight from U(1 - mixup_alpha, 1) instead (the public BMC code's mixup)."""

    ce_scale: float = 1.0
    ce_reduction: str = "mean"
    distill_coef: float = 0.0
    num_buffers: int = 0
    stability: str = "feature"
    stability_coef: float = 0.0
    kd_coef: float = 0.0
    kd_temperature: float = 1.0
    mixup_alpha: float = 0.0
    mixup: str = "beta"

    def __post_init__(self):
        if self.mixup not in ("beta", "uniform"):
            raise ValueError(f"LossSpec.mixup must be 'beta' or 'uniform', got {self.mixup!r}")
        if self.ce_reduction not in ("mean", "sum"):
            raise ValueError(f"LossSpec.ce_reduction must be 'mean' or 'sum', got {self.ce_reduction!r}")
        if self.stability not in ("feature", "weight"):
            raise ValueError(f"LossSpec.stability must be 'feature' or 'weight', got {self.stability!r}")
        if self.mixup_alpha > 0 and (self.distill_coef or self.stability_coef or self.kd_coef):
            raise ValueError("mixup mixes the inputs of a batch, whose stored targets (distillation, stability, "
                             "KD) belong to the unmixed inputs: use mixup only with those terms off")

    def replace(self, **changes) -> "LossSpec":
        return dataclasses.replace(self, **changes)


def adamw(params, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW in one fused pass over all parameters: :class:`bmc_fast.optim.AdamW` (one kernel call
    per step) for float32/float64 CPU parameters, torch's fused AdamW elsewhere (CUDA).
    ``fused=False`` is torch's default AdamW (a loop over the parameters on the CPU)."""
    params = list(params)
    if fused and _ext.HAVE_EXTENSION and params and all(
            p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params):
        return AdamW(params, lr=lr, weight_decay=weight_decay)
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class FastPaths:
    """The fast paths of a run, resolved from its :class:`~bmc_fast.train.BMCConfig` by :meth:`of`:
    the loss ops (:attr:`ops`), the AdamW (:meth:`adamw`), the backbone's training path
    (:meth:`fused_model`, :meth:`backbone_mode`) and the step builder (:meth:`build_step`). The
    experts, the consolidation and the baselines ask it instead of reading the options.

    ``losses``: ``"fused"`` (bmc_fast's ops) or ``"reference"`` (:mod:`bmc_fast.reference`).
    ``fused_backbone``: a fused :class:`ResMLP` trains through its fused kernels.
    ``fused_optimizer``: :meth:`adamw` is the fused AdamW. ``fused_step``: a step may be the
    one-call C++ step (where the three others are on and model, optimizer and loss allow it)."""

    losses: str = "fused"
    fused_backbone: bool = True
    fused_optimizer: bool = True
    fused_step: bool = True

    @classmethod
    def of(cls, cfg) -> "FastPaths":
        """The fast paths ``cfg`` chooses (its options of the same names)."""
        return cls(cfg.losses, cfg.fused_backbone, cfg.fused_optimizer, cfg.fused_step)

    @property
    def ops(self):
        """The loss functions: bmc_fast's fused ones, or the pure-PyTorch references
        (``losses="reference"``)."""
        if self.losses == "reference":
            from .. import reference
            return reference
        import bmc_fast
        return bmc_fast

    def adamw(self, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """:func:`adamw` over ``params``, fused if ``fused_optimizer``."""
        return adamw(params, lr, weight_decay, fused=self.fused_optimizer)

    def fused_model(self, model: nn.Module) -> bool:
        """Whether ``model`` trains through the fused ResMLP kernels: a :class:`ResMLP` whose own
        ``fused`` and ``fused_backbone`` are both on."""
        return isinstance(model, ResMLP) and model.fused and self.fused_backbone

    @contextlib.contextmanager
    def backbone_mode(self, model: nn.Module):
        """Within the block, a :class:`ResMLP` runs its fused training path only if
        ``fused_backbone`` (and the model's own ``fused``) allow it."""
        if isinstance(model, ResMLP) and model.fused and not self.fused_backbone:
            model.fused = False
            try:
                yield
            finally:
                model.fused = True
        else:
            yield

    def step_reason(self, loss: LossSpec) -> str | None:
        """Why no step of ``loss`` can be the one-call step, whatever its model and optimizer
        (None: one can)."""
        if not self.fused_step:
            return "BMCConfig.fused_step is off"
        if self.losses != "fused":
            return "BMCConfig.losses is 'reference'"
        if not self.fused_backbone:
            return "BMCConfig.fused_backbone is off"
        if not self.fused_optimizer:
            return "BMCConfig.fused_optimizer is off"
        if loss.stability_coef and loss.stability == "weight":
            return "weight stability runs through autograd"
        return None

    def train_forward(self, model: nn.Module, x: torch.Tensor, lists: tuple | None = None):
        """The forward ``(inp, seeds, first_model) -> (logits, features)`` of an autograd step of
        ``model`` on inputs like ``x``: the fused ResMLP's seeded training forward over ``lists``
        (default: the model's own tensors) where it applies, else ``model(inp)``."""
        fused_model = self.fused_model(model)
        if lists is None and fused_model:
            lists = fused_args(model)
        x0 = x if lists is None or lists[0][0].dim() == 2 else x[0]
        if fused_model and lists is not None and fused_path_available(model, x0):
            def forward(inp, seeds=None, first_model=0):
                return resmlp_train_forward(model, lists, inp, seeds, first_model)
        else:
            def forward(inp, seeds=None, first_model=0):
                return model(inp)
        return forward

    def build_step(self, model: nn.Module, optimizer, loss: LossSpec, x: torch.Tensor, *, stacked: bool = False,
                   lists: tuple | None = None, forward=None, base_flat=None, params_flat=None, mixup_generator=None):
        """The training step of ``model`` (a module, or the hyper-parameter skeleton of stacked
        models whose tensors are ``lists``, see :func:`bmc_fast.backbone.fused_args`) with
        ``optimizer`` and the loss ``loss``, for inputs like ``x``: the one-call step where it
        applies, else the autograd step (``forward(x, seeds, first_model)`` overrides
        :meth:`train_forward`, e.g. a ``vmap`` over stacked models; ``stacked``: ``x`` is
        ``[K, B, ...]`` and the labels are the K batches' rows in order). ``base_flat`` and
        ``params_flat()`` are the base's and the experts' flat parameters of weight stability.
        ``step.kind`` is "fused" or "autograd"; ``step.reason`` says why the autograd step was
        chosen (None for "fused")."""
        if lists is None and forward is None and self.fused_model(model):
            lists = fused_args(model)
        if loss.mixup_alpha > 0 and (stacked or (lists is not None and lists[0][0].dim() == 3)):
            raise ValueError("mixup mixes the rows of one model's batch: a step of stacked models takes no mixup")
        reason = self.step_reason(loss)
        if reason is None:
            reason = unfused_reason(model, lists, optimizer, x) if lists is not None else \
                f"the model is a {type(model).__name__}, not the fused ResMLP"
        if reason is None:
            step = FusedTrainStep.of(model, lists, optimizer, loss)
            step.kind, step.reason, step.after = "fused", None, threads.tick
            step.mixup = Mixup.of(loss, mixup_generator)
            return step
        if forward is None:
            forward = self.train_forward(model, x, lists)
        return AutogradStep(forward, optimizer, loss, self.ops, reason, stacked, base_flat, params_flat,
                            mixup_generator)


def _scaled(coef: float, t: torch.Tensor) -> torch.Tensor:
    return t if coef == 1 else coef * t


class Mixup:
    """The mixup of a step's training batches (:class:`LossSpec`'s ``mixup_alpha`` and ``mixup``):
    ``mixup(x, batch)`` draws the weight w and a permutation of the rows from the numpy Generator
    (in that order) and returns ``w x + (1 - w) x[perm]`` with the batch plus the permuted rows'
    CE tensors (``mix_labels``, ``mix_ce_offset``, ``mix_ce_len``) and ``mix_weight`` (a 0-dim
    float64 tensor): the CE of the step is then ``w CE(labels) + (1 - w) CE(mix_labels)``. Both
    steps, the one-call step and the autograd one, read the same batch."""

    def __init__(self, alpha: float, kind: str, generator):
        self.alpha, self.kind, self.generator = float(alpha), kind, generator

    @classmethod
    def of(cls, loss: LossSpec, generator) -> "Mixup | None":
        """The mixup of ``loss`` with ``generator``; None where ``loss`` has none."""
        if loss.mixup_alpha <= 0:
            return None
        if generator is None:
            raise ValueError("a step with mixup needs its mixup_generator (a numpy Generator)")
        return cls(loss.mixup_alpha, loss.mixup, generator)

    def __call__(self, x: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        y, off, ln = _need(batch, "labels"), _need(batch, "ce_offset"), _need(batch, "ce_len")
        a, g = self.alpha, self.generator
        lam = float(g.beta(a, a) if self.kind == "beta" else g.uniform(1 - a, 1))
        perm = torch.from_numpy(g.permutation(x.shape[0])).to(x.device)
        mixed = dict(batch, mix_labels=y[perm], mix_ce_offset=off[perm], mix_ce_len=ln[perm],
                     mix_weight=torch.tensor(lam, dtype=torch.float64))
        return lam * x + (1 - lam) * x[perm], mixed


class AutogradStep:
    """The step through autograd: forward, the :class:`LossSpec` terms with the loss ops,
    backward, ``optimizer.step()``. ``forward(x, seeds, first_model) -> (logits, features)``;
    ``params_flat()`` gives the expert parameters ``[K, P]`` for weight stability."""

    kind = "autograd"

    def __init__(self, forward, optimizer, loss: LossSpec, ops, reason: str, stacked: bool = False, base_flat=None,
                 params_flat=None, mixup_generator=None):
        self.forward, self.optimizer, self.loss, self.ops, self.reason = forward, optimizer, loss, ops, reason
        self.stacked = stacked
        self.base_flat, self.params_flat = base_flat, params_flat
        self.mixup = Mixup.of(loss, mixup_generator)

    def loss_value(self, x, batch, seeds=None, first_model=0, train: bool = True) -> torch.Tensor:
        """The loss of ``batch`` (with its graph); mixup only when ``train``."""
        if train and self.mixup is not None:
            spec, L = self.loss, self.ops
            x, batch = self.mixup(x, batch)
            y, off, ln = batch["labels"], batch["ce_offset"], batch["ce_len"]
            lam = float(batch["mix_weight"])
            logits, _ = self.forward(x, seeds, first_model)
            ce = lam * L.task_masked_cross_entropy(logits, y, off, ln, reduction=spec.ce_reduction) + (1 - lam) * \
                L.task_masked_cross_entropy(logits, batch["mix_labels"], batch["mix_ce_offset"], batch["mix_ce_len"],
                                            reduction=spec.ce_reduction)
            return _scaled(spec.ce_scale, ce)
        logits, feats = self.forward(x, seeds, first_model)
        return self.loss_of(logits, feats, batch)

    def loss_of(self, logits, feats, batch) -> torch.Tensor:
        """The loss of ``batch`` given the model's outputs on its (unmixed) inputs."""
        spec, L = self.loss, self.ops
        y, off, ln = _need(batch, "labels"), _need(batch, "ce_offset"), _need(batch, "ce_len")
        stacked = self.stacked
        rows = logits.reshape(-1, logits.shape[-1]) if stacked else logits
        loss = _scaled(spec.ce_scale, L.task_masked_cross_entropy(rows, y, off, ln, reduction=spec.ce_reduction))
        if spec.stability_coef:
            if spec.stability == "feature":
                s = L.stability_loss(feats if stacked else feats[None], _need(batch, "base_features"), reduction="sum")
            else:
                s = L.weight_stability_loss(self.params_flat(), self.base_flat, reduction="sum")
            loss = loss + _scaled(spec.stability_coef, s)
        if spec.distill_coef:
            loss = loss + _scaled(spec.distill_coef, L.batched_distillation_loss(
                feats.float(), _need(batch, "teacher_features"), _need(batch, "buffer_id"), spec.num_buffers,
                reduction="mean"))
        if spec.kd_coef:
            loss = loss + _scaled(spec.kd_coef, L.task_masked_kd_loss(
                rows.float(), _need(batch, "teacher_logits"), _need(batch, "kd_offset"), _need(batch, "kd_len"),
                spec.kd_temperature))
        return loss

    def __call__(self, x, batch, seeds=None, first_model=0) -> torch.Tensor:
        loss = self.loss_value(x, batch, seeds, first_model)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        threads.tick()
        return loss.detach()


def _need(batch: dict, key: str) -> torch.Tensor:
    t = batch.get(key)
    if t is None:
        raise ValueError(f"the step's loss terms need batch[{key!r}]")
    return t


def loss_ops(cfg):
    """The loss functions ``cfg`` chooses: :attr:`FastPaths.ops` of ``FastPaths.of(cfg)``."""
    return FastPaths.of(cfg).ops


def backbone_mode(model: nn.Module, cfg):
    """:meth:`FastPaths.backbone_mode` of ``model`` with the fast paths ``cfg`` chooses."""
    return FastPaths.of(cfg).backbone_mode(model)


def build_step(model: nn.Module, optimizer, loss: LossSpec, cfg, x: torch.Tensor, *, stacked: bool = False,
               lists: tuple | None = None, forward=None, base_flat=None, params_flat=None, mixup_generator=None):
    """:meth:`FastPaths.build_step` with the fast paths ``cfg`` chooses."""
    return FastPaths.of(cfg).build_step(model, optimizer, loss, x, stacked=stacked, lists=lists, forward=forward,
                                        base_flat=base_flat, params_flat=params_flat,
                                        mixup_generator=mixup_generator)


def describe(step) -> str:
    """"fused", or "autograd (<why>)" for a step of :func:`build_step`; "" for None."""
    if step is None:
        return ""
    return "fused" if step.kind == "fused" else f"autograd ({step.reason})"
