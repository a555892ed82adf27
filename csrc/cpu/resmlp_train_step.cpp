// ResMLPTrainStep: one whole training step of the fused ResMLP on the CPU (one model, or K
// stacked) in one call: forward, the trainer's loss terms with their gradients, backward, the
// BatchNorm running statistics and the AdamW update. The math is the ops' own (resmlp_forward,
// the loss kernels, resmlp_backward, adamw_step): what it removes is the Python and autograd
// around them, ~1.3 ms of a ~6 ms consolidation step on a 2 GHz core (bmc_fast/train_step.py).
//
// A torch custom class so that the 28 parameter and 56 optimizer-state tensors are handed over
// once, not converted from Python lists on every step. Host code only (the DEFAULT build).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/add.h>
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
std::tuple<at::Tensor, at::Tensor, TensorVec, TensorVec, TensorVec> resmlp_forward_from(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
    at::TensorList bn_biases, double eps, at::ArrayRef<double> p, at::IntArrayRef seeds, int64_t first_model);
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

// The model tensors and optimizer state of models [k0, k0 + kk) of a stack (views), or of the
// whole model.
struct Slice {
  int64_t k0 = 0, kk = 0;
  TensorVec weights, biases, bn_weights, bn_biases, tracked, exp_avgs, exp_avg_sqs;
  TensorVec params, running;  // weights + biases + bn_weights + bn_biases; running means + vars
};

// What one slice's forward and backward hand to its update.
struct SliceGrads {
  at::Tensor loss;
  TensorVec grads, stats;  // in the order of Slice::params and Slice::running
};

struct ResMLPTrainStep : torch::CustomClassHolder {
  Slice all;
  std::vector<Slice> parts;  // `all` split into at::get_num_threads() slices (built on first use)
  double eps;
  std::vector<double> p;
  bool split = true;

  // The fused op's lists (bmc_fast.models.fused_args) and, per parameter in the order
  // weights + biases + bn_weights + bn_biases, its AdamW moments.
  ResMLPTrainStep(TensorVec weights, TensorVec biases, TensorVec bn_weights, TensorVec bn_biases,
                  TensorVec running_means, TensorVec running_vars, TensorVec tracked, TensorVec exp_avgs,
                  TensorVec exp_avg_sqs, double eps_, std::vector<double> p_)
      : eps(eps_), p(std::move(p_)) {
    TORCH_CHECK_VALUE(!weights.empty(), "weights must not be empty");
    all.kk = weights[0].dim() == 3 ? weights[0].size(0) : 1;
    all.params = concat({&weights, &biases, &bn_weights, &bn_biases});
    all.running = concat({&running_means, &running_vars});
    const size_t n = all.params.size();
    TORCH_CHECK_VALUE(exp_avgs.size() == n && exp_avg_sqs.size() == n, "exp_avgs and exp_avg_sqs must hold ", n,
                      " tensors (one per parameter), got ", exp_avgs.size(), " and ", exp_avg_sqs.size());
    TORCH_CHECK_VALUE(running_means.size() == bn_weights.size() && running_vars.size() == bn_weights.size() &&
                          tracked.size() == bn_weights.size(),
                      "running_means, running_vars and tracked must hold one tensor per BatchNorm (",
                      bn_weights.size(), ")");
    all.weights = std::move(weights);
    all.biases = std::move(biases);
    all.bn_weights = std::move(bn_weights);
    all.bn_biases = std::move(bn_biases);
    all.tracked = std::move(tracked);
    all.exp_avgs = std::move(exp_avgs);
    all.exp_avg_sqs = std::move(exp_avg_sqs);
  }

  void set_split(bool on) { split = on; }

  // Models [k0, k0 + kk) of the stack: views of every list.
  Slice slice(int64_t k0, int64_t kk) const {
    const auto view = [&](const TensorVec& v) {
      TensorVec out;
      out.reserve(v.size());
      for (const at::Tensor& t : v) out.push_back(t.narrow(0, k0, kk));
      return out;
    };
    Slice s;
    s.k0 = k0;
    s.kk = kk;
    s.weights = view(all.weights);
    s.biases = view(all.biases);
    s.bn_weights = view(all.bn_weights);
    s.bn_biases = view(all.bn_biases);
    s.tracked = view(all.tracked);
    s.exp_avgs = view(all.exp_avgs);
    s.exp_avg_sqs = view(all.exp_avg_sqs);
    s.params = view(all.params);
    s.running = view(all.running);
    return s;
  }

