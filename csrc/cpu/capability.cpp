// Chooses the CPU kernel build once per process (see cpu_dispatch.h).
#include "cpu_dispatch.h"

#include <cstdlib>
#include <cstring>

namespace bmc_fast::cpu {

static bool detect_avx2() {
#if defined(BMC_FAST_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  const char* forced = std::getenv("BMC_FAST_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool use_avx2() {
  static const bool value = detect_avx2();
  return value;
}

const char* cpu_capability() { return use_avx2() ? "avx2" : "default"; }

}  // namespace bmc_fast::cpu
