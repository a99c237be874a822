// The attention decoder's step loop on CPU: teacher-forced forward, hand-written backward
// through time, and batched greedy decoding. Layouts (all row-major, contiguous):
//   logits (S, B, V), attention (S, B, T), states (L, S + 1, B, H) with states[:, 0] = hidden,
//   inputs (S, B, H + E) = layer 0's input [context ; embedding] per step,
//   layer_inputs (L - 1, S, B, H) = dropped-out inputs of layers 1.. (training with dropout),
//   gates (S, L, B, 4H) = [r | z | n | W_hn h + b_hn] per step and layer (kept for backward).
// Every buffer is allocated before the loop; the loop calls BLAS and the fused row kernels only.
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "cpu/kernels.h"

namespace seq2seq_fast::cpu {
namespace {

struct Sizes {
  int64_t B, S, T, H, E, V, L;
};

// Checks the parameters and returns the sizes; X may be undefined (greedy decoding).
Sizes check_decoder(const at::Tensor& enc, const at::Tensor& hidden, const c10::optional<at::Tensor>& lens,
                    const at::Tensor& key_proj, const at::Tensor& embedding, const at::Tensor& W_q,
                    const at::Tensor& w_v, at::TensorList w_ih, at::TensorList w_hh, at::TensorList b_ih,
                    at::TensorList b_hh, const at::Tensor& dense_w, const c10::optional<at::Tensor>& dense_b) {
  TORCH_CHECK_TYPE(enc.scalar_type() == at::kFloat || enc.scalar_type() == at::kDouble,
                   "seq2seq_fast: enc_outputs must be float32 or float64, got ", enc.scalar_type());
  const auto dtype = enc.scalar_type();
  check_cpu_float(enc, "enc_outputs", dtype);
  TORCH_CHECK_VALUE(enc.dim() == 3 && enc.size(0) > 0 && enc.size(1) > 0,
                    "seq2seq_fast: enc_outputs must have shape (B >= 1, T >= 1, H), got ", enc.sizes());
  Sizes s{};
  s.B = enc.size(0);
  s.T = enc.size(1);
  s.H = enc.size(2);
  s.L = static_cast<int64_t>(w_ih.size());
  const bool biases = !b_ih.empty() || !b_hh.empty();  // the backward passes none
  TORCH_CHECK_VALUE(s.L >= 1 && w_hh.size() == w_ih.size() &&
                        (!biases || (b_ih.size() == w_ih.size() && b_hh.size() == w_ih.size())),
                    "seq2seq_fast: w_ih, w_hh, b_ih, b_hh must list one tensor per GRU layer (>= 1), got ",
                    w_ih.size(), ", ", w_hh.size(), ", ", b_ih.size(), ", ", b_hh.size());
  check_cpu_float(embedding, "embedding", dtype);
  TORCH_CHECK_VALUE(embedding.dim() == 2, "seq2seq_fast: embedding must have shape (V, E), got ",
                    embedding.sizes());
  s.E = embedding.size(1);
  check_cpu_float(dense_w, "dense_weight", dtype);
  TORCH_CHECK_VALUE(dense_w.dim() == 2 && dense_w.size(1) == s.H,
                    "seq2seq_fast: dense_weight must have shape (V, ", s.H, "), got ", dense_w.sizes());
  s.V = dense_w.size(0);
  if (dense_b.has_value()) {
    check_cpu_float(*dense_b, "dense_bias", dtype);
    check_shape(*dense_b, "dense_bias", {s.V});
  }
  check_cpu_float(hidden, "hidden", dtype);
  check_shape(hidden, "hidden", {s.L, s.B, s.H});
  check_cpu_float(key_proj, "key_proj", dtype);
  check_shape(key_proj, "key_proj", {s.B, s.T, s.H});
  check_cpu_float(W_q, "W_q", dtype);
  check_shape(W_q, "W_q", {s.H, s.H});
  check_cpu_float(w_v, "w_v", dtype);
  TORCH_CHECK_VALUE(w_v.numel() == s.H, "seq2seq_fast: w_v must hold ", s.H, " values, got shape ",
                    w_v.sizes());
  for (int64_t k = 0; k < s.L; ++k) {
    const int64_t in = k == 0 ? s.H + s.E : s.H;
    check_cpu_float(w_ih[k], "w_ih", dtype);
    check_shape(w_ih[k], "w_ih[layer]", {3 * s.H, in});
    check_cpu_float(w_hh[k], "w_hh", dtype);
    check_shape(w_hh[k], "w_hh[layer]", {3 * s.H, s.H});
    if (!biases) {
      continue;
    }
    check_cpu_float(b_ih[k], "b_ih", dtype);
    check_shape(b_ih[k], "b_ih[layer]", {3 * s.H});
    check_cpu_float(b_hh[k], "b_hh", dtype);
    check_shape(b_hh[k], "b_hh[layer]", {3 * s.H});
  }
  check_valid_lens(lens, s.B);
  return s;
}

void check_masks(const Sizes& s, int64_t steps, const c10::optional<at::Tensor>& attn_mask,
                 const c10::optional<at::Tensor>& layer_mask, at::ScalarType dtype) {
  if (attn_mask.has_value()) {
    check_cpu_float(*attn_mask, "attn_mask", dtype);
    check_shape(*attn_mask, "attn_mask", {steps, s.B, s.T});
  }
  if (layer_mask.has_value()) {
    check_cpu_float(*layer_mask, "layer_mask", dtype);
    check_shape(*layer_mask, "layer_mask", {s.L - 1, steps, s.B, s.H});
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}
template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) {
    out.push_back(t.contiguous());
  }
  return out;
}

c10::optional<at::Tensor> contiguous_opt(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) {
    return t;
  }
  return t->contiguous();
}

