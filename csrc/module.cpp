// The Python module `bmc_fast._C`. It only makes the shared library importable (which runs the
// operator registrations of the other translation units) and reports build facts; tensors go
// through torch.ops.bmc_fast, so no torch/pybind11 casters are compiled here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "cpu/cpu_dispatch.h"
#include "cpu/matmul_choice.h"

#ifndef BMC_FAST_CUDA_VERSION
#define BMC_FAST_CUDA_VERSION ""
#endif
#ifndef BMC_FAST_CUDA_ARCHS
#define BMC_FAST_CUDA_ARCHS ""
#endif
#ifndef BMC_FAST_TORCH_VERSION
#define BMC_FAST_TORCH_VERSION ""
#endif

namespace {

// glibc's malloc gives freed memory back to the system as soon as the free top of its heap
// passes 128 KB (the trim threshold) and serves blocks over 128 KB (at first) with mmap: a
// training step that frees its temporaries (activations, gradients: megabytes) then takes the
// same sizes again pays for page faults and zeroed pages on every step, a fifth of a step at
// the trainer's sizes. Fixed thresholds keep up to trim_mb of free heap and serve blocks under
// mmap_mb from the heap. Returns whether glibc took both (false elsewhere).
bool tune_malloc(int64_t trim_mb, int64_t mmap_mb) {
#if defined(__GLIBC__)
  const int64_t mb = 1 << 20;
  return mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_mb * mb)) == 1 &&
         mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim_mb * mb)) == 1;
#else
  (void)trim_mb;
  (void)mmap_mb;
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bmc_fast compiled kernels (operators live in torch.ops.bmc_fast)";
#ifdef BMC_FAST_WITH_CUDA
  m.def("cuda_built", []() { return true; });
#else
  m.def("cuda_built", []() { return false; });
#endif
  m.def("cuda_version", []() { return std::string(BMC_FAST_CUDA_VERSION); });
  m.def("cuda_archs", []() { return std::string(BMC_FAST_CUDA_ARCHS); });
  m.def("torch_version", []() { return std::string(BMC_FAST_TORCH_VERSION); });
  m.def("cpu_capability", []() { return std::string(bmc_fast::cpu::cpu_capability()); });
  m.def("cpu_matmul", []() { return std::string(bmc_fast::cpu::onednn_matmul() ? "onednn" : "mkl"); });
  m.def("onednn_min_macs", &bmc_fast::cpu::onednn_min_macs);
  m.def("direct_blas", &bmc_fast::cpu::direct_blas, "whether 2-D float32 products on MKL call sgemm directly");
  m.def("set_direct_blas", &bmc_fast::cpu::set_direct_blas, "direct sgemm calls on or off; returns the previous");
  m.def("set_cpu_matmul", &bmc_fast::cpu::set_cpu_matmul, "'auto', 'onednn' or 'mkl': the float32 matmuls of the fused ResMLP");
  m.def("tune_malloc", &tune_malloc, "glibc malloc's trim and mmap thresholds, in MB (see bmc_fast/_ext.py)");
}
