"""The BMC step loop (BMC-SPEC §2, §4): incremental steps of K tasks, each a regularization phase
(parallel experts), buffers, and a consolidation phase (batched distillation on the memory),
with evaluation, checkpoints and events in one place. Where the experts run is an
:class:`ExpertRunner`: this process (:class:`LocalExperts`) or the ranks of a process group
(:class:`bmc_fast.train.distributed.DistributedExperts`)."""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch
from torch import nn

from ..backbone import ResMLP
from . import seeding
from .run import training_run
from .checkpoint import load_checkpoint, save_checkpoint
from .config import BMCConfig
from .consolidation import _progress, consolidate
from .experts import ExpertArtifact, train_experts
from .memory import Memory, keep_quota
from .metrics import Result, evaluate_rows
from .step import FastPaths

__all__ = ["BMC", "ExpertRunner", "LocalExperts", "incremental_steps", "consolidates_after"]


def consolidates_after(task: int, n_tasks: int, k: int, schedule: str = "groups") -> bool:
    """Whether an incremental step ends with a consolidation after ``task`` (0-based).

    ``"groups"``: after every k-th task and after the last one. ``"public"``: the trigger of the
    public BMC code: ``task % k == 0`` or ``task == n_tasks``; the second never holds (the last
    index is ``n_tasks - 1``), so the tasks after the last multiple of ``k`` are never consolidated."""
    if schedule == "groups":
        return (task + 1) % k == 0 or task == n_tasks - 1
    if schedule == "public":
        return task % k == 0 or task == n_tasks
    raise ValueError(f"schedule must be 'groups' or 'public', got {schedule!r}")


def incremental_steps(n_tasks: int, k: int, schedule: str = "groups") -> list[list[int]]:
    """The tasks of each incremental step, its experts trained together, each step ending where
    :func:`consolidates_after` says. ``"groups"``: consecutive groups of ``k``. ``"public"``: {0},
    {1..k}, {k+1..2k}, ..., and the tasks after the last multiple of ``k`` as a last step that is
    never consolidated (its experts train, its rows are those of the last consolidated model)."""
    steps, cur = [], []
    for t in range(n_tasks):
        cur.append(t)
        if consolidates_after(t, n_tasks, k, schedule):
            steps.append(cur)
            cur = []
    return steps + ([cur] if cur else [])


class ExpertRunner:
    """Where the experts of a step train. The loop calls :meth:`start` once, then per step
    :meth:`train` and :meth:`end_step`; only the main runner consolidates, evaluates and writes
    checkpoints."""

    is_main = True
    timings: dict = {}  # seconds of the runner's own phases, added to the Result's timings

    def start(self, cfg, fingerprint: str | None, start_step: int) -> int:
        """Checks the run can start; returns the first step (the main runner's choice)."""
        return start_step

    def train(self, model: nn.Module, stream, task_ids: list[int], step_index: int, cfg, use_stability: bool,
              progress=None) -> list[ExpertArtifact]:
        """The artifacts of the step's experts (on the main runner; others may return [])."""
        raise NotImplementedError

    def end_step(self, step_index: int) -> None:
        pass


class LocalExperts(ExpertRunner):
    """The experts of a step in this process (stacked, sequential or CUDA streams)."""

    def train(self, model, stream, task_ids, step_index, cfg, use_stability, progress=None):
        return train_experts(model, stream, task_ids, cfg, step_index, use_stability=use_stability, progress=progress)


def _fingerprint(stream) -> str:
    h = hashlib.sha256()
    for t in stream:
        h.update(f"{t.name}|{t.num_classes}|{tuple(t.x_train.shape)}|{tuple(t.x_test.shape)}".encode())
        h.update(t.y_train.numpy().tobytes())
    return h.hexdigest()[:16]


