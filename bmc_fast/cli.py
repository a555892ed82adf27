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


def _table(results) -> str:
    rows = [("method", "final class-IL", "final task-IL", "forgetting", "BWT", "time s")]
    for r in results:
        t = sum(v for v in r.timings.values() if isinstance(v, (int, float)))
        f = lambda v: "-" if v != v else f"{v:.3f}"  # noqa: E731
        rows.append((r.method, f(r.final_cil_accuracy), f(r.final_til_accuracy), f(r.forgetting),
                     f(r.backward_transfer), f"{t:.1f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


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


def _config(args):
    from .train import BMCConfig

    overrides = dict(n_experts=args.experts, epochs=args.epochs, consolidation_epochs=args.consolidation_epochs,
                     stability=args.stability, device=args.device, seed=args.seed, parallel=args.parallel,
                     buffer_size=args.buffer_size, memory_size=args.memory_size,
                     progress=False if (args.quiet or args.json) else None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return BMCConfig.preset(args.preset, **overrides)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        for field, option in _OPTION_OF.items():
            msg = msg.replace(f"BMCConfig.{field} ", f"{option} ")
        raise UserError(msg) from None


def _stream_loader(args):
    """A function reading the task stream that ``args`` name (run on every rank when distributed)."""
    from .data import demo_stream, load_features

    if not args.features:
        return lambda: demo_stream(seed=args.seed)

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


def _run(args) -> int:
    if args.resume and not args.checkpoint_dir:
        raise UserError("--resume needs --checkpoint-dir (the folder the checkpoints were written to)")
    _check_device(args.device)
    cfg = _config(args)
    load = _stream_loader(args)
    from .train import BMC
    from .train.baselines import finetune, joint

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
    _checked(f"--out {out}", os.makedirs, out, exist_ok=True, errors=(OSError,))

    def emit(record):
        if args.json:
            print(json.dumps(record), flush=True)

    other_rank = args.distributed and os.environ.get("RANK", "0") != "0"

    def say(msg):  # progress lines: not with --quiet
        if not (args.json or args.quiet or other_rank):
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
    try:  # named like the result it shows: bmc.png, bmc-parity.png
        plot = res.plot(os.path.join(out, f"{res.method}.png"), others={r.method: r for r in results[1:2]})
    except ImportError:
        say("(matplotlib is not installed: no plot)")
    if not (args.json or other_rank):  # the results: printed with --quiet too
        say("")
        print(_table(results))
        print(f"results written to {out}/" + (f" (plot: {plot})" if plot else ""), flush=True)
    if args.distributed:
        finish(0)
    return 0


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
    r.add_argument("--features", metavar="DIR", help="a folder written by `bmc-fast convert-autods` "
                                                     "(default: the embedded digits stream)")
    r.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write a checkpoint there after every incremental step (default: none)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir (same options and data)")
    r.add_argument("--out", default="bmc_out", metavar="DIR",
                   help="folder for the results (<method>.json) and the plot (<method>.png)")
    r.add_argument("--no-baselines", action="store_true",
                   help="skip the comparison runs (sequential fine-tuning and joint training)")
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
