"""The options that reproduce the BMC authors' public code (BMCConfig.preset("parity")), each on
its own: memory policy, schedule, buffer count, weighted sampler, the public code's validation
split, span CE, uniform mixup, and the preset's fields."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bmc_fast
from bmc_fast import reference
from bmc_fast.data import Task, TaskStream
from bmc_fast.train import BMC, BMCConfig
from bmc_fast.train.consolidation import _step_batch, _validation_loss, consolidation_loss
from bmc_fast.backbone import ResMLP
from bmc_fast.train.experts import train_experts
from bmc_fast.train.loop import consolidates_after, incremental_steps
from bmc_fast.train.memory import Buffer, Memory, buffer_count, keep_quota
from bmc_fast.train.metrics import evaluate_rows
from bmc_fast.train.step import AutogradStep, LossSpec

FAST = dict(epochs=1, batch_size=32, consolidation_batch_size=32, progress=False)


def tiny_stream(n_tasks=6, n=80, d=8, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        x = torch.randn(n, d, generator=g)
        y = torch.arange(n) % c
        tasks.append(Task(f"t{t}", x, y, x[:10], y[:10], c))
    return TaskStream(tasks)


def buffers(sizes, length=2, d=4):
    return [Buffer(torch.randn(n, d), torch.full((n,), length * i), length * i, length, torch.randn(n, 3), task=i)
            for i, n in enumerate(sizes)]


# -- schedule --------------------------------------------------------------------------------------

PUBLIC = {  # (K, tasks): (steps, is the last step consolidated)
    (1, 5): ([[0], [1], [2], [3], [4]], True),
    (1, 6): ([[0], [1], [2], [3], [4], [5]], True),
    (1, 7): ([[0], [1], [2], [3], [4], [5], [6]], True),
    (2, 5): ([[0], [1, 2], [3, 4]], True),
    (2, 6): ([[0], [1, 2], [3, 4], [5]], False),
    (2, 7): ([[0], [1, 2], [3, 4], [5, 6]], True),
    (3, 5): ([[0], [1, 2, 3], [4]], False),
    (3, 6): ([[0], [1, 2, 3], [4, 5]], False),
    (3, 7): ([[0], [1, 2, 3], [4, 5, 6]], True),
}
GROUPS = {
    (1, 5): [[0], [1], [2], [3], [4]],
    (2, 5): [[0, 1], [2, 3], [4]],
    (2, 6): [[0, 1], [2, 3], [4, 5]],
    (3, 7): [[0, 1, 2], [3, 4, 5], [6]],
}


@pytest.mark.parametrize("k, n", sorted(PUBLIC))
def test_public_schedule_groups(k, n):
    steps, last_done = PUBLIC[(k, n)]
    assert incremental_steps(n, k, "public") == steps
    done = [consolidates_after(s[-1], n, k, "public") for s in steps]
    assert done == [True] * (len(steps) - 1) + [last_done]


@pytest.mark.parametrize("k, n", sorted(GROUPS))
def test_groups_schedule(k, n):
    steps = incremental_steps(n, k, "groups")
    assert steps == GROUPS[(k, n)] and incremental_steps(n, k) == steps
    assert all(consolidates_after(s[-1], n, k, "groups") for s in steps)


def test_public_schedule_evaluates_one_model_per_consolidation():
    # K=2, 6 tasks: {0}, {1,2}, {3,4} consolidated, {5} trained but never consolidated.
    stream = tiny_stream()
    models, events = {}, []
    cfg = BMCConfig(n_experts=2, schedule="public", consolidation_epochs=1, buffer_size=20, memory_size=40,
                    full_head=True, dropout=0.0, **FAST)
    res = BMC(cfg).fit(stream, on_task_end=lambda t, m: models.__setitem__(t, copy.deepcopy(m)), events=events.append)
    assert res.step_starts == [0, 1, 3, 5]
    assert [e["step"] for e in events if e["event"] == "consolidation_done"] == [0, 1, 2]
    assert [e["tasks"] for e in events if e["event"] == "consolidation_skipped"] == [[5]]
    assert [e["task"] for e in events if e["event"] == "task_end"] == [0, 1, 2, 3, 4, 5]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # the base a task ends with: a task before its step's consolidation sees the previous base
    assert same(models[0], models[1]) and same(models[2], models[3]) and same(models[4], models[5])
    assert not same(models[1], models[2]) and not same(models[3], models[4])
    for t, m in models.items():  # every row is that model's accuracy
        cil, til = evaluate_rows(m, stream, [t], "cpu", full_head=True)[t]
        np.testing.assert_allclose(res.cil_matrix[t, :t + 1], cil)
        np.testing.assert_allclose(res.til_matrix[t, :t + 1], til)


def test_public_schedule_resumes_after_the_unconsolidated_step(tmp_path):
    stream = tiny_stream(n_tasks=5)
    cfg = BMCConfig(n_experts=3, schedule="public", consolidation_epochs=1, buffer_size=20, memory_size=40, **FAST)
    plain = BMC(cfg).fit(stream)
    BMC(cfg).fit(stream, checkpoint_dir=tmp_path)
    events = []
    again = BMC(cfg).fit(stream, checkpoint_dir=tmp_path, resume=True, events=events.append)
    assert events[0] == {**events[0], "event": "resumed", "from_step": 3}  # nothing left to run
    np.testing.assert_allclose(again.cil_matrix, plain.cil_matrix, equal_nan=True)


# -- memory policy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, schedule, sets, kept", [
    # 2 new buffers of 50 per step, memory 60
    ("cap", "groups", [60, 60, 60], [[30, 30], [15] * 4, [10] * 6]),
    # keep: the new buffers in full + the kept memory; then ceil(60 / J) + 1 per buffer
    ("keep", "groups", [100, 62 + 100, 64 + 100], [[31, 31], [16] * 4, [11] * 6]),
    ("keep", "public", [50, 50 + 100, 63 + 100], [[50], [21] * 3, [13] * 5]),
    ("cap", "public", [50, 60, 60], [[50], [20] * 3, [12] * 5]),
])
def test_consolidation_set_and_kept_memory(policy, schedule, sets, kept):
    stream = tiny_stream(n_tasks=6, n=80)
    events = []
    cfg = BMCConfig(n_experts=2, memory_policy=policy, schedule=schedule, buffer_size=50, memory_size=60,
                    consolidation_epochs=0, **FAST)
    bmc = BMC(cfg)
    seen = []
    import bmc_fast.train.loop as loop
    real = loop.consolidate

    def spy(model, memory, *a, **k):
        seen.append([len(b) for b in memory.buffers])
        return real(model, memory, *a, **k)

    loop.consolidate = spy
    try:
        bmc.fit(stream, events=events.append)
    finally:
        loop.consolidate = real
    done = [e for e in events if e["event"] == "consolidation_done"]
    assert [e["consolidation_set"] for e in done] == sets
    assert [sum(s) for s in seen] == sets
    assert [e["memory"] for e in done] == [sum(k) for k in kept]
    assert [len(b) for b in bmc.memory.buffers] == kept[-1]


def test_keep_cuts_to_nested_random_subsets():
    g = torch.Generator().manual_seed(0)
    assert keep_quota(3, 60) == 21 and keep_quota(7, 60) == 10 and keep_quota(1, 60) == 61
    mem = Memory().with_buffers(buffers([50, 50, 5]))
    before = [set(map(tuple, b.x.tolist())) for b in mem.buffers]
    mem.cut(keep_quota(3, 60), g)
    assert [len(b) for b in mem.buffers] == [21, 21, 5]
    mid = [set(map(tuple, b.x.tolist())) for b in mem.buffers]
    assert all(m <= b for m, b in zip(mid, before)) and mid[2] == before[2]
    mem.cut(10, g)
    assert all(set(map(tuple, b.x.tolist())) <= m for b, m in zip(mem.buffers, mid))
    assert len(mem) == 25 and mem.starts == [0, 10, 20, 25]


def test_buffer_count():
    assert buffer_count(1000, 100, 64) == 100 and buffer_count(1000, 100, 64, public=True) == 101
    assert buffer_count(100, 200, 64) == 100 and buffer_count(100, 200, 64, public=True) == 64  # one drop_last pass
    assert buffer_count(50, 200, 64, public=True) == 50  # smaller than a batch: everything
    assert buffer_count(100, 0.5, 64) == 50 and buffer_count(1000, 0.5, 64, public=True) == 501


def test_public_buffer_count_in_the_experts_buffers():
    stream = tiny_stream(n_tasks=2, n=80)
    for public, size, want in [(False, 50, 50), (True, 50, 51), (True, 70, 64), (False, 70, 70)]:
        cfg = BMCConfig(n_experts=2, buffer_size=size, public_buffer_count=public, **FAST)
        arts = train_experts(ResMLP(stream.input_dim, stream.num_classes), stream, [0, 1], cfg, step_index=0)
        assert [len(a.buffer) for a in arts] == [want, want]


# -- consolidation details -------------------------------------------------------------------------

def test_weighted_sampler_draws_with_replacement_an_equal_share_per_buffer():
    mem = Memory(buffers([10, 100, 1000]))
    g = torch.Generator().manual_seed(0)
    epoch = mem.weighted_indices(64, g)
    assert epoch.shape == (len(mem) // 64, 64)  # the ragged last batch is dropped
    small = epoch[mem.buffer_id[epoch] == 0]
    assert len(small) > 10 and len(small.unique()) <= 10  # drawn with replacement
    draws = torch.cat([mem.weighted_indices(64, g).reshape(-1) for _ in range(50)])
    share = mem.buffer_id[draws].bincount(minlength=3).double() / len(draws)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01, rtol=0)
    # within a buffer every sample is equally likely: the 10 samples of buffer 0 about 1/10 each
    within = draws[mem.buffer_id[draws] == 0].bincount(minlength=10).double()
    torch.testing.assert_close(within / within.sum(), torch.full((10,), 0.1, dtype=torch.float64), atol=0.02, rtol=0)
    assert Memory(buffers([10])).weighted_indices(64, g).shape == (0, 64)


@pytest.mark.parametrize("how", ["buffers", "pooled", "public"])
def test_validation_split(how):
    mem = Memory(buffers([7, 50, 120]), new=1)
    train, val, order = mem.split(0.2, torch.Generator().manual_seed(1), how=how)
    rows = lambda m: sorted(map(tuple, m.x.tolist()))  # noqa: E731
    assert sorted(rows(train) + rows(val)) == rows(mem) and not set(rows(train)) & set(rows(val))
    if how == "buffers":
        assert [len(b) for b in val.buffers] == [round(0.2 * n) for n in (7, 50, 120)]
    else:
        assert len(val) == math.ceil(0.2 * len(mem))
    assert sorted(order.tolist()) == list(range(len(val)))  # every validation row once
    ids = val.buffer_id[order].tolist()
    assert ids != sorted(ids)  # in the order drawn: validation batches mix the buffers
    for b in train.buffers + val.buffers:  # labels and ranges travel with their rows
        assert (b.y == b.offset).all()


def test_buffers_split_drops_a_buffer_left_empty():
    mem = Memory(buffers([1, 5]))
    train, val, _ = mem.split(0.6, torch.Generator().manual_seed(0), how="buffers")
    assert [len(b) for b in train.buffers] == [2] and [len(b) for b in val.buffers] == [1, 3]
    assert train.balanced_indices(4, torch.Generator().manual_seed(0)).shape == (1, 4)  # samples only what exists


def test_pooled_split_drops_a_buffer_left_empty():
    mem = Memory(buffers([1, 1, 1, 1, 1]))
    train, val, _ = mem.split(0.5, torch.Generator().manual_seed(0), how="pooled")
    assert len(val) == 3 and len(train) == 2 and train.num_buffers == 2 and val.num_buffers == 3


@pytest.mark.parametrize("sizes,new", [([51, 51, 51, 51, 576], 1), ([64, 64, 384], 1), ([30, 40, 50, 60], 2),
                                       ([64], 1), ([20, 33], 0)])
def test_public_split_is_the_public_random_split(sizes, new):
    """The public code holds out ``random_split(ConcatDataset(new buffers + memory), [n - k, k],
    generator=torch.Generator().manual_seed(42))``'s second part and validates on it in order;
    its buffers hold their rows in a random order. So the buffer of every validation row, in
    order, is fixed by the sizes; the rows themselves vary with the seed."""
    mem = Memory(buffers(sizes), new=new)
    first = len(sizes) - new
    owner = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])  # each row's buffer, our layout
    listed = torch.utils.data.ConcatDataset([owner[mem.starts[first]:], owner[:mem.starts[first]]])  # public order
    k = math.ceil(0.2 * len(mem))
    _, public_val = torch.utils.data.random_split(listed, [len(mem) - k, k],
                                                  generator=torch.Generator().manual_seed(42))
    expected = [int(public_val[i]) for i in range(k)]
    held = []
    for seed in range(3):
        _, val, order = mem.split(0.2, torch.Generator().manual_seed(seed), how="public")
        assert val.buffer_id[order].tolist() == [sorted(set(expected)).index(j) for j in expected]
        assert [b.task for b in val.buffers] == sorted(set(expected))
        held.append(sorted(map(tuple, val.x.tolist())))
    if min(sizes) > 1:
        assert held[0] != held[1] or held[0] != held[2]  # which rows: drawn per seed


def test_memory_marks_the_new_buffers_until_it_is_cut():
    mem = Memory(buffers([5, 6]))
    both = mem.with_buffers(buffers([7])[:1])
    assert both.new == 1 and both.num_buffers == 3 and Memory(buffers([3])).new == 0
    g = torch.Generator().manual_seed(0)
    mem.add(buffers([4, 4]), cap=9, generator=g)
    assert mem.new == 2 and mem.num_buffers == 4
    both.cut(2, g)
    assert both.new == 0  # what is kept: no buffer is new to the next consolidation
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match="Memory: new must be an int in"):
            Memory(buffers([5, 6]), new=bad)


def test_consolidation_validates_in_the_order_the_public_split_drew(monkeypatch):
    import bmc_fast.train.consolidation as cons
    from bmc_fast.train import seeding

    mem = Memory(buffers([40, 40, 150], d=4), new=1)
    cfg = BMCConfig.preset("parity", consolidation_epochs=1, progress=False, threads=1)
    seen = []
    monkeypatch.setattr(cons, "_validation_loss",
                        lambda model, val, spec, cfg, nc, known, order=None: seen.append(order) or 1.0)
    cons.consolidate(ResMLP(4, 6, inner=8, fused=False), mem, cfg, 6, step_index=3)
    _, _, expected = mem.split(0.2, seeding.generator(cfg.seed, "consolidation", 3), how="public")
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def _batch(rows):
    """A memory minibatch of buffers over the classes [0, 2), [2, 5), [5, 7), [7, 9) (task t: 2..3
    classes) holding the given (task, local label) rows."""
    ranges = [(0, 2), (2, 3), (5, 2), (7, 2)]
    off = torch.tensor([ranges[t][0] for t, _ in rows])
    ln = torch.tensor([ranges[t][1] for t, _ in rows])
    y = torch.tensor([ranges[t][0] + c for t, c in rows])
    return {"y": y, "offset": off, "length": ln, "features": torch.zeros(len(rows), 3),
            "buffer_id": torch.tensor([t for t, _ in rows])}


@pytest.mark.parametrize("rows, lo, hi", [
    ([(1, 0), (3, 1), (1, 2)], 2, 9),   # tasks 1 and 3: task 2's classes inside the slice too
    ([(0, 1), (2, 0)], 0, 7),
    ([(2, 1), (2, 0), (2, 1)], 5, 7),   # one task: its own range
])
@pytest.mark.parametrize("ops", [bmc_fast, reference], ids=["fused", "reference"])
def test_span_ce_is_the_ce_on_the_sliced_logits(rows, lo, hi, ops):
    b = _step_batch(_batch(rows), "span", seen=9)
    assert (b["ce_offset"] == lo).all() and (b["ce_len"] == hi - lo).all()
    logits = torch.randn(len(rows), 11, dtype=torch.float64, requires_grad=True)
    got = ops.task_masked_cross_entropy(logits, b["labels"], b["ce_offset"], b["ce_len"], reduction="mean")
    want = F.cross_entropy(logits[:, lo:hi], b["labels"] - lo)
    torch.testing.assert_close(got, want)
    g1, = torch.autograd.grad(got, logits)
    g2, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2)


class _Linear(torch.nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.fc = torch.nn.Linear(d, c)

    def forward(self, x):
        return self.fc(x), x


def test_span_validation_loss_is_the_mean_over_batches():
    bufs = [Buffer(torch.randn(n, 4), torch.full((n,), o) + torch.arange(n) % ln, o, ln, torch.randn(n, 3), task=i)
            for i, (n, o, ln) in enumerate([(30, 0, 2), (25, 2, 3), (15, 5, 2)])]
    val = Memory(bufs)  # 70 rows over the classes [0, 2), [2, 5), [5, 7)
    model = _Linear(4, 9)
    cfg = BMCConfig(consolidation_batch_size=32, consolidation_ce="span", distill_coef=0.0, progress=False)
    spec = consolidation_loss(cfg, val)
    # in buffer order the batches of 32, 32, 6 rows span [0, 5), [2, 7), [5, 7); in another order, others
    for order, spans in [(None, [(0, 5), (2, 7), (5, 7)]), (torch.arange(69, -1, -1), [(2, 7), (0, 5), (0, 2)])]:
        rows = torch.arange(70) if order is None else order
        want = []
        for idx, (lo, hi) in zip(rows.split(32), spans):
            assert (int(val.offset[idx].min()), int((val.offset + val.length)[idx].max())) == (lo, hi)
            with torch.no_grad():
                want.append(float(F.cross_entropy(model(val.x[idx])[0][:, lo:hi], val.y[idx] - lo)))
        got = _validation_loss(model, val, spec, cfg, 9, seen=7, order=order)
        assert got == pytest.approx(sum(want) / 3, rel=1e-6)


@pytest.mark.parametrize("kind, alpha", [("uniform", 0.4), ("uniform", 1.0), ("beta", 0.4)])
def test_mixup_weight(kind, alpha):
    # Inputs e_0..e_{B-1}: mixed row i is lam * e_i + (1 - lam) * e_perm(i), so the diagonal holds
    # lam wherever perm(i) != i (and 1 at a fixed point).
    b, lams = 16, []

    def forward(x, seeds=None, first_model=0):
        lams.append(float(x.diagonal().min()))
        return torch.zeros(b, 2, requires_grad=True), x

    step = AutogradStep(forward, None, LossSpec(mixup_alpha=alpha, mixup=kind), reference, "test",
                        mixup_generator=np.random.default_rng(0))
    batch = {"labels": torch.zeros(b, dtype=torch.long), "ce_offset": torch.zeros(b, dtype=torch.long),
             "ce_len": torch.full((b,), 2)}
    for _ in range(1000):
        step.loss_value(torch.eye(b), batch)
    lam = np.array(lams)
    if kind == "uniform":  # U(1 - alpha, 1): its whole range, evenly
        assert lam.min() >= 1 - alpha - 1e-6 and lam.max() <= 1
        assert lam.min() < 1 - alpha + 0.01 and lam.max() > 0.99
        assert abs(lam.mean() - (1 - alpha / 2)) < 0.015
        assert abs(np.mean(lam < 1 - alpha / 2) - 0.5) < 0.05
    else:  # Beta(0.4, 0.4): symmetric about 1/2, most mass near 0 and 1
        assert abs(lam.mean() - 0.5) < 0.04 and np.mean(lam < 0.6) > 0.4


def test_mixup_options_are_checked():
    with pytest.raises(ValueError, match="mixup"):
        LossSpec(mixup_alpha=0.4, mixup="gauss")
    with pytest.raises(ValueError, match="mixup_alpha"):
        BMCConfig(mixup="uniform", mixup_alpha=1.5, distill_coef=0.0)
    for name in ("memory_policy", "schedule", "consolidation_sampler", "val_split", "consolidation_ce", "mixup"):
        with pytest.raises(ValueError, match=f"BMCConfig.{name}"):
            BMCConfig(**{name: "nope"})
    with pytest.raises(ValueError, match="public_buffer_count"):
        BMCConfig(public_buffer_count=1)


# -- the preset ------------------------------------------------------------------------------------

PARITY = dict(n_experts=1, schedule="public", memory_policy="keep", public_buffer_count=True, stability_coef=0.0,
              distill_coef=0.0, kd_coef=0.0, mixup="uniform", mixup_alpha=0.4, consolidation_sampler="weighted",
              consolidation_ce="span", val_fraction=0.2, val_split="public", lr_patience=10, full_head=True,
              consolidation_lr=0.01)


def test_parity_preset_fields_and_docstring():
    paper, parity = BMCConfig.preset("paper"), BMCConfig.preset("parity")
    assert {k: getattr(parity, k) for k in PARITY} == PARITY
    # the public code's values the paper preset shares
    assert (parity.lr, parity.consolidation_lr, parity.weight_decay, parity.epochs, parity.consolidation_epochs,
            parity.batch_size, parity.consolidation_batch_size, parity.buffer_size, parity.memory_size,
            parity.dropout, parity.early_stopping, parity.task_coef) == \
        (0.01, 0.01, 0.01, 20, 100, 64, 64, 10000, 10000, 0.3, 0, 1.0)
    assert (paper.memory_policy, paper.schedule, paper.consolidation_sampler, paper.consolidation_ce, paper.mixup,
            paper.val_split, paper.public_buffer_count) == ("keep", "groups", "balanced", "seen", "beta", "buffers",
                                                            False)
    differ = [k for k in PARITY if getattr(paper, k) != getattr(parity, k)] + ["backbone_inner"]
    doc = BMCConfig.preset.__doc__
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:  # named in the README too
        readme = f.read()
    for text in (doc, readme):
        assert all(f"{k}=" in text for k in differ), [k for k in differ if f"{k}=" not in text]
        # the choices by name, with their values
        named = [f'{k}="{getattr(parity, k)}"' for k in differ if isinstance(getattr(parity, k), str)]
        assert named and all(n in text for n in named), [n for n in named if n not in text]
    # the memory policy is a choice in every preset
    assert BMCConfig.preset("paper", memory_policy="cap").memory_policy == "cap"
    assert BMCConfig.preset("parity", memory_policy="cap").memory_policy == "cap"


def test_parity_preset_trains_with_every_option():
    stream = tiny_stream(n_tasks=4, n=96)
    events = []
    cfg = BMCConfig.preset("parity", n_experts=2, buffer_size=40, memory_size=50, consolidation_epochs=2, **FAST)
    res = BMC(cfg).fit(stream, events=events.append)
    kinds = {e["kind"] for e in events if e["event"] == "consolidation_step"}
    assert kinds == {"fused"}  # the one-call step, mixup included
    vals = [e["val_loss"] for e in events if e["event"] == "consolidation_epoch"]
    assert len(vals) == 2 * 2 and all(np.isfinite(vals))  # steps {0}, {1, 2}; {3} never consolidated
    assert res.step_starts == [0, 1, 3]
    assert 0 <= res.final_cil_accuracy <= 1


def test_parity_backbone_has_the_public_codes_block_widths():
    """The public ResMLP's blocks go 128 -> 128 -> 256 and 256 -> 128 -> 256 (fc1 to 128 inside);
    such a model trains through the fused kernels, as paper's does."""
    from bmc_fast import BMC
    from bmc_fast.backbone import fused_path_available

    model = BMC(BMCConfig.preset("parity")).model_fn(64, 10)
    shapes = [(b.fc1.in_features, b.fc1.out_features, b.fc2.out_features, b.short.out_features)
              for b in (model.block1, model.block2)]
    assert shapes == [(128, 128, 256, 256), (256, 128, 256, 256)]
    x = torch.randn(8, 64)
    assert fused_path_available(model, x)
    assert fused_path_available(BMC(BMCConfig.preset("paper")).model_fn(64, 10), x)
    logits, feats = model(x)
    logits.sum().backward()
    assert logits.shape == (8, 10) and feats.shape == (8, 256) and model.block1.fc1.weight.grad is not None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "128"])
def test_backbone_inner_is_checked(bad):
    with pytest.raises(ValueError, match="BMCConfig.backbone_inner must be None or an int >= 1"):
        BMCConfig(backbone_inner=bad)
