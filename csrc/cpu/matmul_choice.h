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

// Sets the choice for the rest of the process: "auto", "onednn" or "mkl" (benchmarks compare
// them in one process; bmc_fast._C.set_cpu_matmul).
void set_cpu_matmul(const std::string& mode);

}  // namespace bmc_fast::cpu
