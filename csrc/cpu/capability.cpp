// Chooses the CPU kernel build once per process (see cpu_dispatch.h).
#include "cpu_dispatch.h"

#include <cstdlib>
#include <cstring>

namespace bmc_fast::cpu {

static Capability detect() {
#if defined(BMC_FAST_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  const char* forced = std::getenv("BMC_FAST_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return Capability::Default;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (!avx2) return Capability::Default;
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0) return Capability::Avx2;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? Capability::Avx512 : Capability::Avx2;
#else
  return Capability::Default;
#endif
}

Capability capability() {
  static const Capability value = detect();
  return value;
}

const char* cpu_capability() {
  switch (capability()) {
    case Capability::Avx512: return "avx512";
    case Capability::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace bmc_fast::cpu
