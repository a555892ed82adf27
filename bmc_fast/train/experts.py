"""The regularization phase: K experts start from the base model and train at the same time, each
on its own task, held near the base by the stability loss (BMC-SPEC §2.1), then each builds its
buffer (§2.2).

:func:`train_experts` is a pure step from (base state, tasks, config, seed) to artifacts (expert
state, buffer) that can be saved and moved to another process. Three ways to run the K experts:

* ``"stacked"``: one batched model: parameters and buffers (BatchNorm statistics too) stacked
  over K with :func:`torch.func.stack_module_state`, one ``vmap``-ed forward over ``[K, B, ...]``,
  one backward, one optimizer over the stacked tensors (AdamW is elementwise, so this is the
  same as K optimizers). Works for any model, on CPU and GPU. The default ResMLP on the CPU
  skips vmap: :func:`bmc_fast.backbone.resmlp_train_forward` runs the K models through the fused
  ``resmlp`` op: batched matmuls and the ``bn_relu_dropout`` kernel (``fused_backbone``).
* ``"streams"``: K ordinary modules, each stepping on its own CUDA stream.
* ``"sequential"``: the simple loop, one expert after another.

Every expert takes the same number of steps (``ceil(max task size / batch) * epochs``) over
fixed-size batches drawn from its own seeded, cycling permutation of its task, so the three modes
train the same experts up to float rounding (with dropout, each mode draws its own masks).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .. import _ext
from .memory import Buffer
from ..backbone import ResMLP, fused_args, fused_path_available, fused_train_step, resmlp_train_forward
from ..optim import AdamW

__all__ = ["ExpertArtifact", "train_experts", "flat_params", "expert_batches", "resolve_parallel"]


@dataclass
class ExpertArtifact:
    task: int                     # index of the task in the stream
    buffer: Buffer
    state: dict | None = None     # the expert's state_dict when asked (keep_expert_states)
    final_loss: float = float("nan")


def adamw(params, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW in one fused pass over all parameters instead of a handful of small ops per tensor:
    :class:`bmc_fast.optim.AdamW` (one kernel call per step) for float32/float64 CPU parameters,
    torch's fused AdamW elsewhere (CUDA). ``fused=False`` is torch's default AdamW (a loop over
    the parameters on the CPU), as a plain training script runs it."""
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


