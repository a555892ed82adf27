// bn_relu_dropout on the CPU: the normalisation, activation and dropout of a (stacked) ResMLP
// layer in one pass, and its backward in two.
//
// Layout [K, B, C] (K stacked models, B rows, C channels, C contiguous). Forward: one pass for
// per-channel partial sums over chunks of rows, a small combine, one pass that writes every
// output. Backward: the same shape. The inner loops run over contiguous channels and are plain
// enough for the compiler to vectorise in each CPU build (DEFAULT, AVX2, AVX-512).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <vector>

#include "../common/dropout_hash.h"
#include "cpu_dispatch.h"
#ifdef BMC_CPU_HOST
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "bn_relu_dropout.h"
#include "host_utils.h"
#endif

namespace bmc_fast::cpu {

// The kernels below live in `inline namespace CPU_CAPABILITY` (one copy per CPU build); it must
// be declared inline before BMC_CPU_DECLARE_KERNEL names its DEFAULT/AVX2/AVX512 copies.
inline namespace CPU_CAPABILITY {}

constexpr int64_t kMaxBranches = 4;

// Pointers of one normalised input (a "branch"): outputs are summed over branches before ReLU.
struct BnBranch {
  const void* a;           // [K, B, C] input
  const void* weight;      // [K, C]
  const void* bias;        // [K, C]
  const void* pre_bias;    // [K, C] or null: added to the input before the BN (cancels in it)
  void* xhat;              // [K, B, C] out: the normalised input
  void* invstd;            // [K, C] out
  void* mean;              // [K, C] out: batch mean + pre_bias
  void* var;               // [K, C] out: unbiased batch variance
};

struct BnGradBranch {
  const void* xhat;
  const void* invstd;
  const void* weight;
  void* grad_input;        // [K, B, C]
  void* grad_weight;       // [K, C]
  void* grad_bias;         // [K, C]
};

BMC_CPU_DECLARE_KERNEL(void, bn_relu_dropout_kernel, at::ScalarType, int64_t, int64_t, int64_t,
                       const std::vector<BnBranch>&, void*, uint8_t*, double, double, uint64_t, uint64_t)
BMC_CPU_DECLARE_KERNEL(void, bn_relu_dropout_backward_kernel, at::ScalarType, int64_t, int64_t, int64_t,
                       const void*, const uint8_t*, const std::vector<BnGradBranch>&, double)

inline namespace CPU_CAPABILITY {

// Work items are (model k, chunk of kRowChunk rows): each reads whole contiguous rows. (Tiles of
// a few channels over all B rows would read addresses one row apart, which at C = 256 map to a
// sixteenth of the cache sets: for large B every pass would go to memory.)
// Items are fixed by the shape, not the thread count, and per-channel partial sums of the items
// are combined in item order, so the result has the same bits for any number of threads.
constexpr int64_t kRowChunk = 32;
constexpr int64_t kColBlock = 256;

// Items per thread task, so that one task is >= ~8k elements: tiny calls run on one thread (a
// parallel region costs more than the work, and stalls when another process holds a core). At
// the trainer's one-model shape (64 x 256: two items) two threads take one item each: the inputs
// come from a matmul that left half of them in each core's cache.
inline int64_t item_grain(int64_t C) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, kRowChunk * C)); }

