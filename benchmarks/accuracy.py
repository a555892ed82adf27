"""The accuracy suite: BMC's ``paper`` preset against ``parity``, ER and DER++ on real streams that
install offline (:mod:`bmc_fast.data.suite`: digits, permuted digits with 20 tasks, a mix of
tabular data sets), every method with the same storage budget (``memory_size`` samples kept
between steps) and the same memory policy.

    python benchmarks/accuracy.py select    # validation splits (20% of each training split), 3 seeds:
                                            # every term of the paper preset off in turn (the ablation)
    python benchmarks/accuracy.py select --methods "er (buffer=task)" ...   # the baselines' storage
    python benchmarks/accuracy.py compare   # test splits, 5 seeds: paper, parity, our baselines and,
                                            # where the [avalanche] extra is installed, Avalanche's
                                            # Naive, Replay, DER, LwF and GDumb; writes a PNG of
                                            # accuracy against time
    python benchmarks/accuracy.py compare --streams digits --seeds 0 1     # a part of it
    python benchmarks/accuracy.py parity --public FILE   # parity against the authors' public code,
                                            # paired by seed, on the seeds FILE holds (see --public)
    python benchmarks/accuracy.py parity --public-run CMD  # the public code run beside parity, one
                                            # thread each: accuracy paired by seed and speed-up

Each run merges its figures into this machine kind's results file (``benchmarks/results/``,
sections ``accuracy_select``, ``accuracy_compare`` and ``accuracy_parity``) and re-renders RESULTS.md. Defaults are chosen from ``select`` (validation data only), never
from ``compare``. Under pytest (``make bench-quick``) a tiny run checks that the script works.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# The training recipe of each stream, the same for every method: expert (or per-task) epochs,
# consolidation epochs, the per-task buffer (the whole task) and the storage budget.
RECIPES = {
    "digits": dict(epochs=5, consolidation_epochs=20, buffer_size=10000, memory_size=200),
    "permuted-digits": dict(epochs=3, consolidation_epochs=10, buffer_size=10000, memory_size=1000),
    "tabular-mix": dict(epochs=10, consolidation_epochs=20, buffer_size=10000, memory_size=200),
}
# The ablation: the paper preset with one choice changed at a time.
VARIANTS = {
    "paper": {},
    "no stability loss": dict(stability_coef=0.0),
    "no distillation loss": dict(distill_coef=0.0),
    "+ KD on stored logits": dict(kd_coef=1.0),
    "CE over each task's range": dict(consolidation_ce="task"),
    "memory policy cap": dict(memory_policy="cap"),
    "CE + mixup 0.4, no distillation": dict(distill_coef=0.0, mixup="uniform", mixup_alpha=0.4),
    "K = 1": dict(n_experts=1),
    "K = 2": dict(n_experts=2),
    "distillation coef 2": dict(distill_coef=2.0),
    "stability coef 2": dict(stability_coef=2.0),
    "consolidation lr 0.01": dict(consolidation_lr=0.01),
    "+ KD on stored logits, coef 0.5": dict(kd_coef=0.5),
    # Consolidation stopped by a validation split of the memory (never test data): the split
    # alone (its LR on plateau), then with early stopping.
    "validation 10% of the memory": dict(val_fraction=0.1),
    "validation 10%, early stopping 3": dict(val_fraction=0.1, early_stopping=3),
}
# The baselines' choices, made on validation data like the paper preset's terms; every row names
# all the options it sets (the defaults: er buffer="class", optimizer="stream"; derpp buffer="class",
# optimizer="task", alpha 0.3, beta 1.0, draws 2).
_OLD_DER = {"alpha": 0.1, "beta": 0.5}
BASELINE_VARIANTS = {
    **{f"er (buffer={b}, optimizer=task)": ("er", {"buffer": b, "optimizer": "task"}) for b in ("task", "class", "reservoir")},
    "er (buffer=class, optimizer=stream)": ("er", {"buffer": "class", "optimizer": "stream"}),
    **{f"derpp (buffer={b}, alpha=0.1, beta=0.5)": ("derpp", {"buffer": b, **_OLD_DER}) for b in ("task", "class", "reservoir")},
    "derpp (alpha=0.1, beta=0.5, optimizer=stream)": ("derpp", {**_OLD_DER, "optimizer": "stream"}),
    "derpp (alpha=0.1, beta=0.5, draws=1)": ("derpp", {**_OLD_DER, "draws": 1}),
    "derpp (alpha=0.1, beta=0.5, draws=1, optimizer=stream)": ("derpp", {**_OLD_DER, "draws": 1, "optimizer": "stream"}),
    **{f"derpp (alpha={a}, beta={b}{o})": ("derpp", {"alpha": a, "beta": b, **opt})
       for a in (0.1, 0.3, 0.5) for b in (0.5, 1.0) for o, opt in (("", {}), (", optimizer=stream", {"optimizer": "stream"}))},
}
OURS = ("paper", "parity", "er", "derpp", "lwf", "gdumb", "finetune")
# Avalanche's own strategies (bmc_fast.integrations.avalanche, the [avalanche] extra), as the rows name them.
AVALANCHE = {f"avalanche {n}": n for n in ("naive", "replay", "der", "lwf", "gdumb")}
COMPARED = OURS + tuple(AVALANCHE)
PUBLIC = "public code (K = 1)"
def avalanche_available() -> str | None:
    """Avalanche's version, or None where the [avalanche] extra is not installed."""
    try:
        from bmc_fast.integrations import avalanche
    except ImportError:
        return None
    return avalanche.AVALANCHE_VERSION


