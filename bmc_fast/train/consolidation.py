"""The consolidation phase (BMC-SPEC §2.3): the base model trained on the memory of all buffers
with the task-masked CE and the batched distillation loss (optionally KD from stored logits).
The options of the public BMC code (``BMCConfig.preset("parity")``) are choices here: its
fixed validation split, the weighted sampler, the "span" CE and the uniform mixup weight."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..backbone import ResMLP, inference_rows
from . import seeding
from .memory import Memory
from .step import AutogradStep, FastPaths, LossSpec, describe

__all__ = ["consolidate", "consolidation_loss"]


def _progress(cfg, total, desc):
    enabled = cfg.progress if cfg.progress is not None else os.isatty(2)
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False)


def consolidation_loss(cfg, memory: Memory) -> LossSpec:
    """The consolidation loss of ``cfg`` on ``memory``: ``task_coef`` x CE (over every class seen
    so far, each sample's task range, or the batch's span of tasks: ``consolidation_ce``) +
    ``distill_coef`` x batched distillation over the buffers + ``kd_coef`` x KD from the stored
    logits; mixup as ``cfg.mixup`` / ``cfg.mixup_alpha``."""
    if cfg.kd_coef > 0 and len(memory) and memory.logits is None:
        raise ValueError("BMCConfig.kd_coef > 0 needs the experts' logits in every buffer of the memory")
    return LossSpec(ce_scale=cfg.task_coef, ce_reduction="mean", distill_coef=cfg.distill_coef,
                    num_buffers=memory.num_buffers, kd_coef=cfg.kd_coef, kd_temperature=cfg.kd_temperature,
                    mixup_alpha=cfg.mixup_alpha, mixup=cfg.mixup)


def _step_batch(b: dict, ce: str, seen: int) -> dict:
    """The step's batch (:class:`LossSpec` names) of a memory minibatch."""
    out = {"labels": b["y"], "teacher_features": b["features"], "buffer_id": b["buffer_id"],
           "kd_offset": b["offset"], "kd_len": b["length"], "teacher_logits": b.get("teacher_logits")}
    if ce == "seen":  # CE over every class seen so far: teaches the head to tell tasks apart (class-IL)
        out["ce_offset"], out["ce_len"] = torch.zeros_like(b["offset"]), torch.full_like(b["length"], seen)
    elif ce == "span":  # the public code: one slice from the batch's lowest task offset to its highest task end
        lo, hi = b["offset"].min(), (b["offset"] + b["length"]).max()
        out["ce_offset"] = lo.expand_as(b["offset"]).contiguous()
        out["ce_len"] = (hi - lo).expand_as(b["length"]).contiguous()
    else:
        out["ce_offset"], out["ce_len"] = b["offset"], b["length"]
    return out


def consolidate(model: nn.Module, memory: Memory, cfg, num_classes: int, step_index: int, log=None) -> dict:
    """Trains ``model`` on ``memory`` (BMC-SPEC §2.3) with :func:`consolidation_loss`, minibatches
    balanced over buffers (or drawn by ``consolidation_sampler="weighted"``); optional mixup,
    validation split, ReduceLROnPlateau and early stopping. Randomness is keyed by
    (``cfg.seed``, ``step_index``).

    The default ResMLP trains with only the head rows of the classes seen so far (unless
    ``full_head``, whose evaluation reads every row): no loss term reads the others, so a step's
    cost follows the classes seen, not the stream's; the rows are written back after."""
    seen = max(b.offset + b.length for b in memory.buffers)
    if isinstance(model, ResMLP) and not cfg.full_head and seen < model.num_classes:
        narrow = model.head_rows(0, seen)
        info = _consolidate(narrow, memory, cfg, seen, seen, step_index, log)
        with torch.no_grad():
            model.load_state_dict(model.with_head_of(narrow, 0, seen).state_dict())
        model.eval()
        return info
    return _consolidate(model, memory, cfg, num_classes, seen, step_index, log)


