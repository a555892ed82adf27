"""End-to-end benchmark of one BMC incremental step (issue 5): K = 4 experts, ResMLP on 768-D
inputs, 10k samples per task, 1 expert epoch each, then 1 consolidation epoch over a 40k memory.

Variants, timed round-robin, each a (experts, losses, backbone, optimizer) choice:

* ``bmc_fast``: stacked experts, fused losses, fused ResMLP kernels, fused AdamW, each training
  step one C++ call (the defaults);
* ``authors``: sequential experts, eager reference losses, the plain nn.Module ResMLP,
  torch's default AdamW and the frozen base's features computed batch by batch: a plain PyTorch
  training script, the way the authors' code runs (the baseline of the speed-up column);
* ``autograd step``: ``bmc_fast`` with ``fused_step=False``: the same kernels called step by step
  through autograd and the optimizer (what the one-call step removes);
* ``mkl matmuls``: ``bmc_fast`` with its float32 products on MKL (``set_cpu_matmul("mkl")``)
  where it would choose oneDNN (what the oneDNN products add; the same as ``bmc_fast`` where
  ``auto`` already picks MKL);
* ``no split``: ``bmc_fast`` with ``BMC_FAST_SPLIT=0``: the stacked experts' one-call step runs
  over the whole stack with every matmul and kernel on all threads, instead of each thread
  running its own experts (what the split adds);
* ``vmap``: stacked experts through torch.func.vmap over the plain module, fused losses and
  AdamW (bmc_fast before the fused backbone);
* ``sequential``: sequential experts with every fused piece (what stacking adds on top).

Prints a table and keeps the rows for this machine kind's results file (benchmarks/conftest.py).
"""
import contextlib
import os
import statistics
import time

import pytest
import torch

from bmc_fast import set_cpu_matmul
from bmc_fast.train import BMCConfig
from bmc_fast.train.consolidation import consolidate
from bmc_fast.data import Task, TaskStream
from bmc_fast.train.experts import train_experts
from bmc_fast.train.memory import Memory
from bmc_fast.train.threads import ThreadTuner
from bmc_fast.backbone import ResMLP
import _harness
import shapes

K, N, D, C_PER_TASK = (4, 10_000, 768, 10) if not shapes.QUICK else (2, 256, 32, 4)
REPS = int(os.environ.get("BMC_E2E_REPS", 5)) if not shapes.QUICK else 1
VARIANTS = {
    "bmc_fast": dict(parallel="stacked", losses="fused", fused_backbone=True, fused_optimizer=True),
    "autograd step": dict(parallel="stacked", losses="fused", fused_backbone=True, fused_optimizer=True,
                          fused_step=False),
    "mkl matmuls": dict(parallel="stacked", losses="fused", fused_backbone=True, fused_optimizer=True,
                        matmul="mkl"),
    "no split": dict(parallel="stacked", losses="fused", fused_backbone=True, fused_optimizer=True,
                     env={"BMC_FAST_SPLIT": "0"}),
    "authors": dict(parallel="sequential", losses="reference", fused_backbone=False, fused_optimizer=False,
                    base_feature_table_mb=0, threads=None),
    "vmap": dict(parallel="stacked", losses="fused", fused_backbone=False, fused_optimizer=True),
    "sequential": dict(parallel="sequential", losses="fused", fused_backbone=True, fused_optimizer=True),
}


