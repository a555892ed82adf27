"""Tasks and task streams (BMC-SPEC §1, §4).

A task has local labels in [0, num_classes); a stream assigns each task the next range of a
single shared head, in order. Never imports the compiled extension.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Task", "TaskStream"]

_REPR_TASKS = 12  # a stream of more tasks prints its first and last ones


def _as_tensor(x, name: str, dtype=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x if dtype is None else x.to(dtype)


@dataclass
class Task:
    """One task: train and test data with local labels in ``[0, num_classes)``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    check_values: bool = True  # False skips the checks that read every value (label range, NaN)

    def __post_init__(self):
        n = self.name
        self.x_train = _as_tensor(self.x_train, f"task {n!r}: x_train")
        self.x_test = _as_tensor(self.x_test, f"task {n!r}: x_test")
        self.y_train = _as_tensor(self.y_train, f"task {n!r}: y_train")
        self.y_test = _as_tensor(self.y_test, f"task {n!r}: y_test")
        if not isinstance(self.num_classes, (int, np.integer)) or isinstance(self.num_classes, bool):
            raise TypeError(f"task {n!r}: num_classes must be an int, got {type(self.num_classes).__name__}")
        self.num_classes = int(self.num_classes)
        if self.num_classes < 2:
            raise ValueError(f"task {n!r}: num_classes must be >= 2 (a task with one class teaches nothing), "
                             f"got {self.num_classes}")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if not x.is_floating_point():
                raise TypeError(f"task {n!r}: x_{split} must be floating, got {x.dtype}")
            if x.dim() < 2:
                raise ValueError(f"task {n!r}: x_{split} must have shape [N, ...], got {list(x.shape)}")
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
                raise ValueError(f"task {n!r}: y_{split} must be an integer tensor [N], got {y.dtype} {list(y.shape)}")
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"task {n!r}: x_{split} has {x.shape[0]} samples but y_{split} has {y.shape[0]}")
            if split == "train" and x.shape[0] == 0:
                raise ValueError(f"task {n!r}: the train split is empty")
            if self.check_values and y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"task {n!r}: y_{split} must be local labels in [0, {self.num_classes}), "
                                 f"got values in [{int(y.min())}, {int(y.max())}]")
            if self.check_values and not bool(torch.isfinite(x).all()):
                raise ValueError(f"task {n!r}: x_{split} has NaN or infinite values")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"task {n!r}: x_train and x_test have different feature shapes "
                             f"{list(self.x_train.shape[1:])} and {list(self.x_test.shape[1:])}")
        if self.y_train.dtype != torch.long:
            self.y_train = self.y_train.long()
        if self.y_test.dtype != torch.long:
            self.y_test = self.y_test.long()

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:  # sizes only: the tensors may be large or memory-mapped
        return (f"Task({self.name!r}, {self.num_classes} classes, input {list(self.input_shape)} "
                f"{str(self.x_train.dtype).replace('torch.', '')}, train {self.x_train.shape[0]}, "
                f"test {self.x_test.shape[0]})")


@dataclass
class TaskStream:
    """An ordered list of tasks sharing one head: task t owns classes [offsets[t], offsets[t] + n_t)."""

    tasks: list
    offsets: list = field(init=False)

    def __post_init__(self):
        self.tasks = list(self.tasks)
        if not self.tasks:
            raise ValueError("TaskStream needs at least one task")
        for i, t in enumerate(self.tasks):
            if not isinstance(t, Task):
                raise TypeError(f"tasks[{i}] must be a bmc_fast.data.Task, got {type(t).__name__}")
        shapes = {t.input_shape for t in self.tasks}
        if len(shapes) != 1:
            raise ValueError(f"all tasks must have the same input shape, got {sorted(map(list, shapes))}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("task names must be unique")
        self.offsets = list(np.cumsum([0] + [t.num_classes for t in self.tasks])[:-1].tolist())

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, i) -> Task:
        return self.tasks[i]

    def __iter__(self):
        return iter(self.tasks)

    @property
    def num_classes(self) -> int:
        return self.offsets[-1] + self.tasks[-1].num_classes

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.tasks[0].input_shape))

    def task_range(self, t: int) -> tuple[int, int]:
        """(offset, length) of task t's classes in the shared head."""
        return self.offsets[t], self.tasks[t].num_classes

    def __repr__(self) -> str:
        """A summary: one line for the stream, one per task (the first and last ones of a long
        stream) with its name, its classes in the shared head and its split sizes."""
        n_train = sum(t.x_train.shape[0] for t in self.tasks)
        n_test = sum(t.x_test.shape[0] for t in self.tasks)
        lines = [f"TaskStream({len(self)} tasks, {self.num_classes} classes, input {list(self.tasks[0].input_shape)}, "
                 f"train {n_train}, test {n_test}"]
        if len(self) <= _REPR_TASKS:
            shown = list(range(len(self)))
        else:
            shown = [*range(_REPR_TASKS - 3), None, len(self) - 2, len(self) - 1]
        rows = {}
        for i in shown:
            if i is not None:
                t, o = self.tasks[i], self.offsets[i]
                rows[i] = (str(i), t.name, f"classes [{o}, {o + t.num_classes})", f"train {t.x_train.shape[0]}",
                           f"test {t.x_test.shape[0]}")
        widths = [max(len(r[c]) for r in rows.values()) for c in range(5)]
        for i in shown:
            if i is None:
                lines.append(f"  ... {len(self) - len(rows)} more tasks")
                continue
            cells = [rows[i][0].rjust(widths[0])] + [v.ljust(w) for v, w in zip(rows[i][1:], widths[1:])]
            lines.append(("  " + "  ".join(cells)).rstrip())
        return "\n".join(lines) + ")"
