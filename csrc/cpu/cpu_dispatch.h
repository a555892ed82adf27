// Run-time choice between the builds of every CPU kernel.
//
// Each csrc/cpu/<op>.cpp is compiled several times. The DEFAULT build (CPU_CAPABILITY=DEFAULT,
// BMC_CPU_HOST defined, baseline compiler flags) holds the op's host function and its
// TORCH_LIBRARY_IMPL registration. On x86-64 an AVX2 build (-mavx2 -mfma -mf16c) and an AVX512
// build (-mavx512f/bw/vl/dq) add copies of the kernels only. ATen's Vectorized<T> and our kernels
// live in `inline namespace CPU_CAPABILITY`, so the copies are distinct symbols; the host
// function calls the best one the CPU runs through BMC_CPU_CALL. BMC_FAST_CPU_CAPABILITY=default
// or =avx2 in the environment caps the choice.
#pragma once

namespace bmc_fast::cpu {

enum class Capability { Default, Avx2, Avx512 };
// The best kernel build this CPU runs (checked once).
Capability capability();
// "default", "avx2" or "avx512": the kernels in use.
const char* cpu_capability();

}  // namespace bmc_fast::cpu

#if defined(BMC_FAST_HAVE_AVX2)
#define BMC_CPU_DECLARE_KERNEL(ret, name, ...) \
  namespace DEFAULT {                          \
  ret name(__VA_ARGS__);                       \
  }                                            \
  namespace AVX2 {                             \
  ret name(__VA_ARGS__);                       \
  }                                            \
  namespace AVX512 {                           \
  ret name(__VA_ARGS__);                       \
  }
#define BMC_CPU_CALL(name, ...)                                                        \
  (::bmc_fast::cpu::capability() == ::bmc_fast::cpu::Capability::Avx512              \
       ? AVX512::name(__VA_ARGS__)                                                   \
       : ::bmc_fast::cpu::capability() == ::bmc_fast::cpu::Capability::Avx2          \
             ? AVX2::name(__VA_ARGS__)                                               \
             : DEFAULT::name(__VA_ARGS__))
#else
#define BMC_CPU_DECLARE_KERNEL(ret, name, ...) \
  namespace DEFAULT {                          \
  ret name(__VA_ARGS__);                       \
  }
#define BMC_CPU_CALL(name, ...) DEFAULT::name(__VA_ARGS__)
#endif
