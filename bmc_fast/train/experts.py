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

Every expert takes ``epochs`` passes over its own task: ``ceil(task size / batch) * epochs``
steps (:func:`expert_steps`) over fixed-size batches drawn from its own cycling permutation of
its task; the stack shrinks as the experts of smaller tasks finish. Its batch order and its
dropout masks (on the fused ResMLP) are keyed by (seed, task id, training step) only
(:mod:`bmc_fast.train.seeding`), so the three modes, any stack it shares, and any split of the
step's tasks over processes train the same expert up to float rounding.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..backbone import ResMLP, fused_args, fused_path_available, inference_rows
from . import seeding
from .memory import Buffer, buffer_count
from .step import FastPaths, LossSpec, describe

__all__ = ["ExpertArtifact", "train_experts", "expert_steps", "flat_params", "expert_batches", "resolve_parallel"]


@dataclass
class ExpertArtifact:
    task: int                     # index of the task in the stream
    buffer: Buffer
    state: dict | None = None     # the expert's state_dict when asked (keep_expert_states)
    final_loss: float = float("nan")
    step: str = ""                # how its steps ran: "fused" or "autograd (<reason>)"


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one flat vector, in ``named_parameters`` order (the order
    of the stacked parameters too)."""
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def expert_batches(n: int, steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """[steps, batch] sample indices into a task of n samples: cycling random permutations."""
    total = steps * batch
    perms = [torch.randperm(n, generator=generator) for _ in range(-(-total // n))]
    return torch.cat(perms)[:total].view(steps, batch) if perms else torch.empty(0, batch, dtype=torch.long)


def resolve_parallel(mode: str, device) -> str:
    if mode not in ("auto", "stacked", "streams", "sequential"):
        raise ValueError(f"parallel must be 'auto', 'stacked', 'streams' or 'sequential', got {mode!r}")
    if mode == "streams" and torch.device(device).type != "cuda":
        raise ValueError("parallel='streams' runs one CUDA stream per expert and needs device='cuda'")
    return "stacked" if mode == "auto" else mode


def expert_steps(n: int, batch_size: int, epochs: int) -> int:
    """The training steps of the expert of a task of ``n`` samples: ``epochs`` passes of
    ``ceil(n / batch_size)`` batches."""
    return math.ceil(n / batch_size) * epochs


@dataclass
class _Phase:
    """What the expert loops share: the step's tasks, batches, loss, fast paths and randomness."""
    cfg: object
    paths: FastPaths
    task_ids: list
    steps: int                 # the longest expert's steps
    ends: list                 # every expert's own steps
    step_index: int
    batch: object              # (s, lo, hi) -> ([hi - lo, B, ...] inputs, [hi - lo, B] global labels) of slots lo..hi-1
    base_features: object      # (inputs, s, lo, hi) -> [hi - lo, B, F] features of the frozen base
    off: torch.Tensor          # [K] class offsets of the tasks
    ln: torch.Tensor           # [K] class counts
    loss: LossSpec
    base_flat: torch.Tensor | None
    progress: object

    def seeds(self, s: int) -> list[int]:
        return seeding.dropout_seeds(self.cfg.seed, "expert_dropout", self.step_index, s)

    @property
    def feature_stability(self) -> bool:
        return bool(self.loss.stability_coef) and self.loss.stability == "feature"


