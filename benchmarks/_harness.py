"""Benchmark harness: interleaved timing of providers, medians and quantiles, ratio rows, machine facts.

Every benchmark case builds its inputs once (``setup``), checks each provider against the eager
reference, then times the providers round-robin (bmc_fast, eager, compiled, bmc_fast, ...) so that
drift on a shared machine hits all of them alike. Rows carry the machine, torch version and git
commit; ``benchmarks/conftest.py`` prints the ratio tables and merges them into the results file
of this kind of machine (``machine_kind``; ``benchmarks/report.py``).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import torch

ROWS: list[dict] = []
RUNS: dict[str, list[dict]] = {}  # whole-run results by section ("e2e", "distributed", "autods")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name, with its family/model numbers and the kernel build bmc_fast runs
    (AVX2 / AVX-512 / default): "AMD EPYC" alone named both a Zen 1 and a Zen 4 machine here."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown"
    extra = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    try:
        import bmc_fast
        cap = bmc_fast.backend_info().get("cpu_capability")
        if cap:
            extra.append(f"bmc_fast {cap} kernels")
    except Exception:  # noqa: BLE001 - a name for a table; never fail a benchmark over it
        pass
    return f"{name} ({', '.join(extra)})" if extra else name


def _cpuinfo() -> dict:
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
            if not line.strip():
                break
    except OSError:
        pass
    return info


def _amd_core(family: int, model: int) -> str | None:
    """The Zen generation of an AMD family/model (None if unknown)."""
    if family == 0x17:
        return "zen1" if model < 0x30 else "zen2"  # Zen and Zen+ below 0x30
    if family == 0x19:
        return "zen4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF) else "zen3"
    if family == 0x1A:
        return "zen5"
    return None


def machine_kind(device: str = "cpu") -> str:
    """The name of this kind of machine, which names its results file: the CPU's core generation
    and the bmc_fast kernel build it runs ("zen4-avx512", "zen1-avx2"; other CPUs
    "<vendor>-f<family>m<model>-<build>"), or the GPU's name ("nvidia-h200").
    ``BMC_BENCH_MACHINE`` overrides it."""
    forced = os.environ.get("BMC_BENCH_MACHINE")
    if forced:
        return forced
    slug = lambda s: "-".join("".join(c if c.isalnum() else " " for c in s.lower()).split())  # noqa: E731
    if device == "cuda":
        return slug(torch.cuda.get_device_name())
    try:
        import bmc_fast
        cap = bmc_fast.backend_info().get("cpu_capability") or "default"
    except Exception:  # noqa: BLE001 - a file name; never fail a benchmark over it
        cap = "default"
    info = _cpuinfo()
    try:
        family, model = int(info["cpu family"]), int(info["model"])
    except (KeyError, ValueError):
        return slug(f"{platform.machine() or 'cpu'} {cap}")
    vendor = info.get("vendor_id", "")
    core = _amd_core(family, model) if vendor == "AuthenticAMD" else None
    if core is None:
        name = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(vendor, slug(vendor) or "cpu")
        core = f"{name}-f{family}m{model}"
    return f"{core}-{cap}"


def machine_facts(machine) -> dict:
    """What the results file says about the machine (its ``machine`` entry)."""
    if machine.device == "cuda":
        return {"gpu": machine.name, "title": machine.name}
    return {"cpu": machine.name, "cores": os.cpu_count()}


def record_run(section: str, run: dict) -> dict:
    """Keeps one whole-run result (e.g. an end-to-end table) for the results file; a later run
    with the same device/threads/bench key replaces it there."""
    run.setdefault("torch", torch.__version__)
    run.setdefault("commit", git_commit())
    RUNS.setdefault(section, []).append(run)
    return run


def _time_copy(nbytes: int, threads: int, reps: int = 15, best: bool = False) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
        return min(ts) if best else statistics.median(ts)
    finally:
        torch.set_num_threads(old)


def cuda_copy_gbps(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """The device's copy bandwidth, (read + write) bytes per second / 1e9: ``copy_`` of a buffer
    far larger than L2 into an ``empty_like`` one, timed with CUDA events (median of ``reps``)."""
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


@dataclass
class Machine:
    device: str
    name: str
    threads: int
    contended: bool
    copy_gbps: float  # measured copy bandwidth, (read + write) bytes per second / 1e9
    note: str = ""
    facts: dict = field(default_factory=dict)


def probe_machine(device: str = "cpu") -> Machine:
    """Measures copy bandwidth and detects a busy core (2-thread regions then stall ~8 ms)."""
    if device == "cuda":
        return Machine("cuda", torch.cuda.get_device_name(), 0, False, cuda_copy_gbps())
    cores = os.cpu_count() or 1
    t1 = _time_copy(8 * 2**20, 1)
    t2 = _time_copy(8 * 2**20, min(2, cores))
    contended = cores >= 2 and t2 > 1.5 * t1 and t2 > 2e-3
    threads = 1 if contended else min(cores, torch.get_num_threads())
    note = (f"another process holds a core (8 MB copy: {t1 * 1e3:.2f} ms at 1 thread, {t2 * 1e3:.2f} ms "
            "at 2): figures are single-thread") if contended else ""
    forced = os.environ.get("BMC_BENCH_THREADS")
    if forced:  # e.g. 1 when the machine is noisy in ways the probe does not catch
        threads = int(forced)
        note = (note + "; " if note else "") + f"threads set to {threads} by BMC_BENCH_THREADS"
    torch.set_num_threads(threads)
    big = 256 * 2**20
    gbps = 2 * big / _time_copy(big, threads, reps=9, best=True) / 1e9
    return Machine("cpu", cpu_name(), threads, contended, gbps, note,
                   {"8MB_copy_ms_1t": t1 * 1e3, "8MB_copy_ms_2t": t2 * 1e3})


def run_interleaved(fns: dict, device: str, reps: int, warmup: int = 2, min_time: float = 0.0):
    """Times each callable ``reps`` times, round-robin. Returns {name: [seconds, ...]}."""
    for _ in range(warmup):
        for f in fns.values():
            f()
        _sync(device)
    times = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(reps):
        order = list(fns.items())
        if r % 2:  # alternate the order so no provider always runs after the same one
            order.reverse()
        for name, f in order:
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if min_time and time.perf_counter() - start > min_time and r >= 4:
            break
    return times


def quantiles(ts):
    s = sorted(ts)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"median": statistics.median(s), "p20": q(0.2), "p80": q(0.8), "n": len(s)}


def peak_memory(fn, device: str) -> int | None:
    """Peak bytes allocated during one call above what was allocated before it: the CUDA
    allocator's peak, or on the CPU the running sum of the profiler's allocation events (RSS is
    useless here: glibc keeps freed blocks resident and reuses them)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are attributed to the op that made them (its self memory) or, outside ops, to
    # "[memory]" events; frees are negative. Their running sum in start order approximates the
    # peak (frees inside an op count at its start).
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def record(row: dict) -> dict:
    row.setdefault("torch", torch.__version__)
    row.setdefault("cuda", torch.version.cuda)
    row.setdefault("commit", git_commit())
    ROWS.append(row)
    return row


