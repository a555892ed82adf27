// Row math of the task-masked losses (task_masked_cross_entropy, task_masked_kd_loss): a row's
// softmax is taken over its own task range [o, o + l) only. Both backends read the range twice
// for its max and then its sum of exp(x - max) (the CPU with one thread per row, CUDA with one
// warp per row and shuffle reductions), then write the per-element gradients with the functions
// below. Subtracting the max keeps exp() finite for logits of any magnitude (tested up to +-1e4
// in every dtype).
#pragma once

#include "bmc_hd.h"

namespace bmc_fast {

// Cross-entropy of one row from its logsumexp and its label's logit.
template <typename acc_t>
BMC_HD acc_t ce_row_loss(acc_t lse, acc_t label_logit) {
  return lse - label_logit;
}

// d CE / d logit_j = softmax_j - [j == label], computed in acc_t before rounding so that a
// confident prediction (softmax_label ~ 1) does not cancel to 0 in bfloat16.
template <typename acc_t>
BMC_HD acc_t ce_grad(acc_t p, bool is_label, acc_t scale) {
  return (is_label ? p - acc_t(1) : p) * scale;
}

// One element of tau^2 KL(p_t || p_s) before the tau^2 factor: p_t (log p_t - log p_s), with
// the convention 0 * log 0 = 0 (teacher logits of -inf are allowed).
template <typename acc_t>
BMC_HD acc_t kd_term(acc_t log_pt, acc_t log_ps, acc_t pt) {
  return pt > acc_t(0) ? pt * (log_pt - log_ps) : acc_t(0);
}

// d (tau^2 KL) / d student_logit_j = tau (p_s,j - p_t,j).
template <typename acc_t>
BMC_HD acc_t kd_grad(acc_t ps, acc_t pt, acc_t tau, acc_t scale) {
  return scale * tau * (ps - pt);
}

}  // namespace bmc_fast
