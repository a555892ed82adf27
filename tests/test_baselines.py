"""The baselines (ER, DER++, LwF, GDumb, finetune, joint): each one's defining behaviour, the
buffers' sampling, seeding, and a tiny run of each on the embedded digits stream."""
import copy
import math

import numpy as np
import pytest
import torch

from bmc_fast import BMCConfig, ResMLP
from bmc_fast.data import TaskStream, demo_stream
from bmc_fast.train import baselines, seeding
from bmc_fast.train.step import LossSpec, adamw, build_step

TINY = dict(epochs=1, batch_size=32, consolidation_epochs=1, memory_size=100, progress=False)


def small_model(d, c):
    return ResMLP(d, c, hidden=32, width=64)


@pytest.fixture(scope="module")
def digits():
    return demo_stream()


@pytest.fixture(scope="module")
def three(digits):
    return TaskStream(list(digits)[:3])


class Recorder:
    """Wraps the baselines' build_step and evaluate_rows: every training batch with its task and
    LossSpec, each step's model as the step builder received it, and a copy of the model after
    every task."""

    def __init__(self, monkeypatch):
        self.task, self.batches, self.initial, self.after = 0, [], [], []
        real_build, real_eval = baselines.build_step, baselines.evaluate_rows
        rec = self

        class Step:
            def __init__(self, step, spec):
                self._step, self._spec = step, spec

            def __getattr__(self, name):
                return getattr(self._step, name)

            def __call__(self, x, batch, seeds=None, first_model=0):
                rec.batches.append((rec.task, self._spec, x.clone(),
                                    {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}))
                return self._step(x, batch, seeds, first_model)

        def build(model, opt, spec, cfg, x, **kw):
            self.initial.append((self.task, model, copy.deepcopy(model.state_dict())))
            return Step(real_build(model, opt, spec, cfg, x, **kw), spec)

        def evaluate(model, stream, rows, *a, **k):
            self.after.append(copy.deepcopy(model).eval())
            self.task += 1
            return real_eval(model, stream, rows, *a, **k)

        monkeypatch.setattr(baselines, "build_step", build)
        monkeypatch.setattr(baselines, "evaluate_rows", evaluate)


