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
  TORCH_CHECK_VALUE(!p[0], "task_offset must be >= 0");
  TORCH_CHECK_VALUE(!p[1], "task_len must be >= 1");
  TORCH_CHECK_VALUE(!p[2], "task_offset + task_len must be <= the number of classes ", C);
  TORCH_CHECK_VALUE(!(labels.defined() && p[3]), "labels must lie in their task range [task_offset, task_offset + task_len)");
}

inline at::Tensor as_long(const at::Tensor& t, const at::Tensor& ref, int64_t N, const char* name) {
  check_integer(t, name);
  check_same_device(t, ref, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, name, " must have shape [", N, "], got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

}  // namespace bmc_fast::cuda
