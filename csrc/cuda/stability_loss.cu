// stability_loss on CUDA: chunked squared differences per expert, reduced in chunk order.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "sqdiff_kernels.cuh"

namespace bmc_fast::cuda {

constexpr int64_t kChunk = 16384;

std::tuple<at::Tensor, at::Tensor, at::Tensor> stability_loss_cuda(
    const at::Tensor& expert, const at::Tensor& base, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(expert, "expert");
  check_same_device(base, expert, "base", "expert");
  check_same_dtype(base, expert, "base", "expert");
  TORCH_CHECK_VALUE(expert.dim() >= 1, "expert must have shape [K, ...], got a scalar");
  check_same_shape(base, expert, "base", "expert");
  const c10::cuda::CUDAGuard guard(expert.device());
  const int64_t K = expert.size(0);
  const int64_t M = K == 0 ? 0 : expert.numel() / K;
  const at::ScalarType acc = acc_type(expert.scalar_type());
  const at::Tensor w = checked_weights(weights, K, expert, "expert", acc);
  const at::Tensor e = expert.contiguous(), b = base.contiguous();

  const double factor = red == Reduction::Mean ? (K > 0 ? 1.0 / K : 0.0) : 1.0;
  const double s = M > 0 ? 2.0 * factor / M : 0.0;
  const at::Tensor row_scale = w.defined() ? w * s : at::full({K}, s, e.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(e) : at::empty({0}, expert.options());
  const int64_t nc = M == 0 ? 0 : (M + kChunk - 1) / kChunk;
  at::Tensor partial = at::empty({K * nc}, e.options().dtype(acc));
  at::Tensor per = at::empty({K}, e.options().dtype(acc));
  at::Tensor loss = red == Reduction::None ? at::empty({K}, e.options()) : at::empty({}, e.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "stability_loss_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    if (K * nc > 0) {
      sqdiff_chunks_kernel<T><<<blocks_for(K * nc, 1), kBlock, 0, stream>>>(
          cptr<scalar_t>(e), cptr<scalar_t>(b), M, nullptr, M, nc, kChunk, row_scale.const_data_ptr<A>(),
          mptr<scalar_t>(grad), partial.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    expert_finalize_kernel<T><<<1, kBlock, 0, stream>>>(
        partial.const_data_ptr<A>(), K, nc, M > 0 ? 1.0 / M : 0.0, w.defined() ? w.const_data_ptr<A>() : nullptr,
        reduction_code(red), per.mutable_data_ptr<A>(), mptr<scalar_t>(loss));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad, per};
}

TORCH_LIBRARY_IMPL(bmc_fast, CUDA, m) { m.impl("stability_loss", &stability_loss_cuda); }

}  // namespace bmc_fast::cuda
