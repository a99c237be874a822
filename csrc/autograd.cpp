// Autograd of the decoder and encoder loops and of the loss, in C++ for every device: the
// forward op runs below autograd and its hand-written backward op is the gradient. (Registered from Python with
// torch.library.register_autograd, each call flattened and unflattened its ~25 arguments with
// pytree in both directions: ~0.4 ms of a 4 ms d2l training step.) FakeTensor tracing goes
// through these kernels too, so torch.compile sees the forward and backward ops.
//
// decoder_call, the decoder module's op, is composed here from decoder_forward with the same
// rule for when autograd records a call.
//
// Each Function saves what its backward reads in a struct of named tensors (Saved below), and
// returns one gradient per forward argument: a Tensor[] argument counts one per element, so the
// backward ops' grad_params map 1:1 onto params.
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gemm_precision.h"

namespace seq2seq_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors = std::vector<at::Tensor>;
using OptTensor = c10::optional<at::Tensor>;

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// The tensors a backward reads, saved under names: Derived lists its named members once, in
// Derived::each(f) (f applied to each member in a fixed order), plus the packed parameters in
// `params`; save() and restore() both walk that one list, so the saved order cannot diverge.
template <typename Derived>
struct Saved {
  Tensors params;

  void save(AutogradContext* ctx) {
    variable_list all;
    static_cast<Derived*>(this)->each([&](at::Tensor& t) { all.push_back(t); });
    all.insert(all.end(), params.begin(), params.end());
    ctx->save_for_backward(all);
  }

  static Derived restore(AutogradContext* ctx) {
    const variable_list all = ctx->get_saved_variables();
    Derived saved;
    size_t i = 0;
    saved.each([&](at::Tensor& t) { t = all[i++]; });
    saved.params.assign(all.begin() + static_cast<std::ptrdiff_t>(i), all.end());
    return saved;
  }
};

// Whether autograd records a call: grad mode is on and some input needs a gradient. When it
// does not (no_grad, frozen weights), the op runs below autograd without a Function node: no
// graph, nothing saved, none of the node's bookkeeping on the per-step decoding path.
bool records(std::initializer_list<const at::Tensor*> tensors, at::TensorList params = {}) {
  if (!at::GradMode::is_enabled()) {
    return false;
  }
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) {
      return true;
    }
  }
  return std::any_of(params.begin(), params.end(), [](const at::Tensor& t) { return t.requires_grad(); });
}

// A backward's GEMMs run in the precision of its forward's (csrc/gemm_precision.h): the forward
// saves the calling thread's setting, the backward restores it for its call.
void save_gemm_precision(AutogradContext* ctx) { ctx->saved_data["bf16_gemm"] = bf16_gemm_enabled(); }

Bf16GemmScope forward_gemm_precision(AutogradContext* ctx) {
  return Bf16GemmScope(ctx->saved_data["bf16_gemm"].toBool());
}

void check_kept(AutogradContext* ctx, const char* op) {
  TORCH_CHECK(ctx->saved_data["keep"].toBool(), "seq2seq_fast::", op,
              " was run with keep_activations=False; run it with keep_activations=True to differentiate it");
}

// ---- decoder --------------------------------------------------------------------------------------

using DecoderOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using DecoderGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, Tensors>;

struct DecoderSaved : Saved<DecoderSaved> {
  at::Tensor X, enc, lens, kp, attn_mask, layer_mask;            // forward arguments (lens, masks: maybe undefined)
  at::Tensor attention, states, inputs, layer_inputs, gates;     // forward outputs

  template <typename F>
  void each(F&& f) {
    for (at::Tensor* t : {&X, &enc, &lens, &kp, &attn_mask, &layer_mask, &attention, &states, &inputs,
                          &layer_inputs, &gates}) {
      f(*t);
    }
  }
};

const auto& decoder_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("seq2seq_fast::decoder_forward", "")
                       .typed<DecoderOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                             const at::Tensor&, at::TensorList, const OptTensor&, const OptTensor&,
                                             bool)>();
  return op;
}

