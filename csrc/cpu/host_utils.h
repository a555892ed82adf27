// Host-side helpers of the CPU ops (DEFAULT build only): argument checks shared by several ops
// and assembly of the small per-expert outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "../common/reduction.h"

namespace bmc_fast::cpu {

// `t` on the CPU, for host code that no dispatch key routed here (the one-call step, the
// CPU-only ops' list arguments).
inline void check_cpu(const at::Tensor& t, const char* name) { check_device(t, at::kCPU, name); }

// An uninitialised contiguous tensor like `t` for the kernel to write once (host_utils.cpp).
// Large buffers come from a small cache of earlier gradient outputs whose storage nobody holds
// any more: the first write to a fresh large tensor takes a page fault per page, several times
// the cost of writing memory already mapped. BMC_FAST_BUFFER_CACHE_MB caps the cached bytes
// (default 512, 0 disables). Transparent huge pages are no substitute: when the kernel must
// compact memory first (THP's default "madvise" defrag), the allocation stalls far longer.
at::Tensor empty_output_like(const at::Tensor& t);

// Per-row task ranges [o_i, o_i + l_i) of the [N, C] logit matrix `ref` (argument `ref_name`)
// as contiguous int64, checked: 0 <= o_i, l_i >= 1, o_i + l_i <= C.
inline std::pair<at::Tensor, at::Tensor> checked_task_ranges(const at::Tensor& task_offset,
                                                             const at::Tensor& task_len, const at::Tensor& ref,
                                                             const char* ref_name) {
  const int64_t N = ref.size(0), C = ref.size(1);
  check_row_ids(task_offset, ref, N, "task_offset", ref_name);
  check_row_ids(task_len, ref, N, "task_len", ref_name);
  at::Tensor off = task_offset.to(at::kLong).contiguous(), len = task_len.to(at::kLong).contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  const int64_t* l = len.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(o[i] >= 0, kOffsetRule, ", got ", o[i], " at row ", i);
    TORCH_CHECK_VALUE(l[i] >= 1, kLenRule, ", got ", l[i], " at row ", i);
    TORCH_CHECK_VALUE(o[i] + l[i] <= C, kRangeRule, C, ", got ", o[i], " + ", l[i], " at row ", i);
  }
  return {off, len};
}

// Per-expert weights as doubles (all ones when absent): [K] beside `ref`, every value finite.
inline std::vector<double> weights_or_ones(const std::optional<at::Tensor>& weights, int64_t K, const at::Tensor& ref,
                                           const char* ref_name) {
  std::vector<double> w(static_cast<size_t>(K), 1.0);
  if (!weights.has_value()) return w;
  check_expert_weights(*weights, K, ref, ref_name);
  const at::Tensor d = weights->to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(p[k]), kWeightsFinite, ", got ", p[k], " at index ", k);
    w[k] = p[k];
  }
  return w;
}

// The loss of a multi-expert op from its weighted per-expert terms: [K] for "none", their sum
// for "sum", the sum divided by `mean_count` for "mean" (0 when mean_count is 0).
inline at::Tensor reduce_terms(const std::vector<double>& terms, Reduction r, int64_t mean_count,
                               at::ScalarType out_dtype) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  if (r == Reduction::None) {
    at::Tensor out = at::empty({static_cast<int64_t>(terms.size())}, opts);
    double* p = out.mutable_data_ptr<double>();
    for (size_t k = 0; k < terms.size(); ++k) p[k] = terms[k];
    return out.to(out_dtype);
  }
  double s = 0.0;
  for (double v : terms) s += v;
  if (r == Reduction::Mean) s = mean_count > 0 ? s / static_cast<double>(mean_count) : 0.0;
  return at::scalar_tensor(s, opts).to(out_dtype);
}

// The loss of a per-row op (masked CE, KD): [N] for "none", else the sum in row order, divided
// by `mean_divisor` for "mean" (0 / 0 gives NaN, as torch's mean of nothing).
inline at::Tensor reduce_rows(const std::vector<double>& rows, Reduction r, double mean_divisor,
                              at::ScalarType out_dtype) {
  if (r == Reduction::None) return reduce_terms(rows, r, 0, out_dtype);
  double s = 0.0;
  for (double v : rows) s += v;
  if (r == Reduction::Mean) s /= mean_divisor;
  return at::scalar_tensor(s, at::TensorOptions().dtype(at::kDouble)).to(out_dtype);
}

// Per-expert values in the accumulation dtype.
inline at::Tensor to_acc_tensor(const std::vector<double>& v, at::ScalarType acc) {
  at::Tensor out = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kDouble));
  double* p = out.mutable_data_ptr<double>();
  for (size_t k = 0; k < v.size(); ++k) p[k] = v[k];
  return out.to(acc);
}

}  // namespace bmc_fast::cpu
