// resmlp_forward / resmlp_backward on the CPU: the training-mode forward and the backward of a
// (stacked) ResMLP (bmc_fast/backbone/resmlp.py) as two calls, so that a training step costs two
// op dispatches and one autograd node instead of ~25 ops and a dozen nodes, each with its Python
// and autograd-engine overhead (at the trainer's 64 rows, that overhead is of the order of the
// math itself).
//
// Host code only (the DEFAULT build): the matrix products are MKL's or oneDNN's (gemm.h), the
// normalisation + activation + dropout is the bn_relu_dropout kernel, called directly.
//
// Layout. x is [B, I] with weights [O, I] (one model) or [K, B, I] with weights [K, O, I] (K
// stacked models); a block's inner width (fc1's output, bn1) may differ from its output width.
// weights/biases: proj, then (fc1, fc2, short) per block, then head; bn_*: (bn1, bn2, bn_s) per
// block. saved: block b's input at 10 b, then its mask1, xhat1, invstd1, relu
// output r, mask2, xhat2, xhat_s, invstd2, invstd_s (10 b + 1 ... 10 b + 9); the last block's
// output is `features`, passed to the backward separately.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bn_relu_dropout.h"
#include "gemm.h"
#include "host_utils.h"
#include "resmlp.h"

namespace bmc_fast::cpu {

namespace {

using TensorVec = std::vector<at::Tensor>;
constexpr size_t kSavedPerBlock = 10;

// x W^T (+ b); the products go through gemm.h (MKL or oneDNN).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b) { return matmul_nt(x, w, b); }

at::Tensor t_last(const at::Tensor& t) { return t.transpose(-1, -2); }

// d/dW of x W^T given g = d/d(x W^T): g^T x, [O, I] / [K, O, I] like the weight.
at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& x) { return matmul_nt(t_last(g), t_last(x)); }

at::Tensor input_grad(const at::Tensor& g, const at::Tensor& w) { return matmul_nt(g, t_last(w)); }

void add_input_grad(at::Tensor& acc, const at::Tensor& g, const at::Tensor& w) { matmul_nt_add_(acc, g, t_last(w)); }

at::Tensor bias_grad(const at::Tensor& g) { return g.sum(g.dim() - 2); }

// The head's input gradient sums over the classes. MKL sums a long product (a head of ~1,000
// classes or more) in another order on one thread than inside a two-thread region, so the trained
// model would depend on the thread count; summed in blocks of at most kMaxSum classes, in order,
// it has the same bits on any.
constexpr int64_t kMaxSum = 512;

at::Tensor head_input_grad(const at::Tensor& g, const at::Tensor& w) {
  const int64_t classes = w.size(-2);
  if (classes <= kMaxSum) return input_grad(g, w);
  at::Tensor out = input_grad(g.narrow(-1, 0, kMaxSum), w.narrow(-2, 0, kMaxSum));
  for (int64_t c0 = kMaxSum; c0 < classes; c0 += kMaxSum) {
    const int64_t n = std::min(kMaxSum, classes - c0);
    add_input_grad(out, g.narrow(-1, c0, n), w.narrow(-2, c0, n));
  }
  return out;
}

// BMC_FAST_PAIR=0 turns run_pair off (every matmul then uses all threads, one after another).
bool pairing_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("BMC_FAST_PAIR");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

// Runs two independent pieces of work at once, one per thread. Inside a parallel region MKL and
// at::parallel_for run single-threaded, so each matmul gets a whole core: at the trainer's sizes
// (64 rows) that beats splitting every matmul over two threads one after the other, whose
// parallel regions are short and synchronise often. The callers' thread-local state (autograd
// exclusion, grad mode) is replicated into the worker. Only with exactly two threads: with more,
// each matmul would be held to one thread while the rest idle (no nested parallelism). Only for
// one model (`stacked` false): a batched matmul over K stacked models already runs whole models'
// GEMMs on each thread, so pairing two of them only holds each to one thread.
template <typename F1, typename F2>
void run_pair(bool stacked, F1&& f1, F2&& f2) {
  if (stacked || !pairing_enabled() || at::get_num_threads() != 2 || at::in_parallel_region()) {
    f1();
    f2();
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t i = begin; i < end; ++i) {
      if (i == 0) {
        f1();
      } else {
        f2();
      }
    }
  });
}

