"""BMC inside Avalanche against ``BMC.fit``, on the end-to-end benchmark's shape
(``bench_e2e_step.py``: K = 4 experts, ResMLP on 768-D inputs, 10k samples a task, 1 expert
epoch, 1 consolidation epoch): the same 4-task stream learned by ``BMC.fit`` (its training:
the evaluation it adds is left out) and by ``BMCStrategy.train(benchmark.train_stream)`` (the
experiences read out of Avalanche's datasets included), in interleaved rounds; medians, and the
strategy's speed as a fraction of ``fit``'s paired by round. Needs the [avalanche] extra.

    python benchmarks/bench_avalanche.py [--rounds 5] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _rounds(rounds: int, quick: bool) -> dict:
    from bench_e2e_step import K, N, make_stream

    from bmc_fast import BMC, BMCConfig
    from bmc_fast.integrations.avalanche import BMCStrategy, benchmark_from_stream, initial_model

    stream = make_stream()
    bench = benchmark_from_stream(stream)
    cfg = BMCConfig(n_experts=K, epochs=1, consolidation_epochs=1, buffer_size=N, memory_size=K * N, progress=False)

    def fit():
        t0 = time.perf_counter()
        res = BMC(cfg).fit(stream)
        return time.perf_counter() - t0 - res.timings["evaluation_s"]

    def strategy():
        model = initial_model(cfg, stream.input_dim, stream.num_classes)
        s = BMCStrategy(model=model, config=cfg)
        t0 = time.perf_counter()
        s.train(bench.train_stream)
        return time.perf_counter() - t0

    times = {"BMC.fit": [], "BMCStrategy": []}
    for _ in range(1 if quick else 1 + rounds):  # the first round warms up (and is dropped)
        times["BMC.fit"].append(fit())
        times["BMCStrategy"].append(strategy())
    if not quick:
        times = {k: v[1:] for k, v in times.items()}
    ratio = [f / s for f, s in zip(times["BMC.fit"], times["BMCStrategy"])]
    return {"shape": f"K = {K}, {N} samples a task, 768-D, 1 + 1 epochs", "rounds": len(ratio),
            "fit_s": statistics.median(times["BMC.fit"]), "strategy_s": statistics.median(times["BMCStrategy"]),
            "speed_fraction": statistics.median(ratio), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    try:
        import avalanche
    except ImportError:
        p.error("needs Avalanche: pip install \"bmc_fast[avalanche]\"")
    import shapes

    run = _rounds(args.rounds, shapes.QUICK)
    run.update(avalanche=avalanche.__version__, torch=torch.__version__)
    print(f"{run['shape']}: BMC.fit {run['fit_s']:.2f} s, BMCStrategy {run['strategy_s']:.2f} s, "
          f"strategy speed / fit speed {run['speed_fraction']:.3f} (median of {run['rounds']} paired rounds)")
    if not (args.no_write or shapes.QUICK):
        from bench_contention import _record

        print(_record("avalanche", run))
    return 0


def bench_avalanche_strategy_speed(capsys):
    """Under pytest (make bench-quick): a tiny run checks the script works, where Avalanche is."""
    import pytest

    pytest.importorskip("avalanche", reason="needs the [avalanche] extra")
    assert main(["--no-write"]) == 0
    assert "strategy speed / fit speed" in capsys.readouterr().out


if __name__ == "__main__":
    sys.exit(main())
