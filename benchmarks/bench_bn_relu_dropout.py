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
from _harness import _call, _check, time_and_record

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
    # minimum traffic: read 2 inputs, write the output (+ backward: read the output gradient,
    # write the 2 input gradients); the [K, C] parameters are negligible
    nbytes = (3 if mode == "fwd" else 6) * k * b * c * 4
    time_and_record(benchmark, machine, "bn_relu_dropout", f"K={k},B={b},C={c},p={P}", torch.float32, mode, calls,
                    compile_s, nbytes, reps=60, min_time=4.0)
