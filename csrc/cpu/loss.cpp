// d2l's MaskedSoftmaxCELoss on CPU in one pass over the logits: log-sum-exp and the picked
// logit per (b, s), then loss[b] = sum over s < valid_len[b] of (lse - x[label]) / S. The
// backward writes softmax - one_hot, scaled, in the logits' own memory order: the decoder hands
// out (B, S, V) views of step-major (S, B, V) logits, and its backward wants them that way.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/rows.h"
#include "cpu/workspace.h"

namespace seq2seq_fast::cpu {
namespace {

// bfloat16 logits (what the reference's output layer returns under CPU autocast) are read as they
// are: the math, the loss and lse in float32, the gradient in bfloat16 as the logits.
constexpr at::ScalarType kLogitDtypes[] = {at::kFloat, at::kDouble, at::kBFloat16};

// The dtype of the loss, lse and the per-row scratch: float32 for bfloat16 logits.
at::TensorOptions math_options(const at::Tensor& pred) {
  return pred.options().dtype(at::toOpMathType(pred.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> masked_ce_loss(const at::Tensor& pred_in, const at::Tensor& label_in,
                                                  const at::Tensor& valid_len_in) {
  const Placement on = check_reference(pred_in, "pred", at::kCPU, kLogitDtypes);
  const Sizes s = check_loss(pred_in, label_in, valid_len_in, on, nullptr);
  const at::Tensor pred = loss_rows(pred_in), label = label_in.contiguous(), lens = valid_len_in.contiguous();
  const auto opts = math_options(pred);
  at::Tensor lse = cpu::empty({s.B, s.S}, opts), nll = cpu::empty({s.B, s.S}, opts);
  at::Tensor loss = cpu::empty({s.B}, opts);
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "seq2seq_fast::masked_ce_loss", [&] {
    using T = scalar_t;
    const CeFwd rows{s.B, s.S, s.V, pred.stride(0), pred.stride(1), pred.data_ptr(), label.data_ptr<int64_t>(),
                     lse.data_ptr<T>(), nll.data_ptr<T>()};
    if (pred.scalar_type() == at::kBFloat16) {
      cross_entropy_forward_bf16(rows);
    } else {
      cross_entropy_forward<T>(rows);
    }
    masked_sequence_means<T>(nll.data_ptr<T>(), lens.data_ptr<int64_t>(), s.B, s.S, false, loss.data_ptr<T>());
  });
  return {loss, lse};
}

at::Tensor masked_ce_loss_backward(const at::Tensor& grad_loss, const at::Tensor& pred_in, const at::Tensor& label_in,
                                   const at::Tensor& valid_len_in, const at::Tensor& lse_in) {
  const Placement on = check_reference(pred_in, "pred", at::kCPU, kLogitDtypes);
  const Sizes s = check_loss(pred_in, label_in, valid_len_in, on, nullptr);
  const auto opts = math_options(pred_in);
  check_loss_backward(s, grad_loss, lse_in, {on.device, opts.dtype().toScalarType(), "the loss"});
  const at::Tensor pred = loss_rows(pred_in), label = label_in.contiguous(), lens = valid_len_in.contiguous();
  const at::Tensor lse = lse_in.contiguous(), g = grad_loss.contiguous();
  const bool step_major = !pred.is_contiguous();
  const auto grad_opts = pred.options();
  at::Tensor grad =
      step_major ? cpu::empty({s.S, s.B, s.V}, grad_opts).transpose(0, 1) : cpu::empty({s.B, s.S, s.V}, grad_opts);
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "seq2seq_fast::masked_ce_loss_backward", [&] {
    using T = scalar_t;
    at::Tensor scale = cpu::empty({s.B, s.S}, opts);
    T* sc = scale.data_ptr<T>();
    const T* gl = g.data_ptr<T>();
    const int64_t* len = lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t t = 0; t < s.S; ++t) {
        sc[b * s.S + t] = t < len[b] ? gl[b] / static_cast<T>(s.S) : T(0);
      }
    }
    const CeBwd rows{s.B, s.S, s.V, pred.stride(0), pred.stride(1), pred.data_ptr(), label.data_ptr<int64_t>(),
                     lse.data_ptr<T>(), sc, grad.data_ptr()};
    if (pred.scalar_type() == at::kBFloat16) {
      cross_entropy_backward_bf16(rows);
    } else {
      cross_entropy_backward<T>(rows);
    }
  });
  return grad;
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("masked_ce_loss", &seq2seq_fast::cpu::masked_ce_loss);
  m.impl("masked_ce_loss_backward", &seq2seq_fast::cpu::masked_ce_loss_backward);
}
