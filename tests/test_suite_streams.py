"""The accuracy suite's streams (bmc_fast.data.suite) and benchmarks/accuracy.py."""
import os
import sys

import numpy as np
import pytest
import torch

from bmc_fast.data.suite import SUITE_STREAMS, suite_stream

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.mark.parametrize("name,tasks,classes", [("digits", 5, 10), ("permuted-digits", 20, 200),
                                                ("tabular-mix", 5, 18)])
def test_shapes(name, tasks, classes):
    s = suite_stream(name)
    assert len(s) == tasks and s.num_classes == classes and s.input_dim == 64
    for t in s:
        assert t.x_train.dtype == torch.float32 and t.x_train.shape[1] == 64
        assert set(t.y_train.tolist()) == set(range(t.num_classes))  # every class in every split
        assert set(t.y_test.tolist()) == set(range(t.num_classes))
        # standardised with the training statistics (the padded columns are zero)
        used = t.x_train.abs().sum(0) > 0
        assert torch.allclose(t.x_train[:, used].mean(0), torch.zeros(int(used.sum())), atol=1e-4)


def _rows(x):
    return {tuple(np.round(r, 4)) for r in x.numpy()}


@pytest.mark.parametrize("name", SUITE_STREAMS)
def test_validation_never_touches_test_data(name):
    """validation=True: train and validation are a split of the training part; the test rows
    appear in neither (rows compared after undoing the different standardisations is awkward,
    so compare raw sizes and, per task, that train + validation = the full stream's train)."""
    full, val = suite_stream(name, seed=3), suite_stream(name, seed=3, validation=True)
    for a, b in zip(full, val):
        assert b.x_train.shape[0] + b.x_test.shape[0] == a.x_train.shape[0]
        assert abs(b.x_test.shape[0] / a.x_train.shape[0] - 0.2) < 0.02
        # the same label multiset as the full stream's training split
        assert sorted(torch.cat([b.y_train, b.y_test]).tolist()) == sorted(a.y_train.tolist())


def test_validation_split_is_disjoint_and_seeded():
    a = suite_stream("digits", seed=1, validation=True)
    b = suite_stream("digits", seed=1, validation=True)
    c = suite_stream("digits", seed=2, validation=True)
    for ta, tb, tc in zip(a, b, c):
        assert torch.equal(ta.x_train, tb.x_train) and torch.equal(ta.x_test, tb.x_test)
        assert not _rows(ta.x_train) & _rows(ta.x_test)
    assert not all(torch.equal(ta.x_test, tc.x_test) for ta, tc in zip(a, c))


def test_permuted_digits_tasks_are_permutations_of_one_another():
    """The digits' constant pixels (all zero after standardisation) move with each task's
    permutation: same count in every task, other places; task 0 keeps the raw order."""
    from sklearn.datasets import load_digits

    raw_const = set(np.flatnonzero(load_digits().data.std(0) == 0))
    s = suite_stream("permuted-digits")
    const = [frozenset(np.flatnonzero((torch.cat([t.x_train, t.x_test]).abs().sum(0) == 0).numpy())) for t in s]
    assert const[0] == raw_const
    assert all(len(c) == len(raw_const) for c in const)
    assert len(set(const)) > 15  # the permutations differ


def test_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="stream must be one of"):
        suite_stream("mnist")


def test_accuracy_script_quick(tmp_path, capsys):
    sys.path.insert(0, BENCH)
    try:
        import accuracy
    finally:
        sys.path.remove(BENCH)
    assert accuracy.main(["compare", "--quick", "--streams", "tabular-mix", "--seeds", "0", "--no-write"]) == 0
    out = capsys.readouterr().out
    for m in accuracy.COMPARED:
        line = next(ln for ln in out.splitlines() if f" {m} " in ln)
        cil = float(line.split("class-IL")[1].split("±")[0])
        assert 0.0 <= cil <= 1.0


def test_cli_runs_a_suite_stream(tmp_path):
    import json
    import subprocess

    run = lambda *a: subprocess.run([sys.executable, "-m", "bmc_fast", "run", "--quiet", "--out", str(tmp_path), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    p = run("--stream", "tabular-mix", "--epochs", "1", "--consolidation-epochs", "1", "--no-baselines")
    assert p.returncode == 0, p.stderr
    with open(tmp_path / "bmc.json") as f:
        res = json.load(f)
    assert res["task_names"] == [t.name for t in suite_stream("tabular-mix")]
    p = run("--stream", "digits", "--features", str(tmp_path))
    assert p.returncode == 2 and p.stderr.strip() == "bmc-fast: --stream and --features name two streams: give one of them"