// [W_q ; W_hh of the top layer] (4H, H): both read the previous top state, one GEMM per step.
at::Tensor query_and_top_weights(const at::Tensor& W_q, const at::Tensor& w_hh_top) {
  return at::cat({W_q, w_hh_top}, 0).contiguous();
}

// The parameters of one call, contiguous, with raw pointers.
template <typename T>
struct Params {
  std::vector<at::Tensor> w_ih, w_hh, b_ih, b_hh;
  at::Tensor embedding, w_v, dense_w, w_cat;
  c10::optional<at::Tensor> dense_b;

  Params(const at::Tensor& emb, const at::Tensor& W_q, const at::Tensor& wv, at::TensorList wih,
         at::TensorList whh, at::TensorList bih, at::TensorList bhh, const at::Tensor& dw,
         const c10::optional<at::Tensor>& db)
      : w_ih(contiguous_all(wih)),
        w_hh(contiguous_all(whh)),
        b_ih(contiguous_all(bih)),
        b_hh(contiguous_all(bhh)),
        embedding(emb.contiguous()),
        w_v(wv.contiguous()),
        dense_w(dw.contiguous()),
        dense_b(contiguous_opt(db)) {
    w_cat = query_and_top_weights(W_q.contiguous(), w_hh.back());
  }
};

// The weights of the per-step GEMMs, packed once per call (M = B rows each).
template <typename T>
struct StepGemms {
  PackedWeight<T> qg;                // (B, 4H) = top state @ [W_q ; W_hh_top]^T
  PackedWeight<T> ctx0;              // (B, 3H) += context @ W_ih0[:, :H]^T
  std::vector<PackedWeight<T>> ih;   // layers k > 0: (B, 3H) = input @ W_ih_k^T
  std::vector<PackedWeight<T>> hh;   // layers k < L - 1: (B, 3H) = h @ W_hh_k^T

  StepGemms(const Sizes& s, const Params<T>& P) {
    const int64_t B = s.B, H = s.H, E = s.E;
    qg = PackedWeight<T>(true, B, 4 * H, H, P.w_cat.template data_ptr<T>(), H);
    ctx0 = PackedWeight<T>(true, B, 3 * H, H, P.w_ih[0].template data_ptr<T>(), H + E);
    ih.resize(s.L);
    hh.resize(s.L);
    for (int64_t k = 0; k < s.L; ++k) {
      if (k > 0) {
        ih[k] = PackedWeight<T>(true, B, 3 * H, H, P.w_ih[k].template data_ptr<T>(), H);
      }
      if (k < s.L - 1) {
        hh[k] = PackedWeight<T>(true, B, 3 * H, H, P.w_hh[k].template data_ptr<T>(), H);
      }
    }
  }
};

// One decoder step for all rows: attention from the previous top state, layer 0's input GEMM
// (context part; `gi0` already holds the embedding part), the GRU layers. `state_prev` and
// `state_out` are (L, B, H) with stride `state_ld` between layers (they may alias).
template <typename T>
struct StepBuffers {
  T* qg;       // (B, 4H)
  T* gi;       // (B, 3H) scratch for layers > 0
  T* gh;       // (B, 3H) scratch for non-top layers
};

// Multiply-adds x 2 of one row's decoder step: the per-step GEMMs and the attention scores.
double step_flops_per_row(const Sizes& s) {
  const double H = static_cast<double>(s.H);
  return 2.0 * ((4 + 3 + 6 * (s.L - 1)) * H * H + 3.0 * static_cast<double>(s.T) * H);
}

// Values of the weights a decoder step reads in its GEMMs ([W_q ; W_hh top], W_ih0's context
// block, the other layers' W_ih and W_hh), plus `extra` (dense, embedding gates).
int64_t step_weight_values(const Sizes& s, int64_t extra) {
  return (7 + 6 * (s.L - 1)) * s.H * s.H + extra;
}

// Logits of `rows` rows: y (rows, V) = bias + tops (rows, H) @ W^T, W through `dense`.
template <typename T>
void dense_logits(const PackedWeight<T>& dense, const T* bias, int64_t V, const T* tops, int64_t H, int64_t rows,
                  T* y) {
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(bias, bias + V, y + r * V);
  }
  dense.gemm(tops, H, T(1), y, V);
}