template <typename T>
void bn_forward_impl(int64_t K, int64_t B, int64_t C, const std::vector<BnBranch>& br, T* out, uint8_t* mask,
                     double eps, double p, uint64_t seed, uint64_t index_offset) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = static_cast<int64_t>(br.size());
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk;
  const int64_t items = K * chunks;
  // Pass 1: per item, per channel, sums of (a - a[row 0]) and of its square, in double (shifted by the
  // model's first row so the variance does not cancel when |mean| >> std).
  // Uninitialised: every item zeroes its own sums first (value-initialising would add a serial
  // memset of the whole buffer before the parallel pass).
  std::unique_ptr<double[]> part_buf(new double[static_cast<size_t>(items * n * 2 * C)]);
  double* const part = part_buf.get();
  at::parallel_for(0, items, item_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, r0 = (item % chunks) * kRowChunk, r1 = std::min(B, r0 + kRowChunk);
      for (int64_t i = 0; i < n; ++i) {
        const T* a = static_cast<const T*>(br[i].a) + k * B * C;
        const T* x0 = a;
        double* s1 = part + ((item * n + i) * 2) * C;
        double* s2 = s1 + C;
        for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
        for (int64_t b = r0; b < r1; ++b) {
          const T* row = a + b * C;
          for (int64_t c = 0; c < C; ++c) {
            const double d = static_cast<double>(row[c]) - static_cast<double>(x0[c]);
            s1[c] += d;
            s2[c] += d * d;
          }
        }
      }
    }
  });
  // Statistics per (model, branch, channel): partial sums combined in item order, in double.
  std::vector<acc_t> mean(static_cast<size_t>(K * n * C)), inv(static_cast<size_t>(K * n * C));
  at::parallel_for(0, K * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> t1(static_cast<size_t>(C)), t2(static_cast<size_t>(C));
    for (int64_t ki = begin; ki < end; ++ki) {
      const int64_t k = ki / n, i = ki % n;
      std::fill(t1.begin(), t1.end(), 0.0);
      std::fill(t2.begin(), t2.end(), 0.0);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const double* s1 = part + (((k * chunks + ch) * n + i) * 2) * C;
        for (int64_t c = 0; c < C; ++c) {
          t1[c] += static_cast<double>(s1[c]);
          t2[c] += static_cast<double>(s1[C + c]);
        }
      }
      const T* x0 = static_cast<const T*>(br[i].a) + k * B * C;
      const T* pb = br[i].pre_bias ? static_cast<const T*>(br[i].pre_bias) + k * C : nullptr;
      T* inv_out = static_cast<T*>(br[i].invstd) + k * C;
      T* mean_out = static_cast<T*>(br[i].mean) + k * C;
      T* var_out = static_cast<T*>(br[i].var) + k * C;
      for (int64_t c = 0; c < C; ++c) {
        const double m1 = t1[c] / static_cast<double>(B);
        const double var = std::max(0.0, t2[c] / static_cast<double>(B) - m1 * m1);
        const double mu = static_cast<double>(x0[c]) + m1;
        const double is = 1.0 / std::sqrt(var + eps);
        mean[(k * n + i) * C + c] = static_cast<acc_t>(mu);
        inv[(k * n + i) * C + c] = static_cast<acc_t>(is);
        inv_out[c] = static_cast<T>(is);
        mean_out[c] = static_cast<T>(mu + (pb ? static_cast<double>(pb[c]) : 0.0));
        var_out[c] = static_cast<T>(var * static_cast<double>(B) / static_cast<double>(B - 1));
      }
    }
  });
  // Pass 2: normalise, sum the branches, ReLU, dropout; row by row, in blocks of kColBlock
  // channels so the temporaries are stack arrays the compiler sees as unaliased.
  const uint32_t thr = dropout_threshold(p);
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  const acc_t* mean_all = mean.data();
  const acc_t* inv_all = inv.data();
  at::parallel_for(0, items, item_grain(C), [&](int64_t begin, int64_t end) {
    // Scalars and pointers as locals: read through the closure, the compiler must assume the
    // output stores may change them, and does not vectorise the loops that use them.
    const uint32_t thr_l = thr;
    const acc_t scale_l = scale;
    const uint64_t seed_l = seed, offset_l = index_offset;
    const acc_t* mean_l = mean_all;
    const acc_t* inv_l = inv_all;
    acc_t z[kColBlock];
    uint32_t bits[kColBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, r0 = (item % chunks) * kRowChunk, r1 = std::min(B, r0 + kRowChunk);
      for (int64_t b = r0; b < r1; ++b) {
        for (int64_t c0 = 0; c0 < C; c0 += kColBlock) {
          const int64_t w = std::min(kColBlock, C - c0);
          const int64_t row = (k * B + b) * C + c0;
          for (int64_t c = 0; c < w; ++c) z[c] = 0;
          for (int64_t i = 0; i < n; ++i) {
            const T* a = static_cast<const T*>(br[i].a) + row;
            T* xh = static_cast<T*>(br[i].xhat) + row;
            const T* g = static_cast<const T*>(br[i].weight) + k * C + c0;
            const T* be = static_cast<const T*>(br[i].bias) + k * C + c0;
            const acc_t* mu = mean_l + (k * n + i) * C + c0;
            const acc_t* is = inv_l + (k * n + i) * C + c0;
            for (int64_t c = 0; c < w; ++c) {
              const acc_t x = (static_cast<acc_t>(a[c]) - mu[c]) * is[c];
              xh[c] = static_cast<T>(x);
              z[c] += x * static_cast<acc_t>(g[c]) + static_cast<acc_t>(be[c]);
            }
          }
          // Dropout: 24 random bits per element from the counter hash. The low 32 bits of the
          // element index run over the block in one vectorisable loop unless it crosses a
          // multiple of 2^32 (then the exact scalar formula).
          const uint64_t first = static_cast<uint64_t>(row) + offset_l;
          if (thr_l == 0) {  // p rounds to 0: every element is kept, no hash needed
            for (int64_t c = 0; c < w; ++c) bits[c] = 0;
          } else if ((first >> 32) == ((first + w - 1) >> 32)) {
            const uint32_t lo0 = static_cast<uint32_t>(first), k0 = static_cast<uint32_t>(seed_l);
            const uint32_t hk = static_cast<uint32_t>(first >> 32) + static_cast<uint32_t>(seed_l >> 32);
            for (int64_t c = 0; c < w; ++c) bits[c] = mix32(mix32((lo0 + static_cast<uint32_t>(c)) ^ k0) ^ hk) >> 8;
          } else {
            for (int64_t c = 0; c < w; ++c) bits[c] = dropout_bits(seed_l, first + static_cast<uint64_t>(c));
          }
          T* o = out + row;
          uint8_t* m = mask + row;
          for (int64_t c = 0; c < w; ++c) {
            const acc_t keep = bits[c] >= thr_l ? scale_l : acc_t(0);
            const acc_t r = z[c] < 0 ? acc_t(0) : z[c];  // ReLU; NaN stays NaN
            o[c] = static_cast<T>(r * keep);
          }
          for (int64_t c = 0; c < w; ++c) m[c] = static_cast<uint8_t>((bits[c] >= thr_l) & (z[c] > 0));
        }
      }
    }
  });
}

