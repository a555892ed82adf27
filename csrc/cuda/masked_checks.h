// Data checks of the task-masked losses on CUDA: every rule evaluated on the device, one sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/any.h>
#include <ATen/ops/stack.h>

#include "launch_utils.h"

namespace bmc_fast::cuda {

// off, len: int64 [N]; labels: int64 [N] or undefined.
inline void check_ranges_and_labels(const at::Tensor& off, const at::Tensor& len, int64_t C, const at::Tensor& labels,
                                    int64_t ignore_index) {
  if (off.numel() == 0 || capturing()) return;
  std::vector<at::Tensor> flags = {(off < 0).any(), (len < 1).any(), ((off + len) > C).any()};
  if (labels.defined()) {
    flags.push_back(((labels != ignore_index) & ((labels < off) | (labels >= off + len))).any());
  }
  const at::Tensor f = at::stack(flags).cpu();
  const bool* p = f.const_data_ptr<bool>();
  TORCH_CHECK_VALUE(!p[0], kOffsetRule);
  TORCH_CHECK_VALUE(!p[1], kLenRule);
  TORCH_CHECK_VALUE(!p[2], kRangeRule, C);
  TORCH_CHECK_VALUE(!(labels.defined() && p[3]), kLabelRule);
}

// A per-row integer tensor `name` of shape [N] beside `ref`, as contiguous int64.
inline at::Tensor as_long(const at::Tensor& t, const at::Tensor& ref, int64_t N, const char* name,
                          const char* ref_name) {
  check_row_ids(t, ref, N, name, ref_name);
  return t.to(at::kLong).contiguous();
}

}  // namespace bmc_fast::cuda
