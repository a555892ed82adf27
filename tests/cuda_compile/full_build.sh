#!/usr/bin/env bash
# Builds the whole extension, CUDA launchers included, against a CUDA build of torch in a separate
# virtual environment (no GPU needed), then imports it and checks that every op has a CUDA kernel.
# torch 2.14.1+cu130 lies on the local disk of our machines (../shared/BUILD-NOTES.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${CUDA_VENV:-build/cuda-venv}
TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_CUDA_SPEC" numpy scikit-build-core pybind11 ninja
fi
t1=$(date +%s)
BMC_FAST_CUDA=ON "$VENV/bin/pip" install -q --no-build-isolation . -Cbuild-dir=build/cuda \
  -Ccmake.define.CMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc" -Ccmake.define.CUDAToolkit_ROOT="$CUDA_ROOT"
t2=$(date +%s)
(cd /tmp && BMC_FAST_REQUIRE_EXTENSION=1 "$OLDPWD/$VENV/bin/python" - <<'PY'
import torch, bmc_fast
info = bmc_fast.backend_info()
assert info["cuda"], info
ops = ["stability_loss", "weight_stability_loss", "batched_distillation_loss",
       "task_masked_cross_entropy", "task_masked_kd_loss"]
for op in ops:
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bmc_fast::{op}", key), (op, key)
print("full CUDA build:", info["built_with_torch"], "CUDA", info["cuda_version"], "archs", info["cuda_archs"],
      "- CPU and CUDA kernels registered for", len(ops), "ops")
PY
)
echo "full_build: venv $((t1 - t0)) s, build $((t2 - t1)) s"