def _rows_in(rows: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether every row of ``rows`` is a row of ``table``."""
    return bool((rows[:, None, :] == table[None, :, :]).all(-1).any(1).all())


# -- buffers --------------------------------------------------------------------------------------

def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    n, cap, trials = 600, 30, 1500
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(n, dtype=torch.long)
    sizes = [32, 7, 64, 1, 50]  # uneven batches: the sample must not depend on how items arrive
    for _ in range(trials):
        buf = baselines.ReservoirBuffer(cap, g)
        start, k = 0, 0
        while start < n:
            b = min(sizes[k % len(sizes)], n - start)
            ids = torch.arange(start, start + b)
            buf.add(ids[:, None].double(), ids)
            start, k = start + b, k + 1
        assert buf.seen == n and len(buf) == cap
        kept = buf.y[:cap]
        assert len(set(kept.tolist())) == cap  # distinct items, each stored once
        assert torch.equal(buf.x[:cap, 0].long(), kept)
        counts[kept] += 1
    p = cap / n
    mean, sd = trials * p, math.sqrt(trials * p * (1 - p))
    # each position: inclusion frequency cap / n (6 standard deviations: a false alarm ~1e-6)
    assert (counts.double() - mean).abs().max() < 6 * sd, (counts.min(), counts.max(), mean)
    # ten blocks of consecutive positions (early vs late items): much tighter in relative terms
    blocks = counts.reshape(10, -1).sum(1).double()
    bmean, bsd = mean * n / 10, sd * math.sqrt(n / 10)
    assert (blocks - bmean).abs().max() < 5 * bsd, blocks
    # the whole histogram: Pearson's statistic near its chi-square(n - 1) mean
    chi2 = float(((counts.double() - mean) ** 2 / (trials * p)).sum())
    assert chi2 < (n - 1) + 6 * math.sqrt(2 * (n - 1)), chi2


@pytest.mark.parametrize("batch", [1, 5])
def test_reservoir_is_uniform_on_a_short_stream(batch):
    # where an off-by-one in the replacement draw shows most: 5 items, 2 slots, P = 2/5 each
    g = torch.Generator().manual_seed(99)
    trials, counts = 3000, torch.zeros(5)
    for _ in range(trials):
        buf = baselines.ReservoirBuffer(2, g)
        for s in range(0, 5, batch):
            ids = torch.arange(s, min(s + batch, 5))
            buf.add(ids[:, None].float(), ids)
        counts[buf.y[:2]] += 1
    sd = math.sqrt(0.4 * 0.6 / trials)
    assert ((counts / trials - 0.4).abs() < 5 * sd).all(), counts / trials


def test_reservoir_fills_in_order_then_keeps_later_items_of_a_batch():
    buf = baselines.ReservoirBuffer(4, torch.Generator().manual_seed(0))
    buf.add(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    assert len(buf) == 3 and buf.y[:3].tolist() == [0, 1, 2]
    x = torch.arange(200, dtype=torch.float32)[:, None].repeat(1, 2)
    buf.add(x[3:], torch.arange(3, 200))  # one batch over many slots: sequential semantics
    assert len(buf) == 4 and buf.seen == 200
    assert torch.equal(buf.x[:4, 0].long(), buf.y[:4])  # x and y of a slot stay one sample
    with pytest.raises(ValueError, match="capacity"):
        baselines.ReservoirBuffer(0, torch.Generator())


def test_balanced_buffer_is_greedy_and_class_balanced():
    g = torch.Generator().manual_seed(0)
    buf = baselines.BalancedBuffer(20, 6, g)
    # task 0: classes 0 and 1, class 1 rarer than its quota; task 1: classes 2..5
    y0 = torch.tensor([0] * 30 + [1] * 4)
    x0 = torch.arange(34.0)[:, None]
    buf.add(x0, y0)
    assert buf.counts[:2] == [16, 4]  # class 1 keeps all it has; class 0 the free slots
    assert buf.y[:20].tolist().count(1) == 4 and _rows_in(x0[30:], buf.x[:20])
    y1 = torch.arange(2, 6).repeat(20)[torch.randperm(80, generator=g)]
    x1 = 100 + torch.arange(80.0)[:, None]
    buf.add(x1, y1)
    counts = torch.bincount(buf.y[:len(buf)], minlength=6).tolist()
    assert counts == buf.counts and len(buf) == 20
    assert min(counts) >= 20 // 6, counts  # every class at least its quota
    for c in range(6):  # a slot keeps its sample's input and label together
        xs = buf.x[:20][buf.y[:20] == c]
        src = x0[y0 == c] if c < 2 else x1[y1 == c]
        assert _rows_in(xs, src)


# -- ER -------------------------------------------------------------------------------------------

def test_er_joins_every_batch_with_an_equal_draw_from_the_buffer(three, monkeypatch):
    draws = []

    class Buffer(baselines.ReservoirBuffer):
        def sample(self, n, generator):
            j = super().sample(n, generator)
            draws.append((n, len(self), self.x[j].float().clone()))
            return j

    monkeypatch.setattr(baselines, "ReservoirBuffer", Buffer)
    rec = Recorder(monkeypatch)
    cfg = BMCConfig(**{**TINY, "memory_size": 50})
    res = baselines.er(three, cfg, small_model, buffer="reservoir")
    assert len(draws) == len(rec.batches) - 1  # every step but the first replays
    presented = torch.empty(0, three.input_dim)
    for k, (task, spec, x, batch) in enumerate(rec.batches):
        assert spec == LossSpec()
        rep = draws[k - 1][2] if k else x[:0]
        b = len(x) - len(rep)
        if k:
            n, size, _ = draws[k - 1]
            assert n == b and len(rep) == min(b, size)  # as many as the current rows, if stored
            assert torch.equal(x[b:], rep) and _rows_in(rep, presented)
        seen = three.offsets[task] + three[task].num_classes
        assert (batch["ce_offset"] == 0).all() and (batch["ce_len"] == seen).all()  # the classes seen
        presented = torch.cat([presented, x[:b]])
    assert res.method == "er" and res.config["baseline"]["steps"] == ["fused"] * 3


# -- DER++ ----------------------------------------------------------------------------------------

def _derpp_step(alpha=0.3, beta=0.7):
    model = ResMLP(8, 6, hidden=8, width=16).train()
    cfg = BMCConfig(progress=False)
    return baselines.DerppStep(model, adamw(model.parameters(), 1e-3, 0.0), cfg, torch.randn(10, 8), alpha, beta)


def test_derpp_logit_term_is_the_mse_to_the_stored_logits():
    step = _derpp_step()
    b, m, c = 4, 3, 6
    g = torch.Generator().manual_seed(0)
    cur, fit, rep = torch.randn(b, c, generator=g), torch.randn(m, c, generator=g), torch.randn(m, c, generator=g)
    rows = torch.cat([cur, fit, rep])
    step.forward = lambda x, seeds, first: (rows[:len(x)].clone().requires_grad_(), None)  # "the model"
    y = torch.tensor([4, 5, 4, 5, 0, 3, 1])
    batch = {"labels": y, "ce_offset": torch.zeros(7, dtype=torch.long), "ce_len": torch.full((7,), 6),
             "target_logits": fit.clone(), "sizes": (b, m)}
    terms, out = step.terms(torch.zeros(b + 2 * m, 8), batch)
    assert float(terms["logit_mse"].detach()) == 0.0  # the model still outputs the stored logits
    assert torch.equal(out, cur)
    delta = torch.randn(m, c, generator=g)
    terms, _ = step.terms(torch.zeros(b + 2 * m, 8), {**batch, "target_logits": fit + delta})
    torch.testing.assert_close(terms["logit_mse"], delta.pow(2).mean())
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(terms["ce"], ce(cur, y[:b]))
    torch.testing.assert_close(terms["replay_ce"], ce(rep, y[b:]))
    torch.testing.assert_close(step.loss(terms), ce(cur, y[:b]) + 0.3 * delta.pow(2).mean() + 0.7 * ce(rep, y[b:]))
    # without replayed rows only the current CE is left
    terms, _ = step.terms(torch.zeros(b, 8), {**batch, "labels": y[:b], "ce_offset": batch["ce_offset"][:b],
                                              "ce_len": batch["ce_len"][:b], "target_logits": None,
                                              "sizes": (b, 0)})
    assert terms["logit_mse"] is None and torch.equal(step.loss(terms), terms["ce"])


def test_derpp_stores_each_samples_logits_once_and_replays_them(three, monkeypatch):
    made, returned = [], []

    class Buffer(baselines.ReservoirBuffer):
        def __init__(self, *a):
            super().__init__(*a)
            self.written, self.draws = None, []
            made.append(self)

        def add(self, x, y, logits=None):
            assert torch.equal(logits, returned[-1])  # the logits of the step that presented them
            super().add(x, y, logits)

        def _write(self, slots, x, y, logits, items):
            super()._write(slots, x, y, logits, items)
            if self.written is None:
                self.written = torch.full_like(self.logits, float("nan"))
            self.written[slots] = logits[items].float()  # what insertion wrote, and nothing else

        def sample(self, n, generator):
            j = super().sample(n, generator)
            self.draws.append(j)
            return j

    monkeypatch.setattr(baselines, "ReservoirBuffer", Buffer)
    replayed = []
    real_terms, real_call = baselines.DerppStep.terms, baselines.DerppStep.__call__

    def terms(self, x, batch, seeds=None):
        buf = made[0]
        if batch["target_logits"] is not None:  # this step's draws: logits first, labels second
            j1, j2 = buf.draws[-2], buf.draws[-1]
            assert torch.equal(batch["target_logits"], buf.logits[j1])
            assert torch.equal(batch["labels"][batch["sizes"][0]:], buf.y[j2])
        out = real_terms(self, x, batch, seeds)
        replayed.append(out[0]["logit_mse"] is not None)
        return out

    def call(self, x, batch, seeds=None):
        loss, logits = real_call(self, x, batch, seeds)
        returned.append(logits)
        return loss, logits

    monkeypatch.setattr(baselines.DerppStep, "terms", terms)
    monkeypatch.setattr(baselines.DerppStep, "__call__", call)
    last = []
    real_eval = baselines.evaluate_rows

    def evaluate(model, *a, **k):
        last.append(copy.deepcopy(model).eval())
        return real_eval(model, *a, **k)

    monkeypatch.setattr(baselines, "evaluate_rows", evaluate)
    res = baselines.derpp(three, BMCConfig(**{**TINY, "memory_size": 40}), small_model, buffer="reservoir")
    buf = made[0]
    assert replayed[1:] and all(replayed[1:]) and not replayed[0]  # the first step has nothing stored
    assert torch.equal(buf.written, buf.logits)  # never changed after insertion
    # not refreshed: the final model gives the stored samples other logits
    with torch.no_grad():
        now = last[-1](buf.x[:len(buf)].float())[0]
    assert (now - buf.logits).abs().amax(1).min() > 1e-4
    assert res.method == "derpp" and res.config["baseline"]["alpha"] == 0.3 and res.config["baseline"]["beta"] == 1.0


# -- LwF ------------------------------------------------------------------------------------------

def test_lwf_distils_the_previous_models_outputs_on_old_classes(three, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = BMCConfig(**TINY)
    baselines.lwf(three, cfg, small_model)
    assert len(rec.after) == 3
    by_task = {t: [(s, x, b) for tt, s, x, b in rec.batches if tt == t] for t in range(3)}
    for spec, x, batch in by_task[0]:
        assert spec.kd_coef == 0 and "teacher_logits" not in batch
    for t in (1, 2):
        o, n = three.task_range(t)
        for spec, x, batch in by_task[t]:
            assert spec.kd_coef == 1.0 and spec.kd_temperature == 2.0
            assert (batch["kd_offset"] == 0).all() and (batch["kd_len"] == o).all()  # the old classes
            assert (batch["ce_offset"] == o).all() and (batch["ce_len"] == n).all()  # the new task's CE
            with torch.no_grad():
                prev = rec.after[t - 1](x)[0]
            torch.testing.assert_close(batch["teacher_logits"], prev, rtol=1e-5, atol=1e-5)
            if t == 2:  # the model after the task just before, not an older one
                with torch.no_grad():
                    older = rec.after[0](x)[0]
                assert not torch.allclose(batch["teacher_logits"], older, atol=1e-3)
    # the target enters the loss: another previous model gives another loss
    spec, x, batch = by_task[1][0]
    student = copy.deepcopy(rec.after[0]).train()
    cfg = BMCConfig(progress=False, fused_step=False)
    step = build_step(student, adamw(student.parameters(), 1e-3, 0.0), spec, cfg, x)
    seeds = [1, 2]
    other = copy.deepcopy(rec.after[0])
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        other_logits = other(x)[0]
    same = [float(step.loss_value(x, batch, seeds).detach()) for _ in range(2)]
    changed = float(step.loss_value(x, {**batch, "teacher_logits": other_logits}, seeds).detach())
    assert same[0] == same[1] and abs(changed - same[0]) > 1e-4


# -- GDumb ----------------------------------------------------------------------------------------

def test_gdumb_trains_a_fresh_model_on_a_balanced_memory_only(digits, monkeypatch):
    made = []

    class Memory(baselines.BalancedBuffer):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)

    monkeypatch.setattr(baselines, "BalancedBuffer", Memory)
    rec = Recorder(monkeypatch)
    snapshots = []
    real_eval = baselines.evaluate_rows

    def evaluate(model, stream, rows, *a, **k):
        m = made[0]
        snapshots.append((torch.bincount(m.y[:len(m)], minlength=stream.num_classes).tolist(),
                          m.x[:len(m)].float().clone()))
        return real_eval(model, stream, rows, *a, **k)

    monkeypatch.setattr(baselines, "evaluate_rows", evaluate)
    cfg = BMCConfig(**{**TINY, "memory_size": 50, "consolidation_epochs": 2})
    res = baselines.gdumb(digits, cfg, small_model)
    with seeding.private_rng(seeding.derive(cfg.seed, "model_init")):
        fresh = small_model(digits.input_dim, digits.num_classes).state_dict()
    assert len(rec.initial) == len(digits)
    assert len({id(m) for _, m, _ in rec.initial}) == len(digits)  # a new model every task
    for _, _, state in rec.initial:  # each starts from the initial weights, not the last model's
        assert state.keys() == fresh.keys() and all(torch.equal(state[k], v) for k, v in fresh.items())
    for t, (counts, _) in enumerate(snapshots):
        seen = digits.offsets[t] + digits[t].num_classes
        assert sum(counts) == 50 and not any(counts[seen:])
        assert min(counts[:seen]) >= 50 // seen, counts  # every class seen holds its quota
    assert snapshots[-1][0][:10] == [5] * 10
    for task, spec, x, batch in rec.batches:
        assert _rows_in(x, snapshots[task][1])  # the memory is all it trains on
        assert (batch["ce_len"] == digits.offsets[task] + digits[task].num_classes).all()
    assert res.config["baseline"]["epochs"] == 2


# -- all of them ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["er", "derpp", "lwf", "gdumb", "finetune"])
def test_tiny_run_is_deterministic_leaves_the_rng_and_beats_chance(name, digits):
    f = baselines.BASELINES[name]
    cfg = BMCConfig(**TINY)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = f(digits, cfg, small_model)
    assert torch.equal(before, torch.get_rng_state())
    torch.manual_seed(8)  # another caller state: the same result
    b = f(digits, cfg, small_model)
    np.testing.assert_array_equal(a.cil_matrix, b.cil_matrix)
    np.testing.assert_array_equal(a.til_matrix, b.til_matrix)
    t = len(digits)
    assert a.method == name and a.step_starts == list(range(t))
    low = np.tril(np.ones((t, t), dtype=bool))
    assert np.isfinite(a.til_matrix[low]).all() and np.isnan(a.til_matrix[~low]).all()
    assert np.isfinite(a.cil_matrix[low]).all()
    # task-IL chance is 1/2 on the two-class digit tasks
    assert a.final_til_accuracy > 0.6, a.til_matrix[-1]
    assert a.timings["total_s"] > 0


@pytest.mark.parametrize("name", ["er", "lwf", "gdumb"])
def test_fused_and_autograd_steps_train_the_same(name, three):
    res = {}
    for fs in (True, False):
        cfg = BMCConfig(**TINY, fused_step=fs)
        res[fs] = baselines.BASELINES[name](three, cfg, small_model)
    assert res[True].config["baseline"]["steps"] == ["fused"] * 3
    assert all(s.startswith("autograd") for s in res[False].config["baseline"]["steps"])
    np.testing.assert_allclose(res[True].cil_matrix, res[False].cil_matrix, equal_nan=True)
    np.testing.assert_allclose(res[True].til_matrix, res[False].til_matrix, equal_nan=True)


def test_registry_and_bad_options(three):
    assert set(baselines.BASELINES) == {"finetune", "joint", "er", "derpp", "lwf", "gdumb"}
    cfg = BMCConfig(**TINY)
    with pytest.raises(ValueError, match="buffer"):
        baselines.er(three, cfg, small_model, buffer="fifo")
    with pytest.raises(ValueError, match="alpha"):
        baselines.derpp(three, cfg, small_model, alpha=-1)
    with pytest.raises(ValueError, match="temperature"):
        baselines.lwf(three, cfg, small_model, temperature=0)
    with pytest.raises(ValueError, match="ce"):
        baselines.lwf(three, cfg, small_model, ce="all")
    with pytest.raises(ValueError, match="epochs"):
        baselines.gdumb(three, cfg, small_model, epochs=-1)


def test_er_with_the_class_balanced_buffer(three, monkeypatch):
    made = []

    class Buffer(baselines.BalancedBuffer):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)

    monkeypatch.setattr(baselines, "BalancedBuffer", Buffer)
    res = baselines.er(three, BMCConfig(**{**TINY, "memory_size": 60}), small_model, buffer="balanced")
    assert res.config["baseline"]["buffer"] == "balanced" and np.isfinite(res.til_matrix[-1]).all()
    assert len(made) == 1 and made[0].counts[:6] == [10] * 6  # six classes seen, 60 slots


# -- buffers filled after each task ---------------------------------------------------------------

def test_task_end_buffer_keeps_an_even_random_share_of_every_task():
    g = torch.Generator().manual_seed(0)
    buf = baselines.TaskEndBuffer(10, "task", g)
    xs = [torch.arange(100 * t, 100 * t + n, dtype=torch.float32)[:, None] for t, n in enumerate([30, 4, 50])]
    ys = [torch.full((len(x),), t) for t, x in enumerate(xs)]
    buf.add_task(0, xs[0], ys[0])
    assert len(buf) == 10 and len(set(buf.x.flatten().tolist())) == 10
    assert _rows_in(buf.x, xs[0])
    held0 = set(buf.x.flatten().tolist())
    buf.add_task(1, xs[1], ys[1])  # 5 + 5 slots, but task 1 has only 4 rows
    assert torch.bincount(buf.y).tolist() == [5, 4] and set(buf.x[buf.y == 0].flatten().tolist()) <= held0
    buf.add_task(2, xs[2], ys[2])  # 4 + 3 + 3: the remainder to the oldest group
    assert torch.bincount(buf.y).tolist() == [4, 3, 3]
    for t in range(3):
        assert _rows_in(buf.x[buf.y == t], xs[t])
    # every row of a task is as likely to be kept
    counts = torch.zeros(30)
    for seed in range(600):
        b = baselines.TaskEndBuffer(5, "task", torch.Generator().manual_seed(seed))
        b.add_task(0, xs[0], ys[0])
        counts[b.x.flatten().long()] += 1
    assert counts.min() > 60 and counts.max() < 150  # expected 100 each


def test_class_end_buffer_balances_classes_and_keeps_logits_with_rows():
    g = torch.Generator().manual_seed(1)
    buf = baselines.TaskEndBuffer(12, "class", g)
    x = torch.arange(60, dtype=torch.float32)[:, None]
    y = torch.tensor([0] * 40 + [1] * 20)
    buf.add_task(0, x, y, logits=x.repeat(1, 3) * 2)
    assert torch.bincount(buf.y).tolist() == [6, 6]
    assert torch.equal(buf.logits, buf.x.repeat(1, 3) * 2)  # each row keeps its own logits
    buf.add_task(1, x + 100, torch.tensor([2] * 30 + [3] * 30), logits=(x + 100).repeat(1, 3) * 2)
    assert torch.bincount(buf.y).tolist() == [3, 3, 3, 3] and torch.equal(buf.logits, buf.x.repeat(1, 3) * 2)
    with pytest.raises(ValueError, match="logits"):
        buf.add_task(2, x, y + 4)
    with pytest.raises(ValueError, match="by"):
        baselines.TaskEndBuffer(4, "sample", g)


@pytest.mark.parametrize("buffer", ["task", "class"])
def test_er_task_end_buffers_replay_only_earlier_tasks(three, monkeypatch, buffer):
    rec = Recorder(monkeypatch)
    cfg = BMCConfig(**{**TINY, "memory_size": 66})
    res = baselines.er(three, cfg, small_model) if buffer == "class" else baselines.er(three, cfg, small_model,
                                                                                        buffer=buffer)
    assert res.config["baseline"]["buffer"] == buffer  # "class" is the default
    trained = {t: three[t].x_train.float() for t in range(3)}
    for task, spec, x, batch in rec.batches:
        seen = three.offsets[task] + three[task].num_classes
        y = batch["labels"]
        current = (y >= three.offsets[task]).sum()
        assert (y[:current] >= three.offsets[task]).all()  # the current rows first
        replayed = x[current:]
        if task == 0:
            assert len(replayed) == 0
        else:
            assert len(replayed) == current  # an equal draw: the memory holds 66 >= the batch
            assert (y[current:] < three.offsets[task]).all() and _rows_in(replayed, torch.cat(
                [trained[t] for t in range(task)]))
        assert (batch["ce_len"] == seen).all()


def test_derpp_task_end_buffer_stores_the_finished_models_logits(three, monkeypatch):
    made = []

    class Buffer(baselines.TaskEndBuffer):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)

    monkeypatch.setattr(baselines, "TaskEndBuffer", Buffer)
    after = []
    real_eval = baselines.evaluate_rows

    def evaluate(model, *a, **k):
        after.append(copy.deepcopy(model).eval())
        return real_eval(model, *a, **k)

    monkeypatch.setattr(baselines, "evaluate_rows", evaluate)
    res = baselines.derpp(three, BMCConfig(**{**TINY, "memory_size": 36}), small_model)  # buffer="class"
    buf = made[0]
    assert res.config["baseline"]["buffer"] == "class" and torch.bincount(buf.y).tolist() == [6] * 6
    for t in range(3):  # each task's rows hold the eval-mode logits of the model that finished it
        rows = (buf.y >= three.offsets[t]) & (buf.y < three.offsets[t] + three[t].num_classes)
        with torch.no_grad():
            torch.testing.assert_close(buf.logits[rows], after[t](buf.x[rows].float())[0])
            if t < 2:  # never refreshed: the last model gives them other logits
                assert not torch.allclose(buf.logits[rows], after[2](buf.x[rows].float())[0])


@pytest.mark.parametrize("method", ["er", "derpp"])
def test_optimizer_per_task_or_for_the_whole_stream(three, monkeypatch, method):
    made = []
    real = baselines.adamw

    def counting(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(baselines, "adamw", counting)
    cfg = BMCConfig(**TINY)
    res = baselines.BASELINES[method](three, cfg, small_model, optimizer="task")
    assert len(made) == 3 and res.config["baseline"]["optimizer"] == "task"  # a fresh AdamW per task
    made.clear()
    res = baselines.BASELINES[method](three, cfg, small_model, optimizer="stream")
    assert len(made) == 1 and res.config["baseline"]["optimizer"] == "stream"
    state = made[0].state_dict()["state"]
    # the moments kept counting over the three tasks' steps
    steps = sum(len(range(0, len(t.y_train), cfg.batch_size)) for t in three)
    assert all(int(s["step"]) in (steps, steps - 1, steps - 2, steps - 3) for s in state.values())
    with pytest.raises(ValueError, match="optimizer must be"):
        baselines.BASELINES[method](three, cfg, small_model, optimizer="global")
    assert baselines.BASELINES[method](three, cfg, small_model).config["baseline"]["optimizer"] == \
        {"er": "stream", "derpp": "task"}[method]  # the defaults chosen on validation data


def test_derpp_one_draw_serves_both_replay_terms():
    step = _derpp_step(alpha=0.3, beta=0.7)
    b, m, c = 4, 3, 6
    g = torch.Generator().manual_seed(1)
    cur, fit = torch.randn(b, c, generator=g), torch.randn(m, c, generator=g)
    rows = torch.cat([cur, fit])
    step.forward = lambda x, seeds, first: (rows[:len(x)].clone().requires_grad_(), None)
    y = torch.tensor([4, 5, 4, 5, 0, 3, 1])
    target = torch.randn(m, c, generator=g)
    batch = {"labels": y, "ce_offset": torch.zeros(7, dtype=torch.long), "ce_len": torch.full((7,), 6),
             "target_logits": target, "sizes": (b, m)}
    terms, _ = step.terms(torch.zeros(b + m, 8), batch)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(terms["logit_mse"], (fit - target).pow(2).mean())
    torch.testing.assert_close(terms["replay_ce"], ce(fit, y[b:]))  # the same rows' labels


def test_derpp_with_one_draw_replays_batches_of_twice_the_minibatch(three, monkeypatch):
    sizes = []
    real = baselines.DerppStep.terms

    def terms(self, x, batch, seeds=None):
        sizes.append((len(x), batch["sizes"]))
        return real(self, x, batch, seeds)

    monkeypatch.setattr(baselines.DerppStep, "terms", terms)
    res = baselines.derpp(three, BMCConfig(**{**TINY, "memory_size": 60}), small_model, draws=1)
    assert res.config["baseline"]["draws"] == 1
    replayed = [(n, bm) for n, bm in sizes if bm[1]]
    assert replayed and all(n == bm[0] + bm[1] for n, bm in replayed)
    with pytest.raises(ValueError, match="draws"):
        baselines.derpp(three, BMCConfig(**TINY), small_model, draws=3)
