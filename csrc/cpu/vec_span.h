// Vectorised loops over contiguous spans, shared by the CPU kernels. Compiled once per
// CPU_CAPABILITY (cpu_dispatch.h). Every loop accumulates in at::opmath_type<T> (float for
// float/half/bfloat16, double for double) and reduces its lanes in a fixed order.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/sqdiff_math.h"

namespace bmc_fast::cpu {
inline namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;

// Loads and stores kStep consecutive elements of T as two float vectors.
template <typename T>
struct VecIO;

template <>
struct VecIO<float> {
  static constexpr int64_t kStep = 2 * fVec::size();
  static void load(const float* p, fVec& lo, fVec& hi) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + fVec::size());
  }
  static void store(float* p, const fVec& lo, const fVec& hi) {
    lo.store(p);
    hi.store(p + fVec::size());
  }
};

template <typename T>
struct VecIOReduced {
  using rVec = at::vec::Vectorized<T>;
  static_assert(rVec::size() == 2 * fVec::size(), "16-bit vectors hold two float vectors");
  static constexpr int64_t kStep = rVec::size();
  static void load(const T* p, fVec& lo, fVec& hi) {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(rVec::loadu(p));
  }
  static void store(T* p, const fVec& lo, const fVec& hi) {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
};
template <>
struct VecIO<c10::BFloat16> : VecIOReduced<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : VecIOReduced<c10::Half> {};

template <typename T>
constexpr bool kVectorised = !std::is_same_v<T, double>;

inline float hsum(const fVec& v) {
  float buf[fVec::size()];
  v.store(buf);
  float s = 0.f;
  for (int j = 0; j < fVec::size(); ++j) s += buf[j];
  return s;
}

// max that propagates NaN, like torch.max.
template <typename acc_t>
inline acc_t nan_max(acc_t m, acc_t v) {
  return (v > m || v != v) ? v : m;
}

inline float hmax(const fVec& v) {
  float buf[fVec::size()];
  v.store(buf);
  float m = buf[0];
  for (int j = 1; j < fVec::size(); ++j) m = nan_max(m, buf[j]);
  return m;
}

// sum_i w_i (a_i - b_i)^2 over n elements (w_i = 1 when w is null; w in T or in acc_t); with
// kGrad also grad_i = scale * w_i * (a_i - b_i).
template <bool kGrad, typename T, typename W, typename acc_t = at::opmath_type<T>>
acc_t sqdiff_span(const T* a, const T* b, const W* w, int64_t n, acc_t scale, T* grad) {
  int64_t i = 0;
  acc_t total = 0;
  if constexpr (kVectorised<T>) {
    using IO = VecIO<T>;
    fVec acc0(0.f), acc1(0.f);
    const fVec vs(scale);
    if (w == nullptr) {
      for (; i + IO::kStep <= n; i += IO::kStep) {
        fVec a0, a1, b0, b1;
        IO::load(a + i, a0, a1);
        IO::load(b + i, b0, b1);
        const fVec d0 = a0 - b0, d1 = a1 - b1;
        acc0 = at::vec::fmadd(d0, d0, acc0);
        acc1 = at::vec::fmadd(d1, d1, acc1);
        if constexpr (kGrad) IO::store(grad + i, vs * d0, vs * d1);
      }
    } else {
      for (; i + IO::kStep <= n; i += IO::kStep) {
        fVec a0, a1, b0, b1;
        IO::load(a + i, a0, a1);
        IO::load(b + i, b0, b1);
        const fVec d0 = a0 - b0, d1 = a1 - b1;
        fVec w0, w1;
        VecIO<W>::load(w + i, w0, w1);
        const fVec wd0 = w0 * d0, wd1 = w1 * d1;
        acc0 = at::vec::fmadd(wd0, d0, acc0);
        acc1 = at::vec::fmadd(wd1, d1, acc1);
        if constexpr (kGrad) IO::store(grad + i, vs * wd0, vs * wd1);
      }
    }
    total = hsum(acc0 + acc1);
  }
  for (; i < n; ++i) {
    const acc_t ai = static_cast<acc_t>(a[i]), bi = static_cast<acc_t>(b[i]);
    const acc_t wi = w == nullptr ? acc_t(1) : static_cast<acc_t>(w[i]);
    total += sqdiff_term(ai, bi, wi);
    if constexpr (kGrad) grad[i] = static_cast<T>(sqdiff_grad(ai, bi, wi, scale));
  }
  return total;
}

// For each of K rows of length M: sums[k] = sum_m w_m (a[k, m] - b[k, m])^2 and, when grad is
// not null, grad[k, m] = scale[k] * w_m * (a - b). `b` has row stride b_stride (M, or 0 to
// broadcast one row). Rows are cut into fixed chunks whose partial sums are added in chunk
// order, so the result has the same bits for any number of threads.
template <typename T, typename W, typename acc_t = at::opmath_type<T>>
void chunked_sqdiff(const T* a, const T* b, int64_t b_stride, const W* w, int64_t K, int64_t M,
                    const std::vector<double>& scale, T* grad, std::vector<double>& sums) {
  constexpr int64_t kChunk = 16384;
  const int64_t nc = M == 0 ? 0 : (M + kChunk - 1) / kChunk;
  const int64_t chunk_len = std::max<int64_t>(1, std::min(M, kChunk));
  std::vector<acc_t> partial(static_cast<size_t>(K * nc));
  // Give each thread at least ~32k elements: below that a parallel region costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / chunk_len);
  at::parallel_for(0, K * nc, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // With a broadcast b (weight stability) the K rows of one chunk are neighbours in t, so the
      // chunk of b (and w) is read from memory once and from cache for the other K - 1 rows.
      const int64_t k = b_stride == 0 ? t % K : t / nc;
      const int64_t c = b_stride == 0 ? t / K : t % nc;
      const int64_t start = c * kChunk;
      const int64_t len = std::min(kChunk, M - start);
      const T* ak = a + k * M + start;
      const T* bk = b + k * b_stride + start;
      const W* wk = w == nullptr ? nullptr : w + start;
      partial[k * nc + c] = grad != nullptr
          ? sqdiff_span<true>(ak, bk, wk, len, static_cast<acc_t>(scale[k]), grad + k * M + start)
          : sqdiff_span<false>(ak, bk, wk, len, acc_t(0), static_cast<T*>(nullptr));
    }
  });
  sums.assign(static_cast<size_t>(K), 0.0);
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t c = 0; c < nc; ++c) s += static_cast<double>(partial[k * nc + c]);
    sums[k] = s;
  }
}

