"""Mixed-precision training steps of every loss: a small Linear makes the features (low precision
under autocast), the targets are stored in float32. Shared by test_autocast.py and test_cuda.py."""
from __future__ import annotations

import math

import torch

IN = 12


def _extras(device, g):
    n, c = 24, 20
    ln = torch.randint(1, c + 1, (n,), generator=g)
    off = (torch.rand(n, generator=g) * (c - ln + 1)).floor().long()
    y = off + (torch.rand(n, generator=g) * ln).floor().long()
    return dict(
        w=(torch.rand(3, generator=g) + 0.5).to(device),
        imp=torch.rand(40, generator=g).to(device),
        ids=torch.randint(0, 3, (n,), generator=g).to(device),
        off=off.to(device), ln=ln.to(device), y=y.to(device),
    )


# name: (rows of x, Linear width, stored target shape or None, loss of (module, features, target, extras))
CASES = {
    "stability_loss": (24, 16, (3, 8, 16),
                       lambda m, f, t, k: m.stability_loss(f.reshape(3, 8, 16), t, k["w"], "mean")),
    "weight_stability_loss": (3, 40, (40,),
                              lambda m, f, t, k: m.weight_stability_loss(f, t, k["imp"], k["w"], "sum")),
    "batched_distillation_loss": (24, 16, (24, 16),
                                  lambda m, f, t, k: m.batched_distillation_loss(f, t, k["ids"], 3, k["w"], "mean")),
    "task_masked_cross_entropy": (24, 20, None,
                                  lambda m, f, t, k: m.task_masked_cross_entropy(f, k["y"], k["off"], k["ln"])),
    "task_masked_kd_loss": (24, 20, (24, 20),
                            lambda m, f, t, k: m.task_masked_kd_loss(f, t, k["off"], k["ln"], 2.0, "mean")),
}


def setup(name, device, seed=0):
    """(linear, x, target, loss_fn) with the same values on every call; the target requires grad."""
    rows, width, target_shape, call = CASES[name]
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(IN, width)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(width, IN, generator=g) / math.sqrt(IN))
        lin.bias.copy_(torch.randn(width, generator=g) * 0.1)
    lin = lin.to(device)
    x = torch.randn(rows, IN, generator=g).to(device)
    t = torch.randn(*target_shape, generator=g).to(device).requires_grad_() if target_shape else None
    extras = _extras(device, g)
    return lin, x, t, lambda m, f, tt: call(m, f, tt, extras)


def step(name, module, device, amp_dtype=None, seed=0):
    """One training step of ``name`` (bmc_fast or bmc_fast.reference as ``module``), under autocast
    to ``amp_dtype`` if given; returns the loss, the features (with .grad), the Linear, the target."""
    lin, x, t, loss_fn = setup(name, device, seed)
    with torch.autocast(device, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        f = lin(x)
        f.retain_grad()
        loss = loss_fn(module, f, t)
    loss.backward()
    return loss.detach(), f, lin, t


def close_low_precision(actual, expected, msg=""):
    # A float32 step against one whose features are rounded to bfloat16/float16 (8 or 11 mantissa
    # bits) and whose Linear ran in that precision: errors scale with the tensor's magnitude (sums
    # over rows and features of rounded terms), so atol is relative to its largest element.
    expected = expected.to(actual.dtype)
    atol = 2e-2 * float(expected.abs().max()) + 1e-6
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=atol, msg=lambda m: f"{msg}: {m}")
