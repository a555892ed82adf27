"""adamw_step through bmc_fast.optim.AdamW (one fused kernel call per step) against torch's
AdamW: the default (a loop over the parameters on the CPU: `eager`), the same under
torch.compile (`compiled`), and torch's fused CPU kernel (`torch_fused`). Parameters: the
trainer's ResMLP (0.44M parameters in 28 tensors), one model and 4 stacked experts."""
import time

import pytest
import torch

from bmc_fast.backbone import ResMLP
from bmc_fast.optim import AdamW
import shapes
from _harness import time_and_record

SHAPES = [1, 4] if not shapes.QUICK else [1]  # K stacked copies of the ResMLP's parameters


def _params(k, seed=0):
    torch.manual_seed(seed)
    m = ResMLP(768, 40) if not shapes.QUICK else ResMLP(16, 4, hidden=8, width=8)
    ps = [(p.detach().repeat(k, *([1] * p.dim())) if k > 1 else p.detach().clone()).requires_grad_(True)
          for p in m.parameters()]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


@pytest.mark.parametrize("k", SHAPES)
def bench_adamw(benchmark, machine, k):
    kw = dict(lr=1e-3, weight_decay=1e-2)
    opts = {"bmc_fast": AdamW(_params(k), **kw), "eager": torch.optim.AdamW(_params(k), foreach=False, **kw),
            "compiled": torch.optim.AdamW(_params(k), foreach=False, **kw),
            "torch_fused": torch.optim.AdamW(_params(k), fused=True, **kw)}
    for o in opts.values():  # one step each: the state exists, values agree
        o.step()
    ref = opts["eager"].param_groups[0]["params"]
    for name in ("bmc_fast", "torch_fused"):
        for a, b in zip(opts[name].param_groups[0]["params"], ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()
    compiled_step = torch.compile(opts["compiled"].step)
    t0 = time.perf_counter()
    compiled_step()
    compile_s = time.perf_counter() - t0
    calls = {"bmc_fast": opts["bmc_fast"].step, "eager": opts["eager"].step, "compiled": compiled_step,
             "torch_fused": opts["torch_fused"].step}
    n = sum(p.numel() for p in ref)
    # minimum traffic: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
    time_and_record(benchmark, machine, "adamw_step", f"K={k},params={n}", torch.float32, "step", calls, compile_s,
                    7 * 4 * n, reps=60, min_time=4.0)
