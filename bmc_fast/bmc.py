"""The BMC trainer (BMC-SPEC §2, §4): incremental steps of K tasks, each a regularization phase
(parallel experts), buffers, and a consolidation phase (batched distillation on the memory).
Never imports the compiled extension directly: the losses come through ``bmc_fast`` (fused) or
``bmc_fast.reference`` (``losses="reference"``, the baseline of the end-to-end benchmark)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .experts import _gen, _losses, adamw, backbone_mode, resolve_parallel, scaled, train_experts, train_forward
from .memory import Memory
from .metrics import Result, evaluate
from .models import ResMLP, fused_args
from .train_step import fused_train_step

__all__ = ["BMCConfig", "BMC", "consolidate"]


@dataclass
class BMCConfig:
    """Every option of the trainer. ``BMCConfig.preset("paper" | "parity", **overrides)``."""

    n_experts: int = 4
    parallel: str = "auto"            # "auto" | "stacked" | "streams" | "sequential"
    stability: str = "feature"        # "feature" | "weight"
    stability_coef: float = 1.0
    stability_first_step: bool = False  # the first base model is untrained: nothing to keep
    task_coef: float = 1.0
    distill_coef: float = 1.0
    kd_coef: float = 0.0              # > 0 stores the experts' logits in the buffers
    kd_temperature: float = 2.0
    epochs: int = 20                  # expert epochs per task
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.01
    buffer_size: float = 10000        # samples per task (int) or a fraction of the task (< 1)
    buffer_dtype: str = "float32"     # "float32" | "float16" for stored features / logits
    store_logits: bool = False
    memory_size: int = 10000
    consolidation_epochs: int = 100
    consolidation_lr: float = 0.01
    consolidation_batch_size: int = 64
    mixup_alpha: float = 0.0
    val_fraction: float = 0.0         # validation split carved from the memory (never test data)
    lr_patience: int = 5              # ReduceLROnPlateau patience (epochs) when val_fraction > 0
    early_stopping: int = 0           # stop after this many epochs without improvement (0: never)
    consolidation_ce: str = "seen"    # "seen": CE over all classes seen so far; "task": over each sample's task range
    full_head: bool = False           # class-IL argmax over the whole head (as the authors' code)
    keep_expert_states: bool = False
    dropout: float = 0.3              # of the default ResMLP backbone
    losses: str = "fused"             # "fused" | "reference"
    fused_backbone: bool = True       # the default ResMLP trains through the fused CPU kernels
    fused_optimizer: bool = True      # bmc_fast.optim.AdamW (CPU) / torch's fused (CUDA); False: default loop
    fused_step: bool = True           # with all three fused: a whole CPU training step in one C++ call
    base_feature_table_mb: float = 256  # base features of all samples precomputed up to this size (0: per step)
    device: str = "cpu"
    seed: int = 0
    progress: bool | None = None      # None: only on a terminal
    preset_name: str = "paper"

    def __post_init__(self):
        self.validate()

    def validate(self):
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"BMCConfig.{name} must be an int >= {minimum}, got {v!r}")
        for name in ("n_experts", "epochs", "batch_size", "memory_size", "consolidation_batch_size"):
            pos_int(name)
        for name in ("consolidation_epochs", "lr_patience", "early_stopping"):
            pos_int(name, 0)
        for name in ("stability_coef", "task_coef", "distill_coef", "kd_coef", "lr", "weight_decay",
                     "consolidation_lr", "mixup_alpha", "dropout", "base_feature_table_mb"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"BMCConfig.{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.kd_temperature, (int, float)) and self.kd_temperature > 0):
            raise ValueError(f"BMCConfig.kd_temperature must be > 0, got {self.kd_temperature!r}")
        if not (0 <= self.val_fraction < 1):
            raise ValueError(f"BMCConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not (isinstance(self.buffer_size, (int, float)) and self.buffer_size > 0):
            raise ValueError(f"BMCConfig.buffer_size must be > 0 (a count, or a fraction < 1), got {self.buffer_size!r}")
        if self.stability not in ("feature", "weight"):
            raise ValueError(f"BMCConfig.stability must be 'feature' or 'weight', got {self.stability!r}")
        if self.buffer_dtype not in ("float32", "float16"):
            raise ValueError(f"BMCConfig.buffer_dtype must be 'float32' or 'float16', got {self.buffer_dtype!r}")
        if self.consolidation_ce not in ("seen", "task"):
            raise ValueError(f"BMCConfig.consolidation_ce must be 'seen' or 'task', got {self.consolidation_ce!r}")
        for name in ("fused_backbone", "fused_optimizer", "fused_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BMCConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.losses not in ("fused", "reference"):
            raise ValueError(f"BMCConfig.losses must be 'fused' or 'reference', got {self.losses!r}")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"BMCConfig.device: {exc}") from exc
        resolve_parallel(self.parallel, self.device)

    @classmethod
    def preset(cls, name: str, **overrides) -> "BMCConfig":
        """``"paper"``: the method as described (both BMC terms live, parallel experts).
        ``"parity"``: what the authors' public code ran: no stability or distillation term, one
        expert at a time, replay with mixup (alpha 0.4), a 20% validation split with
        ReduceLROnPlateau, class-IL over the full head."""
        if name == "paper":
            base = {}
        elif name == "parity":
            base = dict(n_experts=1, stability_coef=0.0, distill_coef=0.0, kd_coef=0.0, mixup_alpha=0.4,
                        val_fraction=0.2, full_head=True, parallel="sequential")
        else:
            raise ValueError(f"preset must be 'paper' or 'parity', got {name!r}")
        return cls(**{**base, **overrides, "preset_name": name})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    fstep = None  # the whole step in one call, where it applies (bmc_fast.train_step)

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


def _fingerprint(stream) -> str:
    h = hashlib.sha256()
    for t in stream:
        h.update(f"{t.name}|{t.num_classes}|{tuple(t.x_train.shape)}|{tuple(t.x_test.shape)}".encode())
        h.update(t.y_train.numpy().tobytes())
    return h.hexdigest()[:16]


class BMC:
    """Batch Model Consolidation on a :class:`bmc_fast.data.TaskStream`.

    ``model_fn(input_dim, num_classes) -> nn.Module`` builds the base model (a module returning
    ``(logits, features)``); the default is :class:`bmc_fast.models.ResMLP`.
    """

    def __init__(self, config: BMCConfig | None = None, model_fn=None):
        self.config = config or BMCConfig()
        if not isinstance(self.config, BMCConfig):
            raise TypeError(f"config must be a BMCConfig, got {type(self.config).__name__}")
        self.config.validate()
        self.model_fn = model_fn or (lambda d, c: ResMLP(d, c, dropout=self.config.dropout,
                                                          fused=self.config.fused_backbone))
        self.model: nn.Module | None = None
        self.memory = Memory()

    def _log(self, events, record):
        if events is not None:
            events({"time": time.time(), **record})

    def fit(self, stream, on_task_end=None, checkpoint_dir=None, resume: bool = False, events=None) -> Result:
        """Learns the stream in incremental steps of ``n_experts`` tasks; returns the accuracy
        matrices. With ``checkpoint_dir`` a checkpoint is written atomically after every step;
        ``resume=True`` continues from the last one and gives the same result as an
        uninterrupted run with the same seed. ``events`` receives dict records (phase timings,
        losses, accuracies) as they happen."""
        from .data import TaskStream

        if not isinstance(stream, TaskStream):
            raise TypeError(f"stream must be a bmc_fast.data.TaskStream, got {type(stream).__name__}")
        cfg = self.config
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("BMCConfig.device is 'cuda' but no CUDA device is available")
        k = cfg.n_experts
        steps = [list(range(s, min(s + k, len(stream)))) for s in range(0, len(stream), k)]
        torch.manual_seed(cfg.seed)
        self.model = self.model_fn(stream.input_dim, stream.num_classes).to(device)
        out = self.model(stream[0].x_train[:2].float().to(device))
        if not (isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, stream.num_classes)):
            raise ValueError("the model must return (logits [N, num_classes], features [N, D])")
        self.memory = Memory()
        result = Result.empty([t.name for t in stream], step_starts=[s[0] for s in steps], config=cfg.to_dict())
        timings = {"experts_s": 0.0, "buffers_s": 0.0, "consolidation_s": 0.0, "evaluation_s": 0.0}
        start_step = 0
        ckpt = os.path.join(checkpoint_dir, "bmc-checkpoint.pt") if checkpoint_dir else None
        fingerprint = _fingerprint(stream) if ckpt else None  # hashes every label: once per fit
        if resume and ckpt and os.path.exists(ckpt):
            start_step = self._load_checkpoint(ckpt, fingerprint, result, timings)
            self._log(events, {"event": "resumed", "from_step": start_step})

        for s in range(start_step, len(steps)):
            ids = steps[s]
            seed = hash((cfg.seed, s)) % (2**62)
            self._log(events, {"event": "step_start", "step": s, "tasks": ids})
            t0 = time.perf_counter()
            bar = _progress(cfg, None, f"experts (tasks {ids[0]}-{ids[-1]})")
            arts = train_experts(self.model, stream, ids, cfg, seed, use_stability=(s > 0 or cfg.stability_first_step),
                                 progress=bar)
            if bar is not None:
                bar.close()
            timings["experts_s"] += time.perf_counter() - t0
            self._log(events, {"event": "experts_done", "step": s, "seconds": time.perf_counter() - t0,
                               "losses": [a.final_loss for a in arts]})
            self.last_artifacts = arts
            for t in ids[:-1]:  # the base has not changed yet: these tasks show as not learned
                self._evaluate(stream, t, result, timings, on_task_end, events)
            t0 = time.perf_counter()
            self.memory.add([a.buffer for a in arts], cfg.memory_size, _gen(seed, 5))
            timings["buffers_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            info = consolidate(self.model, self.memory, cfg, stream.num_classes, seed,
                               log=(lambda r: self._log(events, r)) if events else None)
            timings["consolidation_s"] += time.perf_counter() - t0
            self._log(events, {"event": "consolidation_done", "step": s, "seconds": time.perf_counter() - t0,
                               "memory": len(self.memory), **info})
            self._evaluate(stream, ids[-1], result, timings, on_task_end, events)
            if ckpt:
                self._save_checkpoint(ckpt, s, fingerprint, result, timings)
        result.timings = timings
        return result

    def _save_checkpoint(self, path, step, fingerprint, result, timings):
        """Everything needed to continue after ``step``, written atomically (weights_only-loadable)."""
        save_checkpoint({
            "step": step, "model": {n: v.detach().cpu() for n, v in self.model.state_dict().items()},
            "memory": self.memory.state_dict(), "cil": torch.from_numpy(result.cil_matrix),
            "til": torch.from_numpy(result.til_matrix), "timings": json.dumps(timings),
            "rng_torch": torch.get_rng_state(), "config": json.dumps(self.config.to_dict()),
            "fingerprint": fingerprint}, path)

    def _load_checkpoint(self, path, fingerprint, result, timings) -> int:
        """Restores model, memory, matrices and timings; returns the first step still to run."""
        state = load_checkpoint(path)
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {path} was made on a different task stream")
        if _config_key(json.loads(state["config"])) != _config_key(self.config.to_dict()):
            raise ValueError(f"checkpoint {path} was made with a different BMCConfig")
        self.model.load_state_dict(state["model"])
        self.memory = Memory.from_state_dict(state["memory"])
        result.cil_matrix, result.til_matrix = state["cil"].numpy().copy(), state["til"].numpy().copy()
        timings.update({k: float(v) for k, v in json.loads(state["timings"]).items() if k in timings})
        torch.set_rng_state(state["rng_torch"])
        return int(state["step"]) + 1

    def _evaluate(self, stream, t, result, timings, on_task_end, events):
        t0 = time.perf_counter()
        cil, til = evaluate(self.model, stream, t, self.config.device, self.config.full_head)
        result.cil_matrix[t, : t + 1] = cil
        result.til_matrix[t, : t + 1] = til
        timings["evaluation_s"] += time.perf_counter() - t0
        self._log(events, {"event": "task_end", "task": t, "cil": cil, "til": til,
                           "average_cil": float(np.mean(cil))})
        if on_task_end is not None:
            on_task_end(t, self.model)


def _config_key(d: dict) -> dict:
    """The configuration that determines results (progress bars do not: resuming may change them)."""
    return {k: v for k, v in d.items() if k != "progress"}
