"""The benchmark results: one JSON file per machine kind in benchmarks/results/, and
benchmarks/RESULTS.md rendered from them.

A results file holds the current figures of one kind of machine (``zen4-avx512.json``,
``nvidia-h200.json``, ...): ``machine`` (what it is), ``kernels`` (one row per op, mode, dtype,
shape and thread count, as ``_harness.time_and_record`` makes them) and sections of whole runs
(``e2e``, ``contention``, ``stream_scale``, ``accuracy_select``, ``accuracy_compare``,
``accuracy_parity``, ``avalanche``, ``distributed``, ``autods``). A new benchmark run replaces the rows and runs
with the same key and keeps the others, so each file always holds the latest figure of
every case; git keeps the older ones. Every row and run carries the commit and torch it was
measured with.

    python benchmarks/report.py            # rewrite benchmarks/RESULTS.md from benchmarks/results/
    python benchmarks/report.py --check    # exit 1 if RESULTS.md is not what the files give
    python benchmarks/report.py --file benchmarks/results/zen4-avx512.json   # one machine, to stdout

No torch import: this module only reads and writes JSON and Markdown.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")

KERNEL_KEY = ("device", "threads", "op", "mode", "dtype", "shape")
RUN_KEY = ("device", "threads", "threads_per_process", "bench")  # those of them a run has
LOSS_OPS = ("stability_loss", "weight_stability_loss", "batched_distillation_loss", "task_masked_cross_entropy",
            "task_masked_kd_loss")
TARGETS = (3.0, 1.3)  # the loss kernels' goals: x eager, x torch.compile (fwd+bwd)


# ---- the files ------------------------------------------------------------------------------------

def load(path: str) -> dict:
    if not os.path.exists(path):
        return {"machine": {}, "kernels": []}
    with open(path) as f:
        return json.load(f)


def save(path: str, doc: dict) -> None:
    """Writes ``doc`` through a temporary file and a rename (a killed run leaves the old file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _natural(s: str) -> list:
    """"K=4,B=64" before "K=4,B=256": numbers compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s)]


def _key(row: dict, fields) -> tuple:
    return tuple((k, row.get(k)) for k in fields if k in row)


def merge(doc: dict, machine: dict, kernels: list, runs: dict) -> dict:
    """``doc`` with ``machine``'s facts, ``kernels`` rows and ``runs`` ({section: [run]})
    replacing those with the same key; rows and runs of other cases stay."""
    doc = dict(doc)
    doc["machine"] = {**doc.get("machine", {}), **{k: v for k, v in machine.items() if v is not None}}
    new = {_key(r, KERNEL_KEY): r for r in kernels}
    kept = [r for r in doc.get("kernels", []) if _key(r, KERNEL_KEY) not in new]
    doc["kernels"] = kept + list(new.values())
    for section, entries in runs.items():
        new = {_key(e, RUN_KEY): e for e in entries}
        doc[section] = [e for e in doc.get(section, []) if _key(e, RUN_KEY) not in new] + list(new.values())
    return doc


def update(results_dir: str, kind: str, machine: dict, kernels: list, runs: dict) -> str:
    """Merges a run's figures into ``results_dir/<kind>.json``; returns the path."""
    path = os.path.join(results_dir, f"{kind}.json")
    save(path, merge(load(path), {"kind": kind, **machine}, kernels, runs))
    return path


# ---- Markdown -------------------------------------------------------------------------------------

HEADER = """# Benchmark results

The current figures for each kind of machine, rendered by `python benchmarks/report.py` from
the files in [`results/`](results/) (one JSON file per machine kind, every row with the commit and
torch it was measured with). `make bench` updates the file of the machine it runs on and this page.
What the figures mean and why bmc_fast is fast: [`docs/performance.md`](../docs/performance.md).

How the kernels are timed (`benchmarks/_harness.py`): providers `bmc_fast`, `eager`
(`bmc_fast.reference`, plain PyTorch) and `compiled` (`torch.compile(reference, fullgraph=True)`,
compiled afresh per case, compile time kept out of the timings) run round-robin in one process;
every provider is checked against eager first. Times are medians (p20/p80 are in the JSON).
`% copy BW` is the bytes an ideal kernel must move over the median time, as a fraction of the
machine's measured copy bandwidth (a read-only `fwd` can pass 100%). Peak MB is the memory a call
allocates beyond its inputs. Compare ratios, not seconds, across runs: the machines are shared.
"""


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def _ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}")