def config(method: str, stream: str, seed: int, quick: bool = False, **overrides):
    from bmc_fast import BMCConfig

    recipe = dict(RECIPES[stream])
    if quick:
        recipe.update(epochs=1, consolidation_epochs=1)
    options = {**recipe, "seed": seed, "progress": False, "threads": None, **overrides}
    return BMCConfig.preset("parity" if method == "parity" else "paper", **options)


def run(method: str, stream_name: str, seed: int, validation: bool, quick: bool = False, options: dict | None = None,
        **overrides) -> dict:
    """One run: final class-IL / task-IL, forgetting, wall seconds (training and evaluation).
    ``method``: a preset, a baseline of :data:`bmc_fast.train.baselines.BASELINES` (``options``:
    its keyword arguments) or an Avalanche row (:data:`AVALANCHE`)."""
    from bmc_fast import BMC
    from bmc_fast.data.suite import suite_stream
    from bmc_fast.train.baselines import BASELINES

    stream = suite_stream(stream_name, seed=seed, validation=validation)
    if quick:
        stream = type(stream)(list(stream)[:3])
    cfg = config(method, stream_name, seed, quick, **overrides)
    t0 = time.perf_counter()
    if method in ("paper", "parity"):
        res = BMC(cfg).fit(stream)
    elif method in AVALANCHE:
        from bmc_fast.integrations.avalanche import fit_strategy

        res = fit_strategy(AVALANCHE[method], stream, cfg)
    else:
        res = BASELINES[method](stream, cfg, BMC(cfg).model_fn, **(options or {}))
    return {"cil": res.final_cil_accuracy, "til": res.final_til_accuracy, "forgetting": res.forgetting,
            "seconds": time.perf_counter() - t0}


