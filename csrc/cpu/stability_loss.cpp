// stability_loss on the CPU: per expert, mean over its features of (expert - base)^2.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu_dispatch.h"
#include "vec_span.h"
#ifdef BMC_CPU_HOST
#include <torch/library.h>

#include "host_utils.h"
#include "losses.h"
#endif

namespace bmc_fast::cpu {

BMC_CPU_DECLARE_KERNEL(void, stability_loss_kernel, const at::Tensor&, const at::Tensor&,
                       const std::vector<double>&, const at::Tensor&, std::vector<double>&)

inline namespace CPU_CAPABILITY {

// expert, base: contiguous [K, M]; grad: [K, M] or undefined. sums[k] = sum_m (e - b)^2.
void stability_loss_kernel(const at::Tensor& expert, const at::Tensor& base,
                           const std::vector<double>& scale, const at::Tensor& grad,
                           std::vector<double>& sums) {
  const int64_t K = expert.size(0);
  const int64_t M = K == 0 ? 0 : expert.numel() / K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert.scalar_type(), "stability_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    chunked_sqdiff<scalar_t, acc_t>(expert.const_data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(), M,
                             static_cast<const acc_t*>(nullptr), K, M, scale,
                             grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr, sums);
  });
}

}  // namespace CPU_CAPABILITY

#ifdef BMC_CPU_HOST
std::tuple<at::Tensor, at::Tensor, at::Tensor> stability_loss_cpu(
    const at::Tensor& expert, const at::Tensor& base, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(expert, "expert");
  check_same_device(base, expert, "base", "expert");
  check_same_dtype(base, expert, "base", "expert");
  TORCH_CHECK_VALUE(expert.dim() >= 1, "expert must have shape [K, ...], got a scalar");
  check_same_shape(base, expert, "base", "expert");
  const int64_t K = expert.size(0);
  const int64_t M = K == 0 ? 0 : expert.numel() / K;
  const std::vector<double> w = weights_or_ones(weights, K, expert, "expert");

  const at::Tensor e = expert.contiguous(), b = base.contiguous();
  const double factor = red == Reduction::Mean ? (K > 0 ? 1.0 / K : 0.0) : 1.0;
  std::vector<double> scale(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) scale[k] = M > 0 ? 2.0 * w[k] * factor / M : 0.0;
  at::Tensor grad = compute_grad ? empty_output_like(e) : at::empty({0}, expert.options());

  std::vector<double> sums;
  BMC_CPU_CALL(stability_loss_kernel, e, b, scale, compute_grad ? grad : at::Tensor(), sums);

  std::vector<double> per(static_cast<size_t>(K)), terms(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    per[k] = M > 0 ? sums[k] / M : 0.0;
    terms[k] = w[k] * per[k];
  }
  return {reduce_terms(terms, red, K, expert.scalar_type()), grad,
          to_acc_tensor(per, acc_type(expert.scalar_type()))};
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) { m.impl("stability_loss", &stability_loss_cpu); }
#endif  // BMC_CPU_HOST

}  // namespace bmc_fast::cpu
