"""The step builder: one decision (fused or autograd, with its reason), one loss description, and
the run's fast paths (FastPaths) that every phase asks."""
import itertools

import numpy as np
import pytest
import torch

import bmc_fast
from bmc_fast import BMCConfig
from bmc_fast.data import demo_stream
from bmc_fast.optim import AdamW
from bmc_fast.train import baselines
from bmc_fast.train.step import FastPaths, LossSpec, adamw, backbone_mode, build_step, loss_ops


def _model(c=6):
    torch.manual_seed(0)
    return bmc_fast.ResMLP(12, c, hidden=8, width=16).train()


def _batch(n=16, c=6, j=3):
    g = torch.Generator().manual_seed(1)
    off = torch.zeros(n, dtype=torch.long)
    return {"labels": torch.randint(0, c, (n,), generator=g), "ce_offset": off, "ce_len": torch.full((n,), c),
            "teacher_features": torch.randn(n, 16, generator=g), "buffer_id": torch.randint(0, j, (n,), generator=g),
            "teacher_logits": torch.randn(n, c, generator=g), "kd_offset": off, "kd_len": torch.full((n,), c)}


SPEC = LossSpec(ce_scale=0.5, distill_coef=2.0, num_buffers=3, kd_coef=0.7, kd_temperature=2.0)


@pytest.mark.parametrize("over, why", [
    ({}, None),
    ({"fused_step": False}, "fused_step"),
    ({"losses": "reference"}, "reference"),
    ({"fused_backbone": False}, "fused_backbone"),
    ({"fused_optimizer": False}, "fused_optimizer"),
])
def test_the_choice_is_made_once_with_its_reason(over, why):
    m = _model()
    cfg = BMCConfig(progress=False, **over)
    step = build_step(m, adamw(m.parameters(), 1e-2, 0.0, fused=cfg.fused_optimizer), SPEC, cfg, torch.randn(16, 12))
    if why is None:
        assert step.kind == "fused" and step.reason is None
    else:
        assert step.kind == "autograd" and why in step.reason


def test_other_models_and_optimizers_name_their_reason():
    m = _model()
    cfg = BMCConfig(progress=False)
    s = build_step(m, torch.optim.SGD(m.parameters(), lr=0.1), SPEC, cfg, torch.randn(16, 12))
    assert s.kind == "autograd" and "optimizer" in s.reason
    lin = torch.nn.Linear(12, 6)
    s = build_step(lin, adamw(lin.parameters(), 1e-2, 0.0), SPEC, cfg, torch.randn(16, 12))
    assert s.kind == "autograd" and "Linear" in s.reason
    s = build_step(m, adamw(m.parameters(), 1e-2, 0.0), SPEC.replace(stability="weight", stability_coef=1.0,
                                                                      distill_coef=0.0), cfg, torch.randn(16, 12))
    assert s.kind == "autograd" and "weight stability" in s.reason


