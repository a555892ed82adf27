// See gemm.h. Host code only (the DEFAULT build).
#include "gemm.h"

#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/mm.h>
#include <c10/core/Scalar.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

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

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

// The BLAS operand of a [rows, K] matrix t (t or t^T in column-major terms): 'N' with ld =
// t.stride(0) when its rows are contiguous, 'T' with ld = t.stride(1) when its columns are;
// 0 when neither (or a leading dimension BLAS would reject).
char blas_op(const at::Tensor& t, int64_t* ld) {
  if (t.stride(1) == 1 && t.stride(0) >= t.size(1)) {
    *ld = t.stride(0);
    return 'N';
  }
  if (t.stride(0) == 1 && t.stride(1) >= t.size(0)) {
    *ld = t.stride(1);
    return 'T';
  }
  return 0;
}

std::atomic<bool> g_direct{true};  // set_direct_blas

// The sgemm call of c = a b^T + beta c, c [M, N] row-major contiguous: the call at::mm, at::addmm
// and addmm_ make for these layouts (the same arguments, so the same bits), without their
// dispatch, views and checks, which at the trainer's 64 rows cost a visible part of a product.
struct DirectGemm {
  SgemmFn sgemm;
  char trans_b, trans_a;
  int m, n, k, ld_b, ld_a;
};

// The direct call for a [M, K] and b [N, K], 2-D float32; none where it does not apply (then
// at::mm's route): sizes of 1 (at::mm special-cases them), other layouts, no sgemm, or a reduced
// float32 precision set for oneDNN's matmuls (which sends at::mm to oneDNN; set before the
// first product, it also fails the probe below and keeps the direct calls off).
std::optional<DirectGemm> direct_plan(const at::Tensor& a, const at::Tensor& b, SgemmFn sgemm) {
  if (sgemm == nullptr || a.dim() != 2 || b.dim() != 2 || a.scalar_type() != at::kFloat ||
      b.scalar_type() != at::kFloat || a.is_neg() || b.is_neg()) {
    return std::nullopt;
  }
  const at::Float32Precision reduced =
      at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  if (reduced == at::Float32Precision::BF16 || reduced == at::Float32Precision::TF32) return std::nullopt;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  if (M < 2 || N < 2 || K < 2 || std::max({M, N, K}) > INT_MAX / 2) return std::nullopt;
  int64_t lda = 0, ldb = 0;
  const char op_a = blas_op(a, &lda), op_b = blas_op(b, &ldb);
  if (op_a == 0 || op_b == 0 || std::max(lda, ldb) > INT_MAX) return std::nullopt;
  // In column-major terms c^T [N, M] = b [N, K] a^T [K, M]. A row-major operand is its
  // column-major transpose: a^T is a's as it lies ('N'), b is b's transposed ('T').
  return DirectGemm{sgemm, op_b == 'N' ? 'T' : 'N', op_a, static_cast<int>(N), static_cast<int>(M),
                    static_cast<int>(K), static_cast<int>(ldb), static_cast<int>(lda)};
}

void direct_nt(const DirectGemm& g, const at::Tensor& a, const at::Tensor& b, at::Tensor& c, float beta) {
  const float alpha = 1.0f;
  const int ldc = g.m;
  g.sgemm(&g.trans_b, &g.trans_a, &g.m, &g.n, &g.k, &alpha, b.const_data_ptr<float>(), &g.ld_b,
          a.const_data_ptr<float>(), &g.ld_a, &beta, c.mutable_data_ptr<float>(), &ldc);
}

// a b^T (+ bias) into a new tensor through the direct call, as at::mm (at::addmm: the bias
// copied into the output, then beta = 1).
at::Tensor direct_product(const DirectGemm& g, const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  if (bias != nullptr) out.copy_(bias->expand_as(out));
  direct_nt(g, a, b, out, bias != nullptr ? 1.0f : 0.0f);
  return out;
}

