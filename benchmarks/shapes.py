"""The one list of benchmark shapes, taken from the BMC setting (issue 3's sizes)."""
import os

QUICK = os.environ.get("BMC_BENCH_QUICK", "") not in ("", "0")

STABILITY = [(4, 256, 256), (8, 256, 1024), (16, 512, 768)]          # (K, B, D)
WEIGHT_STABILITY = [(4, 300_000), (16, 300_000), (4, 5_000_000), (16, 5_000_000)]  # (K, P)
DISTILLATION = [(512, 768, 8), (4096, 768, 8)]                       # (N, D, K)
MASKED = [(n, c) for n in (512, 4096) for c in (100, 1000, 10000)]  # (N, C), ranges of 2..C/10 classes
DTYPES = ["float32", "bfloat16"]
MODES = ["fwd", "fwd+bwd"]

if QUICK:  # CI smoke run: proves the scripts work, measures nothing worth reporting
    STABILITY = [(2, 16, 32)]
    WEIGHT_STABILITY = [(2, 1000)]
    DISTILLATION = [(64, 32, 4)]
    MASKED = [(64, 100)]
    DTYPES = ["float32"]
