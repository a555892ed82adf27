"""bn_relu_dropout (the fused BatchNorm + ReLU + dropout of the ResMLP): values, gradients,
running statistics, dropout masks, opcheck, errors. The ResMLP built on it: tests/test_resmlp.py."""
import math

import pytest
import torch

from bmc_fast import reference
from bmc_fast.ops import bn_relu_dropout
from conftest import TOL

OP = torch.ops.bmc_fast.bn_relu_dropout.default
BACKWARD = torch.ops.bmc_fast.bn_relu_dropout_backward.default
FUSED_DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 64, 256), (3, 7, 70), (2, 2, 1), (1, 5, 129), (4, 3, 64)]


def make(k, b, c, n, dtype, running=True, pre=True):
    t = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    inputs = [t(k, b, c) * 3 + 1 for _ in range(n)]
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    weights = [t(k, c) for _ in range(n)]
    biases = [t(k, c) for _ in range(n)]
    rm = [torch.randn(k, c, dtype=dtype) for _ in range(n)] if running else None
    rv = [torch.rand(k, c, dtype=dtype) + 0.5 for _ in range(n)] if running else None
    pb = [t(k, c) for _ in range(n)] if pre else None
    return inputs, weights, biases, rm, rv, pb


def clone_stats(lst):
    return None if lst is None else [t.clone() for t in lst]


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_reference(dtype, n, shape, p):
    inputs, weights, biases, rm, rv, pb = make(*shape, n, dtype)
    rm2, rv2 = clone_stats(rm), clone_stats(rv)
    out = bn_relu_dropout(inputs, weights, biases, rm, rv, pb, momentum=0.2, eps=1e-5, p=p, seed=1234)
    ref = reference.bn_relu_dropout(inputs, weights, biases, rm2, rv2, pb, momentum=0.2, eps=1e-5, p=p, seed=1234)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(rm + rv, rm2 + rv2):
        torch.testing.assert_close(a, b, **tol)
    g = torch.randn_like(out)
    diff = inputs + weights + biases
    got = torch.autograd.grad(out, diff + pb, g)
    want = torch.autograd.grad(ref, diff, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    for gp in got[len(diff):]:  # a bias before a BatchNorm has an exactly-zero gradient
        assert torch.equal(gp, torch.zeros_like(gp))


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_unstacked_form(dtype):
    # One model's [B, C] inputs with [C] parameters: the K = 1 case without views.
    inputs, weights, biases, rm, rv, pb = make(1, 9, 33, 2, dtype)
    flat = lambda lst: [t.detach()[0].requires_grad_(t.requires_grad) for t in lst]  # noqa: E731
    i2, w2, b2, p2 = flat(inputs), flat(weights), flat(biases), flat(pb)
    rm2, rv2 = [t[0].clone() for t in rm], [t[0].clone() for t in rv]
    out2 = bn_relu_dropout(i2, w2, b2, rm2, rv2, p2, p=0.3, seed=8)
    out3 = bn_relu_dropout(inputs, weights, biases, rm, rv, pb, p=0.3, seed=8)
    ref = reference.bn_relu_dropout(i2, w2, b2, None, None, p2, p=0.3, seed=8)
    assert out2.shape == (9, 33)
    torch.testing.assert_close(out2, out3[0], rtol=0, atol=0)
    torch.testing.assert_close(out2, ref, **(TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)))
    for a, b in zip(rm2 + rv2, rm + rv):
        torch.testing.assert_close(a, b[0], rtol=0, atol=0)
    g2 = torch.autograd.grad(out2.sum(), i2 + w2 + b2 + p2)
    g3 = torch.autograd.grad(out3.sum(), inputs + weights + biases + pb)
    for a, b in zip(g2, g3):
        assert a.shape == b.shape[1:]
        torch.testing.assert_close(a, b[0], rtol=0, atol=0)
    torch.library.opcheck(OP, ([t.detach() for t in i2], [t.detach() for t in w2], [t.detach() for t in b2],
                               [t.detach() for t in p2], 1e-5, 0.3, 8))


