"""Session set-up of the benchmarks: probe the machine once, print the ratio tables, and merge
the figures into this machine kind's results file (benchmarks/report.py renders RESULTS.md).

Where the figures go: ``BMC_BENCH_RESULTS=DIR`` if set; else benchmarks/results/ (and
benchmarks/RESULTS.md is re-rendered), except for quick smoke runs (``BMC_BENCH_QUICK=1``),
whose figures mean nothing and go to benchmarks/out/ (with an out/RESULTS.md to look at).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402
import report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
_MACHINES = {}


@pytest.fixture(scope="session")
def machine():
    return machine_for("cpu")


def machine_for(device):
    if device not in _MACHINES:
        _MACHINES[device] = _harness.probe_machine(device)
    return _MACHINES[device]


def _table(rows):
    head = ("| op | mode | dtype | shape | bmc_fast ms | eager ms | compiled ms | x eager | x compile "
            "| GB/s | % copy BW | peak MB (bmc/eager/compiled) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        mem = "/".join("-" if r.get(f"mem_{p}_mb") is None else f"{r[f'mem_{p}_mb']:.1f}"
                       for p in ("bmc_fast", "eager", "compiled"))
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['shape']} | {r['t_bmc_fast_ms']:.3f} "
            f"| {r['t_eager_ms']:.3f} | {r['t_compiled_ms']:.3f} | {r['speedup_vs_eager']:.2f} "
            f"| {r['speedup_vs_compile']:.2f} | {r['gbps']:.1f} | {100 * r['bw_fraction']:.0f} | {mem} |")
    return "\n".join(lines)


def results_dir() -> str:
    forced = os.environ.get("BMC_BENCH_RESULTS")
    if forced:
        return os.path.abspath(forced)
    return OUT if os.environ.get("BMC_BENCH_QUICK", "") not in ("", "0") else report.RESULTS_DIR


def pytest_terminal_summary(terminalreporter):
    rows, runs = _harness.ROWS, _harness.RUNS
    if not rows and not runs:
        return
    if rows:
        terminalreporter.write_line(f"torch {torch.__version__}, commit {_harness.git_commit()}")
        for d, m in _MACHINES.items():
            terminalreporter.write_line(f"{d}: {m.name}, {m.threads} thread(s), copy bandwidth {m.copy_gbps:.1f} GB/s"
                                        + (f" — {m.note}" if m.note else ""))
        terminalreporter.write_line(_table(rows))
    where = results_dir()
    devices = {r.get("device", "cpu") for r in rows} | {e.get("device", "cpu") for es in runs.values() for e in es}
    for device in sorted(devices):
        machine = machine_for(device)
        path = report.update(
            where, _harness.machine_kind(device), _harness.machine_facts(machine),
            [r for r in rows if r.get("device", "cpu") == device],
            {s: [e for e in es if e.get("device", "cpu") == device] for s, es in runs.items()})
        terminalreporter.write_line(f"results merged into {path}")
    md = report.write(where, report.RESULTS_MD if where == report.RESULTS_DIR else os.path.join(where, "RESULTS.md"))
    terminalreporter.write_line(f"rendered {md}")
