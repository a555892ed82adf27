"""End-to-end benchmark of one BMC incremental step (issue 5): K = 4 experts, ResMLP on 768-D
inputs, 10k samples per task, 1 expert epoch each, then 1 consolidation epoch over a 40k memory.

Variants, timed round-robin: ``stacked`` experts with the fused losses (bmc_fast's default)
against ``sequential`` experts with the eager reference losses (the way the authors' code runs),
plus the two mixed variants to separate what stacking and what the fused losses bring.
Writes a table to benchmarks/out/e2e-*.md and the rows to the pytest-benchmark JSON.
"""
import os
import statistics
import time

import torch

from bmc_fast.bmc import BMCConfig, consolidate
from bmc_fast.data import Task, TaskStream
from bmc_fast.experts import train_experts
from bmc_fast.memory import Memory
from bmc_fast.models import ResMLP
import shapes

K, N, D, C_PER_TASK = (4, 10_000, 768, 10) if not shapes.QUICK else (2, 256, 32, 4)
REPS = 2 if not shapes.QUICK else 1
VARIANTS = [("stacked", "fused"), ("sequential", "reference"), ("stacked", "reference"), ("sequential", "fused")]


def make_stream(seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(K):
        centers = torch.randn(C_PER_TASK, D, generator=g) * 2
        y = torch.randint(0, C_PER_TASK, (N,), generator=g)
        x = centers[y] + torch.randn(N, D, generator=g)
        tasks.append(Task(f"synthetic-{t}", x, y, x[:100], y[:100], C_PER_TASK))
    return TaskStream(tasks)


def one_step(stream, parallel, losses, device="cpu"):
    cfg = BMCConfig(n_experts=K, parallel=parallel, losses=losses, epochs=1, consolidation_epochs=1,
                    buffer_size=N, memory_size=K * N, device=device, progress=False)
    torch.manual_seed(0)
    base = ResMLP(stream.input_dim, stream.num_classes).to(device)
    t0 = time.perf_counter()
    arts = train_experts(base, stream, list(range(K)), cfg, seed=1, use_stability=True)
    t1 = time.perf_counter()
    mem = Memory()
    mem.add([a.buffer for a in arts], cfg.memory_size, torch.Generator().manual_seed(0))
    t2 = time.perf_counter()
    consolidate(base, mem, cfg, stream.num_classes, seed=1)
    t3 = time.perf_counter()
    return {"experts_s": t1 - t0, "buffers_s": t2 - t1, "consolidation_s": t3 - t2, "total_s": t3 - t0}


def bench_e2e_incremental_step(benchmark, machine):
    stream = make_stream()
    one_step(stream, "stacked", "fused")  # warm-up (vmap set-up, first allocations)
    runs = {v: [] for v in VARIANTS}
    for r in range(REPS):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            runs[v].append(one_step(stream, *v))
    med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in runs[v][0]} for v in VARIANTS}
    base = med[("sequential", "reference")]
    lines = [f"one incremental step: K={K}, ResMLP, {D}-D inputs, {N} samples/task, 1 expert epoch, "
             f"1 consolidation epoch over {K * N} samples; {machine.name}, {machine.threads} thread(s)"
             + (f" ({machine.note})" if machine.note else ""), "",
             "| experts | losses | experts s | consolidation s | total s | speed-up vs sequential+reference |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        m = med[v]
        lines.append(f"| {v[0]} | {v[1]} | {m['experts_s']:.2f} | {m['consolidation_s']:.2f} | {m['total_s']:.2f} "
                     f"| {base['total_s'] / m['total_s']:.2f} (experts {base['experts_s'] / m['experts_s']:.2f}) |")
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "out", f"e2e-{time.strftime('%Y%m%d-%H%M%S')}.md"), "w") as f:
        f.write(text + "\n")
    benchmark.extra_info.update({f"{a}-{b}": med[(a, b)] for a, b in VARIANTS})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(m["total_s"] > 0 for m in med.values())
