// Argument checks of every seq2seq_fast op, for every device: the CPU ops and the CUDA ops call
// the same functions with their device type and the dtypes their kernels run in. Each check runs
// before any data pointer is read, and each failure names the argument, what was expected and
// what came; TORCH_CHECK_VALUE / TYPE / INDEX raise ValueError / TypeError / IndexError in
// Python. Also here: the packed parameter lists of the decoder and encoder ops (csrc/ops.cpp
// documents their order), unpacked once into named members.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <ostream>
#include <string>
#include <vector>

namespace seq2seq_fast {

// The dtypes each device's kernels run in (CUDA computes half and bfloat16 in float).
inline constexpr at::ScalarType kCpuFloats[] = {at::kFloat, at::kDouble};
inline constexpr at::ScalarType kCudaFloats[] = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};

// Sizes of a call. Decoder: B rows, S steps, T keys, H hidden units, E embedding width, V
// vocabulary, L GRU layers. Encoder: S is its number of time steps and T is unused (0).
struct Sizes {
  int64_t B = 0, S = 0, T = 0, H = 0, E = 0, V = 0, L = 0;
};

// Where a call runs and in which dtype: those of its reference argument (enc_outputs for the
// decoder ops, the embedding for the encoder ops, pred for the loss), which every other float
// argument must share.
struct Placement {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  const char* reference = "";
};

// The name of params[index] in messages, e.g. "params[3] (w_ih[0])"; formatted only when a
// check fails.
struct ParamName {
  int64_t index;
  const char* what;
  int64_t layer = -1;
};

inline std::ostream& operator<<(std::ostream& out, const ParamName& p) {
  out << "params[" << p.index << "] (" << p.what;
  if (p.layer >= 0) {
    out << "[" << p.layer << "]";
  }
  return out << ")";
}

inline std::string dtype_names(c10::ArrayRef<at::ScalarType> allowed) {
  // "float32 or float64", "float16, bfloat16, float32 or float64"
  auto name = [](at::ScalarType t) {
    switch (t) {
      case at::kHalf: return "float16";
      case at::kBFloat16: return "bfloat16";
      case at::kFloat: return "float32";
      case at::kDouble: return "float64";
      default: return c10::toString(t);
    }
  };
  std::string out;
  for (size_t i = 0; i < allowed.size(); ++i) {
    out += i == 0 ? "" : (i + 1 == allowed.size() ? " or " : ", ");
    out += name(allowed[i]);
  }
  return out;
}

// Checks the reference argument: a tensor of a device of type `device_type` in one of the
// `allowed` dtypes. Returns the placement the other arguments are checked against.
inline Placement check_reference(const at::Tensor& t, const char* name, at::DeviceType device_type,
                                 c10::ArrayRef<at::ScalarType> allowed) {
  TORCH_CHECK_TYPE(std::find(allowed.begin(), allowed.end(), t.scalar_type()) != allowed.end(), "seq2seq_fast: ",
                   name, " must be ", dtype_names(allowed), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().type() == device_type, "seq2seq_fast: ", name, " must be a ",
                    c10::DeviceTypeName(device_type), " tensor, got device ", t.device());
  return {t.device(), t.scalar_type(), name};
}

// A float argument: on the reference's device, in its dtype.
template <typename Name>
void check_float(const at::Tensor& t, const Name& name, const Placement& on) {
  TORCH_CHECK_VALUE(t.device() == on.device, "seq2seq_fast: ", name, " must be on ", on.reference, "'s device ",
                    on.device, ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == on.dtype, "seq2seq_fast: ", name, " must have dtype ", on.dtype,
                   " (the dtype of ", on.reference, "), got ", t.scalar_type());
}

template <typename Name>
void check_shape(const at::Tensor& t, const Name& name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "seq2seq_fast: ", name, " must have shape ", expected, ", got ",
                    t.sizes());
}

template <typename Name>
void check_float(const at::Tensor& t, const Name& name, const Placement& on, at::IntArrayRef expected) {
  check_float(t, name, on);
  check_shape(t, name, expected);
}

