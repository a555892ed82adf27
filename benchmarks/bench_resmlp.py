"""resmlp (the fused ResMLP training forward + backward, K stacked models or one) against the same
network in eager PyTorch (F.linear / batched matmuls, F.batch_norm with batch statistics,
relu, F.dropout: what an nn.Module or vmap over it runs) and that function under torch.compile.
fwd+bwd only (the op exists for training). Dropout masks differ between providers (torch's
bernoulli vs bmc_fast's counter hash), so values are checked at p = 0 and timed at p = 0.3.
Sizes: the trainer's ResMLP (768-D inputs, 128, 2 blocks of 256, 40 classes)."""
import time

import pytest
import torch
import torch.nn.functional as F

from bmc_fast.ops import resmlp
import shapes
from _harness import _call, time_and_record

DIMS = (768, 128, 256, 256, 40) if not shapes.QUICK else (16, 8, 12, 12, 4)
SHAPES = [(1, 64), (4, 64), (4, 256)] if not shapes.QUICK else [(2, 8)]  # (K, B); K = 1: one unstacked model
P = 0.3


def _unpack(t, nw):
    nbn = nw - 2
    return list(t[:nw]), list(t[nw:2 * nw]), list(t[2 * nw:2 * nw + nbn]), list(t[2 * nw + nbn:])


def eager(p, nw):
    def net(x, *t):
        w, b, g, be = _unpack(t, nw)
        stacked = x.dim() == 3
        k, bsz = (x.shape[0], x.shape[1]) if stacked else (1, x.shape[0])

        def lin(h, i):  # with the bias, as nn.Linear (before a BatchNorm it cancels)
            if not stacked:
                return F.linear(h, w[i], b[i])
            return torch.baddbmm(b[i].unsqueeze(1), h, w[i].transpose(1, 2))

        def bn(a, j):  # batch statistics per (model, channel): channels of a [B, K*C] view
            c = a.shape[-1]
            flat = a.transpose(0, 1).reshape(bsz, k * c) if stacked else a
            y = F.batch_norm(flat, None, None, g[j].reshape(-1), be[j].reshape(-1), training=True)
            return y.view(bsz, k, c).transpose(0, 1) if stacked else y

        h = lin(x, 0)
        for blk in range((nw - 2) // 3):
            i, j = 1 + 3 * blk, 3 * blk
            r = torch.relu(bn(lin(h, i), j))
            h = F.dropout(torch.relu(bn(lin(r, i + 1), j + 1) + bn(lin(h, i + 2), j + 2)), p,
                          training=True)
        return lin(h, nw - 1).sum() + h.sum()
    return net


def fused(p, nw):
    def net(x, *t):
        w, b, g, be = _unpack(t, nw)
        logits, h = resmlp(x, w, b, g, be, p=[p] * ((nw - 2) // 3))
        return logits.sum() + h.sum()
    return net


def make(k, b):
    lead = () if k == 1 else (k,)
    d_in, proj, *widths, c = DIMS
    x = torch.randn(*lead, b, d_in)
    shapes_w = [(proj, d_in)]
    width = proj
    for wd in widths:
        shapes_w += [(wd, width), (wd, wd), (wd, width)]
        width = wd
    shapes_w.append((c, width))
    w = [torch.randn(*lead, *s) * s[1] ** -0.5 for s in shapes_w]
    bias = [torch.randn(*lead, s[0]) * 0.1 for s in shapes_w]
    bn_w = [torch.rand(*lead, s[0]) + 0.5 for s in shapes_w[1:-1]]
    bn_b = [torch.randn(*lead, s[0]) * 0.1 for s in shapes_w[1:-1]]
    return (x, *w, *bias, *bn_w, *bn_b), len(w)


def _check(out, ref, what):
    for a, r in zip((out[0], *out[1]), (ref[0], *ref[1])):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * max(1.0, r.abs().max().item()),
                                   msg=lambda m: f"{what} disagrees with eager: {m}")


@pytest.mark.parametrize("k,b", SHAPES)
def bench_resmlp(benchmark, machine, k, b):
    inputs, nw = make(k, b)
    diff = list(range(1, len(inputs)))  # every parameter (not x)
    # Values in float64: in float32 a ReLU input within rounding of 0 can flip a mask bit between
    # providers and move one row's contribution to a gradient (seen at K=4, B=256).
    wide = tuple(t.double() for t in inputs)
    ref = _call(eager(0.0, nw), wide, diff, "fwd+bwd")()
    _check(_call(fused(0.0, nw), wide, diff, "fwd+bwd")(), ref, "bmc_fast")

    torch._dynamo.reset()
    compiled = torch.compile(eager(P, nw), fullgraph=True, dynamic=False)
    calls = {n: _call(f, inputs, diff, "fwd+bwd") for n, f in
             (("bmc_fast", fused(P, nw)), ("eager", eager(P, nw)), ("compiled", compiled))}
    t0 = time.perf_counter()
    calls["compiled"]()
    compile_s = time.perf_counter() - t0
    # A matmul-bound op: the bandwidth column is only the floor traffic (read x and the
    # parameters, write their gradients), not what limits it; the GFLOP/s are in RESULTS.md.
    n_params = sum(t.numel() for t in inputs[1:])
    nbytes = 4 * (inputs[0].numel() + 2 * n_params)
    time_and_record(benchmark, machine, "resmlp", f"K={k},B={b},p={P}", torch.float32, "fwd+bwd", calls, compile_s,
                    nbytes, reps=40, min_time=4.0)
