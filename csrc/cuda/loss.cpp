// d2l's MaskedSoftmaxCELoss on CUDA, with the CPU op's semantics and layouts (csrc/cpu/loss.cpp):
// one block per logits row (log-sum-exp and the picked logit, accumulated in float for
// half/bfloat16/float and in double for double), then each row b's loss summed in step order, so
// results do not depend on scheduling. The backward writes the gradient in pred's memory order.
// Nothing but the value checks reads the device, and those are skipped while a CUDA graph is
// captured.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cuda/kernels.h"
#include "cuda/stream.h"

namespace seq2seq_fast::gpu {
namespace {

std::tuple<at::Tensor, at::Tensor> masked_ce_loss(const at::Tensor& pred_in, const at::Tensor& label_in,
                                                  const at::Tensor& valid_len_in) {
  const Placement on = check_reference(pred_in, "pred", at::kCUDA, kCudaFloats);
  const c10::cuda::CUDAGuard guard(on.device);
  const Sizes s = check_loss(pred_in, label_in, valid_len_in, on, stream_is_capturing);
  const at::Tensor pred = loss_rows(pred_in), label = label_in.contiguous(), lens = valid_len_in.contiguous();
  const auto opts = pred.options();
  at::Tensor loss = at::empty({s.B}, opts), lse = at::empty({s.B, s.S}, opts);
  if (s.S == 0) {
    return {loss.fill_(NAN), lse};  // d2l's mean over no steps, as the CPU op's 0 / 0
  }
  at::Tensor nll = at::empty({s.B, s.S}, opts.dtype(at::toOpMathType(pred.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "seq2seq_fast::masked_ce_loss_cuda",
                                  [&] {
                                    cross_entropy_forward<scalar_t>(
                                        CeFwdArgs{s.B, s.S, s.V, loss.data_ptr(), lse.data_ptr(), nll.data_ptr(),
                                                  pred.data_ptr(), pred.stride(0), pred.stride(1),
                                                  label.data_ptr<int64_t>(), lens.data_ptr<int64_t>()},
                                        stream);
                                  });
  return {loss, lse};
}

at::Tensor masked_ce_loss_backward(const at::Tensor& grad_loss, const at::Tensor& pred_in, const at::Tensor& label_in,
                                   const at::Tensor& valid_len_in, const at::Tensor& lse_in) {
  const Placement on = check_reference(pred_in, "pred", at::kCUDA, kCudaFloats);
  const c10::cuda::CUDAGuard guard(on.device);
  const Sizes s = check_loss(pred_in, label_in, valid_len_in, on, stream_is_capturing);
  check_loss_backward(s, grad_loss, lse_in, on);
  const at::Tensor pred = loss_rows(pred_in), label = label_in.contiguous(), lens = valid_len_in.contiguous();
  const at::Tensor lse = lse_in.contiguous(), g = grad_loss.contiguous();
  // pred's rows are dense (contiguous or step-major): empty_like keeps that layout, so the
  // gradient shares pred's strides.
  at::Tensor grad = at::empty_like(pred);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, pred.scalar_type(), "seq2seq_fast::masked_ce_loss_backward_cuda", [&] {
        cross_entropy_backward<scalar_t>(
            CeBwdArgs{s.B, s.S, s.V, grad.data_ptr(), pred.data_ptr(), pred.stride(0), pred.stride(1),
                      label.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), lse.data_ptr(), g.data_ptr()},
            stream);
      });
  return grad;
}

}  // namespace
}  // namespace seq2seq_fast::gpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CUDA, m) {
  m.impl("masked_ce_loss", &seq2seq_fast::gpu::masked_ce_loss);
  m.impl("masked_ce_loss_backward", &seq2seq_fast::gpu::masked_ce_loss_backward);
}