def train_experts(base: nn.Module, stream, task_ids: list[int], cfg, step_index: int, use_stability: bool = True,
                  steps: int | None = None, progress=None, whole_head: bool = False) -> list[ExpertArtifact]:
    """Trains one expert per task in ``task_ids`` (consecutive task ids) from ``base`` (left
    unchanged) and returns their artifacts. ``cfg`` is a :class:`bmc_fast.BMCConfig`;
    ``step_index`` the incremental step; ``steps`` the training steps of every expert (default:
    each its own, :func:`expert_steps` of its task). ``whole_head=True`` trains the default ResMLP's
    experts with the whole head instead of their task's rows (same experts up to rounding)."""
    if list(task_ids) != list(range(task_ids[0], task_ids[0] + len(task_ids))):
        raise ValueError(f"task_ids must be consecutive task ids, got {task_ids}")
    device = torch.device(cfg.device)
    mode = resolve_parallel(cfg.parallel, device)
    k = len(task_ids)
    tasks = [stream[t] for t in task_ids]
    sizes = [t.x_train.shape[0] for t in tasks]
    ends = [steps if steps is not None else expert_steps(n, cfg.batch_size, cfg.epochs) for n in sizes]
    steps = max(ends)
    idx = torch.stack([expert_batches(n, steps, cfg.batch_size, seeding.generator(cfg.seed, "expert_batches", t))
                       for n, t in zip(sizes, task_ids)])  # expert i reads the first ends[i] rows
    ranges = [stream.task_range(t) for t in task_ids]
    base = base.to(device)
    stab = use_stability and cfg.stability_coef > 0
    # The default ResMLP's experts carry only their own task's head rows: the task-masked loss
    # reads nothing else, and an expert's other rows are never used afterwards, so the cost of
    # a step does not grow with the stream's classes. (Weight stability holds the whole head.)
    narrow = isinstance(base, ResMLP) and not whole_head and not (stab and cfg.stability == "weight")
    if narrow:
        width = max(n for _, n in ranges)
        members = [base.head_rows(o, width) for o, _ in ranges]
        label_offsets = [0] * k
    else:
        members = [copy.deepcopy(base) for _ in range(k)]
        label_offsets = [o for o, _ in ranges]
    # Inputs stay where and as they are stored (a memory-mapped float16 task stays mapped and
    # float16): a step gathers its [K, B, ...] rows task by task and converts only them to
    # float32. Labels, in the experts' heads, in one padded [K, N] tensor.
    xs = [t.x_train.to(device) for t in tasks]
    y_pad = torch.zeros(k, max(sizes), dtype=torch.long)
    for i, t in enumerate(tasks):
        y_pad[i, :sizes[i]] = t.y_train + label_offsets[i]
    y_pad, idx = y_pad.to(device), idx.to(device)

    # The frozen base gives the stability targets (its features; the head is not needed).
    frozen = (base.head_rows(0, 1) if narrow else copy.deepcopy(base)).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    loss = LossSpec(ce_scale=cfg.task_coef / cfg.batch_size, ce_reduction="sum", stability=cfg.stability,
                    stability_coef=cfg.stability_coef if stab else 0.0)

    # Step s's rows of a [K, N, ...] tensor (labels, base features) as one index_select over its
    # [K * N] rows (advanced indexing t[rows, idx[:, s]] costs ~3x more at these sizes).
    n_pad = y_pad.shape[1]
    flat_idx = (torch.arange(k, device=device)[:, None, None] * n_pad + idx).transpose(0, 1).contiguous()

    def rows_of_step(t, s, lo, hi):  # [K, N, ...] -> [hi - lo, B, ...]
        rows = flat_idx[s, lo:hi].reshape(-1)
        return torch.index_select(t.view((-1,) + t.shape[2:]), 0, rows).view((hi - lo, -1) + t.shape[2:])

    # Only the slots of experts still training are gathered: the tail of a step with one long task
    # reads one task's rows, not K.
    def batch(s, lo=0, hi=k):
        xb = torch.empty((hi - lo, idx.shape[2]) + tuple(xs[0].shape[1:]), dtype=torch.float32, device=device)
        for i in range(lo, hi):
            xb[i - lo] = xs[i].index_select(0, idx[i, s])
        return xb, rows_of_step(y_pad, s, lo, hi)

    table = (_base_feature_table(frozen, xs, n_pad, cfg.base_feature_table_mb)
             if stab and cfg.stability == "feature" and cfg.base_feature_table_mb > 0 else None)

    def base_features(xb, s, lo=0, hi=k):  # the frozen base on the same batches
        if table is not None:
            return rows_of_step(table, s, lo, hi)
        with torch.no_grad():
            return frozen(xb.reshape((-1,) + xb.shape[2:]))[1].view(xb.shape[0], xb.shape[1], -1)

    head_len = torch.tensor([n for _, n in ranges], device=device)
    phase = _Phase(cfg, FastPaths.of(cfg), list(task_ids), steps, ends, step_index, batch, base_features,
                   torch.tensor(label_offsets, device=device), head_len, loss,
                   flat_params(frozen).detach() if stab and cfg.stability == "weight" else None, progress)
    experts, losses, step = (_train_stacked if mode == "stacked" else _train_each)(members, phase, mode)
    arts = []
    for e, t, fl, (o, n), lo in zip(experts, task_ids, losses, ranges, label_offsets):
        buffer = _make_buffer(e, stream, t, cfg, logit_offset=lo)
        if narrow and cfg.keep_expert_states:
            e = base.with_head_of(e, o, n)
        arts.append(ExpertArtifact(task=t, buffer=buffer, final_loss=fl, step=describe(step),
                                   state={n: v.detach().cpu().clone() for n, v in e.state_dict().items()}
                                   if cfg.keep_expert_states else None))
    return arts