inline void check_float(const c10::optional<at::Tensor>& t, const char* name, const Placement& on,
                        at::IntArrayRef expected) {
  if (t.has_value()) {
    check_float(*t, name, on, expected);
  }
}

// Token ids: int64 (B, steps) on the call's device (values: check_values).
inline void check_token_layout(const at::Tensor& X, const char* name, const Placement& on) {
  TORCH_CHECK_VALUE(X.device() == on.device, "seq2seq_fast: ", name, " must be on device ", on.device, ", got ",
                    X.device());
  TORCH_CHECK_TYPE(X.scalar_type() == at::kLong, "seq2seq_fast: ", name, " must hold int64 token ids, got dtype ",
                   X.scalar_type());
  TORCH_CHECK_VALUE(X.dim() == 2, "seq2seq_fast: ", name, " must have shape (B, steps), got ", X.sizes());
}

// Lengths: int64 (B,) on the call's device (values: check_values).
inline void check_lens_layout(const c10::optional<at::Tensor>& lens, const char* name, int64_t B,
                              const Placement& on) {
  if (!lens.has_value()) {
    return;
  }
  const at::Tensor& v = *lens;
  TORCH_CHECK_VALUE(v.device() == on.device, "seq2seq_fast: ", name, " must be on ", on.reference, "'s device ",
                    on.device, ", got ", v.device());
  TORCH_CHECK_TYPE(v.scalar_type() == at::kLong, "seq2seq_fast: ", name, " must be int64, got dtype ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == B, "seq2seq_fast: ", name, " must have shape (", B, ",), got ",
                    v.sizes());
}

// A device's "is the current stream being captured into a CUDA graph?" (CUDA: stream_is_capturing);
// null on the CPU, where reading values syncs nothing.
using CaptureQuery = bool (*)();

inline void raise_bad_token(const char* name, int64_t bad, int64_t vocab) {
  TORCH_CHECK_INDEX(false, "seq2seq_fast: ", name, " holds token id ", bad, ", outside the vocabulary [0, ", vocab,
                    ")");
}

inline void raise_bad_length(const char* name, int64_t low) {
  TORCH_CHECK_VALUE(false, "seq2seq_fast: ", name, " must hold lengths >= 0, got ", low);
}

// The values of the integer arguments (layouts checked before): every token id of `tokens` (if
// given) in [0, vocab), every length of `lens` (if given) >= 0; lengths >= T are legal and mean
// all keys. On the CPU the values are read in place. Elsewhere their bounds come to the host in
// one copy, the call's only host sync, skipped while `capturing()` (a CUDA graph being captured):
// the kernels then rely on their clamps (ids clamped into the table, lengths <= 0 read as "all
// keys, uniform").
inline void check_values(const at::Tensor* tokens, const char* tokens_name, int64_t vocab,
                         const c10::optional<at::Tensor>& lens, const char* lens_name, CaptureQuery capturing) {
  const bool has_tokens = tokens != nullptr && tokens->numel() > 0;
  const bool has_lens = lens.has_value() && lens->numel() > 0;
  if (!has_tokens && !has_lens) {
    return;
  }
  int64_t low_len = 0;
  if ((has_tokens ? *tokens : *lens).device().is_cpu()) {
    if (has_tokens) {
      const at::Tensor ids = tokens->contiguous();
      const int64_t* p = ids.data_ptr<int64_t>();
      for (int64_t i = 0; i < ids.numel(); ++i) {
        if (p[i] < 0 || p[i] >= vocab) {
          raise_bad_token(tokens_name, p[i], vocab);  // the first bad id in memory order
        }
      }
    }
    if (has_lens) {
      const at::Tensor v = lens->contiguous();
      low_len = *std::min_element(v.data_ptr<int64_t>(), v.data_ptr<int64_t>() + v.numel());
    }
  } else if (capturing == nullptr || !capturing()) {
    std::vector<at::Tensor> bounds;  // [min id, max id,] [min length]
    if (has_tokens) {
      const auto [low, high] = at::aminmax(*tokens);
      bounds.push_back(low);
      bounds.push_back(high);
    }
    if (has_lens) {
      bounds.push_back(lens->min());
    }
    const at::Tensor host = at::stack(bounds).to(at::kCPU);
    const int64_t* b = host.data_ptr<int64_t>();
    if (has_tokens && (b[0] < 0 || b[1] >= vocab)) {
      raise_bad_token(tokens_name, b[0] < 0 ? b[0] : b[1], vocab);
    }
    low_len = has_lens ? b[bounds.size() - 1] : 0;
  }
  if (low_len < 0) {
    raise_bad_length(lens_name, low_len);
  }
}

