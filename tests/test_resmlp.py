"""resmlp (the training-mode forward + backward of a (stacked) ResMLP in one op call each) and the
fused ResMLP module path built on it: values, gradients, running statistics, opcheck, errors."""
import copy

import pytest
import torch
from torch.func import stack_module_state

from bmc_fast import reference
from bmc_fast.backbone import ResMLP, fused_path_available, resmlp_forward
from bmc_fast.ops import resmlp
from conftest import TOL

OP = torch.ops.bmc_fast.resmlp_forward.default
BACKWARD = torch.ops.bmc_fast.resmlp_backward.default
FUSED_DTYPES = [torch.float32, torch.float64]


def make(k, b, dims, dtype=torch.float32, grad=True):
    """A random ResMLP's lists for k stacked models (k=None: one model) with widths
    dims = (input, proj, block widths..., classes), a block's width w or (inner, w); returns (x,
    weights, biases, bn_weights, bn_biases, running_means, running_vars)."""
    torch.manual_seed(1234 + b)  # fixed data: a ReLU input within rounding of 0 flips a mask bit
    lead = () if k is None else (k,)

    def t(*s, scale=1.0, shift=0.0):
        return (torch.randn(*lead, *s, dtype=dtype) * scale + shift).requires_grad_(grad)

    d_in, proj, *widths, c = dims
    x = t(b, d_in)
    weights, biases = [t(proj, d_in, scale=d_in ** -0.5)], [t(proj, scale=0.1)]
    bn_w, bn_b, rm, rv = [], [], [], []
    width = proj
    for block in widths:
        m, w = block if isinstance(block, tuple) else (block, block)
        for shape in ((m, width), (w, m), (w, width)):
            out = shape[0]
            weights.append(t(*shape, scale=shape[1] ** -0.5))
            biases.append(t(out, scale=0.1))
            bn_w.append(t(out, scale=0.2, shift=1.0))
            bn_b.append(t(out, scale=0.1))
            rm.append(torch.randn(*lead, out, dtype=dtype))
            rv.append(torch.rand(*lead, out, dtype=dtype) + 0.5)
        width = w
    weights.append(t(c, width, scale=width ** -0.5))
    biases.append(t(c, scale=0.1))
    return x, weights, biases, bn_w, bn_b, rm, rv


def detached(lst):
    return [t.detach() for t in lst]