// dz = grad where the mask passes (ReLU output > 0 and kept), times 1 / (1 - p); else 0.
template <typename T, typename acc_t>
inline void dz_row(const T* grad, const uint8_t* mask, int64_t w, acc_t scale, acc_t* mf, acc_t* dz) {
  for (int64_t c = 0; c < w; ++c) mf[c] = static_cast<acc_t>(mask[c]);
  for (int64_t c = 0; c < w; ++c) dz[c] = mf[c] != 0 ? static_cast<acc_t>(grad[c]) * scale : acc_t(0);
}

template <typename T>
void bn_backward_impl(int64_t K, int64_t B, int64_t C, const T* grad, const uint8_t* mask,
                      const std::vector<BnGradBranch>& br, double p) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = static_cast<int64_t>(br.size());
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk;
  const int64_t items = K * chunks;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  // Pass 1: per item, per channel, sum of dz and, per branch, of dz * xhat.
  std::unique_ptr<acc_t[]> part_buf(new acc_t[static_cast<size_t>(items * (n + 1) * C)]);  // zeroed per item
  acc_t* const part = part_buf.get();
  at::parallel_for(0, items, item_grain(C), [&](int64_t begin, int64_t end) {
    const acc_t scale_l = scale;  // a local: see bn_forward_impl
    std::vector<acc_t> buf(static_cast<size_t>(2 * C));
    acc_t* mf = buf.data();
    acc_t* dz = mf + C;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, r0 = (item % chunks) * kRowChunk, r1 = std::min(B, r0 + kRowChunk);
      acc_t* sdz = part + item * (n + 1) * C;
      for (int64_t c = 0; c < (n + 1) * C; ++c) sdz[c] = 0;
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = (k * B + b) * C;
        dz_row(grad + row, mask + row, C, scale_l, mf, dz);
        for (int64_t c = 0; c < C; ++c) sdz[c] += dz[c];
        for (int64_t i = 0; i < n; ++i) {
          const T* xh = static_cast<const T*>(br[i].xhat) + row;
          acc_t* sdx = sdz + (i + 1) * C;
          for (int64_t c = 0; c < C; ++c) sdx[c] += dz[c] * static_cast<acc_t>(xh[c]);
        }
      }
    }
  });
  // Per (model, channel): the sums over all rows, combined in item order in double; they are
  // the bias and weight gradients.
  std::vector<acc_t> tot(static_cast<size_t>(K * (n + 1) * C));
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> t(static_cast<size_t>((n + 1) * C));
    for (int64_t k = begin; k < end; ++k) {
      std::fill(t.begin(), t.end(), 0.0);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const acc_t* s = part + (k * chunks + ch) * (n + 1) * C;
        for (int64_t c = 0; c < (n + 1) * C; ++c) t[c] += static_cast<double>(s[c]);
      }
      for (int64_t c = 0; c < (n + 1) * C; ++c) tot[k * (n + 1) * C + c] = static_cast<acc_t>(t[c]);
      for (int64_t i = 0; i < n; ++i) {
        T* gw = static_cast<T*>(br[i].grad_weight) + k * C;
        T* gb = static_cast<T*>(br[i].grad_bias) + k * C;
        for (int64_t c = 0; c < C; ++c) {
          gw[c] = static_cast<T>(t[(i + 1) * C + c]);
          gb[c] = static_cast<T>(t[c]);
        }
      }
    }
  });
  // Pass 2: da = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), row by row.
  const acc_t inv_b = acc_t(1) / static_cast<acc_t>(B);
  at::parallel_for(0, items, item_grain(C), [&](int64_t begin, int64_t end) {
    const acc_t scale_l = scale, inv_b_l = inv_b;  // locals: see bn_forward_impl
    std::vector<acc_t> buf(static_cast<size_t>(2 * C));
    acc_t* mf = buf.data();
    acc_t* dz = mf + C;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, r0 = (item % chunks) * kRowChunk, r1 = std::min(B, r0 + kRowChunk);
      const acc_t* sdz = tot.data() + k * (n + 1) * C;
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = (k * B + b) * C;
        dz_row(grad + row, mask + row, C, scale_l, mf, dz);
        for (int64_t i = 0; i < n; ++i) {
          const T* xh = static_cast<const T*>(br[i].xhat) + row;
          const T* g = static_cast<const T*>(br[i].weight) + k * C;
          const T* is = static_cast<const T*>(br[i].invstd) + k * C;
          const acc_t* sdx = sdz + (i + 1) * C;
          T* da = static_cast<T*>(br[i].grad_input) + row;
          for (int64_t c = 0; c < C; ++c)
            da[c] = static_cast<T>(static_cast<acc_t>(g[c]) * static_cast<acc_t>(is[c]) *
                                   (dz[c] - sdz[c] * inv_b_l - static_cast<acc_t>(xh[c]) * sdx[c] * inv_b_l));
        }
      }
    }
  });
}

