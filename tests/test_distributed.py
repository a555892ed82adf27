"""Distributed BMC: 2 gloo processes on loopback."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bmc_fast.train.metrics import Result

CFG = dict(n_experts=2, epochs=1, consolidation_epochs=2, batch_size=32, consolidation_batch_size=32,
           dropout=0.0, progress=False, seed=4)

SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from bmc_fast import BMC, BMCConfig
from bmc_fast.data import demo_stream
from bmc_fast.train.distributed import init_from_env, fit_distributed
import bmc_fast.train.distributed as D
mode, out = sys.argv[1], sys.argv[2]
cfg = BMCConfig(**{CFG})


class MLP(torch.nn.Module):  # no BatchNorm: see tests/test_trainer.py::_MLP
    def __init__(self, d, c):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32), torch.nn.Tanh())
        self.head = torch.nn.Linear(32, c)

    def forward(self, x):
        h = self.f(x)
        return self.head(h), h


model_fn = MLP
if mode.startswith("default"):  # the default ResMLP with dropout: its masks are keyed by task
    cfg = BMCConfig(**{{**{CFG}, "n_experts": 4, "dropout": 0.3}})
    model_fn = None
if mode in ("single", "default_single"):
    BMC(cfg, model_fn=model_fn).fit(demo_stream()).save(out)
    sys.exit(0)
if mode == "mismatch" and os.environ["RANK"] == "1":
    cfg = BMCConfig(**{{**{CFG}, "lr": 0.5}})
if mode == "toobig":
    cfg = BMCConfig(**{{**{CFG}, "n_experts": 1}})
rank, world = init_from_env("gloo", timeout_s=30)
ckpt = sys.argv[3] if len(sys.argv) > 3 else None
if mode in ("die", "die_late") and rank == 1:
    real = D.train_experts
    def dying(model, stream, ids, *a, **k):
        if mode == "die" or ids[0] >= 2:  # die_late: after step 0 was checkpointed
            os._exit(3)
        return real(model, stream, ids, *a, **k)
    D.train_experts = dying
try:
    res = fit_distributed(BMC(cfg, model_fn=model_fn), demo_stream(), checkpoint_dir=ckpt, resume=ckpt is not None)
except Exception as exc:
    print(f"ERROR {{type(exc).__name__}}: {{exc}}", flush=True)
    D.exit_after_failure(5)
if rank == 0:
    res.save(out)
D.finish(0)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(SCRIPT.format(CFG=repr(CFG))))
    return script


def _spawn(argv_of_rank, tries=3):
    """Starts 2 ranks on loopback (argv_of_rank(rank) -> command line); returns [(rc, stdout, stderr)].
    Retried with another port when the free port was taken in between (a race of _free_port)."""
    for _ in range(tries):
        outs = _spawn_once(argv_of_rank)
        if not any("ddress already in use" in e for _, _, e in outs):
            break
    return outs


def _spawn_once(argv_of_rank):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(argv_of_rank(rank), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            o += "\nTIMEOUT"
        outs.append((p.returncode, o, e))
    return outs


def _launch(tmp_path, mode, ckpt=None):
    script = _write(tmp_path)
    extra = [str(ckpt)] if ckpt else []
    return _spawn(lambda rank: [sys.executable, str(script), mode, str(tmp_path / "res.json")] + extra)


def _single(tmp_path, mode="single"):
    """The script's single-process run (``mode``): its Result."""
    out = tmp_path / f"{mode}.json"
    r = subprocess.run([sys.executable, str(_write(tmp_path)), mode, str(out)],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return Result.load(out)


def test_two_processes_give_the_single_process_result(tmp_path):
    outs = _launch(tmp_path, "ok")
    assert all(rc == 0 for rc, _, _ in outs), outs
    dist_res = Result.load(tmp_path / "res.json")
    single = _single(tmp_path)
    # Same seed, same result: one expert per rank vs two stacked experts in one process differ only
    # by float rounding (other matmul shapes; MKL's paths also depend on buffer alignment, which
    # varies run to run). Rounding can flip the argmax of a test sample that sits on a tie, so an
    # accuracy may move by a sample or three (~0.009 each on the 108-sample test splits), no more.
    np.testing.assert_allclose(dist_res.cil_matrix, single.cil_matrix, atol=0.03, equal_nan=True)
    np.testing.assert_allclose(dist_res.til_matrix, single.til_matrix, atol=0.03, equal_nan=True)
    np.testing.assert_array_equal(np.isnan(dist_res.cil_matrix), np.isnan(single.cil_matrix))


def test_one_and_two_processes_train_the_same_default_model(tmp_path):
    # The default ResMLP with dropout, 4 experts a step: one process stacks 4, two processes stack
    # 2 each. Batch order and dropout masks are keyed by task, not by stack slot or rank.
    outs = _launch(tmp_path, "default")
    assert all(rc == 0 for rc, _, _ in outs), outs
    two = Result.load(tmp_path / "res.json")
    one = _single(tmp_path, "default_single")
    assert abs(two.final_cil_accuracy - one.final_cil_accuracy) <= 1e-3
    assert abs(two.final_til_accuracy - one.final_til_accuracy) <= 1e-3


def test_a_dying_rank_fails_the_job_with_the_phase_named(tmp_path):
    outs = _launch(tmp_path, "die")
    assert outs[1][0] == 3
    rc0, out0, err0 = outs[0]
    assert rc0 == 5 and "TIMEOUT" not in out0, (out0, err0)
    assert "phase 'step 0: gather artifacts'" in out0 and "rank 0" in out0


@pytest.mark.parametrize("mode, match", [("mismatch", "different BMCConfig"), ("toobig", "world size 2")])
def test_bad_configuration_is_refused_before_training(tmp_path, mode, match):
    outs = _launch(tmp_path, mode)
    assert all(rc == 5 for rc, _, _ in outs), outs
    assert any(match in o for _, o, _ in outs), outs


def test_rerun_after_a_dead_rank_resumes_from_the_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    outs = _launch(tmp_path, "die_late", ck)
    assert outs[1][0] == 3 and outs[0][0] == 5, outs
    assert (ck / "bmc-checkpoint.pt").exists()
    outs = _launch(tmp_path, "ok", ck)
    assert all(rc == 0 for rc, _, _ in outs), outs
    resumed = Result.load(tmp_path / "res.json")
    single = _single(tmp_path)
    np.testing.assert_allclose(resumed.cil_matrix, single.cil_matrix, atol=1e-9, equal_nan=True)


def test_missing_data_on_one_rank_is_reported_by_every_rank(tmp_path):
    # Through the CLI, as a user runs it: rank 1 is pointed at a feature folder that is not there.
    cli = [sys.executable, "-m", "bmc_fast", "run", "--distributed", "--experts", "2", "--timeout", "60",
           "--out", str(tmp_path / "o")]
    outs = _spawn(lambda rank: cli + (["--features", str(tmp_path / "nowhere")] if rank == 1 else []))
    assert [rc for rc, _, _ in outs] == [3, 3], outs
    for _, _, err in outs:
        assert "loading the data failed on rank 1" in err and "index.json" in err


def test_the_cli_runs_distributed_and_both_ranks_exit_cleanly(tmp_path):
    # The user's command (torchrun ... -m bmc_fast run --distributed): both ranks end with exit
    # code 0 (through distributed.finish) and rank 0 writes the results.
    cli = [sys.executable, "-m", "bmc_fast", "run", "--distributed", "--experts", "2", "--epochs", "1",
           "--consolidation-epochs", "1", "--no-baselines", "--timeout", "120", "--out", str(tmp_path / "o")]
    outs = _spawn(lambda rank: cli)
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    res = Result.load(tmp_path / "o" / "bmc.json")
    assert res.cil_matrix.shape == (5, 5) and 0.0 < res.final_cil_accuracy <= 1.0
    assert "results written to" in outs[0][1]