// The inter-layer dropout keep-mask (L - 1, steps, B, H) of a decoder or encoder call.
inline void check_layer_mask(const Sizes& s, int64_t steps, const c10::optional<at::Tensor>& layer_mask,
                             const Placement& on) {
  TORCH_CHECK_VALUE(!layer_mask.has_value() || s.L > 1, "seq2seq_fast: layer_mask needs >= 2 layers, got L = ",
                    s.L);
  check_float(layer_mask, "layer_mask", on, {s.L - 1, steps, s.B, s.H});
}

// Dropout keep-masks of a decoder call: attn_mask (steps, B, T), layer_mask (L - 1, steps, B, H).
inline void check_masks(const Sizes& s, int64_t steps, const c10::optional<at::Tensor>& attn_mask,
                        const c10::optional<at::Tensor>& layer_mask, const Placement& on) {
  check_float(attn_mask, "attn_mask", on, {steps, s.B, s.T});
  check_layer_mask(s, steps, layer_mask, on);
}

inline c10::optional<at::Tensor> contiguous_opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

template <typename T>
T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// ---- packed parameters ------------------------------------------------------------------------

// A multi-layer GRU's parameters, one tensor per layer each, gate order r, z, n (torch's).
struct GruWeights {
  std::vector<at::Tensor> w_ih, w_hh, b_ih, b_hh;
};

// The decoder ops' params: [embedding (V, E), W_q (H, H), w_v (1, H),
// w_ih_0 .. w_ih_{L-1}, w_hh_0 .., b_ih_0 .., b_hh_0 .., dense_weight (V, H), dense_bias (V,)];
// w_ih_0 is (3H, H + E) (layer 0 reads [context ; embedding]), w_ih_k (3H, H), w_hh_k (3H, H),
// b_*_k (3H,). All checked and contiguous.
struct DecoderWeights : GruWeights {
  at::Tensor embedding, W_q, w_v, dense_w, dense_b;
  int64_t V = 0, E = 0, H = 0, L = 0;

  static constexpr int64_t kFixed = 5;  // tensors besides the 4L GRU ones

  // [W_q ; W_hh of the top layer] (4H, H): both read the previous top state, so one GEMM per
  // step serves the query and the top layer's recurrent gates.
  at::Tensor query_and_top_weights() const { return at::cat({W_q, w_hh.back()}, 0).contiguous(); }
};

// The encoder ops' params: [embedding (V, E), w_ih_0 .. w_ih_{L-1}, w_hh_0 .., b_ih_0 ..,
// b_hh_0 ..]; w_ih_0 is (3H, E), w_ih_k (3H, H), w_hh_k (3H, H), b_*_k (3H,).
struct EncoderWeights : GruWeights {
  at::Tensor embedding;
  int64_t V = 0, E = 0, H = 0, L = 0;

  static constexpr int64_t kFixed = 1;
};

// L of a list of `fixed` + 4L tensors, L >= 1, else a ValueError that spells out the order.
inline int64_t packed_layers(at::TensorList params, int64_t fixed, const char* order) {
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n >= fixed + 4 && (n - fixed) % 4 == 0, "seq2seq_fast: params must list ", order, " (",
                    fixed, " + 4L tensors for L >= 1 GRU layers), got ", n, " tensors");
  return (n - fixed) / 4;
}

