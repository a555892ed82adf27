"""One-shot check of bmc_fast on a GPU machine (``make gpu-check``), in under 10 minutes on one
H100/H200. Stages, each in its own process with its own time limit, all run even after one fails:

* ``build``: the extension compiled for this GPU's architecture (``BMC_FAST_CUDA=ON``,
  ``BMC_FAST_CUDA_ARCHS=<major><minor>-real``) into build/gpu-check/site; later stages import it.
* ``tests``: tests/test_cuda.py and the cuda cases of the test files parametrized by device.
* ``trainer-stacked``, ``trainer-streams``: ``BMC(...).fit(demo_stream())`` on cuda, 1 epoch.
* ``kernels``: the op benchmarks on cuda at the shapes of benchmarks/shapes.py plus N = 65536 and
  K = 64, bmc_fast vs eager (and torch.compile at the listed shapes, float32 fwd+bwd, while time
  allows), with each case's fraction of the device copy bandwidth (CUDA events).
* ``e2e``: one incremental step of bench_e2e_step.py's CUDA variants.

Writes ONE report, benchmarks/results/gpu-check-<device>.md (``--out``): device, versions,
each stage's result and time, the figures, and each failure's output; a JSON block at its end
holds everything. Exits 1 if a stage failed, 0 if all passed. Without a CUDA device it says so
and exits 0. ``--device cpu`` runs the chosen stages on the CPU (``--tiny`` sizes), to check the
script itself on a machine without a GPU.

    python benchmarks/gpu_check.py [--out FILE] [--stages build,tests,...] [--limit kernels=120]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WORK = os.environ.get("BMC_GPU_CHECK_WORK") or os.path.join(ROOT, "build", "gpu-check")  # build, stage results
SITE = os.path.join(WORK, "site")  # the build installed here (pip --target), imported by the later stages

# Stage -> time limit (seconds). The whole run must end within --budget; a stage gets at most
# what is left minus RESERVE_S for each stage still to come.
STAGES = {"build": 300, "tests": 240, "trainer-stacked": 90, "trainer-streams": 90, "kernels": 200, "e2e": 150}
RESERVE_S = 20
BUDGET_S = 570

# The kernel benchmarks' extra sizes on a GPU: a long memory batch (N = 65536) and many experts (K = 64).
EXTRA_SHAPES = {
    "stability_loss": [(64, 256, 768)],                              # (K, B, D)
    "weight_stability_loss": [(64, 5_000_000)],                      # (K, P)
    "batched_distillation_loss": [(65536, 768, 8), (65536, 768, 64)],  # (N, D, K)
    "task_masked_cross_entropy": [(65536, 1000), (65536, 10000)],    # (N, C)
    "task_masked_kd_loss": [(65536, 1000), (65536, 10000)],
}


# ---- the stages, run in a child process (--child) -------------------------------------------------

class _NoBenchmark:
    """Stands in for pytest-benchmark's fixture: the harness records rows; nothing to add here."""

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, **kwargs):
        return None


def _save(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, default=str)
    os.replace(path + ".tmp", path)


def _run(cmd, env=None, cwd=None) -> int:
    """Runs ``cmd`` with its output going to ours (the parent keeps the tail)."""
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=cwd)


