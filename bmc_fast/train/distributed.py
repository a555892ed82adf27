"""Distributed BMC with ``torch.distributed`` (launched by ``torchrun``; gloo on CPU, nccl on GPU).

:func:`fit_distributed` is :meth:`bmc_fast.BMC.fit` with :class:`DistributedExperts` as its expert
runner. Rank 0 owns the base model, the memory and consolidation. Every incremental step, rank 0
broadcasts the base state, the K tasks of the step are dealt to the ranks in consecutive blocks
(several experts per rank stacked on that rank), each rank trains its experts and builds their
buffers from its own copy of the stream (task data never goes through rank 0), the artifacts are
gathered to rank 0, which consolidates and evaluates. An expert's randomness is keyed by its task
(:mod:`bmc_fast.train.seeding`), so any number of ranks trains the same experts as one process. Every collective runs under a timeout and a
failure names the phase, so a dead or hung rank ends the job with an error instead of a hang;
with checkpoints on, rerunning the same command resumes from the last completed step.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from .experts import train_experts
from .loop import BMC, ExpertRunner, _config_key
from .metrics import Result

__all__ = ["fit_distributed", "DistributedExperts", "init_from_env", "shutdown", "finish", "load_on_every_rank", "exit_after_failure"]


class DistributedError(RuntimeError):
    pass


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); returns (rank, world size)."""
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise DistributedError(f"distributed BMC needs torchrun (or the variables {missing}) to be set")
        try:
            dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                                    timeout=datetime.timedelta(seconds=timeout_s))
            # A process group still alive at interpreter finalisation can abort the process
            # (gloo's worker threads hold tensors whose release needs the GIL: SIGABRT, "terminate
            # called without an active exception"). atexit runs while the interpreter is still
            # whole; a no-op when shutdown() was already called.
            atexit.register(shutdown)
        except Exception as exc:
            raise DistributedError(f"distributed BMC: phase 'rendezvous' failed on rank {os.environ['RANK']}: not "
                                   f"every rank joined within {timeout_s:.0f} s ({exc})") from exc
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Destroys the process group (call it before exiting, also after an error)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer may already be gone
            pass


def finish(code: int = 0) -> None:
    """Ends a distributed process: destroys the process group, runs the ``atexit`` handlers,
    flushes stdout/stderr and exits with ``code`` without the interpreter's teardown. Call it
    last, with your files closed (objects still open are not flushed by their finalisers).

    Why: a gloo process can still abort in the interpreter's teardown after a successful run and
    an explicit ``shutdown()`` ("terminate called without an active exception", exit -6; rare,
    not reproducible on demand), and torchrun would then report a rank that finished its work as
    failed. Destroying the groups in an atexit handler alone does not prevent it."""
    shutdown()
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_after_failure(code: int) -> None:
    """Leaves the process with ``code`` after a :class:`DistributedError` (:func:`finish`): a
    gloo process group whose peer died can still own threads, and destroying them at normal exit
    aborts the process ("terminate called without an active exception", exit -6) after the error
    was reported."""
    finish(code)


def _collective(phase: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # gloo raises RuntimeError on a dead peer or a timeout
        raise DistributedError(f"distributed BMC: phase '{phase}' failed on rank {dist.get_rank()}: a peer "
                               f"rank died, hung past the timeout, or disagrees ({exc})") from exc


def load_on_every_rank(load):
    """Runs ``load()`` (e.g. reading the task stream) on every rank and fails on all of them,
    naming the ranks and their errors, if it failed on any: missing data on one rank is reported
    before training instead of surfacing as a timeout."""
    try:
        value, status = load(), None
    except Exception as exc:
        value, status = None, f"{type(exc).__name__}: {exc}"
    everyone = [None] * dist.get_world_size()
    _collective("load data", dist.all_gather_object, everyone, status)
    bad = {r: e for r, e in enumerate(everyone) if e is not None}
    if bad:
        raise DistributedError("distributed BMC: loading the data failed on " +
                               "; ".join(f"rank {r} ({e})" for r, e in bad.items()))
    return value


def _check_agreement(fingerprint, cfg, rank, world):
    mine = {"fingerprint": fingerprint, "config": json.dumps(_config_key(cfg.to_dict()), sort_keys=True)}
    everyone = [None] * world
    _collective("startup check", dist.all_gather_object, everyone, mine)
    for r, other in enumerate(everyone):
        if other["fingerprint"] != mine["fingerprint"]:
            raise DistributedError(f"rank {r} has a different task stream than rank {rank}: every rank must "
                                   "read the same stream definition")
        if other["config"] != mine["config"]:
            raise DistributedError(f"rank {r} has a different BMCConfig than rank {rank}")
    if world > cfg.n_experts:
        raise DistributedError(f"world size {world} is larger than the {cfg.n_experts} tasks of a step "
                               "(n_experts): some ranks would have nothing to train")


def rank_tasks(task_ids: list[int], rank: int, world: int) -> list[int]:
    """The consecutive block of a step's tasks that ``rank`` trains (the first ranks take one
    more when the tasks do not divide evenly)."""
    share, extra = divmod(len(task_ids), world)
    start = rank * share + min(rank, extra)
    return task_ids[start:start + share + (1 if rank < extra else 0)]


class DistributedExperts(ExpertRunner):
    """The experts of a step spread over the ranks of the default process group."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.timings = {"gather_s": 0.0}  # part of experts_s: the artifacts' trip to rank 0

    def start(self, cfg, fingerprint, start_step):
        _check_agreement(fingerprint, cfg, self.rank, self.world)
        box = [start_step]
        _collective("resume", dist.broadcast_object_list, box, src=0)
        return box[0]

    def train(self, model, stream, task_ids, step_index, cfg, use_stability, progress=None):
        for t in model.state_dict().values():  # the base, from rank 0
            _collective(f"step {step_index}: broadcast base", dist.broadcast, t, src=0)
        mine = rank_tasks(task_ids, self.rank, self.world)
        arts = train_experts(model, stream, mine, cfg, step_index, use_stability=use_stability,
                             progress=progress) if mine else []
        gathered = [None] * self.world if self.is_main else None
        t0 = time.perf_counter()
        _collective(f"step {step_index}: gather artifacts", dist.gather_object, arts, gathered, dst=0)
        self.timings["gather_s"] += time.perf_counter() - t0
        return sorted((a for part in gathered for a in part), key=lambda a: a.task) if self.is_main else []

    def end_step(self, step_index):
        _collective(f"step {step_index}: end barrier", dist.barrier)


def fit_distributed(bmc: BMC, stream, checkpoint_dir=None, resume: bool = False, events=None,
                    on_task_end=None) -> Result | None:
    """``bmc.fit`` across the ranks of the default process group. Returns the Result on rank 0
    and None on the other ranks. Same seed, same result as the single-process run."""
    return bmc.fit(stream, on_task_end=on_task_end, checkpoint_dir=checkpoint_dir, resume=resume, events=events,
                   experts=DistributedExperts())
