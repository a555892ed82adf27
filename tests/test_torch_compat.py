"""The private torch internals sit behind one gate: without them every op takes its registered
(public-API) path and computes the same values and gradients."""
import torch

import bmc_fast
from bmc_fast import _torch_compat as compat
from bmc_fast.backbone import fused_path_available


def test_the_tested_torch_has_the_fast_path():
    assert compat.TESTED_FROM <= tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert compat.FAST_EAGER


def _losses_and_grads():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 8, 5, generator=g, requires_grad=True)
    b = torch.randn(3, 8, 5, generator=g)
    s = bmc_fast.stability_loss(e, b)
    logits = torch.randn(8, 6, generator=g, requires_grad=True)
    ce = bmc_fast.task_masked_cross_entropy(logits, torch.tensor([0, 1, 2, 3, 4, 5, 1, 2]), torch.zeros(8, dtype=torch.long),
                                            torch.full((8,), 6))
    x = torch.randn(2, 16, 4, generator=g, requires_grad=True)
    w, bb = torch.ones(2, 4, requires_grad=True), torch.zeros(2, 4, requires_grad=True)
    out = bmc_fast.ops.bn_relu_dropout([x], [w], [bb], p=0.3, seed=7)
    m = bmc_fast.ResMLP(4, 3, hidden=8, width=16).train()
    lists = bmc_fast.backbone.fused_args(m)
    y, h = bmc_fast.ops.resmlp(x[0], *lists[:4], p=[0.2, 0.2], seeds=[1, 2])
    total = s + ce + out.square().sum() + y.square().sum() + h.sum()
    total.backward()
    return [t.detach().clone() for t in (s, ce, out, y, h, e.grad, logits.grad, x.grad, w.grad, lists[0][1].grad)]


def test_without_the_internals_the_registered_paths_give_the_same(monkeypatch):
    fast = _losses_and_grads()
    monkeypatch.setattr(compat, "FAST_EAGER", False)
    slow = _losses_and_grads()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    m = bmc_fast.ResMLP(4, 3).train()
    assert not fused_path_available(m, torch.randn(8, 4))  # the trainer then uses the modules


def test_the_fast_path_is_taken_when_available(monkeypatch):
    calls = []
    real = compat.below_autograd
    monkeypatch.setattr(compat, "below_autograd", lambda *a, **k: calls.append(1) or real(*a, **k))
    _losses_and_grads()
    assert calls
