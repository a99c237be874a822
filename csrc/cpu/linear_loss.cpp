// d2l's dense output layer and MaskedSoftmaxCELoss fused on CPU: the logits hidden @ W^T + b are
// made chunk_rows rows at a time in one reused buffer (a small layer's chunk in pieces of rows
// over the threads, a large one's in one BLAS GEMM), each chunk's log-sum-exp and picked logit
// are taken with the loss's row kernel (csrc/cpu/rows.h), and, for
// the gradients, the buffer is turned in place into scale * (softmax - one_hot) and multiplied
// back: grad_hidden = G @ W, grad_W += G^T @ hidden, grad_b += column sums of G. Memory:
// O(chunk_rows * V) instead of the (B, S, V) logits and their gradient. Rows are walked in
// hidden's memory order (csrc/checks.h, linear_loss_rows).
#include <torch/library.h>

#include "checks.h"
#include "cpu/chunks.h"
#include "cpu/gemm.h"
#include "cpu/loop.h"
#include "cpu/rows.h"
#include "cpu/workspace.h"

namespace seq2seq_fast::cpu {
namespace {

// One pass over R rows of hidden (R, H) in chunks of `chunk` rows. lse (R,) is written (with nll)
// when `forward`, else read. With `grads`, the gradients of sum_r scale[r] * nll[r] are written:
// gh (R, H), gW (V, H), gb (V,). (Flags, not null pointers: R = 0 makes every (R,) pointer null.)
template <typename T>
struct Pass {
  bool forward, grads;
  int64_t R, H, V, chunk;
  const T* hidden;
  const T* W;
  const T* bias;
  const int64_t* label;
  T* lse;
  T* nll;
  const T* scale;
  T* gh;
  T* gW;
  T* gb;
};

// A chunk's rows [a, b) (rows of y, r0 + a.. of the pass): their logits into y, their loss terms
// and, with grads, their softmax gradient (in place) and gh rows. Rows never meet here.
template <typename T>
void chunk_rows(const Pass<T>& p, int64_t r0, int64_t a, int64_t b, T* y) {
  const int64_t V = p.V, H = p.H, n = b - a, r = r0 + a;
  T* ya = y + a * V;
  for (int64_t i = 0; i < n; ++i) {
    std::copy(p.bias, p.bias + V, ya + i * V);
  }
  gemm<T>(false, true, n, V, H, T(1), p.hidden + r * H, H, p.W, H, T(1), ya, V);
  // The rows as one sequence of n steps: row i at ya + i * V.
  if (p.forward) {
    cross_entropy_forward<T>(CeFwd{1, n, V, 0, V, ya, p.label + r, p.lse + r, p.nll + r});
  }
  if (p.grads) {
    cross_entropy_backward<T>(CeBwd{1, n, V, 0, V, ya, p.label + r, p.lse + r, p.scale + r, ya});
    gemm<T>(false, false, n, H, V, T(1), ya, V, p.W, H, T(0), p.gh + r * H, H);
  }
}

// Rows of a chunk per piece of work: for a small layer (d2l's zh: V = 201, H = 32, a 640-row
// call) pieces of at least 64 rows, about four per thread, claimed by this package's threads
// (csrc/cpu/chunks.h), and the weight's gradient split by its rows likewise; a large one's GEMMs
// run whole, on the BLAS's own threads.
template <typename T>
int64_t piece_rows(const Pass<T>& p, int64_t n) {
  if (!small_step_weights(p.V * p.H)) {
    return n;
  }
  const int64_t pieces = 4 * chunk_threads();
  return std::max<int64_t>(64, (n + pieces - 1) / pieces);
}

template <typename T>
void run_pass(const Pass<T>& p, const at::TensorOptions& opts) {
  const int64_t V = p.V, H = p.H;
  at::Tensor buf = cpu::empty({std::min(p.chunk, p.R), V}, opts);
  T* y = buf.data_ptr<T>();
  for (int64_t r0 = 0; r0 < p.R; r0 += p.chunk) {
    const int64_t n = std::min(p.chunk, p.R - r0);
    const int64_t rows = piece_rows(p, n);
    parallel_ranges(n, rows, [&](int64_t a, int64_t b) { chunk_rows(p, r0, a, b, y); });
    if (!p.grads) {
      continue;
    }
    const T* h = p.hidden + r0 * H;
    // gW (V, H) and gb by ranges of the vocabulary: y's columns [v0, v1).
    parallel_ranges(V, rows == n ? V : std::max<int64_t>(16, V / (4 * chunk_threads())), [&](int64_t v0, int64_t v1) {
      gemm<T>(true, false, v1 - v0, H, n, T(1), y + v0, V, h, H, r0 == 0 ? T(0) : T(1), p.gW + v0 * H, H);
      column_sums<T>(y + v0, n, v1 - v0, V, p.gb + v0, r0 != 0);
    });
  }
  if (p.grads && p.R == 0) {
    std::fill(p.gW, p.gW + V * H, T(0));
    std::fill(p.gb, p.gb + V, T(0));
  }
}

// scale of row (b, s) in the rows' order: g[b] / S for s < valid_len[b] (g = 1 without grad_loss), else 0.
template <typename T>
at::Tensor row_scales(const Sizes& s, const int64_t* len, const T* g, bool step_major, const at::TensorOptions& opts) {
  at::Tensor scale = cpu::empty({s.B * s.S}, opts);
  T* sc = scale.data_ptr<T>();
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t t = 0; t < s.S; ++t) {
      sc[step_major ? t * s.B + b : b * s.S + t] =
          t < len[b] ? (g != nullptr ? g[b] : T(1)) / static_cast<T>(s.S) : T(0);
    }
  }
  return scale;
}

