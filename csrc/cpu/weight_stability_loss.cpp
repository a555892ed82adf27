// weight_stability_loss on the CPU: per expert, sum_p importance_p (expert_p - base_p)^2.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu_dispatch.h"
#include "vec_span.h"
#ifdef BMC_CPU_HOST
#include <ATen/ops/aminmax.h>
#include <torch/library.h>

#include "host_utils.h"
#include "losses.h"
#endif

namespace bmc_fast::cpu {

BMC_CPU_DECLARE_KERNEL(void, weight_stability_loss_kernel, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const std::vector<double>&, const at::Tensor&,
                       std::vector<double>&)

inline namespace CPU_CAPABILITY {

// expert: contiguous [K, P]; base: [P]; importance: [P] in expert's dtype or the accumulation
// dtype, or undefined.
void weight_stability_loss_kernel(const at::Tensor& expert, const at::Tensor& base,
                                  const at::Tensor& importance, const std::vector<double>& scale,
                                  const at::Tensor& grad, std::vector<double>& sums) {
  const int64_t K = expert.size(0), P = expert.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert.scalar_type(), "weight_stability_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* g = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* e = expert.const_data_ptr<scalar_t>();
    const scalar_t* b = base.const_data_ptr<scalar_t>();
    // importance in the input dtype is read as is (no converted copy); any other dtype arrives in acc_t.
    if (importance.defined() && importance.scalar_type() == expert.scalar_type())
      chunked_sqdiff<scalar_t, scalar_t>(e, b, 0, importance.const_data_ptr<scalar_t>(), K, P, scale, g, sums);
    else
      chunked_sqdiff<scalar_t, acc_t>(e, b, 0, importance.defined() ? importance.const_data_ptr<acc_t>() : nullptr,
                                      K, P, scale, g, sums);
  });
}

}  // namespace CPU_CAPABILITY

#ifdef BMC_CPU_HOST
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_stability_loss_cpu(
    const at::Tensor& expert_params, const at::Tensor& base_params,
    const std::optional<at::Tensor>& importance, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(expert_params, "expert_params");
  check_same_device(base_params, expert_params, "base_params", "expert_params");
  check_same_dtype(base_params, expert_params, "base_params", "expert_params");
  TORCH_CHECK_VALUE(expert_params.dim() == 2, "expert_params must have shape [K, P], got ",
                    expert_params.sizes());
  const int64_t K = expert_params.size(0), P = expert_params.size(1);
  TORCH_CHECK_VALUE(base_params.dim() == 1 && base_params.size(0) == P,
                    "base_params must have shape [", P, "], got ", base_params.sizes());
  const at::ScalarType acc = acc_type(expert_params.scalar_type());
  at::Tensor imp;
  if (importance.has_value()) {
    check_floating(*importance, "importance");
    check_same_device(*importance, expert_params, "importance", "expert_params");
    TORCH_CHECK_VALUE(importance->dim() == 1 && importance->size(0) == P,
                      "importance must have shape [", P, "], got ", importance->sizes());
    imp = importance->scalar_type() == expert_params.scalar_type() ? importance->contiguous()
                                                                    : importance->to(acc).contiguous();
    // One vectorised pass over [P]: importance is a non-negative per-parameter weight (e.g. a
    // Fisher diagonal). min >= 0 also fails on NaN; max < inf catches +inf.
    if (P > 0) {
      const auto [lo, hi] = at::aminmax(imp);
      const double mn = lo.item<double>(), mx = hi.item<double>();
      TORCH_CHECK_VALUE(mn >= 0 && std::isfinite(mx), kImportanceRule, ", got values in [", mn, ", ", mx, "]");
    }
  }
  const std::vector<double> w = weights_or_ones(weights, K, expert_params, "expert_params");

  const at::Tensor e = expert_params.contiguous(), b = base_params.contiguous();
  const double factor = red == Reduction::Mean ? (K > 0 ? 1.0 / K : 0.0) : 1.0;
  std::vector<double> scale(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) scale[k] = 2.0 * w[k] * factor;
  at::Tensor grad = compute_grad ? empty_output_like(e) : at::empty({0}, expert_params.options());

  std::vector<double> sums;
  BMC_CPU_CALL(weight_stability_loss_kernel, e, b, imp, scale, compute_grad ? grad : at::Tensor(), sums);

  std::vector<double> terms(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) terms[k] = w[k] * sums[k];
  return {reduce_terms(terms, red, K, expert_params.scalar_type()), grad, to_acc_tensor(sums, acc)};
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) { m.impl("weight_stability_loss", &weight_stability_loss_cpu); }
#endif  // BMC_CPU_HOST

}  // namespace bmc_fast::cpu