class DecoderFunction : public torch::autograd::Function<DecoderFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& X, const at::Tensor& enc,
                               const at::Tensor& hidden, const OptTensor& lens, const at::Tensor& kp,
                               at::TensorList params, const OptTensor& attn_mask, const OptTensor& layer_mask,
                               bool keep) {
    at::Tensor logits, attention, states, inputs, layer_inputs, gates;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(logits, attention, states, inputs, layer_inputs, gates) =
          decoder_forward_op().call(X, enc, hidden, lens, kp, params, attn_mask, layer_mask, keep);
    }
    ctx->set_materialize_grads(false);  // unused outputs arrive undefined, not as zeros
    ctx->mark_non_differentiable({inputs, layer_inputs, gates});
    ctx->saved_data["keep"] = keep;
    save_gemm_precision(ctx);
    if (keep) {
      DecoderSaved saved;
      saved.X = X;
      saved.enc = enc;
      saved.lens = or_undefined(lens);
      saved.kp = kp;
      saved.attn_mask = or_undefined(attn_mask);
      saved.layer_mask = or_undefined(layer_mask);
      saved.attention = attention;
      saved.states = states;
      saved.inputs = inputs;
      saved.layer_inputs = layer_inputs;
      saved.gates = gates;
      saved.params = params.vec();
      saved.save(ctx);
    }
    return {logits, attention, states, inputs, layer_inputs, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_kept(ctx, "decoder_forward");
    const Bf16GemmScope precision = forward_gemm_precision(ctx);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("seq2seq_fast::decoder_backward", "")
                         .typed<DecoderGrads(const OptTensor&, const OptTensor&, const OptTensor&,
                                             const at::Tensor&, const at::Tensor&, const OptTensor&,
                                             const at::Tensor&, at::TensorList, const OptTensor&, const OptTensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&)>();
    const DecoderSaved s = DecoderSaved::restore(ctx);
    auto [d_enc, d_hidden, d_kp, d_params] =
        op.call(defined_or_none(grads[0]), defined_or_none(grads[1]), defined_or_none(grads[2]), s.X, s.enc,
                defined_or_none(s.lens), s.kp, s.params, defined_or_none(s.attn_mask),
                defined_or_none(s.layer_mask), s.attention, s.states, s.inputs, s.layer_inputs, s.gates);
    // One gradient per forward argument: X, enc, hidden, lens, kp, params..., attn_mask, layer_mask, keep.
    variable_list out{at::Tensor(), d_enc, d_hidden, at::Tensor(), d_kp};
    out.insert(out.end(), d_params.begin(), d_params.end());
    out.insert(out.end(), {at::Tensor(), at::Tensor(), at::Tensor()});
    return out;
  }
};

DecoderOutputs decoder_forward_autograd(const at::Tensor& X, const at::Tensor& enc, const at::Tensor& hidden,
                                        const OptTensor& lens, const at::Tensor& kp, at::TensorList params,
                                        const OptTensor& attn_mask, const OptTensor& layer_mask, bool keep) {
  if (!records({&enc, &hidden, &kp}, params)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return decoder_forward_op().call(X, enc, hidden, lens, kp, params, attn_mask, layer_mask, keep);
  }
  auto out = DecoderFunction::apply(X, enc, hidden, lens, kp, params, attn_mask, layer_mask, keep);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// decoder_call: what a decoder module's call returns, in one dispatch from Python (composite:
// autograd records decoder_forward and the views as it would from Python; torch.compile traces
// through it). The interpreter made the three views and the flag over every parameter, a tenth
// of a one-step decoding call's Python.
std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_call(const at::Tensor& X, const at::Tensor& enc,
                                                            const at::Tensor& hidden, const OptTensor& lens,
                                                            const at::Tensor& kp, at::TensorList params,
                                                            const OptTensor& attn_mask, const OptTensor& layer_mask) {
  // From the top of the dispatcher, so that autograd records the call; the backward's
  // activations are kept only when it will.
  const auto [logits, attention, states, inputs, layer_inputs, gates] = decoder_forward_op().call(
      X, enc, hidden, lens, kp, params, attn_mask, layer_mask, records({&enc, &hidden, &kp}, params));
  // The final state is a view of the states (the backward reads them anyway); the next call's op
  // lays it out itself.
  return {logits.transpose(0, 1), states.select(1, states.size(1) - 1), attention.transpose(0, 1)};
}

// ---- encoder --------------------------------------------------------------------------------------

using EncoderOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct EncoderSaved : Saved<EncoderSaved> {
  at::Tensor X, layer_mask;               // forward arguments (layer_mask maybe undefined)
  at::Tensor states, layer_inputs, gates;  // forward outputs

  template <typename F>
  void each(F&& f) {
    for (at::Tensor* t : {&X, &layer_mask, &states, &layer_inputs, &gates}) {
      f(*t);
    }
  }
};

const auto& encoder_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("seq2seq_fast::encoder_forward", "")
                       .typed<EncoderOutputs(const at::Tensor&, at::TensorList, const OptTensor&, bool)>();
  return op;
}

