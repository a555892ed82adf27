"""Session set-up of the benchmarks: probe the machine once, print and save the ratio tables."""
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "out")
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


def pytest_terminal_summary(terminalreporter):
    rows = _harness.ROWS
    if not rows:
        return
    os.makedirs(OUT, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    machines = {d: vars(m) for d, m in _MACHINES.items()}
    meta = {"torch": torch.__version__, "commit": _harness.git_commit(), "machines": machines,
            "quick": os.environ.get("BMC_BENCH_QUICK", "")}
    path = os.path.join(OUT, f"bench-{stamp}")
    with open(path + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = [f"torch {meta['torch']}, commit {meta['commit']}"]
    for d, m in machines.items():
        md.append(f"{d}: {m['name']}, {m['threads']} thread(s), copy bandwidth {m['copy_gbps']:.1f} GB/s"
                  + (f" — {m['note']}" if m["note"] else ""))
    md.append("")
    md.append(_table(rows))
    with open(path + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    terminalreporter.write_line("\n".join(md))
    terminalreporter.write_line(f"saved {path}.json and {path}.md")