def _stats(vals):
    a = np.array(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def _sibling(name: str):
    """The benchmark module ``name`` beside this script (found however this script was loaded)."""
    import importlib

    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(name)


def _record(what: str, table: dict, meta: dict) -> str:
    """Merges ``table`` ({stream: {method: stats}}) into the section ``accuracy_<what>`` of this
    machine kind's results file (rows of other streams and methods stay) and re-renders RESULTS.md."""
    _harness, report, record = _sibling("_harness"), _sibling("report"), _sibling("bench_contention")._record

    section = f"accuracy_{what}"
    path = os.path.join(report.RESULTS_DIR, f"{_harness.machine_kind('cpu')}.json")
    old = next(iter(report.load(path).get(section, [])), {}) if os.path.exists(path) else {}
    streams = old.get("streams", {})
    for stream, rows in table.items():
        streams.setdefault(stream, {}).update(rows)
    keep = {k: v for k, v in old.items() if k not in ("streams", "commit", "torch", "device", "threads")}
    return record(section, {**keep, "bench": what, **meta, "streams": streams})


def _load_public(p, path: str) -> dict:
    """{stream: {"seeds": [...], "values": [...], "til_values": [...]}} of ``path`` (seeds default to
    0, 1, ...), or a one-line argparse error."""
    try:
        with open(path) as f:
            public = json.load(f)
        out = {}
        for s, v in public.items():
            if s not in RECIPES:
                continue
            vals, til = [float(a) for a in v["values"]], [float(a) for a in v["til_values"]]
            seeds = list(v.get("seeds", range(len(vals))))
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in seeds) or len(set(seeds)) < len(seeds):
                raise ValueError(f"{s}: seeds must be distinct integers")
            if not (len(vals) == len(til) == len(seeds) > 0):
                raise ValueError(f"{s}: seeds, values and til_values must have the same length > 0")
            if not all(0.0 <= a <= 1.0 for a in vals + til):
                raise ValueError(f"{s}: accuracies must be fractions in [0, 1] (not percentages)")
            out[s] = {"seeds": seeds, "values": vals, "til_values": til}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        p.error(f"--public {path}: expected {{stream: {{\"values\": [...], \"til_values\": [...], \"seeds\": [...] "
                f"(optional)}}}} ({type(exc).__name__}: {exc})")
    if not out:
        p.error(f"--public {path}: no stream of the suite ({', '.join(RECIPES)})")
    return out


