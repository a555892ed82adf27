import pytest
import torch

import bmc_fast
from bmc_fast import reference
from _checks import assert_matches_reference, close, fwd_bwd
from conftest import DTYPES

OP = torch.ops.bmc_fast.batched_distillation_loss.default


def make(n, d, e, dtype, device, id_dtype=torch.int64):
    s = torch.randn(n, d, device=device).to(dtype)
    t = torch.randn(n, d, device=device).to(dtype)
    ids = torch.randint(0, e, (n,), device=device, dtype=id_dtype)
    w = (torch.rand(e, device=device) + 0.5).to(dtype)
    return s, t, ids, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("nde", [(64, 16, 4), (1, 1, 1), (41, 423, 3), (300, 768, 8)])
def test_batched_distillation_loss_matches_reference(device, dtype, reduction, nde):
    n, d, e = nde
    s, t, ids, w = make(n, d, e, dtype, device)
    fused = lambda s, t, w: bmc_fast.batched_distillation_loss(s, t, ids, e, w, reduction)  # noqa: E731
    ref = lambda s, t, w: reference.batched_distillation_loss(s, t, ids, e, w, reduction)  # noqa: E731
    assert_matches_reference(fused, ref, (s, t, None), [0, 1], dtype)
    assert_matches_reference(fused, ref, (s, t, w), [0, 1, 2], dtype)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_batched_distillation_loss_empty_expert(device, reduction):
    # Experts 1 and 4 have no sample: they give 0, and "mean" divides by the 3 experts present.
    s, t, _, w = make(30, 8, 5, torch.float32, device)
    ids = torch.tensor([0, 2, 3] * 10, device=device, dtype=torch.int32)
    fused = lambda s, t, w: bmc_fast.batched_distillation_loss(s, t, ids, 5, w, reduction)  # noqa: E731
    ref = lambda s, t, w: reference.batched_distillation_loss(s, t, ids, 5, w, reduction)  # noqa: E731
    loss = assert_matches_reference(fused, ref, (s, t, w), [0, 1, 2], torch.float32)
    per = bmc_fast.batched_distillation_loss(s, t, ids, 5, reduction="none")
    assert per[1] == 0 and per[4] == 0
    if reduction == "mean":
        close(loss, (per * w).sum() / 3, torch.float32)


def test_batched_distillation_loss_exact_bookkeeping(device):
    # Integer-valued inputs: every sum below is exact in float32.
    s = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0], [5.0, 5.0]], device=device)
    t = torch.zeros_like(s)
    ids = torch.tensor([2, 0, 2, 0], device=device)
    per = bmc_fast.batched_distillation_loss(s, t, ids, 3, reduction="none")
    assert per.tolist() == [(4 + 25) / 2, 0.0, (5 + 8) / 2]
    assert bmc_fast.batched_distillation_loss(s, t, ids, 3, reduction="mean").item() == (14.5 + 6.5) / 2


def test_batched_distillation_loss_no_samples(device):
    s = torch.zeros(0, 7, device=device)
    ids = torch.zeros(0, dtype=torch.long, device=device)
    for red in ("sum", "mean", "none"):
        close(bmc_fast.batched_distillation_loss(s, s, ids, 3, reduction=red),
              reference.batched_distillation_loss(s, s, ids, 3, reduction=red), torch.float32)


def test_batched_distillation_loss_not_last_layer_and_no_grad(device):
    s, t, ids, w = make(100, 32, 4, torch.float32, device)
    assert_matches_reference(lambda s, t: bmc_fast.batched_distillation_loss(s, t, ids, 4, w),
                             lambda s, t: reference.batched_distillation_loss(s, t, ids, 4, w),
                             (s, t), [0, 1], torch.float32, mult=3.0)
    with torch.no_grad():
        assert not bmc_fast.batched_distillation_loss(s.requires_grad_(), t, ids, 4).requires_grad


def test_batched_distillation_loss_gradcheck(device):
    s, t, ids, w = make(9, 5, 3, torch.float64, device)
    ids[:3] = 0
    for red in ("sum", "mean", "none"):
        torch.autograd.gradcheck(lambda s, t, w: bmc_fast.batched_distillation_loss(s, t, ids, 4, w, red),
                                 (s.clone().requires_grad_(), t.clone().requires_grad_(),
                                  torch.rand(4, dtype=torch.float64, device=device).requires_grad_()))


def test_batched_distillation_loss_opcheck(device):
    s, t, ids, w = make(40, 12, 4, torch.float32, device)
    for rg in (False, True):
        ss = s.clone().requires_grad_(rg)
        torch.library.opcheck(OP, (ss, t, ids, 4, w, "sum", rg))
        torch.library.opcheck(OP, (ss, t, ids.int(), 6, None, "none", rg))


def test_batched_distillation_loss_compile(device):
    s, t, ids, w = make(128, 64, 4, torch.float32, device)
    fn = torch.compile(lambda s, t: bmc_fast.batched_distillation_loss(s, t, ids, 4, w, "mean"), fullgraph=True)
    loss, grads, g = fwd_bwd(fn, (s, t), [0, 1])
    loss_r, grads_r, _ = fwd_bwd(lambda s, t: reference.batched_distillation_loss(s, t, ids, 4, w, "mean"),
                                 (s, t), [0, 1], g)
    close(loss, loss_r, torch.float32)
    for a, b in zip(grads, grads_r):
        close(a, b, torch.float32)


def test_batched_distillation_loss_non_contiguous_and_3d(device):
    s = torch.randn(8, 50, 6, device=device).transpose(0, 1)  # [50, 8, 6]
    t = torch.randn(50, 8, 6, device=device)
    ids = torch.randint(0, 3, (100,), device=device)[::2]
    assert_matches_reference(lambda s, t: bmc_fast.batched_distillation_loss(s, t, ids, 3),
                             lambda s, t: reference.batched_distillation_loss(s, t, ids, 3),
                             (s, t), [0, 1], torch.float32)


def test_batched_distillation_loss_deterministic_across_threads():
    s, t, ids, w = make(4096, 768, 8, torch.float32, "cpu")
    s.requires_grad_(True)
    outs = []
    old = torch.get_num_threads()
    try:
        for th in (1, 2, 2):
            torch.set_num_threads(th)
            loss = bmc_fast.batched_distillation_loss(s, t, ids, 8, w)
            outs.append((loss.detach(), torch.autograd.grad(loss, s)[0]))
    finally:
        torch.set_num_threads(old)
    for loss, g in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(g, outs[0][1])


def test_batched_distillation_loss_module(device):
    s, t, ids, w = make(20, 4, 3, torch.float32, device)
    mod = bmc_fast.nn.BatchedDistillationLoss(3, weights=w, reduction="mean")
    close(mod(s, t, ids), reference.batched_distillation_loss(s, t, ids, 3, w, "mean"), torch.float32)
    with pytest.raises(ValueError, match="num_experts"):
        bmc_fast.nn.BatchedDistillationLoss(0)
