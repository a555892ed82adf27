"""Distributed BMC (issue 7): wall time of a full stream with K = 4 experts on 1 process versus
2 gloo processes on this machine, per-phase times and artifact sizes, and from them a projection
of the speed-up for 71 tasks on 8 GPUs with K = 8."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import _harness
import shapes

TASKS, N, D, EPOCHS = (8, 2000, 768, 2) if not shapes.QUICK else (4, 128, 32, 1)

SCRIPT = f"""
import json, os, sys, time, torch
torch.set_num_threads(1)
from bmc_fast import BMC, BMCConfig
from bmc_fast.data import Task, TaskStream
from bmc_fast.train.distributed import init_from_env, fit_distributed, shutdown
import bmc_fast.train.distributed as Dm
g = torch.Generator().manual_seed(0)
tasks = []
for t in range({TASKS}):
    c = torch.randn(10, {D}, generator=g) * 2
    y = torch.randint(0, 10, ({N},), generator=g)
    x = c[y] + torch.randn({N}, {D}, generator=g)
    tasks.append(Task(f"t{{t}}", x, y, x[:200], y[:200], 10))
stream = TaskStream(tasks)
cfg = BMCConfig(n_experts=4, epochs={EPOCHS}, consolidation_epochs=1, buffer_size=0.25, memory_size=4000,
                progress=False)
rank, world = init_from_env("gloo", timeout_s=600)
sizes = []
real_gather = Dm.dist.gather_object
def counting_gather(obj, lst, dst=0):
    sizes.append(sum(a.buffer.nbytes() for a in obj))
    return real_gather(obj, lst, dst=dst)
Dm.dist.gather_object = counting_gather
t0 = time.perf_counter()
res = fit_distributed(BMC(cfg), stream)
wall = time.perf_counter() - t0
shutdown()
if rank == 0:
    json.dump({{"wall_s": wall, "timings": res.timings, "artifact_bytes_rank0": sizes,
               "final_cil": res.final_cil_accuracy}}, open(sys.argv[1], "w"))
"""


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world, tmp):
    path = os.path.join(tmp, "d.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(SCRIPT))
    out = os.path.join(tmp, f"w{world}.json")
    port = _port()
    procs = [subprocess.Popen([sys.executable, path, out], env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world),
                                                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                                     OMP_NUM_THREADS="1"))
             for r in range(world)]
    for p in procs:
        assert p.wait(timeout=3000) == 0
    with open(out) as f:
        return json.load(f)


def bench_distributed_stream(benchmark, machine):
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(1, tmp)
        two = _run(2, tmp)
    steps = -(-TASKS // 4)
    t_expert_task = one["timings"]["experts_s"] / TASKS          # one expert, one task, one process
    t_cons = one["timings"]["consolidation_s"] / steps
    art = sum(one["artifact_bytes_rank0"]) / TASKS               # bytes of one expert's artifact
    lines = [f"full stream: {TASKS} tasks x {N} samples x {D}-D, K = 4, {EPOCHS} expert epochs, 1 consolidation "
             f"epoch; 1 thread per process on {machine.name}",
             "", "| processes | wall s | experts s (rank 0) | gather s | consolidation s | final class-IL |",
             "|---|---|---|---|---|---|"]
    for w, r in ((1, one), (2, two)):
        t = r["timings"]
        lines.append(f"| {w} | {r['wall_s']:.1f} | {t['experts_s']:.1f} | {t['gather_s']:.2f} | "
                     f"{t['consolidation_s']:.1f} | {r['final_cil']:.3f} |")
    # Projection: 71 tasks, K = 8 experts on 8 GPUs (one expert each) against one GPU training the
    # 8 experts of a step one after another; consolidation stays on rank 0; artifacts cross a
    # 10 GB/s link. Per-task expert time and consolidation time keep the ratio measured here.
    T, K = 71, 8
    s8 = -(-T // K)
    link = 10e9
    serial = T * t_expert_task + s8 * t_cons
    parallel = s8 * (t_expert_task + t_cons + (K - 1) * art / link)
    lines += ["", f"measured: one expert-task {t_expert_task:.2f} s, one consolidation {t_cons:.2f} s, "
              f"one artifact {art / 2**20:.1f} MB; speed-up of 2 processes on this 2-core machine "
              f"{one['wall_s'] / two['wall_s']:.2f}x",
              f"projection, 71 tasks, K = 8 on 8 GPUs (same phase-time ratio, 10 GB/s for artifacts): "
              f"{serial / parallel:.1f}x faster than the 8 experts of each step one after another on one GPU"]
    print("\n" + "\n".join(lines))
    _harness.record_run("distributed", {
        "device": "cpu", "threads_per_process": 1,
        "setting": f"full stream: {TASKS} tasks x {N} samples x {D}-D, K = 4, {EPOCHS} expert epochs, "
                   "1 consolidation epoch; gloo on loopback",
        "rows": [{"processes": w, "wall_s": r["wall_s"], **{k: r["timings"][k] for k in
                  ("experts_s", "gather_s", "consolidation_s")}, "final_cil": r["final_cil"]}
                 for w, r in ((1, one), (2, two))],
        "expert_task_s": t_expert_task, "consolidation_step_s": t_cons, "artifact_mb": art / 2**20,
        "speedup_2_processes": one["wall_s"] / two["wall_s"], "projection_71_tasks_8_gpus": serial / parallel})
    benchmark.extra_info.update({"one": one, "two": two, "projection_speedup": serial / parallel})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
