// Run-time choice between the two builds of every CPU kernel.
//
// Each csrc/cpu/<op>.cpp is compiled twice. The DEFAULT build (CPU_CAPABILITY=DEFAULT,
// BMC_CPU_HOST defined, baseline compiler flags) holds the op's host function and its
// TORCH_LIBRARY_IMPL registration. On x86-64 an AVX2 build (CPU_CAPABILITY=AVX2,
// -mavx2 -mfma -mf16c) adds a second copy of the kernels only. ATen's Vectorized<T> and our
// kernels live in `inline namespace CPU_CAPABILITY`, so the two copies are distinct symbols;
// the host function calls one of them through BMC_CPU_CALL. Setting
// BMC_FAST_CPU_CAPABILITY=default in the environment forces the baseline kernels.
#pragma once

namespace bmc_fast::cpu {

// True when the AVX2 kernels were built and this CPU runs them (checked once).
bool use_avx2();
// "avx2" or "default": the kernels that use_avx2() selects.
const char* cpu_capability();

}  // namespace bmc_fast::cpu

#if defined(BMC_FAST_HAVE_AVX2)
#define BMC_CPU_DECLARE_KERNEL(ret, name, ...) \
  namespace DEFAULT {                          \
  ret name(__VA_ARGS__);                       \
  }                                            \
  namespace AVX2 {                             \
  ret name(__VA_ARGS__);                       \
  }
#define BMC_CPU_CALL(name, ...) \
  (::bmc_fast::cpu::use_avx2() ? AVX2::name(__VA_ARGS__) : DEFAULT::name(__VA_ARGS__))
#else
#define BMC_CPU_DECLARE_KERNEL(ret, name, ...) \
  namespace DEFAULT {                          \
  ret name(__VA_ARGS__);                       \
  }
#define BMC_CPU_CALL(name, ...) DEFAULT::name(__VA_ARGS__)
#endif
