// The host function of adamw_step on the CPU (csrc/cpu/adamw.cpp, DEFAULT build), for other host
// code that composes it (csrc/cpu/resmlp_train_step.cpp). Arguments as in the schema.
#pragma once

#include <ATen/core/Tensor.h>

namespace bmc_fast::cpu {

// The checks of adamw_step's scalar arguments (ValueError naming the argument).
void check_adamw_hyper(double lr, double beta1, double beta2, double weight_decay, double eps, int64_t step);

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    double lr, double beta1, double beta2, double weight_decay, double eps, int64_t step);

}  // namespace bmc_fast::cpu
