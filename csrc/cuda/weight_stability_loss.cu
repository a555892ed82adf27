// weight_stability_loss on CUDA: the stability kernels with a broadcast base row and importance.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ge.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "sqdiff_kernels.cuh"

namespace bmc_fast::cuda {

constexpr int64_t kChunkP = 16384;

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_stability_loss_cuda(
    const at::Tensor& expert_params, const at::Tensor& base_params, const std::optional<at::Tensor>& importance,
    const std::optional<at::Tensor>& weights, c10::string_view reduction, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(expert_params, "expert_params");
  check_same_device(base_params, expert_params, "base_params", "expert_params");
  check_same_dtype(base_params, expert_params, "base_params", "expert_params");
  TORCH_CHECK_VALUE(expert_params.dim() == 2, "expert_params must have shape [K, P], got ", expert_params.sizes());
  const int64_t K = expert_params.size(0), P = expert_params.size(1);
  TORCH_CHECK_VALUE(base_params.dim() == 1 && base_params.size(0) == P, "base_params must have shape [", P,
                    "], got ", base_params.sizes());
  const c10::cuda::CUDAGuard guard(expert_params.device());
  const at::ScalarType acc = acc_type(expert_params.scalar_type());
  at::Tensor imp;
  if (importance.has_value()) {
    check_floating(*importance, "importance");
    check_same_device(*importance, expert_params, "importance", "expert_params");
    TORCH_CHECK_VALUE(importance->dim() == 1 && importance->size(0) == P, "importance must have shape [", P,
                      "], got ", importance->sizes());
    imp = importance->to(acc).contiguous();
    TORCH_CHECK_VALUE(capturing() || at::logical_and(imp >= 0, at::isfinite(imp)).all().item<bool>(),
                      kImportanceRule);
  }
  const at::Tensor w = checked_weights(weights, K, expert_params, "expert_params", acc);
  const at::Tensor e = expert_params.contiguous(), b = base_params.contiguous();

  const double s = 2.0 * (red == Reduction::Mean ? (K > 0 ? 1.0 / K : 0.0) : 1.0);
  const at::Tensor row_scale = w.defined() ? w * s : at::full({K}, s, e.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(e) : at::empty({0}, expert_params.options());
  const int64_t nc = P == 0 ? 0 : (P + kChunkP - 1) / kChunkP;
  at::Tensor partial = at::empty({K * nc}, e.options().dtype(acc));
  at::Tensor per = at::empty({K}, e.options().dtype(acc));
  at::Tensor loss = red == Reduction::None ? at::empty({K}, e.options()) : at::empty({}, e.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "weight_stability_loss_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    if (K * nc > 0) {
      sqdiff_chunks_kernel<T><<<blocks_for(K * nc, 1), kBlock, 0, stream>>>(
          cptr<scalar_t>(e), cptr<scalar_t>(b), 0, imp.defined() ? imp.const_data_ptr<A>() : nullptr, P, nc,
          kChunkP, row_scale.const_data_ptr<A>(), mptr<scalar_t>(grad), partial.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    expert_finalize_kernel<T><<<1, kBlock, 0, stream>>>(
        partial.const_data_ptr<A>(), K, nc, 1.0, w.defined() ? w.const_data_ptr<A>() : nullptr, reduction_code(red),
        per.mutable_data_ptr<A>(), mptr<scalar_t>(loss));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad, per};
}

TORCH_LIBRARY_IMPL(bmc_fast, CUDA, m) { m.impl("weight_stability_loss", &weight_stability_loss_cuda); }

}  // namespace bmc_fast::cuda
