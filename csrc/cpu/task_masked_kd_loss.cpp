// task_masked_kd_loss on the CPU: tau^2 KL(softmax(t/tau) || softmax(s/tau)) over each row's range.
//
// Rows in parallel, each by one thread: the maxima and sums of exp of both rows over the range,
// then one pass that accumulates the KL terms and writes tau * (p_s - p_t) * scale. Teacher
// logits of -inf are allowed (0 log 0 = 0).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "../common/masked_softmax_math.h"
#include "cpu_dispatch.h"
#include "vec_span.h"
#ifdef BMC_CPU_HOST
#include <torch/library.h>

#include "host_utils.h"
#include "losses.h"
#endif

namespace bmc_fast::cpu {

BMC_CPU_DECLARE_KERNEL(void, task_masked_kd_loss_kernel, const at::Tensor&, const at::Tensor&,
                       const int64_t*, const int64_t*, double, double, const at::Tensor&,
                       std::vector<double>&)

inline namespace CPU_CAPABILITY {

// KL terms of one row's range (before tau^2), with log p = (x - max) / tau - log_sum for student
// (ms, ls) and teacher (mt, lt); writes tau * (p_s - p_t) * scale to g when g is not null.
// Shifting by the max before scaling keeps log p accurate for logits of magnitude 1e4.
template <typename T, typename acc_t = at::opmath_type<T>>
acc_t kd_span(const T* s, const T* t, int64_t l, acc_t inv_tau, acc_t ms, acc_t ls, acc_t mt,
              acc_t lt, acc_t tau, acc_t scale, T* g) {
  acc_t kl = 0;
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    using IO = VecIO<T>;
    const fVec vinv(inv_tau), vms(ms), vls(ls), vmt(mt), vlt(lt), vgs(scale * tau), zero(0.f);
    fVec acc(0.f);
    for (; j + IO::kStep <= l; j += IO::kStep) {
      fVec s0, s1, t0, t1;
      IO::load(s + j, s0, s1);
      IO::load(t + j, t0, t1);
      const fVec lps0 = (s0 - vms) * vinv - vls, lps1 = (s1 - vms) * vinv - vls;
      const fVec lpt0 = (t0 - vmt) * vinv - vlt, lpt1 = (t1 - vmt) * vinv - vlt;
      const fVec pt0 = lpt0.exp_u20(), pt1 = lpt1.exp_u20();
      acc = acc + fVec::blendv(zero, pt0 * (lpt0 - lps0), pt0 > zero);
      acc = acc + fVec::blendv(zero, pt1 * (lpt1 - lps1), pt1 > zero);
      if (g != nullptr) IO::store(g + j, vgs * (lps0.exp_u20() - pt0), vgs * (lps1.exp_u20() - pt1));
    }
    kl = hsum(acc);
  }
  for (; j < l; ++j) {
    const acc_t lps = (static_cast<acc_t>(s[j]) - ms) * inv_tau - ls;
    const acc_t lpt = (static_cast<acc_t>(t[j]) - mt) * inv_tau - lt;
    const acc_t pt = std::exp(lpt);
    kl += kd_term(lpt, lps, pt);
    if (g != nullptr) g[j] = static_cast<T>(kd_grad(std::exp(lps), pt, tau, scale));
  }
  return kl;
}

void task_masked_kd_loss_kernel(const at::Tensor& student, const at::Tensor& teacher,
                                const int64_t* off, const int64_t* len, double temperature,
                                double grad_scale, const at::Tensor& grad,
                                std::vector<double>& row_loss) {
  const int64_t N = student.size(0), C = student.size(1);
  row_loss.assign(static_cast<size_t>(N), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "task_masked_kd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* g = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t tau = static_cast<acc_t>(temperature), inv_tau = acc_t(1) / tau;
    const acc_t scale = static_cast<acc_t>(grad_scale);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 13) / std::max<int64_t>(1, C));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t o = off[i], l = len[i];
        const scalar_t* si = s + i * C + o;
        const scalar_t* ti = t + i * C + o;
        const acc_t ms = span_max(si, l), mt = span_max(ti, l);
        const acc_t ls = std::log(span_sumexp(si, l, ms, inv_tau));
        const acc_t lt = std::log(span_sumexp(ti, l, mt, inv_tau));
        scalar_t* gi = g == nullptr ? nullptr : g + i * C;
        const acc_t kl = kd_span(si, ti, l, inv_tau, ms, ls, mt, lt, tau, scale, gi == nullptr ? nullptr : gi + o);
        row_loss[i] = static_cast<double>(tau) * static_cast<double>(tau) * static_cast<double>(kl);
        if (gi != nullptr) {
          zero_span(gi, o);
          zero_span(gi + o + l, C - o - l);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY

#ifdef BMC_CPU_HOST
std::tuple<at::Tensor, at::Tensor> task_masked_kd_loss_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& task_offset,
    const at::Tensor& task_len, double temperature, c10::string_view reduction, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(student_logits, "student_logits");
  check_same_device(teacher_logits, student_logits, "teacher_logits", "student_logits");
  check_same_dtype(teacher_logits, student_logits, "teacher_logits", "student_logits");
  TORCH_CHECK_VALUE(student_logits.dim() == 2, "student_logits must have shape [N, C], got ",
                    student_logits.sizes());
  check_same_shape(teacher_logits, student_logits, "teacher_logits", "student_logits");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be finite and > 0, got ", temperature);
  const int64_t N = student_logits.size(0);
  const auto [off, len] = checked_task_ranges(task_offset, task_len, student_logits, "student_logits");
  const double scale = red == Reduction::Mean ? (N > 0 ? 1.0 / N : 0.0) : 1.0;

  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  at::Tensor grad = compute_grad ? empty_output_like(s) : at::empty({0}, student_logits.options());
  std::vector<double> row_loss;
  BMC_CPU_CALL(task_masked_kd_loss_kernel, s, t, off.const_data_ptr<int64_t>(),
               len.const_data_ptr<int64_t>(), temperature, scale, compute_grad ? grad : at::Tensor(), row_loss);
  const at::Tensor loss = reduce_rows(row_loss, red, static_cast<double>(N), student_logits.scalar_type());
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) { m.impl("task_masked_kd_loss", &task_masked_kd_loss_cpu); }
#endif  // BMC_CPU_HOST

}  // namespace bmc_fast::cpu
