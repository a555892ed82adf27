"""Fair under load: one BMC incremental step (the e2e benchmark's shape) with bmc_fast and with the
plain PyTorch script ("authors" variant), on an idle machine and beside 1 and 2 busy-looping
processes. Each run is a fresh process; the loads and variants are interleaved round by round.

A job of T threads beside c single-threaded busy loops on n cores gets n * T / (T + c) cores when
the scheduler shares fairly: its fair slowdown is (T + c) / T (2 threads on 2 cores: 1.5x beside
one loop, 2x beside two). The table gives each variant's median slowdown against its own idle
time and that slowdown over the fair one.

    python benchmarks/bench_contention.py [--rounds 3] [--loads 0 1 2]

Under pytest (``make bench-quick``) a tiny step checks that the script works.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("bmc_fast", "authors")


def _busy():
    while True:
        pass


def _one(variant: str, quick: bool) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    if quick:
        env["BMC_BENCH_QUICK"] = "1"
    code = ("import time, bench_e2e_step as e; s = e.make_stream(); t = time.perf_counter(); "
            f"e.one_step(s, {variant!r}); print(time.perf_counter() - t)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=HERE)
    return float(r.stdout.strip().splitlines()[-1])


def measure(rounds: int, loads: list[int], quick: bool = False) -> list[dict]:
    times = {(v, c): [] for v in VARIANTS for c in loads}
    for _ in range(rounds):
        for c in loads:
            procs = [mp.Process(target=_busy, daemon=True) for _ in range(c)]
            for p in procs:
                p.start()
            try:
                for v in VARIANTS:
                    times[(v, c)].append(_one(v, quick))
            finally:
                for p in procs:
                    p.terminate()
                    p.join()
    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count()
    rows = []
    for v in VARIANTS:
        idle = statistics.median(times[(v, loads[0])])
        for c in loads:
            med = statistics.median(times[(v, c)])
            fair = (threads + c) / threads
            rows.append({"variant": v, "busy_loops": c, "median_s": med, "slowdown": med / idle, "fair": fair,
                         "over_fair": med / idle / fair, "runs": times[(v, c)]})
    return rows


def _table(rows) -> str:
    out = ["| variant | busy loops | median s | slowdown | fair | slowdown / fair |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['busy_loops']} | {r['median_s']:.2f} | {r['slowdown']:.2f}x | "
                   f"{r['fair']:.2f}x | {r['over_fair']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--record", action="store_true", help="merge the figures into this machine kind's results file")
    p.add_argument("--out", default=os.path.join(HERE, "out", "contention.json"))
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = measure(a.rounds, a.loads, a.quick)
    print(_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"cpus": os.cpu_count(), "rows": rows, "seconds": time.perf_counter() - t0}, f, indent=1)
    if a.record:
        print(_record("contention", {"bench": "contention", "rounds": a.rounds, "rows": rows}))
    return 0


def _record(section: str, run: dict) -> str:
    """Merges ``run`` into this machine kind's results file and re-renders RESULTS.md."""
    sys.path.insert(0, HERE)
    import _harness
    import report

    machine = _harness.probe_machine("cpu")
    run.update(device="cpu", threads=machine.threads, commit=_harness.git_commit())
    path = report.update(report.RESULTS_DIR, _harness.machine_kind("cpu"), _harness.machine_facts(machine), [],
                         {section: [run]})
    report.write()
    return f"results merged into {path}"


def bench_contention_script_runs(tmp_path):
    out = tmp_path / "c.json"
    assert main(["--rounds", "1", "--loads", "0", "1", "--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["variant"], r["busy_loops"]) for r in rows} == {(v, c) for v in VARIANTS for c in (0, 1)}
    assert all(r["median_s"] > 0 for r in rows)


if __name__ == "__main__":
    sys.exit(main())
