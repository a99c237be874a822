// d2l's dense output layer and MaskedSoftmaxCELoss fused on CUDA, with the CPU op's semantics
// and layouts (csrc/cpu/linear_loss.cpp): chunk_rows rows of logits at a time in one reused
// buffer (cuBLAS through at::addmm_out), their log-sum-exp, picked logit and, for the gradients,
// scale * (softmax - one_hot) by ATen's row ops in float (double for double), multiplied back
// into grad_hidden, grad_weight and grad_bias (accumulated in float over the chunks). Nothing
// but the value checks reads the device, and those are skipped while a CUDA graph is captured.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/stream.h"

namespace seq2seq_fast::gpu {
namespace {

// The rows of a call and what every chunk reads: hidden (R, H) and label (R,) in the rows' order,
// the mask valid (R,) of the rows s < valid_len[b] in that order, in the math dtype.
struct Rows {
  LinearLossRows layout;
  at::Tensor hidden, label, valid;
  int64_t R;
};

Rows rows_of(const Sizes& s, const at::Tensor& hidden, const at::Tensor& label, const at::Tensor& valid_len,
             at::ScalarType math) {
  Rows r{linear_loss_rows(hidden, label), {}, {}, {}, s.B * s.S};
  r.hidden = r.layout.hidden.reshape({r.R, s.H});
  r.label = r.layout.label.reshape({r.R});
  const at::Tensor steps = at::arange(s.S, valid_len.options());
  const at::Tensor valid = steps.unsqueeze(0).lt(valid_len.unsqueeze(1)).to(math);  // (B, S)
  r.valid = (r.layout.step_major ? valid.t() : valid).contiguous().reshape({r.R});
  return r;
}

// One pass over the chunks: writes lse and nll (R,) when nll is defined (else reads lse); with
// scale (R,) defined, the gradients of sum_r scale[r] * nll[r] into gh (R, H) and the float
// accumulators gW (V, H), gb (V,).
void run_chunks(const Rows& r, const at::Tensor& W, const at::Tensor& bias, int64_t chunk, const at::Tensor& lse,
                const at::Tensor& nll, const at::Tensor& scale, const at::Tensor& gh, const at::Tensor& gW,
                const at::Tensor& gb) {
  at::Tensor buf = at::empty({std::min(chunk, r.R), W.size(0)}, W.options());
  for (int64_t r0 = 0; r0 < r.R; r0 += chunk) {
    const int64_t n = std::min(chunk, r.R - r0);
    const at::Tensor h = r.hidden.narrow(0, r0, n);
    at::Tensor y = buf.narrow(0, 0, n);
    at::addmm_out(y, bias, h, W.t());
    const at::Tensor x = y.to(lse.scalar_type());  // the math dtype (no copy unless half/bfloat16)
    const at::Tensor label = r.label.narrow(0, r0, n).unsqueeze(1);
    at::Tensor row_lse = lse.narrow(0, r0, n);
    if (nll.defined()) {
      at::logsumexp_out(row_lse, x, {1});
      at::Tensor row_nll = nll.narrow(0, r0, n);
      at::sub_out(row_nll, row_lse, x.gather(1, label).squeeze(1));
    }
    if (!scale.defined()) {
      continue;
    }
    const at::Tensor sc = scale.narrow(0, r0, n).unsqueeze(1);
    at::Tensor g = (x - row_lse.unsqueeze(1)).exp_().mul_(sc);
    g.scatter_add_(1, label, -sc);
    const at::Tensor gy = g.to(W.scalar_type());
    at::Tensor row_gh = gh.narrow(0, r0, n);
    at::mm_out(row_gh, gy, W);
    if (gW.scalar_type() == gy.scalar_type()) {
      gW.addmm_(gy.t(), h);
    } else {
      gW.add_(at::mm(gy.t(), h).to(gW.scalar_type()));
    }
    gb.add_(g.sum(0));
  }
}

// The loss (B,) from nll (R,) of the rows: sum over the kept steps / S (S = 0: NaN, as the CPU op).
at::Tensor loss_of(const Sizes& s, const Rows& r, const at::Tensor& nll, at::ScalarType dtype) {
  const at::Tensor kept = nll.mul(r.valid);
  const at::Tensor sums = r.layout.step_major ? kept.view({s.S, s.B}).sum(0) : kept.view({s.B, s.S}).sum(1);
  return sums.div_(static_cast<double>(s.S)).to(dtype);
}

at::Tensor lse_of(const Sizes& s, const Rows& r, const at::Tensor& lse, at::ScalarType dtype) {
  const at::Tensor rows = r.layout.step_major ? lse.view({s.S, s.B}) : lse.view({s.B, s.S});
  return batch_major(rows, r.layout.step_major).to(dtype).contiguous();
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult linear_masked_ce(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& label, const at::Tensor& valid_len, int64_t chunk_rows,
                               bool with_grads) {
  const Placement on = check_reference(hidden, "hidden", at::kCUDA, kCudaFloats);
  const c10::cuda::CUDAGuard guard(on.device);
  const Sizes s = check_linear_loss(hidden, weight, bias, label, valid_len, chunk_rows, on, stream_is_capturing);
  const auto math = at::toOpMathType(on.dtype);
  const Rows r = rows_of(s, hidden, label, valid_len.contiguous(), math);
  const at::Tensor W = weight.contiguous(), b = bias.contiguous();
  const auto fopts = hidden.options().dtype(math);
  const at::Tensor lse = at::empty({r.R}, fopts), nll = at::empty({r.R}, fopts);
  if (!with_grads) {
    run_chunks(r, W, b, chunk_rows, lse, nll, {}, {}, {}, {});
    const auto opts = hidden.options();
    return {loss_of(s, r, nll, on.dtype), lse_of(s, r, lse, on.dtype), at::empty({0}, opts), at::empty({0}, opts),
            at::empty({0}, opts)};
  }
  const at::Tensor gh = at::empty({r.R, s.H}, hidden.options());
  const at::Tensor gW = at::zeros({s.V, s.H}, fopts), gb = at::zeros({s.V}, fopts);
  run_chunks(r, W, b, chunk_rows, lse, nll, r.valid / static_cast<double>(s.S), gh, gW, gb);
  return {loss_of(s, r, nll, on.dtype), lse_of(s, r, lse, on.dtype),
          batch_major(gh.view(r.layout.hidden.sizes()), r.layout.step_major), gW.to(on.dtype), gb.to(on.dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_masked_ce_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& label, const at::Tensor& valid_len, const at::Tensor& lse_in, int64_t chunk_rows) {
  const Placement on = check_reference(hidden, "hidden", at::kCUDA, kCudaFloats);
  const c10::cuda::CUDAGuard guard(on.device);
  const Sizes s = check_linear_loss(hidden, weight, bias, label, valid_len, chunk_rows, on, stream_is_capturing);
  check_loss_backward(s, grad_loss, lse_in, on);
  const auto math = at::toOpMathType(on.dtype);
  const Rows r = rows_of(s, hidden, label, valid_len.contiguous(), math);
  const at::Tensor W = weight.contiguous(), b = bias.contiguous();
  const auto fopts = hidden.options().dtype(math);
  const at::Tensor lse = (r.layout.step_major ? lse_in.t() : lse_in).to(math).contiguous().reshape({r.R});
  // scale of row (b, s): grad_loss[b] / S for the kept steps, in the rows' order.
  const at::Tensor g = grad_loss.to(math).div(static_cast<double>(s.S));
  const at::Tensor per_row = r.layout.step_major ? g.unsqueeze(0).expand({s.S, s.B}) : g.unsqueeze(1).expand({s.B, s.S});
  const at::Tensor scale = per_row.reshape({r.R}).mul(r.valid);
  const at::Tensor gh = at::empty({r.R, s.H}, hidden.options());
  const at::Tensor gW = at::zeros({s.V, s.H}, fopts), gb = at::zeros({s.V}, fopts);
  run_chunks(r, W, b, chunk_rows, lse, {}, scale, gh, gW, gb);
  return {batch_major(gh.view(r.layout.hidden.sizes()), r.layout.step_major), gW.to(on.dtype), gb.to(on.dtype)};
}

}  // namespace
}  // namespace seq2seq_fast::gpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CUDA, m) {
  m.impl("linear_masked_ce", &seq2seq_fast::gpu::linear_masked_ce);
  m.impl("linear_masked_ce_backward", &seq2seq_fast::gpu::linear_masked_ce_backward);
}