def _kernel_table(rows: list) -> list:
    extra = sorted({k[2:-3] for r in rows for k in r if k.startswith("t_") and k.endswith("_ms")
                    and not k.endswith(("_p20_ms", "_p80_ms"))} - {"bmc_fast", "eager", "compiled"})
    head = ("| op | mode | dtype | shape | ms bmc_fast / eager / compiled | x eager | x compile | % copy BW "
            "| peak MB bmc_fast / eager / compiled |" + "".join(f" {p} ms |" for p in extra) + " commit |")
    out = [head, "|" + "---|" * (10 + len(extra))]
    for r in rows:
        mem = " / ".join(_f(r.get(f"mem_{p}_mb"), "{:.0f}") for p in ("bmc_fast", "eager", "compiled"))
        bw = r.get("bw_fraction")
        out.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['shape']} | {_ms(r['t_bmc_fast_ms'])} / "
                   f"{_ms(r['t_eager_ms'])} / {_ms(r['t_compiled_ms'])} | {r['speedup_vs_eager']:.2f} | "
                   f"{r['speedup_vs_compile']:.2f} | {_f(None if bw is None else 100 * bw, '{:.0f}')} | {mem} |"
                   + "".join(f" {_ms(r.get(f't_{p}_ms'))} |" for p in extra) + f" {r.get('commit', '-')} |")
    return out


def _kernels(doc: dict) -> list:
    rows = doc.get("kernels", [])
    if not rows:
        return []
    out = []
    groups = sorted({(r.get("device", "cpu"), r.get("threads")) for r in rows}, key=lambda g: (g[0], -(g[1] or 0)))
    for device, threads in groups:
        sel = [r for r in rows if r.get("device", "cpu") == device and r.get("threads") == threads]
        sel.sort(key=lambda r: (r["op"], _natural(r["shape"]), r["dtype"] != "float32", r["dtype"], r["mode"] != "fwd"))
        gb = sorted({round(r["copy_gbps"], 1) for r in sel if r.get("copy_gbps")})
        where = f"{device}" + (f", {threads} thread(s)" if device == "cpu" else "")
        out += ["", f"### Kernels ({where})", ""]
        if gb:
            out += [f"Copy bandwidth when measured: {', '.join(f'{g:g}' for g in gb)} GB/s.", ""]
        out += _kernel_table(sel)
        loss = [r for r in sel if r["op"] in LOSS_OPS and r["mode"] == "fwd+bwd"]
        if loss:
            ok = sum(r["speedup_vs_eager"] >= TARGETS[0] and r["speedup_vs_compile"] >= TARGETS[1] for r in loss)
            beat = sum(r["speedup_vs_eager"] > 1 and r["speedup_vs_compile"] > 1 for r in loss)
            out += ["", f"Loss ops, fwd+bwd: {ok} of {len(loss)} rows are at least {TARGETS[0]:g}x eager and "
                        f"{TARGETS[1]:g}x torch.compile; {beat} beat both."]
    return out