// Checks the 4L GRU tensors of `params` from `first` on (w_ih.., w_hh.., b_ih.., b_hh..), layer
// 0's input of width `in0`, and returns them contiguous.
inline GruWeights unpack_gru(at::TensorList params, int64_t first, int64_t L, int64_t in0, int64_t H,
                             const Placement& on) {
  const char* groups[] = {"w_ih", "w_hh", "b_ih", "b_hh"};
  GruWeights w;
  std::vector<at::Tensor>* lists[] = {&w.w_ih, &w.w_hh, &w.b_ih, &w.b_hh};
  for (int64_t g = 0; g < 4; ++g) {
    for (int64_t k = 0; k < L; ++k) {
      const int64_t i = first + g * L + k;
      const at::Tensor& t = params[i];
      const int64_t shape[] = {3 * H, g == 0 && k == 0 ? in0 : H};  // weights (3H, in), biases (3H,)
      check_float(t, ParamName{i, groups[g], k}, on, at::IntArrayRef(shape, g < 2 ? 2 : 1));
      lists[g]->push_back(t.contiguous());
    }
  }
  return w;
}

// The decoder ops' params (order above), checked against H = enc_outputs' width and `on`.
inline DecoderWeights unpack_decoder_params(at::TensorList params, int64_t H, const Placement& on) {
  const int64_t L = packed_layers(
      params, DecoderWeights::kFixed,
      "[embedding, W_q, w_v, w_ih x L, w_hh x L, b_ih x L, b_hh x L, dense_weight, dense_bias]");
  const at::Tensor& embedding = params[0];
  check_float(embedding, ParamName{0, "embedding"}, on);
  TORCH_CHECK_VALUE(embedding.dim() == 2, "seq2seq_fast: params[0] (embedding) must have shape (V, E), got ",
                    embedding.sizes());
  const int64_t dense = DecoderWeights::kFixed - 2 + 4 * L;  // index of dense_weight
  const at::Tensor& dense_w = params[dense];
  check_float(dense_w, ParamName{dense, "dense_weight"}, on);
  TORCH_CHECK_VALUE(dense_w.dim() == 2 && dense_w.size(1) == H, "seq2seq_fast: ",
                    ParamName{dense, "dense_weight"}, " must have shape (V, ", H, "), got ", dense_w.sizes());
  DecoderWeights w;
  w.V = dense_w.size(0);
  w.E = embedding.size(1);
  w.H = H;
  w.L = L;
  check_float(params[1], ParamName{1, "W_q"}, on, {H, H});
  check_float(params[2], ParamName{2, "w_v"}, on, {1, H});
  check_float(params[dense + 1], ParamName{dense + 1, "dense_bias"}, on, {w.V});
  static_cast<GruWeights&>(w) = unpack_gru(params, 3, L, H + w.E, H, on);
  w.embedding = embedding.contiguous();
  w.W_q = params[1].contiguous();
  w.w_v = params[2].contiguous();
  w.dense_w = dense_w.contiguous();
  w.dense_b = params[dense + 1].contiguous();
  return w;
}

// The encoder ops' params (order above); the embedding is the reference: on a `device_type`
// device in one of the `allowed` dtypes. Returns the weights and, in `on`, the placement.
inline EncoderWeights unpack_encoder_params(at::TensorList params, at::DeviceType device_type,
                                            c10::ArrayRef<at::ScalarType> allowed, Placement* on) {
  const int64_t L =
      packed_layers(params, EncoderWeights::kFixed, "[embedding, w_ih x L, w_hh x L, b_ih x L, b_hh x L]");
  const at::Tensor& embedding = params[0];
  *on = check_reference(embedding, "embedding", device_type, allowed);
  TORCH_CHECK_VALUE(embedding.dim() == 2, "seq2seq_fast: params[0] (embedding) must have shape (V, E), got ",
                    embedding.sizes());
  const int64_t hh0 = 1 + L;  // w_hh_0 fixes H
  check_float(params[hh0], ParamName{hh0, "w_hh", 0}, *on);
  TORCH_CHECK_VALUE(params[hh0].dim() == 2, "seq2seq_fast: ", ParamName{hh0, "w_hh", 0},
                    " must have shape (3H, H), got ", params[hh0].sizes());
  EncoderWeights w;
  w.V = embedding.size(0);
  w.E = embedding.size(1);
  w.H = params[hh0].size(1);
  w.L = L;
  static_cast<GruWeights&>(w) = unpack_gru(params, 1, L, w.E, w.H, *on);
  w.embedding = embedding.contiguous();
  return w;
}

