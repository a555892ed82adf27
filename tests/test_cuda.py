"""CUDA-only checks (skipped without a GPU): CPU/CUDA agreement, run-twice bitwise equality of
every reduction, a non-default device and stream, CUDA-graph capture via reduce-overhead, and
float16 autocast training steps."""
import pytest
import torch

import bmc_fast
from _amp import CASES, close_low_precision, setup, step
from _checks import close
from _masked import labels_in, ranges

pytestmark = pytest.mark.cuda


def _cases(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    e, b = torch.randn(4, 300, 50, generator=g), torch.randn(4, 300, 50, generator=g)
    p, bp, imp = torch.randn(3, 70001, generator=g), torch.randn(70001, generator=g), torch.rand(70001, generator=g)
    s, t = torch.randn(777, 96, generator=g), torch.randn(777, 96, generator=g)
    ids = torch.randint(0, 6, (777,), generator=g)
    x, tx = torch.randn(300, 500, generator=g) * 4, torch.randn(300, 500, generator=g) * 4
    off, ln = ranges(300, 500, "cpu")
    y = labels_in(off, ln)
    mv = lambda *ts: [u.to(device) if u.is_floating_point() is False else u.to(device, dtype) for u in ts]  # noqa: E731
    return [
        ("stability_loss", lambda a, c: bmc_fast.stability_loss(a, c), mv(e, b)),
        ("weight_stability_loss", lambda a, c, i: bmc_fast.weight_stability_loss(a, c, i), mv(p, bp, imp)),
        ("batched_distillation_loss", lambda a, c, i: bmc_fast.batched_distillation_loss(a, c, i, 6), mv(s, t, ids)),
        ("task_masked_cross_entropy", lambda a, yy, o, n: bmc_fast.task_masked_cross_entropy(a, yy, o, n),
         mv(x, y, off, ln)),
        ("task_masked_kd_loss", lambda a, c, o, n: bmc_fast.task_masked_kd_loss(a, c, o, n, 2.0), mv(x, tx, off, ln)),
    ]


def _fwd_bwd(fn, args):
    a0 = args[0].clone().requires_grad_(True)
    loss = fn(a0, *args[1:])
    (g,) = torch.autograd.grad(loss, a0)
    return loss.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    for (name, fn, cpu_args), (_, _, gpu_args) in zip(_cases("cpu", dtype), _cases("cuda", dtype)):
        lc, gc = _fwd_bwd(fn, cpu_args)
        lg, gg = _fwd_bwd(fn, gpu_args)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(lg.cpu(), lc, **tol, msg=lambda m: f"{name} loss: {m}")
        torch.testing.assert_close(gg.cpu(), gc, **tol, msg=lambda m: f"{name} grad: {m}")


def test_cuda_run_twice_bitwise_equal():
    for name, fn, args in _cases("cuda"):
        l1, g1 = _fwd_bwd(fn, args)
        l2, g2 = _fwd_bwd(fn, args)
        assert torch.equal(l1, l2) and torch.equal(g1, g2), name


def test_cuda_side_stream_and_device_index():
    dev = f"cuda:{torch.cuda.device_count() - 1}"
    s = torch.cuda.Stream(device=dev)
    with torch.cuda.device(dev), torch.cuda.stream(s):
        for name, fn, args in _cases(dev):
            loss, g = _fwd_bwd(fn, args)
            assert loss.device == torch.device(dev) and torch.isfinite(loss).all(), name
    s.synchronize()


def test_cuda_graph_capture_reduce_overhead():
    e = torch.randn(4, 64, 32, device="cuda", requires_grad=True)
    b = torch.randn(4, 64, 32, device="cuda")
    fn = torch.compile(lambda e, b: bmc_fast.stability_loss(e, b, reduction="mean"), mode="reduce-overhead")
    ref = bmc_fast.reference.stability_loss(e, b, reduction="mean")
    for _ in range(3):
        out = fn(e, b)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("mode", ["stacked", "streams", "sequential"])
def test_cuda_trainer_modes(mode):
    # The trainer on a GPU: the ResMLP trains through its modules there (bn_relu_dropout is CPU
    # only), stacked through vmap or one CUDA stream per expert. Without dropout the three modes
    # train experts whose buffers agree with the CPU's.
    from bmc_fast import BMCConfig
    from bmc_fast.data import demo_stream
    from bmc_fast.train.experts import train_experts
    from bmc_fast.backbone import ResMLP

    stream = demo_stream()
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        base = ResMLP(stream.input_dim, stream.num_classes, dropout=0.0, fused=False)
        cfg = BMCConfig(n_experts=2, parallel=mode if device == "cuda" else "sequential", epochs=1, batch_size=32,
                        device=device, progress=False, lr=1e-3)
        out[device] = train_experts(base, stream, [0, 1], cfg, step_index=2)
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a.buffer.features, b.buffer.features, rtol=1e-3, atol=1e-3)
    # bn_relu_dropout on CUDA tensors runs its reference
    x = torch.randn(2, 8, 16, device="cuda")
    w, b = torch.ones(2, 16, device="cuda"), torch.zeros(2, 16, device="cuda")
    torch.testing.assert_close(bmc_fast.ops.bn_relu_dropout([x], [w], [b], p=0.2, seed=1).cpu(),
                               bmc_fast.reference.bn_relu_dropout([x.cpu()], [w.cpu()], [b.cpu()], p=0.2, seed=1))


