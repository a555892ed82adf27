"""Evaluation and results: class-IL / task-IL accuracy matrices, average accuracy, forgetting,
backward transfer, per-phase wall time; JSON output (never pickle) and a PNG plot."""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backbone import inference_rows

__all__ = ["evaluate", "evaluate_rows", "Result"]


@torch.no_grad()
def evaluate_rows(model, stream, rows: list[int], device, full_head: bool = False, batch: int | None = None) -> dict:
    """Rows of the accuracy matrices for one model: ``{i: (cil, til)}`` with the accuracies on the
    test split of every task j <= i, from one forward pass over each task's test data (the rows
    differ only in the classes their class-IL argmax may choose).

    Class-IL of row i: argmax over the classes of tasks 0..i (over the whole head with
    ``full_head``). Task-IL: argmax inside task j's own range (the same in every row). ``batch``:
    test samples per forward pass (default :func:`bmc_fast.backbone.inference_rows`)."""
    rows = sorted(set(int(i) for i in rows))
    if batch is None:
        batch = inference_rows(device)
    elif int(batch) < 1:
        raise ValueError(f"batch must be a positive number of rows, got {batch}")
    was = model.training
    model.eval()
    bounds = [stream.offsets[i] + stream[i].num_classes for i in rows]
    evaluated = model
    if not full_head and hasattr(model, "head_rows"):  # the default ResMLP: no logits of unseen classes
        evaluated = model.head_rows(0, bounds[-1]).eval()
    out = {i: ([], []) for i in rows}
    for j in range(rows[-1] + 1):
        task = stream[j]
        o, n = stream.task_range(j)
        live = [r for r, i in enumerate(rows) if i >= j]
        correct_c = torch.zeros(len(rows), dtype=torch.long)
        correct_t = 0
        for xs, ys in zip(torch.split(task.x_test, batch), torch.split(task.y_test, batch)):
            logits = evaluated(xs.float().to(device))[0].float().cpu()
            correct_t += int((logits[:, o:o + n].argmax(1) == ys).sum())
            target = ys + o
            if full_head:
                hit = int((logits.argmax(1) == target).sum())
                for r in live:
                    correct_c[r] += hit
                continue
            # argmax over [0, bound) for every row's bound, from one pass over the columns:
            # the running maximum over the segments between consecutive bounds (ties keep the
            # first index, as argmax does).
            best = torch.full((logits.shape[0],), float("-inf"))
            arg = torch.zeros(logits.shape[0], dtype=torch.long)
            lo = 0
            for r in live:
                hi = bounds[r]
                if hi > lo:
                    m, a = logits[:, lo:hi].max(1)
                    better = m > best
                    best = torch.where(better, m, best)
                    arg = torch.where(better, a + lo, arg)
                    lo = hi
                correct_c[r] += int((arg == target).sum())
        m = task.x_test.shape[0]
        for r in live:
            cil, til = out[rows[r]]
            cil.append(int(correct_c[r]) / m if m else float("nan"))
            til.append(correct_t / m if m else float("nan"))
    model.train(was)
    return out


def evaluate(model, stream, upto: int, device, full_head: bool = False, batch: int | None = None):
    """Accuracies of ``model`` after task ``upto`` on the test split of every task j <= upto: two
    lists (class-IL, task-IL) of length upto + 1 (:func:`evaluate_rows` of one row)."""
    return evaluate_rows(model, stream, [upto], device, full_head, batch)[upto]