CASES = [  # (k, b, dims)
    (None, 16, (20, 12, 24, 24, 7)),
    (3, 16, (20, 12, 24, 24, 7)),
    (2, 2, (5, 3, 1, 2)),          # B = 2, a width-1 block
    (1, 9, (7, 5, 6, 4, 3, 1)),    # three blocks, one class
    (None, 64, (33, 16, 40, 10)),  # one block
    (None, 16, (20, 12, (8, 24), (8, 24), 7)),  # blocks narrower inside (parity's 128 in 256)
    (3, 16, (20, 12, (8, 24), (30, 24), 7)),    # stacked; narrower and wider inside
    (2, 5, (7, 3, (1, 4), 2)),                  # an inner width of 1, odd rows
]


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_reference(dtype, case, p):
    k, b, dims = CASES[case]
    x, w, bs, bw, bb, rm, rv = make(k, b, dims, dtype)
    rm2, rv2 = [t.clone() for t in rm], [t.clone() for t in rv]
    ps, seeds = [p] * (len(dims) - 3), list(range(5, 5 + len(dims) - 3))
    logits, feats = resmlp(x, w, bs, bw, bb, rm, rv, 0.2, 1e-5, ps, seeds)
    rl, rf = reference.resmlp(x, w, bs, bw, bb, rm2, rv2, 0.2, 1e-5, ps, seeds)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    if b == 2 and dtype == torch.float32:  # BatchNorm over 2 rows is ill-conditioned (xhat = +-1):
        tol = dict(rtol=1e-3, atol=1e-5)   # float32 gradients agree to ~2e-4 relative only
    torch.testing.assert_close(logits, rl, **tol)
    torch.testing.assert_close(feats, rf, **tol)
    for a, r in zip(rm + rv, rm2 + rv2):
        torch.testing.assert_close(a, r, **tol)
    gl, gf = torch.randn_like(logits), torch.randn_like(feats)
    params = w + bs + bw + bb
    got = torch.autograd.grad((logits * gl).sum() + (feats * gf).sum(), [x] + params)
    want = torch.autograd.grad((rl * gl).sum() + (rf * gf).sum(), [x] + params, allow_unused=True,
                               materialize_grads=True)
    pre_bn = {1 + len(w) + i for i in range(1, len(w) - 1)}  # the Linear biases before a BatchNorm
    for i, (a, r) in enumerate(zip(got, want)):
        if i in pre_bn:
            assert torch.equal(a, torch.zeros_like(a)), i
        elif i == 1 + len(w):  # proj's bias: every path from it ends in a BatchNorm; both are rounding noise
            assert a.abs().max() < 1e-3 and r.abs().max() < 1e-3
        else:  # atol relative to the gradient's scale (sums over rows)
            scale = 1e-6 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(a, r, rtol=tol["rtol"], atol=tol["atol"] + scale * r.abs().max().item(),
                                       msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("k", [None, 3])
def test_parameter_gradients_without_an_input_gradient(k):
    # Training never wants d/dx: the backward then computes the input layer's weight gradient
    # alone (another matmul schedule than beside the input gradient); same values either way.
    x, w, bs, bw, bb, _, _ = make(k, 64, (48, 32, 64, 10))
    params = w + bs + bw + bb
    out = resmlp(x, w, bs, bw, bb, p=[0.3], seeds=[4])
    gl, gf = torch.randn_like(out[0]), torch.randn_like(out[1])
    loss = lambda o: (o[0] * gl).sum() + (o[1] * gf).sum()  # noqa: E731
    with_x = torch.autograd.grad(loss(out), [x] + params)[1:]
    without_x = torch.autograd.grad(loss(resmlp(x.detach(), w, bs, bw, bb, p=[0.3], seeds=[4])), params)
    for i, (a, b) in enumerate(zip(with_x, without_x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("which", ["logits", "features"])
def test_gradient_of_one_output(which):
    x, w, bs, bw, bb, _, _ = make(2, 8, (6, 5, 8, 8, 3))
    out = resmlp(x, w, bs, bw, bb, p=[0.2, 0.2], seeds=[1, 2])
    ref = reference.resmlp(x, w, bs, bw, bb, p=[0.2, 0.2], seeds=[1, 2])
    i = 0 if which == "logits" else 1
    got = torch.autograd.grad(out[i].square().sum(), [x] + w + bw + bb)
    want = torch.autograd.grad(ref[i].square().sum(), [x] + w + bw + bb, allow_unused=True, materialize_grads=True)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_gradcheck():
    x, w, bs, bw, bb, _, _ = make(2, 5, (4, 3, 4, 4, 2), torch.float64)
    n, nb = len(w), len(bw)

    def f(x, *t):
        return resmlp(x, list(t[:n]), list(t[n:2 * n]), list(t[2 * n:2 * n + nb]), list(t[2 * n + nb:]),
                      p=[0.25, 0.25], seeds=[3, 4])

    assert torch.autograd.gradcheck(f, (x, *w, *bs, *bw, *bb))


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("k", [None, 3])
def test_first_model_matches_reference(dtype, k):
    # Model j draws the dropout masks of model first_model + j: values and gradients as the
    # reference's, whose mask counters start at (first_model + j) * B * C.
    x, w, bs, bw, bb, _, _ = make(k, 16, (20, 12, 24, 24, 7), dtype)
    ps, seeds = [0.4, 0.4], [21, 22]
    out = resmlp(x, w, bs, bw, bb, p=ps, seeds=seeds, first_model=4)
    ref = reference.resmlp(x, w, bs, bw, bb, p=ps, seeds=seeds, first_model=4)
    ref0 = reference.resmlp(x, w, bs, bw, bb, p=ps, seeds=seeds)
    assert not torch.allclose(ref[1], ref0[1])  # first_model changes the masks
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, **tol)
    gl, gf = torch.randn_like(out[0]), torch.randn_like(out[1])
    params = [x] + w + bw + bb
    got = torch.autograd.grad((out[0] * gl).sum() + (out[1] * gf).sum(), params)
    want = torch.autograd.grad((ref[0] * gl).sum() + (ref[1] * gf).sum(), params)
    scale = 1e-6 if dtype == torch.float32 else 1e-12
    for i, (a, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, r, rtol=tol["rtol"], atol=tol["atol"] + scale * r.abs().max().item(),
                                   msg=lambda m, i=i: f"gradient {i}: {m}")


def test_model_k_of_a_stack_gets_the_masks_of_model_first_model_plus_k():
    # The masks are keyed by the model index, not the stack slot: model j of a stack run with
    # first_model=f has the dropout masks of that model alone run with first_model=f + j.
    k, f = 3, 2
    x, w, bs, bw, bb, _, _ = make(k, 16, (20, 12, 24, 24, 7), grad=False)
    args = (1e-5, [0.5, 0.5], [31, 32])
    _, feats, saved, _, _ = OP(x, w, bs, bw, bb, *args, f)
    masks = [saved[10 * b + 5] for b in range(2)]  # the dropout masks (layout: csrc/cpu/resmlp.cpp)
    for j in range(k):
        one = lambda lst: [t[j] for t in lst]  # noqa: E731
        _, feats_j, saved_j, _, _ = OP(x[j], one(w), one(bs), one(bw), one(bb), *args, f + j)
        for b in range(2):
            assert torch.equal(masks[b][j], saved_j[10 * b + 5]), (j, b)
        torch.testing.assert_close(feats[j], feats_j, rtol=1e-5, atol=1e-6)
        _, _, saved_0, _, _ = OP(x[j], one(w), one(bs), one(bw), one(bb), *args, 0)
        if j + f != 0:
            assert not torch.equal(masks[1][j], saved_0[10 + 5])


def test_resmlp_train_forward_keys_dropout_by_first_model():
    # The fused ResMLP path (bmc_fast.backbone.resmlp_train_forward) over a stack with
    # first_model=f gives model j what one model gets with first_model=f + j.
    from bmc_fast.backbone import fused_args, resmlp_train_forward

    torch.manual_seed(2)
    members = [ResMLP(20, 5, hidden=8, width=16, dropout=0.5).train() for _ in range(3)]
    params, buffers = stack_module_state([copy.deepcopy(m) for m in members])
    x = torch.randn(3, 10, 20)
    logits, feats = resmlp_train_forward(members[0], fused_args(members[0], params, buffers), x, seeds=[3, 4],
                                         first_model=6)
    for j, m in enumerate(members):
        lj, fj = resmlp_train_forward(m, fused_args(m), x[j], seeds=[3, 4], first_model=6 + j)
        torch.testing.assert_close(logits[j], lj, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats[j], fj, rtol=1e-5, atol=1e-6)
        for name, b in m.named_buffers():
            torch.testing.assert_close(buffers[name][j].to(b.dtype), b, rtol=1e-5, atol=1e-6, msg=name)
    _, f0 = resmlp_train_forward(members[1], fused_args(members[1]), x[1], seeds=[3, 4])
    assert not torch.allclose(f0, feats[1], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="first_model must be >= 0"):
        resmlp_train_forward(members[0], fused_args(members[0]), x[0], seeds=[3, 4], first_model=-1)


def test_seeds_are_drawn_from_torch_generator():
    x, w, bs, bw, bb, _, _ = make(None, 32, (6, 5, 8, 8, 3), grad=False)
    torch.manual_seed(7)
    a = resmlp(x, w, bs, bw, bb, p=[0.5, 0.5])[1]
    torch.manual_seed(7)
    b = resmlp(x, w, bs, bw, bb, p=[0.5, 0.5])[1]
    c = resmlp(x, w, bs, bw, bb, p=[0.5, 0.5])[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_non_contiguous_and_large_inputs():
    x, w, bs, bw, bb, _, _ = make(2, 12, (10, 6, 8, 3), grad=False)
    xt = (x.transpose(0, 1).contiguous().transpose(0, 1) * 1e4)  # [K, B, I] view of a [B, K, I] tensor
    wt = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in w]
    assert not xt.is_contiguous() and not wt[1].is_contiguous()
    out = resmlp(xt, wt, bs, bw, bb, p=[0.1], seeds=[9])
    ref = reference.resmlp(xt, wt, bs, bw, bb, p=[0.1], seeds=[9])
    assert torch.isfinite(out[0]).all()
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_run_the_reference(dtype):
    x, w, bs, bw, bb, _, _ = make(2, 8, (6, 5, 8, 3), grad=False)
    cast = lambda lst: [t.to(dtype) for t in lst]  # noqa: E731
    out = resmlp(x.to(dtype), cast(w), cast(bs), cast(bw), cast(bb), p=[0.2], seeds=[1])
    ref = reference.resmlp(x.to(dtype), cast(w), cast(bs), cast(bw), cast(bb), p=[0.2], seeds=[1])
    assert out[0].dtype == dtype and torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("first_model", [None, 0, 3])
@pytest.mark.parametrize("block", [8, (6, 8)])  # one width, or narrower inside
def test_opcheck(first_model, block):
    x, w, bs, bw, bb, _, _ = make(2, 6, (5, 4, block, 3), grad=False)
    fm = () if first_model is None else (first_model,)
    args = (x, w, bs, bw, bb, 1e-5, [0.3], [11], *fm)
    torch.library.opcheck(OP, args)
    grad_args = (x, [t.clone().requires_grad_(True) for t in w], bs, bw, bb, 1e-5, [0.3], [11], *fm)
    torch.library.opcheck(OP, grad_args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    logits, feats, saved, _, _ = OP(*args)
    torch.library.opcheck(BACKWARD, (torch.randn_like(logits), torch.randn_like(feats), x, feats, w, bw, saved, [0.3],
                                     True))
    torch.library.opcheck(BACKWARD, (None, torch.randn_like(feats), x, feats, w, bw, saved, [0.3], False))


@pytest.mark.parametrize("first_model", [0, 2])
@pytest.mark.parametrize("block", [8, (6, 8)])
def test_compile_the_public_function(first_model, block):
    x, w, bs, bw, bb, rm, rv = make(None, 10, (6, 5, block, 3))
    rm2, rv2 = [t.clone() for t in rm], [t.clone() for t in rv]

    def f(x, w, bs, bw, bb, rm, rv):
        logits, feats = resmlp(x, w, bs, bw, bb, rm, rv, p=[0.2], seeds=[5], first_model=first_model)
        return logits.sum() + feats.square().sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, bs, bw, bb, rm, rv)
    ref = f(x, w, bs, bw, bb, rm2, rv2)
    torch.testing.assert_close(out, ref)
    for a, r in zip(rm + rv, rm2 + rv2):
        torch.testing.assert_close(a, r)
    for a, r in zip(torch.autograd.grad(out, w + bw), torch.autograd.grad(ref, w + bw)):
        torch.testing.assert_close(a, r)


def _bad_cases():
    def call(mutate):
        x, w, bs, bw, bb, _, _ = make(2, 4, (6, 5, 8, 3), grad=False)
        a = dict(x=x, weights=w, biases=bs, bn_weights=bw, bn_biases=bb)
        mutate(a)
        return lambda: resmlp(**a)

    def raw(mutate):
        x, w, bs, bw, bb, _, _ = make(2, 4, (6, 5, 8, 3), grad=False)
        a = [x, w, bs, bw, bb, 1e-5, [0.0], [0]]
        mutate(a)
        return lambda: OP(*a)

    return [
        (call(lambda a: a.update(x=a["x"][:, :1])), ValueError, "at least 2 rows"),
        (call(lambda a: a.update(x=a["x"][0, 0])), ValueError, r"x must have shape \[B, I\] or \[K, B, I\]"),
        (call(lambda a: a.update(x=a["x"][0])), ValueError, r"weights\[0\] must have 2 dimensions"),
        (call(lambda a: a.update(x=a["x"][..., :5])), ValueError, r"weights\[0\] must have shape \[2, 5, 5\]"),
        (call(lambda a: a.update(weights=a["weights"][:4])), ValueError, "2 \\+ 3 \\* blocks"),
        (call(lambda a: a.update(biases=a["biases"][:3])), ValueError, "biases must be a list of 5"),
        (call(lambda a: a["weights"].__setitem__(2, a["weights"][2][:, :, :3])), ValueError, r"weights\[2\]"),
        (call(lambda a: a["bn_weights"].__setitem__(1, a["bn_weights"][1][:, :2])), ValueError, r"bn_weights\[1\]"),
        (call(lambda a: a["biases"].__setitem__(4, a["biases"][4].double())), TypeError, r"biases\[4\] must have"),
        (call(lambda a: a.update(x=a["x"].long())), TypeError, "floating"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:5], p=[1.0]), ValueError, "p must hold"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:5], p=0.1), ValueError, "p must be a list of 1"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:5], seeds=[1.5]), ValueError, "seeds must be"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:5], first_model=-1), ValueError, "first_model must be"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:5], first_model=1.0), ValueError, "first_model must be"),
        (lambda: reference.resmlp(*make(2, 4, (6, 5, 8, 3))[:5], first_model=-2), ValueError, "first_model must be"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:5], eps=0.0), ValueError, "eps must be"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:5], momentum=-1), ValueError, "momentum must be"),
        (lambda: resmlp(*make(2, 4, (6, 5, 8, 3))[:6]), ValueError, "running_vars"),
        (raw(lambda a: a.__setitem__(0, a[0][:, :1])), ValueError, "at least 2 rows"),
        (raw(lambda a: a.__setitem__(0, a[0][..., :5])), ValueError, r"weights\[0\] must have shape"),
        (raw(lambda a: a.__setitem__(6, [0.1, 0.1])), ValueError, "p must hold 1"),
        (raw(lambda a: a.__setitem__(7, [])), ValueError, "seeds must hold 1"),
        (raw(lambda a: a.__setitem__(3, a[3][:2])), ValueError, "bn_weights must hold 3"),
        (raw(lambda a: a[1].__setitem__(4, a[1][4][..., :2])), ValueError, r"weights\[4\] must have shape"),
        (raw(lambda a: a[1].__setitem__(2, a[1][2][..., :3])), ValueError, r"weights\[2\] must have shape \[2, 8, 8\]"),
        (raw(lambda a: a[2].__setitem__(1, a[2][1][..., :3])), ValueError, r"biases\[1\] must have shape \[2, 8\]"),
        (raw(lambda a: a.__setitem__(0, a[0].half())), TypeError, "float32 or float64"),
        (raw(lambda a: a.append(-1)), ValueError, "first_model must be >= 0"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_arguments(case):
    fn, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fn()


def test_backward_op_checks_its_gradients():
    x, w, bs, bw, bb, _, _ = make(2, 4, (6, 5, 8, 3), grad=False)
    logits, feats, saved, _, _ = OP(x, w, bs, bw, bb, 1e-5, [0.0], [0])
    with pytest.raises(ValueError, match="grad_logits must have shape"):
        BACKWARD(logits[:, :2], None, x, feats, w, bw, saved, [0.0], False)
    with pytest.raises(ValueError, match="saved must hold 10"):
        BACKWARD(logits, None, x, feats, w, bw, saved[:3], [0.0], False)
    with pytest.raises(TypeError, match="grad_features must have the dtype"):
        BACKWARD(None, feats.double(), x, feats, w, bw, saved, [0.0], False)
    gw, gb, gbw, gbb, gx = BACKWARD(None, None, x, feats, w, bw, saved, [0.0], False)
    assert gx.numel() == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in gw + gb + gbw + gbb)


