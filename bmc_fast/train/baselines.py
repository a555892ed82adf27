"""Reference points for BMC on a stream: sequential fine-tuning (the forgetting floor) and joint
training on all tasks at once (the upper bound), with the same backbone and optimiser."""
from __future__ import annotations

import time

import torch

from .experts import _gen, _losses, adamw, backbone_mode
from .metrics import Result, evaluate
from ..backbone import ResMLP, fused_args, fused_train_step

__all__ = ["finetune", "joint"]


def _train(model, x, y, off, ln, cfg, epochs, seed):
    L = _losses(cfg)
    device = torch.device(cfg.device)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay, fused=cfg.fused_optimizer)
    g = _gen(seed, 11)
    torch.manual_seed(hash((seed, 12)) % (2**62))
    model.train()
    n = x.shape[0]
    fstep, resolved = None, False  # the whole step in one call, where it applies (bmc_fast.backbone.train_step)
    with backbone_mode(model, cfg):
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                xb, yb, ob, lb = x[idx].to(device), y[idx].to(device), off[idx].to(device), ln[idx].to(device)
                if not resolved:
                    resolved = True
                    if isinstance(model, ResMLP):
                        fstep = fused_train_step(model, fused_args(model), opt, xb, cfg)
                if fstep is not None:
                    fstep(xb, yb, ob, lb)
                    continue
                logits, _ = model(xb)
                loss = L.task_masked_cross_entropy(logits, yb, ob, lb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()


def finetune(stream, cfg, model_fn) -> Result:
    """The backbone trained on each task in turn (CE over the whole head), evaluated after each."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = model_fn(stream.input_dim, stream.num_classes).to(cfg.device)
    result = Result.empty([t.name for t in stream], step_starts=list(range(len(stream))), method="finetune")
    c = stream.num_classes
    for t, task in enumerate(stream):
        y = task.y_train + stream.offsets[t]
        n = len(y)
        _train(model, task.x_train.float(), y, torch.zeros(n, dtype=torch.long), torch.full((n,), c), cfg,
               cfg.epochs, hash((cfg.seed, t)) % (2**62))
        cil, til = evaluate(model, stream, t, cfg.device, cfg.full_head)
        result.cil_matrix[t, : t + 1], result.til_matrix[t, : t + 1] = cil, til
    result.timings = {"total_s": time.perf_counter() - t0}
    return result


def joint(stream, cfg, model_fn, epochs: int | None = None) -> Result:
    """The backbone trained on the union of all tasks (CE over the whole head); only the last
    row of the matrices is filled."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = model_fn(stream.input_dim, stream.num_classes).to(cfg.device)
    x = torch.cat([t.x_train.float() for t in stream])
    y = torch.cat([t.y_train + o for t, o in zip(stream, stream.offsets)])
    n, c = len(y), stream.num_classes
    _train(model, x, y, torch.zeros(n, dtype=torch.long), torch.full((n,), c), cfg, epochs or cfg.epochs, cfg.seed)
    result = Result.empty([t.name for t in stream], step_starts=[0], method="joint")
    last = len(stream) - 1
    cil, til = evaluate(model, stream, last, cfg.device, cfg.full_head)
    result.cil_matrix[last], result.til_matrix[last] = cil, til
    result.timings = {"total_s": time.perf_counter() - t0}
    return result