// Gradient tensors in the rows' order: grad_hidden (D0, D1, H) (returned as hidden's (B, S, H)
// view), grad_weight (V, H), grad_bias (V,).
struct Grads {
  at::Tensor hidden, weight, bias;

  Grads(const Sizes& s, bool step_major, const at::TensorOptions& opts)
      : hidden(step_major ? cpu::empty({s.S, s.B, s.H}, opts) : cpu::empty({s.B, s.S, s.H}, opts)),
        weight(cpu::empty({s.V, s.H}, opts)),
        bias(cpu::empty({s.V}, opts)) {}
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult linear_masked_ce(const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                               const at::Tensor& label_in, const at::Tensor& valid_len_in, int64_t chunk_rows,
                               bool with_grads) {
  const Placement on = check_reference(hidden_in, "hidden", at::kCPU, kCpuFloats);
  const Sizes s = check_linear_loss(hidden_in, weight_in, bias_in, label_in, valid_len_in, chunk_rows, on, nullptr);
  const LinearLossRows rows = linear_loss_rows(hidden_in, label_in);
  const at::Tensor W = weight_in.contiguous(), bias = bias_in.contiguous(), lens = valid_len_in.contiguous();
  const auto opts = rows.hidden.options();
  at::Tensor lse = cpu::empty({s.B * s.S}, opts), nll = cpu::empty({s.B * s.S}, opts);
  at::Tensor loss = cpu::empty({s.B}, opts);
  c10::optional<Grads> grads;
  if (with_grads) {
    grads.emplace(s, rows.step_major, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::linear_masked_ce", [&] {
    using T = scalar_t;
    const int64_t* len = lens.data_ptr<int64_t>();
    const at::Tensor scale = with_grads ? row_scales<T>(s, len, nullptr, rows.step_major, opts) : at::Tensor();
    run_pass<T>(Pass<T>{true, with_grads, s.B * s.S, s.H, s.V, chunk_rows, rows.hidden.data_ptr<T>(),
                          W.data_ptr<T>(), bias.data_ptr<T>(), rows.label.data_ptr<int64_t>(), lse.data_ptr<T>(),
                          nll.data_ptr<T>(),
                          with_grads ? scale.data_ptr<T>() : nullptr,
                          with_grads ? grads->hidden.data_ptr<T>() : nullptr,
                          with_grads ? grads->weight.data_ptr<T>() : nullptr,
                          with_grads ? grads->bias.data_ptr<T>() : nullptr},
                  opts);
    masked_sequence_means<T>(nll.data_ptr<T>(), len, s.B, s.S, rows.step_major, loss.data_ptr<T>());
  });
  const at::Tensor lse_rows = rows.step_major ? lse.view({s.S, s.B}) : lse.view({s.B, s.S});
  lse = batch_major(lse_rows, rows.step_major).contiguous();
  if (!with_grads) {
    return {loss, lse, cpu::empty({0}, opts), cpu::empty({0}, opts), cpu::empty({0}, opts)};
  }
  return {loss, lse, batch_major(grads->hidden, rows.step_major), grads->weight, grads->bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_masked_ce_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const at::Tensor& label_in, const at::Tensor& valid_len_in, const at::Tensor& lse_in, int64_t chunk_rows) {
  const Placement on = check_reference(hidden_in, "hidden", at::kCPU, kCpuFloats);
  const Sizes s = check_linear_loss(hidden_in, weight_in, bias_in, label_in, valid_len_in, chunk_rows, on, nullptr);
  check_loss_backward(s, grad_loss, lse_in, on);
  const LinearLossRows rows = linear_loss_rows(hidden_in, label_in);
  const at::Tensor W = weight_in.contiguous(), bias = bias_in.contiguous(), lens = valid_len_in.contiguous();
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor lse = (rows.step_major ? lse_in.t() : lse_in).contiguous();  // in the rows' order
  const auto opts = rows.hidden.options();
  Grads grads(s, rows.step_major, opts);
  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::linear_masked_ce_backward", [&] {
    using T = scalar_t;
    const at::Tensor scale = row_scales<T>(s, lens.data_ptr<int64_t>(), g.data_ptr<T>(), rows.step_major, opts);
    run_pass<T>(Pass<T>{false, true, s.B * s.S, s.H, s.V, chunk_rows, rows.hidden.data_ptr<T>(),
                          W.data_ptr<T>(), bias.data_ptr<T>(), rows.label.data_ptr<int64_t>(), lse.data_ptr<T>(),
                          nullptr, scale.data_ptr<T>(), grads.hidden.data_ptr<T>(), grads.weight.data_ptr<T>(),
                          grads.bias.data_ptr<T>()},
                  opts);
  });
  return {batch_major(grads.hidden, rows.step_major), grads.weight, grads.bias};
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("linear_masked_ce", &seq2seq_fast::cpu::linear_masked_ce);
  m.impl("linear_masked_ce_backward", &seq2seq_fast::cpu::linear_masked_ce_backward);
}
