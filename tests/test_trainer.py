"""The BMC trainer end to end on the embedded digits stream, with tiny settings."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bmc_fast import BMC, BMCConfig
from bmc_fast.data import Task, TaskStream, demo_stream
from bmc_fast.train.experts import train_experts
from bmc_fast.train.memory import Buffer, Memory, even_quotas
from bmc_fast.train.metrics import Result
from bmc_fast.backbone import ResMLP

TINY = dict(epochs=1, consolidation_epochs=2, batch_size=32, consolidation_batch_size=32, progress=False)


@pytest.fixture(scope="module")
def stream():
    return demo_stream()


class _MLP(torch.nn.Module):
    """No BatchNorm: with BN, biases in front of a BN get an exactly-zero true gradient whose
    rounding noise Adam normalises to full-size steps, so two summation orders drift apart in
    those (output-irrelevant) directions; without BN the modes agree to float tolerance."""

    def __init__(self, d, c):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32), torch.nn.Tanh())
        self.head = torch.nn.Linear(32, c)

    def forward(self, x):
        h = self.f(x)
        return self.head(h), h


@pytest.mark.parametrize("stability", ["feature", "weight"])
def test_modes_train_the_same_experts(stream, stability):
    torch.manual_seed(0)
    base = _MLP(stream.input_dim, stream.num_classes)
    out = {}
    for mode in ("stacked", "sequential"):
        cfg = BMCConfig(n_experts=3, parallel=mode, epochs=2, batch_size=32, keep_expert_states=True, progress=False,
                        stability=stability, lr=1e-3)
        out[mode] = train_experts(base, stream, [0, 1, 2], cfg, step_index=5, use_stability=True)
    for a, b in zip(out["stacked"], out["sequential"]):
        assert a.task == b.task
        for name in a.state:
            torch.testing.assert_close(a.state[name], b.state[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"task {a.task} {name}: {m}")
        torch.testing.assert_close(a.buffer.features, b.buffer.features, rtol=1e-4, atol=1e-4)


def test_base_feature_table_gives_the_same_experts(stream):
    torch.manual_seed(0)
    base = _MLP(stream.input_dim, stream.num_classes)
    cfg = BMCConfig(n_experts=2, epochs=2, batch_size=32, keep_expert_states=True, progress=False, lr=1e-3)
    with_table = train_experts(base, stream, [0, 1], cfg, step_index=3)
    cfg.base_feature_table_mb = 0  # the frozen base's forward at every step instead
    per_step = train_experts(base, stream, [0, 1], cfg, step_index=3)
    for a, b in zip(with_table, per_step):
        for name in a.state:
            torch.testing.assert_close(a.state[name], b.state[name], rtol=1e-4, atol=1e-5)


def test_fused_resmlp_stacked_equals_sequential(stream):
    # The fused ResMLP path: K stacked models in batched matmuls vs one model at a time. Without
    # dropout the two agree (and, unlike the nn.Module path, the biases in front of a BatchNorm
    # get their exact zero gradient in both, so nothing drifts).
    torch.manual_seed(0)
    base = ResMLP(stream.input_dim, stream.num_classes, dropout=0.0)
    out = {}
    for mode in ("stacked", "sequential"):
        cfg = BMCConfig(n_experts=3, parallel=mode, epochs=2, batch_size=32, keep_expert_states=True,
                        progress=False, lr=1e-3)
        out[mode] = train_experts(base, stream, [0, 1, 2], cfg, step_index=5)
    for a, b in zip(out["stacked"], out["sequential"]):
        for name in a.state:
            torch.testing.assert_close(a.state[name].float(), b.state[name].float(), rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"task {a.task} {name}: {m}")


def test_stacked_batchnorm_keeps_per_expert_statistics(stream):
    torch.manual_seed(0)
    base = ResMLP(stream.input_dim, stream.num_classes, dropout=0.0)
    cfg = BMCConfig(n_experts=3, parallel="stacked", epochs=1, batch_size=32, keep_expert_states=True, progress=False)
    arts = train_experts(base, stream, [0, 1, 2], cfg, step_index=5)
    rm = [a.state["block1.bn1.running_mean"] for a in arts]
    assert not torch.allclose(rm[0], rm[1]) and not torch.allclose(rm[1], rm[2])
    assert all(int(a.state["block1.bn1.num_batches_tracked"]) == 8 for a in arts)


def test_weight_stability_mode_and_kd_and_float16_buffers(stream):
    cfg = BMCConfig(n_experts=5, stability="weight", kd_coef=1.0, store_logits=True, buffer_dtype="float16",
                    buffer_size=0.5, stability_first_step=True, **TINY)
    bmc = BMC(cfg)
    res = bmc.fit(stream)
    assert bmc.memory.logits is not None and bmc.memory.logits.dtype == torch.float16
    assert len(bmc.memory.buffers) == 5
    assert all(len(b) == round(0.5 * len(t.x_train)) for b, t in zip(bmc.memory.buffers, stream))
    assert np.isfinite(res.final_cil_accuracy)


def test_fit_metrics_callback_and_events(stream):
    seen, events = [], []
    res = BMC(BMCConfig(n_experts=2, **TINY)).fit(stream, on_task_end=lambda i, m: seen.append(i), events=events.append)
    assert seen == [0, 1, 2, 3, 4]
    t = len(stream)
    assert res.cil_matrix.shape == (t, t) and np.isnan(res.cil_matrix[0, 1]) and not np.isnan(res.cil_matrix[4, 0])
    assert res.step_starts == [0, 2, 4]
    assert {"experts_s", "consolidation_s", "evaluation_s"} <= set(res.timings)
    assert {e["event"] for e in events} >= {"step_start", "experts_done", "consolidation_done", "task_end"}
    # forgetting and BWT from the matrix definition; a task's "just learned" accuracy is the row
    # of its step's last task (steps {0, 1}, {2, 3}, {4}: rows 1 and 3)
    a = res.cil_matrix
    assert res.forgetting == pytest.approx(np.mean([np.nanmax(a[:4, j]) - a[4, j] for j in range(4)]))
    assert res.backward_transfer == pytest.approx(np.mean([a[4, j] - a[j | 1, j] for j in range(4)]))


def test_parity_preset(stream):
    cfg = BMCConfig.preset("parity", **TINY)
    assert cfg.n_experts == 1 and cfg.distill_coef == 0 and cfg.stability_coef == 0 and cfg.full_head
    res = BMC(cfg).fit(stream)
    assert 0 <= res.final_cil_accuracy <= 1


def test_result_json_roundtrip_and_plot(stream, tmp_path):
    res = BMC(BMCConfig(n_experts=5, **TINY)).fit(stream)
    path = res.save(tmp_path / "r.json")
    back = Result.load(path)
    np.testing.assert_equal(back.cil_matrix, res.cil_matrix)
    assert back.final_cil_accuracy == res.final_cil_accuracy
    png = res.plot(tmp_path / "r.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def _task(name, n=20, c=2, d=8, **kw):
    x = torch.randn(n, d)
    y = torch.arange(n) % c
    args = dict(x_train=x, y_train=y, x_test=x[:5], y_test=y[:5], num_classes=c)
    args.update(kw)
    return Task(name, **args)


@pytest.mark.parametrize("bad, match", [
    (lambda: _task("a", y_train=torch.arange(20) % 3), "y_train"),
    (lambda: _task("a", num_classes=1, y_train=torch.zeros(20, dtype=torch.long), y_test=torch.zeros(5, dtype=torch.long)),
     "num_classes"),
    (lambda: _task("a", x_train=torch.zeros(0, 8), y_train=torch.zeros(0, dtype=torch.long)), "empty"),
    (lambda: _task("a", x_test=torch.randn(5, 9)), "feature shapes"),
    (lambda: _task("a", y_train=torch.arange(19) % 2), "samples"),
    (lambda: _task("a", x_train=torch.full((20, 8), float("nan"))), "NaN"),
    (lambda: TaskStream([_task("a"), _task("b", d=9)]), "input shape"),
    (lambda: TaskStream([]), "at least one task"),
    (lambda: TaskStream([_task("a"), _task("a")]), "unique"),
    (lambda: BMCConfig(n_experts=0), "n_experts"),
    (lambda: BMCConfig(parallel="threads"), "parallel"),
    (lambda: BMCConfig(parallel="streams"), "cuda"),
    (lambda: BMCConfig(buffer_size=-1), "buffer_size"),
    (lambda: BMCConfig(stability="both"), "stability"),
])
def test_bad_input_is_refused_before_training(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_fit_rejects_a_model_with_the_wrong_outputs():
    s = TaskStream([_task("a"), _task("b")])
    with pytest.raises(ValueError, match="logits"):
        BMC(BMCConfig(**TINY), model_fn=lambda d, c: torch.nn.Linear(d, c)).fit(s)


def test_memory_quotas_and_balanced_sampler():
    assert even_quotas([10, 3, 100], 30) == [10, 3, 17]
    assert even_quotas([7, 7, 7], 10) == [4, 3, 3]
    assert sum(even_quotas([50] * 71, 1000)) == 1000
    g = torch.Generator().manual_seed(0)
    bufs = [Buffer(torch.randn(n, 4), torch.full((n,), 2 * i), 2 * i, 2, torch.randn(n, 3), task=i)
            for i, n in enumerate([40, 9, 100])]
    mem = Memory()
    mem.add(bufs, 60, g)
    assert [len(b) for b in mem.buffers] == [26, 9, 25]  # even quotas, water-filled, remainder first
    idx = mem.balanced_indices(12, g)
    counts = torch.stack([mem.buffer_id[r].bincount(minlength=3) for r in idx])
    assert (counts == 4).all()
    # old samples keep their targets through a resample
    before = {tuple(x.tolist()): f for x, f in zip(mem.x, mem.features)}
    mem.add([Buffer(torch.randn(30, 4), torch.full((30,), 6), 6, 2, torch.randn(30, 3), task=3)], 40, g)
    for x, f in zip(mem.x, mem.features):
        if tuple(x.tolist()) in before:
            assert torch.equal(before[tuple(x.tolist())], f)


def test_memory_holds_its_samples_once():
    # a packed memory's buffers are views of its tensors: the buffers' own copies are freed
    bufs = [Buffer(torch.randn(n, 4, dtype=torch.float16), torch.full((n,), i), i, 1, torch.randn(n, 3), task=i)
            for i, n in enumerate([30, 20])]
    copies = [(b.x.clone(), b.y.clone(), b.features.clone()) for b in bufs]
    mem = Memory().with_buffers(bufs)
    assert mem.x.dtype == torch.float16
    for b, (x, y, f), s in zip(mem.buffers, copies, mem.starts):
        assert torch.equal(b.x, x) and torch.equal(b.y, y) and torch.equal(b.features, f)
        for t, packed in ((b.x, mem.x), (b.y, mem.y), (b.features, mem.features)):
            assert t.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    old = mem.x.untyped_storage().data_ptr()
    mem.cut(12, torch.Generator().manual_seed(0))  # repacked: no buffer keeps the old tensors alive
    assert all(b.x.untyped_storage().data_ptr() == mem.x.untyped_storage().data_ptr() != old for b in mem.buffers)
    again = Memory.from_state_dict(mem.state_dict())
    assert torch.equal(again.x, mem.x) and torch.equal(again.features, mem.features)


def test_memory_batch_lays_teacher_logits_over_the_full_head():
    bufs = [Buffer(torch.randn(n, 4), torch.full((n,), o), o, ln, torch.randn(n, 3), torch.randn(n, ln), task=i)
            for i, (n, o, ln) in enumerate([(5, 0, 2), (4, 2, 3)])]
    mem = Memory()
    mem.add(bufs, 9, torch.Generator().manual_seed(0))
    idx = torch.tensor([[8, 0, 6, 3]])
    b = mem.batch(idx, 6, "cpu")
    for r, i in enumerate(idx[0].tolist()):
        o, ln = int(mem.offset[i]), int(mem.length[i])
        want = torch.zeros(6)
        want[o:o + ln] = mem.logits[i, :ln].float()
        assert torch.equal(b["teacher_logits"][r], want)
        assert (int(b["offset"][r]), int(b["length"][r])) == (o, ln) and torch.equal(b["x"][r], mem.x[i])


RUN = """
import os, sys, json, torch
import bmc_fast
from bmc_fast import BMC, BMCConfig
from bmc_fast.data import demo_stream
ckpt, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = BMCConfig(n_experts=2, epochs=1, consolidation_epochs=2, batch_size=32, consolidation_batch_size=32,
                progress=False, seed=3)
