// The matrix products of the fused ResMLP (resmlp.cpp) on the CPU: MKL through at::mm / at::bmm,
// or oneDNN's JIT kernels through torch's own mkldnn::_linear_pointwise op (gemm.cpp).
//
// Why two: torch's CPU wheel does float32 matmuls with MKL, and MKL runs its AVX2 code on AMD
// processors even where AVX-512 is there, while oneDNN picks its kernels by the instruction set.
// On a 2-core Zen 5 EPYC oneDNN was 1.3-1.8x MKL at the trainer's 64-row products and ~2.3x at
// 4096 rows; on a Zen 1 (no AVX-512) it was no better. Hence BMC_FAST_MATMUL=auto (the default):
// oneDNN for float32 on an AMD processor with AVX-512, MKL elsewhere; =onednn or =mkl forces one.
// Small products (under ~1M multiply-adds) stay on MKL: oneDNN's per-call set-up (~5-8 us)
// outweighs its speed there. float64 always uses MKL (oneDNN has no float64 kernels).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace bmc_fast::cpu {

// Products of fewer multiply-adds than this stay on MKL (oneDNN's per-call set-up costs more).
constexpr int64_t kMinOnednnMacs = int64_t{1} << 20;
int64_t onednn_min_macs();  // the same, for bmc_fast._C

// Whether float32 products go to oneDNN (decided from BMC_FAST_MATMUL on first use).
bool onednn_matmul();

// Sets the choice for the rest of the process: "auto", "onednn" or "mkl" (benchmarks compare
// them in one process; bmc_fast._C.set_cpu_matmul).
void set_cpu_matmul(const std::string& mode);

// a b^T (+ bias): a [M, K] or [S, M, K], b [N, K] or [S, N, K], bias [N] or [S, N] (may be null).
// Strided views (transposes) are fine. The result is a new contiguous tensor.
at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias = nullptr);

// acc += a b^T (acc contiguous, shaped like the product).
void matmul_nt_add_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b);

}  // namespace bmc_fast::cpu