# ---- the fused ResMLP ---------------------------------------------------------------------------

def _pair(dropout=0.0, d=24, c=7, dtype=torch.float32, inner=None):
    torch.manual_seed(3)
    fused = ResMLP(d, c, hidden=16, width=40, dropout=dropout, inner=inner).to(dtype).train()
    eager = copy.deepcopy(fused)
    eager.fused = False
    return fused, eager


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("inner", [None, 24])
def test_resmlp_fused_matches_module(dtype, inner):
    fused, eager = _pair(dtype=dtype, inner=inner)
    x = torch.randn(33, 24, dtype=dtype)
    assert fused_path_available(fused, x)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for _ in range(3):  # several steps: running statistics accumulate
        (lf, hf), (le, he) = fused(x), eager(x)
        torch.testing.assert_close(lf, le, **tol)
        torch.testing.assert_close(hf, he, **tol)
        g = torch.randn_like(lf)
        gf = torch.autograd.grad((lf * g).sum() + hf.square().sum(), list(fused.parameters()))
        ge = torch.autograd.grad((le * g).sum() + he.square().sum(), list(eager.parameters()))
        for (name, _), a, b in zip(fused.named_parameters(), gf, ge):
            if name.endswith(("fc1.bias", "fc2.bias", "short.bias")):  # before a BN: 0 vs rounding noise
                assert torch.equal(a, torch.zeros_like(a)) and b.abs().max() < 1e-3
            elif name == "proj.bias":  # every path from it ends in a BN too: both are rounding noise
                assert a.abs().max() < 1e-3 and b.abs().max() < 1e-3
            else:  # atol relative to the gradient's scale (sums over 33 rows of O(100) terms)
                scale = 1e-6 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] + scale * b.abs().max().item(),
                                           msg=name)
    for (name, a), (_, b) in zip(fused.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, **tol, msg=name)
    fused.eval(), eager.eval()
    torch.testing.assert_close(fused(x)[0], eager(x)[0], **tol)


