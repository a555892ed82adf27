import pytest
import torch

import bmc_fast
from bmc_fast import reference
from _checks import assert_matches_reference, close, fwd_bwd
from _masked import ranges
from conftest import DTYPES

OP = torch.ops.bmc_fast.task_masked_kd_loss.default


def make(n, c, dtype, device, scale=3.0):
    s = (torch.randn(n, c, device=device) * scale).to(dtype)
    t = (torch.randn(n, c, device=device) * scale).to(dtype)
    off, ln = ranges(n, c, device)
    return s, t, off, ln


def run(tau=1.0, reduction="mean"):
    fused = lambda s, t, o, l: bmc_fast.task_masked_kd_loss(s, t, o, l, tau, reduction)  # noqa: E731,E741
    ref = lambda s, t, o, l: reference.task_masked_kd_loss(s, t, o, l, tau, reduction)  # noqa: E731,E741
    return fused, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("nc", [(64, 10), (1, 1), (41, 423), (200, 1000)])
def test_task_masked_kd_loss_matches_reference(device, dtype, reduction, nc):
    s, t, o, ln = make(*nc, dtype, device)
    assert_matches_reference(*run(2.0, reduction), (s, t, o, ln), [0, 1], dtype)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_task_masked_kd_loss_temperatures(device, tau):
    s, t, o, ln = make(50, 30, torch.float32, device)
    assert_matches_reference(*run(tau), (s, t, o, ln), [0, 1], torch.float32)


def test_task_masked_kd_loss_equals_kl_div_on_full_head(device):
    s = torch.randn(16, 9, device=device)
    t = torch.randn(16, 9, device=device)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.log_softmax(t / 2, 1),
                                          reduction="batchmean", log_target=True) * 4
    close(bmc_fast.task_masked_kd_loss(s, t, 0, 9, 2.0), expected, torch.float32)


def test_task_masked_kd_loss_neg_inf_teacher(device):
    s, t, o, ln = make(20, 12, torch.float32, device)
    t[:, ::2] = float("-inf")
    t[:, 1::2] = torch.randn(20, 6, device=device)
    loss = assert_matches_reference(*run(1.0, "none"), (s, t, o, ln), [0], torch.float32)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_masked_kd_loss_large_logits(device, dtype):
    big = 1e4
    s, t, o, ln = make(33, 50, dtype, device, scale=1.0)
    s = (s.float().sign() * big).to(dtype)
    fused, ref = run(1.0, "none")
    loss, grads, g = fwd_bwd(fused, (s, t, o, ln), [0])
    loss_r, grads_r, _ = fwd_bwd(ref, (s, t, o, ln), [0], g)
    assert torch.isfinite(loss).all()
    close(loss, loss_r, dtype)
    close(grads[0], grads_r[0], dtype)


def test_task_masked_kd_loss_confident_bf16_gradient(device):
    s = torch.zeros(8, 64, device=device)
    s[:, 3] = 12.0
    t = torch.zeros(8, 64, device=device)
    t[:, 5] = 12.0
    sb = s.to(torch.bfloat16).requires_grad_()
    bmc_fast.task_masked_kd_loss(sb, t.to(torch.bfloat16), 0, 64, 1.0, "sum").backward()
    sr = s.clone().requires_grad_()
    reference.task_masked_kd_loss(sr, t, 0, 64, 1.0, "sum").backward()
    close(sb.grad.float(), sr.grad, torch.bfloat16)


def test_task_masked_kd_loss_not_last_layer_and_no_grad(device):
    s, t, o, ln = make(64, 30, torch.float32, device)
    assert_matches_reference(*run(), (s, t, o, ln), [0], torch.float32, mult=3.0)
    with torch.no_grad():
        assert not bmc_fast.task_masked_kd_loss(s.requires_grad_(), t, o, ln).requires_grad


def test_task_masked_kd_loss_gradcheck(device):
    s, t, o, ln = make(5, 8, torch.float64, device)
    for red in ("sum", "mean", "none"):
        torch.autograd.gradcheck(lambda s, t: bmc_fast.task_masked_kd_loss(s, t, o, ln, 1.5, red),
                                 (s.clone().requires_grad_(), t.clone().requires_grad_()))


def test_task_masked_kd_loss_opcheck(device):
    s, t, o, ln = make(20, 17, torch.float32, device)
    for rg in (False, True):
        torch.library.opcheck(OP, (s.clone().requires_grad_(rg), t, o, ln, 2.0, "mean", rg))
        torch.library.opcheck(OP, (s.clone().requires_grad_(rg), t, o.int(), ln.int(), 1.0, "none", rg))


def test_task_masked_kd_loss_compile(device):
    s, t, o, ln = make(64, 100, torch.float32, device)
    fn = torch.compile(lambda s: bmc_fast.task_masked_kd_loss(s, t, o, ln, 2.0), fullgraph=True)
    loss, (g,), up = fwd_bwd(fn, (s,), [0])
    loss_r, (g_r,), _ = fwd_bwd(lambda s: reference.task_masked_kd_loss(s, t, o, ln, 2.0), (s,), [0], up)
    close(loss, loss_r, torch.float32)
    close(g, g_r, torch.float32)


def test_task_masked_kd_loss_edge_cases(device):
    z = torch.zeros(0, 5, device=device)
    e = torch.zeros(0, dtype=torch.long, device=device)
    for red in ("sum", "none", "mean"):
        close(bmc_fast.task_masked_kd_loss(z, z, e, e, 1.0, red), reference.task_masked_kd_loss(z, z, e, e, 1.0, red),
              torch.float32)
    s = torch.randn(40, 60, device=device).t()
    t = torch.randn(40, 60, device=device).t()
    off, ln = ranges(60, 40, device)
    assert_matches_reference(*run(), (s, t, off, ln), [0, 1], torch.float32)


def test_task_masked_kd_loss_module(device):
    s, t, o, ln = make(10, 10, torch.float32, device)
    close(bmc_fast.nn.TaskMaskedKDLoss(temperature=2.0, reduction="sum")(s, t, o, ln),
          reference.task_masked_kd_loss(s, t, o, ln, 2.0, "sum"), torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        bmc_fast.nn.TaskMaskedKDLoss(temperature=0.0)