def test_gradcheck():
    inputs, weights, biases, _, _, _ = make(2, 5, 9, 2, torch.float64, running=False, pre=False)
    n = 2

    def f(*a):
        return bn_relu_dropout(list(a[:n]), list(a[n:2 * n]), list(a[2 * n:]), p=0.25, seed=99)

    assert torch.autograd.gradcheck(f, tuple(inputs + weights + biases))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_mask_rate_and_reference_hash(p):
    k, b, c = 3, 256, 200
    x = torch.randn(k, b, c)
    out, mask, *_ = OP([x], [torch.ones(k, c)], [torch.full((k, c), 50.0)], [], 1e-5, p, 7)  # all pre-ReLU > 0
    keep = reference.dropout_keep_mask(7, (k, b, c), p)
    assert torch.equal(mask.bool(), keep)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / keep.numel()) + 1e-9
    # kept outputs are scaled by 1 / (1 - p), dropped ones are 0
    torch.testing.assert_close(out[~keep], torch.zeros_like(out[~keep]))
    assert (out[keep] > 0).all()
    # another seed gives another mask, and neighbouring rows are not copies of each other
    if 0 < p < 1:
        other = reference.dropout_keep_mask(8, (k, b, c), p)
        assert not torch.equal(keep, other)
        assert not torch.equal(keep[0, 0], keep[0, 1])


def test_seed_is_drawn_from_torch_generator():
    inputs, weights, biases, _, _, _ = make(1, 16, 32, 1, torch.float32, running=False, pre=False)
    torch.manual_seed(5)
    a = bn_relu_dropout(inputs, weights, biases, p=0.5)
    torch.manual_seed(5)
    b = bn_relu_dropout(inputs, weights, biases, p=0.5)
    c = bn_relu_dropout(inputs, weights, biases, p=0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_large_values_and_nan():
    k, b, c = 2, 9, 17
    x = torch.randn(k, b, c) * 1e4 + 1e5
    out = bn_relu_dropout([x], [torch.ones(k, c)], [torch.zeros(k, c)])
    ref = reference.bn_relu_dropout([x], [torch.ones(k, c)], [torch.zeros(k, c)])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    x[1, 3, 5] = float("nan")
    out = bn_relu_dropout([x], [torch.ones(k, c)], [torch.zeros(k, c)])
    assert torch.isnan(out[1, :, 5]).all()            # a NaN poisons its channel's statistics
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, :, 4]).any()


def test_threads_give_same_bits():
    inputs, weights, biases, _, _, _ = make(8, 64, 300, 2, torch.float32, running=False, pre=False)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            r = OP(inputs, weights, biases, [], 1e-5, 0.3, 3)
            g = BACKWARD(torch.ones_like(r[0]), r[1], r[2], r[3], weights, 0.3)
            outs.append([r[0], *g[0], *g[1]])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    inputs, weights, biases, _, _, _ = make(3, 6, 10, 1, torch.float32, running=False, pre=False)
    x = torch.randn(10, 6, 3).permute(2, 1, 0)
    w = torch.randn(10, 3).t()
    out = bn_relu_dropout([x], [w], biases, p=0.2, seed=4)
    ref = reference.bn_relu_dropout([x.contiguous()], [w.contiguous()], biases, p=0.2, seed=4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_run_the_reference(dtype):
    inputs, weights, biases, _, _, _ = make(2, 8, 16, 1, torch.float32, running=False, pre=False)
    cast = lambda lst: [t.detach().to(dtype) for t in lst]  # noqa: E731
    out = bn_relu_dropout(cast(inputs), cast(weights), cast(biases), p=0.1, seed=2)
    ref = reference.bn_relu_dropout(cast(inputs), cast(weights), cast(biases), p=0.1, seed=2)
    assert out.dtype == dtype and torch.equal(out, ref)


def test_opcheck():
    inputs, weights, biases, _, _, pb = make(2, 5, 33, 2, torch.float32, running=False)
    args = ([x.detach() for x in inputs], [w.detach() for w in weights], [b.detach() for b in biases],
            [p.detach() for p in pb], 1e-5, 0.3, 11)
    torch.library.opcheck(OP, args)
    grad_args = ([x.requires_grad_(True) for x in args[0]], args[1], args[2], args[3], 1e-5, 0.3, 11)
    torch.library.opcheck(OP, grad_args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, mask, xhats, invstds, _, _ = OP(*args)
    torch.library.opcheck(BACKWARD, (torch.randn_like(out), mask, xhats, invstds, args[1], 0.3))


def test_compile_traces_the_op():
    inputs, weights, biases, _, _, _ = make(2, 6, 12, 1, torch.float32, running=False, pre=False)
    args = ([x.detach() for x in inputs], [w.detach() for w in weights], [b.detach() for b in biases])

    def f(i, w, b):
        return OP(i, w, b, [], 1e-5, 0.2, 5)[0] * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), f(*args))