def _consolidate(model: nn.Module, memory: Memory, cfg, num_classes: int, seen: int, step_index: int,
                 log=None) -> dict:
    """:func:`consolidate` of ``model`` (a head of ``num_classes`` rows) on ``memory``, whose tasks
    span the classes ``[0, seen)``."""
    device = torch.device(cfg.device)
    gen = seeding.generator(cfg.seed, "consolidation", step_index)
    train_mem, val_mem, val_order = (memory.split(cfg.val_fraction, gen, how=cfg.val_split)
                                     if cfg.val_fraction > 0 else (memory, None, None))
    weighted = cfg.consolidation_sampler == "weighted"
    batches = train_mem.weighted_indices if weighted else train_mem.balanced_indices
    paths = FastPaths.of(cfg)
    opt = paths.adamw(model.parameters(), cfg.consolidation_lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.lr_patience) if val_mem is not None else None
    spec = consolidation_loss(cfg, memory)
    mixgen = np.random.default_rng(seeding.derive(cfg.seed, "mixup", step_index)) if spec.mixup_alpha > 0 else None
    best, bad_epochs, epochs_run = float("inf"), 0, 0
    per_epoch = len(train_mem) // cfg.consolidation_batch_size if weighted else \
        -(-len(train_mem) // cfg.consolidation_batch_size)
    total_steps = cfg.consolidation_epochs * per_epoch
    bar = _progress(cfg, total_steps, "consolidation")
    step, n = None, 0
    with paths.backbone_mode(model):
        for epoch in range(cfg.consolidation_epochs):
            model.train()
            for idx in batches(cfg.consolidation_batch_size, gen):
                raw = train_mem.batch(idx, num_classes, device)
                x, b = raw["x"], _step_batch(raw, cfg.consolidation_ce, seen)
                if step is None:
                    step = paths.build_step(model, opt, spec, x, mixup_generator=mixgen)
                    if log:
                        log({"event": "consolidation_step", "step": step_index, "kind": describe(step)})
                step(x, b, seeding.dropout_seeds(cfg.seed, "consolidation_dropout", step_index, n))
                n += 1
                if bar is not None:
                    bar.update(1)
            epochs_run += 1
            if val_mem is not None and len(val_mem):
                vl = _validation_loss(model, val_mem, spec, cfg, num_classes, seen, val_order)
                sched.step(vl)
                if log:
                    log({"event": "consolidation_epoch", "epoch": epoch, "val_loss": vl})
                if vl < best - 1e-6:
                    best, bad_epochs = vl, 0
                else:
                    bad_epochs += 1
                    if cfg.early_stopping and bad_epochs >= cfg.early_stopping:
                        break
    if bar is not None:
        bar.close()
    model.eval()
    return {"epochs": epochs_run, "best_val_loss": best if val_mem is not None else None, "kind": describe(step)}


@torch.no_grad()
def _validation_loss(model, val_mem: Memory, spec: LossSpec, cfg, num_classes: int, seen: int,
                     order: torch.Tensor | None = None) -> float:
    """The consolidation loss (no mixup) of the eval-mode model on the whole validation memory;
    with the "span" CE, whose classes depend on the batch, the unweighted mean of its losses on
    the batches of ``consolidation_batch_size`` rows taken in ``order``, the order the split drew
    them (as the public code's unshuffled loader over its random split: batches mix the buffers).
    The model runs once over the whole memory, in chunks (eval mode: a row's outputs do not
    depend on its batch); the losses are taken batch by batch from its outputs."""
    model.eval()
    device = torch.device(cfg.device)
    evaluator = AutogradStep(None, None, spec.replace(mixup_alpha=0.0), FastPaths.of(cfg).ops, "validation")
    span = cfg.consolidation_ce == "span"  # otherwise one pass over it all, where order does not matter
    size = cfg.consolidation_batch_size if span else len(val_mem)
    raw = val_mem.batch(order if span and order is not None else torch.arange(len(val_mem)), num_classes, device)
    outputs = [model(chunk) for chunk in raw["x"].split(inference_rows(device))]
    logits, feats = torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
    losses = []
    for start in range(0, len(val_mem), size):
        rows = {k: v[start:start + size] for k, v in raw.items() if v is not None}
        losses.append(float(evaluator.loss_of(logits[start:start + size], feats[start:start + size],
                                              _step_batch(rows, cfg.consolidation_ce, seen))))
    return sum(losses) / len(losses)
