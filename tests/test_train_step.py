"""The whole training step in one C++ call (bmc_fast.backbone.train_step) against the autograd path."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bmc_fast import _ext
from bmc_fast.train import BMCConfig
from bmc_fast.train.consolidation import consolidate
from bmc_fast.data import Task, TaskStream
from bmc_fast.train.experts import train_experts
from bmc_fast.train.step import adamw
from bmc_fast.train.memory import Memory
from bmc_fast.backbone import ResMLP, fused_args, resmlp_train_forward
from bmc_fast.optim import AdamW
from bmc_fast.backbone.train_step import fused_train_step, unfused_reason
from bmc_fast.ops import (batched_distillation_loss, stability_loss, task_masked_cross_entropy,
                          task_masked_kd_loss)

pytestmark = pytest.mark.skipif(not _ext.HAVE_EXTENSION, reason="needs the compiled extension")


def make_stream(k=3, n=96, d=12, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(k):
        centers = torch.randn(c, d, generator=g) * 2
        y = torch.randint(0, c, (n,), generator=g)
        x = centers[y] + torch.randn(n, d, generator=g)
        tasks.append(Task(f"t{t}", x, y, x[:20], y[:20], c))
    return TaskStream(tasks)


def run(stream, fused_step, inner=None, **over):
    """Experts on every task, then a consolidation; returns (artifacts, consolidated base).
    ``inner``: the ResMLP's width inside its blocks (None: its width, 16)."""
    opts = dict(n_experts=len(stream), epochs=2, batch_size=16, consolidation_epochs=2, consolidation_batch_size=16,
                buffer_size=48, memory_size=120, keep_expert_states=True, progress=False, fused_step=fused_step)
    opts.update(over)
    cfg = BMCConfig(**opts)
    torch.manual_seed(0)
    base = ResMLP(stream.input_dim, stream.num_classes, hidden=8, width=16, inner=inner)
    arts = train_experts(base, stream, list(range(len(stream))), cfg, step_index=3, use_stability=True)
    mem = Memory()
    mem.add([a.buffer for a in arts], cfg.memory_size, torch.Generator().manual_seed(0))
    consolidate(base, mem, cfg, stream.num_classes, step_index=3)
    return arts, base


