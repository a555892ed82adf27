"""Ablation on the embedded digits stream: what BMC's stability and distillation terms add.

Small buffers (so the memory cannot replay everything), K = 2 experts, five seeds. Prints a
Markdown table (mean +- std of final class-IL accuracy and forgetting), the ablation table of
benchmarks/RESULTS.md (kept in the results file of the machine it ran on).

    python benchmarks/ablation.py [--seeds 0 1 2 3 4] [--buffer 20]
"""
import argparse
import statistics
import time

from bmc_fast import BMC, BMCConfig
from bmc_fast.train.baselines import finetune, joint
from bmc_fast.data import demo_stream
from bmc_fast.backbone import ResMLP

VARIANTS = {
    "BMC (stability + distillation)": {},
    "no stability term": {"stability_coef": 0.0},
    "no distillation term": {"distill_coef": 0.0},
    "neither (replay only)": {"stability_coef": 0.0, "distill_coef": 0.0},
    "BMC, weight stability": {"stability": "weight", "stability_coef": 0.01},
    "parity preset (authors' code)": "parity",
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--buffer", type=int, default=20)
    p.add_argument("--experts", type=int, default=2)
    a = p.parse_args()
    common = dict(n_experts=a.experts, buffer_size=a.buffer, memory_size=5 * a.buffer, progress=False)
    rows = []
    t0 = time.time()
    for name, over in VARIANTS.items():
        accs, fgts = [], []
        for seed in a.seeds:
            s = demo_stream(seed=seed)
            cfg = (BMCConfig.preset("parity", **{**common, "n_experts": 1}, seed=seed) if over == "parity"
                   else BMCConfig(**common, **over, seed=seed))
            r = BMC(cfg).fit(s)
            accs.append(r.final_cil_accuracy)
            fgts.append(r.forgetting)
        rows.append((name, accs, fgts))
    for name, fn in (("fine-tuning", finetune), ("joint training", joint)):
        accs = []
        for seed in a.seeds:
            s = demo_stream(seed=seed)
            cfg = BMCConfig(seed=seed, progress=False)
            accs.append(fn(s, cfg, lambda d, c: ResMLP(d, c)).final_cil_accuracy)
        rows.append((name, accs, [float("nan")]))
    ms = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 and v[0] == v[0] else (  # noqa: E731
        f"{v[0]:.3f}" if v[0] == v[0] else "-")
    print(f"digits, 5 tasks x 2 classes, buffer {a.buffer}/task, memory {5 * a.buffer}, K = {a.experts}, "
          f"seeds {a.seeds} ({time.time() - t0:.0f} s)\n")
    print("| variant | final class-IL accuracy | forgetting |")
    print("|---|---|---|")
    for name, accs, fgts in rows:
        print(f"| {name} | {ms(accs)} | {ms(fgts)} |")


if __name__ == "__main__":
    main()
