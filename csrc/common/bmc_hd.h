// BMC_HD marks row math shared by the CPU kernels (g++) and the CUDA kernels (nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BMC_HD __host__ __device__ __forceinline__
#else
#define BMC_HD inline
#endif
