// ResMLPTrainStep: one whole training step of the fused ResMLP on the CPU (one model, or K
// stacked) in one call: forward, the trainer's loss terms with their gradients, backward, the
// BatchNorm running statistics and the AdamW update (resmlp_train_step.cpp). The math is the
// ops' own (resmlp_forward, the loss kernels, resmlp_backward, adamw_step): what it removes is
// the Python and autograd work around them (bmc_fast/backbone/train_step.py).
//
// Torch custom classes (registered in csrc/library.cpp), so that the model's parameter and
// optimizer-state tensors and the loss description are handed over once, not converted from
// Python on every step. Host code only (the DEFAULT build).
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <string>
#include <vector>

namespace bmc_fast::cpu {

// The loss terms of a step (torch.classes.bmc_fast.StepLoss; fields as in
// bmc_fast.backbone.FusedTrainStep's `loss`):
//   ce_scale * task_masked_cross_entropy(logits, labels, ce_offset, ce_len, ce_reduction)
//   + distill_coef * batched_distillation_loss(features, teacher_features, buffer_id, num_buffers, "mean")
//   + stability_coef * stability_loss(features, base_features, "sum")
//   + kd_coef * task_masked_kd_loss(logits, teacher_logits, kd_offset, kd_len, kd_temperature, "mean"),
// logits [.., C] flattened to rows. A term whose coefficient is 0 is skipped, and its batch
// tensors are not needed. The constructor checks every field (ValueError naming it). A batch of
// mixed inputs (mixup: x = w x_a + (1 - w) x_b, made by the caller) brings the labels of x_b as
// well (mix_labels, mix_ce_offset, mix_ce_len) and w (mix_weight): the CE term is then
// w * CE(labels, ...) + (1 - w) * CE(mix_labels, ...), as the autograd step computes it.
struct StepLoss : torch::CustomClassHolder {
  double ce_scale;
  std::string ce_reduction;  // "sum" or "mean"
  double distill_coef;
  int64_t num_buffers;  // >= 1 when distill_coef is not 0
  double stability_coef;
  double kd_coef;
  double kd_temperature;  // > 0 when kd_coef is not 0

  StepLoss(double ce_scale, std::string ce_reduction, double distill_coef, int64_t num_buffers, double stability_coef,
           double kd_coef, double kd_temperature);
};

// The model tensors and optimizer state of models [k0, k0 + kk) of a stack (views), or of the
// whole model.
struct Slice {
  int64_t k0 = 0, kk = 0;
  std::vector<at::Tensor> weights, biases, bn_weights, bn_biases, tracked, exp_avgs, exp_avg_sqs;
  std::vector<at::Tensor> params, running;  // weights + biases + bn_weights + bn_biases; running means + vars
};

// What one slice's forward and backward hand to its update.
struct SliceGrads {
  at::Tensor loss;
  std::vector<at::Tensor> grads, stats;  // in the order of Slice::params and Slice::running
};

// The tensors of one step's batch that its loss terms read (undefined where a term is off).
struct StepBatch {
  at::Tensor labels, ce_offset, ce_len;     // cross-entropy, always
  at::Tensor teacher_features, buffer_id;   // distillation
  at::Tensor base_features;                 // stability
  at::Tensor teacher_logits, kd_offset, kd_len;  // KD
  at::Tensor mix_labels, mix_ce_offset, mix_ce_len;  // mixup: the second inputs' CE (undefined: none)
  double mix_weight = 1.0;                            // mixup: the weight of the first CE
};

struct ResMLPTrainStep : torch::CustomClassHolder {
  Slice all;
  std::vector<Slice> parts;  // `all` split into at::get_num_threads() slices (built on first use)
  double eps;
  std::vector<double> p;
  bool split = true;

  // The fused op's lists (bmc_fast.backbone.fused_args) and, per parameter in the order
  // weights + biases + bn_weights + bn_biases, its AdamW moments.
  ResMLPTrainStep(std::vector<at::Tensor> weights, std::vector<at::Tensor> biases, std::vector<at::Tensor> bn_weights,
                  std::vector<at::Tensor> bn_biases, std::vector<at::Tensor> running_means,
                  std::vector<at::Tensor> running_vars, std::vector<at::Tensor> tracked,
                  std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, double eps,
                  std::vector<double> p);

  void set_split(bool on) { split = on; }

  // One step on x ([B, I], or [K, B, I] for stacked models) with the tensors of `batch` that
  // `loss` reads: labels, ce_offset, ce_len (integer [rows]) always; teacher_features and
  // buffer_id for distillation; base_features for stability; teacher_logits, kd_offset and
  // kd_len for KD; mix_labels, mix_ce_offset, mix_ce_len and mix_weight (a 0-dim tensor) all
  // four or none, for mixed inputs (see StepLoss). A missing one raises a ValueError naming it,
  // an unknown key too. seeds: one dropout seed per block; first_model: model k draws the
  // dropout masks of model first_model + k. momentum: the BatchNorm running-statistics momentum
  // of this step. adamw: (lr, beta1, beta2, weight_decay, eps); step_count: the AdamW step being taken (1 for
  // the first). Updates the parameters, moments, running statistics and batch counters in place
  // and returns the loss (a 0-dim tensor, detached). Every check runs before the first write.
  at::Tensor step(at::Tensor x, c10::Dict<std::string, at::Tensor> batch, c10::intrusive_ptr<StepLoss> loss,
                  std::vector<int64_t> seeds, int64_t first_model, double momentum, std::vector<double> adamw,
                  int64_t step_count);

 private:
  Slice slice(int64_t k0, int64_t kk) const;
  SliceGrads forward_backward(const Slice& s, const at::Tensor& x, const std::vector<int64_t>& seeds,
                              int64_t first_model, const StepBatch& b, const StepLoss& loss) const;
};

}  // namespace bmc_fast::cpu