def test_resmlp_fused_dropout_is_unbiased():
    fused, eager = _pair(dropout=0.5)
    x = torch.randn(64, 24)
    with torch.no_grad():
        a, b, b2 = (torch.stack([m(x)[1] for _ in range(200)]).mean(0) for m in (fused, eager, eager))
    # The masks differ (torch's bernoulli vs the hash) but the averages agree: the fused estimate
    # is as far from the eager one as two eager estimates are from each other (sampling noise).
    assert (a - b).abs().mean() < 1.25 * (b - b2).abs().mean()
    assert (fused(x)[1] == 0).float().mean() > 0.5  # ReLU zeros + dropped half


def test_resmlp_stacked_forward_matches_each_model():
    torch.manual_seed(1)
    members = [ResMLP(20, 5, hidden=8, width=16, dropout=0.0).train() for _ in range(3)]
    params, buffers = stack_module_state([copy.deepcopy(m) for m in members])
    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    x = torch.randn(3, 10, 20)
    logits, feats = resmlp_forward(members[0], params, buffers, x)
    loss = logits.square().sum() + feats.sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for i, m in enumerate(members):
        m.fused = False
        lg, h = m(x[i])
        torch.testing.assert_close(logits[i], lg, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats[i], h, rtol=1e-4, atol=1e-5)
        gs = torch.autograd.grad(lg.square().sum() + h.sum(), list(m.parameters()))
        g = dict(zip(dict(m.named_parameters()), gs))
        for name, gi in g.items():
            if not name.endswith(("fc1.bias", "fc2.bias", "short.bias")):
                torch.testing.assert_close(grads[name][i], gi, rtol=1e-4, atol=1e-4, msg=name)
        for name, b in m.named_buffers():
            torch.testing.assert_close(buffers[name][i].to(b.dtype), b, rtol=1e-4, atol=1e-5, msg=name)


