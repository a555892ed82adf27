import pytest
import torch

import bmc_fast
from bmc_fast import reference
from _checks import assert_matches_reference, close, fwd_bwd
from _masked import labels_in, ranges
from conftest import DTYPES

OP = torch.ops.bmc_fast.task_masked_cross_entropy.default


def make(n, c, dtype, device, scale=3.0):
    x = (torch.randn(n, c, device=device) * scale).to(dtype)
    off, ln = ranges(n, c, device)
    return x, labels_in(off, ln), off, ln


def run(reduction="mean", ignore_index=-100):
    fused = lambda x, y, o, l: bmc_fast.task_masked_cross_entropy(x, y, o, l, reduction, ignore_index)  # noqa: E731,E741
    ref = lambda x, y, o, l: reference.task_masked_cross_entropy(x, y, o, l, reduction, ignore_index)  # noqa: E731,E741
    return fused, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("nc", [(64, 10), (1, 1), (41, 423), (300, 1000)])
def test_task_masked_cross_entropy_matches_reference(device, dtype, reduction, nc):
    x, y, o, ln = make(*nc, dtype, device)
    assert_matches_reference(*run(reduction), (x, y, o, ln), [0], dtype)


def test_task_masked_cross_entropy_ignore_index(device):
    x, y, o, ln = make(50, 20, torch.float32, device)
    y[::3] = -1
    for red in ("sum", "mean", "none"):
        loss = assert_matches_reference(*run(red, -1), (x, y, o, ln), [0], torch.float32)
    y[:] = -1
    assert torch.isnan(bmc_fast.task_masked_cross_entropy(x, y, o, ln, ignore_index=-1))  # as F.cross_entropy
    assert loss.shape == (50,)


def test_task_masked_cross_entropy_int_ranges_and_full_head(device):
    x = torch.randn(30, 12, device=device)
    y = torch.randint(0, 12, (30,), device=device)
    close(bmc_fast.task_masked_cross_entropy(x, y, 0, 12), torch.nn.functional.cross_entropy(x, y), torch.float32)
    y2 = torch.randint(4, 8, (30,), device=device)
    close(bmc_fast.task_masked_cross_entropy(x, y2, 4, 4),
          torch.nn.functional.cross_entropy(x[:, 4:8], y2 - 4), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_masked_cross_entropy_large_logits(device, dtype):
    big = 1e4
    x, y, o, ln = make(33, 50, dtype, device, scale=1.0)
    x = (x.float().sign() * big).to(dtype)
    fused, ref = run("none")
    loss, grads, g = fwd_bwd(fused, (x, y, o, ln), [0])
    loss_r, grads_r, _ = fwd_bwd(ref, (x, y, o, ln), [0], g)
    assert torch.isfinite(loss).all()
    close(loss, loss_r, dtype)
    close(grads[0], grads_r[0], dtype)


def test_task_masked_cross_entropy_confident_bf16_gradient(device):
    # Liger's case: the label's probability rounds to 1 in bf16, so p - 1 must be formed in fp32.
    x = torch.zeros(8, 64, device=device)
    y = torch.arange(8, device=device)
    x[torch.arange(8), y] = 12.0
    xb = x.to(torch.bfloat16).requires_grad_()
    bmc_fast.task_masked_cross_entropy(xb, y, 0, 64, "sum").backward()
    xr = x.clone().requires_grad_()
    reference.task_masked_cross_entropy(xr, y, 0, 64, "sum").backward()
    true_grad = xr.grad[torch.arange(8), y]
    assert (true_grad < 0).all()
    close(xb.grad[torch.arange(8), y].float(), true_grad, torch.bfloat16)


def test_task_masked_cross_entropy_not_last_layer_and_no_grad(device):
    x, y, o, ln = make(64, 30, torch.float32, device)
    assert_matches_reference(*run(), (x, y, o, ln), [0], torch.float32, mult=3.0)
    with torch.no_grad():
        assert not bmc_fast.task_masked_cross_entropy(x.requires_grad_(), y, o, ln).requires_grad
    assert OP(x.detach(), y, o, ln, "mean", -100, False)[1].numel() == 0


def test_task_masked_cross_entropy_gradcheck(device):
    x, y, o, ln = make(6, 9, torch.float64, device)
    for red in ("sum", "mean", "none"):
        torch.autograd.gradcheck(lambda x: bmc_fast.task_masked_cross_entropy(x, y, o, ln, red),
                                 (x.clone().requires_grad_(),))


def test_task_masked_cross_entropy_opcheck(device):
    x, y, o, ln = make(20, 17, torch.float32, device)
    for rg in (False, True):
        torch.library.opcheck(OP, (x.clone().requires_grad_(rg), y, o, ln, "mean", -100, rg))
        torch.library.opcheck(OP, (x.clone().requires_grad_(rg), y.int(), o.int(), ln.int(), "none", -100, rg))


def test_task_masked_cross_entropy_compile(device):
    x, y, o, ln = make(64, 100, torch.float32, device)
    fn = torch.compile(lambda x: bmc_fast.task_masked_cross_entropy(x, y, o, ln), fullgraph=True)
    loss, (g,), up = fwd_bwd(fn, (x,), [0])
    loss_r, (g_r,), _ = fwd_bwd(lambda x: reference.task_masked_cross_entropy(x, y, o, ln), (x,), [0], up)
    close(loss, loss_r, torch.float32)
    close(g, g_r, torch.float32)


def test_task_masked_cross_entropy_edge_cases(device):
    x = torch.zeros(0, 5, device=device)
    e = torch.zeros(0, dtype=torch.long, device=device)
    for red in ("sum", "none"):
        close(bmc_fast.task_masked_cross_entropy(x, e, e, e, red),
              reference.task_masked_cross_entropy(x, e, e, e, red), torch.float32)
    xs = torch.randn(40, 60, device=device).t()  # [60, 40] non-contiguous
    off, ln = ranges(60, 40, device)
    assert_matches_reference(*run(), (xs, labels_in(off, ln), off, ln), [0], torch.float32)


def test_task_masked_cross_entropy_nan_propagates(device):
    x, y, o, ln = make(4, 10, torch.float32, device)
    x[2, o[2]] = float("nan")
    out = bmc_fast.task_masked_cross_entropy(x, y, o, ln, "none")
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


def test_task_masked_cross_entropy_module(device):
    x, y, o, ln = make(10, 10, torch.float32, device)
    close(bmc_fast.nn.TaskMaskedCrossEntropy(reduction="sum")(x, y, o, ln),
          reference.task_masked_cross_entropy(x, y, o, ln, "sum"), torch.float32)
