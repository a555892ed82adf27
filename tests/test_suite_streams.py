"""The accuracy suite's streams (bmc_fast.data.suite) and benchmarks/accuracy.py."""
import os
import sys

import numpy as np
import pytest
import torch

from bmc_fast.data.suite import SUITE_STREAMS, _indices, _sources, suite_stream

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
def test_no_seed_trains_or_validates_on_a_test_row(name):
    """The test split of every task is the same for every seed; a validation stream's training and
    validation rows are a partition of the full stream's training rows."""
    for seed in (0, 3):
        for task, x, y, key in _sources(name, seed):
            train, test = _indices(y, key, seed, validation=False)
            assert np.array_equal(test, _indices(y, key, seed + 1, validation=False)[1])
            vtrain, vval = _indices(y, key, seed, validation=True)
            assert not set(vtrain) & set(vval)
            assert set(vtrain) | set(vval) == set(train), task
            assert not (set(vtrain) | set(vval)) & set(test), task
            assert abs(len(vval) / len(train) - 0.2) < 0.02
    other = _indices(_sources(name, 0)[0][2], _sources(name, 0)[0][3], 1, validation=True)[1]
    assert not np.array_equal(other, _indices(_sources(name, 0)[0][2], _sources(name, 0)[0][3], 0, validation=True)[1])


def test_suite_streams_use_the_split_indices():
    """suite_stream serves the rows _indices names (checked on the unstandardised labels)."""
    for validation in (False, True):
        s = suite_stream("tabular-mix", seed=2, validation=validation)
        for t, (_, x, y, key) in zip(s, _sources("tabular-mix", 2)):
            y = np.searchsorted(np.unique(y), y)
            train, test = _indices(y, key, 2, validation)
            assert t.y_train.tolist() == y[train].tolist() and t.y_test.tolist() == y[test].tolist()


def test_permuted_digits_tasks_share_one_partition():
    """As in permuted-MNIST: an image is a test image in every task or in none."""
    keys = {key for *_, key in _sources("permuted-digits", 0)}
    assert len(keys) == 1
    s = suite_stream("permuted-digits", seed=1)
    assert all(torch.equal(t.y_test, s[0].y_test) for t in s)


def test_validation_split_is_seeded():
    a = suite_stream("digits", seed=1, validation=True)
    b = suite_stream("digits", seed=1, validation=True)
    c = suite_stream("digits", seed=2, validation=True)
    for ta, tb in zip(a, b):
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


def _accuracy_module():
    sys.path.insert(0, BENCH)
    try:
        import accuracy
    finally:
        sys.path.remove(BENCH)
    return accuracy


def test_accuracy_script_quick(tmp_path, capsys):
    accuracy = _accuracy_module()
    assert accuracy.main(["compare", "--quick", "--streams", "tabular-mix", "--seeds", "0", "--no-write"]) == 0
    out = capsys.readouterr().out
    have_avalanche = accuracy.avalanche_available() is not None
    for m in accuracy.COMPARED:
        lines = [ln for ln in out.splitlines() if f" {m} " in ln and "class-IL" in ln]
        if m in accuracy.AVALANCHE and not have_avalanche:
            assert not lines and "Avalanche is not installed: its rows are skipped" in out
            continue
        cil = float(lines[0].split("class-IL")[1].split("±")[0])
        assert 0.0 <= cil <= 1.0


def test_accuracy_script_baseline_variants_and_avalanche_errors(capsys):
    accuracy = _accuracy_module()
    assert accuracy.main(["select", "--quick", "--streams", "digits", "--seeds", "0", "--no-write",
                          "--methods", "er (buffer=reservoir, optimizer=task)", "derpp (alpha=0.1, beta=0.5, draws=1)"]) == 0
    out = capsys.readouterr().out
    assert "er (buffer=reservoir, optimizer=task)" in out and "derpp (alpha=0.1, beta=0.5, draws=1)" in out
    if accuracy.avalanche_available() is None:
        with pytest.raises(SystemExit) as exc:
            accuracy.main(["compare", "--quick", "--methods", "avalanche replay"])
        assert exc.value.code == 2 and "needs Avalanche" in capsys.readouterr().err


