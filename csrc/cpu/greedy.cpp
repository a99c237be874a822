// Batched greedy decoding on CPU: every row starts from bos and feeds back its argmax until it
// produced eos or max_len steps ran; rows split into independent chunks (decoder_step.h).
#include <torch/library.h>

#include <mutex>

#include "cpu/decoder_step.h"

namespace seq2seq_fast::cpu {
namespace {

using GreedyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

GreedyResult greedy_decode(const at::Tensor& enc_in, const at::Tensor& hidden_in,
                           const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in, at::TensorList params,
                           const c10::optional<at::Tensor>& attn_mask_in,
                           const c10::optional<at::Tensor>& layer_mask_in, int64_t bos, int64_t eos,
                           int64_t max_len, bool return_attention) {
  const Placement on = check_reference(enc_in, "enc_outputs", at::kCPU, kCpuFloats);
  Sizes s;
  const DecoderWeights w = check_greedy_decode(enc_in, hidden_in, lens_in, kp_in, params, attn_mask_in,
                                               layer_mask_in, bos, eos, max_len, on, &s, true);
  const CallerOnly caller_only(small_step_weights(step_weight_values(s, s.V * s.H)));
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
  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::greedy_decode", [&] {
    using T = scalar_t;
    int64_t* out = tokens_buf.data_ptr<int64_t>();
    T* st = state.data_ptr<T>();
    T* attn = attn_buf.data_ptr<T>();
    const T* bias = ptr<T>(w.dense_b);
    const EmbeddingGates<T> emb_gates(w.embedding, ptr<T>(w.w_ih[0]) + H, H + E, H, max_len * B);
    // Rows [b0, b1) decoded until each of them produced eos (or max_len steps).
    auto decode_rows = [&](int64_t b0, int64_t b1) {
      Sizes c = s;
      c.B = b1 - b0;
      const int64_t n = c.B;
      const StepGemms<T> G(c, w);
      PackedWeight<T> emb0;
      if (!emb_gates.tabled()) {
        emb0 = PackedWeight<T>(true, n, 3 * H, E, ptr<T>(w.w_ih[0]) + H, H + E);
      }
      const PackedWeight<T> dense(true, n, V, H, ptr<T>(w.dense_w), H);
      Slab<T> slab(n * ((H + E) + 3 * H + 4 * L * H + (L - 1) * H + V + 10 * H), opts);
      T* x0 = slab.take(n * (H + E));            // (n, H + E) layer 0's input [context ; embedding]
      T* gi0 = slab.take(n * 3 * H);             // (n, 3H) layer 0's input gates
      T* gates = slab.take(n * 4 * L * H);       // (L, n, 4H) the step's gate activations
      T* layer_inputs = slab.take(n * (L - 1) * H);  // (L - 1, n, H) dropped-out inputs of layers 1..
      T* logits = slab.take(n * V);              // (n, V)
      const StepBuffers<T> buf(slab, n, H);
      std::vector<int64_t> token(n, bos);
      std::vector<char> finished(n, 0);
      int64_t ran = 0;
      for (int64_t t = 0; t < max_len; ++t) {
        if (emb_gates.tabled()) {
          emb_gates.lookup(token.data(), n, 1, gi0);
        } else {
          gather_rows<T>(ptr<T>(w.embedding), E, token.data(), n, 1, x0 + H, H + E);
          emb0.gemm(x0 + H, H + E, T(0), gi0, 3 * H);
        }
        decoder_step<T>(c, w, G, ptr<T>(kp) + b0 * T_ * H, ptr<T>(enc) + b0 * T_ * H,
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
  m.impl("greedy_decode", &seq2seq_fast::cpu::greedy_decode);
}
