// batched_distillation_loss on the CPU: a segment mean by expert id of per-sample squared errors.
//
// Three steps, deterministic for any thread count: (1) count the samples of every expert (one
// serial pass over the ids, which also checks their range); (2) per-sample sums of
// (student - teacher)^2 and gradients, rows in parallel, each row by one thread; (3) add the
// per-sample sums into their experts in sample order. No sorting, no atomics.
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

BMC_CPU_DECLARE_KERNEL(void, batched_distillation_loss_kernel, const at::Tensor&, const at::Tensor&,
                       const int64_t*, const std::vector<double>&, const at::Tensor&,
                       std::vector<double>&)

inline namespace CPU_CAPABILITY {

// student, teacher: contiguous [N, D]; ids: [N] in range; row_scale_by_expert[j]: gradient scale
// of expert j's rows. Writes row_sums[i] = sum_d (s - t)^2.
void batched_distillation_loss_kernel(const at::Tensor& student, const at::Tensor& teacher,
                                      const int64_t* ids, const std::vector<double>& expert_scale,
                                      const at::Tensor& grad, std::vector<double>& row_sums) {
  const int64_t N = student.size(0);
  const int64_t D = N == 0 ? 0 : student.numel() / N;
  row_sums.assign(static_cast<size_t>(N), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "batched_distillation_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* g = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, D));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t scale = static_cast<acc_t>(expert_scale[ids[i]]);
        row_sums[i] = g != nullptr
            ? sqdiff_span<true>(s + i * D, t + i * D, static_cast<const acc_t*>(nullptr), D, scale, g + i * D)
            : sqdiff_span<false>(s + i * D, t + i * D, static_cast<const acc_t*>(nullptr), D, scale,
                                 static_cast<scalar_t*>(nullptr));
      }
    });
  });
}

}  // namespace CPU_CAPABILITY

#ifdef BMC_CPU_HOST
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_distillation_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& expert_ids,
    int64_t num_experts, const std::optional<at::Tensor>& weights, c10::string_view reduction,
    bool compute_grad) {
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
  const std::vector<double> w = weights_or_ones(weights, num_experts, student, "student");

  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> count(static_cast<size_t>(num_experts), 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < num_experts, kExpertIdsRule, num_experts, "), got ", id[i],
                      " at index ", i);
    ++count[id[i]];
  }
  int64_t present = 0;
  for (int64_t c : count) present += c > 0;
  const double factor = red == Reduction::Mean ? (present > 0 ? 1.0 / present : 0.0) : 1.0;
  std::vector<double> scale(static_cast<size_t>(num_experts), 0.0);
  for (int64_t j = 0; j < num_experts; ++j)
    if (count[j] > 0 && D > 0) scale[j] = 2.0 * w[j] * factor / (static_cast<double>(count[j]) * D);

  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  at::Tensor grad = compute_grad ? empty_output_like(s) : at::empty({0}, student.options());
  std::vector<double> row_sums;
  BMC_CPU_CALL(batched_distillation_loss_kernel, s, t, id, scale, compute_grad ? grad : at::Tensor(), row_sums);

  std::vector<double> per(static_cast<size_t>(num_experts), 0.0), terms(per.size());
  for (int64_t i = 0; i < N; ++i) per[id[i]] += row_sums[i];
  for (int64_t j = 0; j < num_experts; ++j) {
    per[j] = count[j] > 0 && D > 0 ? per[j] / (static_cast<double>(count[j]) * D) : 0.0;
    terms[j] = w[j] * per[j];
  }
  return {reduce_terms(terms, red, present, student.scalar_type()), grad,
          to_acc_tensor(per, acc_type(student.scalar_type()))};
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) { m.impl("batched_distillation_loss", &batched_distillation_loss_cpu); }
#endif  // BMC_CPU_HOST

}  // namespace bmc_fast::cpu
