// task_masked_cross_entropy on CUDA: one warp per row over its task range.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "masked_checks.h"
#include "masked_softmax_kernels.cuh"

namespace bmc_fast::cuda {

std::tuple<at::Tensor, at::Tensor> task_masked_cross_entropy_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& task_offset, const at::Tensor& task_len,
    c10::string_view reduction, int64_t ignore_index, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must have shape [N, C], got ", logits.sizes());
  const int64_t N = logits.size(0), C = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor y = as_long(labels, logits, N, "labels", "logits");
  const at::Tensor off = as_long(task_offset, logits, N, "task_offset", "logits");
  const at::Tensor len = as_long(task_len, logits, N, "task_len", "logits");
  check_ranges_and_labels(off, len, C, y, ignore_index);

  const at::Tensor x = logits.contiguous();
  const auto opts = x.options();
  const at::Tensor count = (y != ignore_index).sum().to(at::kFloat);  // stays on the device
  at::Tensor grad = compute_grad ? at::empty_like(x) : at::empty({0}, opts);
  at::Tensor row_loss = at::empty({N}, opts.dtype(at::kFloat));
  at::Tensor loss = red == Reduction::None ? at::empty({N}, opts) : at::empty({}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "task_masked_cross_entropy_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    if (N > 0) {
      masked_ce_rows_kernel<T><<<blocks_for(N, kBlock / kWarp), kBlock, 0, stream>>>(
          cptr<scalar_t>(x), y.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>(), len.const_data_ptr<int64_t>(),
          N, C, ignore_index, red == Reduction::Mean ? count.const_data_ptr<float>() : nullptr, mptr<scalar_t>(grad),
          row_loss.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (red == Reduction::None) {
      if (N > 0) cast_kernel<T><<<blocks_for(N, kBlock), kBlock, 0, stream>>>(row_loss.const_data_ptr<float>(), N,
                                                                              mptr<scalar_t>(loss));
    } else {
      sum_to_scalar_kernel<T><<<1, kBlock, 0, stream>>>(row_loss.const_data_ptr<float>(), N,
                                                        red == Reduction::Mean ? count.const_data_ptr<float>() : nullptr,
                                                        1.0, mptr<scalar_t>(loss));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(bmc_fast, CUDA, m) { m.impl("task_masked_cross_entropy", &task_masked_cross_entropy_cuda); }

}  // namespace bmc_fast::cuda
