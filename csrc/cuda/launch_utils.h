// Host helpers of the CUDA launchers: dtype mapping to CUDA types, the data checks (one host sync
// per checked tensor; the metadata checks and every message are common/checks.h's), and the
// per-expert weights in the accumulation dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/all.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/isfinite.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/checks.h"
#include "../common/reduction.h"

namespace bmc_fast::cuda {

template <typename S> struct CudaType { using type = S; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename S>
const typename CudaType<S>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<S>::type*>(t.const_data_ptr<S>());
}
template <typename S>
typename CudaType<S>::type* mptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<typename CudaType<S>::type*>(t.mutable_data_ptr<S>())
                                      : nullptr;
}

// True while the current stream is being captured into a CUDA graph (torch.compile
// mode="reduce-overhead", torch.cuda.graphs): the data-dependent argument checks need a host sync,
// which capture forbids, so they are skipped then (the shapes, dtypes and devices are still
// checked). Run the op once eagerly, as warm-up before capture does, to get the data checks.
inline bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

inline int reduction_code(Reduction r) { return r == Reduction::None ? 0 : (r == Reduction::Sum ? 1 : 2); }

// Per-expert weights [K] beside `ref` in the accumulation dtype, checked finite (one sync);
// undefined if absent.
inline at::Tensor checked_weights(const std::optional<at::Tensor>& weights, int64_t K, const at::Tensor& ref,
                                  const char* ref_name, at::ScalarType acc) {
  if (!weights.has_value()) return at::Tensor();
  const at::Tensor& w = *weights;
  check_expert_weights(w, K, ref, ref_name);
  TORCH_CHECK_VALUE(capturing() || at::isfinite(w).all().item<bool>(), kWeightsFinite);
  return w.to(acc).contiguous();
}

}  // namespace bmc_fast::cuda