def cb(i, m):
    if mode == "crash" and i == 3:   # after the checkpoint of step 1 (tasks 2-3): die hard
        os._exit(17)
res = BMC(cfg).fit(demo_stream(), on_task_end=cb, checkpoint_dir=ckpt if mode != "plain" else None,
                   resume=(mode == "resume"))
res.save(out)
"""


def test_checkpoint_resume_after_a_kill_gives_the_same_result(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ck = str(tmp_path / "ck")

    def run(mode, out):
        return subprocess.run([sys.executable, str(script), ck, mode, str(tmp_path / out)], env=env,
                              capture_output=True, text=True, timeout=600)

    crash = run("crash", "unused.json")
    assert crash.returncode == 17, crash.stderr
    assert os.path.exists(os.path.join(ck, "bmc-checkpoint.pt"))
    assert not [f for f in os.listdir(ck) if f.startswith(".tmp")]
    resumed = run("resume", "resumed.json")
    assert resumed.returncode == 0, resumed.stderr
    plain = run("plain", "plain.json")
    assert plain.returncode == 0, plain.stderr
    a, b = Result.load(tmp_path / "resumed.json"), Result.load(tmp_path / "plain.json")
    np.testing.assert_allclose(a.cil_matrix, b.cil_matrix, equal_nan=True)
    np.testing.assert_allclose(a.til_matrix, b.til_matrix, equal_nan=True)


def test_checkpoint_refuses_code_and_other_streams(tmp_path):
    from bmc_fast.train.checkpoint import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_cli_run_writes_results(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bmc_fast", "run", "--epochs", "1", "--consolidation-epochs", "1",
                        "--experts", "5", "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    methods = {e["method"] for e in events if e["event"] == "result"}
    assert methods == {"bmc", "finetune", "joint"}
    assert (out / "bmc.json").exists() and (out / "bmc.png").exists()
    bad = subprocess.run([sys.executable, "-m", "bmc_fast", "run", "--experts", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--experts" in bad.stderr


@pytest.mark.parametrize("mode", ["stacked", "sequential"])
def test_experts_with_their_task_rows_make_the_whole_head_buffers(mode):
    # The default ResMLP's experts train only their task's head rows: same buffers (features and
    # task-range logits) and, put back into the whole head, the same expert as with every row.
    # Gaussian inputs: no near-constant input column, whose rounding-level gradient AdamW's first
    # steps would turn into full-size, path-dependent updates.
    g = torch.Generator().manual_seed(0)
    stream = TaskStream([Task(f"t{i}", torch.randn(96, 12, generator=g), torch.randint(0, c, (96,), generator=g),
                              torch.randn(20, 12, generator=g), torch.randint(0, c, (20,), generator=g), c)
                         for i, c in enumerate([3, 2, 4, 3, 2])])
    cfg = BMCConfig(n_experts=3, parallel=mode, epochs=1, batch_size=32, keep_expert_states=True, store_logits=True,
                    progress=False, dropout=0.0)
    out = {}
    for whole in (False, True):
        torch.manual_seed(0)
        base = ResMLP(stream.input_dim, stream.num_classes, dropout=0.0)
        out[whole] = train_experts(base, stream, [1, 2, 3], cfg, step_index=1, whole_head=whole, steps=2)
    # The head's matmuls have other shapes, so the sums round differently, and AdamW's first steps
    # (update ~ g / (|g| + eps)) turn that into ~1e-3 where a gradient is ~eps: two steps.
    for a, b in zip(out[False], out[True]):
        assert a.buffer.logits.shape == (len(a.buffer), stream.task_range(a.task)[1])
        for u, v in ((a.buffer.features, b.buffer.features), (a.buffer.logits, b.buffer.logits)):
            torch.testing.assert_close(u, v, rtol=1e-3, atol=5e-3)
            assert float((u - v).abs().mean()) < 1e-3
        o, n = stream.task_range(a.task)
        for name, v in a.state.items():
            w = b.state[name]
            if name.startswith("head."):  # rows outside the task: the base's (the whole head decays them)
                v, w = v[o:o + n], w[o:o + n]
            torch.testing.assert_close(v, w, rtol=1e-3, atol=5e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_uneven_tasks_and_float16_inputs_train_and_keep_their_dtype():
    g = torch.Generator().manual_seed(0)
    tasks = [Task(f"t{i}", torch.randn(n, 12, generator=g).half(), torch.randint(0, c, (n,), generator=g),
                  torch.randn(20, 12, generator=g).half(), torch.randint(0, c, (20,), generator=g), c)
             for i, (n, c) in enumerate([(300, 2), (40, 5), (1000, 3), (7, 2)])]
    stream = TaskStream(tasks)
    cfg = BMCConfig(n_experts=2, epochs=1, batch_size=16, buffer_size=50, memory_size=60, consolidation_epochs=1,
                    progress=False)
    res = BMC(cfg).fit(stream)
    assert np.isfinite(res.final_cil_accuracy)
    arts = train_experts(ResMLP(12, stream.num_classes), stream, [2, 3], cfg, step_index=1)
    assert [len(a.buffer) for a in arts] == [50, 7]
    assert all(a.buffer.x.dtype == torch.float16 for a in arts)  # kept as stored, converted per batch


@pytest.mark.parametrize("sizes", [[200, 40, 130], [40, 200, 130]])
@pytest.mark.parametrize("fused", [True, False])
def test_uneven_experts_take_their_own_epochs_and_match_training_alone(fused, sizes):
    """Each expert takes epochs x ceil(n / batch) steps of its own task: in a stack whose middle
    task ends first (the others go on as two stacks), or whose first does (the others go on as
    one stack of two from slot 1), it trains as it does alone, or sequentially; made to take the
    longest task's steps, it trains to something else."""
    import dataclasses

    from bmc_fast.train.experts import expert_steps

    g = torch.Generator().manual_seed(0)
    classes = [2, 3, 2]
    stream = TaskStream([Task(f"t{i}", torch.randn(n, 12, generator=g), torch.randint(0, c, (n,), generator=g),
                              torch.randn(10, 12, generator=g), torch.randint(0, c, (10,), generator=g), c)
                         for i, (n, c) in enumerate(zip(sizes, classes))])
    # fused: the default ResMLP through the one-call step; else a generic module stacked by vmap
    cfg = BMCConfig(n_experts=3, epochs=2, batch_size=16, keep_expert_states=True, progress=False, threads=None,
                    lr=0.01 if fused else 1e-3)
    torch.manual_seed(0)
    base = ResMLP(12, stream.num_classes) if fused else _MLP(12, stream.num_classes)
    stacked = train_experts(base, stream, [0, 1, 2], cfg, step_index=1)
    seq = train_experts(base, stream, [0, 1, 2], dataclasses.replace(cfg, parallel="sequential"), step_index=1)
    for t in range(3):
        alone = train_experts(base, stream, [t], cfg, step_index=1)[0]
        for other in (stacked[t], seq[t]):
            for name, v in alone.state.items():
                torch.testing.assert_close(other.state[name], v, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name, t=t: f"task {t} {name}: {m}")
    longest = expert_steps(max(sizes), 16, 2)
    short = sizes.index(min(sizes))
    forced = train_experts(base, stream, [short], cfg, step_index=1, steps=longest)[0]
    assert expert_steps(min(sizes), 16, 2) < longest
    name = next(iter(forced.state))
    assert not torch.allclose(forced.state[name], stacked[short].state[name])