def _find_nvcc() -> tuple[str | None, str | None]:
    """(nvcc, the toolkit's root when known). An nvcc found only on PATH may be a wrapper whose
    folder is not the toolkit's (../shared/BUILD-NOTES.md): its root is left to CMake."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc"), home
    return shutil.which("nvcc"), None


def stage_build(args, result):
    import torch

    if args.device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        archs = f"{major}{minor}-real"
        env = dict(os.environ, BMC_FAST_CUDA="ON", BMC_FAST_CUDA_ARCHS=archs)
    else:  # checking the script on a CPU machine: the same build without CUDA
        archs, env = None, dict(os.environ, BMC_FAST_CUDA="OFF")
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index",
           "--target", SITE, f"-Cbuild-dir={os.path.join(WORK, 'cmake')}", ROOT]
    nvcc, cuda_root = _find_nvcc()
    if nvcc and "CUDACXX" not in env:
        cmd.insert(-1, f"-Ccmake.define.CMAKE_CUDA_COMPILER={nvcc}")
    if cuda_root:
        cmd.insert(-1, f"-Ccmake.define.CUDAToolkit_ROOT={cuda_root}")
    result["figures"].update(archs=archs, nvcc=nvcc)
    shutil.rmtree(SITE, ignore_errors=True)
    if _run(cmd, env=env) != 0:
        raise RuntimeError("pip install failed (its output is above)")
    probe = ("import json, bmc_fast; info = bmc_fast.backend_info(); info['file'] = bmc_fast.__file__; "
             "print('BACKEND ' + json.dumps(info))")
    out = subprocess.run([sys.executable, "-c", probe], env=dict(env, PYTHONPATH=SITE, BMC_FAST_REQUIRE_EXTENSION="1"),
                         cwd=WORK, capture_output=True, text=True)
    print(out.stdout + out.stderr)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("BACKEND ")]
    if out.returncode != 0 or not line:
        raise RuntimeError("the built extension does not import")
    info = json.loads(line[0][len("BACKEND "):])
    result["figures"]["backend"] = info
    if (args.device == "cuda" and not info.get("cuda")) or not info["file"].startswith(SITE):
        raise RuntimeError(f"the imported bmc_fast is not the CUDA build just made: {info}")


def _cuda_test_files() -> list[str]:
    """tests/test_cuda.py and every test file with a test taking the ``device`` fixture."""
    tests = os.path.join(ROOT, "tests")
    files = [os.path.join(tests, "test_cuda.py")]
    for name in sorted(os.listdir(tests)):
        path = os.path.join(tests, name)
        if name.startswith("test_") and name.endswith(".py") and path not in files:
            with open(path) as f:
                if re.search(r"def test\w*\([^)]*\bdevice\b", f.read()):
                    files.append(path)
    return files


def stage_tests(args, result):
    files = _cuda_test_files()
    result["figures"]["files"] = [os.path.relpath(f, ROOT) for f in files]
    rc = _run([sys.executable, "-m", "pytest", *files, "-k", args.device, "-q", "-p", "no:cacheprovider",
               f"--rootdir={ROOT}"])
    if rc != 0:
        raise RuntimeError(f"pytest exited with {rc}")


def stage_trainer(args, result, parallel):
    import numpy as np
    import torch

    import bmc_fast
    import bmc_fast.data

    cfg = bmc_fast.BMCConfig(device=args.device, parallel=parallel, epochs=1, consolidation_epochs=1,
                             progress=False)
    t0 = time.perf_counter()
    res = bmc_fast.BMC(cfg).fit(bmc_fast.data.demo_stream())
    if args.device == "cuda":
        torch.cuda.synchronize()
    result["figures"].update(seconds=time.perf_counter() - t0, final_cil_accuracy=res.final_cil_accuracy,
                             final_til_accuracy=res.final_til_accuracy, timings=res.timings)
    if not np.isfinite(res.cil_matrix[-1]).all() or res.final_cil_accuracy < 0.3:
        raise RuntimeError(f"the trained model is no better than chance: class-IL {res.final_cil_accuracy:.3f}")


def _kernel_cases(tiny: bool):
    """(op, shape dict, inputs maker(dtype, device), fused fn, reference fn, listed in shapes.py).
    The makers allocate on the default device: call them under ``with torch.device(...)``."""
    import bench_batched_distillation_loss as bdl
    import bench_stability_loss as sl
    import bench_weight_stability_loss as wsl
    import shapes
    from _masked_inputs import masked_inputs

    import bmc_fast
    from bmc_fast import reference

    def sizes(listed, op):
        return [(s, True) for s in listed] + ([] if tiny else [(s, False) for s in EXTRA_SHAPES[op]])

    for (k, b, d), listed in sizes(shapes.STABILITY, "stability_loss"):
        yield ("stability_loss", {"K": k, "B": b, "D": d}, lambda dt, dev, k=k, b=b, d=d: sl.setup(k, b, d, dt),
               bmc_fast.stability_loss, reference.stability_loss, listed)
    for (k, p), listed in sizes(shapes.WEIGHT_STABILITY, "weight_stability_loss"):
        yield ("weight_stability_loss", {"K": k, "P": p}, lambda dt, dev, k=k, p=p: wsl.setup(k, p, dt),
               bmc_fast.weight_stability_loss, reference.weight_stability_loss, listed)
    for (n, d, k), listed in sizes(shapes.DISTILLATION, "batched_distillation_loss"):
        yield ("batched_distillation_loss", {"N": n, "D": d, "K": k},
               lambda dt, dev, n=n, d=d, k=k: bdl.setup(n, d, k, dt),
               lambda s, t, i, k=k: bmc_fast.batched_distillation_loss(s, t, i, k),
               lambda s, t, i, k=k: reference.batched_distillation_loss(s, t, i, k), listed)
    for (n, c), listed in sizes(shapes.MASKED, "task_masked_cross_entropy"):
        yield ("task_masked_cross_entropy", {"N": n, "C": c},
               lambda dt, dev, n=n, c=c: masked_inputs(n, c, dt, device=dev),
               bmc_fast.task_masked_cross_entropy, reference.task_masked_cross_entropy, listed)
    for (n, c), listed in sizes(shapes.MASKED, "task_masked_kd_loss"):
        yield ("task_masked_kd_loss", {"N": n, "C": c},
               lambda dt, dev, n=n, c=c: masked_inputs(n, c, dt, teacher=True, device=dev),
               lambda s, t, o, ln: bmc_fast.task_masked_kd_loss(s, t, o, ln, 2.0),
               lambda s, t, o, ln: reference.task_masked_kd_loss(s, t, o, ln, 2.0), listed)


def stage_kernels(args, result):
    import shapes
    import torch

    import _harness

    t_start = time.monotonic()
    machine = _harness.probe_machine(args.device)
    result["figures"]["copy_gbps"] = machine.copy_gbps
    result["rows"] = rows = []
    failed = 0
    for op, shape, make, fused, ref, listed in _kernel_cases(args.tiny):
        for dtype in shapes.DTYPES:
            try:
                with torch.device(args.device):  # the setups' factory calls allocate on the device
                    dt, inputs, nbytes = make(dtype, args.device)
            except Exception as exc:  # noqa: BLE001 - recorded, the next case runs
                rows.append({"op": op, "shape": shape, "dtype": dtype, "error": f"inputs: {exc}"})
                failed += 1
                continue
            for mode in shapes.MODES:
                compile_ = (listed and dtype == "float32" and mode == "fwd+bwd" and not args.tiny
                            and time.monotonic() - t_start < 0.4 * args.child_limit)
                try:
                    row = _harness.run_case(_NoBenchmark(), machine, op, shape, dt, mode, fused, ref, inputs, [0],
                                            nbytes[mode], max_seconds=0.5, compile=compile_)
                    rows.append({k: row[k] for k in ("op", "mode", "dtype", "shape", "t_bmc_fast_ms", "t_eager_ms",
                                                     "speedup_vs_eager", "speedup_vs_compile", "gbps",
                                                     "bw_fraction", "mem_bmc_fast_mb", "mem_eager_mb")}
                                | {"t_compiled_ms": row.get("t_compiled_ms"), "listed": listed})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"op": op, "shape": shape, "dtype": dtype, "mode": mode,
                                 "error": f"{type(exc).__name__}: {exc}"[:500]})
                    failed += 1
                _save(args.result, result)
            del inputs
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if failed:
        raise RuntimeError(f"{failed} kernel case(s) failed (see the rows)")


def stage_e2e(args, result):
    from _harness import probe_machine

    os.environ.setdefault("BMC_E2E_REPS", "3")
    import bench_e2e_step as e2e

    variants = e2e.CUDA_VARIANTS
    med = e2e._run_variants(e2e.make_stream(), variants, args.device)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        e2e._report(_NoBenchmark(), probe_machine(args.device), variants, med)
    result["figures"].update(medians=med, reps=e2e.REPS)
    result["table"] = text.getvalue().strip()


CHILD_STAGES = {"build": stage_build, "tests": stage_tests, "kernels": stage_kernels, "e2e": stage_e2e,
                "trainer-stacked": lambda a, r: stage_trainer(a, r, "stacked"),
                "trainer-streams": lambda a, r: stage_trainer(a, r, "streams")}


def child_main(args) -> int:
    result = {"status": "running", "figures": {}}
    _save(args.result, result)
    try:
        CHILD_STAGES[args.child](args, result)
        result["status"] = "pass"
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        traceback.print_exc()
        result["status"] = "fail"
        result["message"] = f"{type(exc).__name__}: {exc}"[:2000]
    _save(args.result, result)
    return 0 if result["status"] == "pass" else 1


# ---- the parent: device facts, stages under time limits, the report --------------------------------

def _command_output(cmd) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_facts(device: str) -> dict:
    import torch

    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
             "cpus": os.cpu_count(), "commit": _command_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
             "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        facts.update(device=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                     multiprocessors=p.multi_processor_count,
                     driver=_command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        facts.update(device=platform.processor() or "cpu")
    nvcc = _find_nvcc()[0]
    version = _command_output([nvcc, "--version"]) if nvcc else None
    facts["nvcc"] = version.splitlines()[-1] if version else None
    return facts


def run_stage(name: str, limit: float, args, env: dict) -> dict:
    """Runs one stage in its own process group; kills the whole group at ``limit`` seconds."""
    os.makedirs(WORK, exist_ok=True)
    result_file = os.path.join(WORK, f"{name}.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--result", result_file,
           "--device", args.device, "--child-limit", str(limit)] + (["--tiny"] if args.tiny else [])
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=WORK,
                            start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # e.g. stuck in the driver: leave it, report what is known
            out = "(the killed stage did not exit within 30 s; its output is lost)"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    seconds = time.monotonic() - t0
    try:
        with open(result_file) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"figures": {}}
    result.update(stage=name, seconds=round(seconds, 1), limit_s=round(limit), output=out[-6000:])
    if timed_out:
        result.update(status="fail", message=f"timed out after {limit:.0f} s (killed; figures so far kept)")
    elif proc.returncode != 0 and result.get("status") != "fail":
        result.update(status="fail", message=result.get("message") or f"exited with {proc.returncode}")
    return result


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _summary(r: dict) -> str:
    f = r.get("figures", {})
    if r["status"] != "pass" and r.get("message"):
        return r["message"][:150].replace("|", "/").replace("\n", " ")
    if r["stage"] == "build" and f.get("backend"):
        b = f["backend"]
        return f"CUDA {b.get('cuda_version')}, archs {','.join(b.get('cuda_archs', []))}"
    if r["stage"] == "tests":
        last = [ln for ln in r.get("output", "").splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        return last[-1].strip("= ") if last else ""
    if r["stage"].startswith("trainer") and "seconds" in f:
        return (f"{f['seconds']:.1f} s, final class-IL {f['final_cil_accuracy']:.3f}, "
                f"task-IL {f['final_til_accuracy']:.3f}")
    if r["stage"] == "kernels" and r.get("rows"):
        ok = [x for x in r["rows"] if "error" not in x]
        best = max((x["bw_fraction"] for x in ok), default=0)
        return f"{len(ok)} cases, copy bandwidth {f.get('copy_gbps', 0):.0f} GB/s, best {100 * best:.0f}% of it"
    if r["stage"] == "e2e" and f.get("medians"):
        m = f["medians"]
        return ", ".join(f"{v} {m[v]['total_s']:.2f} s" for v in m)
    return ""


def report(facts: dict, results: list, args) -> str:
    passed = sum(r["status"] == "pass" for r in results)
    failed = [r["stage"] for r in results if r["status"] != "pass"]
    lines = [f"# bmc_fast GPU check: {facts['device']} ({facts.get('capability', args.device)})", "",
             f"{facts['date']}; torch {facts['torch']} (CUDA {facts['torch_cuda']}), driver {facts.get('driver')}, "
             f"nvcc: {facts.get('nvcc')}, Python {facts['python']}, {facts['cpus']} CPUs, commit {facts['commit']}",
             "",
             f"**{passed} of {len(results)} stages passed**" + (f"; failed: {', '.join(failed)}" if failed else ""), "",
             "| stage | result | seconds | limit s | summary |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', 0):.0f} | {r.get('limit_s', '-')} "
                     f"| {_summary(r)} |")
    kern = next((r for r in results if r["stage"] == "kernels" and r.get("rows")), None)
    if kern:
        timer = "CUDA events" if args.device == "cuda" else "perf_counter"
        lines += ["", f"## Kernels: {args.device}, copy bandwidth {kern['figures'].get('copy_gbps', 0):.0f} GB/s "
                  f"(read + write, {timer})", "",
                  "bmc_fast vs eager (`bmc_fast.reference`) and torch.compile (listed shapes, float32 fwd+bwd, as "
                  "time allowed); % copy BW = the op's minimum bytes / time over the measured copy bandwidth; "
                  "* = an extra size (N = 65536 or K = 64).", "",
                  "| op | shape | dtype | mode | bmc_fast ms | eager ms | compiled ms | x eager | x compile | GB/s "
                  "| % copy BW |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in kern["rows"]:
            shape = x["shape"] if isinstance(x["shape"], str) else ",".join(f"{k}={v}" for k, v in x["shape"].items())
            shape += "" if x.get("listed", True) else " *"
            if "error" in x:
                lines.append(f"| {x['op']} | {shape} | {x['dtype']} | {x.get('mode', '-')} | error: {x['error'][:120]} "
                             "| | | | | | |")
                continue
            lines.append(f"| {x['op']} | {shape} | {x['dtype']} | {x['mode']} | {x['t_bmc_fast_ms']:.3f} "
                         f"| {x['t_eager_ms']:.3f} | {_fmt(x.get('t_compiled_ms'), '.3f')} "
                         f"| {x['speedup_vs_eager']:.2f} | {_fmt(x.get('speedup_vs_compile'))} | {x['gbps']:.0f} "
                         f"| {100 * x['bw_fraction']:.0f} |")
    e2e = next((r for r in results if r["stage"] == "e2e" and r.get("table")), None)
    if e2e:
        lines += ["", "## End-to-end step", "", e2e["table"]]
    bad = [r for r in results if r["status"] == "fail"]
    if bad:
        lines += ["", "## Failures"]
        for r in bad:
            tail = "\n".join(r.get("output", "").splitlines()[-60:])
            lines += ["", f"### {r['stage']}: {r.get('message', '')}", "", "```", tail, "```"]
    raw = {"facts": facts, "stages": [{k: v for k, v in r.items() if k != "output"} for r in results]}
    lines += ["", "## Everything, as JSON", "", "```json", json.dumps(raw, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one-shot GPU check of bmc_fast: build, CUDA tests, benchmarks, trainer")
    p.add_argument("--out", help="the report file (default: benchmarks/results/gpu-check-<device>.md)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in this order")
    p.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time limit (repeatable)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds the whole check may take")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: run the stages on the CPU, to check this script without a GPU")
    p.add_argument("--tiny", action="store_true", help="the smallest sizes (benchmarks' quick shapes)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--child-limit", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        os.environ["BMC_BENCH_QUICK"] = "1"
    if args.child:
        return child_main(args)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        print(f"gpu-check: no CUDA device visible to torch {torch.__version__} ({built}) at {sys.executable}: "
              "nothing to check. Run it on a machine with a GPU, with a python whose torch has CUDA "
              "(make gpu-check GPU_PYTHON=...).")
        return 0
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    limits = dict(STAGES)
    for item in args.limit:
        name, _, secs = item.partition("=")
        if name not in STAGES:
            p.error(f"--limit {item}: unknown stage {name!r}")
        limits[name] = float(secs)

    facts = device_facts(args.device)
    print(f"gpu-check: {' '.join(filter(None, (facts['device'], facts.get('capability'))))}, torch {facts['torch']}; "
          f"stages {stages}; budget {args.budget:.0f} s", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    deadline = time.monotonic() + args.budget
    results = []
    for i, name in enumerate(stages):
        use_site = "build" in stages[:i] or (name != "build" and os.path.isdir(os.path.join(SITE, "bmc_fast")))
        stage_env = dict(env, PYTHONPATH=SITE, BMC_FAST_REQUIRE_EXTENSION="1") if use_site else env
        left = deadline - time.monotonic() - RESERVE_S * (len(stages) - i - 1)
        if results and results[0]["stage"] == "build" and results[0]["status"] != "pass":
            r = {"stage": name, "status": "skipped", "message": "skipped: the build failed", "figures": {}}
        elif left < 5:
            r = {"stage": name, "status": "skipped", "message": "skipped: out of time", "figures": {}}
        else:
            r = run_stage(name, min(limits[name], left), args, stage_env)
        results.append(r)
        print(f"gpu-check: {name}: {r['status']} ({r.get('seconds', 0):.0f} s) {r.get('message', '') or _summary(r)}",
              flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", str(facts["device"]).lower()).strip("-")
    out = args.out or os.path.join(BENCH, "results", f"gpu-check-{slug}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(report(facts, results, args))
    ok = all(r["status"] == "pass" for r in results)
    print(f"gpu-check: {'all stages passed' if ok else 'FAILED'}; report: {out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