@contextlib.contextmanager
def backbone_mode(model: nn.Module, cfg):
    """Within the block, a :class:`ResMLP` runs its fused training path only if
    ``cfg.fused_backbone`` (and the model's own ``fused``) allow it."""
    if isinstance(model, ResMLP) and model.fused and not cfg.fused_backbone:
        model.fused = False
        try:
            yield
        finally:
            model.fused = True
    else:
        yield


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one flat vector, in ``named_parameters`` order (the order
    of the stacked parameters too)."""
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def _gen(*seed_parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash(tuple(int(s) for s in seed_parts)) % (2**62))
    return g


def expert_batches(n: int, steps: int, batch: int, seed: tuple) -> torch.Tensor:
    """[steps, batch] sample indices into a task of n samples: cycling random permutations."""
    g = _gen(*seed)
    total = steps * batch
    perms = [torch.randperm(n, generator=g) for _ in range(-(-total // n))]
    return torch.cat(perms)[:total].view(steps, batch)


def resolve_parallel(mode: str, device) -> str:
    if mode not in ("auto", "stacked", "streams", "sequential"):
        raise ValueError(f"parallel must be 'auto', 'stacked', 'streams' or 'sequential', got {mode!r}")
    if mode == "streams" and torch.device(device).type != "cuda":
        raise ValueError("parallel='streams' runs one CUDA stream per expert and needs device='cuda'")
    return "stacked" if mode == "auto" else mode


def _losses(cfg):
    if cfg.losses == "fused":
        import bmc_fast as L
    elif cfg.losses == "reference":
        from bmc_fast import reference as L
    else:
        raise ValueError(f"losses must be 'fused' or 'reference', got {cfg.losses!r}")
    return L


def train_experts(base: nn.Module, stream, task_ids: list[int], cfg, seed: int, use_stability: bool = True,
                  progress=None) -> list[ExpertArtifact]:
    """Trains one expert per task in ``task_ids`` from ``base`` (left unchanged) and returns their
    artifacts. ``cfg`` is a :class:`bmc_fast.BMCConfig`."""
    device = torch.device(cfg.device)
    mode = resolve_parallel(cfg.parallel, device)
    L = _losses(cfg)
    k = len(task_ids)
    tasks = [stream[t] for t in task_ids]
    sizes = [t.x_train.shape[0] for t in tasks]
    steps = math.ceil(max(sizes) / cfg.batch_size) * cfg.epochs
    idx = torch.stack([expert_batches(n, steps, cfg.batch_size, (seed, t, 1)) for n, t in zip(sizes, task_ids)])
    ranges = [stream.task_range(t) for t in task_ids]
    # Inputs of all K tasks in one padded tensor on the device: a step gathers [K, B, ...] at once.
    x_pad = torch.zeros((k, max(sizes)) + tasks[0].input_shape, dtype=torch.float32)
    y_pad = torch.zeros(k, max(sizes), dtype=torch.long)
    for i, (t, (o, _)) in enumerate(zip(tasks, ranges)):
        x_pad[i, :sizes[i]] = t.x_train.float()
        y_pad[i, :sizes[i]] = t.y_train + o
    x_pad, y_pad, idx = x_pad.to(device), y_pad.to(device), idx.to(device)
    off = torch.tensor([o for o, _ in ranges], device=device)
    ln = torch.tensor([n for _, n in ranges], device=device)

    base = base.to(device)
    frozen = copy.deepcopy(base).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    stab = use_stability and cfg.stability_coef > 0
    base_flat = flat_params(frozen).detach() if stab and cfg.stability == "weight" else None

    # Step s's rows of every task as one index_select over the [K * N] rows of a [K, N, ...]
    # tensor (advanced indexing t[rows, idx[:, s]] costs ~3x more at these sizes).
    flat_idx = (torch.arange(k, device=device)[:, None, None] * x_pad.shape[1] + idx).transpose(0, 1).contiguous()

    def rows_of_step(t, s):  # [K, N, ...] -> [K, B, ...]
        return torch.index_select(t.view((-1,) + t.shape[2:]), 0, flat_idx[s].view(-1)).view((k, -1) + t.shape[2:])

    def batch(s):
        return rows_of_step(x_pad, s), rows_of_step(y_pad, s)

    table = (_base_feature_table(frozen, x_pad, sizes, cfg.base_feature_table_mb)
             if stab and cfg.stability == "feature" and cfg.base_feature_table_mb > 0 else None)

    def base_features(xb, s):  # [K, B, ...] -> [K, B, F], the frozen base on the same batches
        if table is not None:
            return rows_of_step(table, s)
        with torch.no_grad():
            return frozen(xb.reshape((-1,) + xb.shape[2:]))[1].view(xb.shape[0], xb.shape[1], -1)

    if mode == "stacked":
        experts, losses = _train_stacked(base, frozen, batch, base_features, base_flat, k, steps, off, ln,
                                         cfg, L, stab, seed, progress)
    else:
        experts, losses = _train_each(base, frozen, batch, base_features, base_flat, k, steps, off, ln,
                                      cfg, L, stab, mode, seed, progress)
    return [
        ExpertArtifact(task=t, buffer=_make_buffer(e, stream, t, cfg, seed),
                       state={n: v.detach().cpu().clone() for n, v in e.state_dict().items()} if cfg.keep_expert_states
                       else None, final_loss=fl)
        for e, t, fl in zip(experts, task_ids, losses)
    ]


def _step_loss(logits, feats, yb, off_rows, ln_rows, hb, expert_flat, base_flat, cfg, L, stab, kk, bsz):
    """task_coef * masked CE (mean over each expert's batch, summed over experts) +
    stability_coef * S_k summed over experts. The one-call step (bmc_fast.backbone.train_step, called
    in _train_stacked and _train_each) computes the same terms: change both together."""
    # One scaling node per term (each autograd node costs ~10 us at these sizes).
    loss = L.task_masked_cross_entropy(logits, yb, off_rows, ln_rows, reduction="sum") * (cfg.task_coef / bsz)
    if stab:
        if cfg.stability == "feature":
            s = L.stability_loss(feats.view(kk, bsz, -1), hb, reduction="sum")
        else:
            s = L.weight_stability_loss(expert_flat, base_flat, reduction="sum")
        loss = loss + scaled(cfg.stability_coef, s)
    return loss


def scaled(coef: float, t: torch.Tensor) -> torch.Tensor:
    """``coef * t``, without an autograd node when coef is 1."""
    return t if coef == 1 else coef * t


@torch.no_grad()
def _base_feature_table(frozen: nn.Module, x_pad: torch.Tensor, sizes: list[int], budget_mb: float,
                        chunk: int = 4096):
    """[K, N, F] features of the frozen base for the padded task inputs, or None above
    ``budget_mb``. Computed once, before the expert steps: a few large forward passes instead of
    one small one per step (and per epoch). Eval mode makes a sample's features independent of
    its batch, so this is the same as computing them batch by batch."""
    k, n = x_pad.shape[:2]
    probe = frozen(x_pad[0, :1])[1]
    if k * n * probe[0].numel() * probe.element_size() > budget_mb * 2**20:
        return None
    table = torch.zeros((k, n) + tuple(probe.shape[1:]), dtype=probe.dtype, device=probe.device)
    for i, size in enumerate(sizes):
        for a in range(0, size, chunk):
            b = min(size, a + chunk)
            table[i, a:b] = frozen(x_pad[i, a:b])[1]
    return table


def _fused_backbone(base: nn.Module, cfg, x: torch.Tensor) -> bool:
    return bool(cfg.fused_backbone and isinstance(base, ResMLP) and base.fused and fused_path_available(base, x))


def train_forward(model: nn.Module, cfg, x: torch.Tensor):
    """``model``'s training-mode forward for a whole phase on inputs like ``x``: for the default
    ResMLP on the fused path, :func:`resmlp_train_forward` with the argument lists built once
    (the module's own per-call checks and list building are ~0.1 ms, a few percent of a
    64-row step); else the module itself. The parameters must keep their identity over the
    phase (optimizers update them in place)."""
    if _fused_backbone(model, cfg, x):
        lists = fused_args(model)
        return lambda inp: resmlp_train_forward(model, lists, inp)
    return model


def _train_stacked(base, frozen, batch, base_features, base_flat, k, steps, off, ln, cfg, L, stab, seed,
                   progress):
    device = off.device
    members = [copy.deepcopy(base).train() for _ in range(k)]
    params, buffers = stack_module_state(members)
    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    skeleton = copy.deepcopy(base).to("meta").train()  # whatever mode the base was left in
    opt = adamw(params.values(), cfg.lr, cfg.weight_decay, fused=cfg.fused_optimizer)

    fstep = None  # the whole step in one call, where it applies (bmc_fast.backbone.train_step)
    x0 = batch(0)[0]
    if _fused_backbone(base, cfg, x0[0]):
        lists = fused_args(skeleton, params, buffers)  # the same tensors every step: built once
        if not (stab and cfg.stability == "weight"):  # weight stability: the autograd step
            fstep = fused_train_step(skeleton, lists, opt, x0, cfg)

        def batched(p, b, x):  # the default ResMLP: K models in one fused op call
            return resmlp_train_forward(skeleton, lists, x)
    else:
        def fwd(p, b, x):
            return functional_call(skeleton, (p, b), (x,))

        batched = vmap(fwd, randomness="different")
    bsz = cfg.batch_size
    off_rows = off.repeat_interleave(bsz)
    ln_rows = ln.repeat_interleave(bsz)
    loss_val = torch.zeros((), device=device)
    torch.manual_seed(hash((seed, 2)) % (2**62))
    for s in range(steps):
        xb, yb = batch(s)
        if fstep is not None:  # _step_loss + backward + opt.step() in one call
            hb = base_features(xb, s) if stab else None
            loss_val = fstep(xb, yb.reshape(-1), off_rows, ln_rows, cfg.task_coef / bsz, "sum",
                             stability=None if hb is None else (hb, cfg.stability_coef))
            if progress is not None:
                progress.update(1)
            continue
        logits, feats = batched(params, buffers, xb)
        hb = base_features(xb, s) if stab and cfg.stability == "feature" else None
        ef = torch.cat([p.reshape(k, -1) for p in params.values()], 1) if stab and cfg.stability == "weight" else None
        loss = _step_loss(logits.reshape(k * bsz, -1), feats, yb.reshape(-1), off_rows, ln_rows, hb, ef, base_flat,
                          cfg, L, stab, k, bsz)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = loss.detach()
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        for i, m in enumerate(members):
            m.load_state_dict({**{n: p[i] for n, p in params.items()}, **{n: b[i] for n, b in buffers.items()}})
    final = float(loss_val) / k
    return members, [final] * k


def _train_each(base, frozen, batch, base_features, base_flat, k, steps, off, ln, cfg, L, stab, mode, seed,
                progress):
    device = off.device
    members = [copy.deepcopy(base).train() for _ in range(k)]
    for m in members:
        if isinstance(m, ResMLP):
            m.fused = m.fused and cfg.fused_backbone
    opts = [adamw(m.parameters(), cfg.lr, cfg.weight_decay, fused=cfg.fused_optimizer) for m in members]
    bsz = cfg.batch_size
    x0 = batch(0)[0] if steps else None
    fwds = [train_forward(m, cfg, x0[i]) for i, m in enumerate(members)] if steps else members
    # The whole step in one call where it applies (bmc_fast.backbone.train_step): not with weight stability.
    fsteps = [fused_train_step(m, fused_args(m), o, x0[i], cfg)
              if isinstance(m, ResMLP) and mode != "streams" and not (stab and cfg.stability == "weight") else None
              for i, (m, o) in enumerate(zip(members, opts))] if steps else [None] * k
    streams = [torch.cuda.Stream(device=device) for _ in range(k)] if mode == "streams" else None
    finals = [float("nan")] * k
    torch.manual_seed(hash((seed, 2)) % (2**62))

    def one(i, xb, yb, hb):
        if fsteps[i] is not None:
            return fsteps[i](xb[i], yb[i], off[i].expand(bsz), ln[i].expand(bsz), cfg.task_coef / bsz, "sum",
                             stability=None if hb is None else (hb[i:i + 1], cfg.stability_coef))
        logits, feats = fwds[i](xb[i])
        ef = flat_params(members[i])[None] if stab and cfg.stability == "weight" else None
        loss = _step_loss(logits, feats, yb[i], off[i].expand(bsz), ln[i].expand(bsz),
                          None if hb is None else hb[i:i + 1], ef, base_flat, cfg, L, stab, 1, bsz)
        opts[i].zero_grad(set_to_none=True)
        loss.backward()
        opts[i].step()
        return loss.detach()

    last = [None] * k
    for s in range(steps):
        xb, yb = batch(s)
        hb = base_features(xb, s) if stab and cfg.stability == "feature" else None
        if streams is None:
            for i in range(k):
                last[i] = one(i, xb, yb, hb)
        else:
            cur = torch.cuda.current_stream(device)
            for i in range(k):
                streams[i].wait_stream(cur)
                with torch.cuda.stream(streams[i]):
                    last[i] = one(i, xb, yb, hb)
            for st in streams:
                cur.wait_stream(st)
        if progress is not None:
            progress.update(1)
    finals = [float(v) for v in last] if steps else finals
    return members, finals


@torch.no_grad()
def _make_buffer(expert: nn.Module, stream, t: int, cfg, seed: int) -> Buffer:
    """A random subset of task t (``buffer_size``: a count, or a fraction when < 1) with the
    expert's features and, when ``store_logits``, its logits over the task's range."""
    task = stream[t]
    n = task.x_train.shape[0]
    size = cfg.buffer_size
    keep = min(n, int(round(size * n)) if isinstance(size, float) and size < 1 else int(size))
    idx = torch.randperm(n, generator=_gen(seed, t, 3))[:keep].sort().values
    o, ln = stream.task_range(t)
    x = task.x_train[idx].float()
    device = torch.device(cfg.device)
    expert.eval()
    feats, logits = [], []
    for chunk in torch.split(x, 4096):
        lg, h = expert(chunk.to(device))
        feats.append(h.float().cpu())
        logits.append(lg[:, o:o + ln].float().cpu())
    dtype = torch.float16 if cfg.buffer_dtype == "float16" else torch.float32
    features = torch.cat(feats) if feats else torch.zeros(0, 0)
    return Buffer(x=x, y=task.y_train[idx] + o, offset=o, length=ln, features=features.to(dtype),
                  logits=torch.cat(logits).to(dtype) if cfg.store_logits and logits else None, task=t)