  // One step on x ([B, I], or [K, B, I] for stacked models). Loss terms, each skipped when its
  // first tensor is absent:
  //   ce_scale * task_masked_cross_entropy(logits, labels, ce_offset, ce_len, ce_reduction)
  //     (logits [.., C] flattened to rows);
  //   distill_coef * batched_distillation_loss(features, distill_teacher, distill_ids, n, "mean");
  //   stability_coef * stability_loss(features viewed as stability_base, stability_base, "sum");
  //   kd_coef * task_masked_kd_loss(logits, kd_teacher, kd_offset, kd_len, kd_temperature, "mean").
  // Returns the loss (a 0-dim tensor, detached).
  //
  // Stacked models whose loss is a sum over models (CE "sum", stability; no distillation or KD,
  // whose "mean" spans all rows) are split over the threads: each thread runs the whole step of
  // its own models, single-threaded (no parallel region per matmul or kernel, each thread's
  // tensors stay in its core's cache). Same masks and gradients as one call over the stack; only
  // the loss is summed in another order. The parameters are written only after every slice's
  // forward and backward has passed its checks.
  at::Tensor step(const at::Tensor& x, std::vector<int64_t> seeds, double momentum, const at::Tensor& labels,
                  const at::Tensor& ce_offset, const at::Tensor& ce_len, double ce_scale, std::string ce_reduction,
                  std::optional<at::Tensor> distill_teacher, std::optional<at::Tensor> distill_ids,
                  int64_t distill_n, double distill_coef, std::optional<at::Tensor> stability_base,
                  double stability_coef, std::optional<at::Tensor> kd_teacher, std::optional<at::Tensor> kd_offset,
                  std::optional<at::Tensor> kd_len, double kd_temperature, double kd_coef, double lr, double beta1,
                  double beta2, double weight_decay, double adam_eps, int64_t step) {
    // Every gradient here is computed by hand: no op of the step may record an autograd graph
    // (the parameters require grad, so the matmuls would, whatever the caller's grad mode).
    // The worker threads below inherit this through the thread-local state.
    const at::AutoDispatchBelowADInplaceOrView no_autograd;
    const auto run = [&](const Slice& s, bool whole) {
      if (whole) {
        return forward_backward(s, x, seeds, labels, ce_offset, ce_len, ce_scale, ce_reduction, distill_teacher,
                                distill_ids, distill_n, distill_coef, stability_base, stability_coef, kd_teacher,
                                kd_offset, kd_len, kd_temperature, kd_coef);
      }
      const int64_t rows = x.size(1);
      const auto rows_of = [&](const at::Tensor& t) { return t.narrow(0, s.k0 * rows, s.kk * rows); };
      return forward_backward(
          s, x.narrow(0, s.k0, s.kk), seeds, rows_of(labels), rows_of(ce_offset), rows_of(ce_len), ce_scale,
          ce_reduction, std::nullopt, std::nullopt, 0, 0.0,
          stability_base.has_value() ? std::optional<at::Tensor>(stability_base->narrow(0, s.k0, s.kk)) : std::nullopt,
          stability_coef, std::nullopt, std::nullopt, std::nullopt, 1.0, 0.0);
    };
    const auto update = [&](const Slice& s, const SliceGrads& g) {
      at::_foreach_lerp_(s.running, g.stats, momentum);
      at::_foreach_add_(s.tracked, 1);
      adamw_step_cpu(s.params, g.grads, s.exp_avgs, s.exp_avg_sqs, lr, beta1, beta2, weight_decay, adam_eps, step);
    };

    const int64_t threads = at::get_num_threads();
    const bool splittable = split && x.dim() == 3 && !at::in_parallel_region() && threads >= 2 &&
                            all.kk >= threads && x.size(0) == all.kk && labels.dim() == 1 &&
                            labels.size(0) == x.size(0) * x.size(1) && ce_offset.dim() == 1 &&
                            ce_offset.size(0) == labels.size(0) && ce_len.dim() == 1 &&
                            ce_len.size(0) == labels.size(0) && ce_reduction == "sum" &&
                            (!stability_base.has_value() ||
                             (stability_base->dim() >= 1 && stability_base->size(0) == all.kk)) &&
                            !distill_teacher.has_value() && !kd_teacher.has_value();
    // (Anything else runs as one call over the stack, whose checks name the bad argument.)
    if (!splittable) {
      SliceGrads g = run(all, true);
      update(all, g);
      return g.loss;
    }
    if (static_cast<int64_t>(parts.size()) != threads) {
      parts.clear();
      for (int64_t t = 0; t < threads; ++t) {
        const int64_t k0 = all.kk * t / threads, k1 = all.kk * (t + 1) / threads;
        parts.push_back(slice(k0, k1 - k0));
      }
    }
    std::vector<SliceGrads> out(parts.size());
    const at::ThreadLocalState state;
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t t = begin; t < end; ++t) out[t] = run(parts[t], false);
    });
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t t = begin; t < end; ++t) update(parts[t], out[t]);
    });
    at::Tensor loss = out[0].loss;
    for (size_t t = 1; t < out.size(); ++t) loss = at::add(loss, out[t].loss);
    return loss;
  }

  // Forward, loss terms and backward of slice s on its inputs; writes nothing of the model.
  SliceGrads forward_backward(const Slice& s, const at::Tensor& x, const std::vector<int64_t>& seeds,
                              const at::Tensor& labels, const at::Tensor& ce_offset, const at::Tensor& ce_len,
                              double ce_scale, const std::string& ce_reduction,
                              const std::optional<at::Tensor>& distill_teacher,
                              const std::optional<at::Tensor>& distill_ids, int64_t distill_n, double distill_coef,
                              const std::optional<at::Tensor>& stability_base, double stability_coef,
                              const std::optional<at::Tensor>& kd_teacher, const std::optional<at::Tensor>& kd_offset,
                              const std::optional<at::Tensor>& kd_len, double kd_temperature, double kd_coef) const {
    auto [logits, features, saved, means, vars] =
        resmlp_forward_from(x, s.weights, s.biases, s.bn_weights, s.bn_biases, eps, p, seeds, s.k0);
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
      TORCH_CHECK_VALUE(stability_base->numel() == features.numel(), "stability_base must hold the ",
                        features.numel(), " elements of the features ", features.sizes(), ", got ",
                        stability_base->sizes());
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
                                                      s.weights, s.bn_weights, saved, p, false);
    return {loss, concat({&gw, &gb, &gbw, &gbb}), concat({&means, &vars})};
  }
};

TORCH_LIBRARY_FRAGMENT(bmc_fast, m) {
  m.class_<ResMLPTrainStep>("ResMLPTrainStep")
      .def(torch::init<TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec,
                       TensorVec, double, std::vector<double>>())
      .def("step", &ResMLPTrainStep::step)
      .def("set_split", &ResMLPTrainStep::set_split);
}

}  // namespace bmc_fast::cpu
