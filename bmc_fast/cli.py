"""``bmc-fast`` (also ``python -m bmc_fast``): run BMC on the embedded default stream or on
converted features, and convert AutoDS feature folders.

A mistake in the command line or the data it names ends the program with one line on stderr,
``bmc-fast: <what> ...``, and exit status 2; errors inside the library keep their traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["main"]

# The user's mistakes that validation reports with these exceptions; anything else is a bug.
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError)

# BMCConfig fields set from the command line, and their options (for error messages).
_OPTION_OF = {"n_experts": "--experts", "epochs": "--epochs", "consolidation_epochs": "--consolidation-epochs",
              "stability": "--stability", "parallel": "--parallel", "buffer_size": "--buffer-size",
              "memory_size": "--memory-size", "device": "--device", "seed": "--seed"}


class UserError(Exception):
    """A mistake in the command line or in the files it names: reported in one line."""


def _checked(what: str, fn, *args, errors=_INPUT_ERRORS, **kwargs):
    """``fn(*args, **kwargs)``, with the errors of input validation (``errors``) turned into a
    :class:`UserError` prefixed by ``what`` (the option or file concerned)."""
    try:
        return fn(*args, **kwargs)
    except errors as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UserError(f"{what}: {msg}") from None


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {device}: not a device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
            raise UserError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
                            f"built {built})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")


def _config(args, preset: str, seed: int):
    from .train import BMCConfig

    overrides = dict(n_experts=args.experts, epochs=args.epochs, consolidation_epochs=args.consolidation_epochs,
                     stability=args.stability, device=args.device, seed=seed, parallel=args.parallel,
                     buffer_size=args.buffer_size, memory_size=args.memory_size,
                     progress=False if (args.quiet or args.json) else None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return BMCConfig.preset(preset, **overrides)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        for field, option in _OPTION_OF.items():
            msg = msg.replace(f"BMCConfig.{field} ", f"{option} ")
        raise UserError(msg) from None


def _stream_loader(args, seed: int):
    """A function reading the task stream that ``args`` name (run on every rank when distributed)."""
    from .data import demo_stream, load_features

    if args.stream and args.features:
        raise UserError("--stream and --features name two streams: give one of them")
    if args.stream:
        from .data.suite import suite_stream

        return lambda: suite_stream(args.stream, seed=seed)
    if not args.features:
        return lambda: demo_stream(seed=seed)

    def load():
        folder = args.features
        if not os.path.isdir(folder):
            raise UserError(f"--features {folder}: no such folder (expected the index.json and .npy files that "
                            "`bmc-fast convert-autods` writes)")
        if not os.path.isfile(os.path.join(folder, "index.json")) and any(
                os.path.isfile(os.path.join(folder, d, "metadata.pickle")) for d in os.listdir(folder)):
            raise UserError(f"--features {folder}: this is an AutoDS root, not a converted folder: run "
                            f"`bmc-fast convert-autods {folder} OUT` once, then pass --features OUT")
        return _checked(f"--features {folder}", load_features, folder)
    return load


# What --methods accepts: the two BMC presets, then the baselines of bmc_fast.train.baselines.
_BMC_METHODS = {"bmc": "paper", "parity": "parity"}
_RESULT_NAME = {"bmc": "bmc", "parity": "bmc-parity"}


def _methods(args) -> list[str]:
    from .train.baselines import BASELINES

    if args.methods is None:
        names = ["parity" if args.preset == "parity" else "bmc", "finetune", "joint"]
    else:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = list(_BMC_METHODS) + list(BASELINES)
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise UserError(f"--methods: unknown method {bad[0] if bad else '(none given)'!r}; choose from {', '.join(known)}")
    if args.no_baselines:
        names = [m for m in names if m in _BMC_METHODS]
    if args.distributed and any(m not in _BMC_METHODS for m in names) and args.methods is not None:
        raise UserError("--distributed runs the BMC methods (bmc, parity) only; run the baselines without it")
    if args.distributed:
        names = [m for m in names if m in _BMC_METHODS]
    return list(dict.fromkeys(names))


def _summary_table(runs: dict) -> str:
    """The results table; with several seeds each figure is mean ± std over the seeds."""
    import numpy as np

    rows = [("method", "final class-IL", "final task-IL", "forgetting", "BWT", "time s")]
    for method, results in runs.items():
        def fig(get, digits=3):
            vals = np.array([get(r) for r in results], dtype=float)
            if np.isnan(vals).all():
                return "-"
            m = float(np.nanmean(vals))
            return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} ± {float(np.nanstd(vals)):.{digits}f}"
        rows.append((method, fig(lambda r: r.final_cil_accuracy), fig(lambda r: r.final_til_accuracy),
                     fig(lambda r: r.forgetting), fig(lambda r: r.backward_transfer),
                     fig(lambda r: r.timings.get("total_s", float("nan")), 1)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def _run(args) -> int:
    if args.resume and not args.checkpoint_dir:
        raise UserError("--resume needs --checkpoint-dir (the folder the checkpoints were written to)")
    _check_device(args.device)
    methods = _methods(args)
    seeds = args.seeds if args.seeds else [args.seed]
    if len(seeds) > 1 and args.checkpoint_dir:
        raise UserError("--checkpoint-dir takes one run: give one seed (--seed) with it")
    for m in methods:  # every configuration is valid before anything trains
        _config(args, _BMC_METHODS.get(m, args.preset), seeds[0])
    from .train import BMC
    from .train.baselines import BASELINES

    other_rank = args.distributed and os.environ.get("RANK", "0") != "0"

    def emit(record):
        if args.json:
            print(json.dumps(record), flush=True)

    def say(msg):  # progress lines: not with --quiet
        if not (args.json or args.quiet or other_rank):
            print(msg, flush=True)

    if args.distributed:
        from .train.distributed import DistributedError, exit_after_failure, init_from_env

        try:
            init_from_env(timeout_s=args.timeout)
        except DistributedError as exc:
            print(f"bmc-fast: {exc}", file=sys.stderr)
            exit_after_failure(3)
    first_stream = _load_stream(args, seeds[0])  # a bad --features is refused before anything is written
    out = args.out
    _checked(f"--out {out}", os.makedirs, out, exist_ok=True, errors=(OSError,))
    runs = {}
    first = {}
    for seed in seeds:
        stream = first_stream if seed == seeds[0] else _load_stream(args, seed)
        say(f"bmc_fast: {len(stream)} tasks, {stream.num_classes} classes, input dim {stream.input_dim}, "
            f"seed {seed}, methods {', '.join(methods)}")
        for m in methods:
            cfg = _config(args, _BMC_METHODS.get(m, args.preset), seed)
            t0 = time.perf_counter()
            if m in _BMC_METHODS:
                bmc = BMC(cfg)
                res = _fit_bmc(args, bmc, stream, emit)
                if res is None:  # another rank of a distributed run
                    continue
                res.method = _RESULT_NAME[m]
                model_fn = bmc.model_fn
            else:
                model_fn = BMC(cfg).model_fn
                res = BASELINES[m](stream, cfg, model_fn)
            say(f"{res.method} (seed {seed}) done in {time.perf_counter() - t0:.1f} s")
            name = res.method if len(seeds) == 1 else f"{res.method}-seed{seed}"
            res.save(os.path.join(out, f"{name}.json"))
            emit({"event": "result", "seed": seed, **res.summary()})
            runs.setdefault(res.method, []).append(res)
            first.setdefault(res.method, res)
    if other_rank:
        from .train.distributed import finish

        finish(0)  # ends the process (the gloo teardown can abort one that finished its work)
    if len(seeds) > 1:
        import numpy as np

        summary = {m: {"seeds": seeds, **{k: [r.summary()[k] for r in rs] for k in rs[0].summary() if k != "method"}}
                   for m, rs in runs.items()}
        for m in summary:
            for k in [k for k in summary[m] if k != "seeds"]:
                vals = np.array(summary[m][k], dtype=float)
                summary[m][k] = {"mean": float(np.nanmean(vals)) if not np.isnan(vals).all() else None,
                                 "std": float(np.nanstd(vals)) if not np.isnan(vals).all() else None,
                                 "values": [None if v != v else float(v) for v in vals]}
        from ._io import atomic_write_bytes

        atomic_write_bytes(os.path.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
    plot = None
    main_res = next((first[_RESULT_NAME[m]] for m in methods if m in _BMC_METHODS and _RESULT_NAME[m] in first),
                    next(iter(first.values()), None))
    if main_res is not None:
        try:  # named like the result it shows: bmc.png, bmc-parity.png
            plot = main_res.plot(os.path.join(out, f"{main_res.method}.png"),
                                 others={k: v for k, v in first.items() if k != main_res.method})
        except ImportError:
            say("(matplotlib is not installed: no plot)")
    if not args.json:  # the results: printed with --quiet too
        say("")
        print(_summary_table(runs))
        print(f"results written to {out}/" + (f" (plot: {plot})" if plot else ""), flush=True)
    if args.distributed:
        from .train.distributed import finish

        finish(0)
    return 0


def _load_stream(args, seed):
    load = _stream_loader(args, seed)
    if not args.distributed:
        return load()
    from .train.distributed import DistributedError, exit_after_failure, load_on_every_rank

    try:
        return load_on_every_rank(load)
    except DistributedError as exc:
        print(f"bmc-fast: {exc}", file=sys.stderr)
        exit_after_failure(3)


def _fit_bmc(args, bmc, stream, emit):
    if not args.distributed:
        return bmc.fit(stream, checkpoint_dir=args.checkpoint_dir, resume=args.resume, events=emit)
    from .train.distributed import DistributedError, exit_after_failure, fit_distributed

    rank = int(os.environ.get("RANK", "0"))
    try:
        return fit_distributed(bmc, stream, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                               events=emit if rank == 0 else None)
    except DistributedError as exc:
        print(f"bmc-fast: {exc}", file=sys.stderr)
        exit_after_failure(3)


def _convert(args) -> int:
    from .data.autods import convert_autods, feature_sets

    feats = args.feats_name
    if feats is None:
        names = _checked("convert-autods", feature_sets, args.root)
        if len(names) == 1:  # otherwise convert_autods says there is none, or several to choose from
            feats = names[0]
            print(f"convert-autods: feature set {feats!r} (the only one in {args.root})", flush=True)
    index = _checked("convert-autods", convert_autods, args.root, args.out, dtype=args.dtype, feats_name=feats,
                     progress=not args.quiet, errors=_INPUT_ERRORS + (ImportError,))  # lmdb not installed
    with open(index) as f:
        n = len(json.load(f)["tasks"])
    print(f"convert-autods: {n} tasks written to {args.out} (open with --features {args.out})", flush=True)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other user error."""

    def error(self, message):
        self.exit(2, f"bmc-fast: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" where the default is a value; options whose default comes from the
    preset or means "off" say so in their own help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from .train import BMCConfig

    paper, parity = BMCConfig.preset("paper"), BMCConfig.preset("parity")

    def preset_default(field: str) -> str:
        a, b = getattr(paper, field), getattr(parity, field)
        return f"(default: {a})" if a == b else f"(default: {a}; {b} with --preset parity)"

    p = _Parser(prog="bmc-fast", formatter_class=_Formatter,
                description="Batch Model Consolidation (BMC) for continual learning.\n\n"
                            "  bmc-fast run             train BMC on the embedded digits stream or on converted\n"
                            "                           features, with sequential fine-tuning and joint training\n"
                            "                           as baselines\n"
                            "  bmc-fast convert-autods  convert AutoDS feature folders for --features\n\n"
                            "`bmc-fast COMMAND --help` lists a command's options and defaults.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,convert-autods}")
    r = sub.add_parser("run", formatter_class=_Formatter,
                       help="train BMC and compare it with sequential fine-tuning and joint training",
                       description="Trains BMC on a task stream (default: the embedded digits stream, 5 tasks\n"
                                   "of 2 classes), then the baselines; prints a table of final accuracies,\n"
                                   "forgetting and time; writes <method>.json for each method and the plot\n"
                                   "<method>.png.",
                       epilog="examples:\n  bmc-fast run\n  bmc-fast run --epochs 2 --consolidation-epochs 2 "
                              "--no-baselines\n  bmc-fast run --features converted/ --device cuda --checkpoint-dir ck/"
                              "\n  bmc-fast run --preset parity --out parity/")
    r.add_argument("--preset", choices=["paper", "parity"], default="paper",
                   help="paper: BMC as published (stability and distillation losses, K experts in parallel); "
                        "parity: what the authors' public code ran (one expert at a time, replay with mixup, "
                        "no BMC loss terms)")
    r.add_argument("--experts", type=int, metavar="K",
                   help=f"experts trained in parallel per incremental step, one task each {preset_default('n_experts')}")
    r.add_argument("--epochs", type=int, metavar="N", help=f"expert epochs per task {preset_default('epochs')}")
    r.add_argument("--consolidation-epochs", type=int, metavar="N",
                   help=f"epochs over the memory in each consolidation phase {preset_default('consolidation_epochs')}")
    r.add_argument("--stability", choices=["feature", "weight"],
                   help=f"what the stability loss keeps near the base model: the experts' features or their "
                        f"weights {preset_default('stability')}")
    r.add_argument("--parallel", choices=["auto", "stacked", "streams", "sequential"],
                   help="how the K experts run: stacked (one batched model, CPU or GPU), streams (one CUDA stream "
                        f"per expert, GPU only), sequential (one after another); auto = stacked "
                        f"{preset_default('parallel')}")
    r.add_argument("--buffer-size", type=float, metavar="N",
                   help="samples each expert keeps for the memory: a count, or a fraction of its task if < 1 "
                        f"{preset_default('buffer_size')}")
    r.add_argument("--memory-size", type=int, metavar="N",
                   help=f"samples the memory keeps over all tasks seen {preset_default('memory_size')}")
    r.add_argument("--device", metavar="DEV", help=f"cpu, cuda or cuda:N {preset_default('device')}")
    r.add_argument("--seed", type=int, default=0, help="random seed (demo split, initialisation, batches, dropout)")
    from .data.suite import SUITE_STREAMS

    r.add_argument("--stream", choices=list(SUITE_STREAMS), metavar="NAME",
                   help="a stream of the accuracy suite, offline: " + ", ".join(SUITE_STREAMS) +
                        " (default: the embedded digits stream; see benchmarks/accuracy.py)")
    r.add_argument("--features", metavar="DIR", help="a folder written by `bmc-fast convert-autods` "
                                                     "(default: the embedded digits stream)")
    r.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write a checkpoint there after every incremental step (default: none)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir (same options and data)")
    r.add_argument("--out", default="bmc_out", metavar="DIR",
                   help="folder for the results (<method>.json) and the plot (<method>.png)")
    r.add_argument("--methods", metavar="M,M,...",
                   help="methods to run, compared in one table: bmc (the paper preset), parity (the public code's "
                        "recipe), er, derpp, lwf, gdumb, finetune, joint (default: the --preset's BMC, finetune, "
                        "joint)")
    r.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="run every method with each seed and report mean ± std (writes <method>-seed<S>.json "
                        "and summary.json; default: --seed)")
    r.add_argument("--no-baselines", action="store_true",
                   help="run only the BMC methods (no fine-tuning, joint or other baselines)")
    r.add_argument("--distributed", action="store_true",
                   help="run under torchrun: experts on every rank, consolidation on rank 0")
    r.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds a collective may wait (with --distributed)")
    r.add_argument("--json", action="store_true", help="print a JSON event log on stdout instead of text")
    r.add_argument("--quiet", action="store_true",
                   help="no progress bars or progress lines; the final table is still printed")
    r.set_defaults(func=_run)
    c = sub.add_parser("convert-autods", formatter_class=_Formatter,
                       help="convert AutoDS feature folders to a memory-mappable format",
                       description="Converts an AutoDS feature root (<root>/<dataset>/metadata.pickle and\n"
                                   "<dataset>/feats/<name>/{train,val} LMDB folders) to .npy files and an\n"
                                   "index.json that `bmc-fast run --features OUT` opens lazily.")
    c.add_argument("root", help="the AutoDS root folder")
    c.add_argument("out", help="the folder to write")
    c.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="dtype of the stored features")
    c.add_argument("--feats-name", metavar="NAME",
                   help="the feature set to convert (default: the only one the datasets have)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "buffer_size", None) is not None and args.buffer_size >= 1:
        args.buffer_size = int(args.buffer_size)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"bmc-fast: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bmc-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
