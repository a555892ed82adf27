// batched_distillation_loss on CUDA: exact integer counts, one warp per sample row, then one
// block per expert summing its rows in a fixed order (no float atomics: deterministic).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "sqdiff_kernels.cuh"

namespace bmc_fast::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_distillation_loss_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& expert_ids, int64_t num_experts,
    const std::optional<at::Tensor>& weights, c10::string_view reduction, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(student, "student");
  check_same_device(teacher, student, "teacher", "student");
  check_same_dtype(teacher, student, "teacher", "student");
  TORCH_CHECK_VALUE(student.dim() >= 1, "student must have shape [N, ...], got a scalar");
  check_same_shape(teacher, student, "teacher", "student");
  const int64_t N = student.size(0);
  const int64_t D = N == 0 ? 0 : student.numel() / N;
  check_row_ids(expert_ids, student, N, "expert_ids", "student");
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::ScalarType acc = acc_type(student.scalar_type());
  const at::Tensor w = checked_weights(weights, num_experts, student, "student", acc);
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  if (N > 0 && !capturing()) {  // one sync for the range check
    const auto [lo, hi] = at::aminmax(ids);
    const at::Tensor both = at::stack({lo, hi}).cpu();
    const int64_t mn = both[0].item<int64_t>(), mx = both[1].item<int64_t>();
    TORCH_CHECK_VALUE(mn >= 0 && mx < num_experts, kExpertIdsRule, num_experts, "), got values in [", mn, ", ", mx,
                      "]");
  }
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const auto opts = s.options();
  at::Tensor counts = at::zeros({num_experts}, opts.dtype(at::kInt));
  at::Tensor scale = at::empty({num_experts}, opts.dtype(acc));
  at::Tensor present = at::empty({}, opts.dtype(at::kFloat));
  at::Tensor row_sum = at::empty({N}, opts.dtype(acc));
  at::Tensor per = at::empty({num_experts}, opts.dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(s) : at::empty({0}, student.options());
  at::Tensor loss = red == Reduction::None ? at::empty({num_experts}, opts) : at::empty({}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "batched_distillation_loss_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    const A* wp = w.defined() ? w.const_data_ptr<A>() : nullptr;
    if (N > 0) {
      count_ids_kernel<int64_t><<<blocks_for(N, kBlock), kBlock, 0, stream>>>(
          ids.const_data_ptr<int64_t>(), N, num_experts, counts.mutable_data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    expert_scale_kernel<A><<<1, kBlock, 0, stream>>>(counts.const_data_ptr<int>(), num_experts, D, wp,
                                                     reduction_code(red), scale.mutable_data_ptr<A>(),
                                                     present.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (N > 0) {
      sqdiff_rows_kernel<T><<<blocks_for(N, kBlock / kWarp), kBlock, 0, stream>>>(
          cptr<scalar_t>(s), cptr<scalar_t>(t), ids.const_data_ptr<int64_t>(), N, D, num_experts,
          scale.const_data_ptr<A>(),
          mptr<scalar_t>(grad), row_sum.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    segment_mean_kernel<A><<<static_cast<unsigned int>(num_experts), kBlock, 0, stream>>>(
        row_sum.const_data_ptr<A>(), ids.const_data_ptr<int64_t>(), N, D, counts.const_data_ptr<int>(),
        per.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    distillation_finalize_kernel<T><<<1, kBlock, 0, stream>>>(per.const_data_ptr<A>(), num_experts, wp,
                                                              reduction_code(red), present.const_data_ptr<float>(),
                                                              mptr<scalar_t>(loss));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad, per};
}

TORCH_LIBRARY_IMPL(bmc_fast, CUDA, m) { m.impl("batched_distillation_loss", &batched_distillation_loss_cuda); }

}  // namespace bmc_fast::cuda