def test_trainer_building_blocks_on_cuda_run_their_reference():
    # resmlp and adamw_step have CPU kernels only: on CUDA they run their references (same math);
    # the trainer itself uses the modules and torch's fused AdamW there.
    from bmc_fast import reference
    from bmc_fast.ops import adamw_step, resmlp

    g = torch.Generator().manual_seed(0)
    dims = [(8, 12), (16, 8), (16, 16), (16, 8), (5, 16)]
    w = [torch.randn(2, *d, generator=g) * 0.3 for d in dims]
    b = [torch.randn(2, d[0], generator=g) * 0.1 for d in dims]
    bw = [torch.rand(2, 16, generator=g) + 0.5 for _ in range(3)]
    bb = [torch.randn(2, 16, generator=g) * 0.1 for _ in range(3)]
    x = torch.randn(2, 10, 12, generator=g)
    cpu = reference.resmlp(x, w, b, bw, bb, p=[0.3], seeds=[7])
    cuda = (lambda *a: resmlp(*a, p=[0.3], seeds=[7]))(x.cuda(), *[[t.cuda() for t in lst] for lst in (w, b, bw, bb)])
    for c, d in zip(cpu, cuda):
        torch.testing.assert_close(d.cpu(), c, rtol=1e-4, atol=1e-5)
    p, m, v = [t.clone() for t in w], [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
    pg, mg, vg = [t.cuda() for t in p], [t.cuda() for t in m], [t.cuda() for t in v]
    grads = [torch.randn_like(t) for t in w]
    reference.adamw_step(p, grads, m, v, 1e-2, 0.9, 0.999, 0.01, 1e-8, 1)
    adamw_step(pg, [t.cuda() for t in grads], mg, vg, lr=1e-2, weight_decay=0.01, step=1)
    for a, c in zip(pg, p):
        torch.testing.assert_close(a.cpu(), c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_autocast_float16_step(name):
    # float16 features from a Linear under CUDA autocast, float32 stored targets: the loss is
    # computed in float32 and the gradients come back in each input's dtype.
    loss, f, lin, t = step(name, bmc_fast, "cuda", torch.float16)
    ref = step(name, bmc_fast.reference, "cuda", torch.float16)
    full = step(name, bmc_fast.reference, "cuda")
    assert f.dtype == torch.float16 and loss.dtype == torch.float32
    assert f.grad.dtype == torch.float16 and lin.weight.grad.dtype == torch.float32
    close(loss, ref[0], torch.float32, "loss vs reference under autocast")
    close(f.grad, ref[1].grad, torch.float16, "feature grad vs reference under autocast")
    close_low_precision(loss, full[0], "loss vs float32 step")
    close_low_precision(lin.weight.grad, full[2].weight.grad, "weight grad vs float32 step")
    if t is not None:
        assert t.grad.dtype == torch.float32
        close_low_precision(t.grad, full[3].grad, "target grad vs float32 step")


@pytest.mark.parametrize("name", ["stability_loss", "batched_distillation_loss", "task_masked_kd_loss"])
def test_cuda_autocast_float16_compile(name):
    lin, x, t, loss_fn = setup(name, "cuda")
    fn = torch.compile(lambda x, t: loss_fn(bmc_fast, lin(x), t), fullgraph=True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = fn(x, t)
    assert loss.dtype == torch.float32
    loss.backward()
    expected, _, lin_e, _ = step(name, bmc_fast, "cuda", torch.float16)
    close(loss.detach(), expected, torch.float32)
    close(lin.weight.grad, lin_e.weight.grad, torch.float16)


def test_cuda_raw_op_autocast_rule():
    if not hasattr(torch.library, "register_autocast"):
        pytest.skip("torch.library.register_autocast needs torch >= 2.7")
    s = torch.randn(32, 24, device="cuda", dtype=torch.float16, requires_grad=True)
    t = torch.randn(32, 24, device="cuda")
    ids = torch.zeros(32, dtype=torch.long, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = torch.ops.bmc_fast.batched_distillation_loss.default(s, t, ids, 1, None, "sum", True)
    assert out[0].dtype == torch.float32
    (g,) = torch.autograd.grad(out[0], s)
    assert g.dtype == torch.float16
    close(out[0], bmc_fast.reference.batched_distillation_loss(s.detach().float(), t, ids, 1), torch.float32)
    # CPU tensors are not autocast by a CUDA autocast region, as for torch's ops.
    with torch.autocast("cuda", dtype=torch.float16):
        assert bmc_fast.task_masked_cross_entropy(s.detach().cpu(), ids.cpu(), 0, 24).dtype == torch.float16