class EncoderFunction : public torch::autograd::Function<EncoderFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& X, at::TensorList params,
                               const OptTensor& layer_mask, bool keep) {
    at::Tensor states, layer_inputs, gates;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(states, layer_inputs, gates) = encoder_forward_op().call(X, params, layer_mask, keep);
    }
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({layer_inputs, gates});
    ctx->saved_data["keep"] = keep;
    save_gemm_precision(ctx);
    if (keep) {
      EncoderSaved saved;
      saved.X = X;
      saved.layer_mask = or_undefined(layer_mask);
      saved.states = states;
      saved.layer_inputs = layer_inputs;
      saved.gates = gates;
      saved.params = params.vec();
      saved.save(ctx);
    }
    return {states, layer_inputs, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_kept(ctx, "encoder_forward");
    const Bf16GemmScope precision = forward_gemm_precision(ctx);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("seq2seq_fast::encoder_backward", "")
                         .typed<Tensors(const at::Tensor&, const at::Tensor&, at::TensorList, const OptTensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    const EncoderSaved s = EncoderSaved::restore(ctx);
    const at::Tensor grad_states = grads[0].defined() ? grads[0] : at::zeros_like(s.states);
    const Tensors d_params = op.call(grad_states, s.X, s.params, defined_or_none(s.layer_mask), s.states,
                                     s.layer_inputs, s.gates);
    // One gradient per forward argument: X, params..., layer_mask, keep.
    variable_list out{at::Tensor()};
    out.insert(out.end(), d_params.begin(), d_params.end());
    out.insert(out.end(), {at::Tensor(), at::Tensor()});
    return out;
  }
};

EncoderOutputs encoder_forward_autograd(const at::Tensor& X, at::TensorList params, const OptTensor& layer_mask,
                                        bool keep) {
  if (!records({}, params)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return encoder_forward_op().call(X, params, layer_mask, keep);
  }
  auto out = EncoderFunction::apply(X, params, layer_mask, keep);
  return {out[0], out[1], out[2]};
}

// ---- loss -----------------------------------------------------------------------------------------

using LossOutputs = std::tuple<at::Tensor, at::Tensor>;

struct LossSaved : Saved<LossSaved> {
  at::Tensor pred, label, valid_len, lse;

  template <typename F>
  void each(F&& f) {
    for (at::Tensor* t : {&pred, &label, &valid_len, &lse}) {
      f(*t);
    }
  }
};

class LossFunction : public torch::autograd::Function<LossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& label,
                               const at::Tensor& valid_len) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("seq2seq_fast::masked_ce_loss", "")
                         .typed<LossOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    at::Tensor loss, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, lse) = op.call(pred, label, valid_len);
    }
    ctx->mark_non_differentiable({lse});
    LossSaved saved;
    saved.pred = pred;
    saved.label = label;
    saved.valid_len = valid_len;
    saved.lse = lse;
    saved.save(ctx);
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("seq2seq_fast::masked_ce_loss_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&)>();
    const LossSaved s = LossSaved::restore(ctx);
    return {op.call(grads[0], s.pred, s.label, s.valid_len, s.lse), at::Tensor(), at::Tensor()};
  }
};

LossOutputs masked_ce_loss_autograd(const at::Tensor& pred, const at::Tensor& label, const at::Tensor& valid_len) {
  auto out = LossFunction::apply(pred, label, valid_len);
  return {out[0], out[1]};
}

// ---- the fused output layer + loss ----------------------------------------------------------------
// The forward also computes the gradients for grad_loss = ones when an input needs one (no second
// pass over the vocabulary); a uniform grad_loss (stride 0: `l.sum().backward()` hands back an
// expanded scalar, as d2l's training loop makes) scales them, any other grad_loss recomputes the
// logits chunk by chunk in linear_masked_ce_backward.

using LinearLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct LinearLossSaved : Saved<LinearLossSaved> {
  at::Tensor hidden, weight, bias, label, valid_len, lse;  // forward arguments and lse
  at::Tensor grad_hidden, grad_weight, grad_bias;          // for grad_loss = ones, or empty

  template <typename F>
  void each(F&& f) {
    for (at::Tensor* t : {&hidden, &weight, &bias, &label, &valid_len, &lse, &grad_hidden, &grad_weight,
                          &grad_bias}) {
      f(*t);
    }
  }
};

