// The one-call training step of the fused ResMLP (resmlp_train_step.h).
#include "resmlp_train_step.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/add.h>
#include <ATen/ops/mul.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "adamw.h"
#include "host_utils.h"
#include "losses.h"
#include "resmlp.h"

namespace bmc_fast::cpu {

namespace {

using TensorVec = std::vector<at::Tensor>;

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

constexpr const char* kBatchKeys[] = {"labels",        "ce_offset",      "ce_len",    "teacher_features", "buffer_id",
                                      "base_features", "teacher_logits", "kd_offset", "kd_len",
                                      "mix_labels",    "mix_ce_offset",  "mix_ce_len", "mix_weight"};

// The batch tensors the terms of `loss` read; a missing one (or a key not in kBatchKeys) is a
// ValueError naming it.
StepBatch batch_for(const c10::Dict<std::string, at::Tensor>& batch, const StepLoss& loss) {
  for (const auto& item : batch) {
    bool known = false;
    for (const char* k : kBatchKeys) known = known || item.key() == k;
    TORCH_CHECK_VALUE(known, "batch has an unknown key '", item.key(),
                      "' (known: labels, ce_offset, ce_len, teacher_features, buffer_id, base_features, "
                      "teacher_logits, kd_offset, kd_len, mix_labels, mix_ce_offset, mix_ce_len, mix_weight)");
  }
  const auto get = [&](const char* key, const char* term, const char* coef_name, double coef) {
    const auto it = batch.find(key);
    // The autograd step's message (bmc_fast/train/step.py), with the term that needs the tensor.
    if (coef_name == nullptr) {
      TORCH_CHECK_VALUE(it != batch.end(), "the step's loss terms need batch['", key, "'] (the ", term, " term)");
    } else {
      TORCH_CHECK_VALUE(it != batch.end(), "the step's loss terms need batch['", key, "'] (the ", term, " term, ",
                        coef_name, " = ", coef, ")");
    }
    return it->value();
  };
  StepBatch b;
  b.labels = get("labels", "cross-entropy", nullptr, 0.0);
  b.ce_offset = get("ce_offset", "cross-entropy", nullptr, 0.0);
  b.ce_len = get("ce_len", "cross-entropy", nullptr, 0.0);
  if (loss.distill_coef != 0.0) {
    b.teacher_features = get("teacher_features", "distillation", "distill_coef", loss.distill_coef);
    b.buffer_id = get("buffer_id", "distillation", "distill_coef", loss.distill_coef);
  }
  if (loss.stability_coef != 0.0) {
    b.base_features = get("base_features", "stability", "stability_coef", loss.stability_coef);
  }
  if (loss.kd_coef != 0.0) {
    b.teacher_logits = get("teacher_logits", "KD", "kd_coef", loss.kd_coef);
    b.kd_offset = get("kd_offset", "KD", "kd_coef", loss.kd_coef);
    b.kd_len = get("kd_len", "KD", "kd_coef", loss.kd_coef);
  }
  if (batch.contains("mix_labels") || batch.contains("mix_ce_offset") || batch.contains("mix_ce_len") ||
      batch.contains("mix_weight")) {
    b.mix_labels = get("mix_labels", "mixed cross-entropy", nullptr, 0.0);
    b.mix_ce_offset = get("mix_ce_offset", "mixed cross-entropy", nullptr, 0.0);
    b.mix_ce_len = get("mix_ce_len", "mixed cross-entropy", nullptr, 0.0);
    const at::Tensor w = get("mix_weight", "mixed cross-entropy", nullptr, 0.0);
    TORCH_CHECK_VALUE(w.dim() == 0 && w.is_floating_point() && w.device().is_cpu(),
                      "batch['mix_weight'] must be a 0-dim floating-point CPU tensor, got ", w.sizes(), " ",
                      w.scalar_type());
    b.mix_weight = w.item<double>();
    TORCH_CHECK_VALUE(b.mix_weight >= 0.0 && b.mix_weight <= 1.0, "batch['mix_weight'] must be in [0, 1], got ",
                      b.mix_weight);
  }
  return b;
}

void check_finite(double v, const char* name) { TORCH_CHECK_VALUE(std::isfinite(v), name, " must be finite, got ", v); }

}  // namespace

StepLoss::StepLoss(double ce_scale_, std::string ce_reduction_, double distill_coef_, int64_t num_buffers_,
                   double stability_coef_, double kd_coef_, double kd_temperature_)
    : ce_scale(ce_scale_),
      ce_reduction(std::move(ce_reduction_)),
      distill_coef(distill_coef_),
      num_buffers(num_buffers_),
      stability_coef(stability_coef_),
      kd_coef(kd_coef_),
      kd_temperature(kd_temperature_) {
  check_finite(ce_scale, "ce_scale");
  TORCH_CHECK_VALUE(ce_reduction == "sum" || ce_reduction == "mean", "ce_reduction must be 'sum' or 'mean', got '",
                    ce_reduction, "'");
  check_finite(distill_coef, "distill_coef");
  check_finite(stability_coef, "stability_coef");
  check_finite(kd_coef, "kd_coef");
  TORCH_CHECK_VALUE(distill_coef == 0.0 || num_buffers >= 1, "num_buffers must be >= 1 when distill_coef is not 0, got ",
                    num_buffers);
  TORCH_CHECK_VALUE(kd_coef == 0.0 || (std::isfinite(kd_temperature) && kd_temperature > 0),
                    "kd_temperature must be finite and > 0 when kd_coef is not 0, got ", kd_temperature);
}

ResMLPTrainStep::ResMLPTrainStep(TensorVec weights, TensorVec biases, TensorVec bn_weights, TensorVec bn_biases,
                                 TensorVec running_means, TensorVec running_vars, TensorVec tracked,
                                 TensorVec exp_avgs, TensorVec exp_avg_sqs, double eps_, std::vector<double> p_)
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
  // What adamw_step checks on every call, checked here once, so that the update of a step never
  // fails after the running statistics were written.
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = all.params[i];
    check_cpu(t, "parameters");
    TORCH_CHECK_VALUE(t.is_contiguous(), "every parameter must be contiguous, got one of shape ", t.sizes(),
                      " and strides ", t.strides());
    for (const at::Tensor* m : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      check_cpu(*m, "exp_avgs and exp_avg_sqs");
      TORCH_CHECK_VALUE(m->is_contiguous() && m->sizes() == t.sizes() && m->scalar_type() == t.scalar_type(),
                        "exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be contiguous tensors of the shape ",
                        t.sizes(), " and dtype ", t.scalar_type(), " of their parameter");
    }
  }
  all.weights = std::move(weights);
  all.biases = std::move(biases);
  all.bn_weights = std::move(bn_weights);
  all.bn_biases = std::move(bn_biases);
  all.tracked = std::move(tracked);
  all.exp_avgs = std::move(exp_avgs);
  all.exp_avg_sqs = std::move(exp_avg_sqs);
}

