import pytest
import torch

import bmc_fast
from bmc_fast import reference
from _checks import assert_matches_reference, close, fwd_bwd
from conftest import DTYPES

OP = torch.ops.bmc_fast.stability_loss.default
SHAPES = [(4, 8, 16), (1, 5), (3, 41, 23), (2, 423), (8, 2, 3, 5)]


def make(shape, dtype, device, weights=True):
    e = torch.randn(shape, device=device).to(dtype)
    b = torch.randn(shape, device=device).to(dtype)
    w = torch.rand(shape[0], device=device).to(dtype) + 0.5 if weights else None
    return e, b, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_stability_loss_matches_reference(device, dtype, reduction, shape):
    e, b, w = make(shape, dtype, device)
    for weights, diff in ((None, [0, 1]), (w, [0, 1, 2])):
        assert_matches_reference(
            lambda *a: bmc_fast.stability_loss(*a, reduction=reduction),
            lambda *a: reference.stability_loss(*a, reduction=reduction),
            (e, b, weights), diff, dtype)


def test_stability_loss_not_last_layer(device):
    e, b, w = make((4, 32, 17), torch.float32, device)
    assert_matches_reference(bmc_fast.stability_loss, reference.stability_loss, (e, b, w), [0, 1, 2],
                             torch.float32, mult=3.0)


def test_stability_loss_no_grad_forward(device):
    e, b, w = make((4, 32, 17), torch.float32, device)
    e.requires_grad_(True)
    with torch.no_grad():
        loss = bmc_fast.stability_loss(e, b, w)
    assert not loss.requires_grad
    close(loss, reference.stability_loss(e.detach(), b, w), torch.float32)
    out = OP(e.detach(), b, w, "sum", False)
    assert out[1].numel() == 0


def test_stability_loss_gradcheck(device):
    e, b, w = make((3, 4, 5), torch.float64, device)
    for red in ("sum", "mean", "none"):
        torch.autograd.gradcheck(lambda x, y, z: bmc_fast.stability_loss(x, y, z, red),
                                 (e.requires_grad_(), b.requires_grad_(), w.requires_grad_()))


def test_stability_loss_opcheck(device):
    for rg in (False, True):
        e, b, w = make((3, 7, 5), torch.float32, device)
        if rg:
            e.requires_grad_(True)
        for red in ("sum", "none"):
            torch.library.opcheck(OP, (e, b, w, red, rg))
            torch.library.opcheck(OP, (e, b, None, red, rg))


def test_stability_loss_compile(device):
    e, b, w = make((4, 16, 33), torch.float32, device)
    fn = torch.compile(lambda x, y, z: bmc_fast.stability_loss(x, y, z, "mean"), fullgraph=True)
    loss, grads, g = fwd_bwd(fn, (e, b, w), [0, 1])
    loss_r, grads_r, _ = fwd_bwd(lambda x, y, z: reference.stability_loss(x, y, z, "mean"), (e, b, w), [0, 1], g)
    close(loss, loss_r, torch.float32)
    for a, r in zip(grads, grads_r):
        close(a, r, torch.float32)


def test_stability_loss_edge_cases(device):
    # K = 1, empty feature dimension, K = 0, non-contiguous inputs.
    for shape in [(1, 1), (1, 0), (0, 4)]:
        e, b, _ = make(shape, torch.float32, device, weights=False)
        for red in ("sum", "mean", "none"):
            close(bmc_fast.stability_loss(e, b, reduction=red), reference.stability_loss(e, b, reduction=red),
                  torch.float32, str(shape))
    base = torch.randn(16, 4, 9, device=device)
    e = base.transpose(0, 1)[:, ::2]  # [4, 8, 9], non-contiguous
    b = torch.randn(9, 8, 4, device=device).permute(2, 1, 0)
    assert not e.is_contiguous() and not b.is_contiguous()
    assert_matches_reference(bmc_fast.stability_loss, reference.stability_loss, (e, b), [0, 1], torch.float32)


def test_stability_loss_large_values(device):
    for dtype in (torch.float32, torch.bfloat16):
        e = (torch.randn(4, 64, device=device) * 100).to(dtype)
        b = (torch.randn(4, 64, device=device) * 100).to(dtype)
        close(bmc_fast.stability_loss(e, b), reference.stability_loss(e, b), dtype)


def test_stability_loss_nan_propagates(device):
    e, b, _ = make((3, 40), torch.float32, device, weights=False)
    e[1, 7] = float("nan")
    out = bmc_fast.stability_loss(e, b, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[0]) and torch.isfinite(out[2])


def test_stability_loss_deterministic_across_threads():
    e, b, w = make((3, 70000), torch.float32, "cpu")
    e.requires_grad_(True)
    results = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            loss = bmc_fast.stability_loss(e, b, w)
            (g,) = torch.autograd.grad(loss, e)
            results.append((loss.detach(), g))
    finally:
        torch.set_num_threads(old)
    for loss, g in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(g, results[0][1])


def test_stability_loss_module(device):
    e, b, w = make((4, 8), torch.float32, device)
    mod = bmc_fast.nn.StabilityLoss(weights=w, reduction="mean")
    close(mod(e, b), reference.stability_loss(e, b, w, "mean"), torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        bmc_fast.nn.StabilityLoss(reduction="avg")


def test_stability_loss_repeated_backward(device):
    # The gradient buffer is scaled in place only when the graph is freed; a retained graph
    # gives the same gradient on every backward.
    e, b, _ = make((2, 8), torch.float32, device, weights=False)
    e.requires_grad_(True)
    loss = bmc_fast.stability_loss(e, b) * 2
    (g1,) = torch.autograd.grad(loss, e, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, e, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, e)
    expected = 2 * 2 * (e - b).detach() / 8
    for g in (g1, g2, g3):
        close(g, expected, torch.float32)


def test_large_gradient_buffers_are_reused_only_when_free():
    # Buffers >= 16 MB come from a cache of earlier gradient outputs; one still referenced
    # anywhere (a kept raw-op output, a leaf's .grad) must never be handed out again.
    e = torch.randn(2, 2_100_000, requires_grad=True)
    b = torch.randn(2, 2_100_000)
    kept = OP(e.detach(), b, None, "sum", True)[1]
    snapshot = kept.clone()
    bmc_fast.stability_loss(e, b).backward()
    g1 = e.grad
    g1_copy = g1.clone()
    seen = set()
    for _ in range(3):  # more calls while kept and e.grad are alive
        out = OP(e.detach() * 2, b, None, "sum", True)[1]
        assert out.data_ptr() not in (kept.data_ptr(), g1.data_ptr())
        seen.add(out.data_ptr())
    assert torch.equal(kept, snapshot) and torch.equal(e.grad, g1_copy)
    torch.testing.assert_close(e.grad, 2 * (e - b).detach() / 2_100_000)
    # once released, a buffer is reused
    del out
    again = OP(e.detach(), b, None, "sum", True)[1]
    assert again.data_ptr() in seen
