"""Pure-PyTorch references of every bmc_fast loss: the same signatures and semantics as the
fused ops, computed in float32 (float64 for float64 inputs) and returned in the loss dtype:
paired inputs of mixed dtypes promoted as torch promotes them, float32 under autocast
(:func:`bmc_fast._validate.loss_dtype`).

They are the test oracle and the ``eager`` baseline of the benchmarks, and run when the compiled
extension is missing. Written for clarity, not speed.
"""
from __future__ import annotations

import math

import torch

from . import _validate as v

__all__ = [
    "stability_loss",
    "weight_stability_loss",
    "batched_distillation_loss",
    "task_masked_cross_entropy",
    "task_masked_kd_loss",
    "masked_log_softmax",
    "bn_relu_dropout",
    "dropout_keep_mask",
    "resmlp",
    "adamw_step",
]


def _eager() -> bool:
    """Data-dependent argument checks run eagerly only: under torch.compile (the `compiled`
    benchmark baseline) they would break the graph."""
    return not torch.compiler.is_compiling()


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_experts(terms: torch.Tensor, reduction: str, count) -> torch.Tensor:
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "mean":  # no expert to average over gives 0 (total is then 0 too)
        total = total / (count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1))
    return total


def stability_loss(expert, base, weights=None, reduction="sum"):
    v.stability_args(expert, base, weights, reduction)
    if _eager():
        v.check_finite_weights(weights)
    dt = v.loss_dtype(expert, base)
    expert, base = v.cast(expert, dt), v.cast(base, dt)
    acc = _acc(expert)
    k = expert.shape[0]
    d = (expert.to(acc) - base.to(acc)).reshape(k, expert[0].numel() if k else 0)
    per = d.pow(2).sum(1) / max(d.shape[1], 1)
    if weights is not None:
        per = per * weights.to(acc)
    return _reduce_experts(per, reduction, k).to(expert.dtype)


def weight_stability_loss(expert_params, base_params, importance=None, weights=None, reduction="sum"):
    v.weight_stability_args(expert_params, base_params, importance, weights, reduction)
    if _eager():
        v.check_importance(importance)
    if _eager():
        v.check_finite_weights(weights)
    dt = v.loss_dtype(expert_params, base_params)
    expert_params, base_params = v.cast(expert_params, dt), v.cast(base_params, dt)
    acc = _acc(expert_params)
    sq = (expert_params.to(acc) - base_params.to(acc)).pow(2)
    if importance is not None:
        sq = sq * importance.to(acc)
    per = sq.sum(1)
    if weights is not None:
        per = per * weights.to(acc)
    return _reduce_experts(per, reduction, expert_params.shape[0]).to(expert_params.dtype)


def batched_distillation_loss(student, teacher, expert_ids, num_experts, weights=None, reduction="sum"):
    e = v.distillation_args(student, teacher, expert_ids, num_experts, weights, reduction)
    if _eager():
        v.check_ids(expert_ids, e)
    if _eager():
        v.check_finite_weights(weights)
    dt = v.loss_dtype(student, teacher)
    student, teacher = v.cast(student, dt), v.cast(teacher, dt)
    acc = _acc(student)
    n = student.shape[0]
    row = (student.to(acc) - teacher.to(acc)).pow(2).reshape(n, student[0].numel() if n else 0)
    row = row.sum(1) / max(row.shape[1], 1)
    ids = expert_ids.long()
    sums = torch.zeros(e, dtype=acc, device=student.device).index_add(0, ids, row)
    counts = torch.zeros(e, dtype=acc, device=student.device).index_add(
        0, ids, torch.ones(n, dtype=acc, device=student.device))
    per = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    if weights is not None:
        per = per * weights.to(acc)
    return _reduce_experts(per, reduction, (counts > 0).sum()).to(student.dtype)


def masked_log_softmax(logits, task_offset, task_len, temperature=1.0):
    """log softmax(logits / temperature) over each row's range [o, o + l); -inf outside it."""
    acc = _acc(logits)
    cols = torch.arange(logits.shape[1], device=logits.device)
    mask = (cols >= task_offset[:, None]) & (cols < (task_offset + task_len)[:, None])
    x = (logits.to(acc) / temperature).masked_fill(~mask, float("-inf"))
    return torch.log_softmax(x, dim=1), mask


def task_masked_cross_entropy(logits, labels, task_offset, task_len, reduction="mean", ignore_index=-100):
    off, ln = v.cross_entropy_args(logits, labels, task_offset, task_len, reduction, ignore_index)
    if _eager():
        v.check_ranges(off, ln, logits.shape[1])
    if _eager():
        v.check_labels(labels, off, ln, ignore_index)
    logits = v.cast(logits, v.loss_dtype(logits))
    logp, _ = masked_log_softmax(logits, off, ln)
    keep = labels != ignore_index
    safe = torch.where(keep, labels.long(), off.long())
    row = -logp.gather(1, safe[:, None]).squeeze(1)
    row = torch.where(keep, row, torch.zeros_like(row))
    if reduction == "none":
        out = row
    elif reduction == "sum":
        out = row.sum()
    else:
        out = row.sum() / keep.sum()
    return out.to(logits.dtype)


