// The matrix products of the fused ResMLP (resmlp.cpp) on the CPU: MKL (through BLAS's sgemm, or
// at::mm / at::bmm), or oneDNN's JIT kernels through torch's own mkldnn::_linear_pointwise op (gemm.cpp).
//
// Why two: torch's CPU wheel does float32 matmuls with MKL, and MKL runs its AVX2 code on AMD
// processors even where AVX-512 is there, while oneDNN picks its kernels by the instruction set.
// Where both run AVX2 code (no AVX-512), oneDNN has nothing to gain. Hence BMC_FAST_MATMUL=auto
// (the default): oneDNN for float32 on an AMD processor with AVX-512, MKL elsewhere; =onednn or
// =mkl forces one. Small products (under ~1M multiply-adds) stay on MKL: oneDNN's per-call
// set-up outweighs its speed there. float64 always uses MKL (oneDNN has no float64 kernels).
#pragma once

#include <ATen/core/Tensor.h>

#include "matmul_choice.h"

namespace bmc_fast::cpu {

// a b^T (+ bias): a [M, K] or [S, M, K], b [N, K] or [S, N, K], bias [N] or [S, N] (may be null).
// Strided views (transposes) are fine. The result is a new contiguous tensor.
at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias = nullptr);

// acc += a b^T (acc contiguous, shaped like the product).
void matmul_nt_add_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b);

}  // namespace bmc_fast::cpu
