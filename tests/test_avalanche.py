"""bmc_fast inside Avalanche (bmc_fast.integrations.avalanche): streams as benchmarks, Avalanche's
own strategies on a TaskStream, BMC as a strategy (the same model as BMC.fit), the loss plugins.
Skipped where the [avalanche] extra is not installed; CI runs them in an environment that has it."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

avalanche = pytest.importorskip("avalanche", reason="needs the [avalanche] extra: pip install \"bmc_fast[avalanche]\"")

from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

import bmc_fast  # noqa: E402
from bmc_fast import BMC, BMCConfig, ResMLP  # noqa: E402
from bmc_fast.data import Task, TaskStream  # noqa: E402
from bmc_fast.integrations import avalanche as av  # noqa: E402

CFG = dict(epochs=1, consolidation_epochs=1, memory_size=60, batch_size=32, consolidation_batch_size=32,
           progress=False, threads=None)


def _stream(tasks=4, classes=(2, 3, 2, 2), n=70, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        c = classes[t]
        centers = torch.randn(c, d, generator=g) * 2
        y = torch.randint(0, c, (n,), generator=g)
        yt = torch.randint(0, c, (30,), generator=g)
        out.append(Task(f"t{t}", centers[y] + torch.randn(n, d, generator=g), y,
                        centers[yt] + torch.randn(30, d, generator=g), yt, c))
    return TaskStream(out)


@pytest.fixture(scope="module")
def stream():
    return _stream()


def _accuracy_evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def test_benchmark_carries_global_class_ranges(stream):
    bench = av.benchmark_from_stream(stream)
    assert len(bench.train_stream) == len(bench.test_stream) == len(stream)
    for t, (train, test) in enumerate(zip(bench.train_stream, bench.test_stream)):
        o, n = stream.task_range(t)
        assert sorted(train.classes_in_this_experience) == list(range(o, o + n))
        x, y = av._experience_tensors(train)
        assert torch.equal(x, stream[t].x_train) and torch.equal(y, stream[t].y_train + o)
        assert len(test.dataset) == len(stream[t].y_test)
    with pytest.raises(TypeError, match="stream must be"):
        av.benchmark_from_stream([stream[0]])


def test_experience_rows_read_straight_from_tensors_or_item_by_item(stream, monkeypatch):
    exp = av.benchmark_from_stream(stream).train_stream[1]
    x, y = stream[1].x_train, stream[1].y_train + stream.offsets[1]

    class Experience:
        def __init__(self, dataset):
            self.dataset = dataset

    order = [5, 3, 60, 0, 7]
    views = {"plain": (exp.dataset, x, y),
             "subset": (exp.dataset.subset(order), x[order], y[order]),
             "transformed": (exp.dataset.replace_current_transform_group((lambda v: v * 2, None)), x * 2, y)}
    for name, (ds, ex, ey) in views.items():
        got = av._experience_tensors(Experience(ds))
        assert torch.equal(got[0], ex) and torch.equal(got[1], ey), name
    calls = []
    real = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: calls.append(1) or real(*a, **k))
    av._experience_tensors(Experience(views["subset"][0]))
    assert not calls  # a plain view of tensors is read without the item-by-item loader
    av._experience_tensors(Experience(views["transformed"][0]))
    assert calls


@pytest.mark.parametrize("name", av.STRATEGIES)
def test_avalanche_strategies_run_on_a_stream(stream, name):
    cfg = BMCConfig(**CFG)
    res = av.fit_strategy(name, stream, cfg)
    assert res.method == f"avalanche-{name}" and res.config["avalanche"]["version"] == avalanche.__version__
    for t in range(len(stream)):  # one row after every experience, the classes seen so far
        assert np.isfinite(res.cil_matrix[t, : t + 1]).all() and np.isnan(res.cil_matrix[t, t + 1:]).all()
    assert 0.0 <= res.final_cil_accuracy <= 1.0 and res.timings["train_s"] > 0
    # the caller's random state is left as it was
    state = torch.get_rng_state()
    av.fit_strategy(name, stream, cfg)
    assert torch.equal(state, torch.get_rng_state())


def test_avalanche_strategy_is_seeded(stream):
    cfg = BMCConfig(**CFG, seed=3)
    a, b = av.fit_strategy("replay", stream, cfg), av.fit_strategy("replay", stream, cfg)
    np.testing.assert_array_equal(a.cil_matrix, b.cil_matrix)
    with pytest.raises(ValueError, match="name must be one of"):
        av.fit_strategy("ewc", stream, cfg)


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bmc_strategy_trains_what_fit_trains(stream, k):
    cfg = BMCConfig(**CFG, n_experts=k)
    bmc = BMC(cfg)
    res = bmc.fit(stream)
    bench = av.benchmark_from_stream(stream)
    strategy = av.BMCStrategy(model=av.initial_model(cfg, stream.input_dim, stream.num_classes), config=cfg,
                              evaluator=_accuracy_evaluator())
    if k == 1:
        for e in bench.train_stream:  # one experience a call: K = 1
            strategy.train(e)
    else:
        strategy.train(bench.train_stream)  # the whole stream: steps of K
    assert _state_equal(strategy.model.module, bmc.model)  # bit for bit
    assert all(t.x_train.shape[0] == 1 for _, _, t in strategy._tasks)  # no experience's data kept
    metrics = strategy.eval(bench.test_stream)
    accs = [metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(len(stream))]
    np.testing.assert_allclose(accs, res.cil_matrix[-1], atol=1e-12)  # Avalanche's metric, our matrix


def test_bmc_strategy_save_and_load_continue_the_run(stream, tmp_path):
    cfg = BMCConfig(**CFG, n_experts=2)
    bench = av.benchmark_from_stream(stream)
    whole = av.BMCStrategy(model=av.initial_model(cfg, stream.input_dim, stream.num_classes), config=cfg)
    whole.train(bench.train_stream)
    first = av.BMCStrategy(model=av.initial_model(cfg, stream.input_dim, stream.num_classes), config=cfg)
    first.train(bench.train_stream[:2])
    first.save(str(tmp_path / "bmc.pt"))
    resumed = av.BMCStrategy(model=ResMLP(stream.input_dim, stream.num_classes), config=cfg)  # other weights: load replaces them
    resumed.load(str(tmp_path / "bmc.pt"))
    resumed.train(bench.train_stream[2:])
    assert _state_equal(resumed.model.module, whole.model.module)
    other = av.BMCStrategy(model=ResMLP(stream.input_dim, stream.num_classes), config=BMCConfig(**{**CFG, "memory_size": 61}))
    with pytest.raises(ValueError, match="different BMCConfig"):
        other.load(str(tmp_path / "bmc.pt"))


def test_bmc_strategy_refuses_streams_it_cannot_learn(stream):
    cfg = BMCConfig(**CFG)
    from avalanche.benchmarks import tensors_benchmark

    x = stream[0].x_train
    bench = tensors_benchmark(train_tensors=[(x, stream[0].y_train * 2)], test_tensors=[(x, stream[0].y_train)],
                              task_labels=[0])  # classes {0, 2}: not a contiguous range
    strategy = av.BMCStrategy(model=ResMLP(stream.input_dim, 10), config=cfg)
    with pytest.raises(ValueError, match=r"classes \[0, 2\], not the next contiguous range"):
        strategy.train(bench.train_stream[0])
    narrow = av.BMCStrategy(model=ResMLP(stream.input_dim, 3), config=cfg)
    with pytest.raises(ValueError, match="head has 3 classes"):
        narrow.train(av.benchmark_from_stream(stream).train_stream[:2])
    with pytest.raises(TypeError, match="config must be"):
        av.BMCStrategy(model=ResMLP(stream.input_dim, 3), config={"epochs": 1})


def test_bmc_strategy_on_a_benchmark_whose_class_ids_avalanche_remaps(stream):
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    x = torch.cat([t.x_train for t in stream][:2])
    y = torch.cat([t.y_train + o for t, o in zip(stream, stream.offsets)][:2])  # classes 0-4
    xt = torch.cat([t.x_test for t in stream][:2])
    yt = torch.cat([t.y_test + o for t, o in zip(stream, stream.offsets)][:2])
    bench = nc_benchmark(TensorDataset(x, y), TensorDataset(xt, yt), n_experiences=2, task_labels=False,
                         fixed_class_order=[3, 1, 4, 0, 2], per_exp_classes={0: 2},
                         class_ids_from_zero_from_first_exp=True)
    for e in bench.train_stream:  # the labels as the benchmark serves them, not the tensors' own
        xs, ys = av._experience_tensors(e)
        loader = torch.utils.data.DataLoader(e.dataset, batch_size=1000)
        lx, ly = [torch.cat(v) for v in zip(*[(b[0], b[1]) for b in loader])]
        assert torch.equal(xs, lx) and torch.equal(ys, ly)
    cfg = BMCConfig(**CFG, n_experts=2)
    strategy = av.BMCStrategy(model=ResMLP(stream.input_dim, 5), config=cfg, evaluator=_accuracy_evaluator())
    strategy.train(bench.train_stream)
    acc = strategy.eval(bench.test_stream)["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert acc > 0.5  # the data are separable clusters: right labels learn them


def test_bmc_strategy_refuses_a_group_before_changing_anything(stream):
    bench = av.benchmark_from_stream(stream)
    cfg = BMCConfig(**CFG, n_experts=2)
    strategy = av.BMCStrategy(model=av.initial_model(cfg, stream.input_dim, stream.num_classes), config=cfg)
    before = copy.deepcopy(strategy.model.module.state_dict())
    with pytest.raises(ValueError, match="not the next contiguous range"):
        strategy.train([bench.train_stream[0], bench.train_stream[2]])
    assert not strategy.is_training and not strategy._tasks
    assert all(torch.equal(v, before[k]) for k, v in strategy.model.module.state_dict().items())
    strategy.train(bench.train_stream[:2])  # the right group still trains
    with pytest.raises(ValueError, match="experience 1 was already learned"):
        strategy.train(bench.train_stream[1])
    with pytest.raises(TypeError, match="takes no 'optimizer'"):
        av.BMCStrategy(model=ResMLP(stream.input_dim, 9), config=cfg, optimizer=torch.optim.SGD([torch.zeros(1)], 0.1))
    logits_only = torch.nn.Sequential(torch.nn.Linear(stream.input_dim, 9))
    with pytest.raises(ValueError, match=r"must return \(logits \[N, C\], features \[N, D\]\), got Tensor"):
        av.BMCStrategy(model=logits_only, config=cfg).train(bench.train_stream[0])


# -- the loss plugins ---------------------------------------------------------------------------------

class _Loss(av.SupervisedPlugin):
    """Records strategy.loss before and after the plugins under test add their terms."""

    def __init__(self):
        super().__init__()
        self.pre, self.post, self.batches = [], [], []  # (callback-like names would confuse Avalanche)

    def before_backward(self, strategy, **kw):
        self.pre.append(float(strategy.loss.detach()))
        self.batches.append(strategy.mb_x.clone())


class _After(av.SupervisedPlugin):
    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def before_backward(self, strategy, **kw):
        self.rec.post.append(float(strategy.loss.detach()))


def _naive(stream, plugins, criterion=None, epochs=1):
    model = av.LogitsModel(ResMLP(stream.input_dim, stream.num_classes, fused=False))
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=criterion or
                 torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs, eval_mb_size=256,
                 plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))


def test_stability_plugin_acts_from_the_second_experience(stream):
    bench = av.benchmark_from_stream(stream)
    rec, plugin = _Loss(), av.StabilityPlugin(coef=0.5)
    strategy = _naive(stream, [rec, plugin, _After(rec)])
    strategy.train(bench.train_stream[0])
    assert rec.pre and rec.pre == rec.post  # nothing to keep on the first experience
    rec.pre.clear(), rec.post.clear()
    strategy.train(bench.train_stream[1])
    # lr 0 keeps the weights at the base's, but dropout makes the training features move: a positive term
    assert rec.pre and all(a > b for a, b in zip(rec.post, rec.pre))
    assert plugin.base is None  # released after the experience


def test_stability_plugin_term_matches_the_reference():
    torch.manual_seed(0)
    model = av.LogitsModel(ResMLP(6, 4, fused=False, dropout=0.0))
    plugin = av.StabilityPlugin(coef=2.0)

    class S:  # the attributes of a strategy the plugin reads
        pass

    s = S()
    s.model = model
    plugin.before_training_exp(s)
    plugin.before_training_exp(s)  # the second experience: a frozen base
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    s.mb_x = torch.randn(9, 6)
    model.eval()
    model(s.mb_x)
    s.loss = torch.tensor(1.0)
    plugin.before_backward(s)
    _, h_base = plugin.base.module(s.mb_x)
    expected = 1.0 + 2.0 * bmc_fast.reference.stability_loss(model.features[None], h_base[None])
    torch.testing.assert_close(s.loss, expected)
    with pytest.raises(ValueError, match="coef"):
        av.StabilityPlugin(coef=-1)


def test_batched_distillation_plugin_keeps_features_and_adds_the_loss(stream):
    bench = av.benchmark_from_stream(stream)
    plugin = av.BatchedDistillationPlugin(coef=1.5, mem_size=40, batch_size_mem=16)
    strategy = _naive(stream, [plugin])
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    buf = plugin.buffer
    assert torch.bincount(buf.y).tolist() == [20, 20]  # an even share per experience
    # the last experience's rows hold the eval-mode features of the model after it
    model = strategy.model.eval()
    last = buf.y == 1
    with torch.no_grad():
        model(buf.x[last])
    torch.testing.assert_close(buf.logits[last], model.features)

    class S:
        pass

    s = S()
    s.model, s.device, s.train_mb_size, s.loss = model, "cpu", 32, torch.tensor(0.0)
    g = plugin.generator.get_state()
    plugin.before_backward(s)
    plugin.generator.set_state(g)
    j = buf.sample(16, plugin.generator)
    with torch.no_grad():
        model(buf.x[j])
    ref = bmc_fast.reference.batched_distillation_loss(model.features, buf.logits[j], buf.y[j], 2)
    torch.testing.assert_close(s.loss, 1.5 * ref)
    with pytest.raises(ValueError, match="batch_size_mem"):
        av.BatchedDistillationPlugin(batch_size_mem=0)


def test_distillation_before_stability_keeps_the_minibatch_features(stream):
    bench = av.benchmark_from_stream(stream)
    rec = _Loss()
    strategy = _naive(stream, [av.BatchedDistillationPlugin(mem_size=40, batch_size_mem=16), av.StabilityPlugin(), rec])
    for e in bench.train_stream[:3]:  # 70 rows a task: a short last batch of 6
        strategy.train(e)
    assert rec.batches and all(np.isfinite(v) for v in rec.pre)


def test_task_masked_cross_entropy_criterion(stream):
    bench = av.benchmark_from_stream(stream)
    crit = av.TaskMaskedCrossEntropy()
    task = av.TaskMaskedCrossEntropy("task")
    strategy = _naive(stream, [task], criterion=crit)
    strategy.train(bench.train_stream[:3])  # classes 0-1, 2-4, 5-6 seen
    assert crit.seen == 7 and task.starts == [0, 2, 5]
    logits, y = torch.randn(6, stream.num_classes), torch.tensor([0, 1, 2, 4, 5, 6])
    torch.testing.assert_close(crit(logits, y), F.cross_entropy(logits[:, :7], y))
    ranges = [(0, 2), (0, 2), (2, 3), (2, 3), (5, 2), (5, 2)]
    expected = torch.stack([F.cross_entropy(logits[i:i + 1, o:o + n], y[i:i + 1] - o) for i, (o, n) in enumerate(ranges)])
    torch.testing.assert_close(task(logits, y), expected.mean())
    with pytest.raises(ValueError, match="classes must be"):
        av.TaskMaskedCrossEntropy("all")
