"""The embedded default stream: scikit-learn's handwritten digits, offline."""
from __future__ import annotations

import numpy as np
import torch

from .tasks import Task, TaskStream

__all__ = ["demo_stream"]


def demo_stream(n_tasks: int = 5, seed: int = 0, test_fraction: float = 0.3) -> TaskStream:
    """The embedded default: scikit-learn's handwritten digits (1797 8x8 images, offline), split
    into ``n_tasks`` tasks of consecutive digit classes (5 tasks of 2 classes by default),
    standardised with the training statistics, with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise ImportError("demo_stream needs scikit-learn (pip install scikit-learn)") from exc
    if 10 % n_tasks:
        raise ValueError(f"n_tasks must divide the 10 digit classes, got {n_tasks}")
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):  # stratified split
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6
    x = (x - mean) / std
    per = 10 // n_tasks
    tasks = []
    for t in range(n_tasks):
        classes = np.arange(t * per, (t + 1) * per)
        tr = train_idx[np.isin(y[train_idx], classes)]
        te = test_idx[np.isin(y[test_idx], classes)]
        tr, te = rng.permutation(tr), rng.permutation(te)
        tasks.append(Task(f"digits-{''.join(map(str, classes))}", torch.from_numpy(x[tr]),
                          torch.from_numpy(y[tr] - t * per), torch.from_numpy(x[te]),
                          torch.from_numpy(y[te] - t * per), per))
    return TaskStream(tasks)
