"""The accuracy suite's streams: real data that installs offline (scikit-learn's bundled sets).

* ``"digits"``: 5 tasks of 2 digit classes (the demo's tasks, each standardised on its own).
* ``"permuted-digits"``: 20 tasks, each all 10 digits under its own fixed pixel permutation
  (task 0 unpermuted): a long stream, 200 classes in the shared head.
* ``"tabular-mix"``: 5 tasks from different data sets, as in the Stream benchmark: iris (3
  classes), wine (3), breast cancer (2), digits 0-4 and digits 5-9; each standardised with its
  own training statistics and zero-padded to 64 features.

Every task's test split (30%, stratified) is fixed, the same for every seed; ``validation=True``
holds out 20% of the training split, drawn with the seed, in its place, so choices are made
without any test row.
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


def _indices(y: np.ndarray, key: tuple, seed: int, validation: bool) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices of one task. The test split (30%, stratified) is fixed by the
    task's ``key`` alone: the same for every seed, so no seed trains or validates on rows another
    seed tests on. ``validation``: the test split is set aside and 20% of the training split,
    drawn with ``seed``, takes its place."""
    train, test = _split(y, 0.3, np.random.default_rng(key))
    if validation:
        sub_train, sub_val = _split(y[train], 0.2, np.random.default_rng((seed,) + key))
        train, test = train[sub_train], train[sub_val]
    return train, test


def _make(name: str, x: np.ndarray, y: np.ndarray, key: tuple, seed: int, validation: bool) -> Task:
    classes = np.unique(y)
    y = np.searchsorted(classes, y).astype(np.int64)
    train, test = _indices(y, key, seed, validation)
    x = x.astype(np.float32)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    if x.shape[1] < _DIM:
        x = np.pad(x, ((0, 0), (0, _DIM - x.shape[1])))
    return Task(name, torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[test]),
                torch.from_numpy(y[test]), len(classes))


def _sources(name: str, seed: int) -> list:
    """(task name, inputs, labels, split key) of every task of stream ``name``. The tasks of
    ``"permuted-digits"`` share one key: one partition of the images, as permuted-MNIST does."""
    ds = _sklearn()
    digits = ds.load_digits()
    dx, dy = digits.data, digits.target
    if name == "digits":
        pick = [np.isin(dy, [2 * t, 2 * t + 1]) for t in range(5)]
        return [(f"digits-{2 * t}{2 * t + 1}", dx[m], dy[m], (1, t)) for t, m in enumerate(pick)]
    if name == "permuted-digits":
        perm_rng = np.random.default_rng([seed, 20])
        perms = [np.arange(_DIM)] + [perm_rng.permutation(_DIM) for _ in range(19)]
        return [(f"permuted-{t}", dx[:, p], dy, (2, 0)) for t, p in enumerate(perms)]
    sets = [("iris", ds.load_iris()), ("wine", ds.load_wine()), ("breast-cancer", ds.load_breast_cancer())]
    low = dy < 5
    return ([(n, d.data, d.target, (3, t)) for t, (n, d) in enumerate(sets)]
            + [("digits-0-4", dx[low], dy[low], (3, 3)), ("digits-5-9", dx[~low], dy[~low], (3, 4))])


def suite_stream(name: str, seed: int = 0, validation: bool = False) -> TaskStream:
    """One stream of the accuracy suite (``SUITE_STREAMS``). Every task's test split is fixed;
    ``seed`` draws the validation split and the permutations of ``"permuted-digits"``;
    ``validation=True`` replaces every test split by 20% of the training split."""
    if name not in SUITE_STREAMS:
        raise ValueError(f"stream must be one of {', '.join(SUITE_STREAMS)}, got {name!r}")
    return TaskStream([_make(n, x, y, key, seed, validation) for n, x, y, key in _sources(name, seed)])
