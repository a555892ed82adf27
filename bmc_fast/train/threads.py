"""How many threads the training steps use, chosen while they run.

The trainer's steps are small (64-row matrix products, a few hundred kilobytes of parameters):
every kernel splits its work evenly over torch's threads and waits for the slowest. On a machine
where other processes compete for the cores, one of those threads is often descheduled, and the
whole step waits for it: beside one busy process, two threads on two cores took 3.4x their idle
time while one thread took 1.6x. :class:`ThreadTuner` times the steps with torch's thread count
and with one thread, in short trials, keeps the faster for a while, then tries again; it restores
the caller's thread count when the phase ends. The fused kernels give the same bits on any thread
count, so the choice changes the speed, not the results (tested on the default model).
"""
from __future__ import annotations

import contextvars
import statistics
import time

import torch

__all__ = ["ThreadTuner", "tick"]

_current: contextvars.ContextVar = contextvars.ContextVar("bmc_fast_thread_tuner", default=None)


def tick() -> None:
    """Tells the active :class:`ThreadTuner` (if any) that a training step ended."""
    tuner = _current.get()
    if tuner is not None:
        tuner.tick()


class ThreadTuner:
    """A context around a training run; the steps of :func:`bmc_fast.train.step.build_step` call
    :func:`tick` when they end.

    ``threads``: ``"auto"`` (choose between torch's thread count and 1), an int (use that many
    for the phase) or ``None`` (leave torch's setting alone). ``trial_steps`` steps are timed per
    candidate (after one warm-up step), then the faster runs for ``hold_s`` seconds."""

    def __init__(self, threads="auto", trial_steps: int = 6, hold_s: float = 2.0):
        self.threads, self.trial_steps, self.hold_s = threads, trial_steps, hold_s
        self.choice: int | None = None
        self._saved = None

    def __enter__(self):
        self._token = _current.set(self)
        self._saved = torch.get_num_threads()
        if isinstance(self.threads, int) and not isinstance(self.threads, bool):
            torch.set_num_threads(self.threads)
        self._auto = self.threads == "auto" and self._saved > 1
        if self._auto:
            self._candidates = [self._saved, 1]
            self._start_trials()
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        if torch.get_num_threads() != self._saved:
            torch.set_num_threads(self._saved)
        return False

    def _start_trials(self):
        self._trial, self._times, self._skip = 0, {c: [] for c in self._candidates}, True
        self._set(self._candidates[0])
        self._last = time.perf_counter()

    def _set(self, n: int):
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def tick(self) -> None:
        if not self._auto:
            return
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if self._trial is None:  # holding the choice
            if now >= self._until:
                self._start_trials()
            return
        if self._skip:  # the first step after a switch pays for the switch
            self._skip = False
            return
        cand = self._candidates[self._trial]
        self._times[cand].append(elapsed)
        if len(self._times[cand]) < self.trial_steps:
            return
        self._trial += 1
        if self._trial < len(self._candidates):
            self._set(self._candidates[self._trial])
            self._skip = True
            return
        self.choice = min(self._candidates, key=lambda c: statistics.median(self._times[c]))
        self._set(self.choice)
        self._trial, self._until = None, now + self.hold_s
        self._last = time.perf_counter()
