// ResMLPTrainStep: one whole training step of the fused ResMLP on the CPU (one model, or K
// stacked) in one call: forward, the trainer's loss terms with their gradients, backward, the
// BatchNorm running statistics and the AdamW update. The math is the ops' own (resmlp_forward,
// the loss kernels, resmlp_backward, adamw_step): what it removes is the Python and autograd
// around them, ~1.3 ms of a ~6 ms consolidation step on a 2 GHz core (bmc_fast/train_step.py).
//
// A torch custom class so that the 28 parameter and 56 optimizer-state tensors are handed over
// once, not converted from Python lists on every step. Host code only (the DEFAULT build).
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/add.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "host_utils.h"

namespace bmc_fast::cpu {

using TensorVec = std::vector<at::Tensor>;

// The ops' CPU implementations (defined in their own files).
std::tuple<at::Tensor, at::Tensor, TensorVec, TensorVec, TensorVec> resmlp_forward_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
    at::TensorList bn_biases, double eps, at::ArrayRef<double> p, at::IntArrayRef seeds);
std::tuple<TensorVec, TensorVec, TensorVec, TensorVec, at::Tensor> resmlp_backward_cpu(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_features, const at::Tensor& x,
    const at::Tensor& features, at::TensorList weights, at::TensorList bn_weights, at::TensorList saved,
    at::ArrayRef<double> p, bool compute_input_grad);
std::tuple<at::Tensor, at::Tensor> task_masked_cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                 const at::Tensor& task_offset,
                                                                 const at::Tensor& task_len, c10::string_view reduction,
                                                                 int64_t ignore_index, bool compute_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_distillation_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& expert_ids, int64_t num_experts,
    const std::optional<at::Tensor>& weights, c10::string_view reduction, bool compute_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> stability_loss_cpu(const at::Tensor& expert, const at::Tensor& base,
                                                                  const std::optional<at::Tensor>& weights,
                                                                  c10::string_view reduction, bool compute_grad);
std::tuple<at::Tensor, at::Tensor> task_masked_kd_loss_cpu(const at::Tensor& student_logits,
                                                           const at::Tensor& teacher_logits,
                                                           const at::Tensor& task_offset, const at::Tensor& task_len,
                                                           double temperature, c10::string_view reduction,
                                                           bool compute_grad);
void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    double lr, double beta1, double beta2, double weight_decay, double eps, int64_t step);

namespace {

TensorVec concat(std::initializer_list<const TensorVec*> lists) {
  TensorVec out;
  for (const TensorVec* l : lists) out.insert(out.end(), l->begin(), l->end());
  return out;
}

// loss = loss + coef * term, as the trainer's Python writes it (0-dim tensors, same rounding).
at::Tensor add_term(const at::Tensor& loss, const at::Tensor& term, double coef) {
  at::Tensor t = coef == 1.0 ? term : at::mul(term, coef);
  return loss.defined() ? at::add(loss, t) : t;
}

// d loss / d output += coef * grad (the first term initialises it).
void add_grad(at::Tensor& acc, const at::Tensor& grad, double coef) {
  if (!acc.defined()) {
    acc = grad.mul_(coef);
  } else {
    acc.add_(grad, coef);
  }
}

}  // namespace

struct ResMLPTrainStep : torch::CustomClassHolder {
  // The fused op's lists (bmc_fast.models.fused_args) and, per parameter in the order
  // weights + biases + bn_weights + bn_biases, its AdamW moments.
  TensorVec weights, biases, bn_weights, bn_biases, running_means, running_vars, tracked, exp_avgs, exp_avg_sqs;
  TensorVec params, running;  // weights + biases + bn_weights + bn_biases; running_means + running_vars
  double eps;
  std::vector<double> p;

  ResMLPTrainStep(TensorVec weights_, TensorVec biases_, TensorVec bn_weights_, TensorVec bn_biases_,
                  TensorVec running_means_, TensorVec running_vars_, TensorVec tracked_, TensorVec exp_avgs_,
                  TensorVec exp_avg_sqs_, double eps_, std::vector<double> p_)
      : weights(std::move(weights_)),
        biases(std::move(biases_)),
        bn_weights(std::move(bn_weights_)),
        bn_biases(std::move(bn_biases_)),
        running_means(std::move(running_means_)),
        running_vars(std::move(running_vars_)),
        tracked(std::move(tracked_)),
        exp_avgs(std::move(exp_avgs_)),
        exp_avg_sqs(std::move(exp_avg_sqs_)),
        eps(eps_),
        p(std::move(p_)) {
    params = concat({&weights, &biases, &bn_weights, &bn_biases});
    running = concat({&running_means, &running_vars});
    const size_t n = params.size();
    TORCH_CHECK_VALUE(exp_avgs.size() == n && exp_avg_sqs.size() == n, "exp_avgs and exp_avg_sqs must hold ", n,
                      " tensors (one per parameter), got ", exp_avgs.size(), " and ", exp_avg_sqs.size());
    TORCH_CHECK_VALUE(running_means.size() == bn_weights.size() && running_vars.size() == bn_weights.size() &&
                          tracked.size() == bn_weights.size(),
                      "running_means, running_vars and tracked must hold one tensor per BatchNorm (",
                      bn_weights.size(), ")");
  }