@torch.no_grad()
def _base_feature_table(frozen: nn.Module, xs: list, n_pad: int, budget_mb: float):
    """[K, n_pad, F] features of the frozen base for the K tasks' inputs ``xs`` (zero past each
    task's end), or None above ``budget_mb``. Computed once, before the expert steps: a few large
    forward passes instead of one small one per step (and per epoch). Eval mode makes a sample's
    features independent of its batch, so this is the same as computing them batch by batch."""
    probe = frozen(xs[0][:1].float())[1]
    if len(xs) * n_pad * probe[0].numel() * probe.element_size() > budget_mb * 2**20:
        return None
    table = torch.zeros((len(xs), n_pad) + tuple(probe.shape[1:]), dtype=probe.dtype, device=probe.device)
    chunk = inference_rows(probe.device)
    for i, x in enumerate(xs):
        for a in range(0, x.shape[0], chunk):
            b = min(x.shape[0], a + chunk)
            table[i, a:b] = frozen(x[a:b].float())[1]
    return table


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Maximal ranges [a, b) of consecutive slots in the sorted ``slots``."""
    out = []
    for i in slots:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class _StackRun:
    """Experts ``[a, b)`` of the stack as one stacked model for a segment of steps: their slices
    of the stack's parameters, buffers and AdamW moments (``count`` steps taken so far), and one
    step over them (the one-call C++ step where it applies). :meth:`write_back` returns them."""

    def __init__(self, ph: _Phase, skeleton, a: int, b: int, params: dict, buffers: dict, moments: dict,
                 count: int, fused: bool):
        cfg = ph.cfg
        self.ph, self.a, self.b, self.kk = ph, a, b, b - a
        self.params = {n: p[a:b].clone().requires_grad_(True) for n, p in params.items()}
        self.buffers = {n: t[a:b].clone() for n, t in buffers.items()}
        self.opt = ph.paths.adamw(self.params.values(), cfg.lr, cfg.weight_decay)
        if count:  # the moments and step count the experts' AdamW reached in earlier segments
            on_device = bool(self.opt.defaults.get("fused") or self.opt.defaults.get("capturable"))
            for n, p in self.params.items():
                m, v = moments[n]
                self.opt.state[p] = {"step": torch.tensor(float(count), device=p.device if on_device else "cpu"),
                                     "exp_avg": m[a:b].clone(), "exp_avg_sq": v[a:b].clone()}
        lists = forward = None
        if fused:
            lists = fused_args(skeleton, self.params, self.buffers)  # the same tensors every step: built once
        else:
            batched = vmap(lambda p, bf, x: functional_call(skeleton, (p, bf), (x,)), randomness="different")

            def forward(x, seeds=None, first_model=0):
                return batched(self.params, self.buffers, x)
        kk = self.kk
        self.step = ph.paths.build_step(
            skeleton, self.opt, ph.loss, ph.batch(count, a, b)[0], stacked=True, lists=lists, forward=forward,
            base_flat=ph.base_flat, params_flat=lambda: torch.cat([p.reshape(kk, -1) for p in self.params.values()], 1))
        bsz = cfg.batch_size
        self.off_rows, self.ln_rows = ph.off[a:b].repeat_interleave(bsz), ph.ln[a:b].repeat_interleave(bsz)
        self.loss = torch.zeros(())

    def __call__(self, xb, yb, hb, s: int, lo: int):
        """One step on the batches of slots lo.. (``xb``, ``yb``, ``hb``): this run's are a - lo..b - lo."""
        a, b = self.a - lo, self.b - lo
        batch = {"labels": yb[a:b].reshape(-1), "ce_offset": self.off_rows, "ce_len": self.ln_rows}
        if hb is not None:
            batch["base_features"] = hb[a:b]
        # model k of this run is task task_ids[self.a] + k: its dropout masks do not depend on the run
        self.loss = self.step(xb[a:b], batch, self.ph.seeds(s), self.ph.task_ids[self.a])

    @torch.no_grad()
    def write_back(self, params: dict, buffers: dict, moments: dict) -> None:
        a, b = self.a, self.b
        for n, p in self.params.items():
            params[n][a:b] = p
            st = self.opt.state[p]
            moments[n][0][a:b] = st["exp_avg"]
            moments[n][1][a:b] = st["exp_avg_sq"]
        for n, t in self.buffers.items():
            buffers[n][a:b] = t


