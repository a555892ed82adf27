"""Turns a saved kernel-benchmark JSON (benchmarks/out/bench-*.json) into the Markdown tables of
RESULTS.md: the fwd+bwd rows with targets marked, and a count of rows meeting them.

    python benchmarks/report.py benchmarks/out/bench-YYYYmmdd-HHMMSS.json [--eager 3 --compile 1.3]
"""
import argparse
import json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--eager", type=float, default=3.0)
    p.add_argument("--compile", type=float, default=1.3)
    p.add_argument("--mode", default="fwd+bwd")
    a = p.parse_args()
    with open(a.path) as f:
        d = json.load(f)
    rows = [r for r in d["rows"] if r["mode"] == a.mode]
    print(f"| op | shape | dtype | {a.mode} ms (bmc / eager / compiled) | x eager | x compile | % copy BW "
          "| peak MB bmc / eager / compiled |")
    print("|---|---|---|---|---|---|---|---|")
    ok = 0
    for r in rows:
        good = r["speedup_vs_eager"] >= a.eager and r["speedup_vs_compile"] >= a.compile
        ok += good
        mem = " / ".join("-" if r.get(f"mem_{q}_mb") is None else f"{r[f'mem_{q}_mb']:.0f}"
                         for q in ("bmc_fast", "eager", "compiled"))
        print(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['t_bmc_fast_ms']:.2f} / {r['t_eager_ms']:.2f} / "
              f"{r['t_compiled_ms']:.2f} | {r['speedup_vs_eager']:.1f} | {r['speedup_vs_compile']:.2f}"
              f"{'' if good else ' ✗'} | {100 * r['bw_fraction']:.0f} | {mem} |")
    print(f"\n{ok} of {len(rows)} {a.mode} rows meet both targets ({a.eager}x eager, {a.compile}x torch.compile); "
          f"{sum(r['speedup_vs_eager'] > 1 for r in rows)} beat eager.")


if __name__ == "__main__":
    main()
