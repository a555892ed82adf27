// Element math of the squared-difference losses (stability_loss, weight_stability_loss,
// batched_distillation_loss). Each loss is a weighted sum of w * (a - b)^2 terms; its gradient
// with respect to `a` is 2 * w * (a - b) times the term's reduction factor, which the callers
// fold, together with the 2, into one `scale` per expert or per row.
#pragma once

#include "bmc_hd.h"

namespace bmc_fast {

template <typename acc_t>
BMC_HD acc_t sqdiff_term(acc_t a, acc_t b, acc_t w) {
  const acc_t d = a - b;
  return w * d * d;
}

template <typename acc_t>
BMC_HD acc_t sqdiff_grad(acc_t a, acc_t b, acc_t w, acc_t scale) {
  return scale * w * (a - b);
}

// Reduction factor applied to every expert's term: 1 for "none"/"sum", 1/n for "mean" over n
// experts (n = 0 gives 0: nothing to average).
template <typename acc_t>
BMC_HD acc_t mean_factor(bool is_mean, long long n) {
  return is_mean ? (n > 0 ? acc_t(1) / acc_t(n) : acc_t(0)) : acc_t(1);
}

}  // namespace bmc_fast
