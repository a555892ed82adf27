#!/usr/bin/env bash
# Compiles every CUDA kernel with plain nvcc for sm_80 and sm_90 (no torch, no GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
t0=$(date +%s)
nvcc -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC -Icsrc \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -c tests/cuda_compile/kernels.cu -o "$out/kernels.o"
echo "cuda-check: every kernel compiled for sm_80 and sm_90 ($(( $(date +%s) - t0 )) s, nvcc $(nvcc --version | tail -1))"
