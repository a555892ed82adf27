// task_masked_cross_entropy on the CPU: each row's softmax over its own task range.
//
// Rows in parallel, each by one thread: max and sum of exp over the range (two reads of a span
// that stays in cache), then the gradient row: softmax * scale inside the range, zeros outside,
// the label's entry (p - 1) * scale computed in float before rounding. No masked copy of the
// logits is made.
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

BMC_CPU_DECLARE_KERNEL(void, task_masked_cross_entropy_kernel, const at::Tensor&, const int64_t*,
                       const int64_t*, const int64_t*, int64_t, double, const at::Tensor&,
                       std::vector<double>&)

inline namespace CPU_CAPABILITY {

void task_masked_cross_entropy_kernel(const at::Tensor& logits, const int64_t* labels,
                                      const int64_t* off, const int64_t* len, int64_t ignore_index,
                                      double grad_scale, const at::Tensor& grad,
                                      std::vector<double>& row_loss) {
  const int64_t N = logits.size(0), C = logits.size(1);
  row_loss.assign(static_cast<size_t>(N), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "task_masked_cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t scale = static_cast<acc_t>(grad_scale);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, C));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* gi = g == nullptr ? nullptr : g + i * C;
        if (labels[i] == ignore_index) {
          if (gi != nullptr) zero_span(gi, C);
          continue;
        }
        const int64_t o = off[i], l = len[i], y = labels[i] - o;
        const scalar_t* xi = x + i * C + o;
        // Work relative to the max m: logsumexp - x_y = log(sum) + (m - x_y) and
        // softmax = exp(x - m) / sum stay accurate when |logits| ~ 1e4, where m + log(sum)
        // would already be rounded to a float32 ulp of 1e4.
        const acc_t m = span_max(xi, l);
        const acc_t sum = span_sumexp(xi, l, m, acc_t(1));
        const acc_t xy = static_cast<acc_t>(xi[y]);
        row_loss[i] = ce_row_loss(std::log(sum), xy - m);
        if (gi != nullptr) {
          zero_span(gi, o);
          span_exp_store(xi, l, m, acc_t(1), scale / sum, gi + o);
          gi[o + y] = static_cast<scalar_t>(ce_grad(std::exp(xy - m) / sum, true, scale));
          zero_span(gi + o + l, C - o - l);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY

#ifdef BMC_CPU_HOST
std::tuple<at::Tensor, at::Tensor> task_masked_cross_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& task_offset,
    const at::Tensor& task_len, c10::string_view reduction, int64_t ignore_index, bool compute_grad) {
  const Reduction red = parse_reduction(reduction);
  check_floating(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must have shape [N, C], got ", logits.sizes());
  const int64_t N = logits.size(0);
  check_row_ids(labels, logits, N, "labels", "logits");
  const auto [off, len] = checked_task_ranges(task_offset, task_len, logits, "logits");
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* y = lab.const_data_ptr<int64_t>();
  const int64_t* o = off.const_data_ptr<int64_t>();
  const int64_t* l = len.const_data_ptr<int64_t>();
  int64_t counted = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(y[i] >= o[i] && y[i] < o[i] + l[i], kLabelRule, ", got ", y[i], " at row ", i, " (range [",
                      o[i], ", ", o[i] + l[i], "))");
    ++counted;
  }
  // "mean" of no counted row is 0/0 = NaN (as torch's cross_entropy); its gradient is then 0.
  const double scale = red == Reduction::Mean ? (counted > 0 ? 1.0 / counted : 0.0) : 1.0;

  const at::Tensor x = logits.contiguous();
  at::Tensor grad = compute_grad ? empty_output_like(x) : at::empty({0}, logits.options());
  std::vector<double> row_loss;
  BMC_CPU_CALL(task_masked_cross_entropy_kernel, x, y, o, l, ignore_index, scale,
               compute_grad ? grad : at::Tensor(), row_loss);
  const at::Tensor loss = reduce_rows(row_loss, red, static_cast<double>(counted), logits.scalar_type());
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) { m.impl("task_masked_cross_entropy", &task_masked_cross_entropy_cpu); }
#endif  // BMC_CPU_HOST

}  // namespace bmc_fast::cpu
