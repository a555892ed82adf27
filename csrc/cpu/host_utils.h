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

#include "../common/reduction.h"

namespace bmc_fast::cpu {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
                   t.scalar_type());
}

inline void check_integer(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU like the other inputs, got ",
                    t.device());
}

// An uninitialised contiguous tensor like `t` for the kernel to write once (host_utils.cpp).
// Large buffers come from a small cache of earlier gradient outputs whose storage nobody holds
// any more: a fresh 320 MB tensor costs 70 ms of page faults here, against 13 ms to write an
// existing one. BMC_FAST_BUFFER_CACHE_MB caps the cached bytes (default 512, 0 disables).
// (Transparent huge pages were measured too and dropped: 20 ms when free huge pages exist, but
// 300+ ms when the kernel must compact memory first, as THP's default "madvise" defrag does.)
at::Tensor empty_output_like(const at::Tensor& t);

// Accumulation dtype of an input dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Per-row task ranges [o_i, o_i + l_i) of an [N, C] logit matrix as contiguous int64, checked:
// 0 <= o_i, l_i >= 1, o_i + l_i <= C.
inline std::pair<at::Tensor, at::Tensor> checked_task_ranges(const at::Tensor& task_offset,
                                                             const at::Tensor& task_len, int64_t N,
                                                             int64_t C) {
  check_integer(task_offset, "task_offset");
  check_integer(task_len, "task_len");
  check_cpu(task_offset, "task_offset");
  check_cpu(task_len, "task_len");
  TORCH_CHECK_VALUE(task_offset.dim() == 1 && task_offset.size(0) == N, "task_offset must have shape [",
                    N, "], got ", task_offset.sizes());
  TORCH_CHECK_VALUE(task_len.dim() == 1 && task_len.size(0) == N, "task_len must have shape [", N,
                    "], got ", task_len.sizes());
  at::Tensor off = task_offset.to(at::kLong).contiguous(), len = task_len.to(at::kLong).contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  const int64_t* l = len.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(o[i] >= 0, "task_offset must be >= 0, got ", o[i], " at row ", i);
    TORCH_CHECK_VALUE(l[i] >= 1, "task_len must be >= 1, got ", l[i], " at row ", i);
    TORCH_CHECK_VALUE(o[i] + l[i] <= C, "task_offset + task_len must be <= the number of classes ", C,
                      ", got ", o[i], " + ", l[i], " at row ", i);
  }
  return {off, len};
}

// Per-expert weights as doubles (all ones when absent); shape [K], every value finite.
inline std::vector<double> weights_or_ones(const std::optional<at::Tensor>& weights, int64_t K,
                                           const char* name = "weights") {
  std::vector<double> w(static_cast<size_t>(K), 1.0);
  if (!weights.has_value()) return w;
  const at::Tensor& t = *weights;
  check_floating(t, name);
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == K, name, " must have shape [", K, "], got ",
                    t.sizes());
  const at::Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(p[k]), name, " must be finite, got ", p[k], " at index ", k);
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