template <typename T>
void decoder_step(const Sizes& s, const Params<T>& P, const StepGemms<T>& G, const T* kp, const T* enc, const int64_t* lens,
                  const T* attn_drop, const T* layer_drop, int64_t layer_drop_ld, const T* state_prev,
                  T* state_out, int64_t state_ld, T* x0, T* gi0, T* attn_out, T* gates, int64_t gates_ld,
                  T* layer_inputs, int64_t layer_inputs_ld, const StepBuffers<T>& buf) {
  const int64_t B = s.B, H = s.H, E = s.E, L = s.L;
  const T* top_prev = state_prev + (L - 1) * state_ld;
  G.qg.gemm(top_prev, H, T(0), buf.qg, 4 * H);
  AttnFwd a{B, s.T, H, buf.qg, 4 * H, kp, enc, ptr<T>(P.w_v), lens, attn_drop, attn_out, x0, H + E};
  attention_forward<T>(a);
  G.ctx0.gemm(x0, H + E, T(1), gi0, 3 * H);
  for (int64_t k = 0; k < L; ++k) {
    const T* h_prev = state_prev + k * state_ld;
    T* h_out = state_out + k * state_ld;
    const T* gi = gi0;
    if (k > 0) {
      const T* xin = layer_inputs ? layer_inputs + (k - 1) * layer_inputs_ld : state_out + (k - 1) * state_ld;
      G.ih[k].gemm(xin, H, T(0), buf.gi, 3 * H);
      gi = buf.gi;
    }
    const T* gh;
    int64_t ld_gh;
    if (k == L - 1) {
      gh = buf.qg + H;
      ld_gh = 4 * H;
    } else {
      G.hh[k].gemm(h_prev, H, T(0), buf.gh, 3 * H);
      gh = buf.gh;
      ld_gh = 3 * H;
    }
    GatesFwd g{B, H, gi, 3 * H, gh, ld_gh, ptr<T>(P.b_ih[k]), ptr<T>(P.b_hh[k]), h_prev, h_out,
               gates + k * gates_ld};
    gates_forward<T>(g);
    if (k < L - 1 && layer_inputs) {
      const T* m = layer_drop + k * layer_drop_ld;
      T* xo = layer_inputs + k * layer_inputs_ld;
      for (int64_t i = 0; i < B * H; ++i) {
        xo[i] = h_out[i] * m[i];
      }
    }
  }
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult decoder_forward(const at::Tensor& X_in, const at::Tensor& enc_in, const at::Tensor& hidden_in,
                                        const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in,
                                        const at::Tensor& embedding, const at::Tensor& W_q, const at::Tensor& w_v,
                                        at::TensorList w_ih, at::TensorList w_hh, at::TensorList b_ih,
                                        at::TensorList b_hh, const at::Tensor& dense_w, const at::Tensor& dense_b,
                                        const c10::optional<at::Tensor>& attn_mask_in,
                                        const c10::optional<at::Tensor>& layer_mask_in, bool keep_activations) {
  const Sizes s0 = check_decoder(enc_in, hidden_in, lens_in, kp_in, embedding, W_q, w_v, w_ih, w_hh, b_ih, b_hh,
                                 dense_w, dense_b);
  check_tokens(X_in, "X", embedding.size(0));
  TORCH_CHECK_VALUE(X_in.size(0) == s0.B, "seq2seq_fast: X must have shape (B=", s0.B, ", S), got ",
                    X_in.sizes());
  Sizes s = s0;
  s.S = X_in.size(1);
  const auto dtype = enc_in.scalar_type();
  check_masks(s, s.S, attn_mask_in, layer_mask_in, dtype);
  TORCH_CHECK_VALUE(!layer_mask_in.has_value() || s.L > 1, "seq2seq_fast: layer_mask needs >= 2 layers");

  const at::Tensor X = X_in.contiguous(), enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const at::Tensor hidden = hidden_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in);
  const auto layer_mask = contiguous_opt(layer_mask_in);
  const int64_t B = s.B, S = s.S, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;
  auto opts = enc.options();

  at::Tensor logits = cpu::empty({S, B, V}, opts);
  at::Tensor attention = cpu::empty({S, B, T_}, opts);
  at::Tensor states = cpu::empty({L, S + 1, B, H}, opts);
  at::Tensor inputs = cpu::empty({S, B, H + E}, opts);
  at::Tensor layer_inputs = layer_mask.has_value() ? cpu::empty({L - 1, S, B, H}, opts) : cpu::empty({0}, opts);
  at::Tensor gates = keep_activations ? cpu::empty({S, L, B, 4 * H}, opts) : cpu::empty({L, B, 4 * H}, opts);
  states.select(1, 0).copy_(hidden);

  AT_DISPATCH_FLOATING_TYPES(dtype, "seq2seq_fast::decoder_forward", [&] {
    using T = scalar_t;
    Params<T> P(embedding, W_q, w_v, w_ih, w_hh, b_ih, b_hh, dense_w, dense_b);
    const EmbeddingGates<T> emb_gates(P.embedding, ptr<T>(P.w_ih[0]) + H, H + E, H, S * B);
    T* x0 = inputs.data_ptr<T>();
    T* st = states.data_ptr<T>();
    const int64_t state_ld = (S + 1) * B * H;
    const T* bias = ptr<T>(*P.dense_b);
    // Embeddings of every step (kept in `inputs` for the backward); without a vocabulary table,
    // layer 0's embedding gates for all steps in one GEMM.
    for (int64_t t = 0; t < S; ++t) {
      gather_rows<T>(ptr<T>(P.embedding), E, ptr<int64_t>(X) + t, B, S, x0 + t * B * (H + E) + H, H + E);
    }
    at::Tensor gi0_all;
    if (!emb_gates.tabled()) {
      gi0_all = cpu::empty({S, B, 3 * H}, opts);
      gemm<T>(false, true, S * B, 3 * H, E, T(1), x0 + H, H + E, ptr<T>(P.w_ih[0]) + H, H + E, T(0),
              gi0_all.data_ptr<T>(), 3 * H);
    }
    // A small dense layer runs inside the chunks after each step (no other parallel region); a
    // large one (its weight would evict the step weights from cache at every step) once after.
    const bool dense_per_step = V * H <= kSmallWeightValues;
    // Logits of `rows` rows from `row` on, from the top layer's states after their step.
    auto dense_rows = [&](const PackedWeight<T>& dense, int64_t row, int64_t rows) {
      dense_logits<T>(dense, bias, V, st + (L - 1) * state_ld + (row + B) * H, H, rows,
                      logits.data_ptr<T>() + row * V);
    };
    const double dense_flops = dense_per_step ? 2.0 * H * V : 0.0;
    const int64_t extra = (dense_per_step ? V * H : 0) + (emb_gates.tabled() ? 0 : 3 * H * E);
    for_row_chunks(B, S * (step_flops_per_row(s) + dense_flops), step_weight_values(s, extra),
                   [&](int64_t b0, int64_t b1) {
      Sizes c = s;
      c.B = b1 - b0;
      const int64_t n = c.B;
      const StepGemms<T> G(c, P);
      const PackedWeight<T> dense = dense_per_step ? PackedWeight<T>(true, n, V, H, ptr<T>(P.dense_w), H)
                                                   : PackedWeight<T>();
      at::Tensor scratch = cpu::empty({n, 13 * H}, opts);
      T* sc = scratch.data_ptr<T>();
      const StepBuffers<T> buf{sc, sc + 4 * H * n, sc + 7 * H * n};
      for (int64_t t = 0; t < S; ++t) {
        const int64_t row = t * B + b0;  // first row of the chunk in (S, B, ...) buffers
        T* gi0 = sc + 10 * H * n;       // (n, 3H)
        if (emb_gates.tabled()) {
          emb_gates.lookup(ptr<int64_t>(X) + b0 * S + t, n, S, gi0);
        } else {
          gi0 = gi0_all.data_ptr<T>() + row * 3 * H;
        }
        decoder_step<T>(c, P, G, ptr<T>(kp) + b0 * T_ * H, ptr<T>(enc) + b0 * T_ * H,
                        lens ? ptr<int64_t>(*lens) + b0 : nullptr,
                        attn_mask ? ptr<T>(*attn_mask) + row * T_ : nullptr,
                        layer_mask ? ptr<T>(*layer_mask) + row * H : nullptr, S * B * H, st + row * H,
                        st + (row + B) * H, state_ld, x0 + row * (H + E), gi0, attention.data_ptr<T>() + row * T_,
                        gates.data_ptr<T>() + (keep_activations ? t * L * B * 4 * H : 0) + b0 * 4 * H, B * 4 * H,
                        layer_mask ? layer_inputs.data_ptr<T>() + row * H : nullptr, S * B * H, buf);
        if (dense_per_step) {
          dense_rows(dense, row, n);
        }
      }
    });
    if (!dense_per_step) {
      dense_rows(PackedWeight<T>(true, S * B, V, H, ptr<T>(P.dense_w), H), 0, S * B);
    }
  });
  if (!keep_activations) {
    gates = cpu::empty({0}, opts);
  }
  return {logits, attention, states, inputs, layer_inputs, gates};
}