Slice ResMLPTrainStep::slice(int64_t k0, int64_t kk) const {
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

// Stacked models whose loss is a sum over models (CE "sum", stability; no distillation or KD,
// whose "mean" spans all rows) are split over the threads: each thread runs the whole step of
// its own models, single-threaded (no parallel region per matmul or kernel, each thread's
// tensors stay in its core's cache). Same masks and gradients as one call over the stack; only
// the loss is summed in another order. The parameters are written only after every slice's
// forward and backward has passed its checks.
at::Tensor ResMLPTrainStep::step(at::Tensor x, c10::Dict<std::string, at::Tensor> batch,
                                 c10::intrusive_ptr<StepLoss> loss, std::vector<int64_t> seeds, int64_t first_model,
                                 double momentum, std::vector<double> adamw, int64_t step_count) {
  // Every gradient here is computed by hand: no op of the step may record an autograd graph
  // (the parameters require grad, so the matmuls would, whatever the caller's grad mode).
  // The worker threads below inherit this through the thread-local state.
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const StepLoss& L = *loss;
  const StepBatch b = batch_for(batch, L);
  TORCH_CHECK_VALUE(first_model >= 0, "first_model must be >= 0, got ", first_model);
  TORCH_CHECK_VALUE(adamw.size() == 5, "adamw must hold (lr, beta1, beta2, weight_decay, eps), got ", adamw.size(),
                    " values");
  const double lr = adamw[0], beta1 = adamw[1], beta2 = adamw[2], weight_decay = adamw[3], adam_eps = adamw[4];
  check_adamw_hyper(lr, beta1, beta2, weight_decay, adam_eps, step_count);

  const auto update = [&](const Slice& s, const SliceGrads& g) {
    at::_foreach_lerp_(s.running, g.stats, momentum);
    at::_foreach_add_(s.tracked, 1);
    adamw_step_cpu(s.params, g.grads, s.exp_avgs, s.exp_avg_sqs, lr, beta1, beta2, weight_decay, adam_eps,
                   step_count);
  };

  const int64_t threads = at::get_num_threads();
  const at::Tensor& labels = b.labels;
  const bool splittable = split && x.dim() == 3 && !at::in_parallel_region() && threads >= 2 &&
                          all.kk >= threads && x.size(0) == all.kk && labels.dim() == 1 &&
                          labels.size(0) == x.size(0) * x.size(1) && b.ce_offset.dim() == 1 &&
                          b.ce_offset.size(0) == labels.size(0) && b.ce_len.dim() == 1 &&
                          b.ce_len.size(0) == labels.size(0) && L.ce_reduction == "sum" &&
                          (!b.base_features.defined() ||
                           (b.base_features.dim() >= 1 && b.base_features.size(0) == all.kk)) &&
                          !b.teacher_features.defined() && !b.teacher_logits.defined() &&
                          !b.mix_labels.defined();
  // (Anything else runs as one call over the stack, whose checks name the bad argument.)
  if (!splittable) {
    SliceGrads g = forward_backward(all, x, seeds, first_model, b, L);
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
  const int64_t rows = x.size(1);
  const auto run = [&](const Slice& s) {
    const auto rows_of = [&](const at::Tensor& t) { return t.narrow(0, s.k0 * rows, s.kk * rows); };
    StepBatch part;
    part.labels = rows_of(b.labels);
    part.ce_offset = rows_of(b.ce_offset);
    part.ce_len = rows_of(b.ce_len);
    if (b.base_features.defined()) part.base_features = b.base_features.narrow(0, s.k0, s.kk);
    return forward_backward(s, x.narrow(0, s.k0, s.kk), seeds, first_model, part, L);
  };
  std::vector<SliceGrads> out(parts.size());
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = begin; t < end; ++t) out[t] = run(parts[t]);
  });
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = begin; t < end; ++t) update(parts[t], out[t]);
  });
  at::Tensor total = out[0].loss;
  for (size_t t = 1; t < out.size(); ++t) total = at::add(total, out[t].loss);
  return total;
}

