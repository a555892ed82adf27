// The Python module `bmc_fast._C`. It only makes the shared library importable (which runs the
// operator registrations of the other translation units) and reports build facts; tensors go
// through torch.ops.bmc_fast, so no torch/pybind11 casters are compiled here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

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
  m.def("set_cpu_matmul", &bmc_fast::cpu::set_cpu_matmul, "'auto', 'onednn' or 'mkl': the float32 matmuls of the fused ResMLP");
}