# ---- one benchmark case ---------------------------------------------------------------------------

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float64: 1e-8}


def _call(fn, inputs, diff, mode):
    """A no-argument callable running one provider in one mode; returns (loss, grads)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs), ()
        return run
    leaves = list(inputs)
    for i in diff:
        leaves[i] = inputs[i].detach().clone().requires_grad_(True)
    targets = [leaves[i] for i in diff]

    def run():
        loss = fn(*leaves)
        grads = torch.autograd.grad(loss, targets, torch.ones_like(loss))
        return loss, grads
    return run


def _check(out, ref, dtype, what):
    for a, b in zip((out[0], *out[1]), (ref[0], *ref[1])):
        torch.testing.assert_close(a.float(), b.float(), rtol=TOL[dtype], atol=TOL[dtype],
                                   msg=lambda m: f"{what} disagrees with eager: {m}")


def run_case(benchmark, machine: Machine, op: str, shape: dict, dtype: torch.dtype, mode: str,
               fused, ref, inputs, diff, bytes_min: int, max_seconds: float = 8.0, compile: bool = True):
    """Checks and times one case; ``compile=False`` leaves out the torch.compile provider (its
    compile time dominates a quick run)."""
    device = machine.device
    providers = {"bmc_fast": fused, "eager": ref}
    if compile:
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, compile time measured alone
        providers["compiled"] = torch.compile(ref, fullgraph=True, dynamic=False)
    calls = {p: _call(f, inputs, diff, mode) for p, f in providers.items()}
    compile_s = None
    if compile:
        t0 = time.perf_counter()
        out_c = calls["compiled"]()
        _sync(device)
        compile_s = time.perf_counter() - t0
    out_e = calls["eager"]()
    _check(calls["bmc_fast"](), out_e, dtype, "bmc_fast")
    if compile:
        _check(out_c, out_e, dtype, "compiled")

    return time_and_record(benchmark, machine, op, ",".join(f"{k}={v}" for k, v in shape.items()), dtype, mode,
                           calls, compile_s, bytes_min, min_time=max_seconds)


def time_and_record(benchmark, machine: Machine, op: str, shape: str, dtype: torch.dtype, mode: str, calls: dict,
                    compile_s: float, bytes_min: int, reps: int = 30, min_time: float = 8.0) -> dict:
    """Times the checked providers ``calls`` ({"bmc_fast", "eager", "compiled"} -> no-argument
    callable) round-robin, measures their peak memory and records one result row."""
    device = machine.device
    times = run_interleaved(calls, device, reps=reps, min_time=min_time)
    q = {p: quantiles(ts) for p, ts in times.items()}
    mem = {p: peak_memory(c, device) for p, c in calls.items()}
    t_b = q["bmc_fast"]["median"]
    row = record({
        "op": op, "mode": mode, "dtype": str(dtype).replace("torch.", ""), "shape": shape,
        "device": device, "device_name": machine.name, "threads": machine.threads,
        "contended": machine.contended, "copy_gbps": machine.copy_gbps,
        **{f"t_{p}_ms": q[p]["median"] * 1e3 for p in q},
        **{f"t_{p}_p20_ms": q[p]["p20"] * 1e3 for p in q},
        **{f"t_{p}_p80_ms": q[p]["p80"] * 1e3 for p in q},
        "reps": q["bmc_fast"]["n"],
        "speedup_vs_eager": q["eager"]["median"] / t_b,
        "speedup_vs_compile": q["compiled"]["median"] / t_b if "compiled" in q else None,
        "compile_s": compile_s,
        "bytes_min": bytes_min,
        "gbps": bytes_min / t_b / 1e9,
        "bw_fraction": bytes_min / t_b / 1e9 / machine.copy_gbps,
        **{f"mem_{p}_mb": (m / 2**20 if m is not None else None) for p, m in mem.items()},
    })
    benchmark.extra_info.update(row)
    benchmark.pedantic(calls["bmc_fast"], rounds=3, iterations=1, warmup_rounds=0)
    return row