def test_accuracy_parity_pairs_with_the_public_figures(tmp_path, capsys):
    accuracy = _accuracy_module()
    public = tmp_path / "public.json"
    public.write_text('{"tabular-mix": {"seeds": [3], "values": [0.25], "til_values": [0.5]}, "mnist": {}}')
    assert accuracy.main(["parity", "--quick", "--public", str(public)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tabular-mix"))
    ours = float(line.split("parity ")[1].split()[0])
    diff = float(line.split("parity - public ")[1].split()[0])
    assert 0.0 <= ours <= 1.0 and diff == pytest.approx((ours - 0.25) * 100, abs=0.11)
    assert "1 seeds" in line


def _fake_public(tmp_path, body: str) -> str:
    """A stand-in for the public code's runner: a script printing ``body`` (a format string of
    stream, seed and threads) last."""
    script = tmp_path / "fake_public.py"
    script.write_text("import argparse, sys\n"
                      "p = argparse.ArgumentParser()\n"
                      "p.add_argument('--stream'); p.add_argument('--seed', type=int); p.add_argument('--threads')\n"
                      "a = p.parse_args()\n"
                      "print('training...', file=sys.stderr)\n"
                      f"print({body!r}.format(stream=a.stream, seed=a.seed, threads=a.threads))\n")
    return f"{sys.executable} {script}"


def test_accuracy_parity_runs_the_public_code_beside_it(tmp_path, capsys):
    accuracy = _accuracy_module()
    cmd = _fake_public(tmp_path, '{{"acc": 0.{seed}5, "til": 0.9, "seconds": 1e3, "threads": {threads}}}')
    assert accuracy.main(["parity", "--quick", "--no-write", "--public-run", cmd, "--streams", "tabular-mix",
                          "--seeds", "1", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    runs = [ln for ln in out if ln.startswith("tabular-mix") and " seed " in ln]
    assert [ln.split("public code ")[1].split()[0] for ln in runs] == ["0.150", "0.250"]  # its acc, per seed
    line = next(ln for ln in out if "the public code's speed" in ln)
    speed = float(line.split("; ")[1].split("x")[0])
    assert speed > 100  # 1,000 s a run for the stand-in, a few seconds for a quick parity run
    assert "2 seeds" in line


@pytest.mark.parametrize("body,text", [
    ("no json", "expected a last line"),
    ('{{"acc": 85, "til": 0.9, "seconds": 1}}', "fractions in [0, 1]"),
    ('{{"acc": 0.5, "seconds": 1}}', "KeyError"),
])
def test_accuracy_parity_names_a_bad_public_run(tmp_path, capsys, body, text):
    accuracy = _accuracy_module()
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["parity", "--quick", "--no-write", "--public-run", _fake_public(tmp_path, body), "--streams",
                       "digits", "--seeds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and text in err[-1] and "--public-run" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize("args,text", [
    (["parity"], "parity needs one of --public FILE"),
    (["parity", "--public", "{short}", "--public-run", "x"], "parity needs one of --public FILE"),
    (["compare", "--public-run", "x"], "use it with parity"),
    (["parity", "--public-run", "/nonexistent/runner", "--streams", "digits", "--seeds", "0"], "cannot run it"),
    (["parity", "--public", "{bad}"], "--public {bad}: expected"),
    (["parity", "--public", "{short}"], "the same length"),
    (["parity", "--public", "{none}"], "no stream of the suite"),
    (["compare", "--public", "{percent}"], "fractions in [0, 1]"),
    (["compare", "--public", "{dup}"], "seeds must be distinct integers"),
    (["parity", "--public", "{digits}", "--streams", "tabular-mix"], "none of the streams asked for"),
    (["parity", "--public", "{short}", "--seeds", "1"], "no --methods or --seeds"),
    (["select", "--public", "{short}"], "use it with compare or parity"),
])
def test_accuracy_parity_errors_are_one_line(tmp_path, capsys, args, text):
    accuracy = _accuracy_module()
    files = {"bad": "[1, 2", "short": '{"digits": {"values": [0.5, 0.6], "til_values": [0.7]}}',
             "none": '{"mnist": {"values": [0.5], "til_values": [0.5]}}',
             "percent": '{"digits": {"values": [85.2], "til_values": [97.1]}}',
             "dup": '{"digits": {"seeds": [1, 1], "values": [0.5, 0.6], "til_values": [0.7, 0.8]}}',
             "digits": '{"digits": {"values": [0.5], "til_values": [0.5]}}'}
    for k, v in files.items():
        (tmp_path / k).write_text(v)
    paths = {k: str(tmp_path / k) for k in files}
    args, text = [a.format(**paths) for a in args], text.format(**paths)
    with pytest.raises(SystemExit) as exc:
        accuracy.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and text in err[-1] and "Traceback" not in "".join(err)


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


def test_accuracy_plot_of_the_compare_table(tmp_path):
    import json

    accuracy = _accuracy_module()
    row = lambda acc, s: {"cil": {"mean": acc, "std": 0.01}, "seconds": {"mean": s}}  # noqa: E731
    results = tmp_path / "kind.json"
    results.write_text(json.dumps({"accuracy_compare": [{"streams": {
        "digits": {"paper": row(0.9, 1.0), "er": row(0.8, 0.3), "avalanche replay": row(0.6, 0.7)},
        "tabular-mix": {"paper": row(0.92, 1.5), "public code (K = 1)": {"cil": {"mean": 0.88, "std": 0.01}}}}}]}))
    png = accuracy.plot_compare(str(results), str(tmp_path / "accuracy.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
