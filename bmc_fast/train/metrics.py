"""Evaluation and results: class-IL / task-IL accuracy matrices, average accuracy, forgetting,
backward transfer, per-phase wall time; JSON output (never pickle) and a PNG plot."""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["evaluate", "Result"]


@torch.no_grad()
def evaluate(model, stream, upto: int, device, full_head: bool = False, batch: int = 4096):
    """Accuracies of ``model`` on the test split of every task j <= upto.

    Class-IL: argmax over the classes of tasks 0..upto (over the whole head with ``full_head``).
    Task-IL: argmax inside task j's own range. Returns two lists of length upto + 1.
    """
    was = model.training
    model.eval()
    seen = stream.offsets[upto] + stream[upto].num_classes
    cil, til = [], []
    for j in range(upto + 1):
        task = stream[j]
        o, n = stream.task_range(j)
        correct_c = correct_t = 0
        for xs, ys in zip(torch.split(task.x_test, batch), torch.split(task.y_test, batch)):
            logits = model(xs.float().to(device))[0].float().cpu()
            pred_c = (logits if full_head else logits[:, :seen]).argmax(1)
            correct_c += int((pred_c == ys + o).sum())
            correct_t += int((logits[:, o:o + n].argmax(1) == ys).sum())
        m = max(1, task.x_test.shape[0])
        cil.append(correct_c / m if task.x_test.shape[0] else float("nan"))
        til.append(correct_t / m if task.x_test.shape[0] else float("nan"))
    model.train(was)
    return cil, til


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

    @property
    def backward_transfer(self) -> float:
        """Mean over j < last of A[last, j] - A[j, j]."""
        a, last = self.cil_matrix, len(self.task_names) - 1
        vals = [a[last, j] - a[j, j] for j in range(last)]
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
