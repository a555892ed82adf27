"""Reference points for BMC on a stream: sequential fine-tuning (the forgetting floor) and joint
training on all tasks at once (the upper bound), with the same backbone and optimiser."""
from __future__ import annotations

import time

import torch

from . import seeding
from .metrics import Result, evaluate
from .step import LossSpec, adamw, backbone_mode, build_step

__all__ = ["finetune", "joint"]


def _train(model, x, y, off, ln, cfg, epochs, phase: int):
    """``epochs`` of CE training over (x, y) in shuffled minibatches through the step builder."""
    device = torch.device(cfg.device)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay, fused=cfg.fused_optimizer)
    g = seeding.generator(cfg.seed, "baseline", phase)
    model.train()
    n, step, k = x.shape[0], None, 0
    with backbone_mode(model, cfg):
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                xb = x[idx].to(device)
                b = {"labels": y[idx].to(device), "ce_offset": off[idx].to(device), "ce_len": ln[idx].to(device)}
                if step is None:
                    step = build_step(model, opt, LossSpec(), cfg, xb)
                step(xb, b, seeding.dropout_seeds(cfg.seed, "baseline", phase, k))
                k += 1
    model.eval()


def finetune(stream, cfg, model_fn) -> Result:
    """The backbone trained on each task in turn (CE over the whole head), evaluated after each."""
    t0 = time.perf_counter()
    with seeding.private_rng(seeding.derive(cfg.seed, "model_init"), cfg.device):
        return _finetune(stream, cfg, model_fn, t0)


def _finetune(stream, cfg, model_fn, t0) -> Result:
    model = model_fn(stream.input_dim, stream.num_classes).to(cfg.device)
    result = Result.empty([t.name for t in stream], step_starts=list(range(len(stream))), method="finetune")
    c = stream.num_classes
    for t, task in enumerate(stream):
        y = task.y_train + stream.offsets[t]
        n = len(y)
        _train(model, task.x_train.float(), y, torch.zeros(n, dtype=torch.long), torch.full((n,), c), cfg,
               cfg.epochs, t)
        cil, til = evaluate(model, stream, t, cfg.device, cfg.full_head)
        result.cil_matrix[t, : t + 1], result.til_matrix[t, : t + 1] = cil, til
    result.timings = {"total_s": time.perf_counter() - t0}
    return result


def joint(stream, cfg, model_fn, epochs: int | None = None) -> Result:
    """The backbone trained on the union of all tasks (CE over the whole head); only the last
    row of the matrices is filled."""
    t0 = time.perf_counter()
    with seeding.private_rng(seeding.derive(cfg.seed, "model_init"), cfg.device):
        return _joint(stream, cfg, model_fn, epochs, t0)


def _joint(stream, cfg, model_fn, epochs, t0) -> Result:
    model = model_fn(stream.input_dim, stream.num_classes).to(cfg.device)
    x = torch.cat([t.x_train.float() for t in stream])
    y = torch.cat([t.y_train + o for t, o in zip(stream, stream.offsets)])
    n, c = len(y), stream.num_classes
    _train(model, x, y, torch.zeros(n, dtype=torch.long), torch.full((n,), c), cfg, epochs or cfg.epochs, -1)
    result = Result.empty([t.name for t in stream], step_starts=[0], method="joint")
    last = len(stream) - 1
    cil, til = evaluate(model, stream, last, cfg.device, cfg.full_head)
    result.cil_matrix[last], result.til_matrix[last] = cil, til
    result.timings = {"total_s": time.perf_counter() - t0}
    return result
