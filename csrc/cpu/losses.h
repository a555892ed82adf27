// The host functions of the five loss ops on the CPU (csrc/cpu/<op>.cpp, DEFAULT build), for
// other host code that composes them (csrc/cpu/resmlp_train_step.cpp). Arguments and outputs as
// in the schemas (csrc/library.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace bmc_fast::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> stability_loss_cpu(const at::Tensor& expert, const at::Tensor& base,
                                                                  const std::optional<at::Tensor>& weights,
                                                                  c10::string_view reduction, bool compute_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_stability_loss_cpu(
    const at::Tensor& expert_params, const at::Tensor& base_params, const std::optional<at::Tensor>& importance,
    const std::optional<at::Tensor>& weights, c10::string_view reduction, bool compute_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_distillation_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& expert_ids, int64_t num_experts,
    const std::optional<at::Tensor>& weights, c10::string_view reduction, bool compute_grad);

std::tuple<at::Tensor, at::Tensor> task_masked_cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                 const at::Tensor& task_offset,
                                                                 const at::Tensor& task_len, c10::string_view reduction,
                                                                 int64_t ignore_index, bool compute_grad);

std::tuple<at::Tensor, at::Tensor> task_masked_kd_loss_cpu(const at::Tensor& student_logits,
                                                           const at::Tensor& teacher_logits,
                                                           const at::Tensor& task_offset, const at::Tensor& task_len,
                                                           double temperature, c10::string_view reduction,
                                                           bool compute_grad);

}  // namespace bmc_fast::cpu
