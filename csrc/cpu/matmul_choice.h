// Which library does the fused ResMLP's float32 matrix products (gemm.h explains the choice).
// Torch-free, so that bmc_fast._C's pybind11 module (csrc/module.cpp) can include it.
#pragma once

#include <cstdint>
#include <string>

namespace bmc_fast::cpu {

// Products of fewer multiply-adds than this stay on MKL (oneDNN's per-call set-up costs more).
constexpr int64_t kMinOnednnMacs = int64_t{1} << 20;
int64_t onednn_min_macs();  // the same, for bmc_fast._C

// Whether float32 products go to oneDNN (decided from BMC_FAST_MATMUL on first use).
bool onednn_matmul();

// Whether the two-dimensional float32 products on MKL's side call BLAS's sgemm directly, with the
// arguments at::mm would pass it (the same bits) but without its dispatch, views and checks, a
// sizeable part of a 64-row product; false where the loaded torch has no sgemm (then at::mm).
bool direct_blas();

// Turns the direct calls on or off for the rest of the process (tests and benchmarks compare the
// two); returns the previous setting.
bool set_direct_blas(bool on);

// Sets the choice for the rest of the process: "auto", "onednn" or "mkl" (benchmarks compare
// them in one process; bmc_fast._C.set_cpu_matmul).
void set_cpu_matmul(const std::string& mode);

}  // namespace bmc_fast::cpu
