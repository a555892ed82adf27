// All bmc_fast operator schemas and custom classes. Kernels register per backend in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake kernels and autograd live in
// bmc_fast/ops/<op>.py.
//
// Conventions shared by every op:
// * Inputs may be float32, float16, bfloat16 or float64; accumulation is float32 (float64 for
//   float64). The loss has the dtype of the first input.
// * `compute_grad=true` makes the forward also return the gradient of the (reduced) loss with
//   respect to the first input; the backward only scales it by grad_output. With false the
//   gradient output is an empty tensor of the input's dtype. The registered backward scales that
//   gradient buffer in place when the autograd graph is being freed, so a caller of the raw op
//   that keeps the gradient output sees it scaled after backward.
// * `reduction` is "none", "sum" or "mean". Every reduction is done in a fixed order, so the
//   result has the same bits for any thread count and run after run.
// * Data-dependent argument checks (ids, labels, ranges, finiteness of weights) are done here,
//   in the kernels, and raise ValueError naming the argument.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/resmlp_train_step.h"

TORCH_LIBRARY(bmc_fast, m) {
  m.set_python_module("bmc_fast.ops");

  // expert, base: [K, ...] same shape and dtype. weights: [K] or None (all ones).
  // per_expert[k] = mean over ... of (expert[k] - base[k])^2  (accumulation dtype, unweighted).
  // loss: "none" -> [K] = weights * per_expert; "sum" -> scalar; "mean" -> sum / K.
  // grad_expert: d loss / d expert (d loss / d base is its negative).
  m.def(
      "stability_loss(Tensor expert, Tensor base, Tensor? weights, str reduction, "
      "bool compute_grad) -> (Tensor loss, Tensor grad_expert, Tensor per_expert)");

  // expert_params: [K, P]; base_params: [P]; importance: [P] (>= 0) or None; weights: [K] or None.
  // per_expert[k] = sum_p importance[p] * (expert_params[k, p] - base_params[p])^2 (unweighted).
  // loss and reductions as stability_loss.
  m.def(
      "weight_stability_loss(Tensor expert_params, Tensor base_params, Tensor? importance, "
      "Tensor? weights, str reduction, bool compute_grad) "
      "-> (Tensor loss, Tensor grad_expert, Tensor per_expert)");

  // student, teacher: [N, ...] same shape and dtype; expert_ids: int32/int64 [N] in
  // [0, num_experts) (need not be sorted); weights: [num_experts] or None.
  // per_expert[j] = mean over the samples of expert j of mean over ... of (student - teacher)^2;
  // an expert with no sample gives 0. "none" -> [num_experts]; "sum" -> sum_j weights[j] *
  // per_expert[j]; "mean" -> that sum divided by the number of experts with at least one sample
  // (0 when there is none). Per-sample terms are reduced per expert in sample order.
  m.def(
      "batched_distillation_loss(Tensor student, Tensor teacher, Tensor expert_ids, "
      "int num_experts, Tensor? weights, str reduction, bool compute_grad) "
      "-> (Tensor loss, Tensor grad_student, Tensor per_expert)");

  // logits: [N, C]; labels, task_offset, task_len: integer [N], labels global.
  // row i: logsumexp(logits[i, o:o+l]) - logits[i, y]; requires 0 <= o, l >= 1, o + l <= C,
  // o <= y < o + l. Rows with y == ignore_index give 0 and are not counted by "mean"
  // ("mean" of no counted row is NaN, as in torch.nn.functional.cross_entropy).
  m.def(
      "task_masked_cross_entropy(Tensor logits, Tensor labels, Tensor task_offset, "
      "Tensor task_len, str reduction, int ignore_index, bool compute_grad) "
      "-> (Tensor loss, Tensor grad_logits)");

  // student_logits, teacher_logits: [N, C]; task_offset, task_len: integer [N]; temperature > 0.
  // row i: tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)) over [o, o + l), with
  // 0 * log 0 = 0. "mean" divides the sum by N.
  m.def(
      "task_masked_kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor task_offset, "
      "Tensor task_len, float temperature, str reduction, bool compute_grad) "
      "-> (Tensor loss, Tensor grad_student)");

  // The training-mode normalisation + activation of a (stacked) ResMLP layer, fused:
  // out = dropout_p(relu(sum_i BN_i(inputs[i]))), BN_i normalising each [K, B, C] input over its
  // B rows per (k, c) with the biased variance, then * weights[i] + biases[i] ([K, C]). One
  // unstacked model may pass [B, C] inputs with [C] per-channel tensors (K = 1).
  // The dropout mask is a hash of (seed, element index) (csrc/common/dropout_hash.h); kept
  // outputs are scaled by 1 / (1 - p). mask (uint8) is 1 where the gradient passes (relu output
  // > 0 and kept); xhats are the normalised inputs and invstds the [K, C] inverse standard
  // deviations, for the backward. means (+ pre_biases, [K, C] or an empty list: a bias added to
  // the input before the BN, which cancels in it) and vars (unbiased) are what BatchNorm blends
  // into its running statistics; the op itself is functional.
  m.def(
      "bn_relu_dropout(Tensor[] inputs, Tensor[] weights, Tensor[] biases, Tensor[] pre_biases, float eps, "
      "float p, int seed) -> (Tensor out, Tensor mask, Tensor[] xhats, Tensor[] invstds, Tensor[] means, "
      "Tensor[] vars)");

  // Gradients of bn_relu_dropout's out with respect to its inputs, weights and biases.
  m.def(
      "bn_relu_dropout_backward(Tensor grad_out, Tensor mask, Tensor[] xhats, Tensor[] invstds, "
      "Tensor[] weights, float p) -> (Tensor[] grad_inputs, Tensor[] grad_weights, Tensor[] grad_biases)");

  // The training-mode forward of a (stacked) ResMLP (bmc_fast/backbone/resmlp.py) in one call:
  // x [B, I] with weights [O, I], or K stacked models: x [K, B, I] with weights [K, O, I] (biases
  // and per-channel tensors [O] / [K, O]). weights and biases: proj, (fc1, fc2, short) per block,
  // head; bn_weights, bn_biases: (bn1, bn2, bn_s) per block; p and seeds: one per block (the
  // dropout after the block, as bn_relu_dropout). Dropout is keyed by model: model k (0 for one
  // model) draws the masks of model first_model + k: the dropout counters of its [B, C] block
  // output start at (first_model + k) * B * C, so a slice of a stack run with first_model = the
  // index of its first model gets the masks the whole stack gets. Returns the logits, the features (the last block's
  // output), the tensors the backward needs, and per BatchNorm (bn1, bn2, bn_s per block) the
  // batch means (+ the Linear bias) and unbiased variances to blend into the running statistics;
  // the op itself is functional.
  m.def(
      "resmlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] bn_weights, Tensor[] bn_biases, "
      "float eps, float[] p, int[] seeds, int first_model=0) -> (Tensor logits, Tensor features, Tensor[] saved, "
      "Tensor[] means, Tensor[] vars)");

  // Gradients of resmlp_forward's logits and features (either may be None) with respect to
  // weights, biases (the Linear biases before a BatchNorm get exact zeros), bn_weights,
  // bn_biases and, with compute_input_grad, x (else grad_x is empty).
  m.def(
      "resmlp_backward(Tensor? grad_logits, Tensor? grad_features, Tensor x, Tensor features, Tensor[] weights, "
      "Tensor[] bn_weights, Tensor[] saved, float[] p, bool compute_input_grad) -> (Tensor[] grad_weights, "
      "Tensor[] grad_biases, Tensor[] grad_bn_weights, Tensor[] grad_bn_biases, Tensor grad_x)");

  // One AdamW step (torch.optim.AdamW's update; amsgrad and maximize off) over every tensor of
  // the lists in place: params, exp_avgs and exp_avg_sqs are updated, grads read. step is the
  // step being taken (1 for the first), for the bias corrections. float32/float64 contiguous
  // tensors, grads/exp_avgs/exp_avg_sqs of their param's dtype and shape.
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, int step) -> ()");

  // The one-call training step of the fused ResMLP on the CPU (csrc/cpu/resmlp_train_step.h;
  // bmc_fast/backbone/train_step.py builds and calls them). StepLoss: the loss terms, every field
  // checked at construction and readable as an attribute.
  using bmc_fast::cpu::ResMLPTrainStep;
  using bmc_fast::cpu::StepLoss;
  m.class_<StepLoss>("StepLoss")
      .def(torch::init<double, std::string, double, int64_t, double, double, double>(), "",
           {torch::arg("ce_scale"), torch::arg("ce_reduction"), torch::arg("distill_coef"), torch::arg("num_buffers"),
            torch::arg("stability_coef"), torch::arg("kd_coef"), torch::arg("kd_temperature")})
      .def_readonly("ce_scale", &StepLoss::ce_scale)
      .def_readonly("ce_reduction", &StepLoss::ce_reduction)
      .def_readonly("distill_coef", &StepLoss::distill_coef)
      .def_readonly("num_buffers", &StepLoss::num_buffers)
      .def_readonly("stability_coef", &StepLoss::stability_coef)
      .def_readonly("kd_coef", &StepLoss::kd_coef)
      .def_readonly("kd_temperature", &StepLoss::kd_temperature);
  // ResMLPTrainStep(weights, biases, bn_weights, bn_biases, running_means, running_vars, tracked,
  // exp_avgs, exp_avg_sqs, eps, p); step(x, batch, loss, seeds, first_model, momentum, adamw,
  // step_count) -> loss; set_split(on).
  using TensorVec = std::vector<at::Tensor>;
  m.class_<ResMLPTrainStep>("ResMLPTrainStep")
      .def(torch::init<TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec,
                       TensorVec, double, std::vector<double>>(),
           "",
           {torch::arg("weights"), torch::arg("biases"), torch::arg("bn_weights"), torch::arg("bn_biases"),
            torch::arg("running_means"), torch::arg("running_vars"), torch::arg("tracked"), torch::arg("exp_avgs"),
            torch::arg("exp_avg_sqs"), torch::arg("eps"), torch::arg("p")})
      .def("step", &ResMLPTrainStep::step, "",
           {torch::arg("x"), torch::arg("batch"), torch::arg("loss"), torch::arg("seeds"), torch::arg("first_model"),
            torch::arg("momentum"), torch::arg("adamw"), torch::arg("step_count")})
      .def("set_split", &ResMLPTrainStep::set_split);
}
