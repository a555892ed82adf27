"""adamw_step (one AdamW update over a list of tensors in one kernel call) and the optimizer
built on it, bmc_fast.optim.AdamW: against the reference and torch.optim.AdamW, state dicts,
opcheck, errors."""
import copy

import pytest
import torch

from bmc_fast import reference
from bmc_fast.ops import adamw_step
from bmc_fast.optim import AdamW

OP = torch.ops.bmc_fast.adamw_step.default
SHAPES = [(300, 70), (70,), (1,), (5, 3, 2), (0,), (16385,)]  # 16385: two kernel chunks


def tensors(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    m = [torch.randn(s, generator=g, dtype=dtype) * 0.1 for s in shapes]
    v = [torch.rand(s, generator=g, dtype=dtype) * 0.01 for s in shapes]
    return p, m, v


def grads(dtype, seed, scale=1.0, shapes=SHAPES):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(s, generator=g, dtype=dtype) * scale for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step", [1, 2, 1000])
@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e4, 0.0])
def test_matches_reference(dtype, step, scale):
    p, m, v = tensors(dtype)
    p2, m2, v2 = (copy.deepcopy(t) for t in (p, m, v))
    g = grads(dtype, step, scale)
    adamw_step(p, g, m, v, lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.1, eps=1e-8, step=step)
    reference.adamw_step(p2, g, m2, v2, 1e-2, 0.8, 0.99, 0.1, 1e-8, step)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    for a, b in zip(p + m + v, p2 + m2 + v2):
        torch.testing.assert_close(a, b, **tol)


def test_reference_is_torch_adamw():
    p, _, _ = tensors(torch.float64)
    a = [t.clone().requires_grad_() for t in p]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    q = [t.clone() for t in p]
    opt = torch.optim.AdamW(a, lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05, foreach=False)
    for s in range(1, 6):
        g = grads(torch.float64, s)
        for t, gi in zip(a, g):
            t.grad = gi
        opt.step()
        reference.adamw_step(q, g, m, v, 3e-3, 0.85, 0.98, 0.05, 1e-7, s)
    for x, y in zip(a, q):
        torch.testing.assert_close(x.detach(), y, rtol=1e-13, atol=1e-15)


def test_same_bits_at_any_thread_count():
    outs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            p, m, v = tensors(torch.float32)
            adamw_step(p, grads(torch.float32, 3), m, v, lr=1e-3, step=3)
        finally:
            torch.set_num_threads(old)
        outs.append(p + m + v)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_and_layouts_run_the_reference(dtype):
    p, m, v = tensors(dtype, shapes=[(8, 4), (3,)])
    p2, m2, v2 = (copy.deepcopy(t) for t in (p, m, v))
    g = grads(dtype, 1, shapes=[(8, 4), (3,)])
    adamw_step(p, g, m, v, lr=1e-2, step=1)
    reference.adamw_step(p2, g, m2, v2, 1e-2, 0.9, 0.999, 1e-2, 1e-8, 1)
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, p2 + m2 + v2))
    # a non-contiguous parameter (a transposed view) also runs the reference, updating the view
    base = torch.randn(4, 6)
    pt, mt, vt = base.t(), torch.zeros(6, 4), torch.zeros(6, 4)
    want = pt.clone()
    reference.adamw_step([want], [torch.ones(6, 4)], [torch.zeros(6, 4)], [torch.zeros(6, 4)], 0.1, 0.9, 0.999,
                         0.0, 1e-8, 1)
    adamw_step([pt], [torch.ones(6, 4)], [mt], [vt], lr=0.1, weight_decay=0.0, step=1)
    torch.testing.assert_close(base.t(), want)


def test_opcheck():
    p, m, v = tensors(torch.float32, shapes=[(7, 3), (5,)])
    g = grads(torch.float32, 1, shapes=[(7, 3), (5,)])
    torch.library.opcheck(OP, (p, g, m, v, 1e-3, 0.9, 0.999, 0.01, 1e-8, 1))