def _e2e(doc: dict) -> list:
    out = []
    for run in sorted(doc.get("e2e", []), key=lambda e: (e.get("device", "cpu"), -(e.get("threads") or 0))):
        where = run.get("device", "cpu") + (f", {run['threads']} thread(s)" if run.get("threads") else "")
        out += ["", f"### One BMC incremental step ({where}): `bench_e2e_step.py`", "",
                f"{run.get('setting', '')}; medians of {run.get('rounds', '?')} interleaved rounds; commit "
                f"{run.get('commit', '-')}" + (f"; {run['note']}" if run.get("note") else "") + ".", "",
                "| variant | experts | losses | backbone | AdamW | step | base features | experts s | consolidation s "
                "| total s | speed-up vs authors (experts, consolidation) | paired speed-up |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            cols = [r.get(k, "") for k in ("experts", "losses", "backbone", "adamw", "step", "base_features")]
            out.append(f"| {r['variant']} | " + " | ".join(cols) + f" | {_f(r['experts_s'])} | "
                       f"{_f(r['consolidation_s'])} | {_f(r['total_s'])} | {_f(r['speedup'])} "
                       f"({_f(r['speedup_experts'])}, {_f(r['speedup_consolidation'])}) | "
                       f"{_f(r.get('paired_speedup'))} |".replace("| - |", "|  |"))
    if out:
        out += ["", "`authors` is the plain PyTorch script (sequential experts, `nn.Module` ResMLP, eager losses, "
                    "torch's default AdamW, the frozen base's features batch by batch); paired speed-up: the "
                    "median over rounds of its time over the variant's in the same round; matmul floor: the "
                    "step's float32 matrix products alone, at their most efficient sizes; matmul + AdamW floor: "
                    "those products plus every step's float32 AdamW update timed alone (bound by memory "
                    "bandwidth), the floor of any step that keeps float32 moments."]
    return out


def _distributed(doc: dict) -> list:
    out = []
    for run in doc.get("distributed", []):
        out += ["", "### Distributed experts (torch.distributed, gloo on loopback): `bench_distributed.py`", "",
                f"{run['setting']}; {run['threads_per_process']} thread per process; commit {run['commit']}.", "",
                "| processes | wall s | experts s (rank 0) | gather s | consolidation s | final class-IL |",
                "|---|---|---|---|---|---|"]
        for r in run["rows"]:
            out.append(f"| {r['processes']} | {r['wall_s']:.1f} | {r['experts_s']:.1f} | {r['gather_s']:.2f} "
                       f"| {r['consolidation_s']:.1f} | {r['final_cil']:.3f} |")
        out += ["", f"One expert-task {run['expert_task_s']:.2f} s, one consolidation {run['consolidation_step_s']:.2f} s, "
                    f"one artifact {run['artifact_mb']:.1f} MB; 2 processes on 2 cores: "
                    f"{run['speedup_2_processes']:.2f}x. A model (not a measurement) with the same phase-time "
                    f"ratio and a 10 GB/s link: 71 tasks with K = 8 on 8 GPUs "
                    f"{run['projection_71_tasks_8_gpus']:.1f}x faster than one GPU training each step's "
                    "experts one after another."]
    return out


def _autods(doc: dict) -> list:
    runs = {e.get("bench"): e for e in doc.get("autods", [])}
    if not runs:
        return []
    out = ["", "### AutoDS features: `bench_autods.py`", ""]
    if "read" in runs:
        r = runs["read"]
        out.append(f"- Reading {r['read_samples']:,} x {r['dim']} float32 samples: LMDB + restricted unpickling "
                   f"{r['lmdb_samples_per_s']:,.0f} samples/s, the converted memory-mapped `.npy` format "
                   f"{r['converted_samples_per_s']:,.0f} samples/s "
                   f"({r['converted_samples_per_s'] / r['lmdb_samples_per_s']:.0f}x; files in the page cache; "
                   f"commit {r['commit']}).")
    if "open" in runs:
        r = runs["open"]
        out.append(f"- Opening a converted {r['tasks']}-task stream ({r['disk_mb']:.0f} MB on disk): "
                   f"{r['open_ms']:.0f} ms, resident memory +{r['rss_growth_mb']:.1f} MB: nothing is read until "
                   f"a task is used (commit {r['commit']}).")
    return out


# Rows of the compare table paired by seed: each of our baselines and its Avalanche counterpart.
_PAIRS = (("er", "avalanche replay"), ("derpp", "avalanche der"), ("lwf", "avalanche lwf"),
          ("gdumb", "avalanche gdumb"), ("finetune", "avalanche naive"))


def _diff(a: dict, b: dict):
    """(mean, standard error) in points of a - b paired by seed, or None where the seeds differ."""
    if a.get("seeds") != b.get("seeds") or "cil" not in a or "cil" not in b:
        return None
    import statistics

    d = [(x - y) * 100 for x, y in zip(a["cil"]["values"], b["cil"]["values"])]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return statistics.fmean(d), se


def _paired(run: dict, streams: list) -> list:
    """Paired differences of the compare table: paper minus the best other row of each stream,
    and each baseline minus its Avalanche counterpart."""
    out = ["", "Differences paired by seed, in points (± standard error):", ""]
    for s in streams:
        rows = run["streams"][s]
        parts = []
        others = {m: r for m, r in rows.items() if m != "paper" and "cil" in r}
        if "paper" in rows and others:
            best = max(others, key=lambda m: others[m]["cil"]["mean"])
            d = _diff(rows["paper"], others[best])
            if d:
                parts.append(f"paper - {best} (the best other row) {d[0]:+.1f} ± {d[1]:.1f}")
        for ours, theirs in _PAIRS:
            d = _diff(rows.get(ours, {}), rows.get(theirs, {}))
            if d:
                parts.append(f"{ours} - {theirs} {d[0]:+.1f} ± {d[1]:.1f}")
        if parts:
            out.append(f"- {s}: " + "; ".join(parts) + ".")
    return out if len(out) > 3 else []


def _accuracy(doc: dict) -> list:
    out = []
    def ms(row, seeds, timed=False):
        v = row.get("cil")
        if v is None:
            return "-"
        own = list(row.get("seeds", seeds))
        secs = f" · {row['seconds']['mean']:.1f} s" if timed and "seconds" in row else ""
        return f"{v['mean']:.3f} ± {v['std']:.3f}{secs}" + ("" if own == list(seeds) else
                                                              f" (seeds {', '.join(map(str, own))})")
    for section, title in (("accuracy_compare", "Accuracy: BMC against its parity preset, our baselines and Avalanche's"),
                           ("accuracy_select", "Accuracy on validation data: the choices of the defaults")):
        for run in doc.get(section, []):
            streams = list(run["streams"])
            rows = list(dict.fromkeys(m for s in streams for m in run["streams"][s]))
            recipe = "; ".join(f"{s}: {r['epochs']} + {r['consolidation_epochs']} epochs, memory {r['memory_size']}"
                               for s, r in run["recipes"].items() if s in streams)
            timed = section == "accuracy_compare"
            cells = (" Each cell: mean ± std · seconds a run (training and evaluation, on this machine, in one run)"
                     + (f"; Avalanche {run['avalanche']}, torch {run['torch']}." if run.get("avalanche") else ".")
                     if timed else "")
            out += ["", f"### {title} (`benchmarks/accuracy.py {run['bench']}`)", "",
                    f"Final class-IL accuracy, mean ± std over seeds {', '.join(map(str, run['seeds']))} (where not said "
                    f"otherwise), on the {run['split']} splits ({recipe}); commit {run['commit']}.{cells}", "",
                    "| | " + " | ".join(streams) + " |", "|---" * (len(streams) + 1) + "|"]
            out += [f"| {m} | " + " | ".join(ms(run["streams"][s].get(m, {}), run["seeds"], timed) for s in streams)
                    + " |" for m in rows]
            if timed:
                out += _paired(run, streams)
    for run in doc.get("accuracy_parity", []):
        timed = any("speedup" in r for r in run["streams"].values())
        out += ["", "### Parity with the authors' public code (`benchmarks/accuracy.py parity`)", "",
                f"Final class-IL accuracy on the test splits, the `parity` preset and {run['public_code']} run on the "
                f"same streams, seeds and recipes; the difference paired by seed, ± its standard error."
                + (" Times: training and evaluation seconds per run, both on one thread, run one beside the other "
                   "(`--public-run`); the speed-up is the median of the paired ratios (their range in brackets)."
                   if timed else ""), "",
                "| stream | seeds | public code | parity | parity - public (points) |"
                + (" public code s | parity s | speed-up |" if timed else "") + " commit |",
                "|---|---|---|---|---|" + ("---|---|---|" if timed else "") + "---|"]
        for name, r in run["streams"].items():
            se = "-" if r.get("diff_se") is None else f"{r['diff_se']:.2f}"
            speed = ""
            if timed:
                t = r.get("seconds")
                speed = (f" {t['public']['mean']:.1f} | {t['parity']['mean']:.1f} | {r['speedup']:.2f}x "
                         f"({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) |" if t else " - | - | - |")
            out.append(f"| {name} | {len(r['seeds'])} | {r['public']['mean']:.3f} ± {r['public']['std']:.3f} | "
                       f"{r['parity']['mean']:.3f} ± {r['parity']['std']:.3f} | {r['diff_points']:+.2f} ± {se} |"
                       f"{speed} {r.get('commit', run['commit'])} |")
    return out


def _avalanche(doc: dict) -> list:
    out = []
    for run in doc.get("avalanche", []):
        out += ["", "### BMC inside Avalanche (`benchmarks/bench_avalanche.py`)", "",
                f"{run['shape']}: the stream learned by `BMC.fit` (training; its evaluation left out) and by "
                f"`BMCStrategy.train` (Avalanche {run['avalanche']}; reading the experiences included), "
                f"medians of {run['rounds']} interleaved rounds, {run['threads']} thread(s), torch {run['torch']}; "
                f"commit {run['commit']}.", "",
                "| BMC.fit s | BMCStrategy s | strategy speed / fit speed (paired) |", "|---|---|---|",
                f"| {run['fit_s']:.2f} | {run['strategy_s']:.2f} | {run['speed_fraction']:.3f} |"]
    return out


def _contention(doc: dict) -> list:
    out = []
    for run in doc.get("contention", []):
        out += ["", "### Under load (`benchmarks/bench_contention.py`)", "",
                f"One incremental step (the e2e shape), idle and beside busy-looping processes; medians of "
                f"{run['rounds']} interleaved rounds; fair = (threads + loops) / threads; commit {run['commit']}.", "",
                "| variant | busy loops | median s | slowdown | fair | slowdown / fair |", "|---|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {r['busy_loops']} | {r['median_s']:.2f} | {r['slowdown']:.2f}x | {r['fair']:.2f}x "
                f"| {r['over_fair']:.2f} |" for r in run["rows"]]
    return out


def _stream_scale(doc: dict) -> list:
    out = []
    for run in doc.get("stream_scale", []):
        ep = run["epochs"]
        out += ["", "### Stream scale (`benchmarks/bench_stream_scale.py`)", "",
                f"Synthetic stream of 768-D float16 features (2-40 classes and uneven sizes per task), K = 8, memory "
                f"10,000, memory policy {run.get('policy', 'cap')!r}, {ep[0]} expert + {ep[1]} consolidation epoch(s), "
                f"{run['threads']} threads"
                + (f", early stopping after {run['early_stopping']} epochs without improvement on 10% of each "
                   f"consolidation set held out" if run.get("early_stopping") else "")
                + f"; commit {run['commit']}.", "",
                "| tasks | classes | experts s | buffers s | consolidation s | evaluation s | total s | s / task "
                "| peak anon MB | peak file MB | final class-IL | consolidation epochs run (mean) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            epochs_run = f"{r['consolidation_epochs_run']:.1f}" if "consolidation_epochs_run" in r else "-"
            out.append(f"| {r['tasks']} | {r['classes']} | {r['experts_s']:.1f} | {r['buffers_s']:.1f} | "
                       f"{r['consolidation_s']:.1f} | {r['evaluation_s']:.1f} | {r['total_s']:.1f} | "
                       f"{r['per_task_s']:.2f} | {r['peak_anon_mb']:.0f} | {r['peak_file_mb']:.0f} | "
                       f"{r['final_cil']:.2f} | {epochs_run} |")
    return out


def render_machine(doc: dict, link_dir: str = "results") -> list:
    """The Markdown of one results file; ``link_dir``: its folder, relative to the page."""
    m = doc.get("machine", {})
    kind = m.get("kind", "?")
    title = m.get("title") or m.get("cpu") or m.get("gpu") or kind
    link = f"{link_dir}/{kind}.json" if link_dir not in ("", ".") else f"{kind}.json"
    out = ["", f"## {title}", "", f"File: [`{link}`]({link})."]
    facts = [f"{m['cores']} cores" if m.get("cores") else None, m.get("isa"),
             f"bmc_fast {m['bmc_fast_kernels']} kernels" if m.get("bmc_fast_kernels") else None, "no GPU"
             if not m.get("gpu") else None]
    out[-1] += " " + ", ".join(f for f in facts if f) + "."
    if m.get("notes"):
        out += ["", m["notes"]]
    for part in (_e2e, _contention, _stream_scale, _accuracy, _avalanche, _kernels, _distributed, _autods):
        out += part(doc)
    return out


def render(results_dir: str = RESULTS_DIR, out: str = RESULTS_MD) -> str:
    docs = [load(p) for p in sorted(glob.glob(os.path.join(results_dir, "*.json")), reverse=True)]
    docs = [d for d in docs if d.get("machine", {}).get("kind")]
    link_dir = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(out)))
    lines = [HEADER.rstrip("\n")]
    for d in docs:
        lines += render_machine(d, link_dir)
    if not any(d.get("machine", {}).get("gpu") for d in docs):
        lines += ["", "## GPU", "", "No GPU figure yet: no CUDA kernel has run on a GPU (see the README's GPU section)."]
    return "\n".join(lines) + "\n"


def write(results_dir: str = RESULTS_DIR, out: str = RESULTS_MD) -> str:
    text = render(results_dir, out)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=RESULTS_DIR, help="folder of per-machine-kind JSON files")
    p.add_argument("--out", default=RESULTS_MD, help="the Markdown file to write")
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from what the files give")
    p.add_argument("--file", help="print one results file as Markdown instead")
    a = p.parse_args(argv)
    if a.file:
        print("\n".join(render_machine(load(a.file), os.path.dirname(a.file))).lstrip("\n"))
        return 0
    if a.check:
        with open(a.out) as f:
            same = f.read() == render(a.results, a.out)
        print(f"{a.out} is {'up to date' if same else 'stale: run python benchmarks/report.py'}")
        return 0 if same else 1
    print(f"wrote {write(a.results, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