const auto& linear_loss_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("seq2seq_fast::linear_masked_ce", "")
                       .typed<LinearLossOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  return op;
}

class LinearLossFunction : public torch::autograd::Function<LinearLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& label, const at::Tensor& valid_len,
                               int64_t chunk_rows, bool with_grads) {
    at::Tensor loss, lse, g_hidden, g_weight, g_bias;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, lse, g_hidden, g_weight, g_bias) =
          linear_loss_op().call(hidden, weight, bias, label, valid_len, chunk_rows, with_grads);
    }
    ctx->mark_non_differentiable({lse, g_hidden, g_weight, g_bias});
    ctx->saved_data["chunk_rows"] = chunk_rows;
    ctx->saved_data["with_grads"] = with_grads;
    save_gemm_precision(ctx);
    LinearLossSaved saved;
    saved.hidden = hidden;
    saved.weight = weight;
    saved.bias = bias;
    saved.label = label;
    saved.valid_len = valid_len;
    saved.lse = lse;
    saved.grad_hidden = g_hidden;
    saved.grad_weight = g_weight;
    saved.grad_bias = g_bias;
    saved.save(ctx);
    return {loss, lse, g_hidden, g_weight, g_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const LinearLossSaved s = LinearLossSaved::restore(ctx);
    const Bf16GemmScope precision = forward_gemm_precision(ctx);
    const at::Tensor& g = grads[0];
    const at::Tensor none;
    const bool uniform = g.sym_numel() == 1 || (g.sym_numel() > 1 && g.sym_stride(0) == 0);
    if (ctx->saved_data["with_grads"].toBool() && uniform) {
      const at::Tensor c = g.select(0, 0);  // a 0-dim tensor: no host read of its value but on the CPU
      if (c.is_cpu() && !at::isTensorSubclassLike(c) && c.item<double>() == 1.0) {
        // d2l's l.sum().backward(): the gradients as they are, which AccumulateGrad then takes
        // over without a copy (this node's saved references are released before it runs).
        return {s.grad_hidden, s.grad_weight, s.grad_bias, none, none, none, none};
      }
      return {s.grad_hidden.mul(c), s.grad_weight.mul(c), s.grad_bias.mul(c), none, none, none, none};
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("seq2seq_fast::linear_masked_ce_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    auto [d_hidden, d_weight, d_bias] = op.call(g, s.hidden, s.weight, s.bias, s.label, s.valid_len, s.lse,
                                                ctx->saved_data["chunk_rows"].toInt());
    // One gradient per forward argument: hidden, weight, bias, label, valid_len, chunk_rows, with_grads.
    return {d_hidden, d_weight, d_bias, none, none, none, none};
  }
};

LinearLossOutputs linear_masked_ce_autograd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                            const at::Tensor& label, const at::Tensor& valid_len, int64_t chunk_rows,
                                            bool with_grads) {
  if (!records({&hidden, &weight, &bias})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_loss_op().call(hidden, weight, bias, label, valid_len, chunk_rows, with_grads);
  }
  auto out = LinearLossFunction::apply(hidden, weight, bias, label, valid_len, chunk_rows, with_grads);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// project_keys has no backward (it makes decoding's keys; a call that needs gradients projects
// through torch): such a call is refused rather than answered with keys cut off from the graph.
std::tuple<at::Tensor, at::Tensor> project_keys_autograd(const at::Tensor& enc_outputs, const at::Tensor& W_k) {
  TORCH_CHECK_VALUE(!records({&enc_outputs, &W_k}),
                    "seq2seq_fast: project_keys has no backward: call it without gradients (torch.no_grad()) "
                    "or project with torch.nn.functional.linear");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("seq2seq_fast::project_keys", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(enc_outputs, W_k);
}

}  // namespace
}  // namespace seq2seq_fast

TORCH_LIBRARY_IMPL(seq2seq_fast, Autograd, m) {
  m.impl("linear_masked_ce", &seq2seq_fast::linear_masked_ce_autograd);
  m.impl("decoder_forward", &seq2seq_fast::decoder_forward_autograd);
  m.impl("encoder_forward", &seq2seq_fast::encoder_forward_autograd);
  m.impl("masked_ce_loss", &seq2seq_fast::masked_ce_loss_autograd);
  m.impl("project_keys", &seq2seq_fast::project_keys_autograd);
  m.impl("keep_mask", torch::CppFunction::makeFallthrough());  // a constant: no gradient
}

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeImplicitAutograd, m) {
  m.impl("decoder_call", &seq2seq_fast::decoder_call);
}