// enc_outputs (B >= 1, T >= 1, H) as the reference of a decoder call: its sizes.
inline Sizes check_enc_outputs(const at::Tensor& enc, const Placement& on) {
  TORCH_CHECK_VALUE(enc.dim() == 3 && enc.size(0) > 0 && enc.size(1) > 0,
                    "seq2seq_fast: enc_outputs must have shape (B >= 1, T >= 1, H), got ", enc.sizes());
  Sizes s;
  s.B = enc.size(0);
  s.T = enc.size(1);
  s.H = enc.size(2);
  return s;
}

// What every decoder op shares: enc_outputs (B >= 1, T >= 1, H), whose placement `on` is (from
// check_reference, run first so that a CUDA op can set its device guard), key_proj (B, T, H),
// valid_lens (B,) (layout), the params. Fills the sizes but S.
inline DecoderWeights check_decoder(const at::Tensor& enc, const at::Tensor& key_proj,
                                    const c10::optional<at::Tensor>& lens, at::TensorList params, const Placement& on,
                                    Sizes* s) {
  *s = check_enc_outputs(enc, on);
  DecoderWeights w = unpack_decoder_params(params, s->H, on);
  s->E = w.E;
  s->V = w.V;
  s->L = w.L;
  check_float(key_proj, "key_proj", on, {s->B, s->T, s->H});
  check_lens_layout(lens, "enc_valid_lens", s->B, on);
  return w;
}

// Token ids X of a decoder call: (B, S) with S >= 0 (layout only; values: check_values).
inline void check_decoder_tokens(const at::Tensor& X, const Placement& on, Sizes* s) {
  check_token_layout(X, "X", on);
  TORCH_CHECK_VALUE(X.size(0) == s->B, "seq2seq_fast: X must have the state's batch size B=", s->B,
                    " (shape (B, S)), got ", X.sizes());
  s->S = X.size(1);
}

// What decoder_backward reads besides the forward's arguments: the forward's outputs attention
// (S, B, T), states (L, S + 1, B, H), inputs (S, B, H + E), gates (S, L, B, 4H), layer_inputs
// (L - 1, S, B, H) when a layer mask was used, and the gradients of logits (S, B, V), attention
// and states (each may be None).
inline void check_decoder_activations(const Sizes& s, const at::Tensor& attention, const at::Tensor& states,
                                      const at::Tensor& inputs, const at::Tensor& layer_inputs,
                                      const at::Tensor& gates, bool masked,
                                      const c10::optional<at::Tensor>& grad_logits,
                                      const c10::optional<at::Tensor>& grad_attention,
                                      const c10::optional<at::Tensor>& grad_states, const Placement& on) {
  const int64_t B = s.B, S = s.S, T = s.T, H = s.H, L = s.L;
  check_float(attention, "attention", on, {S, B, T});
  check_float(states, "states", on, {L, S + 1, B, H});
  check_float(inputs, "inputs", on, {S, B, H + s.E});
  check_float(gates, "gates", on, {S, L, B, 4 * H});
  if (masked) {
    check_float(layer_inputs, "layer_inputs", on, {L - 1, S, B, H});
  }
  check_float(grad_logits, "grad_logits", on, {S, B, s.V});
  check_float(grad_attention, "grad_attention", on, {S, B, T});
  check_float(grad_states, "grad_states", on, {L, S + 1, B, H});
}