// NaN-propagating max of x[0, n).
template <typename T, typename acc_t = at::opmath_type<T>>
acc_t span_max(const T* x, int64_t n) {
  int64_t i = 0;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  if constexpr (kVectorised<T>) {
    using IO = VecIO<T>;
    if (n >= IO::kStep) {
      fVec m0(m), m1(m);
      for (; i + IO::kStep <= n; i += IO::kStep) {
        fVec x0, x1;
        IO::load(x + i, x0, x1);
        m0 = at::vec::maximum(m0, x0);
        m1 = at::vec::maximum(m1, x1);
      }
      m = hmax(at::vec::maximum(m0, m1));
    }
  }
  for (; i < n; ++i) m = nan_max(m, static_cast<acc_t>(x[i]));
  return m;
}

// sum_i exp((x_i - shift) * mul) over x[0, n).
template <typename T, typename acc_t = at::opmath_type<T>>
acc_t span_sumexp(const T* x, int64_t n, acc_t shift, acc_t mul) {
  int64_t i = 0;
  acc_t s = 0;
  if constexpr (kVectorised<T>) {
    using IO = VecIO<T>;
    const fVec vshift(shift), vmul(mul);
    fVec s0(0.f), s1(0.f);
    for (; i + IO::kStep <= n; i += IO::kStep) {
      fVec x0, x1;
      IO::load(x + i, x0, x1);
      s0 = s0 + ((x0 - vshift) * vmul).exp_u20();
      s1 = s1 + ((x1 - vshift) * vmul).exp_u20();
    }
    s = hsum(s0 + s1);
  }
  for (; i < n; ++i) s += std::exp((static_cast<acc_t>(x[i]) - shift) * mul);
  return s;
}

// out_i = exp((x_i - shift) * mul) * scale over x[0, n).
template <typename T, typename acc_t = at::opmath_type<T>>
void span_exp_store(const T* x, int64_t n, acc_t shift, acc_t mul, acc_t scale, T* out) {
  int64_t i = 0;
  if constexpr (kVectorised<T>) {
    using IO = VecIO<T>;
    const fVec vshift(shift), vmul(mul), vscale(scale);
    for (; i + IO::kStep <= n; i += IO::kStep) {
      fVec x0, x1;
      IO::load(x + i, x0, x1);
      IO::store(out + i, ((x0 - vshift) * vmul).exp_u20() * vscale,
                ((x1 - vshift) * vmul).exp_u20() * vscale);
    }
  }
  for (; i < n; ++i) out[i] = static_cast<T>(std::exp((static_cast<acc_t>(x[i]) - shift) * mul) * scale);
}

// Zero-fills grad[0, n) (all-zero bits are 0 in every floating dtype).
template <typename T>
inline void zero_span(T* p, int64_t n) {
  if (n > 0) std::memset(static_cast<void*>(p), 0, static_cast<size_t>(n) * sizeof(T));
}

}  // namespace CPU_CAPABILITY
}  // namespace bmc_fast::cpu