def test_consolidation_trains_the_seen_classes_head_rows_only():
    # Memory of tasks 0-1 (5 classes seen) in a head of 14: the default ResMLP consolidates with
    # the 5 seen rows (the unseen ones stay as they were), and trains what the whole head trains.
    from bmc_fast.train.consolidation import consolidate
    from bmc_fast.train.memory import Memory

    g = torch.Generator().manual_seed(0)
    stream = TaskStream([Task(f"t{i}", torch.randn(96, 12, generator=g), torch.randint(0, c, (96,), generator=g),
                              torch.randn(20, 12, generator=g), torch.randint(0, c, (20,), generator=g), c)
                         for i, c in enumerate([3, 2, 4, 5])])
    cfg = BMCConfig(n_experts=2, epochs=1, batch_size=32, consolidation_epochs=1, consolidation_batch_size=32,
                    memory_size=100, progress=False, dropout=0.0)
    torch.manual_seed(0)
    base = ResMLP(12, stream.num_classes, dropout=0.0)
    arts = train_experts(base, stream, [0, 1], cfg, step_index=0)
    out = {}
    for full in (False, True):
        mem = Memory()
        mem.add([a.buffer for a in arts], cfg.memory_size, torch.Generator().manual_seed(0))
        m = ResMLP(12, stream.num_classes, dropout=0.0)
        m.load_state_dict(base.state_dict())
        consolidate(m, mem, BMCConfig(**{**cfg.to_dict(), "full_head": full}), stream.num_classes, step_index=0)
        out[full] = m.state_dict()
    narrow, whole = out[False], out[True]
    assert torch.equal(narrow["head.weight"][5:], base.state_dict()["head.weight"][5:])  # untouched
    assert not torch.equal(whole["head.weight"][5:], base.state_dict()["head.weight"][5:])  # weight decay
    for name, v in narrow.items():
        w = whole[name]
        if name.startswith("head."):
            v, w = v[:5], w[:5]
        torch.testing.assert_close(v.float(), w.float(), rtol=1e-3, atol=5e-3, msg=lambda m, name=name: f"{name}: {m}")