// What greedy decoding adds: hidden (L, B, H), 1 <= max_len < 2^31 (the CUDA step counter is
// 32-bit), one embedding row per output token, bos and eos in [0, V). Sets S = max_len.
inline void check_greedy(const DecoderWeights& w, const at::Tensor& hidden, int64_t bos, int64_t eos,
                         int64_t max_len, const Placement& on, Sizes* s) {
  check_float(hidden, "hidden_state", on, {s->L, s->B, s->H});
  TORCH_CHECK_VALUE(max_len >= 1, "seq2seq_fast: max_len must be >= 1, got ", max_len);
  TORCH_CHECK_VALUE(max_len < (int64_t{1} << 31), "seq2seq_fast: max_len must be < 2^31, got ", max_len);
  TORCH_CHECK_VALUE(w.embedding.size(0) == s->V, "seq2seq_fast: params[0] (embedding) must have one row per ",
                    "output token (", s->V, "), got ", w.embedding.sizes());
  TORCH_CHECK_INDEX(bos >= 0 && bos < s->V, "seq2seq_fast: bos must be a token id in [0, ", s->V, "), got ", bos);
  TORCH_CHECK_INDEX(eos >= 0 && eos < s->V, "seq2seq_fast: eos must be a token id in [0, ", s->V, "), got ", eos);
  s->S = max_len;
}

// An encoder call's token ids X (B >= 1, T) and layer_mask, checked against its weights; X's
// values as check_values (`capturing` as there). Returns the sizes, S = T.
inline Sizes check_encoder(const at::Tensor& X, const EncoderWeights& w, const c10::optional<at::Tensor>& layer_mask,
                           const Placement& on, CaptureQuery capturing) {
  check_token_layout(X, "X", on);
  TORCH_CHECK_VALUE(X.size(0) >= 1, "seq2seq_fast: X must have at least one row, got shape ", X.sizes());
  Sizes s;
  s.B = X.size(0);
  s.S = X.size(1);
  s.H = w.H;
  s.E = w.E;
  s.V = w.V;
  s.L = w.L;
  check_layer_mask(s, s.S, layer_mask, on);
  check_values(&X, "X", w.V, c10::nullopt, "", capturing);
  return s;
}

// What encoder_backward reads besides the forward's arguments: grad_states and states
// (L, T + 1, B, H), gates (L, T, B, 4H), layer_inputs (L - 1, T, B, H) when a layer mask was used.
inline void check_encoder_activations(const Sizes& s, const at::Tensor& grad_states, const at::Tensor& states,
                                      const at::Tensor& layer_inputs, const at::Tensor& gates, bool masked,
                                      const Placement& on) {
  check_float(grad_states, "grad_states", on, {s.L, s.S + 1, s.B, s.H});
  check_float(states, "states", on, {s.L, s.S + 1, s.B, s.H});
  check_float(gates, "gates", on, {s.L, s.S, s.B, 4 * s.H});
  if (masked) {
    check_float(layer_inputs, "layer_inputs", on, {s.L - 1, s.S, s.B, s.H});
  }
}

// ---- each decoder op's checks, for every device ---------------------------------------------------
// `on`: check_reference(enc_outputs, ...); `capturing`: as check_values. Each returns the
// unpacked params and fills the sizes.

inline DecoderWeights check_decoder_forward(const at::Tensor& X, const at::Tensor& enc, const at::Tensor& hidden,
                                            const c10::optional<at::Tensor>& lens, const at::Tensor& key_proj,
                                            at::TensorList params, const c10::optional<at::Tensor>& attn_mask,
                                            const c10::optional<at::Tensor>& layer_mask, const Placement& on,
                                            Sizes* s, CaptureQuery capturing) {
  DecoderWeights w = check_decoder(enc, key_proj, lens, params, on, s);
  check_float(hidden, "hidden_state", on, {s->L, s->B, s->H});
  check_decoder_tokens(X, on, s);
  check_masks(*s, s->S, attn_mask, layer_mask, on);
  check_values(&X, "X", w.embedding.size(0), lens, "enc_valid_lens", capturing);
  return w;
}