def _public_run(p, cmd: str, stream: str, seed: int) -> dict:
    """One run of ``--public-run CMD`` on ``stream`` and ``seed``, one thread: its last stdout line,
    a JSON object with "acc", "til" and "seconds"; anything else is a one-line argparse error."""
    import shlex
    import subprocess

    argv = shlex.split(cmd) + ["--stream", stream, "--seed", str(seed), "--threads", "1"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        p.error(f"--public-run {cmd!r}: cannot run it ({exc})")
    lines = done.stdout.strip().splitlines()
    try:
        if done.returncode:
            raise ValueError(f"exit status {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}")
        out = json.loads(lines[-1]) if lines else None
        got = {k: float(out[k]) for k in ("acc", "til", "seconds")}
        if not (0 <= got["acc"] <= 1 and 0 <= got["til"] <= 1 and got["seconds"] > 0):
            raise ValueError(f"acc and til must be fractions in [0, 1] and seconds > 0, got {got}")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        p.error(f"--public-run {cmd!r} on {stream} seed {seed}: expected a last line "
                f'{{"acc": ..., "til": ..., "seconds": ...}} ({type(exc).__name__}: {exc})')
    return got


def _side_by_side(p, args, stream: str, seed: int, public_first: bool) -> tuple[dict, dict]:
    """One seed of the parity preset and of ``--public-run``, one thread each, one after the
    other in the order asked: (our run, theirs)."""
    if public_first:
        theirs = _public_run(p, args.public_run, stream, seed)
        return run("parity", stream, seed, False, args.quick, threads=1), theirs
    ours = run("parity", stream, seed, False, args.quick, threads=1)
    return ours, _public_run(p, args.public_run, stream, seed)


def _parity(p, args) -> int:
    """``parity``: the parity preset on the public code's streams and seeds, paired by seed: the
    figures of ``--public FILE``, or ``--public-run CMD`` run beside each parity run, both on one
    thread, alternating which goes first (then the speed-up is recorded too)."""
    _harness = _sibling("_harness")
    if args.public:
        public = {s: v for s, v in _load_public(p, args.public).items() if s in args.streams}
        if not public:
            p.error(f"--public {args.public} has none of the streams asked for ({', '.join(args.streams)})")
    else:
        seeds = args.seeds or [0, 1, 2, 3, 4]
        public = {s: {"seeds": seeds} for s in args.streams}
    table = {}
    for stream, pub in public.items():
        ours, times = [], {"public": [], "parity": []}
        if args.public_run:
            pub["values"] = []
        for i, seed in enumerate(pub["seeds"]):
            if not args.public_run:
                ours.append(run("parity", stream, seed, False, args.quick)["cil"])
                continue
            r, theirs = _side_by_side(p, args, stream, seed, public_first=i % 2 == 0)
            ours.append(r["cil"])
            pub["values"].append(theirs["acc"])
            times["public"].append(theirs["seconds"])
            times["parity"].append(r["seconds"])
            print(f"{stream:16s} seed {seed}: public code {theirs['acc']:.3f} in {theirs['seconds']:.1f} s, "
                  f"parity {r['cil']:.3f} in {r['seconds']:.1f} s", flush=True)
        d = (np.array(ours) - np.array(pub["values"])) * 100
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
        table[stream] = {"seeds": pub["seeds"], "parity": _stats(ours), "public": _stats(pub["values"]),
                         "diff_points": float(d.mean()), "diff_se": se, "commit": _harness.git_commit()}
        line = (f"{stream:16s} parity {np.mean(ours):.3f}  public code {np.mean(pub['values']):.3f}  "
                f"parity - public {d.mean():+.2f} ± {'-' if se is None else f'{se:.2f}'} points "
                f"(standard error, {len(d)} seeds)")
        if args.public_run:
            ratios = np.array(times["public"]) / np.array(times["parity"])
            table[stream].update(seconds={k: _stats(v) for k, v in times.items()}, threads=1,
                                 speedup=float(np.median(ratios)), speedup_range=[float(ratios.min()),
                                                                                  float(ratios.max())])
            line += f"; {np.median(ratios):.2f}x the public code's speed (median of paired runs, one thread)"
        print(line, flush=True)
    if not (args.no_write or args.quick):
        import torch

        meta = {"recipes": RECIPES, "split": "test", "torch": torch.__version__, "public_code": args.public_code}
        if args.public_run:
            meta["public_run"] = args.public_run
        print(_record("parity", table, meta))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["select", "compare", "parity"])
    p.add_argument("--streams", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--methods", nargs="+", help="variants (select) or methods (compare) to run")
    p.add_argument("--quick", action="store_true", help="3 tasks, 1 epoch: checks the script, no figures")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--public", metavar="FILE",
                   help="the BMC authors' public code's figures, run outside this project on the suite's streams "
                        "and recipes: a JSON {stream: {\"values\": [final class-IL per seed], \"til_values\": "
                        "[...], \"seeds\": [...] (optional: 0, 1, ...)}}. compare: records them as the row "
                        "'public code (K = 1)' and trains nothing; parity: runs the parity preset on those seeds")
    p.add_argument("--public-run", metavar="CMD",
                   help="parity only: a command that runs the public code (outside this project) on one stream "
                        "and seed, called as CMD --stream S --seed N --threads 1; its last stdout line must be "
                        "a JSON {\"acc\": final class-IL, \"til\": final task-IL, \"seconds\": training and "
                        "evaluation time}. Each seed runs it beside the parity preset, both on one thread: "
                        "accuracy paired by seed and the speed-up")
    p.add_argument("--public-code", metavar="NAME", default="fostiropoulos/stream_benchmark d50b37a",
                   help="what --public or --public-run holds or runs, as the results name it (default: %(default)s)")
    args = p.parse_args(argv)
    if args.public_run and args.what != "parity":
        p.error("--public-run runs the public code beside the parity preset: use it with parity")
    if args.what == "parity":
        if bool(args.public) == bool(args.public_run):
            p.error("parity needs one of --public FILE (the public code's figures) or --public-run CMD (the "
                    "public code run beside it)")
        if args.methods or (args.seeds and args.public):
            p.error("parity runs the parity preset on the seeds of --public FILE: no --methods or --seeds")
        return _parity(p, args)
    known = list(VARIANTS) + list(BASELINE_VARIANTS) if args.what == "select" else list(COMPARED)
    for name in args.methods or []:
        if name not in known:
            p.error(f"--methods: {args.what} has no {name!r}; choose from {', '.join(known)}")
    version = avalanche_available()
    if version is None and args.what == "compare" and not args.public:
        asked = [m for m in args.methods or [] if m in AVALANCHE]
        if asked:
            p.error(f"--methods {asked[0]!r} needs Avalanche: pip install \"bmc_fast[avalanche]\"")
        print("Avalanche is not installed: its rows are skipped (pip install \"bmc_fast[avalanche]\")", flush=True)
    if args.public:
        if args.what != "compare":
            p.error("--public records test-split figures: use it with compare or parity")
        table = {s: {PUBLIC: {"cil": _stats(v["values"]), "til": _stats(v["til_values"]), "seeds": v["seeds"]}}
                 for s, v in _load_public(p, args.public).items()}
        print(_record("compare", table, {"public_code": args.public_code}))
        return 0
    validation = args.what == "select"
    seeds = args.seeds or ([0, 1, 2] if validation else [0, 1, 2, 3, 4])
    names = args.methods or (list(VARIANTS) + list(BASELINE_VARIANTS) if validation else
                             [m for m in COMPARED if version is not None or m not in AVALANCHE])
    table = {}
    for stream in args.streams:
        for name in names:
            if name in BASELINE_VARIANTS:
                method, options = BASELINE_VARIANTS[name]
                rs = [run(method, stream, s, True, args.quick, options) for s in seeds]
            elif validation:
                from bmc_fast import BMCConfig

                if all(getattr(BMCConfig, k, None) == v for k, v in VARIANTS[name].items()) and name != "paper":
                    continue  # the default already: the same runs as "paper"
                rs = [run("paper", stream, s, True, args.quick, **VARIANTS[name]) for s in seeds]
            else:
                rs = [run(name, stream, s, False, args.quick) for s in seeds]
            row = {k: _stats([r[k] for r in rs]) for k in ("cil", "til", "forgetting", "seconds")}
            row["seeds"] = seeds
            table.setdefault(stream, {})[name] = row
            print(f"{stream:16s} {name:28s} class-IL {row['cil']['mean']:.3f} ± {row['cil']['std']:.3f}  "
                  f"task-IL {row['til']['mean']:.3f}  {row['seconds']['mean']:.1f} s/run", flush=True)
    if not (args.no_write or args.quick):
        import torch

        meta = {"seeds": seeds, "recipes": RECIPES, "split": "validation" if validation else "test",
                "torch": torch.__version__, "avalanche": version}
        print(_record(args.what, table, meta))
        if args.what == "compare":
            kind, folder = _sibling("_harness").machine_kind("cpu"), _sibling("report").RESULTS_DIR
            print(plot_compare(os.path.join(folder, f"{kind}.json"), os.path.join(folder, f"accuracy-{kind}.png")))
    return 0


def plot_compare(results: str, path: str) -> str:
    """Final class-IL accuracy against time (seconds a run, log scale) of every row of the
    ``accuracy_compare`` section of the results file ``results``, one panel per stream; a PNG
    written to ``path``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_ = _sibling("report").load(results)["accuracy_compare"][0]
    streams = list(run_["streams"])
    fig, axes = plt.subplots(1, len(streams), figsize=(5 * len(streams), 4.2), squeeze=False)
    for ax, stream in zip(axes[0], streams):
        for name, row in run_["streams"][stream].items():
            if "seconds" not in row:
                continue
            ours = name not in AVALANCHE
            ax.errorbar(row["seconds"]["mean"], row["cil"]["mean"], yerr=row["cil"]["std"], fmt="o" if ours else "s",
                        color="C0" if name in ("paper", "parity") else ("C2" if ours else "C3"), capsize=3)
            ax.annotate(name, (row["seconds"]["mean"], row["cil"]["mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels on the decades only
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(stream)
        ax.set_xlabel("seconds per run (training + evaluation)")
        ax.set_ylabel("final class-IL accuracy (test)")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against time: BMC (blue), bmc_fast baselines (green), Avalanche (red squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
