// Torch-free device helpers shared by every CUDA kernel: dtype conversion, warp and block
// reductions in a fixed order (deterministic), launch geometry. Compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/bmc_hd.h"

namespace bmc_fast::cuda {

constexpr int kWarp = 32;
constexpr int kBlock = 256;  // threads per block of every kernel; block reductions assume it

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(double x) { return __double2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double x) { return __double2bfloat16(x); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// NaN-propagating max, as torch.max.
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) { return (b > a || b != b) ? b : a; }

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of kBlock threads, in a fixed order; the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A shared[kBlock / kWarp];
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kBlock / kWarp; ++w) total += shared[w];
  __syncthreads();
  return total;
}

// out = sum(in[0, n)) / divisor, cast to T; the divisor is read from device memory when
// `divisor` is not null (so the host need not wait for it), else it is `host_divisor`. One block,
// fixed order: deterministic. 0/0 gives NaN, as torch's mean of nothing.
template <typename T>
__global__ void sum_to_scalar_kernel(const float* in, int64_t n, const float* divisor,
                                     double host_divisor, T* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) acc += static_cast<double>(in[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = from_acc<T>(acc / (divisor != nullptr ? static_cast<double>(*divisor) : host_divisor));
}

// out[i] = T(in[i]).
template <typename T>
__global__ void cast_kernel(const float* in, int64_t n, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (i < n) out[i] = from_acc<T>(in[i]);
}

inline unsigned int blocks_for(int64_t n, int64_t per_block) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned int>(b < 1 ? 1 : b);
}

}  // namespace bmc_fast::cuda
