#!/usr/bin/env bash
# The Avalanche integration tests (tests/test_avalanche.py, examples/avalanche_bmc.py) in an
# environment with the [avalanche] extra. torchvision's wheels (Avalanche needs torchvision) link
# the CUDA build of torch, so this environment has torch 2.14.1 (a CUDA build, which runs on the
# CPU), like the full CUDA build's: CI reuses that one (build/cuda-venv); elsewhere a fresh venv
# gets torch 2.14.1 and a CPU-only build of bmc_fast.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AVALANCHE_VENV:-build/cuda-venv}
t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 numpy scikit-build-core pybind11 ninja
  BMC_FAST_CUDA=OFF "$VENV/bin/pip" install -q --no-build-isolation . -Cbuild-dir="build/$(basename "$VENV")"
fi
"$VENV/bin/pip" install -q torchvision==0.29.1 "avalanche-lib>=0.6,<0.7" pytest scikit-learn matplotlib tqdm
t1=$(date +%s)
# pytest from the venv's bin (not python -m): the installed bmc_fast, not the source tree, is imported
BMC_FAST_REQUIRE_EXTENSION=1 "$VENV/bin/pytest" -q -p no:cacheprovider tests/test_avalanche.py tests/test_examples.py \
  -k "avalanche"
echo "avalanche tests: environment $((t1 - t0)) s, tests $(( $(date +%s) - t1 )) s"
