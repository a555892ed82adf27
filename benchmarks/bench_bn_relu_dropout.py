"""bn_relu_dropout (the residual-block output of the ResMLP: BN(a1) + BN(a2), ReLU, dropout 0.3)
against the same computation in eager PyTorch (two batch_norm calls, add, relu, F.dropout) and
that eager function under torch.compile. The masks differ between providers (torch's bernoulli
vs bmc_fast's counter hash), so values are checked at p = 0 and timed at p = 0.3."""
import time

import pytest
import torch
import torch.nn.functional as F

from bmc_fast.ops import bn_relu_dropout
import shapes
from _harness import _call, _check, peak_memory, quantiles, record, run_interleaved

SHAPES = [(1, 64, 256), (4, 64, 256), (16, 512, 256)] if not shapes.QUICK else [(2, 8, 16)]
P = 0.3


def eager(p):
    def block(a1, a2, w1, w2, b1, b2):
        k, b, c = a1.shape

        def bn(a, w, bias):  # per (model, channel) statistics: channels of a [B, K*C] view
            y = F.batch_norm(a.transpose(0, 1).reshape(b, k * c), None, None, w.reshape(-1), bias.reshape(-1),
                             training=True)
            return y.view(b, k, c).transpose(0, 1)

        return F.dropout(torch.relu(bn(a1, w1, b1) + bn(a2, w2, b2)), p, training=True)
    return block


def fused(p):
    def block(a1, a2, w1, w2, b1, b2):
        return bn_relu_dropout([a1, a2], [w1, w2], [b1, b2], p=p)
    return block


def _loss(fn):
    return lambda *a: fn(*a).sum()


@pytest.mark.parametrize("k,b,c", SHAPES)
@pytest.mark.parametrize("mode", shapes.MODES)
def bench_bn_relu_dropout(benchmark, machine, k, b, c, mode):
    inputs = (torch.randn(k, b, c), torch.randn(k, b, c), torch.rand(k, c) + 0.5, torch.rand(k, c) + 0.5,
              torch.randn(k, c), torch.randn(k, c))
    diff = [0, 1, 2, 3, 4, 5]
    # values first, without dropout
    torch._dynamo.reset()
    check = {n: _call(_loss(f), inputs, diff, mode) for n, f in
             (("bmc_fast", fused(0.0)), ("eager", eager(0.0)), ("compiled", torch.compile(eager(0.0))))}
    ref = check["eager"]()
    _check(check["bmc_fast"](), ref, torch.float32, "bmc_fast")
    _check(check["compiled"](), ref, torch.float32, "compiled")

    torch._dynamo.reset()
    compiled = torch.compile(eager(P), fullgraph=True, dynamic=False)
    calls = {n: _call(_loss(f), inputs, diff, mode) for n, f in
             (("bmc_fast", fused(P)), ("eager", eager(P)), ("compiled", compiled))}
    t0 = time.perf_counter()
    calls["compiled"]()
    compile_s = time.perf_counter() - t0
    times = run_interleaved(calls, machine.device, reps=60, min_time=4.0)
    q = {n: quantiles(ts) for n, ts in times.items()}
    mem = {n: peak_memory(f, machine.device) for n, f in calls.items()}
    t_b = q["bmc_fast"]["median"]
    # minimum traffic: read 2 inputs, write the output (+ backward: read the output gradient,
    # write the 2 input gradients); the [K, C] parameters are negligible
    nbytes = (3 if mode == "fwd" else 6) * k * b * c * 4
    row = record({
        "op": "bn_relu_dropout", "mode": mode, "dtype": "float32", "shape": f"K={k},B={b},C={c},p={P}",
        "device": machine.device, "device_name": machine.name, "threads": machine.threads,
        "contended": machine.contended,
        **{f"t_{n}_ms": q[n]["median"] * 1e3 for n in q},
        **{f"t_{n}_p20_ms": q[n]["p20"] * 1e3 for n in q},
        **{f"t_{n}_p80_ms": q[n]["p80"] * 1e3 for n in q},
        "reps": q["bmc_fast"]["n"],
        "speedup_vs_eager": q["eager"]["median"] / t_b,
        "speedup_vs_compile": q["compiled"]["median"] / t_b,
        "compile_s": compile_s, "bytes_min": nbytes, "gbps": nbytes / t_b / 1e9,
        "bw_fraction": nbytes / t_b / 1e9 / machine.copy_gbps,
        **{f"mem_{n}_mb": (m / 2**20 if m is not None else None) for n, m in mem.items()},
    })
    benchmark.extra_info.update(row)
    benchmark.pedantic(calls["bmc_fast"], rounds=3, iterations=1, warmup_rounds=0)