BAD = [
    (lambda p, g, m, v: adamw_step(p, g[:1], m, v, lr=1e-3), ValueError, "grads must hold 2"),
    (lambda p, g, m, v: adamw_step(p, g, m, v, lr=-1.0), ValueError, "lr must be"),
    (lambda p, g, m, v: adamw_step(p, g, m, v, lr=float("nan")), ValueError, "lr must be"),
    (lambda p, g, m, v: adamw_step(p, g, m, v, lr=1e-3, beta1=1.0), ValueError, "beta1 must be"),
    (lambda p, g, m, v: adamw_step(p, g, m, v, lr=1e-3, eps=0.0), ValueError, "eps must be"),
    (lambda p, g, m, v: adamw_step(p, g, m, v, lr=1e-3, step=0), ValueError, "step must be"),
    (lambda p, g, m, v: adamw_step(p, [g[0], g[1][:2]], m, v, lr=1e-3), ValueError, r"grads\[1\] must have the shape"),
    (lambda p, g, m, v: adamw_step(p, g, [m[0].double(), m[1]], v, lr=1e-3), ValueError, r"exp_avgs\[0\]"),
    (lambda p, g, m, v: adamw_step(p, g, m, "v", lr=1e-3), TypeError, "exp_avg_sqs must be a list"),
    (lambda p, g, m, v: OP(p, g[:1], m, v, 1e-3, 0.9, 0.999, 0.0, 1e-8, 1), ValueError, "grads must hold 2"),
    (lambda p, g, m, v: OP(p, g, m, v, 1e-3, 0.9, 0.999, 0.0, 1e-8, 0), ValueError, "step must be >= 1"),
    (lambda p, g, m, v: OP(p, [g[0], g[1].double()], m, v, 1e-3, 0.9, 0.999, 0.0, 1e-8, 1), TypeError,
     r"grads\[1\] must have the dtype"),
    (lambda p, g, m, v: OP([p[0].half(), p[1]], g, m, v, 1e-3, 0.9, 0.999, 0.0, 1e-8, 1), TypeError,
     "float32 or float64"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_arguments(case):
    fn, exc, match = BAD[case]
    p, m, v = tensors(torch.float32, shapes=[(4, 3), (5,)])
    with pytest.raises(exc, match=match):
        fn(p, grads(torch.float32, 0, shapes=[(4, 3), (5,)]), m, v)


# ---- the optimizer --------------------------------------------------------------------------------

def _pair(dtype=torch.float32, **kw):
    p, _, _ = tensors(dtype, shapes=[(40, 30), (30,), (1,)])
    a = [t.clone().requires_grad_() for t in p]
    b = [t.clone().requires_grad_() for t in p]
    return a, b, AdamW(a, **kw), torch.optim.AdamW(b, foreach=False, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizer_matches_torch_adamw(dtype):
    a, b, o1, o2 = _pair(dtype, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    sched1 = torch.optim.lr_scheduler.StepLR(o1, 3, gamma=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(o2, 3, gamma=0.5)
    for s in range(12):
        g = grads(dtype, s, shapes=[(40, 30), (30,), (1,)])
        for x, y, gi in zip(a, b, g):
            x.grad, y.grad = gi.clone(), gi.clone()
        if s == 5:  # a parameter without a gradient is skipped, as torch does
            a[1].grad = b[1].grad = None
        o1.step(), o2.step(), sched1.step(), sched2.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)
    s1, s2 = o1.state_dict(), o2.state_dict()
    for i in range(3):
        assert float(s1["state"][i]["step"]) == float(s2["state"][i]["step"])
        torch.testing.assert_close(s1["state"][i]["exp_avg_sq"], s2["state"][i]["exp_avg_sq"], **tol)


def test_state_dicts_load_both_ways_and_mixed_steps_work():
    a, b, o1, o2 = _pair(lr=1e-2)
    for s in range(3):
        for x, y, gi in zip(a, b, grads(torch.float32, s, shapes=[(40, 30), (30,), (1,)])):
            x.grad, y.grad = gi.clone(), gi.clone()
        if s == 0:  # parameter 2 starts one step later: the steps differ from here on
            a[2].grad = b[2].grad = None
        o1.step(), o2.step()
    o3 = AdamW(a, lr=1e-2)
    o3.load_state_dict(o2.state_dict())  # torch's state (per-parameter steps 3, 3, 2) into ours
    o4 = torch.optim.AdamW(b, lr=1e-2, foreach=False)
    o4.load_state_dict(o1.state_dict())  # and ours into torch's
    for x, y in zip(a, b):
        with torch.no_grad():
            y.copy_(x)
    for s in range(3, 6):
        for x, y, gi in zip(a, b, grads(torch.float32, s, shapes=[(40, 30), (30,), (1,)])):
            x.grad, y.grad = gi.clone(), gi.clone()
        o3.step(), o4.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert [float(o3.state[p]["step"]) for p in a] == [6.0, 6.0, 5.0]


def test_optimizer_follows_parameters_changed_after_the_cache_was_built():
    """The kernel's preconditions are checked once per cached group; a parameter made
    non-contiguous later must still be stepped correctly (by the reference), not rejected."""
    a, b, o1, o2 = _pair(lr=1e-2, weight_decay=0.1)
    for s in range(6):
        if s == 2:
            for x in a + b:
                x.data = x.data.t().contiguous().t() if x.dim() == 2 else x.data
        for x, y, gi in zip(a, b, grads(torch.float32, s, shapes=[(40, 30), (30,), (1,)])):
            x.grad, y.grad = gi.clone(), gi.clone()
        o1.step(), o2.step()
    assert not a[0].is_contiguous()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert float(o1.state[a[0]]["step"]) == 6.0


def test_optimizer_rejects_bad_hyperparameters():
    p = [torch.zeros(2, requires_grad=True)]
    for kw, match in ((dict(lr=-1), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0), "eps"),
                      (dict(weight_decay=-0.1), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            AdamW(p, **kw)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    p = torch.randn(3, requires_grad=True)
    q = torch.randn(2, requires_grad=True)
    opt = AdamW([p, q])
    (p.sum() * 2 + q.square().sum()).backward()
    opt.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert p.grad is None and q.grad is None
    else:
        assert torch.equal(p.grad, torch.zeros(3)) and torch.equal(q.grad, torch.zeros(2))


def test_trainer_picks_the_fused_optimizer_where_it_runs():
    from bmc_fast.train.step import adamw

    cpu = [torch.zeros(3, requires_grad=True)]
    assert type(adamw(cpu, 1e-3, 0.0)) is AdamW
    assert type(adamw(cpu, 1e-3, 0.0, fused=False)) is torch.optim.AdamW  # the plain script's optimizer
    half = [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)]
    assert type(adamw(half, 1e-3, 0.0)) is torch.optim.AdamW  # torch's (fused where it can) for other dtypes


def test_building_the_optimizer_and_a_fused_run_never_import_dynamo():
    """torch's add_param_group sits under a wrapper whose first call imports torch._dynamo (about a
    second of every process); bmc_fast's AdamW and a whole BMC.fit on the fused path do without it."""
    import subprocess
    import sys

    code = ("import sys, torch, bmc_fast\n"
            "from bmc_fast import BMC, BMCConfig\n"
            "from bmc_fast.data import demo_stream\n"
            "from bmc_fast.optim import AdamW\n"
            "opt = AdamW([torch.zeros(3, requires_grad=True)], lr=0.1)\n"
            "opt.add_param_group({'params': [torch.zeros(2, requires_grad=True)], 'lr': 0.2})\n"
            "assert [g['lr'] for g in opt.param_groups] == [0.1, 0.2] and opt.param_groups[1]['eps'] == 1e-8\n"
            "try:\n"
            "    opt.add_param_group({'params': opt.param_groups[0]['params']})\n"
            "    raise SystemExit('a parameter in two groups was accepted')\n"
            "except ValueError:\n"
            "    pass\n"
            "stream = type(demo_stream())(list(demo_stream())[:2])\n"
            "BMC(BMCConfig(n_experts=2, epochs=1, consolidation_epochs=1, progress=False, threads=1)).fit(stream)\n"
            "print('torch._dynamo' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "False"
