// The host functions of resmlp_forward / resmlp_backward on the CPU (csrc/cpu/resmlp.cpp), for
// other host code that composes them (csrc/cpu/resmlp_train_step.cpp). Arguments, outputs and
// the layout of `saved` as in the schemas (csrc/library.cpp) and resmlp.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace bmc_fast::cpu {

// first_model: model k of the stack draws the dropout masks of model first_model + k (a slice of
// a larger stack starting at model first_model gets the masks the whole stack would give it).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
resmlp_forward_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
                   at::TensorList bn_biases, double eps, at::ArrayRef<double> p, at::IntArrayRef seeds,
                   int64_t first_model);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor>
resmlp_backward_cpu(const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_features,
                    const at::Tensor& x, const at::Tensor& features, at::TensorList weights, at::TensorList bn_weights,
                    at::TensorList saved, at::ArrayRef<double> p, bool compute_input_grad);

}  // namespace bmc_fast::cpu
