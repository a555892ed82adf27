"""The command line, run as a user runs it (a subprocess): one-line errors for mistakes, help
with meanings and defaults, --quiet keeps the results, files named after the method."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bmc_fast import cli

TINY = ["--epochs", "1", "--consolidation-epochs", "1", "--experts", "5", "--no-baselines"]


def bmc_fast(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "bmc_fast", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmc-fast: "), p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert p.stdout == ""


def _autods_root(path):
    """The top of an AutoDS root: what tells it from a converted folder."""
    os.makedirs(path / "cars")
    (path / "cars" / "metadata.pickle").write_bytes(b"")
    return path


@pytest.mark.parametrize("case", ["features_missing", "features_not_converted", "features_autods_root",
                                  "convert_missing_root", "resume_without_dir", "bad_value", "bad_int",
                                  "out_is_a_file", "cuda_without_gpu"])
def test_user_errors_are_one_line(tmp_path, case):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    args, needles = {
        "features_missing": (["run", "--features", tmp_path / "nowhere"], ["--features", "no such folder"]),
        "features_not_converted": (["run", "--features", tmp_path], ["--features", "not a converted feature folder"]),
        "features_autods_root": (["run", "--features", _autods_root(tmp_path / "root")],
                                 ["AutoDS root", "bmc-fast convert-autods"]),
        "convert_missing_root": (["convert-autods", tmp_path / "nowhere", tmp_path / "out"],
                                 ["AutoDS root not found"]),
        "resume_without_dir": (["run", "--resume"], ["--resume needs --checkpoint-dir"]),
        "bad_value": (["run", "--experts", "0"], ["--experts must be an int >= 1"]),
        "bad_int": (["run", "--epochs", "two"], ["--epochs", "invalid int value"]),
        "out_is_a_file": (["run", "--out", tmp_path / "taken"], ["--out", "File exists"]),
        "cuda_without_gpu": (["run", "--device", "cuda"], ["--device cuda", "no CUDA device"]),
    }[case]
    (tmp_path / "taken").write_text("")
    assert_one_line_error(bmc_fast(*args, cwd=tmp_path), *needles)
    assert not os.path.exists(tmp_path / "bmc_out")  # refused before any work


def test_library_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """Only validation errors become one line: a TypeError from inside training is a bug and
    must surface whole."""
    import bmc_fast.train

    def broken_fit(self, *a, **k):
        raise TypeError("a bug inside fit")

    monkeypatch.setattr(bmc_fast.train.BMC, "fit", broken_fit)
    with pytest.raises(TypeError, match="a bug inside fit"):
        cli.main(["run", "--out", str(tmp_path), "--quiet", *TINY])


def test_run_help_gives_every_option_a_meaning_and_default():
    p = bmc_fast("run", "--help")
    assert p.returncode == 0 and p.stderr == ""
    text = " ".join(p.stdout.split())  # unwrapped
    run = next(a for a in cli._parser()._actions if isinstance(a, cli.argparse._SubParsersAction)).choices["run"]
    body = text.split("options:", 1)[1]
    for action in run._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.option_strings[0] in body
        if action.nargs != 0:  # options taking a value say their default
            assert "default" in run._get_formatter()._get_help_string(action), action.option_strings
    assert "(default: 4; 1 with --preset parity)" in body  # --experts, from the presets themselves
    assert "(default: bmc_out)" in body and "(default: the only one the" not in body


def test_quiet_run_prints_only_the_results(tmp_path):
    p = bmc_fast("run", "--quiet", "--out", tmp_path / "out", *TINY)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["method", "final", "class-IL"] and lines[1].split()[0] == "bmc"
    assert lines[-1].startswith("results written to") and len(lines) == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["bmc.json", "bmc.png"]


def test_parity_files_are_named_after_the_method(tmp_path):
    p = bmc_fast("run", "--preset", "parity", "--json", "--out", tmp_path / "out", *TINY)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]  # --json: every line is JSON
    assert records[-1]["event"] == "result" and records[-1]["method"] == "bmc-parity"
    assert sorted(os.listdir(tmp_path / "out")) == ["bmc-parity.json", "bmc-parity.png"]


def test_convert_autods_takes_the_only_feature_set(tmp_path):
    from test_autods import make_dataset  # noqa: E402 (an AutoDS root in the exact layout)

    root = tmp_path / "root"
    make_dataset(root, "cars", ["sedan", "coupe"], seed=1)
    make_dataset(root, "apples", ["red", "green"], seed=2)
    p = bmc_fast("convert-autods", root, tmp_path / "a", "--quiet")
    assert p.returncode == 0, p.stderr
    assert "feature set 'default'" in p.stdout and "2 tasks written" in p.stdout
    assert json.loads((tmp_path / "a" / "index.json").read_text())["feats_name"] == "default"

    for ds in ("cars", "apples"):  # a second feature set: the user must choose
        shutil.copytree(root / ds / "feats" / "default", root / ds / "feats" / "clip")
    assert_one_line_error(bmc_fast("convert-autods", root, tmp_path / "b"), "several feature sets",
                          "['clip', 'default']", "--feats-name")
    p = bmc_fast("convert-autods", root, tmp_path / "c", "--feats-name", "clip", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "c" / "index.json").read_text())["feats_name"] == "clip"


def test_methods_and_seeds_make_one_table_with_mean_and_std(tmp_path):
    out = tmp_path / "out"
    p = bmc_fast("run", "--quiet", "--out", out, "--epochs", "1", "--consolidation-epochs", "1", "--experts", "5",
                 "--methods", "bmc,er,gdumb,finetune", "--seeds", "0", "1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["bmc", "er", "gdumb", "finetune"]
    assert all("±" in line for line in lines[1:5])
    files = sorted(os.listdir(out))
    assert {f"{m}-seed{s}.json" for m in ("bmc", "er", "gdumb", "finetune") for s in (0, 1)} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    er = summary["er"]["final_cil_accuracy"]
    assert summary["er"]["seeds"] == [0, 1] and len(er["values"]) == 2
    assert er["mean"] == pytest.approx(sum(er["values"]) / 2)
    with open(out / "er-seed1.json") as f:
        assert json.load(f)["method"] == "er"


def test_an_unknown_method_is_a_one_line_error(tmp_path):
    assert_one_line_error(bmc_fast("run", "--methods", "bmc,xyz", "--out", tmp_path / "o"), "--methods", "'xyz'",
                          "derpp")