inline DecoderWeights check_decoder_backward(
    const c10::optional<at::Tensor>& grad_logits, const c10::optional<at::Tensor>& grad_attention,
    const c10::optional<at::Tensor>& grad_states, const at::Tensor& X, const at::Tensor& enc,
    const c10::optional<at::Tensor>& lens, const at::Tensor& key_proj, at::TensorList params,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& layer_mask,
    const at::Tensor& attention, const at::Tensor& states, const at::Tensor& inputs, const at::Tensor& layer_inputs,
    const at::Tensor& gates, const Placement& on, Sizes* s, CaptureQuery capturing) {
  DecoderWeights w = check_decoder(enc, key_proj, lens, params, on, s);
  check_decoder_tokens(X, on, s);
  check_masks(*s, s->S, attn_mask, layer_mask, on);
  check_decoder_activations(*s, attention, states, inputs, layer_inputs, gates, layer_mask.has_value(), grad_logits,
                            grad_attention, grad_states, on);
  check_values(&X, "X", w.embedding.size(0), lens, "enc_valid_lens", capturing);
  return w;
}

// `lens_values`: whether to check valid_lens' values here (the CUDA op folds them into its one
// host read at the end instead).
inline DecoderWeights check_greedy_decode(const at::Tensor& enc, const at::Tensor& hidden,
                                          const c10::optional<at::Tensor>& lens, const at::Tensor& key_proj,
                                          at::TensorList params, const c10::optional<at::Tensor>& attn_mask,
                                          const c10::optional<at::Tensor>& layer_mask, int64_t bos, int64_t eos,
                                          int64_t max_len, const Placement& on, Sizes* s, bool lens_values) {
  DecoderWeights w = check_decoder(enc, key_proj, lens, params, on, s);
  check_greedy(w, hidden, bos, eos, max_len, on, s);
  check_masks(*s, max_len, attn_mask, layer_mask, on);
  if (lens_values) {
    check_values(nullptr, "", 0, lens, "enc_valid_lens", nullptr);
  }
  return w;
}

// ---- the loss and the dropout keep-mask, for every device ------------------------------------

// The targets of a loss over (B, S) rows of V classes (s: B, S, V): label (B, S) int64 ids in [0, V);
// valid_len (B,) int64 >= 0 (values as check_values, `capturing` as there).
inline void check_loss_targets(const at::Tensor& label, const at::Tensor& valid_len, const Sizes& s,
                               const Placement& on, CaptureQuery capturing) {
  check_token_layout(label, "label", on);
  check_shape(label, "label", {s.B, s.S});
  // Named valid_lens in messages, as the decoder's lengths (callers match on that name).
  check_lens_layout(valid_len, "valid_len", s.B, on);
  check_values(&label, "label", s.V, valid_len, "valid_len", capturing);
}

// masked_ce_loss(_backward)'s pred (B, S, V >= 1), whose placement `on` is (from check_reference,
// run first so that a CUDA op can set its device guard); label (B, S) int64 ids in [0, V);
// valid_len (B,) int64 >= 0 (values as check_values, `capturing` as there). Returns (B, S, V).
inline Sizes check_loss(const at::Tensor& pred, const at::Tensor& label, const at::Tensor& valid_len,
                        const Placement& on, CaptureQuery capturing) {
  TORCH_CHECK_VALUE(pred.dim() == 3 && pred.size(2) >= 1, "seq2seq_fast: pred must have shape (B, S, V >= 1), got ",
                    pred.sizes());
  Sizes s;
  s.B = pred.size(0);
  s.S = pred.size(1);
  s.V = pred.size(2);
  check_loss_targets(label, valid_len, s, on, capturing);
  return s;
}

// linear_masked_ce(_backward)'s hidden (B, S, H >= 1), whose placement `on` is (from
// check_reference, run first); weight (V >= 1, H), bias (V,); label and valid_len as check_loss's;
// chunk_rows >= 1. Returns B, S, H, V.
inline Sizes check_linear_loss(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& label, const at::Tensor& valid_len, int64_t chunk_rows,
                               const Placement& on, CaptureQuery capturing) {
  TORCH_CHECK_VALUE(hidden.dim() == 3 && hidden.size(2) >= 1,
                    "seq2seq_fast: hidden must have shape (B, S, H >= 1), got ", hidden.sizes());
  Sizes s;
  s.B = hidden.size(0);
  s.S = hidden.size(1);
  s.H = hidden.size(2);
  check_float(weight, "weight", on);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) == s.H,
                    "seq2seq_fast: weight must have shape (V >= 1, H = ", s.H, "), got ", weight.sizes());
  s.V = weight.size(0);
  check_float(bias, "bias", on, {s.V});
  TORCH_CHECK_VALUE(chunk_rows >= 1, "seq2seq_fast: chunk_rows must be >= 1, got ", chunk_rows);
  check_loss_targets(label, valid_len, s, on, capturing);
  return s;
}

