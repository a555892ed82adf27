// adamw_step on the CPU: one AdamW update over a list of parameter tensors in one parallel pass.
//
// The per-element math is torch.optim.AdamW's (amsgrad and maximize off):
//   p -= lr * wd * p;  m += (1 - beta1) * (g - m);  v = beta2 * v + (1 - beta2) * g * g
//   p -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// computed in the parameter's dtype (float32 or float64). Work items are fixed-size chunks of
// the tensors, so one parallel region covers every tensor (torch's fused kernel and the
// optimizer's per-group Python cost more than the update at the trainer's sizes).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_dispatch.h"
#ifdef BMC_CPU_HOST
#include <torch/library.h>

#include "adamw.h"
#include "host_utils.h"
#endif

namespace bmc_fast::cpu {

inline namespace CPU_CAPABILITY {}

struct AdamChunk {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  int64_t n;
};

struct AdamHyper {
  double lr, beta1, beta2, weight_decay, eps, bias_correction1, bias_correction2_sqrt;
};

BMC_CPU_DECLARE_KERNEL(void, adamw_kernel, at::ScalarType, const std::vector<AdamChunk>&, const AdamHyper&)

inline namespace CPU_CAPABILITY {

template <typename T>
void adamw_impl(const std::vector<AdamChunk>& chunks, const AdamHyper& h) {
  const T decay = static_cast<T>(1.0 - h.lr * h.weight_decay);
  const T one_minus_b1 = static_cast<T>(1.0 - h.beta1);
  const T b2 = static_cast<T>(h.beta2), one_minus_b2 = static_cast<T>(1.0 - h.beta2);
  const T step_size = static_cast<T>(h.lr / h.bias_correction1);
  const T inv_bc2_sqrt = static_cast<T>(1.0 / h.bias_correction2_sqrt);
  const T eps = static_cast<T>(h.eps);
  // One task per thread, each a run of consecutive chunks holding an equal share of the
  // elements. (A parallel_for over the chunks would split them by count: with the big weight
  // matrices first and the small vectors last, as the fused ResMLP lists them, one thread would
  // get most of the elements.) The update is elementwise: the split does not change any value.
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  std::vector<int64_t> first(static_cast<size_t>(tasks + 1), n_chunks);  // task t: chunks [first[t], first[t + 1])
  {
    int64_t total = 0;
    for (const AdamChunk& ch : chunks) total += ch.n;
    int64_t seen = 0, t = 0;
    first[0] = 0;
    for (int64_t c = 0; c < n_chunks && t + 1 < tasks; ++c) {
      seen += chunks[c].n;
      while (t + 1 < tasks && seen * tasks >= total * (t + 1)) first[++t] = c + 1;
    }
  }
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t c = first[task_begin]; c < first[task_end]; ++c) {
      const AdamChunk& ch = chunks[c];
      T* __restrict__ p = static_cast<T*>(ch.param);
      const T* __restrict__ g = static_cast<const T*>(ch.grad);
      T* __restrict__ m = static_cast<T*>(ch.exp_avg);
      T* __restrict__ v = static_cast<T*>(ch.exp_avg_sq);
      const T decay_l = decay, omb1 = one_minus_b1, b2_l = b2, omb2 = one_minus_b2, ss = step_size,
              ibc2 = inv_bc2_sqrt, eps_l = eps;
      for (int64_t i = 0; i < ch.n; ++i) {
        const T gi = g[i];
        const T mi = m[i] + omb1 * (gi - m[i]);
        const T vi = b2_l * v[i] + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay_l - ss * mi / (std::sqrt(vi) * ibc2 + eps_l);
      }
    }
  });
}

void adamw_kernel(at::ScalarType dtype, const std::vector<AdamChunk>& chunks, const AdamHyper& h) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "adamw_cpu", [&] { adamw_impl<scalar_t>(chunks, h); });
}

}  // namespace CPU_CAPABILITY

#ifdef BMC_CPU_HOST
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item (4 arrays of 64 KB in float32)

void check_list(at::TensorList t, at::TensorList like, const char* name) {
  TORCH_CHECK_VALUE(t.size() == like.size(), name, " must hold ", like.size(), " tensors like params, got ",
                    t.size());
  for (size_t i = 0; i < t.size(); ++i) {
    check_cpu(t[i], name);
    TORCH_CHECK_TYPE(t[i].scalar_type() == like[i].scalar_type(), name, "[", i, "] must have the dtype of params[", i,
                     "] (", like[i].scalar_type(), "), got ", t[i].scalar_type());
    TORCH_CHECK_VALUE(t[i].sizes() == like[i].sizes(), name, "[", i, "] must have the shape of params[", i, "] ",
                      like[i].sizes(), ", got ", t[i].sizes());
  }
}

}  // namespace

void check_adamw_hyper(double lr, double beta1, double beta2, double weight_decay, double eps, int64_t step) {
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay must be a finite number >= 0, got ",
                    weight_decay);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be a finite number > 0, got ", eps);
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (the step being taken), got ", step);
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    double lr, double beta1, double beta2, double weight_decay, double eps, int64_t step) {
  check_adamw_hyper(lr, beta1, beta2, weight_decay, eps, step);
  for (size_t i = 0; i < params.size(); ++i) {
    check_cpu(params[i], "params");
    TORCH_CHECK_TYPE(params[i].scalar_type() == at::kFloat || params[i].scalar_type() == at::kDouble,
                     "params must be float32 or float64 tensors, got ", params[i].scalar_type(), " at index ", i);
    TORCH_CHECK_TYPE(params[i].scalar_type() == params[0].scalar_type(), "params must share one dtype, got ",
                     params[0].scalar_type(), " and ", params[i].scalar_type(), " at index ", i);
    TORCH_CHECK_VALUE(params[i].is_contiguous(), "params[", i, "] must be contiguous");
  }
  check_list(grads, params, "grads");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (params.empty()) return;

  std::vector<at::Tensor> keep;  // contiguous copies of non-contiguous gradients
  std::vector<AdamChunk> chunks;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(exp_avgs[i].is_contiguous() && exp_avg_sqs[i].is_contiguous(), "exp_avgs[", i,
                      "] and exp_avg_sqs[", i, "] must be contiguous");
    keep.push_back(grads[i].contiguous());
    const int64_t n = params[i].numel(), es = params[i].element_size();
    char* p = static_cast<char*>(params[i].mutable_data_ptr());
    const char* g = static_cast<const char*>(keep.back().const_data_ptr());
    char* m = static_cast<char*>(exp_avgs[i].mutable_data_ptr());
    char* v = static_cast<char*>(exp_avg_sqs[i].mutable_data_ptr());
    for (int64_t a = 0; a < n; a += kChunk) {
      const int64_t off = a * es;
      chunks.push_back({p + off, g + off, m + off, v + off, std::min(kChunk, n - a)});
    }
  }
  const double t = static_cast<double>(step);
  const AdamHyper h{lr, beta1, beta2, weight_decay, eps, 1.0 - std::pow(beta1, t), std::sqrt(1.0 - std::pow(beta2, t))};
  BMC_CPU_CALL(adamw_kernel, params[0].scalar_type(), chunks, h);
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) { m.impl("adamw_step", &adamw_step_cpu); }
#endif  // BMC_CPU_HOST

}  // namespace bmc_fast::cpu