// The trainer's layouts through `sgemm` and through at::mm / addmm / addmm_, on fixed inputs
// (torch's random generator is left alone): whether every result has the same bits. A torch
// whose at::mm takes another route (another BLAS than the one found, a build without BLAS) fails
// it, and the direct calls stay off.
bool probe_matches_at_mm(SgemmFn sgemm) {
  const at::NoGradGuard no_grad;
  const auto values = [](int64_t rows, int64_t cols, double phase) {
    return at::arange(rows * cols, at::TensorOptions().dtype(at::kFloat)).mul_(0.37).add_(phase).sin_().view(
        {rows, cols});
  };
  const at::Tensor x = values(9, 24, 0.1), w = values(12, 24, 0.2), g = values(9, 12, 0.3), bias = values(1, 12, 0.4);
  const at::Tensor wide = values(9, 30, 0.5), w2 = values(20, 24, 0.6);
  // (a, b) of c = a b^T: forward, weight gradient g^T x, input gradient g W, narrowed views.
  const std::pair<at::Tensor, at::Tensor> cases[] = {
      {x, w}, {g.t(), x.t()}, {g, w.t()}, {wide.narrow(1, 3, 20), w2.t()}};
  for (const auto& [a, b] : cases) {
    const auto plan = direct_plan(a, b, sgemm);
    if (!plan) return false;
    const at::Tensor c = direct_product(*plan, a, b, nullptr);
    if (!at::equal(c, at::mm(a, b.t()))) return false;
    at::Tensor acc = c.clone();
    direct_nt(*plan, a, b, acc, 1.0f);
    if (!at::equal(acc, c.clone().addmm_(a, b.t()))) return false;
  }
  const at::Tensor b1 = bias.view({12});
  return at::equal(direct_product(*direct_plan(x, w, sgemm), x, w, &b1), at::addmm(b1, x, w.t()));
}

// The BLAS sgemm (Fortran interface) that at::mm calls for float32 on the CPU: the one the
// dynamic linker gives torch's own call (the global scope first, so a preloaded BLAS too), else
// the one in the loaded libtorch_cpu (MKL's in torch's wheels). Null where there is none, off
// x86 (on aarch64 at::mm sends some float32 products to oneDNN/ACL), or where a first probe finds
// other bits than at::mm's.
SgemmFn blas_sgemm() {
  static const SgemmFn fn = []() -> SgemmFn {
#if defined(__x86_64__) || defined(_M_X64)
    void* sym = dlsym(RTLD_DEFAULT, "sgemm_");
    if (sym == nullptr) {
      void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
      sym = lib != nullptr ? dlsym(lib, "sgemm_") : nullptr;
    }
    const auto f = reinterpret_cast<SgemmFn>(sym);
    return f != nullptr && probe_matches_at_mm(f) ? f : nullptr;
#else
    return nullptr;
#endif
  }();
  return fn;
}

// The direct call of a b^T unless set_direct_blas turned them off.
std::optional<DirectGemm> direct_for(const at::Tensor& a, const at::Tensor& b) {
  if (!g_direct.load(std::memory_order_relaxed)) return std::nullopt;
  return direct_plan(a, b, blas_sgemm());
}

at::Tensor mkl_nt(const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  if (a.dim() == 2) {
    if (const auto plan = direct_for(a, b)) return direct_product(*plan, a, b, bias);
    return bias != nullptr ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
  }
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

bool direct_blas() { return blas_sgemm() != nullptr && g_direct.load(); }

bool set_direct_blas(bool on) { return g_direct.exchange(on); }

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
    const auto plan = direct_for(a, b);
    if (plan && acc.is_contiguous() && acc.sizes() == at::IntArrayRef({a.size(0), b.size(0)})) {
      direct_nt(*plan, a, b, acc, 1.0f);
      return;
    }
    acc.addmm_(a, b.t());
  } else {
    acc.baddbmm_(a, b.transpose(1, 2));
  }
}

}  // namespace bmc_fast::cpu
