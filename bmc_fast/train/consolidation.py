"""The consolidation phase (BMC-SPEC §2.3): the base model trained on the memory of all buffers
with the task-masked CE and the batched distillation loss (optionally KD from stored logits)."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..backbone import ResMLP, fused_args, fused_train_step
from .experts import _gen, _losses, adamw, backbone_mode, scaled, train_forward
from .memory import Memory

__all__ = ["consolidate"]


def _progress(cfg, total, desc):
    enabled = cfg.progress if cfg.progress is not None else os.isatty(2)
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False)


def consolidate(model: nn.Module, memory: Memory, cfg: BMCConfig, num_classes: int, seed: int, log=None) -> dict:
    """Trains ``model`` on ``memory`` (BMC-SPEC §2.3): per minibatch, balanced over buffers,
    ``task_coef * masked CE + distill_coef * batched distillation (+ kd_coef * masked KD)``.
    Optional mixup, validation split, ReduceLROnPlateau and early stopping."""
    L = _losses(cfg)
    device = torch.device(cfg.device)
    gen = _gen(seed, 7)
    train_mem, val_mem = memory.split(cfg.val_fraction, gen) if cfg.val_fraction > 0 else (memory, None)
    opt = adamw(model.parameters(), cfg.consolidation_lr, cfg.weight_decay, fused=cfg.fused_optimizer)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.lr_patience) if val_mem is not None else None
    j = train_mem.num_buffers
    beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else None
    torch.manual_seed(hash((seed, 8)) % (2**62))
    best, bad_epochs, epochs_run, last = float("inf"), 0, 0, float("nan")
    total_steps = cfg.consolidation_epochs * -(-len(train_mem) // cfg.consolidation_batch_size)
    bar = _progress(cfg, total_steps, "consolidation")

    # The CE range of every sample: its own task's classes ("task"), or every class seen so far
    # ("seen"): only the latter teaches the head to tell tasks apart (class-IL).
    seen = max(b.offset + b.length for b in memory.buffers)

    fwd = None  # the training forward, resolved once from the first batch (train_forward)
    fstep = None  # the whole step in one call, where it applies (bmc_fast.backbone.train_step)

    def ce_ranges(b):
        if cfg.consolidation_ce == "seen":
            return torch.zeros_like(b["offset"]), torch.full_like(b["length"], seen)
        return b["offset"], b["length"]

    def loss_of(b, train: bool):
        x, y = b["x"], b["y"]
        model_fn = fwd if train else model
        off, ln = ce_ranges(b)
        if train and beta is not None:
            lam = float(beta.sample())
            perm = torch.randperm(x.shape[0], generator=gen).to(device)
            logits, h = model_fn(lam * x + (1 - lam) * x[perm])
            ce = lam * L.task_masked_cross_entropy(logits, y, off, ln) + \
                (1 - lam) * L.task_masked_cross_entropy(logits, y[perm], off[perm], ln[perm])
        else:
            logits, h = model_fn(x)
            ce = L.task_masked_cross_entropy(logits, y, off, ln)
        loss = scaled(cfg.task_coef, ce)
        if cfg.distill_coef > 0 and not (train and beta is not None):
            loss = loss + scaled(cfg.distill_coef, L.batched_distillation_loss(
                h.float(), b["features"], b["buffer_id"], j, reduction="mean"))
        if cfg.kd_coef > 0 and "teacher_logits" in b and not (train and beta is not None):
            loss = loss + scaled(cfg.kd_coef, L.task_masked_kd_loss(logits.float(), b["teacher_logits"], b["offset"],
                                                                    b["length"], cfg.kd_temperature))
        return loss

    def fused_loss(step, b):  # loss_of(b, True) + backward + opt.step() in one call (no mixup): same terms
        off, ln = ce_ranges(b)
        distill = (b["features"], b["buffer_id"], j, cfg.distill_coef) if cfg.distill_coef > 0 else None
        kd = ((b["teacher_logits"], b["offset"], b["length"], cfg.kd_temperature, cfg.kd_coef)
              if cfg.kd_coef > 0 and "teacher_logits" in b else None)
        return step(b["x"], b["y"], off, ln, cfg.task_coef, "mean", distill=distill, kd=kd)

    with backbone_mode(model, cfg):
        for epoch in range(cfg.consolidation_epochs):
            model.train()
            for idx in train_mem.balanced_indices(cfg.consolidation_batch_size, gen):
                b = train_mem.batch(idx, num_classes, device)
                if fwd is None:
                    fwd = train_forward(model, cfg, b["x"])
                    if beta is None and isinstance(model, ResMLP):
                        fstep = fused_train_step(model, fused_args(model), opt, b["x"], cfg)
                if fstep is not None:
                    loss = fused_loss(fstep, b)
                else:
                    loss = loss_of(b, True)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                last = float(loss.detach()) if bar is None else last
                if bar is not None:
                    bar.update(1)
            epochs_run += 1
            if val_mem is not None and len(val_mem):
                model.eval()
                with torch.no_grad():
                    vl = float(loss_of(val_mem.batch(torch.arange(len(val_mem)), num_classes, device), False))
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
    return {"epochs": epochs_run, "best_val_loss": best if val_mem is not None else None}