def assert_same(a, b):
    arts_a, base_a = a
    arts_b, base_b = b
    for x, y in zip(arts_a, arts_b):
        assert x.final_loss == pytest.approx(y.final_loss, rel=1e-5, abs=1e-6)
        for name in x.state:
            torch.testing.assert_close(x.state[name], y.state[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"expert {x.task} {n}: {m}")
        torch.testing.assert_close(x.buffer.features, y.buffer.features, rtol=1e-5, atol=1e-5)
    sa, sb = base_a.state_dict(), base_b.state_dict()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"base {n}: {m}")


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused steps taken (so a test knows the fused path ran)."""
    import bmc_fast.backbone.train_step as ts

    n = [0]
    real = ts.FusedTrainStep.__call__

    def counted(self, *a, **k):
        n[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(ts.FusedTrainStep, "__call__", counted)
    return n


@pytest.mark.parametrize("parallel", ["stacked", "sequential"])
def test_fused_step_trains_what_the_autograd_step_trains(parallel, calls):
    stream = make_stream()
    fused = run(stream, True, parallel=parallel)
    # 3 tasks x 2 epochs x 96 / 16 expert steps (one call for the stack, or one per expert), then
    # 2 consolidation epochs over 120 rows in batches of 16
    assert calls[0] == (12 if parallel == "stacked" else 36) + 16
    calls[0] = 0
    assert_same(fused, run(stream, False, parallel=parallel))
    assert calls[0] == 0


@pytest.mark.parametrize("parallel", ["stacked", "sequential"])
@pytest.mark.parametrize("inner", [8, 24])
def test_fused_step_trains_blocks_of_another_inner_width(parallel, inner, calls):
    # parity's ResMLP is 128 wide inside 256-wide blocks: the one-call step trains it too
    stream = make_stream(seed=2)
    fused = run(stream, True, inner=inner, parallel=parallel)
    assert calls[0] == (12 if parallel == "stacked" else 36) + 16
    assert fused[1].block1.fc1.weight.shape == (inner, 8) and fused[1].block2.fc2.weight.shape == (16, inner)
    assert_same(fused, run(stream, False, inner=inner, parallel=parallel))


@pytest.mark.parametrize("over", [
    dict(kd_coef=0.5, kd_temperature=3.0, consolidation_ce="task"),  # KD from the stored teacher logits
    dict(task_coef=0.7, distill_coef=2.5, stability_coef=0.3),       # scaled terms
    dict(distill_coef=0.0, stability_coef=0.0),                      # CE only
    dict(mixup_alpha=0.4, distill_coef=0.0, stability="weight"),     # experts through autograd, mixup fused
    dict(mixup_alpha=0.4, mixup="uniform", distill_coef=0.0, consolidation_ce="span",  # parity's consolidation
         consolidation_sampler="weighted", val_fraction=0.2, lr_patience=1),
], ids=["kd", "coefs", "ce-only", "mixup-weight", "parity-consolidation"])
def test_fused_step_with_every_loss_term(over, calls):
    stream = make_stream(seed=1)
    fused = run(stream, True, **over)
    # the experts' steps are fused, except weight stability's
    want = 16 if over.get("stability") == "weight" else 12 + 16
    if "consolidation_sampler" in over:  # weighted draws, last batch dropped, 20% held out: 2 x 96 // 16
        want = 12 + 2 * (96 // 16)
    assert calls[0] == want
    assert_same(fused, run(stream, False, **over))


# ---- the step called directly (its own loss description, no trainer) ------------------------------

def loss_spec(ce_scale=1.0, ce_reduction="mean", distill_coef=0.0, num_buffers=None, stability_coef=0.0, kd_coef=0.0,
              kd_temperature=None):
    """A loss description as FusedTrainStep reads it (the trainer passes its own object)."""
    return SimpleNamespace(ce_scale=ce_scale, ce_reduction=ce_reduction, distill_coef=distill_coef,
                           num_buffers=num_buffers, stability_coef=stability_coef, kd_coef=kd_coef,
                           kd_temperature=kd_temperature)


def ce_batch(y, off, ln, **more):
    return dict(labels=y, ce_offset=off, ce_len=ln, **more)


def _twins(c=3, seed=0):
    """Two ResMLPs with the same parameters (the fused step's and the autograd path's)."""
    torch.manual_seed(seed)
    m = ResMLP(12, c, hidden=8, width=16).train()
    m2 = copy.deepcopy(m)
    return m, m2


def test_fused_step_with_cumulative_batchnorm_momentum():
    torch.manual_seed(0)
    models = [ResMLP(12, 3, hidden=8, width=16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.momentum = None
        m.train()
    x, y = torch.randn(3, 16, 12), torch.randint(0, 3, (3, 16))
    off, ln = torch.zeros(16, dtype=torch.long), torch.full((16,), 3)
    opts = [AdamW(m.parameters(), lr=1e-2) for m in models]
    step = fused_train_step(models[0], fused_args(models[0]), opts[0], x[0], loss_spec())
    assert step is not None
    torch.manual_seed(5)
    for i in range(3):
        step(x[i], ce_batch(y[i], off, ln))
    torch.manual_seed(5)
    for i in range(3):
        logits, _ = models[1](x[i])
        opts[1].zero_grad()
        task_masked_cross_entropy(logits, y[i], off, ln).backward()
        opts[1].step()
    for (n, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert float(models[0].block1.bn1.num_batches_tracked) == 3


TERMS = {  # the loss description's terms and coefficients, each checked against the autograd formula
    "ce+distill": dict(ce_scale=0.5, distill_coef=2.0, num_buffers=3),
    "ce-sum+kd": dict(ce_reduction="sum", kd_coef=0.7, kd_temperature=3.0),
    "ce+stability": dict(ce_scale=1.5, stability_coef=0.3),
    "all": dict(ce_scale=0.25, distill_coef=0.5, num_buffers=3, stability_coef=2.0, kd_coef=1.5, kd_temperature=2.0),
}


@pytest.mark.parametrize("terms", list(TERMS))
def test_the_loss_description_reaches_the_step(terms):
    # Every field of the loss description changes the returned loss and the update as the
    # autograd formula with the same coefficients says.
    spec = loss_spec(**TERMS[terms])
    m, m2 = _twins(c=6)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g) + 3
    off, ln = torch.full((16,), 3), torch.full((16,), 3)
    teacher_f, ids = torch.randn(16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    base = torch.randn(1, 16, 16, generator=g)
    teacher_l = torch.randn(16, 6, generator=g) * 2
    batch = ce_batch(y, off, ln, teacher_features=teacher_f, buffer_id=ids, base_features=base,
                     teacher_logits=teacher_l, kd_offset=off, kd_len=ln)
    opt, opt2 = AdamW(m.parameters(), lr=1e-2), AdamW(m2.parameters(), lr=1e-2)
    step = fused_train_step(m, fused_args(m), opt, x, spec)
    got = step(x, batch, seeds=[7, 8])

    from bmc_fast.backbone import resmlp_train_forward
    logits, h = resmlp_train_forward(m2, fused_args(m2), x, seeds=[7, 8])
    want = spec.ce_scale * task_masked_cross_entropy(logits, y, off, ln, reduction=spec.ce_reduction)
    if spec.distill_coef:
        want = want + spec.distill_coef * batched_distillation_loss(h, teacher_f, ids, 3, reduction="mean")
    if spec.stability_coef:
        want = want + spec.stability_coef * stability_loss(h.view(base.shape), base, reduction="sum")
    if spec.kd_coef:
        want = want + spec.kd_coef * task_masked_kd_loss(logits, teacher_l, off, ln, spec.kd_temperature,
                                                         reduction="mean")
    assert got.shape == () and not got.requires_grad
    torch.testing.assert_close(got, want.detach())
    opt2.zero_grad()
    want.backward()
    opt2.step()
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        if n == "proj.bias":
            # Every path from it ends in a BatchNorm: its gradient is rounding noise, which differs
            # with the order the terms' gradients are added in, and AdamW scales noise to ~lr.
            assert (a - b).abs().max() <= 2.5e-2
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda msg, n=n: f"{n}: {msg}")
    # a term whose coefficient is 0 needs no tensors and adds nothing
    if terms == "all":
        only_ce = loss_spec(ce_scale=spec.ce_scale)
        step.loss = only_ce
        assert step.loss is only_ce
        m3 = copy.deepcopy(m)
        ce_only = fused_train_step(m3, fused_args(m3), AdamW(m3.parameters(), lr=1e-2), x, only_ce)
        a = step(x, ce_batch(y, off, ln), seeds=[1, 2])
        b = ce_only(x, ce_batch(y, off, ln), seeds=[1, 2])
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("term, key", [
    (dict(), "labels"), (dict(), "ce_offset"), (dict(), "ce_len"),
    (dict(distill_coef=1.0, num_buffers=2), "teacher_features"), (dict(distill_coef=1.0, num_buffers=2), "buffer_id"),
    (dict(stability_coef=0.5), "base_features"),
    (dict(kd_coef=1.0, kd_temperature=2.0), "teacher_logits"), (dict(kd_coef=1.0, kd_temperature=2.0), "kd_len"),
])
def test_a_missing_batch_tensor_is_named_and_changes_nothing(term, key):
    m, _ = _twins()
    opt = AdamW(m.parameters(), lr=1e-2)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    off, ln = torch.zeros(16, dtype=torch.long), torch.full((16,), 3)
    full = ce_batch(y, off, ln, teacher_features=torch.randn(16, 16), buffer_id=torch.randint(0, 2, (16,)),
                    base_features=torch.randn(1, 16, 16), teacher_logits=torch.randn(16, 3), kd_offset=off, kd_len=ln)
    step = fused_train_step(m, fused_args(m), opt, x, loss_spec(**term))
    step(x, full)
    before = {n: t.clone() for n, t in m.state_dict().items()}
    count = int(opt._caches[0].count)
    for batch in ({k: v for k, v in full.items() if k != key}, {**full, key: None}):
        with pytest.raises(ValueError, match=rf"the step's loss terms need batch\['{key}'\]"):
            step(x, batch)
    assert int(opt._caches[0].count) == count
    for n, t in m.state_dict().items():
        assert torch.equal(t, before[n]), n
    step(x, {**full, "unrelated": "ignored by the wrapper"})


def test_a_bad_batch_raises_and_changes_nothing():
    torch.manual_seed(0)
    m = ResMLP(12, 3, hidden=8, width=16).train()
    opt = AdamW(m.parameters(), lr=1e-2)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    off, ln = torch.zeros(16, dtype=torch.long), torch.full((16,), 3)
    step = fused_train_step(m, fused_args(m), opt, x, loss_spec())
    step(x, ce_batch(y, off, ln))
    before = {n: t.clone() for n, t in m.state_dict().items()}
    moments = [t.clone() for t in opt._caches[0].exp_avgs]
    count = int(opt._caches[0].count)
    with pytest.raises(ValueError, match="label"):
        step(x, ce_batch(torch.full((16,), 7), off, ln))
    with pytest.raises(ValueError, match="task_offset"):
        step(x, ce_batch(y, off - 1, ln))
    with pytest.raises(ValueError, match="first_model"):
        step(x, ce_batch(y, off, ln), first_model=-1)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr must be"):
        step(x, ce_batch(y, off, ln))
    opt.param_groups[0]["lr"] = 1e-2
    assert int(opt._caches[0].count) == count
    for n, t in m.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert all(torch.equal(a, b) for a, b in zip(opt._caches[0].exp_avgs, moments))
    step(x, ce_batch(y, off, ln))  # and it goes on
    assert int(opt._caches[0].count) == count + 1


def _mixed_batch(y, off, ln, w=0.7):
    perm = torch.arange(len(y)).flip(0)
    return ce_batch(y, off, ln, mix_labels=y[perm], mix_ce_offset=off[perm], mix_ce_len=ln[perm],
                    mix_weight=torch.tensor(w, dtype=torch.float64))


def test_mixed_cross_entropy_matches_autograd():
    # w CE(labels) + (1 - w) CE(mix_labels), its gradient through the same backward
    m, m2 = _twins(c=5)
    off, ln = torch.randint(0, 3, (16,)), torch.full((16,), 3)
    x, y = torch.randn(16, 12), off + torch.randint(0, 3, (16,))
    batch = _mixed_batch(y, off, ln, 0.7)
    step = fused_train_step(m, fused_args(m), AdamW(m.parameters(), lr=1e-2), x, loss_spec())
    opt2 = AdamW(m2.parameters(), lr=1e-2)
    got = step(x, batch, seeds=[3, 4])
    logits, _ = resmlp_train_forward(m2, fused_args(m2), x, [3, 4])
    want = 0.7 * task_masked_cross_entropy(logits, y, off, ln) + 0.3 * task_masked_cross_entropy(
        logits, batch["mix_labels"], batch["mix_ce_offset"], batch["mix_ce_len"])
    opt2.zero_grad()
    want.backward()
    opt2.step()
    torch.testing.assert_close(got, want.detach())
    for (name, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("change, match", [
    (lambda b: b.pop("mix_ce_len"), r"need batch\['mix_ce_len'\] \(the mixed cross-entropy term\)"),
    (lambda b: b.pop("mix_labels"), r"need batch\['mix_labels'\]"),
    (lambda b: [b.pop(k) for k in ("mix_labels", "mix_ce_len", "mix_weight")], r"need batch\['mix_labels'\]"),
    (lambda b: b.update(mix_weight=torch.tensor([0.5])), r"mix_weight'\] must be a 0-dim"),
    (lambda b: b.update(mix_weight=torch.tensor(1.5)), r"mix_weight'\] must be in \[0, 1\]"),
    (lambda b: b.update(mix_labels=torch.full((16,), 9)), "label"),
])
def test_a_bad_mixed_batch_is_named_and_changes_nothing(change, match):
    m, _ = _twins()
    opt = AdamW(m.parameters(), lr=1e-2)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    off, ln = torch.zeros(16, dtype=torch.long), torch.full((16,), 3)
    step = fused_train_step(m, fused_args(m), opt, x, loss_spec())
    before = {n: t.clone() for n, t in m.state_dict().items()}
    batch = _mixed_batch(y, off, ln)
    change(batch)
    with pytest.raises(ValueError, match=match):
        step(x, batch)
    for n, t in m.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_a_bad_loss_description_is_named():
    m, _ = _twins()
    x = torch.randn(16, 12)
    for over, match in ((dict(ce_reduction="none"), "ce_reduction"), (dict(distill_coef=1.0), "num_buffers"),
                        (dict(kd_coef=1.0, kd_temperature=0.0), "kd_temperature"),
                        (dict(stability_coef=float("nan")), "stability_coef must be finite")):
        with pytest.raises(ValueError, match=match):
            fused_train_step(m, fused_args(m), AdamW(m.parameters()), x, loss_spec(**over))


def test_where_the_fused_step_does_not_apply():
    # The model and optimizer conditions (unfused_reason); the BMCConfig switches are the step
    # builder's (tests/test_step_builder.py).
    torch.manual_seed(0)
    m = ResMLP(12, 3, hidden=8, width=16).train()
    x = torch.randn(16, 12)

    def reason(model, opt, inp):
        return unfused_reason(model, fused_args(model), opt, inp)

    assert reason(m, AdamW(m.parameters()), x) is None
    assert fused_train_step(m, fused_args(m), AdamW(m.parameters()), x, loss_spec()) is not None
    assert "optimizer" in reason(m, torch.optim.AdamW(m.parameters()), x)  # torch's AdamW
    params = list(m.parameters())
    assert "parameters" in reason(m, AdamW(params[:-1]), x)  # not every parameter
    assert "group" in reason(m, AdamW([{"params": params[:3]}, {"params": params[3:]}]), x)
    m.head.bias.requires_grad_(False)  # a frozen parameter: autograd would skip it, the step would not
    assert "frozen" in reason(m, AdamW(params), x)
    assert fused_train_step(m, fused_args(m), AdamW(params), x, loss_spec()) is None
    m.head.bias.requires_grad_(True)
    m.eval()  # batch statistics are for training mode only
    assert "eval" in reason(m, AdamW(params), x)
    m.train()
    assert "float64" in reason(m, AdamW(params), x.double())  # float32 only
    md = ResMLP(12, 3, hidden=8, width=16).double().train()
    assert reason(md, AdamW(md.parameters()), x.double()) is not None
    assert adamw(m.parameters(), 1e-3, 0.0).__class__ is AdamW  # what the trainer hands it


@pytest.mark.parametrize("which", ["finetune", "joint"])
def test_baselines_train_the_same_with_the_fused_step(which, calls):
    from bmc_fast.train import baselines

    stream = make_stream(k=2, seed=2)
    model_fn = lambda d, c: ResMLP(d, c, hidden=8, width=16)  # noqa: E731
    res = {}
    for fs in (True, False):
        cfg = BMCConfig(epochs=2, batch_size=16, progress=False, fused_step=fs)
        res[fs] = getattr(baselines, which)(stream, cfg, model_fn)
        if fs:
            assert calls[0] > 0
            calls[0] = 0
    assert calls[0] == 0
    np.testing.assert_allclose(res[True].cil_matrix, res[False].cil_matrix, equal_nan=True)
    np.testing.assert_allclose(res[True].til_matrix, res[False].til_matrix, equal_nan=True)


def test_the_raw_class_names_bad_arguments():
    m = ResMLP(12, 3, hidden=8, width=16).train()
    w, b, bw, bb, rm, rv, tr = fused_args(m)
    moments = [torch.zeros_like(t) for t in w + b + bw + bb]
    cls = torch.classes.bmc_fast.ResMLPTrainStep
    with pytest.raises(ValueError, match="exp_avgs and exp_avg_sqs must hold 28"):
        cls(w, b, bw, bb, rm, rv, tr, moments[:-1], moments, 1e-5, [0.3, 0.3])
    with pytest.raises(ValueError, match="running_means, running_vars and tracked"):
        cls(w, b, bw, bb, rm[:-1], rv, tr, moments, moments, 1e-5, [0.3, 0.3])
    with pytest.raises(ValueError, match=r"exp_avgs\[2\] and exp_avg_sqs\[2\] must be contiguous tensors of the shape"):
        cls(w, b, bw, bb, rm, rv, tr, moments[:2] + [moments[2].double()] + moments[3:], moments, 1e-5, [0.3, 0.3])
    step = cls(w, b, bw, bb, rm, rv, tr, moments, [torch.zeros_like(t) for t in moments], 1e-5, [0.3, 0.3])
    loss_cls = torch.classes.bmc_fast.StepLoss
    ce = loss_cls(ce_scale=1.0, ce_reduction="mean", distill_coef=0.0, num_buffers=0, stability_coef=0.0, kd_coef=0.0,
                  kd_temperature=1.0)
    distill = loss_cls(1.0, "mean", 2.5, 2, 0.0, 0.0, 1.0)
    assert (distill.ce_scale, distill.ce_reduction, distill.distill_coef, distill.num_buffers) == (1.0, "mean", 2.5, 2)
    with pytest.raises(ValueError, match="ce_reduction must be 'sum' or 'mean'"):
        loss_cls(1.0, "none", 0.0, 0, 0.0, 0.0, 1.0)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    off, ln = torch.zeros(8, dtype=torch.long), torch.full((8,), 3)
    batch = dict(labels=y, ce_offset=off, ce_len=ln)
    hyper = [1e-3, 0.9, 0.999, 0.0, 1e-8]
    before = [t.clone() for t in w + rm]
    with pytest.raises(ValueError, match=r"need batch\['buffer_id'\] \(the distillation term, distill_coef = 2.5\)"):
        step.step(x, {**batch, "teacher_features": torch.randn(8, 16)}, distill, [1, 2], 0, 0.1, hyper, 1)
    with pytest.raises(ValueError, match="batch has an unknown key 'lables'"):
        step.step(x, {**batch, "lables": y}, ce, [1, 2], 0, 0.1, hyper, 1)
    with pytest.raises(ValueError, match="x must have"):
        step.step(x[0], batch, ce, [1, 2], 0, 0.1, hyper, 1)
    with pytest.raises(ValueError, match="adamw must hold"):
        step.step(x, batch, ce, [1, 2], 0, 0.1, hyper[:4], 1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        step.step(x, batch, ce, [1, 2], 0, 0.1, hyper, 0)
    with pytest.raises(ValueError, match="seeds must hold 2"):
        step.step(x, batch, ce, [1], 0, 0.1, hyper, 1)
    assert all(torch.equal(a, c) for a, c in zip(w + rm, before))
    loss = step.step(x, batch, ce, seeds=[1, 2], first_model=0, momentum=0.1, adamw=hyper, step_count=1)
    assert loss.shape == () and not all(torch.equal(a, c) for a, c in zip(w, before))


def _stacked_step(k, seed=0, spec=None):
    """A one-call step over k stacked experts (as the trainer builds it) and its tensors."""
    from torch.func import stack_module_state

    torch.manual_seed(seed)
    base = ResMLP(12, 3 * k, hidden=8, width=16).train()
    members = [copy.deepcopy(base) for _ in range(k)]
    params, buffers = stack_module_state(members)
    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    skeleton = copy.deepcopy(base).to("meta").train()
    opt = AdamW(params.values(), lr=1e-2, weight_decay=1e-4)
    step = fused_train_step(skeleton, fused_args(skeleton, params, buffers), opt, torch.zeros(k, 16, 12),
                            spec or loss_spec(ce_scale=1 / 16, ce_reduction="sum"))
    assert step is not None
    return step, params, buffers, opt, base




def _split_batch(k):
    """A batch of k experts with 3 classes each: (ranges' offsets and lengths per row, x, labels)."""
    off = torch.arange(k).mul(3).repeat_interleave(16)
    ln = torch.full((k * 16,), 3)
    return off, ln, torch.randn(k, 16, 12), torch.randint(0, 3, (k * 16,)) + off


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_stacked_experts_split_over_the_threads_train_the_same(k, two_threads):
    # Each thread runs the whole step of its own experts: the dropout masks, running statistics,
    # parameters and moments must be those of one call over the whole stack.
    out = {}
    spec = loss_spec(ce_scale=1 / 16, ce_reduction="sum", stability_coef=0.5)
    for split in (True, False):
        step, params, buffers, opt, _ = _stacked_step(k, spec=spec)
        step._obj.set_split(split)
        g = torch.Generator().manual_seed(1)
        off = torch.arange(k).mul(3).repeat_interleave(16)
        ln = torch.full((k * 16,), 3)
        torch.manual_seed(2)
        losses = []
        for _ in range(4):
            x = torch.randn(k, 16, 12, generator=g)
            y = torch.randint(0, 3, (k * 16,), generator=g) + off
            hb = torch.randn(k, 16, 16, generator=g)
            losses.append(step(x, ce_batch(y, off, ln, base_features=hb)))
        out[split] = (params, buffers, opt._caches[0], torch.stack(losses))
    (p1, b1, c1, l1), (p0, b0, c0, l0) = out[True], out[False]
    for n in p1:
        torch.testing.assert_close(p1[n], p0[n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    for n in b1:
        torch.testing.assert_close(b1[n], b0[n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    for a, b in zip(c1.exp_avg_sqs, c0.exp_avg_sqs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(l1, l0)  # summed in another order
    assert float(b1["block1.bn1.num_batches_tracked"][0]) == 4


@pytest.mark.parametrize("split", [True, False])
def test_first_model_keys_the_dropout_of_a_stacked_step(split, two_threads):
    # A stack of k models stepped with first_model=f trains model i exactly as a one-model step
    # with first_model=f + i trains it (dropout masks keyed by the model, not by the stack slot).
    k, f = 3, 5
    step, params, buffers, opt, base = _stacked_step(k)
    step._obj.set_split(split)
    singles = []
    for i in range(k):
        m = copy.deepcopy(base)
        m_opt = AdamW(m.parameters(), lr=1e-2, weight_decay=1e-4)
        singles.append((m, fused_train_step(m, fused_args(m), m_opt, torch.zeros(16, 12),
                                            loss_spec(ce_scale=1 / 16, ce_reduction="sum"))))
    off, ln, _, _ = _split_batch(k)
    g = torch.Generator().manual_seed(3)
    for s in range(3):
        x = torch.randn(k, 16, 12, generator=g)
        y = torch.randint(0, 3, (k * 16,), generator=g) + off
        seeds = [100 + s, 200 + s]
        step(x, ce_batch(y, off, ln), seeds=seeds, first_model=f)
        for i, (m, one) in enumerate(singles):
            rows = slice(16 * i, 16 * (i + 1))
            one(x[i], ce_batch(y[rows], off[rows], ln[rows]), seeds=seeds, first_model=f + i)
    for i, (m, _) in enumerate(singles):
        for n, t in m.named_parameters():
            torch.testing.assert_close(params[n][i], t, rtol=1e-6, atol=1e-6, msg=lambda msg, n=n: f"{i} {n}: {msg}")
        for n, t in m.named_buffers():
            torch.testing.assert_close(buffers[n][i].to(t.dtype), t, rtol=1e-6, atol=1e-6,
                                       msg=lambda msg, n=n: f"{i} {n}: {msg}")
    # and first_model matters: model 0 trained with first_model=0 ends elsewhere
    m0 = copy.deepcopy(base)
    zero = fused_train_step(m0, fused_args(m0), AdamW(m0.parameters(), lr=1e-2, weight_decay=1e-4),
                            torch.zeros(16, 12), loss_spec(ce_scale=1 / 16, ce_reduction="sum"))
    g = torch.Generator().manual_seed(3)
    for s in range(3):
        x = torch.randn(k, 16, 12, generator=g)
        y = torch.randint(0, 3, (k * 16,), generator=g) + off
        zero(x[0], ce_batch(y[:16], off[:16], ln[:16]), seeds=[100 + s, 200 + s])
    assert not torch.allclose(m0.head.weight, params["head.weight"][0], rtol=1e-4, atol=1e-5)


def test_a_bad_label_of_the_last_expert_changes_no_expert(two_threads):
    # The split step checks every slice before any thread writes its parameters.
    k = 4
    step, params, buffers, opt, _ = _stacked_step(k)
    off, ln, x, y = _split_batch(k)
    step(x, ce_batch(y, off, ln))
    before = {n: t.clone() for n, t in {**params, **buffers}.items()}
    count = int(opt._caches[0].count)
    bad = y.clone()
    bad[-1] = 0  # the last expert's range is [9, 12)
    with pytest.raises(ValueError, match="label"):
        step(x, ce_batch(bad, off, ln))
    assert int(opt._caches[0].count) == count
    for n, t in {**params, **buffers}.items():
        assert torch.equal(t, before[n]), n


def test_the_split_step_names_a_bad_range_or_base_tensor(two_threads):
    # Inputs the split cannot slice run as one call over the stack, whose checks name them.
    k = 4
    step, params, _, _, _ = _stacked_step(k, spec=loss_spec(ce_scale=1 / 16, ce_reduction="sum", stability_coef=0.5))
    off, ln, x, y = _split_batch(k)
    hb = torch.randn(k, 16, 16)
    before = {n: t.clone() for n, t in params.items()}
    with pytest.raises(ValueError, match="task_offset"):
        step(x, ce_batch(y, off[:-5], ln, base_features=hb))
    with pytest.raises(ValueError, match="task_len"):
        step(x, ce_batch(y, off, ln[:3], base_features=hb))
    with pytest.raises(ValueError, match="base_features"):
        step(x, ce_batch(y, off, ln, base_features=torch.randn(k - 1, 16, 16)))
    for n, t in params.items():
        assert torch.equal(t, before[n]), n