using TensorList4 = std::vector<at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, TensorList4,
                                  TensorList4, TensorList4, TensorList4, at::Tensor, at::Tensor>;

BackwardResult decoder_backward(
    const c10::optional<at::Tensor>& grad_logits_in, const c10::optional<at::Tensor>& grad_attention_in,
    const c10::optional<at::Tensor>& grad_states_in, const at::Tensor& X_in, const at::Tensor& enc_in,
    const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in, const at::Tensor& embedding,
    const at::Tensor& W_q, const at::Tensor& w_v, at::TensorList w_ih, at::TensorList w_hh,
    const at::Tensor& dense_w, const c10::optional<at::Tensor>& attn_mask_in,
    const c10::optional<at::Tensor>& layer_mask_in, const at::Tensor& attention_in, const at::Tensor& states_in,
    const at::Tensor& inputs_in, const at::Tensor& layer_inputs_in, const at::Tensor& gates_in) {
  const Sizes s0 = check_decoder(enc_in, states_in.select(1, 0), lens_in, kp_in, embedding, W_q, w_v, w_ih, w_hh,
                                 {}, {}, dense_w, c10::nullopt);
  check_tokens(X_in, "X", embedding.size(0));
  Sizes s = s0;
  s.S = X_in.size(1);
  const int64_t B = s.B, S = s.S, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;
  const auto dtype = enc_in.scalar_type();
  check_masks(s, S, attn_mask_in, layer_mask_in, dtype);
  check_shape(attention_in, "attention", {S, B, T_});
  check_shape(states_in, "states", {L, S + 1, B, H});
  check_shape(inputs_in, "inputs", {S, B, H + E});
  check_shape(gates_in, "gates", {S, L, B, 4 * H});
  if (layer_mask_in.has_value()) {
    check_shape(layer_inputs_in, "layer_inputs", {L - 1, S, B, H});
  }
  if (grad_logits_in.has_value()) {
    check_shape(*grad_logits_in, "grad_logits", {S, B, V});
  }
  if (grad_attention_in.has_value()) {
    check_shape(*grad_attention_in, "grad_attention", {S, B, T_});
  }
  if (grad_states_in.has_value()) {
    check_shape(*grad_states_in, "grad_states", {L, S + 1, B, H});
  }

  const at::Tensor X = X_in.contiguous(), enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in), layer_mask = contiguous_opt(layer_mask_in);
  const at::Tensor attention = attention_in.contiguous(), states = states_in.contiguous();
  const at::Tensor inputs = inputs_in.contiguous(), gates = gates_in.contiguous();
  const at::Tensor layer_inputs = layer_inputs_in.contiguous();
  const auto g_attn = contiguous_opt(grad_attention_in);
  auto opts = enc.options();

  at::Tensor D = grad_states_in.has_value() ? cpu::empty({L, S + 1, B, H}, opts).copy_(*grad_states_in)
                                            : cpu::zeros({L, S + 1, B, H}, opts);
  at::Tensor d_enc = cpu::zeros({B, T_, H}, opts), d_kp = cpu::zeros({B, T_, H}, opts);
  at::Tensor d_emb = cpu::zeros({embedding.size(0), E}, opts);
  at::Tensor d_Wq = cpu::empty({H, H}, opts), d_wv = cpu::empty(w_v.sizes(), opts);
  at::Tensor d_dense_w = cpu::zeros({V, H}, opts), d_dense_b = cpu::zeros({V}, opts);
  std::vector<at::Tensor> d_wih, d_whh, d_bih, d_bhh;
  for (int64_t k = 0; k < L; ++k) {
    d_wih.push_back(cpu::empty({3 * H, k == 0 ? H + E : H}, opts));
    d_whh.push_back(cpu::empty({3 * H, H}, opts));
    d_bih.push_back(cpu::empty({3 * H}, opts));
    d_bhh.push_back(cpu::empty({3 * H}, opts));
  }
  at::Tensor dh = cpu::zeros({L, B, H}, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, "seq2seq_fast::decoder_backward", [&] {
    using T = scalar_t;
    const std::vector<at::Tensor> wih = contiguous_all(w_ih), whh = contiguous_all(w_hh);
    const at::Tensor Wq = W_q.contiguous(), wv = w_v.contiguous(), dw = dense_w.contiguous();
    const at::Tensor w_cat = query_and_top_weights(Wq, whh.back());
    const T* st = ptr<T>(states);
    const int64_t state_ld = (S + 1) * B * H;
    const T* tops = st + (L - 1) * state_ld + B * H;     // (S*B, H) outputs of the top layer
    const T* top_prev = st + (L - 1) * state_ld;         // (S*B, H) its previous states
    T* Dp = D.data_ptr<T>();
    // dense: grad of the top states, of the weight and of the bias, for all steps at once.
    if (grad_logits_in.has_value()) {
      // The loss usually hands back a transposed gradient: copy it blocked, not element-wise.
      at::Tensor gy_buf;
      const T* gy;
      if (grad_logits_in->is_contiguous()) {
        gy = ptr<T>(*grad_logits_in);
      } else {
        gy_buf = cpu::empty({S, B, V}, opts);
        copy_contiguous<T>(*grad_logits_in, gy_buf.data_ptr<T>());
        gy = gy_buf.data_ptr<T>();
      }
      gemm<T>(false, false, S * B, H, V, T(1), gy, V, ptr<T>(dw), H, T(1), Dp + (L - 1) * state_ld + B * H, H);
      gemm<T>(true, false, V, H, S * B, T(1), gy, V, tops, H, T(0), d_dense_w.data_ptr<T>(), H);
      column_sums<T>(gy, S * B, V, V, d_dense_b.data_ptr<T>(), false);
    }
    // The queries of every step, recomputed in one GEMM (the scores' tanh is recomputed too).
    at::Tensor Q = cpu::empty({S, B, H}, opts);
    gemm<T>(false, true, S * B, H, H, T(1), top_prev, H, ptr<T>(Wq), H, T(0), Q.data_ptr<T>(), H);
    at::Tensor Ggi = cpu::empty({L, S, B, 3 * H}, opts);
    at::Tensor Ggh = cpu::empty({std::max<int64_t>(L - 1, 0), S, B, 3 * H}, opts);
    at::Tensor Gcat = cpu::empty({S, B, 4 * H}, opts);  // [d q | d gh of the top layer]
    at::Tensor dwv_rows = cpu::zeros({B, H}, opts);
    T* dhp = dh.data_ptr<T>();
    const T* gt = ptr<T>(gates);
    // Backward through time for rows [b0, b1): every per-step quantity is per row.
    auto backward_rows = [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      at::Tensor scratch = cpu::empty({2, n, H}, opts);
      T* dctx = scratch.data_ptr<T>();
      T* dx = dctx + n * H;
      // Per-step GEMM weights, packed once: gradients of the layers' inputs and previous states.
      std::vector<PackedWeight<T>> ih_b(L), hh_b(L);
      for (int64_t k = 0; k < L; ++k) {
        ih_b[k] = PackedWeight<T>(false, n, H, 3 * H, ptr<T>(wih[k]), k == 0 ? H + E : H);
        if (k < L - 1) {
          hh_b[k] = PackedWeight<T>(false, n, H, 3 * H, ptr<T>(whh[k]), H);
        }
      }
      const PackedWeight<T> cat_b(false, n, H, 4 * H, ptr<T>(w_cat), H);
      for (int64_t t = S - 1; t >= 0; --t) {
        const int64_t row = t * B + b0;  // first row of the chunk in (S, B, ...) buffers
        T* gcat_t = Gcat.data_ptr<T>() + row * 4 * H;
        for (int64_t k = L - 1; k >= 0; --k) {
          T* dhk = dhp + (k * B + b0) * H;
          const T* ext = Dp + k * state_ld + (row + B) * H;
          for (int64_t i = 0; i < n * H; ++i) {
            dhk[i] += ext[i];
          }
          T* ggi = Ggi.data_ptr<T>() + (k * S * B + row) * 3 * H;
          T* ggh;
          int64_t ld_gh;
          if (k == L - 1) {
            ggh = gcat_t + H;
            ld_gh = 4 * H;
          } else {
            ggh = Ggh.data_ptr<T>() + (k * S * B + row) * 3 * H;
            ld_gh = 3 * H;
          }
          GatesBwd g{n, H, dhk, gt + ((t * L + k) * B + b0) * 4 * H, st + k * state_ld + row * H, ggi, 3 * H,
                     ggh, ld_gh};
          gates_backward<T>(g);
          if (k > 0) {
            T* dh_below = dhp + ((k - 1) * B + b0) * H;
            if (layer_mask.has_value()) {
              ih_b[k].gemm(ggi, 3 * H, T(0), dx, H);
              const T* m = ptr<T>(*layer_mask) + ((k - 1) * S * B + row) * H;
              for (int64_t i = 0; i < n * H; ++i) {
                dh_below[i] += dx[i] * m[i];
              }
            } else {
              ih_b[k].gemm(ggi, 3 * H, T(1), dh_below, H);
            }
          } else {
            ih_b[0].gemm(ggi, 3 * H, T(0), dctx, H);
          }
          if (k < L - 1) {
            hh_b[k].gemm(ggh, 3 * H, T(1), dhk, H);
          }
        }
        AttnBwd a{n, T_, H, Q.data_ptr<T>() + row * H, H, ptr<T>(kp) + b0 * T_ * H, ptr<T>(enc) + b0 * T_ * H,
                  ptr<T>(wv), lens ? ptr<int64_t>(*lens) + b0 : nullptr,
                  attn_mask ? ptr<T>(*attn_mask) + row * T_ : nullptr, ptr<T>(attention) + row * T_,
                  g_attn ? ptr<T>(*g_attn) + row * T_ : nullptr, dctx, d_kp.data_ptr<T>() + b0 * T_ * H,
                  d_enc.data_ptr<T>() + b0 * T_ * H, dwv_rows.data_ptr<T>() + b0 * H, gcat_t, 4 * H};
        attention_backward<T>(a);
        cat_b.gemm(gcat_t, 4 * H, T(1), dhp + ((L - 1) * B + b0) * H, H);
      }
    };
    for_row_chunks(B, 2 * S * step_flops_per_row(s), step_weight_values(s, 0), backward_rows);
    for (int64_t k = 0; k < L; ++k) {
      T* dhk = dhp + k * B * H;
      const T* ext = Dp + k * state_ld;
      for (int64_t i = 0; i < B * H; ++i) {
        dhk[i] += ext[i];
      }
    }
    // Weight gradients, each one GEMM over all steps.
    const T* gc = Gcat.data_ptr<T>();
    gemm<T>(true, false, H, H, S * B, T(1), gc, 4 * H, top_prev, H, T(0), d_Wq.data_ptr<T>(), H);
    gemm<T>(true, false, 3 * H, H, S * B, T(1), gc + H, 4 * H, top_prev, H, T(0), d_whh[L - 1].data_ptr<T>(), H);
    column_sums<T>(gc + H, S * B, 3 * H, 4 * H, d_bhh[L - 1].data_ptr<T>(), false);
    for (int64_t k = 0; k < L; ++k) {
      const T* ggi = Ggi.data_ptr<T>() + k * S * B * 3 * H;
      if (k < L - 1) {
        const T* ggh = Ggh.data_ptr<T>() + k * S * B * 3 * H;
        gemm<T>(true, false, 3 * H, H, S * B, T(1), ggh, 3 * H, st + k * state_ld, H, T(0),
                d_whh[k].data_ptr<T>(), H);
        column_sums<T>(ggh, S * B, 3 * H, 3 * H, d_bhh[k].data_ptr<T>(), false);
      }
      const T* xin;
      int64_t in;
      if (k == 0) {
        xin = ptr<T>(inputs);
        in = H + E;
      } else {
        xin = layer_mask.has_value() ? ptr<T>(layer_inputs) + (k - 1) * S * B * H : st + (k - 1) * state_ld + B * H;
        in = H;
      }
      gemm<T>(true, false, 3 * H, in, S * B, T(1), ggi, 3 * H, xin, in, T(0), d_wih[k].data_ptr<T>(), in);
      column_sums<T>(ggi, S * B, 3 * H, 3 * H, d_bih[k].data_ptr<T>(), false);
    }
    // Embedding: the embedding columns of layer 0's input gradient, scattered by token.
    at::Tensor d_x = cpu::empty({S, B, E}, opts);
    T* dxe = d_x.data_ptr<T>();
    gemm<T>(false, false, S * B, E, 3 * H, T(1), Ggi.data_ptr<T>(), 3 * H, ptr<T>(wih[0]) + H, H + E, T(0), dxe, E);
    T* de = d_emb.data_ptr<T>();
    const int64_t* ids = ptr<int64_t>(X);
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        T* row = de + ids[b * S + t] * E;
        const T* src = dxe + (t * B + b) * E;
        for (int64_t c = 0; c < E; ++c) {
          row[c] += src[c];
        }
      }
    }
    column_sums<T>(dwv_rows.data_ptr<T>(), B, H, H, d_wv.data_ptr<T>(), false);
  });
  return {d_enc, dh, d_kp, d_emb, d_Wq, d_wv, d_wih, d_whh, d_bih, d_bhh, d_dense_w, d_dense_b};
}

using GreedyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

GreedyResult greedy_decode(const at::Tensor& enc_in, const at::Tensor& hidden_in,
                           const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in,
                           const at::Tensor& embedding, const at::Tensor& W_q, const at::Tensor& w_v,
                           at::TensorList w_ih, at::TensorList w_hh, at::TensorList b_ih, at::TensorList b_hh,
                           const at::Tensor& dense_w, const at::Tensor& dense_b,
                           const c10::optional<at::Tensor>& attn_mask_in,
                           const c10::optional<at::Tensor>& layer_mask_in, int64_t bos, int64_t eos,
                           int64_t max_len, bool return_attention) {
  Sizes s = check_decoder(enc_in, hidden_in, lens_in, kp_in, embedding, W_q, w_v, w_ih, w_hh, b_ih, b_hh, dense_w,
                          dense_b);
  TORCH_CHECK_VALUE(max_len >= 1, "seq2seq_fast: max_len must be >= 1, got ", max_len);
  TORCH_CHECK_VALUE(embedding.size(0) == s.V, "seq2seq_fast: embedding must have one row per output token (",
                    s.V, "), got ", embedding.sizes());
  TORCH_CHECK_INDEX(bos >= 0 && bos < s.V, "seq2seq_fast: bos must be a token id in [0, ", s.V, "), got ", bos);
  TORCH_CHECK_INDEX(eos >= 0 && eos < s.V, "seq2seq_fast: eos must be a token id in [0, ", s.V, "), got ", eos);
  s.S = max_len;
  const auto dtype = enc_in.scalar_type();
  check_masks(s, max_len, attn_mask_in, layer_mask_in, dtype);
  TORCH_CHECK_VALUE(!layer_mask_in.has_value() || s.L > 1, "seq2seq_fast: layer_mask needs >= 2 layers");
  const at::Tensor enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in), layer_mask = contiguous_opt(layer_mask_in);
  const int64_t B = s.B, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;
  auto opts = enc.options();

  at::Tensor state = cpu::empty({s.L, s.B, s.H}, enc_in.options()).copy_(hidden_in);
  at::Tensor attn_buf = cpu::empty({return_attention ? max_len : 1, B, T_}, opts);
  at::Tensor tokens_buf = cpu::empty({B, max_len}, enc.options().dtype(at::kLong));
  int64_t steps = 0;
  std::mutex steps_mutex;
  AT_DISPATCH_FLOATING_TYPES(dtype, "seq2seq_fast::greedy_decode", [&] {
    using T = scalar_t;
    Params<T> P(embedding, W_q, w_v, w_ih, w_hh, b_ih, b_hh, dense_w, dense_b);
    int64_t* out = tokens_buf.data_ptr<int64_t>();
    T* st = state.data_ptr<T>();
    T* attn = attn_buf.data_ptr<T>();
    const T* bias = ptr<T>(*P.dense_b);
    const EmbeddingGates<T> emb_gates(P.embedding, ptr<T>(P.w_ih[0]) + H, H + E, H, max_len * B);
    // Rows [b0, b1) decoded until each of them produced eos (or max_len steps).
    auto decode_rows = [&](int64_t b0, int64_t b1) {
      Sizes c = s;
      c.B = b1 - b0;
      const int64_t n = c.B;
      const StepGemms<T> G(c, P);
      PackedWeight<T> emb0;
      if (!emb_gates.tabled()) {
        emb0 = PackedWeight<T>(true, n, 3 * H, E, ptr<T>(P.w_ih[0]) + H, H + E);
      }
      const PackedWeight<T> dense(true, n, V, H, ptr<T>(P.dense_w), H);
      at::Tensor work = cpu::empty({n, (H + E) + 3 * H + 4 * L * H + (L - 1) * H + V + 10 * H}, opts);
      T* x0 = work.data_ptr<T>();
      T* gi0 = x0 + n * (H + E);
      T* gates = gi0 + n * 3 * H;
      T* layer_inputs = gates + n * 4 * L * H;
      T* logits = layer_inputs + n * (L - 1) * H;
      T* sc = logits + n * V;
      const StepBuffers<T> buf{sc, sc + 4 * H * n, sc + 7 * H * n};
      std::vector<int64_t> token(n, bos);
      std::vector<char> finished(n, 0);
      int64_t ran = 0;
      for (int64_t t = 0; t < max_len; ++t) {
        if (emb_gates.tabled()) {
          emb_gates.lookup(token.data(), n, 1, gi0);
        } else {
          gather_rows<T>(ptr<T>(P.embedding), E, token.data(), n, 1, x0 + H, H + E);
          emb0.gemm(x0 + H, H + E, T(0), gi0, 3 * H);
        }
        decoder_step<T>(c, P, G, ptr<T>(kp) + b0 * T_ * H, ptr<T>(enc) + b0 * T_ * H,
                        lens ? ptr<int64_t>(*lens) + b0 : nullptr,
                        attn_mask ? ptr<T>(*attn_mask) + (t * B + b0) * T_ : nullptr,
                        layer_mask ? ptr<T>(*layer_mask) + (t * B + b0) * H : nullptr, max_len * B * H,
                        st + b0 * H, st + b0 * H, B * H, x0, gi0,
                        attn + ((return_attention ? t * B : 0) + b0) * T_, gates, n * 4 * H,
                        layer_mask ? layer_inputs : nullptr, n * H, buf);
        dense_logits<T>(dense, bias, V, st + ((L - 1) * B + b0) * H, H, n, logits);
        argmax_rows<T>(logits, n, V, token.data());
        bool all_done = true;
        for (int64_t b = 0; b < n; ++b) {
          const int64_t best = token[b];
          out[(b0 + b) * max_len + t] = best;
          finished[b] = finished[b] || best == eos;
          all_done = all_done && finished[b];
        }
        ran = t + 1;
        if (all_done) {
          break;
        }
      }
      std::lock_guard<std::mutex> lock(steps_mutex);
      steps = std::max(steps, ran);
    };
    if (return_attention) {
      // Every row's weights are kept for every step run, so all rows run until the last stops.
      decode_rows(0, B);
    } else {
      // A chunk may stop before the others: its rows have all produced eos, and what follows
      // a row's eos is written as eos below.
      const int64_t extra = V * H + (emb_gates.tabled() ? 0 : 3 * H * E);
      for_row_chunks(B, max_len * (step_flops_per_row(s) + 2.0 * H * V), step_weight_values(s, extra), decode_rows);
    }
  });
  at::Tensor tokens = tokens_buf.narrow(1, 0, steps).contiguous();
  at::Tensor lengths = at::full({B}, steps, tokens.options());
  int64_t* tk = tokens.data_ptr<int64_t>();
  int64_t* ln = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    bool ended = false;
    for (int64_t t = 0; t < steps; ++t) {
      if (ended) {
        tk[b * steps + t] = eos;
      } else if (tk[b * steps + t] == eos) {
        ended = true;
        ln[b] = t;
      }
    }
  }
  at::Tensor attention =
      return_attention ? attn_buf.narrow(0, 0, steps).permute({1, 0, 2}).contiguous() : cpu::empty({0}, opts);
  return {tokens, lengths, attention};
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("decoder_forward", &seq2seq_fast::cpu::decoder_forward);
  m.impl("decoder_backward", &seq2seq_fast::cpu::decoder_backward);
  m.impl("greedy_decode", &seq2seq_fast::cpu::greedy_decode);
}