@dataclass
class Result:
    """Accuracy matrices A[i, j] (the model after task i on the test data of task j; NaN where
    j > i) and summaries. ``step_starts`` are the first task of every incremental step."""

    task_names: list
    cil_matrix: np.ndarray
    til_matrix: np.ndarray
    step_starts: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    method: str = "bmc"

    @classmethod
    def empty(cls, names, **kw):
        t = len(names)
        nan = np.full((t, t), np.nan)
        return cls(list(names), nan.copy(), nan.copy(), **kw)

    @property
    def final_cil_accuracy(self) -> float:
        return float(np.nanmean(self.cil_matrix[-1]))

    @property
    def final_til_accuracy(self) -> float:
        return float(np.nanmean(self.til_matrix[-1]))

    @property
    def average_accuracy_curve(self) -> list:
        """Mean class-IL accuracy over the tasks seen so far, after each task."""
        rows = [self.cil_matrix[i, : i + 1] for i in range(len(self.task_names))]
        return [float(np.mean(r[~np.isnan(r)])) if (~np.isnan(r)).any() else float("nan") for r in rows]

    def _consolidated_before_last_step(self) -> int:
        return self.step_starts[-1] if self.step_starts else len(self.task_names) - 1

    @property
    def forgetting(self) -> float:
        """Mean over tasks consolidated before the last step of max_{i<last} A[i,j] - A[last,j]."""
        a, last = self.cil_matrix, len(self.task_names) - 1
        js = range(self._consolidated_before_last_step())
        vals = [np.nanmax(a[:last, j]) - a[last, j] for j in js if not np.all(np.isnan(a[:last, j]))]
        return float(np.mean(vals)) if vals else float("nan")

    def just_learned(self, j: int) -> float:
        """Task j's accuracy right after the consolidation that learned it: the row of the last
        task of j's incremental step (rows before it in the step show j not yet learned)."""
        ends = [s - 1 for s in self.step_starts[1:]] + [len(self.task_names) - 1]
        end = next((e for e in ends if e >= j), len(self.task_names) - 1) if self.step_starts else j
        return float(self.cil_matrix[end, j])

    @property
    def backward_transfer(self) -> float:
        """Mean, over tasks consolidated before the last step, of the final accuracy minus the
        accuracy just after their own consolidation (:meth:`just_learned`)."""
        a, last = self.cil_matrix, len(self.task_names) - 1
        vals = [a[last, j] - self.just_learned(j) for j in range(self._consolidated_before_last_step())
                if not np.isnan(self.just_learned(j))]
        return float(np.mean(vals)) if vals else float("nan")

    def summary(self) -> dict:
        return {"method": self.method, "final_cil_accuracy": self.final_cil_accuracy,
                "final_til_accuracy": self.final_til_accuracy, "forgetting": self.forgetting,
                "backward_transfer": self.backward_transfer}

    def to_dict(self) -> dict:
        clean = lambda m: [[None if math.isnan(v) else float(v) for v in row] for row in m]  # noqa: E731
        return {**self.summary(), "task_names": self.task_names, "cil_matrix": clean(self.cil_matrix),
                "til_matrix": clean(self.til_matrix), "average_accuracy_curve": self.average_accuracy_curve,
                "step_starts": self.step_starts, "timings": self.timings, "config": self.config}

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        arr = lambda m: np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)  # noqa: E731
        return cls(d["task_names"], arr(d["cil_matrix"]), arr(d["til_matrix"]), d.get("step_starts", []),
                   d.get("timings", {}), d.get("config", {}), d.get("method", "bmc"))

    def save(self, path) -> str:
        """Writes the result as JSON, atomically."""
        from .._io import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())
        return str(path)

    @classmethod
    def load(cls, path) -> "Result":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def plot(self, path, others: dict | None = None) -> str:
        """PNG, written atomically: the class-IL accuracy matrix as a heatmap and the
        average-accuracy curve (with the curves of ``others``, {name: Result}, for comparison)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        im = ax1.imshow(self.cil_matrix, vmin=0, vmax=1, cmap="viridis")
        ax1.set_title(f"{self.method}: class-IL accuracy A[i, j]")
        ax1.set_xlabel("evaluated task j")
        ax1.set_ylabel("after task i")
        fig.colorbar(im, ax=ax1)
        x = np.arange(1, len(self.task_names) + 1)
        ax2.plot(x, self.average_accuracy_curve, "o-", label=self.method)
        for name, r in (others or {}).items():
            ax2.plot(x[: len(r.average_accuracy_curve)], r.average_accuracy_curve, "s--", label=name)
        ax2.set_ylim(0, 1.02)
        ax2.set_xlabel("tasks seen")
        ax2.set_ylabel("average class-IL accuracy")
        ax2.grid(alpha=0.3)
        ax2.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        from .._io import atomic_write_bytes

        atomic_write_bytes(path, buf.getvalue())
        return str(path)
