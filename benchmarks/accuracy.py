"""The accuracy suite: BMC's ``paper`` preset against ``parity``, ER and DER++ on real streams that
install offline (:mod:`bmc_fast.data.suite`: digits, permuted digits with 20 tasks, a mix of
tabular data sets), every method with the same storage budget (``memory_size`` samples kept
between steps) and the same memory policy.

    python benchmarks/accuracy.py select    # validation splits (20% of each training split), 3 seeds:
                                            # every term of the paper preset off in turn (the ablation)
    python benchmarks/accuracy.py compare   # test splits, 5 seeds: paper, parity, ER, DER++
    python benchmarks/accuracy.py compare --streams digits --seeds 0 1     # a part of it
    python benchmarks/accuracy.py parity --public FILE   # parity against the authors' public code,
                                            # paired by seed, on the seeds FILE holds (see --public)

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
}
COMPARED = ("paper", "parity", "er", "derpp")
PUBLIC = "public code (K = 1)"


def config(method: str, stream: str, seed: int, quick: bool = False, **overrides):
    from bmc_fast import BMCConfig

    recipe = dict(RECIPES[stream])
    if quick:
        recipe.update(epochs=1, consolidation_epochs=1)
    common = dict(recipe, seed=seed, progress=False, threads=None)
    if method == "parity":
        return BMCConfig.preset("parity", **common, **overrides)
    return BMCConfig.preset("paper", **common, **overrides)


def run(method: str, stream_name: str, seed: int, validation: bool, quick: bool = False, **overrides) -> dict:
    """One run: final class-IL / task-IL, forgetting, wall seconds."""
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
    else:
        res = BASELINES[method](stream, cfg, BMC(cfg).model_fn)
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


def _parity(p, args) -> int:
    """``parity``: the parity preset on the public file's streams and seeds, paired by seed."""
    _harness = _sibling("_harness")
    public = {s: v for s, v in _load_public(p, args.public).items() if s in args.streams}
    if not public:
        p.error(f"--public {args.public} has none of the streams asked for ({', '.join(args.streams)})")
    table = {}
    for stream, pub in public.items():
        ours = [run("parity", stream, s, False, args.quick)["cil"] for s in pub["seeds"]]
        d = (np.array(ours) - np.array(pub["values"])) * 100
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
        table[stream] = {"seeds": pub["seeds"], "parity": _stats(ours), "public": _stats(pub["values"]),
                         "diff_points": float(d.mean()), "diff_se": se, "commit": _harness.git_commit()}
        print(f"{stream:16s} parity {np.mean(ours):.3f}  public code {np.mean(pub['values']):.3f}  "
              f"parity - public {d.mean():+.2f} ± {'-' if se is None else f'{se:.2f}'} points "
              f"(standard error, {len(d)} seeds)", flush=True)
    if not (args.no_write or args.quick):
        import torch

        print(_record("parity", table, {"recipes": RECIPES, "split": "test", "torch": torch.__version__,
                                        "public_code": "fostiropoulos/stream_benchmark d50b37a"}))
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
    args = p.parse_args(argv)
    if args.what == "parity":
        if not args.public:
            p.error("parity needs --public FILE: the public code's figures to pair with")
        if args.methods or args.seeds:
            p.error("parity runs the parity preset on the seeds of --public FILE: no --methods or --seeds")
        return _parity(p, args)
    known = list(VARIANTS) if args.what == "select" else list(COMPARED)
    for name in args.methods or []:
        if name not in known:
            p.error(f"--methods: {args.what} has no {name!r}; choose from {', '.join(known)}")
    if args.public:
        if args.what != "compare":
            p.error("--public records test-split figures: use it with compare or parity")
        table = {s: {PUBLIC: {"cil": _stats(v["values"]), "til": _stats(v["til_values"]), "seeds": v["seeds"]}}
                 for s, v in _load_public(p, args.public).items()}
        print(_record("compare", table, {"public_code": "fostiropoulos/stream_benchmark d50b37a"}))
        return 0
    validation = args.what == "select"
    seeds = args.seeds or ([0, 1, 2] if validation else [0, 1, 2, 3, 4])
    names = args.methods or (list(VARIANTS) if validation else list(COMPARED))
    table = {}
    for stream in args.streams:
        for name in names:
            if validation:
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
                "torch": torch.__version__}
        print(_record(args.what, table, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
