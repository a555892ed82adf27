// Argument checks shared by the CPU host functions (csrc/cpu/host_utils.h) and the CUDA launchers
// (csrc/cuda/launch_utils.h), so that both backends reject a bad argument with the same message.
// Host code with ATen (never included by the torch-free kernels).
//
// Metadata checks (dtype, device, shape) are complete here. The data rules (ranges, finiteness)
// are evaluated differently per backend: the CPU walks the data on the host and appends the
// offending value and its position to the message below; CUDA evaluates each rule on the device
// with one sync and raises the message as is.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace bmc_fast {

// Accumulation dtype of an input dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
}

inline void check_integer(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
}

// `t` on `device` (for tensors that reach host code without a dispatch key choosing the backend).
inline void check_device(const at::Tensor& t, c10::Device device, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

// `t` (argument `name`) on the device of `ref` (argument `ref_name`).
inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
                    t.sizes());
}

// A per-row integer tensor (labels, task ranges, expert ids) of shape [N] beside `ref`.
inline void check_row_ids(const at::Tensor& t, const at::Tensor& ref, int64_t N, const char* name,
                          const char* ref_name) {
  check_integer(t, name);
  check_same_device(t, ref, name, ref_name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, name, " must have shape [", N, "], got ", t.sizes());
}

// The per-expert weights of the multi-expert losses: a floating [K] tensor beside `ref`.
inline void check_expert_weights(const at::Tensor& w, int64_t K, const at::Tensor& ref, const char* ref_name) {
  check_floating(w, "weights");
  check_same_device(w, ref, "weights", ref_name);
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == K, "weights must have shape [", K, "], got ", w.sizes());
}

// The data rules (see the top of this file).
inline constexpr const char* kWeightsFinite = "weights must be finite";
inline constexpr const char* kImportanceRule = "importance must be finite and >= 0";
inline constexpr const char* kOffsetRule = "task_offset must be >= 0";
inline constexpr const char* kLenRule = "task_len must be >= 1";
inline constexpr const char* kRangeRule = "task_offset + task_len must be <= the number of classes ";  // + C
inline constexpr const char* kLabelRule = "labels must lie in their task range [task_offset, task_offset + task_len)";
inline constexpr const char* kExpertIdsRule = "expert_ids must be in [0, num_experts=";  // + K + ")"

}  // namespace bmc_fast
