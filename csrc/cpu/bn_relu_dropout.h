// The host functions of bn_relu_dropout (csrc/cpu/bn_relu_dropout.cpp), for other host code of
// the DEFAULT build that composes it (csrc/cpu/resmlp.cpp). Arguments as in the schema.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace bmc_fast::cpu {

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
bn_relu_dropout_cpu(at::TensorList inputs, at::TensorList weights, at::TensorList biases, at::TensorList pre_biases,
                    double eps, double p, int64_t seed);

// The same with the dropout counter of element i at index_offset + i: a slice of stacked models
// starting at model k0 draws the masks of the whole stack when index_offset = k0 * B * C
// (resmlp_train_step.cpp splits the K models over the threads this way).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
bn_relu_dropout_cpu_at(at::TensorList inputs, at::TensorList weights, at::TensorList biases,
                       at::TensorList pre_biases, double eps, double p, int64_t seed, int64_t index_offset);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> bn_relu_dropout_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& mask, at::TensorList xhats, at::TensorList invstds,
    at::TensorList weights, double p);

}  // namespace bmc_fast::cpu