void bn_relu_dropout_kernel(at::ScalarType dtype, int64_t K, int64_t B, int64_t C, const std::vector<BnBranch>& br,
                            void* out, uint8_t* mask, double eps, double p, uint64_t seed, uint64_t index_offset) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_relu_dropout_cpu", [&] {
    bn_forward_impl<scalar_t>(K, B, C, br, static_cast<scalar_t*>(out), mask, eps, p, seed, index_offset);
  });
}

void bn_relu_dropout_backward_kernel(at::ScalarType dtype, int64_t K, int64_t B, int64_t C, const void* grad,
                                     const uint8_t* mask, const std::vector<BnGradBranch>& br, double p) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_relu_dropout_backward_cpu", [&] {
    bn_backward_impl<scalar_t>(K, B, C, static_cast<const scalar_t*>(grad), mask, br, p);
  });
}

}  // namespace CPU_CAPABILITY

#ifdef BMC_CPU_HOST
namespace {

// The shape of every per-channel tensor: [K, C], or [C] when the inputs are one unstacked
// model's [B, C].
std::vector<int64_t> stat_shape(const at::Tensor& like, int64_t K, int64_t C) {
  return like.dim() == 2 ? std::vector<int64_t>{C} : std::vector<int64_t>{K, C};
}

void check_stat(const at::Tensor& t, const at::Tensor& like, int64_t K, int64_t C, const char* name, size_t i) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, "[", i, "] must have the dtype of inputs (",
                   like.scalar_type(), "), got ", t.scalar_type());
  const auto want = stat_shape(like, K, C);
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), name, "[", i, "] must have shape ", at::IntArrayRef(want),
                    " (", like.dim() == 2 ? "[C] for [B, C] inputs" : "[K, C]", "), got ", t.sizes());
}