def _train_stacked(members: list, ph: _Phase, mode: str):
    """The K experts (``members``, of one shape) as one stacked model: one step trains all.
    Expert i takes ``ph.ends[i]`` steps: when the shortest ones are done, the others go on as
    stacks of consecutive experts (their state and AdamW moments carried over), so an expert
    trains the same as alone: its batches depend on its task and step only, and so do its dropout
    masks on the fused ResMLP (``vmap`` over other models draws them from torch's generator)."""
    k = len(ph.task_ids)
    base = members[0]
    for m in members:
        m.train()
    params, buffers = stack_module_state(members)
    params = {n: p.detach().clone() for n, p in params.items()}
    buffers = {n: t.detach().clone() for n, t in buffers.items()}
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    skeleton = copy.deepcopy(base).to("meta").train()  # whatever mode the base was left in
    fused = bool(ph.steps) and ph.paths.fused_model(base) and fused_path_available(base, ph.batch(0, 0, 1)[0][0])
    losses, step = [float("nan")] * k, None
    done, active = 0, [i for i in range(k) if ph.ends[i] > 0]
    while active:
        end = min(ph.ends[i] for i in active)
        runs = [_StackRun(ph, skeleton, a, b, params, buffers, moments, done, fused) for a, b in _runs(active)]
        step = step or runs[0].step
        lo, hi = active[0], active[-1] + 1
        for s in range(done, end):
            xb, yb = ph.batch(s, lo, hi)
            hb = ph.base_features(xb, s, lo, hi) if ph.feature_stability else None
            for r in runs:
                r(xb, yb, hb, s, lo)
            if ph.progress is not None:
                ph.progress.update(1)
        for r in runs:
            r.write_back(params, buffers, moments)
            losses[r.a:r.b] = [float(r.loss) / r.kk] * r.kk
        done, active = end, [i for i in active if ph.ends[i] > end]
    with torch.no_grad():
        for i, m in enumerate(members):
            m.load_state_dict({**{n: p[i] for n, p in params.items()}, **{n: b[i] for n, b in buffers.items()}})
    return members, losses, step


def _train_each(members: list, ph: _Phase, mode: str):
    """One model per expert: one after another ("sequential") or each on its own CUDA stream;
    expert i takes ``ph.ends[i]`` steps."""
    cfg, k, bsz = ph.cfg, len(ph.task_ids), ph.cfg.batch_size
    device = ph.off.device
    for m in members:
        m.train()
        if isinstance(m, ResMLP):
            m.fused = ph.paths.fused_model(m)
    opts = [ph.paths.adamw(m.parameters(), cfg.lr, cfg.weight_decay) for m in members]
    x0 = ph.batch(0)[0] if ph.steps else None
    steps = [ph.paths.build_step(m, o, ph.loss, x0[i], base_flat=ph.base_flat,
                                 params_flat=lambda m=m: flat_params(m)[None])
             for i, (m, o) in enumerate(zip(members, opts))] if ph.steps else []
    streams = [torch.cuda.Stream(device=device) for _ in range(k)] if mode == "streams" else None
    last = [torch.full((), float("nan"))] * k
    for s in range(ph.steps):
        live = [i for i in range(k) if s < ph.ends[i]]
        lo, hi = live[0], live[-1] + 1
        xb, yb = ph.batch(s, lo, hi)
        hb = ph.base_features(xb, s, lo, hi) if ph.feature_stability else None
        seeds = ph.seeds(s)

        def one(i):
            b = {"labels": yb[i - lo], "ce_offset": ph.off[i].expand(bsz), "ce_len": ph.ln[i].expand(bsz)}
            if hb is not None:
                b["base_features"] = hb[i - lo:i - lo + 1]
            last[i] = steps[i](xb[i - lo], b, seeds, ph.task_ids[i])

        if streams is None:
            for i in live:
                one(i)
        else:
            cur = torch.cuda.current_stream(device)
            for i in live:
                streams[i].wait_stream(cur)
                with torch.cuda.stream(streams[i]):
                    one(i)
            for i in live:
                cur.wait_stream(streams[i])
        if ph.progress is not None:
            ph.progress.update(1)
    return members, [float(v) for v in last], (steps[0] if steps else None)


@torch.no_grad()
def _make_buffer(expert: nn.Module, stream, t: int, cfg, logit_offset: int) -> Buffer:
    """A random subset of task t (:func:`bmc_fast.train.memory.buffer_count` of its samples) with the
    expert's features and, when ``store_logits`` or ``kd_coef > 0``, its logits over the task's range
    (which starts at row ``logit_offset`` of the expert's head)."""
    task = stream[t]
    n = task.x_train.shape[0]
    keep = buffer_count(n, cfg.buffer_size, cfg.batch_size, cfg.public_buffer_count)
    idx = torch.randperm(n, generator=seeding.generator(cfg.seed, "buffer", t))[:keep].sort().values
    o, ln = stream.task_range(t)
    x = task.x_train[idx]  # kept in the stream's dtype (float16 features stay float16)
    device = torch.device(cfg.device)
    expert.eval()
    feats, logits = [], []
    for chunk in torch.split(x, inference_rows(device)):
        lg, h = expert(chunk.to(device).float())
        feats.append(h.float().cpu())
        logits.append(lg[:, logit_offset:logit_offset + ln].float().cpu())
    dtype = torch.float16 if cfg.buffer_dtype == "float16" else torch.float32
    features = torch.cat(feats) if feats else torch.zeros(0, 0)
    return Buffer(x=x, y=task.y_train[idx] + o, offset=o, length=ln, features=features.to(dtype),
                  logits=torch.cat(logits).to(dtype) if (cfg.store_logits or cfg.kd_coef > 0) and logits else None,
                  task=t)