size_t num_blocks(size_t n_weights) {
  TORCH_CHECK_VALUE(n_weights >= 5 && (n_weights - 2) % 3 == 0,
                    "weights must hold proj, 3 per residual block (fc1, fc2, short) and head: 2 + 3 * blocks "
                    "tensors, got ",
                    n_weights);
  return (n_weights - 2) / 3;
}

// `t` (named name[i]) must be a CPU tensor of x's dtype with shape `want`, or [K, *want] when
// the models are stacked.
void check_param(const at::Tensor& t, const at::Tensor& x, bool stacked, std::vector<int64_t> want, const char* name,
                 size_t i) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, "[", i, "] must have the dtype of x (", x.scalar_type(),
                   "), got ", t.scalar_type());
  if (stacked) want.insert(want.begin(), x.size(0));
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), name, "[", i, "] must have shape ", at::IntArrayRef(want),
                    ", got ", t.sizes());
}

void check_list(size_t got, size_t want, const char* name, const char* what) {
  TORCH_CHECK_VALUE(got == want, name, " must hold ", want, " ", what, ", got ", got);
}

// Checks every parameter against x and the chain of layer widths; returns the number of blocks.
size_t check_model(const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
                   at::TensorList bn_biases) {
  check_cpu(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float32 or float64, got ", x.scalar_type());
  const size_t nb = num_blocks(weights.size());
  TORCH_CHECK_VALUE(weights[0].dim() == 2 || weights[0].dim() == 3, "weights[0] must be [O, I] or [K, O, I], got ",
                    weights[0].sizes());
  const bool stacked = weights[0].dim() == 3;
  TORCH_CHECK_VALUE(x.dim() == (stacked ? 3 : 2), "x must have shape ", stacked ? "[K, B, I]" : "[B, I]",
                    " for weights of ", weights[0].dim(), " dimensions, got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(-2) >= 2, "x must have at least 2 rows per model (batch statistics), got ", x.sizes());
  check_list(biases.size(), weights.size(), "biases", "tensors (one per weight)");
  check_list(bn_weights.size(), 3 * nb, "bn_weights", "tensors (bn1, bn2, bn_s per block)");
  check_list(bn_biases.size(), 3 * nb, "bn_biases", "tensors (bn1, bn2, bn_s per block)");
  const auto out_dim = [&](size_t i) { return weights[i].dim() >= 2 ? weights[i].size(-2) : int64_t{-1}; };
  check_param(weights[0], x, stacked, {weights[0].size(-2), x.size(-1)}, "weights", 0);
  int64_t width = out_dim(0);
  for (size_t b = 0; b < nb; ++b) {
    // fc1 maps the block's input to its inner width m, fc2 maps m to the block's output width w
    // (the short cut maps the input to w); m and w may differ.
    const size_t i = 1 + 3 * b;
    const int64_t m = out_dim(i), w = out_dim(i + 1);
    check_param(weights[i], x, stacked, {m, width}, "weights", i);
    check_param(weights[i + 1], x, stacked, {w, m}, "weights", i + 1);
    check_param(weights[i + 2], x, stacked, {w, width}, "weights", i + 2);
    for (size_t j = 0; j < 3; ++j) {
      const int64_t c = j == 0 ? m : w;
      check_param(biases[i + j], x, stacked, {c}, "biases", i + j);
      check_param(bn_weights[3 * b + j], x, stacked, {c}, "bn_weights", 3 * b + j);
      check_param(bn_biases[3 * b + j], x, stacked, {c}, "bn_biases", 3 * b + j);
    }
    width = w;
  }
  const size_t last = weights.size() - 1;
  check_param(weights[last], x, stacked, {out_dim(last), width}, "weights", last);
  check_param(biases[0], x, stacked, {out_dim(0)}, "biases", 0);
  check_param(biases[last], x, stacked, {out_dim(last)}, "biases", last);
  return nb;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, TensorVec, TensorVec, TensorVec> resmlp_forward_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
    at::TensorList bn_biases, double eps, at::ArrayRef<double> p, at::IntArrayRef seeds, int64_t first_model) {
  const size_t nb = check_model(x, weights, biases, bn_weights, bn_biases);
  check_list(p.size(), nb, "p", "values (one dropout probability per block)");
  check_list(seeds.size(), nb, "seeds", "values (one dropout seed per block)");
  TORCH_CHECK_VALUE(first_model >= 0, "first_model must be >= 0, got ", first_model);
  const bool stacked = x.dim() == 3;
  TensorVec saved, means, vars;
  saved.reserve(kSavedPerBlock * nb);
  at::Tensor h = linear(x, weights[0], &biases[0]);
  for (size_t b = 0; b < nb; ++b) {
    const size_t i = 1 + 3 * b, j = 3 * b;
    saved.push_back(h);  // the block's input
    at::Tensor a1, as;
    run_pair(stacked, [&] { a1 = linear(h, weights[i], nullptr); }, [&] { as = linear(h, weights[i + 2], nullptr); });
    auto [r, mask1, xhat1, invstd1, mean1, var1] =
        bn_relu_dropout_cpu({a1}, {bn_weights[j]}, {bn_biases[j]}, {biases[i]}, eps, 0.0, 0);
    const at::Tensor a2 = linear(r, weights[i + 1], nullptr);
    auto [out, mask2, xhat2, invstd2, mean2, var2] =
        bn_relu_dropout_cpu_at({a2, as}, {bn_weights[j + 1], bn_weights[j + 2]}, {bn_biases[j + 1], bn_biases[j + 2]},
                               {biases[i + 1], biases[i + 2]}, eps, p[b], seeds[b],
                               first_model * a2.size(-2) * a2.size(-1));
    saved.insert(saved.end(), {mask1, xhat1[0], invstd1[0], r, mask2, xhat2[0], xhat2[1], invstd2[0], invstd2[1]});
    means.insert(means.end(), {mean1[0], mean2[0], mean2[1]});
    vars.insert(vars.end(), {var1[0], var2[0], var2[1]});
    h = out;
  }
  at::Tensor logits = linear(h, weights.back(), &biases.back());
  return {logits, h, saved, means, vars};
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec, at::Tensor> resmlp_backward_cpu(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_features, const at::Tensor& x,
    const at::Tensor& features, at::TensorList weights, at::TensorList bn_weights, at::TensorList saved,
    at::ArrayRef<double> p, bool compute_input_grad) {
  const size_t nb = num_blocks(weights.size());
  check_list(bn_weights.size(), 3 * nb, "bn_weights", "tensors (bn1, bn2, bn_s per block)");
  check_list(saved.size(), kSavedPerBlock * nb, "saved", "tensors (resmlp_forward's saved output)");
  check_list(p.size(), nb, "p", "values (one dropout probability per block)");
  check_cpu(x, "x");
  check_cpu(features, "features");
  const at::Tensor& head = weights.back();
  std::vector<int64_t> logits_shape(features.sizes().begin(), features.sizes().end());
  logits_shape.back() = head.size(-2);
  const bool has_gl = grad_logits.has_value() && grad_logits->defined();
  const bool has_gf = grad_features.has_value() && grad_features->defined();
  if (has_gl) {
    check_cpu(*grad_logits, "grad_logits");
    TORCH_CHECK_VALUE(grad_logits->sizes() == at::IntArrayRef(logits_shape), "grad_logits must have shape ",
                      at::IntArrayRef(logits_shape), ", got ", grad_logits->sizes());
    TORCH_CHECK_TYPE(grad_logits->scalar_type() == x.scalar_type(), "grad_logits must have the dtype of x (",
                     x.scalar_type(), "), got ", grad_logits->scalar_type());
  }
  if (has_gf) {
    check_cpu(*grad_features, "grad_features");
    TORCH_CHECK_VALUE(grad_features->sizes() == features.sizes(), "grad_features must have shape ", features.sizes(),
                      ", got ", grad_features->sizes());
    TORCH_CHECK_TYPE(grad_features->scalar_type() == x.scalar_type(), "grad_features must have the dtype of x (",
                     x.scalar_type(), "), got ", grad_features->scalar_type());
  }

  const size_t nw = weights.size();
  const bool stacked = head.dim() == 3;
  TensorVec gw(nw), gb(nw), gbn_w(3 * nb), gbn_b(3 * nb);
  at::Tensor g;  // d loss / d (the current block's output)
  if (has_gl) {
    run_pair(stacked, [&] { gw[nw - 1] = weight_grad(*grad_logits, features); },
             [&] { g = head_input_grad(*grad_logits, head); });
    gb[nw - 1] = bias_grad(*grad_logits);
    if (has_gf) g.add_(*grad_features);
  } else {
    gw[nw - 1] = at::zeros_like(head);
    gb[nw - 1] = at::zeros(head.sizes().slice(0, head.dim() - 1), head.options());
    g = has_gf ? *grad_features : at::zeros_like(features);
  }
  for (size_t b = nb; b-- > 0;) {
    const size_t i = 1 + 3 * b, j = 3 * b, s = kSavedPerBlock * b;
    const at::Tensor& h_in = saved[s];
    const at::Tensor& r = saved[s + 4];
    auto [gi2, gw2, gb2] = bn_relu_dropout_backward_cpu(g, saved[s + 5], {saved[s + 6], saved[s + 7]},
                                                        {saved[s + 8], saved[s + 9]},
                                                        {bn_weights[j + 1], bn_weights[j + 2]}, p[b]);
    // Two independent pieces at a time (run_pair): fc2's input gradient (the critical path, on to
    // bn1's backward) beside fc2's weight gradient; then the weight gradients of fc1 and the short
    // cut beside the input gradient through both.
    at::Tensor gr;
    run_pair(stacked, [&] { gr = input_grad(gi2[0], weights[i + 1]); }, [&] { gw[i + 1] = weight_grad(gi2[0], r); });
    auto [gi1, gw1, gb1] =
        bn_relu_dropout_backward_cpu(gr, saved[s + 1], {saved[s + 2]}, {saved[s + 3]}, {bn_weights[j]}, 0.0);
    run_pair(stacked, [&] { gw[i] = weight_grad(gi1[0], h_in); gw[i + 2] = weight_grad(gi2[1], h_in); },
             [&] { g = input_grad(gi1[0], weights[i]); add_input_grad(g, gi2[1], weights[i + 2]); });
    // The pre-BN biases cancel in the normalisation: their gradient is exactly zero.
    for (size_t k = 0; k < 3; ++k) gb[i + k] = at::zeros_like(bn_weights[j + k]);
    gbn_w[j] = gw1[0];
    gbn_b[j] = gb1[0];
    gbn_w[j + 1] = gw2[0];
    gbn_b[j + 1] = gb2[0];
    gbn_w[j + 2] = gw2[1];
    gbn_b[j + 2] = gb2[1];
  }
  at::Tensor gx;
  if (compute_input_grad) {
    run_pair(stacked, [&] { gw[0] = weight_grad(g, x); }, [&] { gx = input_grad(g, weights[0]); });
  } else {  // one matmul: all threads on it (a pair would leave one thread idle)
    gw[0] = weight_grad(g, x);
    gx = at::empty({0}, x.options());
  }
  // proj's output reaches the loss only through BatchNorms (the first block's fc1 and shortcut):
  // its bias gradient is exactly zero (computing it would give rounding noise, which AdamW
  // scales to full-size steps).
  gb[0] = at::zeros(weights[0].sizes().slice(0, weights[0].dim() - 1), weights[0].options());
  return {gw, gb, gbn_w, gbn_b, gx};
}

TORCH_LIBRARY_IMPL(bmc_fast, CPU, m) {
  m.impl("resmlp_forward", &resmlp_forward_cpu);
  m.impl("resmlp_backward", &resmlp_backward_cpu);
}

}  // namespace bmc_fast::cpu