def test_compile_the_public_function():
    inputs, weights, biases, rm, rv, pb = make(2, 6, 12, 2, torch.float32)
    rm2, rv2 = clone_stats(rm), clone_stats(rv)

    def f(i, w, b, m, v, pre):
        return bn_relu_dropout(i, w, b, m, v, pre, p=0.2, seed=5) * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(inputs, weights, biases, rm, rv, pb)
    ref = f(inputs, weights, biases, rm2, rv2, pb)
    torch.testing.assert_close(out, ref)
    for a, b in zip(rm + rv, rm2 + rv2):
        torch.testing.assert_close(a, b)
    g = torch.autograd.grad(out.sum(), inputs + weights)
    g2 = torch.autograd.grad(ref.sum(), inputs + weights)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b)


BAD = [
    (lambda a, w, b: bn_relu_dropout([], w, b), ValueError, "inputs"),
    (lambda a, w, b: bn_relu_dropout([a[0][:, :1]], w, b), ValueError, "at least 2 rows"),
    (lambda a, w, b: bn_relu_dropout([a[0][0, 0]], w, b), ValueError, r"inputs\[0\] must have shape \[K, B, C\]"),
    (lambda a, w, b: bn_relu_dropout([a[0][0]], w, b), ValueError, r"weights\[0\] must have shape \[8\]"),
    (lambda a, w, b: OP([a[0][0].detach()], [w[0].detach()], [b[0].detach()], [], 1e-5, 0.0, 0), ValueError,
     r"weights\[0\] must have shape \[8\]"),
    (lambda a, w, b: bn_relu_dropout(a, [w[0][:, :3]], b), ValueError, r"weights\[0\]"),
    (lambda a, w, b: bn_relu_dropout(a, w, b, p=1.0), ValueError, "p must be"),
    (lambda a, w, b: bn_relu_dropout(a, w, b, p="0.1"), ValueError, "p must be"),
    (lambda a, w, b: bn_relu_dropout(a, w, b, momentum=None), ValueError, "momentum must be"),
    (lambda a, w, b: bn_relu_dropout(a, w, b, eps=0.0), ValueError, "eps must be"),
    (lambda a, w, b: bn_relu_dropout(a, w, b, momentum=2.0), ValueError, "momentum must be"),
    (lambda a, w, b: bn_relu_dropout(a, w, b, running_means=[torch.zeros(2, 8)]), ValueError, "running_vars"),
    (lambda a, w, b: bn_relu_dropout(a + a, w, b), ValueError, "weights must be a list of 2"),
    (lambda a, w, b: bn_relu_dropout([a[0].long()], w, b), TypeError, "floating"),
    (lambda a, w, b: bn_relu_dropout(a, [w[0].double()], b), TypeError, r"weights\[0\] must have the dtype"),
    (lambda a, w, b: OP([a[0][:, :1].detach()], [w[0].detach()], [b[0].detach()], [], 1e-5, 0.0, 0), ValueError,
     "at least 2 rows"),
    (lambda a, w, b: OP([a[0].detach()], [w[0].detach()], [b[0].detach()], [], 1e-5, 1.5, 0), ValueError, "p must"),
    (lambda a, w, b: OP([a[0].detach().half()], [w[0].detach().half()], [b[0].detach().half()], [], 1e-5, 0.0, 0),
     TypeError, "float32 or float64"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_arguments(case):
    fn, exc, match = BAD[case]
    inputs, weights, biases, _, _, _ = make(2, 4, 8, 1, torch.float32, running=False, pre=False)
    with pytest.raises(exc, match=match):
        fn(inputs, weights, biases)