def make_stream(seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(K):
        centers = torch.randn(C_PER_TASK, D, generator=g) * 2
        y = torch.randint(0, C_PER_TASK, (N,), generator=g)
        x = centers[y] + torch.randn(N, D, generator=g)
        tasks.append(Task(f"synthetic-{t}", x, y, x[:100], y[:100], C_PER_TASK))
    return TaskStream(tasks)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _settings(env: dict, matmul: str | None):
    """A variant's environment variables and CPU matmul library, restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    default = os.environ.get("BMC_FAST_MATMUL", "auto")
    set_cpu_matmul(matmul or default)
    try:
        yield
    finally:
        set_cpu_matmul(default)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def one_step(stream, variant, device="cpu", variants=None):
    opts = dict((variants or VARIANTS)[variant])
    with _settings(opts.pop("env", {}), opts.pop("matmul", None)):
        return _timed_step(stream, opts, device)


def _timed_step(stream, opts, device):
    cfg = BMCConfig(n_experts=K, epochs=1, consolidation_epochs=1, buffer_size=N, memory_size=K * N, device=device,
                    progress=False, **opts)
    torch.manual_seed(0)
    base = ResMLP(stream.input_dim, stream.num_classes, fused=opts.get("fused_backbone", True)).to(device)
    _sync(device)
    with ThreadTuner(cfg.threads):  # as BMC.fit runs its steps
        return _phases(stream, cfg, base, device)


def _phases(stream, cfg, base, device):
    t0 = time.perf_counter()
    arts = train_experts(base, stream, list(range(K)), cfg, step_index=1, use_stability=True)
    _sync(device)
    t1 = time.perf_counter()
    mem = Memory()
    mem.add([a.buffer for a in arts], cfg.memory_size, torch.Generator().manual_seed(0))
    t2 = time.perf_counter()
    consolidate(base, mem, cfg, stream.num_classes, step_index=1)
    _sync(device)
    t3 = time.perf_counter()
    return {"experts_s": t1 - t0, "buffers_s": t2 - t1, "consolidation_s": t3 - t2, "total_s": t3 - t0}


LINEARS = [(D, 128), (128, 256), (256, 256), (128, 256), (256, 256), (256, 256), (256, 256), (256, C_PER_TASK * K)]


def _mkl_nt(a, b):  # a b^T through at::mm (MKL in torch's CPU wheel)
    return torch.mm(a, b.t())


def _onednn_nt(a, b):  # a b^T through oneDNN, as bmc_fast calls it (csrc/cpu/gemm.cpp)
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _matmul_seconds(rows: int, backward: bool, nt=_mkl_nt, reps: int = 20) -> float:
    """Median time of only the matrix products of one ResMLP step on ``rows`` rows (forward, and
    with ``backward`` the weight and input gradients, none for the input layer's input), each
    product ``nt(a, b) = a b^T``."""
    mats = []
    for i, (din, dout) in enumerate(LINEARS):
        x, w, g = torch.randn(rows, din), torch.randn(dout, din), torch.randn(rows, dout)
        mats.append((x, w, g, i > 0))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x, w, g, need_dx in mats:
            nt(x, w)
            if backward:
                nt(g.t(), x.t())
                if need_dx:
                    nt(g, w.t())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _adamw_seconds(models: int, reps: int = 20) -> float:
    """Median time of one float32 AdamW update (bmc_fast's kernel, alone) of ``models`` ResMLPs'
    parameters: a pass over 28 bytes per parameter (read the parameter, gradient and two moments,
    write three), bound by memory bandwidth, not arithmetic."""
    n = models * sum(din * dout + dout for din, dout in LINEARS)
    p, g, m, v = (torch.randn(n) for _ in range(4))
    v.abs_()
    op = torch.ops.bmc_fast.adamw_step
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        op([p], [g], [m], [v], 1e-3, 0.9, 0.999, 0.01, 1e-8, i + 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _steps(stream_n: int, batch: int) -> tuple[int, int]:
    """Training steps of the expert phase (each on the K experts) and of consolidation."""
    return -(-stream_n // batch), -(-K * stream_n // batch)


def matmul_floor(stream_n: int = N, batch: int = 64, nt=_mkl_nt) -> dict:
    """The time the step's matrix products alone take in float32 on this machine, each phase
    with its matmuls at their most efficient size (the K experts' rows as one matrix), with the
    products of ``nt``: no implementation of the step with those products can be faster."""
    steps, consolidation_steps = _steps(stream_n, batch)
    experts = steps * (_matmul_seconds(K * batch, True, nt) + _matmul_seconds(K * batch, False, nt))  # + base features
    buffers = K * stream_n / 4096 * _matmul_seconds(4096, False, nt, reps=5)
    consolidation = consolidation_steps * _matmul_seconds(batch, True, nt)
    return {"experts_s": experts + buffers, "consolidation_s": consolidation,
            "total_s": experts + buffers + consolidation}


def with_adamw(floor: dict, stream_n: int = N, batch: int = 64) -> dict:
    """``floor`` plus every step's AdamW update timed alone (K models per expert step, one per
    consolidation step): the floor of any step that keeps float32 AdamW moments."""
    steps, consolidation_steps = _steps(stream_n, batch)
    experts = floor["experts_s"] + steps * _adamw_seconds(K)
    consolidation = floor["consolidation_s"] + consolidation_steps * _adamw_seconds(1)
    return {"experts_s": experts, "consolidation_s": consolidation, "total_s": experts + consolidation}


def _run_variants(stream, variants, device):
    """Medians over REPS rounds, each round running every variant once (order alternating), and
    per variant the median over rounds of its speed-up against "authors" in the same round: on
    a shared machine that drifts over minutes, a ratio of neighbours in time is steadier than a
    ratio of medians taken at different times."""
    one_step(stream, next(iter(variants)), device, variants)  # warm-up (allocations, lazy initialisation)
    names = list(variants)
    runs = {v: [] for v in names}
    for r in range(REPS):
        for v in (names if r % 2 == 0 else names[::-1]):
            runs[v].append(one_step(stream, v, device, variants))
    med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in runs[v][0]} for v in names}
    for v in names:
        med[v]["paired_speedup"] = statistics.median(a["total_s"] / b["total_s"]
                                                     for a, b in zip(runs["authors"], runs[v]))
    return med


def _one_call(o: dict) -> bool:
    """Whether a CPU variant trains through the one-call step (bmc_fast.backbone.train_step)."""
    return (o.get("losses") == "fused" and o.get("fused_backbone", True) and o.get("fused_optimizer", True)
            and o.get("fused_step", True))


def _report(benchmark, machine, variants, med, floors=None):
    base = med["authors"]
    setting = (f"one incremental step: K={K}, ResMLP, {D}-D inputs, {N} samples/task, 1 expert epoch, "
               f"1 consolidation epoch over {K * N} samples")
    rows = []
    for v, m in med.items():
        o = variants[v]
        rows.append({"variant": v, "experts": o["parallel"], "losses": o["losses"],
                     "backbone": "fused" if o.get("fused_backbone", True) else "nn.Module",
                     "adamw": "fused" if o.get("fused_optimizer", True) else "default",
                     "step": "one call" if machine.device == "cpu" and _one_call(o) else "autograd",
                     "base_features": "per step" if o.get("base_feature_table_mb", 1) == 0 else "table",
                     **{k: m[k] for k in ("experts_s", "consolidation_s", "total_s", "paired_speedup")}})
    for name, floor in (floors or {}).items():
        rows.append({"variant": name, **{k: floor[k] for k in ("experts_s", "consolidation_s", "total_s")}})
    for r in rows:
        r.update(speedup=base["total_s"] / r["total_s"], speedup_experts=base["experts_s"] / r["experts_s"],
                 speedup_consolidation=base["consolidation_s"] / r["consolidation_s"])
    lines = [f"{setting}; {machine.name}" + (f", {machine.threads} thread(s)" if machine.device == "cpu" else "")
             + (f" ({machine.note})" if machine.note else "") + f"; medians of {REPS} interleaved runs", "",
             "| variant | experts | losses | backbone | AdamW | step | base features | experts s | consolidation s "
             "| total s | speed-up vs authors (experts, consolidation) | paired speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cols = " | ".join(r.get(k, "") for k in ("experts", "losses", "backbone", "adamw", "step", "base_features"))
        paired = f"{r['paired_speedup']:.2f}" if "paired_speedup" in r else ""
        times = f"{r['experts_s']:.2f} | {r['consolidation_s']:.2f} | {r['total_s']:.2f}"
        ratios = f"{r['speedup']:.2f} ({r['speedup_experts']:.2f}, {r['speedup_consolidation']:.2f})"
        lines.append(f"| {r['variant']} | {cols} | {times} | {ratios} | {paired} |")
    if floors:
        lines += ["", "paired speed-up: the median over rounds of authors' total time / the variant's in the "
                  "same round.", "",
                  "matmul floor: only the step's float32 matrix products (forward and backward of every "
                  "expert step with the K experts' rows as one matrix, the base features, the buffers, the "
                  "consolidation steps), timed alone, with MKL's products (`torch.mm`, what the authors' script uses) "
                  "and with oneDNN's: the speed-up no float32 implementation with those products can pass here; "
                  "matmul + AdamW floor: the MKL floor plus every step's float32 AdamW update timed alone (a pass "
                  "over the parameters and moments, bound by memory bandwidth)."]
    print("\n" + "\n".join(lines))
    run = {"device": machine.device, "threads": machine.threads if machine.device == "cpu" else None,
           "rounds": REPS, "setting": setting, "rows": rows}
    if machine.note:
        run["note"] = machine.note
    _harness.record_run("e2e", run)
    benchmark.extra_info.update({**med, "matmul_floors": floors})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(m["total_s"] > 0 for m in med.values())


def bench_e2e_incremental_step(benchmark, machine):
    stream = make_stream()
    med = _run_variants(stream, VARIANTS, "cpu")
    floors = {"matmul floor (MKL)": matmul_floor()}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        floors["matmul floor (oneDNN)"] = matmul_floor(nt=_onednn_nt)
    floors["matmul + AdamW floor (MKL)"] = with_adamw(floors["matmul floor (MKL)"])
    _report(benchmark, machine, VARIANTS, med, floors)


# On a GPU the fused ResMLP kernel does not run (CPU only): the experts are stacked through vmap,
# or one CUDA stream each; "authors" is the same plain script as on the CPU.
CUDA_VARIANTS = {
    "bmc_fast": dict(parallel="stacked", losses="fused"),
    "streams": dict(parallel="streams", losses="fused"),
    "authors": VARIANTS["authors"],
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def bench_e2e_incremental_step_cuda(benchmark):
    from conftest import machine_for

    stream = make_stream()
    med = _run_variants(stream, CUDA_VARIANTS, "cuda")
    _report(benchmark, machine_for("cuda"), CUDA_VARIANTS, med)
