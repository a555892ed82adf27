// Torch-free CUDA kernels of the task-masked losses (task_masked_cross_entropy,
// task_masked_kd_loss). Row math from common/masked_softmax_math.h.
#pragma once

#include "../common/masked_softmax_math.h"
#include "cuda_common.cuh"

namespace bmc_fast::cuda {

// exp in the accumulation type.
__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return __logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

// Max and sum of exp((x - max) * mul) over x[0, l), by the 32 lanes of a warp (lane-strided
// elements, then shuffles); every lane gets the result.
template <typename T>
__device__ __forceinline__ void warp_max_sumexp(const T* x, int64_t l, acc_t<T> mul, acc_t<T>& m, acc_t<T>& s) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  A lm = -INFINITY;
  for (int64_t j = lane; j < l; j += kWarp) lm = nan_max(lm, to_acc(x[j]));
  m = warp_max(lm);
  A ls = 0;
  for (int64_t j = lane; j < l; j += kWarp) ls += acc_exp((to_acc(x[j]) - m) * mul);
  s = warp_sum(ls);
}

// One warp per row of [N, C] logits. Ignored rows (label == ignore_index) give 0 and a zero
// gradient row. Otherwise row_loss = log(sum) + max - x_y over the range [o, o + l), and the
// gradient row is softmax * scale inside the range (label entry (p - 1) * scale, formed in
// float), 0 outside. scale = 1 or, for "mean", 1 / *count (0 when count is 0).
template <typename T>
__global__ void masked_ce_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ labels,
                                      const int64_t* __restrict__ off, const int64_t* __restrict__ len,
                                      int64_t N, int64_t C, int64_t ignore_index, const float* __restrict__ count,
                                      T* __restrict__ grad, float* __restrict__ row_loss) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kBlock / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  T* g = grad != nullptr ? grad + row * C : nullptr;
  const int64_t y = labels[row];
  if (y == ignore_index) {
    if (lane == 0) row_loss[row] = 0.f;
    if (g != nullptr)
      for (int64_t j = lane; j < C; j += kWarp) g[j] = from_acc<T>(A(0));
    return;
  }
  const int64_t o = off[row], l = len[row];
  const T* xr = x + row * C;
  if (o < 0 || l < 1 || o + l > C || y < o || y >= o + l) {  // unchecked only during graph capture
    if (lane == 0) row_loss[row] = NAN;
    if (g != nullptr)
      for (int64_t j = lane; j < C; j += kWarp) g[j] = from_acc<T>(A(NAN));
    return;
  }
  A m, s;
  warp_max_sumexp(xr + o, l, A(1), m, s);
  const A xy = to_acc(xr[y]);
  if (lane == 0) row_loss[row] = static_cast<float>(ce_row_loss(acc_log(s), xy - m));
  if (g == nullptr) return;
  const A scale = count != nullptr ? (*count > 0.f ? A(1) / static_cast<A>(*count) : A(0)) : A(1);
  const A inv_s = A(1) / s;
  for (int64_t j = lane; j < C; j += kWarp) {
    A v = 0;
    if (j >= o && j < o + l) v = ce_grad(acc_exp(to_acc(xr[j]) - m) * inv_s, j == y, scale);
    g[j] = from_acc<T>(v);
  }
}

// One warp per row: tau^2 KL(p_t || p_s) over the range and, with grad, tau (p_s - p_t) * scale
// inside the range, 0 outside (scale = 1, or 1/N for "mean").
template <typename T>
__global__ void masked_kd_rows_kernel(const T* __restrict__ s, const T* __restrict__ t,
                                      const int64_t* __restrict__ off, const int64_t* __restrict__ len,
                                      int64_t N, int64_t C, acc_t<T> tau, acc_t<T> scale,
                                      T* __restrict__ grad, float* __restrict__ row_loss) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kBlock / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t o = off[row], l = len[row];
  if (o < 0 || l < 1 || o + l > C) {  // unchecked only during graph capture
    if (lane == 0) row_loss[row] = NAN;
    if (grad != nullptr)
      for (int64_t j = lane; j < C; j += kWarp) grad[row * C + j] = from_acc<T>(A(NAN));
    return;
  }
  const T* sr = s + row * C + o;
  const T* tr = t + row * C + o;
  const A inv_tau = A(1) / tau;
  A ms, ss, mt, st;
  warp_max_sumexp(sr, l, inv_tau, ms, ss);
  warp_max_sumexp(tr, l, inv_tau, mt, st);
  const A ls = acc_log(ss), lt = acc_log(st);
  T* g = grad != nullptr ? grad + row * C : nullptr;
  A kl = 0;
  for (int64_t j = lane; j < l; j += kWarp) {
    const A lps = (to_acc(sr[j]) - ms) * inv_tau - ls;
    const A lpt = (to_acc(tr[j]) - mt) * inv_tau - lt;
    const A pt = acc_exp(lpt);
    kl += kd_term(lpt, lps, pt);
    if (g != nullptr) g[o + j] = from_acc<T>(kd_grad(acc_exp(lps), pt, tau, scale));
  }
  kl = warp_sum(kl);
  if (lane == 0) row_loss[row] = static_cast<float>(tau * tau * kl);
  if (g != nullptr) {
    for (int64_t j = lane; j < o; j += kWarp) g[j] = from_acc<T>(A(0));
    for (int64_t j = o + l + lane; j < C; j += kWarp) g[j] = from_acc<T>(A(0));
  }
}

}  // namespace bmc_fast::cuda
