// A training step's loss and gradients in one call, without autograd's graph: the compiled ops
// of EncoderDecoder.masked_ce_loss_backward's own path, called from here in the order autograd's
// path calls them (encoder_forward, the key projection, decoder_forward without its dense layer,
// linear_masked_ce with its gradients, decoder_backward, the key projection's backward,
// encoder_backward), so every number is the same. From Python the ~20 tensor calls between the
// ops (views, the key projection and its gradients, the states' gradients laid out for the
// backward ops) were each a dispatch from the interpreter: 0.54 ms of a 4.6 ms d2l zh step on
// this package's CPU VM at a slow moment; from here the step is 1.6-3.4 % shorter (the tensor
// work itself remains). Device-generic: every step is a dispatcher call; each op checks its own
// arguments, and the key projection's weight is checked here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace seq2seq_fast {
namespace {

using Tensors = std::vector<at::Tensor>;
using OptTensor = c10::optional<at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The decoder's share of the step: (loss, d values, d hidden, d key_proj, d params). A scope of
// its own, so that the decoder's activations are freed before the encoder's backward runs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, Tensors> decoder_share(
    const at::Tensor& dec_X, const at::Tensor& values, const at::Tensor& hidden, const OptTensor& enc_valid_lens,
    const at::Tensor& key_proj, at::TensorList dec_params, const OptTensor& attn_mask, const OptTensor& layer_mask,
    const at::Tensor& label, const at::Tensor& valid_len, int64_t chunk_rows) {
  using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, at::TensorList,
      const OptTensor&, const OptTensor&, bool);
  using Loss = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool);
  using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, Tensors>(
      const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
      const at::Tensor&, at::TensorList, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&);
  static const auto forward = op<Forward>("seq2seq_fast::decoder_forward");
  static const auto loss_op = op<Loss>("seq2seq_fast::linear_masked_ce");
  static const auto backward = op<Backward>("seq2seq_fast::decoder_backward");

  TORCH_CHECK_VALUE(dec_params.size() >= 2, "seq2seq_fast: dec_params must list 5 + 4L tensors for L >= 1 GRU layers, got ",
                    dec_params.size(), " tensors");
  const at::Tensor& weight = dec_params[dec_params.size() - 2];
  const at::Tensor& bias = dec_params[dec_params.size() - 1];
  // A dense layer of 0 rows: decoder_forward makes no logits; linear_masked_ce reads the states.
  Tensors params(dec_params.begin(), dec_params.end() - 2);
  params.push_back(weight.new_empty({0, weight.dim() == 2 ? weight.size(1) : 0}));
  params.push_back(bias.new_empty({0}));
  const auto [logits, attention, states, inputs, layer_inputs, gates] =
      forward.call(dec_X, values, hidden, enc_valid_lens, key_proj, params, attn_mask, layer_mask, true);
  const int64_t L = states.size(0), S = states.size(1) - 1;
  const at::Tensor tops = states.select(0, L - 1).narrow(0, 1, S);  // (S, B, H)
  const auto [loss, lse, grad_top, grad_weight, grad_bias] =
      loss_op.call(tops.transpose(0, 1), weight, bias, label, valid_len, chunk_rows, true);
  at::Tensor grad_states = at::zeros_like(states);
  grad_states.select(0, L - 1).narrow(0, 1, S).copy_(grad_top.transpose(0, 1));
  auto [grad_values, grad_hidden, grad_key_proj, grads] =
      backward.call(c10::nullopt, c10::nullopt, grad_states, dec_X, values, enc_valid_lens, key_proj, params,
                    attn_mask, layer_mask, attention, states, inputs, layer_inputs, gates);
  grads.resize(grads.size() - 2);  // the 0-row dense layer's
  grads.push_back(grad_weight);
  grads.push_back(grad_bias);
  return {loss, grad_values, grad_hidden, grad_key_proj, grads};
}

std::tuple<at::Tensor, Tensors, Tensors, at::Tensor> training_step_grads(
    const at::Tensor& X, at::TensorList enc_params, const OptTensor& enc_layer_mask, const at::Tensor& dec_X,
    const OptTensor& enc_valid_lens, at::TensorList dec_params, const at::Tensor& W_k, const OptTensor& attn_mask,
    const OptTensor& dec_layer_mask, const at::Tensor& label, const at::Tensor& valid_len, int64_t chunk_rows) {
  using EncoderForward = T3(const at::Tensor&, at::TensorList, const OptTensor&, bool);
  using EncoderBackward = Tensors(const at::Tensor&, const at::Tensor&, at::TensorList, const OptTensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&);
  static const auto encoder_forward = op<EncoderForward>("seq2seq_fast::encoder_forward");
  static const auto encoder_backward = op<EncoderBackward>("seq2seq_fast::encoder_backward");
  const at::NoGradGuard no_grad;  // the ops' hand-written backward is the gradient: no graph

  const auto [states, layer_inputs, gates] = encoder_forward.call(X, enc_params, enc_layer_mask, true);
  const int64_t L = states.size(0), T = states.size(1) - 1, H = states.size(3);
  // d2l's init_state: the encoder's outputs permuted to (B, T, H), laid out as the decoder reads them.
  const at::Tensor values = states.select(0, L - 1).narrow(0, 1, T).transpose(0, 1).contiguous();
  TORCH_CHECK_TYPE(W_k.scalar_type() == values.scalar_type(), "seq2seq_fast: W_k must have dtype ",
                   values.scalar_type(), " (the encoder's), got ", W_k.scalar_type());
  TORCH_CHECK_VALUE(W_k.device() == values.device(), "seq2seq_fast: W_k must be on ", values.device(),
                    " (the encoder's device), got ", W_k.device());
  TORCH_CHECK_VALUE(W_k.dim() == 2 && W_k.size(0) == H && W_k.size(1) == H, "seq2seq_fast: W_k must have shape (",
                    H, ", ", H, "), got ", W_k.sizes());
  const at::Tensor key_proj = at::linear(values, W_k);
  auto [loss, grad_values, grad_hidden, grad_key_proj, dec_grads] =
      decoder_share(dec_X, values, states.select(1, T), enc_valid_lens, key_proj, dec_params, attn_mask,
                    dec_layer_mask, label, valid_len, chunk_rows);
  // key_proj = values @ W_k^T: the ops autograd's linear runs for its backward.
  const at::Tensor grad_W_k = grad_key_proj.reshape({-1, H}).t().mm(values.reshape({-1, H}));
  grad_values.add_(grad_key_proj.matmul(W_k));
  at::Tensor grad_states = at::zeros_like(states);
  grad_states.select(0, L - 1).narrow(0, 1, T).copy_(grad_values.transpose(0, 1));
  grad_states.select(1, T).add_(grad_hidden);
  Tensors enc_grads =
      encoder_backward.call(grad_states, X, enc_params, enc_layer_mask, states, layer_inputs, gates);
  return {loss, enc_grads, dec_grads, grad_W_k};
}

}  // namespace
}  // namespace seq2seq_fast

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("training_step_grads", &seq2seq_fast::training_step_grads);
}
