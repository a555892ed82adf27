"""The accuracy suite's streams: real data that installs offline (scikit-learn's bundled sets).

* ``"digits"``: 5 tasks of 2 digit classes (the demo's tasks, each standardised on its own).
* ``"permuted-digits"``: 20 tasks, each all 10 digits under its own fixed pixel permutation
  (task 0 unpermuted): a long stream, 200 classes in the shared head.
* ``"tabular-mix"``: 5 tasks from different data sets, as in the Stream benchmark: iris (3
  classes), wine (3), breast cancer (2), digits 0-4 and digits 5-9; each standardised with its
  own training statistics and zero-padded to 64 features.

``validation=True`` holds out 20% of every task's training split as its test split (stratified),
so choices can be made without the test data.
"""
from __future__ import annotations

import numpy as np
import torch

from .tasks import Task, TaskStream

__all__ = ["SUITE_STREAMS", "suite_stream"]

SUITE_STREAMS = ("digits", "permuted-digits", "tabular-mix")
_DIM = 64


def _sklearn():
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the suite streams need scikit-learn (pip install scikit-learn)") from exc
    return datasets


def _split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the indices of ``y``: (kept, held out), each shuffled."""
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * fraction))
        held.append(idx[:k])
        keep.append(idx[k:])
    return rng.permutation(np.concatenate(keep)), rng.permutation(np.concatenate(held))


def _make(name: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, validation: bool) -> Task:
    classes = np.unique(y)
    y = np.searchsorted(classes, y).astype(np.int64)
    train, test = _split(y, 0.3, rng)
    if validation:
        sub_train, sub_val = _split(y[train], 0.2, rng)
        train, test = train[sub_train], train[sub_val]
    x = x.astype(np.float32)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    if x.shape[1] < _DIM:
        x = np.pad(x, ((0, 0), (0, _DIM - x.shape[1])))
    return Task(name, torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[test]),
                torch.from_numpy(y[test]), len(classes))


def suite_stream(name: str, seed: int = 0, validation: bool = False) -> TaskStream:
    """One stream of the accuracy suite (``SUITE_STREAMS``); ``seed`` fixes the splits (and the
    permutations of ``"permuted-digits"``); ``validation=True`` replaces every test split by 20% of
    the training split."""
    if name not in SUITE_STREAMS:
        raise ValueError(f"stream must be one of {', '.join(SUITE_STREAMS)}, got {name!r}")
    ds = _sklearn()
    rng = np.random.default_rng(seed)
    digits = ds.load_digits()
    dx, dy = digits.data, digits.target
    if name == "digits":
        tasks = [_make(f"digits-{2 * t}{2 * t + 1}", dx[np.isin(dy, [2 * t, 2 * t + 1])],
                       dy[np.isin(dy, [2 * t, 2 * t + 1])], rng, validation) for t in range(5)]
    elif name == "permuted-digits":
        perm_rng = np.random.default_rng([seed, 20])
        tasks = []
        for t in range(20):
            perm = np.arange(_DIM) if t == 0 else perm_rng.permutation(_DIM)
            tasks.append(_make(f"permuted-{t}", dx[:, perm], dy, rng, validation))
    else:
        sets = [("iris", ds.load_iris()), ("wine", ds.load_wine()), ("breast-cancer", ds.load_breast_cancer())]
        tasks = [_make(n, d.data, d.target, rng, validation) for n, d in sets]
        low = dy < 5
        tasks += [_make("digits-0-4", dx[low], dy[low], rng, validation),
                  _make("digits-5-9", dx[~low], dy[~low], rng, validation)]
    return TaskStream(tasks)