void check_list_size(size_t got, size_t n, const char* name, bool optional) {
  TORCH_CHECK_VALUE(got == n || (optional && got == 0), name, " must hold ", n, optional ? " tensors (or none)" : " tensors",
                    " like inputs, got ", got);
}

// [K, B, C] (or one model's [B, C]) inputs of one dtype (float32/float64) and shape; returns
// (K, B, C), K = 1 for [B, C].
std::array<int64_t, 3> check_inputs(at::TensorList inputs, const char* name) {
  TORCH_CHECK_VALUE(!inputs.empty() && static_cast<int64_t>(inputs.size()) <= kMaxBranches, name,
                    " must hold 1 to ", kMaxBranches, " tensors, got ", inputs.size());
  const at::Tensor& a0 = inputs[0];
  TORCH_CHECK_TYPE(a0.scalar_type() == at::kFloat || a0.scalar_type() == at::kDouble, name,
                   " must be float32 or float64 tensors, got ", a0.scalar_type());
  TORCH_CHECK_VALUE(a0.dim() == 3 || a0.dim() == 2, name, " must have shape [K, B, C] or [B, C], got ", a0.sizes());
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_cpu(inputs[i], name);
    TORCH_CHECK_TYPE(inputs[i].scalar_type() == a0.scalar_type(), name, "[", i, "] must have the dtype of ", name,
                     "[0] (", a0.scalar_type(), "), got ", inputs[i].scalar_type());
    TORCH_CHECK_VALUE(inputs[i].sizes() == a0.sizes(), name, "[", i, "] must have the shape of ", name, "[0] ",
                      a0.sizes(), ", got ", inputs[i].sizes());
  }
  if (a0.dim() == 2) return {1, a0.size(0), a0.size(1)};
  return {a0.size(0), a0.size(1), a0.size(2)};
}

}  // namespace

using TensorVec = std::vector<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, TensorVec, TensorVec, TensorVec, TensorVec> bn_relu_dropout_cpu(
    at::TensorList inputs, at::TensorList weights, at::TensorList biases, at::TensorList pre_biases, double eps,
    double p, int64_t seed) {
  return bn_relu_dropout_cpu_at(inputs, weights, biases, pre_biases, eps, p, seed, 0);
}