def test_resmlp_falls_back_to_modules():
    fused, eager = _pair()
    x = torch.randn(8, 24)
    assert not fused_path_available(fused, x.to(torch.bfloat16))
    assert not fused_path_available(fused, x[:1])          # one row: BatchNorm's own error applies
    assert not fused_path_available(eager.head, x)         # not a ResMLP
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_path_available(fused, x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fused(x[:1])
    fused.eval()
    torch.testing.assert_close(fused(x)[0], eager.eval()(x)[0])


def test_one_and_two_threads_agree():
    # At 2 threads independent matmuls run side by side, one per thread (run_pair in
    # csrc/cpu/resmlp.cpp, with the caller's autograd state replicated into the worker).
    x, w, bs, bw, bb, _, _ = make(2, 32, (24, 16, 32, 32, 5))
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            logits, feats = resmlp(x, w, bs, bw, bb, p=[0.2, 0.2], seeds=[3, 4])
            grads = torch.autograd.grad(logits.square().sum() + feats.sum(), [x] + w + bw + bb)
            assert logits.grad_fn is not None and all(g.grad_fn is None for g in grads)
            outs.append((logits, feats, *grads))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("classes", [40, 1469])
def test_the_gradients_have_the_same_bits_on_one_and_two_threads(classes):
    # The trainer's shapes, with a head of the Stream benchmark's 1,469 classes: the head's input
    # gradient is summed in blocks (csrc/cpu/resmlp.cpp), so a run's result does not depend on
    # the thread count (threads="auto" changes it while a run goes).
    x, w, bs, bw, bb, _, _ = make(None, 64, (768, 128, 256, 256, classes), grad=False)
    gl, gf = torch.randn(64, classes), torch.randn(64, 256)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            logits, feats, saved, _, _ = OP(x, w, bs, bw, bb, 1e-5, [0.3, 0.3], [1, 2])
            outs.append((logits, feats, *BACKWARD(gl, gf, x, feats, w, bw, saved, [0.3, 0.3], False)[0]))
    finally:
        torch.set_num_threads(old)
    for i, (a, b) in enumerate(zip(*outs)):
        assert torch.equal(a, b), i


@pytest.fixture
def matmul_mode():
    """Sets bmc_fast's CPU matmul library for one test and restores the default afterwards."""
    import os

    import bmc_fast

    yield bmc_fast.set_cpu_matmul
    bmc_fast.set_cpu_matmul(os.environ.get("BMC_FAST_MATMUL", "auto"))


TRAINER_DIMS = (768, 128, 256, 256, 40)  # the trainer's ResMLP: products above oneDNN's size threshold


@pytest.mark.parametrize("mode", ["mkl", "onednn"])
@pytest.mark.parametrize("k", [None, 2])
def test_trainer_shapes_match_reference_with_either_matmul(matmul_mode, mode, k):
    # The products of the trainer's shapes go to oneDNN or MKL (csrc/cpu/gemm.cpp); both must
    # give the reference's values and gradients (float32 tolerance: the libraries round differently).
    if mode == "onednn" and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("this torch has no oneDNN linear")
    assert matmul_mode(mode) == mode
    x, w, bs, bw, bb, rm, rv = make(k, 64, TRAINER_DIMS)
    logits, feats = resmlp(x, w, bs, bw, bb, rm, rv, 0.1, 1e-5, [0.3, 0.3], [5, 6])
    rl, rf = reference.resmlp(x, w, bs, bw, bb, [t.clone() for t in rm], [t.clone() for t in rv], 0.1, 1e-5,
                              [0.3, 0.3], [5, 6])
    torch.testing.assert_close(logits, rl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats, rf, rtol=1e-4, atol=1e-4)
    gl, gf = torch.randn_like(logits), torch.randn_like(feats)
    weights = [x] + w + bw + bb
    got = torch.autograd.grad((logits * gl).sum() + (feats * gf).sum(), weights)
    want = torch.autograd.grad((rl * gl).sum() + (rf * gf).sum(), weights)
    for i, (a, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-4 * r.abs().max().item(),
                                   msg=lambda m, i=i: f"gradient {i}: {m}")


def test_eval_forward_is_the_same_with_either_matmul(matmul_mode):
    # Without autograd, the eval forward of the fused ResMLP does its products through oneDNN
    # when bmc_fast chose it; the plain modules are the oracle.
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    fused = ResMLP(768, 40).eval()
    plain = copy.deepcopy(fused)
    plain.fused = False
    for m in fused.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(300, 768)
    with torch.no_grad():
        want = plain(x)
        for mode in ("onednn", "mkl"):
            assert matmul_mode(mode) == mode
            got = fused(x)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    matmul_mode("onednn")
    try:  # which path ran: oneDNN only without autograd
        torch.ops.mkldnn._linear_pointwise = lambda *a: calls.append(1) or real(*a)
        with torch.no_grad():
            fused(x)
        n = len(calls)
        fused(x)
    finally:
        torch.ops.mkldnn._linear_pointwise = real
    assert n >= 5 and len(calls) == n


def test_set_cpu_matmul_names_a_bad_mode():
    import bmc_fast

    with pytest.raises(ValueError, match="mode"):
        bmc_fast.set_cpu_matmul("cublas")


def test_a_bad_matmul_environment_variable_is_named(tmp_path):
    import subprocess
    import sys

    env = {**__import__("os").environ, "BMC_FAST_MATMUL": "fastest"}
    r = subprocess.run([sys.executable, "-c", "import bmc_fast"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "BMC_FAST_MATMUL" in r.stderr


@pytest.fixture
def direct_blas():
    """Yields bmc_fast._C (direct sgemm calls on) and restores the setting afterwards."""
    from bmc_fast import _C

    old = _C.set_direct_blas(True)
    yield _C
    _C.set_direct_blas(old)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(64, 768, 128, 256, 40), (33, 17, 9, 30, 7), (2, 3, 4, 5, 1469)])
def test_direct_blas_products_have_the_bits_of_at_mm(direct_blas, threads, shape):
    # Two-dimensional float32 products call sgemm with at::mm's arguments (csrc/cpu/gemm.cpp):
    # forward (bias or not), weight and input gradients, the head's blocked input gradient
    # (accumulated) and narrowed views all give at::mm's bits, on one thread and two.
    rows, d_in, inner, width, classes = shape
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = ResMLP(d_in, classes, width=width, inner=inner).train()
        x = torch.randn(rows, d_in, requires_grad=True)
        outs = []
        for on in (True, False):
            direct_blas.set_direct_blas(on)
            assert direct_blas.direct_blas() is on
            torch.manual_seed(1)  # the same dropout masks
            logits, feats = model(x)
            grads = torch.autograd.grad(logits.square().sum() + feats.sum(), [x, *model.parameters()])
            outs.append((logits, feats, *grads))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_direct_blas_is_found_in_torch_cpu_wheel(direct_blas):
    import platform

    import bmc_fast

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("torch's x86 wheels carry MKL's sgemm; other builds may not")
    assert bmc_fast.backend_info()["cpu_blas_direct"] is True
    direct_blas.set_direct_blas(False)
    assert bmc_fast.backend_info()["cpu_blas_direct"] is False


def test_direct_blas_probe_leaves_the_generator_and_the_switch_alone():
    # The direct calls are checked against at::mm once, on first use (csrc/cpu/gemm.cpp): on fixed
    # inputs, so torch's generator is untouched, and whatever the switch says at that moment.
    import subprocess
    import sys

    code = """
import torch
from bmc_fast import _C
torch.manual_seed(0); before = torch.rand(4)
_C.set_direct_blas(False)
torch.manual_seed(0); found = _C.direct_blas(); after = torch.rand(4)
_C.set_direct_blas(True)
print(torch.equal(before, after), found, _C.direct_blas())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    same, found_while_off, on = r.stdout.split()
    assert same == "True" and found_while_off == "False"
    assert on == str(__import__("bmc_fast").backend_info()["cpu_blas_direct"])