def task_masked_kd_loss(student_logits, teacher_logits, task_offset, task_len, temperature=1.0, reduction="mean"):
    off, ln = v.kd_args(student_logits, teacher_logits, task_offset, task_len, temperature, reduction)
    if _eager():
        v.check_ranges(off, ln, student_logits.shape[1])
    dt = v.loss_dtype(student_logits, teacher_logits)
    student_logits, teacher_logits = v.cast(student_logits, dt), v.cast(teacher_logits, dt)
    ls, mask = masked_log_softmax(student_logits, off, ln, temperature)
    lt, _ = masked_log_softmax(teacher_logits, off, ln, temperature)
    pt = lt.exp()
    keep = mask & (pt > 0)
    term = torch.where(keep, pt * (lt.masked_fill(~keep, 0) - ls.masked_fill(~mask, 0)), torch.zeros_like(pt))
    row = term.sum(1) * temperature**2
    if reduction == "none":
        out = row
    elif reduction == "sum":
        out = row.sum()
    else:
        out = row.sum() / student_logits.shape[0]
    return out.to(student_logits.dtype)


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32  # int64 products wrap; the low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep_mask(seed: int, shape, p: float, device=None, offset: int = 0) -> torch.Tensor:
    """The keep mask of bn_relu_dropout's dropout (csrc/common/dropout_hash.h): element i (row-major
    index) is kept when the 24-bit hash of (seed, offset + i) is >= round(p * 2^24)."""
    n = math.prod(shape)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    h = _mix32(_mix32((i & _M32) ^ k0) ^ (((i >> 32) + k1) & _M32)) >> 8
    return (h >= int(p * 16777216.0 + 0.5)).view(tuple(shape))


def bn_relu_dropout(inputs, weights, biases, running_means=None, running_vars=None, pre_biases=None,
                    momentum=0.1, eps=1e-5, p=0.0, seed=0):
    v.bn_relu_dropout_args(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p)
    return _bn_relu_dropout(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p, seed)


def _bn_relu_dropout(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p, seed,
                     first_model=0):
    """bn_relu_dropout after its checks; the dropout counters of model k start at
    (first_model + k) * B * C (as resmlp's first_model)."""
    if inputs[0].dim() == 2:  # one model's [B, C]: the stacked form with K = 1
        lists = [[t[None] for t in lst] if lst else lst for lst in (inputs, weights, biases, running_means,
                                                                     running_vars, pre_biases)]
        return _bn_relu_dropout(*lists, momentum, eps, p, seed, first_model)[0]
    acc = _acc(inputs[0])
    b = inputs[0].shape[1]
    z = 0
    for i, a in enumerate(inputs):
        af = a.to(acc)
        mean = af.mean(1, keepdim=True)
        var = (af - mean).pow(2).mean(1, keepdim=True)
        z = z + (af - mean) * torch.rsqrt(var + eps) * weights[i].to(acc)[:, None] + biases[i].to(acc)[:, None]
        if running_means:
            with torch.no_grad():
                m = mean[:, 0] + (pre_biases[i].to(acc) if pre_biases else 0)
                running_means[i].mul_(1 - momentum).add_((momentum * m).to(running_means[i].dtype))
                running_vars[i].mul_(1 - momentum).add_((momentum * var[:, 0] * b / (b - 1)).to(running_vars[i].dtype))
    out = torch.relu(z)
    keep = dropout_keep_mask(int(seed), out.shape, p, out.device, offset=first_model * out.shape[1] * out.shape[2])
    out = out * (keep.to(acc) / (1 - p))
    return out.to(inputs[0].dtype)


def resmlp(x, weights, biases, bn_weights, bn_biases, running_means=None, running_vars=None, momentum=0.1, eps=1e-5,
           p=None, seeds=None, first_model=0):
    """Training-mode ResMLP forward from Linear layers and :func:`bn_relu_dropout` (see
    :func:`bmc_fast.ops.resmlp`); seeds default to 0 (no dropout mask is drawn here). Model k
    draws the dropout masks of model ``first_model + k``."""
    nb = v.resmlp_args(x, weights, biases, bn_weights, bn_biases, running_means, running_vars, momentum, eps, p,
                       seeds, first_model)
    first_model = int(first_model)
    p = list(p) if p is not None else [0.0] * nb
    seeds = list(seeds) if seeds is not None else [0] * nb

    def linear(h, w, b=None):
        out = h @ w.transpose(-1, -2)
        return out if b is None else out + b.unsqueeze(-2)

    h = linear(x, weights[0], biases[0])
    for b in range(nb):
        i, j = 1 + 3 * b, 3 * b
        stats = lambda *k: ([running_means[j + n] for n in k] if running_means else None,  # noqa: E731
                            [running_vars[j + n] for n in k] if running_vars else None)
        r = _bn_relu_dropout([linear(h, weights[i])], [bn_weights[j]], [bn_biases[j]], *stats(0), [biases[i]],
                             momentum, eps, 0.0, 0)
        h = _bn_relu_dropout([linear(r, weights[i + 1]), linear(h, weights[i + 2])], bn_weights[j + 1:j + 3],
                             bn_biases[j + 1:j + 3], *stats(1, 2), biases[i + 1:i + 3], momentum, eps, p[b], seeds[b],
                             first_model)
    return linear(h, weights[-1], biases[-1]), h


@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, step=1):
    """One AdamW step in place, as torch.optim.AdamW computes it (see
    :func:`bmc_fast.ops.adamw.adamw_step`)."""
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-lr / bc1)