std::tuple<at::Tensor, at::Tensor, TensorVec, TensorVec, TensorVec, TensorVec> bn_relu_dropout_cpu_at(
    at::TensorList inputs, at::TensorList weights, at::TensorList biases, at::TensorList pre_biases, double eps,
    double p, int64_t seed, int64_t index_offset) {
  TORCH_CHECK_VALUE(index_offset >= 0, "index_offset must be >= 0, got ", index_offset);
  const auto [K, B, C] = check_inputs(inputs, "inputs");
  const size_t n = inputs.size();
  check_list_size(weights.size(), n, "weights", false);
  check_list_size(biases.size(), n, "biases", false);
  check_list_size(pre_biases.size(), n, "pre_biases", true);
  TORCH_CHECK_VALUE(B >= 2, "inputs must have at least 2 rows per model (batch statistics), got shape ",
                    inputs[0].sizes());
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(eps > 0.0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);

  TensorVec keep;  // contiguous copies that must outlive the kernel
  TensorVec xhats, invstds, means, vars;
  std::vector<BnBranch> br(n);
  const auto stat = [&] { return at::empty(stat_shape(inputs[0], K, C), inputs[0].options()); };
  for (size_t i = 0; i < n; ++i) {
    check_stat(weights[i], inputs[0], K, C, "weights", i);
    check_stat(biases[i], inputs[0], K, C, "biases", i);
    keep.push_back(inputs[i].contiguous());
    br[i].a = keep.back().const_data_ptr();
    keep.push_back(weights[i].contiguous());
    br[i].weight = keep.back().const_data_ptr();
    keep.push_back(biases[i].contiguous());
    br[i].bias = keep.back().const_data_ptr();
    br[i].pre_bias = nullptr;
    if (!pre_biases.empty()) {
      check_stat(pre_biases[i], inputs[0], K, C, "pre_biases", i);
      keep.push_back(pre_biases[i].contiguous());
      br[i].pre_bias = keep.back().const_data_ptr();
    }
    xhats.push_back(at::empty(inputs[0].sizes(), inputs[0].options()));
    invstds.push_back(stat());
    means.push_back(stat());
    vars.push_back(stat());
    br[i].xhat = xhats.back().mutable_data_ptr();
    br[i].invstd = invstds.back().mutable_data_ptr();
    br[i].mean = means.back().mutable_data_ptr();
    br[i].var = vars.back().mutable_data_ptr();
  }
  at::Tensor out = at::empty(inputs[0].sizes(), inputs[0].options());
  at::Tensor mask = at::empty(inputs[0].sizes(), inputs[0].options().dtype(at::kByte));
  BMC_CPU_CALL(bn_relu_dropout_kernel, inputs[0].scalar_type(), K, B, C, br, out.mutable_data_ptr(),
               mask.mutable_data_ptr<uint8_t>(), eps, p, static_cast<uint64_t>(seed), static_cast<uint64_t>(index_offset));
  return {out, mask, xhats, invstds, means, vars};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> bn_relu_dropout_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& mask, at::TensorList xhats, at::TensorList invstds,
    at::TensorList weights, double p) {
  const auto [K, B, C] = check_inputs(xhats, "xhats");
  const size_t n = xhats.size();
  check_list_size(invstds.size(), n, "invstds", false);
  check_list_size(weights.size(), n, "weights", false);
  check_cpu(grad_out, "grad_out");
  check_cpu(mask, "mask");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == xhats[0].scalar_type(), "grad_out must have the dtype of xhats (",
                   xhats[0].scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.sizes() == xhats[0].sizes(), "grad_out must have shape ", xhats[0].sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "mask must be a uint8 tensor, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == xhats[0].sizes(), "mask must have shape ", xhats[0].sizes(), ", got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  std::vector<at::Tensor> keep{grad_out.contiguous(), mask.contiguous()};
  std::vector<at::Tensor> gi, gw, gb;
  std::vector<BnGradBranch> br(n);
  for (size_t i = 0; i < n; ++i) {
    check_stat(invstds[i], xhats[0], K, C, "invstds", i);
    check_stat(weights[i], xhats[0], K, C, "weights", i);
    keep.push_back(xhats[i].contiguous());
    br[i].xhat = keep.back().const_data_ptr();
    keep.push_back(invstds[i].contiguous());
    br[i].invstd = keep.back().const_data_ptr();
    keep.push_back(weights[i].contiguous());
    br[i].weight = keep.back().const_data_ptr();
    gi.push_back(at::empty(xhats[0].sizes(), xhats[0].options()));
    gw.push_back(at::empty(stat_shape(xhats[0], K, C), xhats[0].options()));
    gb.push_back(at::empty(stat_shape(xhats[0], K, C), xhats[0].options()));
    br[i].grad_input = gi.back().mutable_data_ptr();
    br[i].grad_weight = gw.back().mutable_data_ptr();
    br[i].grad_bias = gb.back().mutable_data_ptr();
  }
  BMC_CPU_CALL(bn_relu_dropout_backward_kernel, xhats[0].scalar_type(), K, B, C, keep[0].const_data_ptr(),
               keep[1].const_data_ptr<uint8_t>(), br, p);
  return {gi, gw, gb};
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) {
  m.impl("bn_relu_dropout", &bn_relu_dropout_cpu);
  m.impl("bn_relu_dropout_backward", &bn_relu_dropout_backward_cpu);
}
#endif  // BMC_CPU_HOST

}  // namespace bmc_fast::cpu