// The rows linear_masked_ce reads, in memory order: hidden (B, S, H) as a view of step-major
// (S, B, H) memory (the decoder's top states) stays as it is, anything else is made contiguous.
// `hidden` is then (D0, D1, H) contiguous with (D0, D1) = (S, B) when step_major, else (B, S), and
// `label` (D0, D1) in the same order.
struct LinearLossRows {
  at::Tensor hidden, label;
  bool step_major;
};

inline LinearLossRows linear_loss_rows(const at::Tensor& hidden, const at::Tensor& label) {
  if (!hidden.is_contiguous() && hidden.transpose(0, 1).is_contiguous()) {
    return {hidden.transpose(0, 1), label.t().contiguous(), true};
  }
  return {hidden.contiguous(), label.contiguous(), false};
}

// A (D0, D1, ...) tensor in the rows' order as (B, S, ...): a view.
inline at::Tensor batch_major(const at::Tensor& rows, bool step_major) {
  return step_major ? rows.transpose(0, 1) : rows;
}

// The rows the loss kernels read: step-major logits (a (B, S, V) view of (S, B, V) memory, as the
// decoder hands them out) stay as they are, anything else is made contiguous. Rows keep V
// contiguous values either way, at b * stride(0) + s * stride(1).
inline at::Tensor loss_rows(const at::Tensor& pred) {
  return pred.transpose(0, 1).is_contiguous() ? pred : pred.contiguous();
}

// What masked_ce_loss_backward reads besides the forward's arguments: grad_loss (B,), lse (B, S),
// on `loss`: the device and dtype of the forward's loss.
inline void check_loss_backward(const Sizes& s, const at::Tensor& grad_loss, const at::Tensor& lse,
                                const Placement& loss) {
  check_float(grad_loss, "grad_loss", loss, {s.B});
  check_float(lse, "lse", loss, {s.B, s.S});
}

// keep_mask's like (its dtype one of `allowed`; the dispatcher chose the device) and p in [0, 1].
inline void check_keep_mask(const at::Tensor& like, double p, c10::ArrayRef<at::ScalarType> allowed) {
  TORCH_CHECK_TYPE(std::find(allowed.begin(), allowed.end(), like.scalar_type()) != allowed.end(),
                   "seq2seq_fast: keep_mask makes ", dtype_names(allowed), " masks, got ", like.scalar_type());
  TORCH_CHECK_VALUE(p >= 0 && p <= 1, "seq2seq_fast: the dropout probability p must be in [0, 1], got ", p);
}

// The keep-mask's threshold on 32 random bits: u >= threshold with u uniform over 2^32 values
// has probability 1 - p (to 2^-32). Both devices compare the high 32 bits of a SplitMix64 output.
inline uint32_t keep_threshold(double p) {
  return static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
}

// Gradients of the packed params, in their order: [embedding, W_q, w_v, w_ih.., w_hh.., b_ih..,
// b_hh.., dense_weight, dense_bias] (decoder) or [embedding, w_ih.., w_hh.., b_ih.., b_hh..].
inline std::vector<at::Tensor> pack_grads(std::initializer_list<at::Tensor> head, const GruWeights& gru,
                                          std::initializer_list<at::Tensor> tail) {
  std::vector<at::Tensor> out(head);
  for (const auto* list : {&gru.w_ih, &gru.w_hh, &gru.b_ih, &gru.b_hh}) {
    out.insert(out.end(), list->begin(), list->end());
  }
  out.insert(out.end(), tail);
  return out;
}

}  // namespace seq2seq_fast