def test_fused_and_autograd_steps_compute_the_same_terms():
    x, b = torch.randn(16, 12, generator=torch.Generator().manual_seed(2)), _batch()
    out = {}
    for fused in (True, False):
        m = _model()
        cfg = BMCConfig(progress=False, fused_step=fused)
        opt = adamw(m.parameters(), 1e-2, 0.0)
        step = build_step(m, opt, SPEC, cfg, x)
        assert step.kind == ("fused" if fused else "autograd")
        losses = [step(x, b, [5, 6]) for _ in range(3)]
        out[fused] = (torch.stack(losses), dict(m.named_parameters()))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for n, v in out[True][1].items():
        if n == "proj.bias":  # feeds only BatchNorms: its true gradient is 0, and AdamW scales the
            continue          # rounding residue of either path to full-size steps (so do the
            #                   running means it feeds, hence parameters only)
        torch.testing.assert_close(v, out[False][1][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_the_autograd_loss_is_the_sum_of_the_terms():
    m, x, b = _model(), torch.randn(16, 12), _batch()
    step = build_step(m, adamw(m.parameters(), 1e-2, 0.0), SPEC, BMCConfig(progress=False, fused_step=False), x)
    got = step.loss_value(x, b, [5, 6])
    logits, h = bmc_fast.backbone.resmlp_train_forward(m, bmc_fast.backbone.fused_args(m), x, [5, 6])
    want = (0.5 * bmc_fast.task_masked_cross_entropy(logits, b["labels"], b["ce_offset"], b["ce_len"])
            + 2.0 * bmc_fast.batched_distillation_loss(h, b["teacher_features"], b["buffer_id"], 3, reduction="mean")
            + 0.7 * bmc_fast.task_masked_kd_loss(logits, b["teacher_logits"], b["kd_offset"], b["kd_len"], 2.0))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("key", ["teacher_features", "buffer_id", "teacher_logits", "kd_len"])
def test_a_term_without_its_tensors_is_an_error_not_a_skip(fused, key):
    m, x, b = _model(), torch.randn(16, 12), _batch()
    step = build_step(m, adamw(m.parameters(), 1e-2, 0.0), SPEC, BMCConfig(progress=False, fused_step=fused), x)
    del b[key]
    with pytest.raises(ValueError, match=key):
        step(x, b, [5, 6])


def test_mixup_with_stored_targets_is_refused():
    with pytest.raises(ValueError, match="mixup"):
        LossSpec(mixup_alpha=0.4, distill_coef=1.0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        BMCConfig(mixup_alpha=0.4, kd_coef=1.0)
    m, x, b = _model(), torch.randn(16, 12), _batch()
    spec = LossSpec(mixup_alpha=0.4)
    with pytest.raises(ValueError, match="mixup_generator"):
        build_step(m, adamw(m.parameters(), 1e-2, 0.0), spec, BMCConfig(progress=False), x)
    for fused in (True, False):  # the one-call step mixes too
        step = build_step(m, adamw(m.parameters(), 1e-2, 0.0), spec, BMCConfig(progress=False, fused_step=fused), x,
                          mixup_generator=np.random.default_rng(0))
        assert step.kind == ("fused" if fused else "autograd") and step.mixup is not None
        assert torch.isfinite(step(x, b, [5, 6]))
        with pytest.raises(ValueError, match=r"need batch\['ce_len'\]"):  # named, not a KeyError
            step(x, {k: v for k, v in b.items() if k != "ce_len"}, [5, 6])
    with pytest.raises(ValueError, match="a step of stacked models takes no mixup"):
        build_step(m, adamw(m.parameters(), 1e-2, 0.0), spec, BMCConfig(progress=False), x, stacked=True,
                   mixup_generator=np.random.default_rng(0))


def test_kd_makes_the_buffers_keep_the_logits():
    from bmc_fast.train.experts import train_experts

    cfg = BMCConfig(n_experts=2, epochs=1, kd_coef=1.0, progress=False)
    arts = train_experts(bmc_fast.ResMLP(64, 10), demo_stream(), [0, 1], cfg, step_index=0)
    assert all(a.buffer.logits is not None and a.buffer.logits.shape[1] == 2 for a in arts)


# -- the run's fast paths ------------------------------------------------------------------------

OPTIONS = list(itertools.product(("fused", "reference"), (True, False), (True, False), (True, False)))


def _config_reason(losses, fused_backbone, fused_optimizer, fused_step):
    """The reason the options alone give for the autograd step, in the order the trainer reports them."""
    for off, why in ((not fused_step, "BMCConfig.fused_step is off"),
                     (losses != "fused", "BMCConfig.losses is 'reference'"),
                     (not fused_backbone, "BMCConfig.fused_backbone is off"),
                     (not fused_optimizer, "BMCConfig.fused_optimizer is off")):
        if off:
            return why
    return None


@pytest.mark.parametrize("losses, fused_backbone, fused_optimizer, fused_step", OPTIONS)
def test_fast_paths_resolve_every_combination_of_the_options(losses, fused_backbone, fused_optimizer, fused_step):
    cfg = BMCConfig(losses=losses, fused_backbone=fused_backbone, fused_optimizer=fused_optimizer,
                    fused_step=fused_step, progress=False)
    paths = FastPaths.of(cfg)
    assert paths == FastPaths(losses, fused_backbone, fused_optimizer, fused_step)
    assert paths.ops is (bmc_fast.reference if losses == "reference" else bmc_fast) and loss_ops(cfg) is paths.ops
    m = _model()
    opt = paths.adamw(m.parameters(), 1e-2, 0.0)
    assert type(opt) is (AdamW if fused_optimizer else torch.optim.AdamW)
    assert type(opt) is type(adamw(m.parameters(), 1e-2, 0.0, fused=fused_optimizer))
    assert paths.fused_model(m) is fused_backbone
    plain = bmc_fast.ResMLP(12, 6, hidden=8, width=16, fused=False)
    for mode in (paths.backbone_mode, lambda model: backbone_mode(model, cfg)):
        with mode(m), mode(plain):
            assert m.fused is fused_backbone and plain.fused is False
        assert m.fused is True and plain.fused is False
    why = _config_reason(losses, fused_backbone, fused_optimizer, fused_step)
    x = torch.randn(16, 12)
    for step in (paths.build_step(m, opt, SPEC, x), build_step(m, opt, SPEC, cfg, x)):
        assert (step.kind, step.reason) == (("fused", None) if why is None else ("autograd", why))
        if why is not None:
            assert step.ops is paths.ops
    assert paths.step_reason(SPEC) == why
    derpp_step = baselines.DerppStep(m, opt, cfg, x, 0.1, 0.5)
    assert derpp_step.ops is paths.ops


def test_the_autograd_forward_is_the_fused_one_where_it_applies():
    m, x = _model(), torch.randn(16, 12)
    fused = FastPaths().train_forward(m, x)(x, [5, 6])[0]  # its dropout masks are keyed by the seeds
    want = bmc_fast.backbone.resmlp_train_forward(m, bmc_fast.backbone.fused_args(m), x, [5, 6])[0]
    torch.testing.assert_close(fused, want, rtol=0, atol=0)
    torch.manual_seed(3)
    plain = FastPaths(fused_backbone=False).train_forward(m, x)(x, [5, 6])[0]  # the module's, on torch's generator
    torch.manual_seed(3)
    torch.testing.assert_close(plain, m(x)[0], rtol=0, atol=0)
    assert not torch.equal(plain, fused)