class BMC:
    """Batch Model Consolidation on a :class:`bmc_fast.data.TaskStream`.

    ``model_fn(input_dim, num_classes) -> nn.Module`` builds the base model (a module returning
    ``(logits, features)``); the default is :class:`bmc_fast.backbone.ResMLP`.
    """

    def __init__(self, config: BMCConfig | None = None, model_fn=None):
        self.config = config or BMCConfig()
        if not isinstance(self.config, BMCConfig):
            raise TypeError(f"config must be a BMCConfig, got {type(self.config).__name__}")
        self.config.validate()
        self.model_fn = model_fn or (lambda d, c: ResMLP(d, c, dropout=self.config.dropout,
                                                          fused=FastPaths.of(self.config).fused_backbone,
                                                          inner=self.config.backbone_inner))
        self.model: nn.Module | None = None
        self.memory = Memory()
        self._next_step = self._next_task = 0  # fit_step's place in its stream

    def _log(self, events, record):
        if events is not None:
            events({"time": time.time(), **record})

    def fit(self, stream, on_task_end=None, checkpoint_dir=None, resume: bool = False, events=None,
            experts: ExpertRunner | None = None) -> Result | None:
        """Learns the stream in incremental steps of ``n_experts`` tasks (as ``schedule`` groups
        them: :func:`incremental_steps`); returns the accuracy matrices. With
        ``checkpoint_dir`` a checkpoint is written atomically after every step;
        ``resume=True`` continues from the last one and gives the same result as an
        uninterrupted run with the same seed. ``events`` receives dict records (phase timings,
        losses, accuracies, how each phase's steps ran) as they happen. ``experts`` runs the
        experts (default: this process); a runner that is not the main one returns None.
        The caller's global random state is left as it was."""
        from ..data import TaskStream

        if not isinstance(stream, TaskStream):
            raise TypeError(f"stream must be a bmc_fast.data.TaskStream, got {type(stream).__name__}")
        cfg = self.config
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("BMCConfig.device is 'cuda' but no CUDA device is available")
        runner = experts or LocalExperts()
        t0 = time.perf_counter()
        with training_run(cfg):
            result = self._fit(stream, runner, on_task_end, checkpoint_dir, resume, events)
        if result is not None:
            result.timings["total_s"] = time.perf_counter() - t0  # this call's wall time
        return result

    def _fit(self, stream, runner, on_task_end, checkpoint_dir, resume, events):
        cfg = self.config
        device = torch.device(cfg.device)
        steps = incremental_steps(len(stream), cfg.n_experts, cfg.schedule)
        consolidated = [consolidates_after(ids[-1], len(stream), cfg.n_experts, cfg.schedule) for ids in steps]

        def before_consolidation(s):  # the tasks of step s whose rows the model before its consolidation gives
            return [] if s >= len(steps) else steps[s][:-1] if consolidated[s] else steps[s]
        self.model = self.model_fn(stream.input_dim, stream.num_classes).to(device)
        with torch.no_grad():  # in eval mode: the probe leaves BatchNorm's running statistics alone
            was = self.model.training
            out = self.model.eval()(stream[0].x_train[:2].float().to(device))
            self.model.train(was)
        if not (isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, stream.num_classes)):
            raise ValueError("the model must return (logits [N, num_classes], features [N, D])")
        self.memory, self._next_step, self._next_task = Memory(), 0, 0
        result = Result.empty([t.name for t in stream], step_starts=[s[0] for s in steps], config=cfg.to_dict())
        timings = {"experts_s": 0.0, "buffers_s": 0.0, "consolidation_s": 0.0, "evaluation_s": 0.0}
        ckpt = os.path.join(checkpoint_dir, "bmc-checkpoint.pt") if checkpoint_dir else None
        fingerprint = _fingerprint(stream) if ckpt or not isinstance(runner, LocalExperts) else None  # hashes every label
        start = 0
        if runner.is_main and resume and ckpt and os.path.exists(ckpt):
            start = self._load_checkpoint(ckpt, fingerprint, result, timings)
            self._log(events, {"event": "resumed", "from_step": start})
        start = runner.start(cfg, fingerprint, start)
        if runner.is_main and start == 0 and before_consolidation(0):
            self._evaluate(stream, before_consolidation(0), result, timings, events)  # the untrained base

        for s in range(start, len(steps)):
            ids = steps[s]
            self._log(events, {"event": "step_start", "step": s, "tasks": ids})
            t0 = time.perf_counter()
            bar = _progress(cfg, None, f"experts (tasks {ids[0]}-{ids[-1]})") if runner.is_main else None
            arts = runner.train(self.model, stream, ids, s, cfg, s > 0 or cfg.stability_first_step, bar)
            if bar is not None:
                bar.close()
            timings["experts_s"] += time.perf_counter() - t0
            if runner.is_main:
                self._log(events, {"event": "experts_done", "step": s, "seconds": time.perf_counter() - t0,
                                   "losses": [a.final_loss for a in arts], "kind": arts[0].step})
                for t in before_consolidation(s):  # the base has not changed yet: these rows were evaluated with it
                    self._task_end(t, result, on_task_end, events)
            if runner.is_main and not consolidated[s]:
                self._log(events, {"event": "consolidation_skipped", "step": s, "tasks": ids,
                                   "reason": "schedule 'public' never consolidates the tasks after the last "
                                             "multiple of n_experts"})
            elif runner.is_main:
                self._consolidate(stream, s, [a.buffer for a in arts], timings, events)
                # One evaluation of the consolidated model: its row, and the rows of the next
                # step's tasks learned before the next consolidation (the model is the same).
                self._evaluate(stream, [ids[-1]] + before_consolidation(s + 1), result, timings, events)
                self._task_end(ids[-1], result, on_task_end, events)
            if runner.is_main and ckpt:
                self._save_checkpoint(ckpt, s, fingerprint, result, timings)
            runner.end_step(s)
        result.timings = {**timings, **runner.timings}
        return result if runner.is_main else None

    def fit_step(self, stream, task_ids: list[int], num_classes: int | None = None) -> dict:
        """One incremental step, for loops that hand the trainer its tasks as they come (such as
        :class:`bmc_fast.integrations.avalanche.BMCStrategy`): the experts of ``task_ids`` (the
        next consecutive tasks of ``stream``) trained from the current model, then a
        consolidation on their buffers and the memory kept so far. Where ``self.model`` is None
        (a new trainer, or after :meth:`reset`) the first call builds it, ``model_fn(stream.input_dim,
        num_classes or stream.num_classes)``; ``num_classes`` is the model's head width, which may
        exceed the classes met so far. Steps are
        counted from there, so the groups of ``incremental_steps(len(stream), n_experts)`` given in
        order train the model and memory :meth:`fit` trains, bit for bit. Returns the step's
        timings (seconds of experts, buffers and consolidation)."""
        from ..data import TaskStream

        if not isinstance(stream, TaskStream):
            raise TypeError(f"stream must be a bmc_fast.data.TaskStream, got {type(stream).__name__}")
        ids = [int(t) for t in task_ids]
        if not ids or ids != list(range(self._next_task, self._next_task + len(ids))) or ids[-1] >= len(stream):
            raise ValueError(f"task_ids must be the next consecutive tasks of the stream, from task "
                             f"{self._next_task}, got {list(task_ids)}")
        cfg = self.config
        timings = {"experts_s": 0.0, "buffers_s": 0.0, "consolidation_s": 0.0}
        with training_run(cfg):
            if self.model is None:
                width = num_classes or stream.num_classes
                self.model = self.model_fn(stream.input_dim, width).to(torch.device(cfg.device))
                self.memory = Memory()
            s = self._next_step
            t0 = time.perf_counter()
            arts = LocalExperts().train(self.model, stream, ids, s, cfg, s > 0 or cfg.stability_first_step)
            timings["experts_s"] = time.perf_counter() - t0
            self._consolidate(stream, s, [a.buffer for a in arts], timings, None, num_classes)
        self._next_step, self._next_task = s + 1, ids[-1] + 1
        return timings

    def reset(self) -> None:
        """Forgets the model and memory: the next :meth:`fit_step` starts a new run."""
        self.model, self.memory, self._next_step, self._next_task = None, Memory(), 0, 0

    def _consolidate(self, stream, s, new, timings, events, num_classes: int | None = None):
        """Step ``s``'s consolidation on the new buffers and the memory (``memory_policy``), the
        model's head ``num_classes`` wide (default: the stream's classes)."""
        cfg = self.config
        t0 = time.perf_counter()
        gen = seeding.generator(cfg.seed, "memory", s)
        if cfg.memory_policy == "cap":  # every buffer resampled to its quota of memory_size first
            self.memory.add(new, cfg.memory_size, gen)
            train_set = self.memory
        else:  # "keep": the new buffers in full with the memory kept after the last step
            train_set = self.memory.with_buffers(new)
        timings["buffers_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        info = consolidate(self.model, train_set, cfg, num_classes or stream.num_classes, s,
                           log=(lambda r: self._log(events, r)) if events else None)
        seconds = time.perf_counter() - t0
        timings["consolidation_s"] += seconds
        trained_on = len(train_set)
        if cfg.memory_policy == "keep":  # then every buffer cut to ceil(memory_size / J) + 1
            t0 = time.perf_counter()
            train_set.cut(keep_quota(train_set.num_buffers, cfg.memory_size), gen)
            self.memory = train_set
            timings["buffers_s"] += time.perf_counter() - t0
        self._log(events, {"event": "consolidation_done", "step": s, "seconds": seconds,
                           "consolidation_set": trained_on, "memory": len(self.memory), **info})

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

    def _evaluate(self, stream, rows, result, timings, events):
        """The rows ``rows`` of the accuracy matrices, from one evaluation of the current model."""
        t0 = time.perf_counter()
        for t, (cil, til) in evaluate_rows(self.model, stream, rows, self.config.device, self.config.full_head).items():
            result.cil_matrix[t, : t + 1] = cil
            result.til_matrix[t, : t + 1] = til
        timings["evaluation_s"] += time.perf_counter() - t0

    def _task_end(self, t, result, on_task_end, events):
        cil = [float(v) for v in result.cil_matrix[t, : t + 1]]
        til = [float(v) for v in result.til_matrix[t, : t + 1]]
        self._log(events, {"event": "task_end", "task": t, "cil": cil, "til": til, "average_cil": float(np.mean(cil))})
        if on_task_end is not None:
            on_task_end(t, self.model)


def _config_key(d: dict) -> dict:
    """The configuration that determines results (progress bars do not: resuming may change them)."""
    return {k: v for k, v in d.items() if k != "progress"}
