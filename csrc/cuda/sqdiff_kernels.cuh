// Torch-free CUDA kernels of the squared-difference losses (stability_loss,
// weight_stability_loss, batched_distillation_loss). Element math from common/sqdiff_math.h.
#pragma once

#include "../common/sqdiff_math.h"
#include "cuda_common.cuh"

namespace bmc_fast::cuda {

enum ReductionCode : int { kNone = 0, kSum = 1, kMean = 2 };

// Each block reduces one chunk of `chunk` elements of one row k (block t = k * nc + c) of an
// [K, M] input: partial[t] = sum w_m (a - b)^2, and with grad writes row_scale[k] * w_m * (a - b).
// b has row stride b_stride (M, or 0 to broadcast one row); w is null for all-ones. Chunks are
// fixed, and partials are added in chunk order by expert_finalize_kernel: deterministic.
template <typename T>
__global__ void sqdiff_chunks_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t b_stride,
                                     const acc_t<T>* __restrict__ w, int64_t M, int64_t nc, int64_t chunk,
                                     const acc_t<T>* __restrict__ row_scale, T* __restrict__ grad,
                                     acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  const int64_t t = blockIdx.x;
  const int64_t k = t / nc, start = (t % nc) * chunk;
  const int64_t end = start + chunk < M ? start + chunk : M;
  const A scale = grad != nullptr ? row_scale[k] : A(0);
  const T* ak = a + k * M;
  const T* bk = b + k * b_stride;
  A acc = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += kBlock) {
    const A ai = to_acc(ak[i]), bi = to_acc(bk[i]);
    const A wi = w != nullptr ? w[i] : A(1);
    acc += sqdiff_term(ai, bi, wi);
    if (grad != nullptr) grad[k * M + i] = from_acc<T>(sqdiff_grad(ai, bi, wi, scale));
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[t] = acc;
}

// One block. per_expert[k] = (sum over chunks c, in order, of partial[k * nc + c]) * inv_m;
// the loss from the weighted terms w_k * per_expert[k]: [K] for none, else their sum (divided
// by K for mean; 0 when K = 0).
template <typename T>
__global__ void expert_finalize_kernel(const acc_t<T>* __restrict__ partial, int64_t K, int64_t nc,
                                       double inv_m, const acc_t<T>* __restrict__ w, int reduction,
                                       acc_t<T>* __restrict__ per_expert, T* __restrict__ loss) {
  using A = acc_t<T>;
  for (int64_t k = threadIdx.x; k < K; k += kBlock) {
    double s = 0.0;
    for (int64_t c = 0; c < nc; ++c) s += static_cast<double>(partial[k * nc + c]);
    per_expert[k] = static_cast<A>(s * inv_m);
    if (reduction == kNone) loss[k] = from_acc<T>((w != nullptr ? w[k] : A(1)) * static_cast<A>(s * inv_m));
  }
  __syncthreads();
  if (reduction != kNone && threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k)
      total += static_cast<double>(w != nullptr ? w[k] : A(1)) * static_cast<double>(per_expert[k]);
    if (reduction == kMean) total = K > 0 ? total / static_cast<double>(K) : 0.0;
    *loss = from_acc<T>(total);
  }
}

// counts[e] = number of rows with ids[i] == e (integer atomics: exact and order-free). Ids out of
// [0, E) are never dereferenced (the host checks them, except during CUDA-graph capture).
template <typename I>
__global__ void count_ids_kernel(const I* __restrict__ ids, int64_t n, int64_t E, int* __restrict__ counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (i < n && ids[i] >= 0 && ids[i] < E) atomicAdd(counts + ids[i], 1);
}

// One block. present = number of experts with a sample; scale[e] = 2 w_e f / (count_e D) with
// f = 1/present for mean (else 1), 0 for an empty expert.
template <typename A>
__global__ void expert_scale_kernel(const int* __restrict__ counts, int64_t E, int64_t D,
                                    const A* __restrict__ w, int reduction, A* __restrict__ scale,
                                    float* __restrict__ present_out) {
  __shared__ int present;
  if (threadIdx.x == 0) {
    int p = 0;
    for (int64_t e = 0; e < E; ++e) p += counts[e] > 0;
    present = p;
    *present_out = static_cast<float>(p);
  }
  __syncthreads();
  const A factor = mean_factor<A>(reduction == kMean, present);
  for (int64_t e = threadIdx.x; e < E; e += kBlock)
    scale[e] = counts[e] > 0 && D > 0
        ? A(2) * (w != nullptr ? w[e] : A(1)) * factor / (static_cast<A>(counts[e]) * static_cast<A>(D))
        : A(0);
}

// One warp per row i of [N, D]: row_sum[i] = sum_d (s - t)^2 and, with grad,
// grad = scale[ids[i]] * (s - t).
template <typename T>
__global__ void sqdiff_rows_kernel(const T* __restrict__ s, const T* __restrict__ t, const int64_t* __restrict__ ids,
                                   int64_t N, int64_t D, int64_t E, const acc_t<T>* __restrict__ scale,
                                   T* __restrict__ grad, acc_t<T>* __restrict__ row_sum) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kBlock / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t e = ids[row];
  const A sc = grad != nullptr && e >= 0 && e < E ? scale[e] : A(0);
  const T* sr = s + row * D;
  const T* tr = t + row * D;
  A acc = 0;
  for (int64_t j = lane; j < D; j += kWarp) {
    const A a = to_acc(sr[j]), b = to_acc(tr[j]);
    acc += sqdiff_term(a, b, A(1));
    if (grad != nullptr) grad[row * D + j] = from_acc<T>(sqdiff_grad(a, b, A(1), sc));
  }
  acc = warp_sum(acc);
  if (lane == 0) row_sum[row] = acc;
}

// One block per expert e: the sum of row_sum over the rows of expert e, in a fixed order
// (thread-strided, then block_sum), divided by count_e * D: per_expert[e] (0 when empty).
template <typename A>
__global__ void segment_mean_kernel(const A* __restrict__ row_sum, const int64_t* __restrict__ ids, int64_t N,
                                    int64_t D, const int* __restrict__ counts, A* __restrict__ per_expert) {
  const int64_t e = blockIdx.x;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kBlock)
    if (ids[i] == e) acc += static_cast<double>(row_sum[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0)
    per_expert[e] = counts[e] > 0 && D > 0 ? static_cast<A>(acc / (static_cast<double>(counts[e]) * D)) : A(0);
}

// One block: the loss of batched_distillation_loss from per_expert and weights.
template <typename T>
__global__ void distillation_finalize_kernel(const acc_t<T>* __restrict__ per_expert, int64_t E,
                                             const acc_t<T>* __restrict__ w, int reduction,
                                             const float* __restrict__ present, T* __restrict__ loss) {
  using A = acc_t<T>;
  if (reduction == kNone) {
    for (int64_t e = threadIdx.x; e < E; e += kBlock)
      loss[e] = from_acc<T>((w != nullptr ? w[e] : A(1)) * per_expert[e]);
    return;
  }
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t e = 0; e < E; ++e)
      total += static_cast<double>(w != nullptr ? w[e] : A(1)) * static_cast<double>(per_expert[e]);
    if (reduction == kMean) total = *present > 0 ? total / static_cast<double>(*present) : 0.0;
    *loss = from_acc<T>(total);
  }
}

}  // namespace bmc_fast::cuda
