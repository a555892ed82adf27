import pytest
import torch

import bmc_fast
from bmc_fast import reference
from _checks import assert_matches_reference, close, fwd_bwd
from conftest import DTYPES

OP = torch.ops.bmc_fast.weight_stability_loss.default


def make(k, p, dtype, device):
    e = torch.randn(k, p, device=device).to(dtype)
    b = torch.randn(p, device=device).to(dtype)
    imp = torch.rand(p, device=device).to(dtype)
    w = (torch.rand(k, device=device) + 0.5).to(dtype)
    return e, b, imp, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("kp", [(4, 100), (1, 1), (3, 423), (2, 40000)])
def test_weight_stability_loss_matches_reference(device, dtype, reduction, kp):
    e, b, imp, w = make(*kp, dtype, device)
    fused = lambda *a: bmc_fast.weight_stability_loss(*a, reduction=reduction)  # noqa: E731
    ref = lambda *a: reference.weight_stability_loss(*a, reduction=reduction)  # noqa: E731
    assert_matches_reference(fused, ref, (e, b, None, None), [0, 1], dtype)
    assert_matches_reference(fused, ref, (e, b, imp, w), [0, 1, 2, 3], dtype)


def test_weight_stability_loss_not_last_layer_and_no_grad(device):
    e, b, imp, w = make(4, 300, torch.float32, device)
    assert_matches_reference(bmc_fast.weight_stability_loss, reference.weight_stability_loss, (e, b, imp, w),
                             [0, 1], torch.float32, mult=3.0)
    with torch.no_grad():
        loss = bmc_fast.weight_stability_loss(e.requires_grad_(), b, imp, w)
    assert not loss.requires_grad
    assert OP(e.detach(), b, imp, w, "sum", False)[1].numel() == 0


def test_weight_stability_loss_gradcheck(device):
    e, b, imp, w = make(3, 7, torch.float64, device)
    for red in ("sum", "mean", "none"):
        torch.autograd.gradcheck(lambda *a: bmc_fast.weight_stability_loss(*a, reduction=red),
                                 tuple(t.clone().requires_grad_() for t in (e, b, imp, w)))


def test_weight_stability_loss_opcheck(device):
    e, b, imp, w = make(3, 50, torch.float32, device)
    for rg in (False, True):
        ee = e.clone().requires_grad_(rg)
        torch.library.opcheck(OP, (ee, b, imp, w, "sum", rg))
        torch.library.opcheck(OP, (ee, b, None, None, "none", rg))


def test_weight_stability_loss_compile(device):
    e, b, imp, w = make(4, 1000, torch.float32, device)
    fn = torch.compile(lambda *a: bmc_fast.weight_stability_loss(*a, reduction="mean"), fullgraph=True)
    loss, grads, g = fwd_bwd(fn, (e, b, imp, w), [0])
    loss_r, grads_r, _ = fwd_bwd(lambda *a: reference.weight_stability_loss(*a, reduction="mean"),
                                 (e, b, imp, w), [0], g)
    close(loss, loss_r, torch.float32)
    close(grads[0], grads_r[0], torch.float32)


def test_weight_stability_loss_edge_cases(device):
    base = torch.randn(600, 4, device=device)
    e = base.t()[:, ::3]  # [4, 200] non-contiguous
    b = torch.randn(400, device=device)[::2]
    imp = torch.rand(200, device=device)
    assert_matches_reference(bmc_fast.weight_stability_loss, reference.weight_stability_loss, (e, b, imp),
                             [0, 1], torch.float32)
    z = torch.zeros(0, 5, device=device)
    close(bmc_fast.weight_stability_loss(z, torch.zeros(5, device=device), reduction="mean"),
          reference.weight_stability_loss(z, torch.zeros(5, device=device), reduction="mean"), torch.float32)


def test_weight_stability_loss_deterministic_across_threads():
    e, b, imp, w = make(4, 100_003, torch.float32, "cpu")
    outs = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(bmc_fast.weight_stability_loss(e, b, imp, w, "none"))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


def test_weight_stability_loss_module(device):
    e, b, imp, w = make(2, 10, torch.float32, device)
    mod = bmc_fast.nn.WeightStabilityLoss(importance=imp, weights=w)
    close(mod(e, b), reference.weight_stability_loss(e, b, imp, w), torch.float32)
