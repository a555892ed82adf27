"""Mixed precision as torch does it: under autocast every loss computes in float32, and outside
it mixed floating dtypes promote as torch's binary ops promote them. Gradients come back in each
input's own dtype. CUDA float16 autocast is in test_cuda.py."""
import pytest
import torch
import torch.nn.functional as F

import bmc_fast
from bmc_fast import reference
from _amp import CASES, close_low_precision, setup, step
from _checks import close

NAMES = list(CASES)
PAIRED = [n for n in NAMES if CASES[n][2] is not None]  # losses with a second floating input
BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
OPS = {n: getattr(torch.ops.bmc_fast, n).default for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_autocast_training_step(name):
    fused = step(name, bmc_fast, "cpu", BF16)
    ref = step(name, reference, "cpu", BF16)
    full = step(name, reference, "cpu")  # the float32 step, no autocast
    loss, f, lin, t = fused
    assert f.dtype == BF16 and loss.dtype == F32
    assert f.grad.dtype == BF16 and lin.weight.grad.dtype == F32 and lin.bias.grad.dtype == F32
    # Same bfloat16 features, both computed in float32: float32 agreement for the loss; the
    # feature gradient is rounded to bfloat16 by the cast's backward in both.
    close(loss, ref[0], F32, "loss vs reference under autocast")
    close(f.grad, ref[1].grad, BF16, "feature grad vs reference under autocast")
    close(lin.weight.grad, ref[2].weight.grad, BF16, "weight grad vs reference under autocast")
    # Against the float32 computation, to bfloat16 accuracy.
    close_low_precision(loss, full[0], "loss vs float32 step")
    close_low_precision(f.grad, full[1].grad, "feature grad vs float32 step")
    close_low_precision(lin.weight.grad, full[2].weight.grad, "weight grad vs float32 step")
    close_low_precision(lin.bias.grad, full[2].bias.grad, "bias grad vs float32 step")
    if t is not None:  # the stored float32 target's gradient stays float32
        assert t.grad.dtype == F32
        close(t.grad, ref[3].grad, F32, "target grad vs reference under autocast")
        close_low_precision(t.grad, full[3].grad, "target grad vs float32 step")


@pytest.mark.parametrize("name", NAMES)
def test_autocast_no_grad_and_module_paths(name):
    # The forward-only path and the nn.Module forms also compute in float32 under autocast.
    lin, x, t, loss_fn = setup(name, "cpu")
    t = t.detach() if t is not None else None
    with torch.autocast("cpu", dtype=BF16):
        f = lin(x).detach()
        with torch.no_grad():
            out = loss_fn(bmc_fast, f, t)
        expected = loss_fn(reference, f, t)
    assert f.dtype == BF16 and out.dtype == F32
    close(out, expected, F32)
    mods = {
        "stability_loss": lambda: bmc_fast.nn.StabilityLoss(reduction="sum")(f.reshape(3, 8, 16), t),
        "weight_stability_loss": lambda: bmc_fast.nn.WeightStabilityLoss()(f, t),
        "batched_distillation_loss": lambda: bmc_fast.nn.BatchedDistillationLoss(1)(
            f, t, torch.zeros(f.shape[0], dtype=torch.long)),
        "task_masked_cross_entropy": lambda: bmc_fast.nn.TaskMaskedCrossEntropy()(
            f, torch.zeros(f.shape[0], dtype=torch.long), 0, f.shape[1]),
        "task_masked_kd_loss": lambda: bmc_fast.nn.TaskMaskedKDLoss(2.0)(f, t, 0, f.shape[1]),
    }
    refs = {
        "stability_loss": lambda: reference.stability_loss(f.reshape(3, 8, 16).float(), t),
        "weight_stability_loss": lambda: reference.weight_stability_loss(f.float(), t),
        "batched_distillation_loss": lambda: reference.batched_distillation_loss(
            f.float(), t, torch.zeros(f.shape[0], dtype=torch.long), 1),
        "task_masked_cross_entropy": lambda: F.cross_entropy(f.float(), torch.zeros(f.shape[0], dtype=torch.long)),
        "task_masked_kd_loss": lambda: reference.task_masked_kd_loss(f.float(), t, 0, f.shape[1], 2.0),
    }
    with torch.autocast("cpu", dtype=BF16):
        out = mods[name]()
    assert out.dtype == F32
    close(out, refs[name](), F32)


PAIRS = [(BF16, F32), (F16, F32), (F32, F64), (F32, BF16), (F16, BF16), (BF16, F64)]


def _promoted_case(name, da, db):
    lin, x, t, loss_fn = setup(name, "cpu")
    with torch.no_grad():
        a = (lin(x) * 2).to(da)
    return a, t.detach().to(db), loss_fn


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("da,db", PAIRS)
def test_mixed_dtypes_promote_like_torch(name, da, db):
    a, b, loss_fn = _promoted_case(name, da, db)
    dt = torch.promote_types(da, db)
    a, b = a.requires_grad_(), b.requires_grad_()
    loss = loss_fn(bmc_fast, a, b)
    assert loss.dtype == dt
    ga, gb = torch.autograd.grad(loss, (a, b))
    assert ga.dtype == da and gb.dtype == db
    # The reference on the promoted dtype: value in that dtype, gradients rounded to each input's.
    ap, bp = a.detach().to(dt).requires_grad_(), b.detach().to(dt).requires_grad_()
    loss_p = loss_fn(reference, ap, bp)
    gap, gbp = torch.autograd.grad(loss_p, (ap, bp))
    close(loss, loss_p, dt, "loss")
    close(ga, gap.to(da), da, "grad of the first input")
    close(gb, gbp.to(db), db, "grad of the second input")
    # The reference promotes the same way.
    loss_r = loss_fn(reference, a, b)
    assert loss_r.dtype == dt
    close(loss_r, loss_p, dt, "reference on mixed dtypes")


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("da,db", PAIRS + [(BF16, BF16), (F16, F16), (F64, F64)])
def test_result_dtype_is_torchs(da, db, autocast):
    # With K = 1 and no weights, stability_loss is F.mse_loss; the task-masked CE over the whole
    # head is F.cross_entropy. Both must give torch's dtype, with and without autocast.
    a, b = torch.randn(6, 5).to(da), torch.randn(6, 5).to(db)
    y = torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        ours, theirs = bmc_fast.stability_loss(a[None], b[None]), F.mse_loss(a, b)
        ce, ce_torch = bmc_fast.task_masked_cross_entropy(a, y, 0, 5), F.cross_entropy(a, y)
        ref, ce_ref = reference.stability_loss(a[None], b[None]), reference.task_masked_cross_entropy(a, y, 0, 5)
    assert ours.dtype == theirs.dtype == ref.dtype
    assert ce.dtype == ce_torch.dtype == ce_ref.dtype
    close(ours, theirs, ours.dtype)
    close(ce, ce_torch, ce.dtype)


def test_weights_do_not_set_the_loss_dtype():
    # weights and importance scale the loss; like torch losses' `weight` they do not promote it.
    e, b = torch.randn(3, 10), torch.randn(10)
    w = torch.rand(3, dtype=F64, requires_grad=True)
    imp = torch.rand(10, dtype=BF16, requires_grad=True)
    loss = bmc_fast.weight_stability_loss(e, b, imp, w)
    assert loss.dtype == F32
    gw, gi = torch.autograd.grad(loss, (w, imp))
    assert gw.dtype == F64 and gi.dtype == BF16
    close(loss, reference.weight_stability_loss(e, b, imp, w), F32)


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("da,db", [(BF16, BF16), (F16, BF16), (F32, F32)])
def test_autocast_both_inputs_low_precision(name, da, db):
    # e.g. a teacher's features computed in the same autocast region: still a float32 loss,
    # gradients in each input's dtype.
    a, b, loss_fn = _promoted_case(name, da, db)
    a, b = a.requires_grad_(), b.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        loss = loss_fn(bmc_fast, a, b)
        grads = torch.autograd.grad(loss, (a, b))
        ap, bp = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
        loss_p = loss_fn(reference, ap, bp)
        grads_p = torch.autograd.grad(loss_p, (ap, bp))
    assert loss.dtype == F32
    close(loss, loss_p, F32)
    for g, gp, d in zip(grads, grads_p, (da, db)):
        assert g.dtype == d
        close(g, gp.to(d), d)


@pytest.mark.parametrize("name", PAIRED)
def test_autocast_keeps_float64(name):
    # As autocast does for torch's ops: float64 inputs are not cast, and bf16 with float64 promotes.
    a, b, loss_fn = _promoted_case(name, BF16, F64)
    with torch.autocast("cpu", dtype=BF16):
        assert loss_fn(bmc_fast, a.double(), b).dtype == F64
        out = loss_fn(bmc_fast, a, b)
        assert out.dtype == F64
        close(out, loss_fn(reference, a.double(), b), F64)


@pytest.mark.parametrize("name", NAMES)
def test_autocast_compile(name):
    # The whole step compiled, one graph; the loss's casts are traced from the public function.
    lin, x, t, loss_fn = setup(name, "cpu")
    fn = torch.compile(lambda x, t: loss_fn(bmc_fast, lin(x), t), fullgraph=True)
    with torch.autocast("cpu", dtype=BF16):
        loss = fn(x, t)
    assert loss.dtype == F32
    loss.backward()
    expected, _, lin_e, t_e = step(name, bmc_fast, "cpu", BF16)
    close(loss.detach(), expected, F32)
    close(lin.weight.grad, lin_e.weight.grad, BF16)
    if t is not None:
        close(t.grad, t_e.grad, F32)


def _raw_args(name, f, t, rg):
    n = f.shape[0]
    zero, full = torch.zeros(n, dtype=torch.long), torch.full((n,), f.shape[-1], dtype=torch.long)
    return {
        "stability_loss": (f, t, None, "sum", rg),
        "weight_stability_loss": (f, t, None, None, "sum", rg),
        "batched_distillation_loss": (f, t, zero, 1, None, "sum", rg),
        "task_masked_cross_entropy": (f, zero, zero, full, "sum", -100, rg),
        "task_masked_kd_loss": (f, t, zero, full, 1.5, "sum", rg),
    }[name]


def _raw_inputs(name):
    f = torch.randn(6, 9, dtype=BF16)
    t = torch.randn(9 if name == "weight_stability_loss" else (6, 9))
    return f, t


@pytest.mark.parametrize("name", NAMES)
def test_raw_op_autocast_rule(name):
    # torch.ops.bmc_fast.* under autocast: the registered rule casts low-precision floating inputs
    # to float32 (a differentiable cast, so the gradient comes back in bfloat16).
    if not hasattr(torch.library, "register_autocast"):
        pytest.skip("torch.library.register_autocast needs torch >= 2.7")
    f, t = _raw_inputs(name)
    f.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = OPS[name](*_raw_args(name, f, t, True))
    assert out[0].dtype == F32 and out[1].dtype == F32
    (g,) = torch.autograd.grad(out[0], f)
    assert g.dtype == BF16
    expected = OPS[name](*_raw_args(name, f.detach().float(), t, True))
    close(out[0], expected[0], F32)
    close(g, expected[1].to(BF16), BF16)


@pytest.mark.parametrize("name", ["stability_loss", "task_masked_kd_loss"])
def test_raw_op_autocast_rule_compiles(name):
    if not hasattr(torch.library, "register_autocast"):
        pytest.skip("torch.library.register_autocast needs torch >= 2.7")
    f, t = _raw_inputs(name)
    f.requires_grad_()
    fn = torch.compile(lambda f, t: OPS[name](*_raw_args(name, f, t, True))[0], fullgraph=True)
    with torch.autocast("cpu", dtype=BF16):
        loss = fn(f, t)
    assert loss.dtype == F32
    (g,) = torch.autograd.grad(loss, f)
    assert g.dtype == BF16
    expected = OPS[name](*_raw_args(name, f.detach().float(), t, True))
    close(loss.detach(), expected[0], F32)
    close(g, expected[1].to(BF16), BF16)


# opcheck's fake-tensor test converts the rule's cast (a non-leaf) to a fake tensor, and the
# converter reads its .grad, which warns; the warning is torch's, not the op's.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_under_autocast(name):
    for rg in (False, True):
        f, t = _raw_inputs(name)
        f.requires_grad_(rg)
        with torch.autocast("cpu", dtype=BF16):
            torch.library.opcheck(OPS[name], _raw_args(name, f, t, rg))
        torch.library.opcheck(OPS[name], _raw_args(name, f.detach().float().requires_grad_(rg), t, rg))


# What the fused-gradient path saves for backward: the gradient computed in the forward, and the
# inputs only for the gradients recomputed in the backward (a promoted copy held for nothing
# would cost memory of input size).
def _saved_shapes(fn):
    shapes = []

    def pack(x):
        shapes.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return shapes


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kd_saves_the_logits_only_for_the_teacher_gradient(teacher_grad):
    s = torch.randn(16, 30, dtype=BF16, requires_grad=True)
    t = torch.randn(16, 30, requires_grad=teacher_grad)
    shapes = _saved_shapes(lambda: bmc_fast.task_masked_kd_loss(s, t, 0, 30))
    # the fused gradient, plus the promoted student and the teacher when the teacher needs a gradient
    assert shapes.count((16, 30)) == (3 if teacher_grad else 1)


@pytest.mark.parametrize("base_grad", [False, True])
def test_weight_stability_saves_the_parameters_only_when_needed(base_grad):
    e = torch.randn(3, 50, dtype=BF16, requires_grad=True)
    b = torch.randn(50, requires_grad=base_grad)
    shapes = _saved_shapes(lambda: bmc_fast.weight_stability_loss(e, b))
    assert shapes.count((3, 50)) == (2 if base_grad else 1)
    assert shapes.count((50,)) == (1 if base_grad else 0)


def test_fused_gradient_under_autocast_saves_one_buffer():
    s = torch.randn(24, 16, dtype=BF16, requires_grad=True)
    t = torch.randn(24, 16)
    with torch.autocast("cpu", dtype=BF16):
        shapes = _saved_shapes(lambda: bmc_fast.batched_distillation_loss(s, t, torch.zeros(24, dtype=torch.long), 1))
    assert shapes.count((24, 16)) == 1
