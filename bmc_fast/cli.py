"""``bmc-fast`` (also ``python -m bmc_fast``): run BMC on the embedded default stream or on
converted features, and convert AutoDS feature folders."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["main"]


def _table(results) -> str:
    rows = [("method", "final class-IL", "final task-IL", "forgetting", "BWT", "time s")]
    for r in results:
        t = sum(v for v in r.timings.values() if isinstance(v, (int, float)))
        f = lambda v: "-" if v != v else f"{v:.3f}"  # noqa: E731
        rows.append((r.method, f(r.final_cil_accuracy), f(r.final_til_accuracy), f(r.forgetting),
                     f(r.backward_transfer), f"{t:.1f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def _run(args) -> int:

    from .data import demo_stream, load_features
    from .train import BMC, BMCConfig
    from .train.baselines import finetune, joint

    overrides = dict(n_experts=args.experts, epochs=args.epochs, consolidation_epochs=args.consolidation_epochs,
                     stability=args.stability, device=args.device, seed=args.seed, parallel=args.parallel,
                     progress=False if (args.quiet or args.json) else None)
    if args.buffer_size is not None:
        overrides["buffer_size"] = args.buffer_size
    if args.memory_size is not None:
        overrides["memory_size"] = args.memory_size
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = BMCConfig.preset(args.preset, **overrides)
    except (TypeError, ValueError) as exc:
        print(f"bmc-fast: {exc}", file=sys.stderr)
        return 2
    load = (lambda: load_features(args.features)) if args.features else (lambda: demo_stream(seed=args.seed))
    if args.distributed:
        from .train.distributed import DistributedError, exit_after_failure, init_from_env, load_on_every_rank

        try:
            init_from_env(timeout_s=args.timeout)
            stream = load_on_every_rank(load)
        except DistributedError as exc:
            print(f"bmc-fast: {exc}", file=sys.stderr)
            exit_after_failure(3)
    else:
        stream = load()
    out = args.out
    os.makedirs(out, exist_ok=True)

    def emit(record):
        if args.json:
            print(json.dumps(record), flush=True)

    quiet = args.quiet or (args.distributed and os.environ.get("RANK", "0") != "0")

    def say(msg):
        if not args.json and not quiet:
            print(msg, flush=True)

    say(f"bmc_fast: {len(stream)} tasks, {stream.num_classes} classes, input dim {stream.input_dim}, "
        f"preset {args.preset}, {cfg.n_experts} experts ({cfg.parallel}), device {cfg.device}")
    t0 = time.perf_counter()
    bmc = BMC(cfg)
    if args.distributed:
        from .train.distributed import DistributedError, exit_after_failure, finish, fit_distributed

        rank = int(os.environ.get("RANK", "0"))
        try:
            res = fit_distributed(bmc, stream, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                                  events=emit if rank == 0 else None)
        except DistributedError as exc:
            print(f"bmc-fast: {exc}", file=sys.stderr)
            exit_after_failure(3)
        if rank != 0:
            finish(0)  # ends the process (the gloo teardown can abort one that finished its work)
    else:
        res = bmc.fit(stream, checkpoint_dir=args.checkpoint_dir, resume=args.resume, events=emit)
    res.method = "bmc" if args.preset == "paper" else "bmc-parity"
    say(f"BMC done in {time.perf_counter() - t0:.1f} s")
    results = [res]
    model_fn = bmc.model_fn
    if not args.no_baselines:
        results.append(finetune(stream, cfg, model_fn))
        results.append(joint(stream, cfg, model_fn))
    for r in results:
        r.save(os.path.join(out, f"{r.method}.json"))
        emit({"event": "result", **r.summary()})
    plot = None
    try:
        plot = res.plot(os.path.join(out, "bmc.png"), others={r.method: r for r in results[1:2]})
    except ImportError:
        say("(matplotlib is not installed: no plot)")
    say("")
    say(_table(results))
    say(f"\nresults written to {out}/" + (f" (plot: {plot})" if plot else ""))
    if args.distributed:
        finish(0)
    return 0


def _convert(args) -> int:
    from .data.autods import convert_autods

    convert_autods(args.root, args.out, dtype=args.dtype, feats_name=args.feats_name, progress=not args.quiet)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bmc-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train BMC (default: the embedded digits stream) and compare with "
                                   "sequential fine-tuning and joint training")
    r.add_argument("--preset", choices=["paper", "parity"], default="paper")
    r.add_argument("--experts", type=int, help="experts per incremental step (K)")
    r.add_argument("--epochs", type=int, help="expert epochs per task")
    r.add_argument("--consolidation-epochs", type=int)
    r.add_argument("--stability", choices=["feature", "weight"])
    r.add_argument("--parallel", choices=["auto", "stacked", "streams", "sequential"])
    r.add_argument("--buffer-size", type=float)
    r.add_argument("--memory-size", type=int)
    r.add_argument("--device", default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--features", help="a folder written by `bmc-fast convert-autods` (default: embedded digits)")
    r.add_argument("--checkpoint-dir")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    r.add_argument("--out", default="bmc_out", help="folder for results (JSON) and the plot")
    r.add_argument("--no-baselines", action="store_true")
    r.add_argument("--distributed", action="store_true",
                   help="run under torchrun: experts on every rank, consolidation on rank 0")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait (--distributed)")
    r.add_argument("--json", action="store_true", help="print a JSON event log instead of text")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_run)
    c = sub.add_parser("convert-autods", help="convert AutoDS feature folders to a memory-mappable format")
    c.add_argument("root")
    c.add_argument("out")
    c.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    c.add_argument("--feats-name", default="default")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_convert)
    args = p.parse_args(argv)
    if getattr(args, "buffer_size", None) is not None and args.buffer_size >= 1:
        args.buffer_size = int(args.buffer_size)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
