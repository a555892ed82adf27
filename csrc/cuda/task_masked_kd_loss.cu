// task_masked_kd_loss on CUDA: one warp per row over its task range.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "masked_checks.h"
#include "masked_softmax_kernels.cuh"

namespace bmc_fast::cuda {

std::tuple<at::Tensor, at::Tensor> task_masked_kd_loss_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& task_offset,
    const at::Tensor& task_len, double temperature, c10::string_view reduction, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(student_logits, "student_logits");
  check_same_device(teacher_logits, student_logits, "teacher_logits", "student_logits");
  check_same_dtype(teacher_logits, student_logits, "teacher_logits", "student_logits");
  TORCH_CHECK_VALUE(student_logits.dim() == 2, "student_logits must have shape [N, C], got ", student_logits.sizes());
  check_same_shape(teacher_logits, student_logits, "teacher_logits", "student_logits");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0, got ",
                    temperature);
  const int64_t N = student_logits.size(0), C = student_logits.size(1);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor off = as_long(task_offset, student_logits, N, "task_offset", "student_logits");
  const at::Tensor len = as_long(task_len, student_logits, N, "task_len", "student_logits");
  check_ranges_and_labels(off, len, C, at::Tensor(), 0);

  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const auto opts = s.options();
  at::Tensor grad = compute_grad ? at::empty_like(s) : at::empty({0}, opts);
  at::Tensor row_loss = at::empty({N}, opts.dtype(at::kFloat));
  at::Tensor loss = red == Reduction::None ? at::empty({N}, opts) : at::empty({}, opts);
  const double scale = red == Reduction::Mean ? (N > 0 ? 1.0 / N : 0.0) : 1.0;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "task_masked_kd_loss_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    if (N > 0) {
      masked_kd_rows_kernel<T><<<blocks_for(N, kBlock / kWarp), kBlock, 0, stream>>>(
          cptr<scalar_t>(s), cptr<scalar_t>(t), off.const_data_ptr<int64_t>(), len.const_data_ptr<int64_t>(), N, C,
          static_cast<A>(temperature), static_cast<A>(scale), mptr<scalar_t>(grad), row_loss.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (red == Reduction::None) {
      if (N > 0) cast_kernel<T><<<blocks_for(N, kBlock), kBlock, 0, stream>>>(row_loss.const_data_ptr<float>(), N,
                                                                              mptr<scalar_t>(loss));
    } else {
      sum_to_scalar_kernel<T><<<1, kBlock, 0, stream>>>(row_loss.const_data_ptr<float>(), N, nullptr,
                                                        red == Reduction::Mean ? static_cast<double>(N) : 1.0,
                                                        mptr<scalar_t>(loss));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(bmc_fast, CUDA, m) { m.impl("task_masked_kd_loss", &task_masked_kd_loss_cuda); }

}  // namespace bmc_fast::cuda
