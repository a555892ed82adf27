"""Atomic writes: results, plots, checkpoints and converted features get the user's normal file
mode (0666 masked by the umask), and a write that fails leaves the old file whole."""
import os
import stat

import numpy as np
import pytest
import torch

from bmc_fast._io import atomic_write_bytes
from bmc_fast.train import Result
from bmc_fast.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _result():
    m = np.array([[0.9, np.nan], [0.7, 0.8]])
    return Result(["a", "b"], m, m.copy(), step_starts=[0, 1])


def test_files_get_the_umask_mode(tmp_path, umask):
    want = 0o666 & ~umask
    atomic_write_bytes(tmp_path / "raw.bin", b"x")
    res = _result()
    res.save(tmp_path / "r.json")
    save_checkpoint({"w": torch.ones(3)}, tmp_path / "ck.pt")
    written = ["raw.bin", "r.json", "ck.pt"]
    try:
        res.plot(tmp_path / "r.png")
        written.append("r.png")
    except ImportError:  # matplotlib is optional
        pass
    for name in written:
        assert _mode(tmp_path / name) == want, (name, oct(_mode(tmp_path / name)), oct(want))
    assert torch.equal(load_checkpoint(tmp_path / "ck.pt")["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == sorted(written)  # no temporary file left


def test_replacing_a_file_gives_the_umask_mode(tmp_path, umask):
    p = tmp_path / "r.json"
    p.write_text("old")
    os.chmod(p, 0o600)
    _result().save(p)
    assert _mode(p) == 0o666 & ~umask and Result.load(p).task_names == ["a", "b"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    p.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["r.json"]
