// See gemm.h. Host code only (the DEFAULT build).
#include "gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/Scalar.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

namespace bmc_fast::cpu {

namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   std::string_view, c10::List<std::optional<at::Scalar>>,
                                   std::optional<std::string_view>);

// torch's mkldnn::_linear_pointwise (X W^T + B through oneDNN), when this torch was built with it.
const c10::TypedOperatorHandle<LinearPointwise>* linear_pointwise() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return std::nullopt;
    try {
      return handle->typed<LinearPointwise>();
    } catch (const c10::Error&) {  // another schema in some torch release: stay on MKL
      return std::nullopt;
    }
  }();
  return op.has_value() ? &*op : nullptr;
}

bool decide(const std::string& mode, const char* what) {
  TORCH_CHECK_VALUE(mode == "auto" || mode == "onednn" || mode == "mkl", what,
                    " must be 'auto', 'onednn' or 'mkl', got '", mode, "'");
  if (mode == "mkl" || linear_pointwise() == nullptr) return false;
  if (mode == "onednn") return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_is("amd") && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

std::atomic<int> g_choice{-1};  // 1: oneDNN, 0: MKL, -1: not decided yet

bool use_onednn(const at::Tensor& a, const at::Tensor& b) {
  const int64_t macs = a.size(-2) * a.size(-1) * b.size(-2);
  return a.scalar_type() == at::kFloat && macs >= kMinOnednnMacs && onednn_matmul();
}

at::Tensor mkl_nt(const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  if (a.dim() == 2) return bias != nullptr ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
  return bias != nullptr ? at::baddbmm(bias->unsqueeze(1), a, b.transpose(1, 2)) : at::bmm(a, b.transpose(1, 2));
}

at::Tensor onednn_nt(const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  return linear_pointwise()->call(a, b, bias != nullptr ? std::optional<at::Tensor>(*bias) : std::nullopt, "none",
                                  c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

}  // namespace

bool onednn_matmul() {
  int v = g_choice.load(std::memory_order_relaxed);
  if (v < 0) {  // two threads deciding at once decide the same
    const char* env = std::getenv("BMC_FAST_MATMUL");
    v = decide(env == nullptr ? "auto" : env, "BMC_FAST_MATMUL") ? 1 : 0;
    g_choice.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

int64_t onednn_min_macs() { return kMinOnednnMacs; }

void set_cpu_matmul(const std::string& mode) { g_choice.store(decide(mode, "mode") ? 1 : 0); }

at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  if (!use_onednn(a, b)) return mkl_nt(a, b, bias);
  if (a.dim() == 2) return onednn_nt(a, b, bias);
  // Stacked models: one product per model, written into one [S, M, N] result.
  const int64_t S = a.size(0);
  at::Tensor out = at::empty({S, a.size(1), b.size(1)}, a.options());
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor bs = bias != nullptr ? bias->select(0, s) : at::Tensor();
    out.select(0, s).copy_(onednn_nt(a.select(0, s), b.select(0, s), bias != nullptr ? &bs : nullptr));
  }
  return out;
}

void matmul_nt_add_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (use_onednn(a, b)) {
    acc.add_(matmul_nt(a, b));
  } else if (a.dim() == 2) {
    acc.addmm_(a, b.t());
  } else {
    acc.baddbmm_(a, b.transpose(1, 2));
  }
}

}  // namespace bmc_fast::cpu