// Forward, loss terms and backward of slice s on its inputs; writes nothing of the model. The
// slice's models are models first_model + s.k0, ... for the dropout masks.
SliceGrads ResMLPTrainStep::forward_backward(const Slice& s, const at::Tensor& x, const std::vector<int64_t>& seeds,
                                             int64_t first_model, const StepBatch& b, const StepLoss& L) const {
  auto [logits, features, saved, means, vars] =
      resmlp_forward_cpu(x, s.weights, s.biases, s.bn_weights, s.bn_biases, eps, p, seeds, first_model + s.k0);
  const at::Tensor rows = logits.view({-1, logits.size(-1)});

  at::Tensor loss, grad_logits, grad_features;
  if (!b.mix_labels.defined()) {
    auto [l, g] = task_masked_cross_entropy_cpu(rows, b.labels, b.ce_offset, b.ce_len, L.ce_reduction, -100, true);
    loss = add_term(loss, l, L.ce_scale);
    add_grad(grad_logits, g, L.ce_scale);
  } else {  // mixed inputs: w CE(labels) + (1 - w) CE(mix_labels), then scaled, as the autograd step
    const double w = b.mix_weight;
    auto [l1, g1] = task_masked_cross_entropy_cpu(rows, b.labels, b.ce_offset, b.ce_len, L.ce_reduction, -100, true);
    auto [l2, g2] =
        task_masked_cross_entropy_cpu(rows, b.mix_labels, b.mix_ce_offset, b.mix_ce_len, L.ce_reduction, -100, true);
    loss = add_term(loss, add_term(at::mul(l1, w), l2, 1.0 - w), L.ce_scale);
    add_grad(grad_logits, g1.mul_(w).add_(g2, 1.0 - w), L.ce_scale);
  }
  if (b.teacher_features.defined()) {
    auto [l, g, per] = batched_distillation_loss_cpu(features, b.teacher_features, b.buffer_id, L.num_buffers,
                                                     std::nullopt, "mean", true);
    loss = add_term(loss, l, L.distill_coef);
    add_grad(grad_features, g, L.distill_coef);
  }
  if (b.base_features.defined()) {
    // One model's [B, F] features against a [1, B, F] base, as the trainer views them.
    TORCH_CHECK_VALUE(b.base_features.numel() == features.numel(), "base_features must hold the ", features.numel(),
                      " elements of the features ", features.sizes(), ", got ", b.base_features.sizes());
    auto [l, g, per] = stability_loss_cpu(features.view(b.base_features.sizes()), b.base_features, std::nullopt,
                                          "sum", true);
    loss = add_term(loss, l, L.stability_coef);
    add_grad(grad_features, g.view(features.sizes()), L.stability_coef);
  }
  if (b.teacher_logits.defined()) {
    auto [l, g] = task_masked_kd_loss_cpu(rows, b.teacher_logits, b.kd_offset, b.kd_len, L.kd_temperature, "mean",
                                          true);
    loss = add_term(loss, l, L.kd_coef);
    add_grad(grad_logits, g, L.kd_coef);
  }

  auto [gw, gb, gbw, gbb, gx] = resmlp_backward_cpu(grad_logits.view(logits.sizes()), grad_features, x, features,
                                                    s.weights, s.bn_weights, saved, p, false);
  return {loss, concat({&gw, &gb, &gbw, &gbb}), concat({&means, &vars})};
}

}  // namespace bmc_fast::cpu
