// A decoder module's call in one dispatch from Python: decoder_forward, its "needs the
// activations" flag and the views d2l's decoder returns, made here rather than by the
// interpreter (three tensor views and a flag over every parameter were a tenth of a one-step
// decoding call's Python). Composite and device-generic: autograd records decoder_forward and
// the views as it would from Python; torch.compile traces through it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace seq2seq_fast {
namespace {

using OptTensor = c10::optional<at::Tensor>;
using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, at::TensorList,
    const OptTensor&, const OptTensor&, bool);

std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_call(const at::Tensor& X, const at::Tensor& enc_outputs,
                                                            const at::Tensor& hidden, const OptTensor& valid_lens,
                                                            const at::Tensor& key_proj, at::TensorList params,
                                                            const OptTensor& attn_mask, const OptTensor& layer_mask) {
  static const auto forward =
      c10::Dispatcher::singleton().findSchemaOrThrow("seq2seq_fast::decoder_forward", "").typed<Forward>();
  // The backward's activations are kept only when autograd will record the call.
  const bool keep = at::GradMode::is_enabled() &&
                    (enc_outputs.requires_grad() || hidden.requires_grad() || key_proj.requires_grad() ||
                     std::any_of(params.begin(), params.end(), [](const at::Tensor& p) { return p.requires_grad(); }));
  const auto outputs = forward.call(X, enc_outputs, hidden, valid_lens, key_proj, params, attn_mask, layer_mask, keep);
  const at::Tensor& logits = std::get<0>(outputs);
  const at::Tensor& attention = std::get<1>(outputs);
  const at::Tensor& states = std::get<2>(outputs);
  // The final state is a view of the states (the backward reads them anyway); the next call's op
  // lays it out itself.
  return {logits.transpose(0, 1), states.select(1, states.size(1) - 1), attention.transpose(0, 1)};
}

}  // namespace
}  // namespace seq2seq_fast

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeImplicitAutograd, m) {
  m.impl("decoder_call", &seq2seq_fast::decoder_call);
}
