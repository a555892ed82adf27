// Host-side helpers shared by every op's CPU and CUDA launcher.
#pragma once

#include <c10/util/Exception.h>

#include <string_view>

namespace bmc_fast {

enum class Reduction { None, Sum, Mean };

inline Reduction parse_reduction(std::string_view r) {
  if (r == "none") return Reduction::None;
  if (r == "sum") return Reduction::Sum;
  if (r == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(false, "reduction must be 'none', 'sum' or 'mean', got '", std::string(r), "'");
}

}  // namespace bmc_fast