  // One step on x ([B, I], or [K, B, I] for stacked models). Loss terms, each skipped when its
  // first tensor is absent:
  //   ce_scale * task_masked_cross_entropy(logits, labels, ce_offset, ce_len, ce_reduction)
  //     (logits [.., C] flattened to rows);
  //   distill_coef * batched_distillation_loss(features, distill_teacher, distill_ids, n, "mean");
  //   stability_coef * stability_loss(features viewed as stability_base, stability_base, "sum");
  //   kd_coef * task_masked_kd_loss(logits, kd_teacher, kd_offset, kd_len, kd_temperature, "mean").
  // Returns the loss (a 0-dim tensor, detached).
  at::Tensor step(const at::Tensor& x, std::vector<int64_t> seeds, double momentum, const at::Tensor& labels,
                  const at::Tensor& ce_offset, const at::Tensor& ce_len, double ce_scale, std::string ce_reduction,
                  std::optional<at::Tensor> distill_teacher, std::optional<at::Tensor> distill_ids,
                  int64_t distill_n, double distill_coef, std::optional<at::Tensor> stability_base,
                  double stability_coef, std::optional<at::Tensor> kd_teacher, std::optional<at::Tensor> kd_offset,
                  std::optional<at::Tensor> kd_len, double kd_temperature, double kd_coef, double lr, double beta1,
                  double beta2, double weight_decay, double adam_eps, int64_t step) {
    auto [logits, features, saved, means, vars] =
        resmlp_forward_cpu(x, weights, biases, bn_weights, bn_biases, eps, p, seeds);
    const at::Tensor rows = logits.view({-1, logits.size(-1)});

    at::Tensor loss, grad_logits, grad_features;
    {
      auto [l, g] = task_masked_cross_entropy_cpu(rows, labels, ce_offset, ce_len, ce_reduction, -100, true);
      loss = add_term(loss, l, ce_scale);
      add_grad(grad_logits, g, ce_scale);
    }
    if (distill_teacher.has_value()) {
      TORCH_CHECK_VALUE(distill_ids.has_value(), "distill_ids must be given with distill_teacher");
      auto [l, g, per] = batched_distillation_loss_cpu(features, *distill_teacher, *distill_ids, distill_n,
                                                       std::nullopt, "mean", true);
      loss = add_term(loss, l, distill_coef);
      add_grad(grad_features, g, distill_coef);
    }
    if (stability_base.has_value()) {
      // One model's [B, F] features against a [1, B, F] base, as the trainer views them.
      auto [l, g, per] = stability_loss_cpu(features.view(stability_base->sizes()), *stability_base, std::nullopt,
                                            "sum", true);
      loss = add_term(loss, l, stability_coef);
      add_grad(grad_features, g.view(features.sizes()), stability_coef);
    }
    if (kd_teacher.has_value()) {
      TORCH_CHECK_VALUE(kd_offset.has_value() && kd_len.has_value(), "kd_offset and kd_len must be given with kd_teacher");
      auto [l, g] = task_masked_kd_loss_cpu(rows, *kd_teacher, *kd_offset, *kd_len, kd_temperature, "mean", true);
      loss = add_term(loss, l, kd_coef);
      add_grad(grad_logits, g, kd_coef);
    }

    auto [gw, gb, gbw, gbb, gx] = resmlp_backward_cpu(grad_logits.view(logits.sizes()), grad_features, x, features,
                                                      weights, bn_weights, saved, p, false);
    // BatchNorm's running statistics and batch count, as resmlp_train_forward updates them.
    at::_foreach_lerp_(running, concat({&means, &vars}), momentum);
    at::_foreach_add_(tracked, 1);
    adamw_step_cpu(params, concat({&gw, &gb, &gbw, &gbb}), exp_avgs, exp_avg_sqs, lr, beta1, beta2, weight_decay,
                   adam_eps, step);
    return loss;
  }
};

TORCH_LIBRARY_FRAGMENT(bmc_fast, m) {
  m.class_<ResMLPTrainStep>("ResMLPTrainStep")
      .def(torch::init<TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec,
                       TensorVec, double, std::vector<double>>())
      .def("step", &ResMLPTrainStep::step);
}

}  // namespace bmc_fast::cpu
