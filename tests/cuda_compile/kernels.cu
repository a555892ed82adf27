// nvcc-only compile check of every bmc_fast CUDA kernel (no torch, no GPU needed): each kernel
// template is instantiated for float, double, __half and __nv_bfloat16. Built by
// tests/cuda_compile/check.sh (CI) and by the bmc_fast_cuda_check CMake target.
#include "cuda/masked_softmax_kernels.cuh"
#include "cuda/sqdiff_kernels.cuh"

namespace bmc_fast::cuda {

#define BMC_INSTANTIATE(T)                                                                        \
  template __global__ void sqdiff_chunks_kernel<T>(const T*, const T*, int64_t, const acc_t<T>*,  \
                                                   int64_t, int64_t, int64_t, const acc_t<T>*, T*, \
                                                   acc_t<T>*);                                    \
  template __global__ void expert_finalize_kernel<T>(const acc_t<T>*, int64_t, int64_t, double,   \
                                                     const acc_t<T>*, int, acc_t<T>*, T*);        \
  template __global__ void sqdiff_rows_kernel<T>(const T*, const T*, const int64_t*, int64_t,     \
                                                 int64_t, int64_t, const acc_t<T>*, T*, acc_t<T>*); \
  template __global__ void distillation_finalize_kernel<T>(const acc_t<T>*, int64_t,             \
                                                           const acc_t<T>*, int, const float*, T*); \
  template __global__ void masked_ce_rows_kernel<T>(const T*, const int64_t*, const int64_t*,     \
                                                    const int64_t*, int64_t, int64_t, int64_t,    \
                                                    const float*, T*, float*);                    \
  template __global__ void masked_kd_rows_kernel<T>(const T*, const T*, const int64_t*,           \
                                                    const int64_t*, int64_t, int64_t, acc_t<T>,   \
                                                    acc_t<T>, T*, float*);                        \
  template __global__ void sum_to_scalar_kernel<T>(const float*, int64_t, const float*, double, T*); \
  template __global__ void cast_kernel<T>(const float*, int64_t, T*);

BMC_INSTANTIATE(float)
BMC_INSTANTIATE(double)
BMC_INSTANTIATE(__half)
BMC_INSTANTIATE(__nv_bfloat16)

template __global__ void count_ids_kernel<int64_t>(const int64_t*, int64_t, int64_t, int*);
template __global__ void expert_scale_kernel<float>(const int*, int64_t, int64_t, const float*, int, float*, float*);
template __global__ void expert_scale_kernel<double>(const int*, int64_t, int64_t, const double*, int, double*, float*);
template __global__ void segment_mean_kernel<float>(const float*, const int64_t*, int64_t, int64_t, const int*, float*);
template __global__ void segment_mean_kernel<double>(const double*, const int64_t*, int64_t, int64_t, const int*, double*);

}  // namespace bmc_fast::cuda
