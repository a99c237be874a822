// The attention decoder's teacher-forced forward on CPU (layouts: csrc/cpu/decoder_step.h).
#include <torch/library.h>

#include "cpu/decoder_step.h"

namespace seq2seq_fast::cpu {
namespace {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult decoder_forward(const at::Tensor& X_in, const at::Tensor& enc_in, const at::Tensor& hidden_in,
                              const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in,
                              at::TensorList params, const c10::optional<at::Tensor>& attn_mask_in,
                              const c10::optional<at::Tensor>& layer_mask_in, bool keep_activations) {
  const Placement on = check_reference(enc_in, "enc_outputs", at::kCPU, kCpuFloats);
  Sizes s;
  const DecoderWeights w = check_decoder_forward(X_in, enc_in, hidden_in, lens_in, kp_in, params, attn_mask_in,
                                                 layer_mask_in, on, &s, nullptr);
  const CallerOnly caller_only(small_step_weights(step_weight_values(s, s.V * s.H)));

  const at::Tensor X = X_in.contiguous(), enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in);
  const auto layer_mask = contiguous_opt(layer_mask_in);
  const int64_t B = s.B, S = s.S, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;
  auto opts = enc.options();

  at::Tensor logits = cpu::empty({S, B, V}, opts);
  at::Tensor attention = cpu::empty({S, B, T_}, opts);
  at::Tensor states = cpu::empty({L, S + 1, B, H}, opts);
  // Layer 0's inputs of every step only for the backward; without one each chunk reuses one
  // step's rows. Memory a call writes evicts what the caller's Python reads next: d2l's zh
  // 10-step call writes 164 KB less, and its module call costs about 5 us less over the op
  // (benchmarks/call_overhead.py).
  at::Tensor inputs = keep_activations ? cpu::empty({S, B, H + E}, opts) : cpu::empty({0}, opts);
  at::Tensor layer_inputs = layer_mask.has_value() ? cpu::empty({L - 1, S, B, H}, opts) : cpu::empty({0}, opts);
  at::Tensor gates = keep_activations ? cpu::empty({S, L, B, 4 * H}, opts) : cpu::empty({L, B, 4 * H}, opts);
  // Read strided as it comes (the previous call's final state is a view of its states): no
  // contiguous copy first.
  states.select(1, 0).copy_(hidden_in);

  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::decoder_forward", [&] {
    using T = scalar_t;
    const EmbeddingGates<T> emb_gates(w.embedding, ptr<T>(w.w_ih[0]) + H, H + E, H, S * B);
    T* x0 = keep_activations ? inputs.data_ptr<T>() : nullptr;
    T* st = states.data_ptr<T>();
    const int64_t state_ld = (S + 1) * B * H;
    const T* bias = ptr<T>(w.dense_b);
    // Embeddings of every step: kept in `inputs` for the backward, else gathered only where no
    // vocabulary table holds their gates, for the GEMM that gives layer 0's embedding gates of
    // all steps at once.
    at::Tensor embedded;
    T* emb = nullptr;
    int64_t emb_ld = E;
    if (x0 != nullptr) {
      emb = x0 + H;
      emb_ld = H + E;
    } else if (!emb_gates.tabled()) {
      embedded = cpu::empty({S, B, E}, opts);
      emb = embedded.data_ptr<T>();
    }
    for (int64_t t = 0; emb != nullptr && t < S; ++t) {
      gather_rows<T>(ptr<T>(w.embedding), E, ptr<int64_t>(X) + t, B, S, emb + t * B * emb_ld, emb_ld);
    }
    at::Tensor gi0_all;
    if (!emb_gates.tabled()) {
      gi0_all = cpu::empty({S, B, 3 * H}, opts);
      gemm<T>(false, true, S * B, 3 * H, E, T(1), emb, emb_ld, ptr<T>(w.w_ih[0]) + H, H + E, T(0),
              gi0_all.data_ptr<T>(), 3 * H);
    }
    // A small dense layer runs inside the chunks after each step (no other parallel region); a
    // large one (its weight would evict the step weights from cache at every step) once after; a
    // dense of 0 rows not at all.
    const bool dense_per_step = V > 0 && V * H <= kSmallWeightValues;
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
      const StepGemms<T> G(c, w);
      const PackedWeight<T> dense = dense_per_step ? PackedWeight<T>(true, n, V, H, ptr<T>(w.dense_w), H)
                                                   : PackedWeight<T>();
      Slab<T> slab(n * 13 * H + (x0 ? 0 : n * (H + E)), opts);
      const StepBuffers<T> buf(slab, n, H);
      T* gi0_table = slab.take(n * 3 * H);  // (n, 3H) layer 0's embedding gates from the table
      T* x0_step = x0 ? nullptr : slab.take(n * (H + E));  // (n, H + E) layer 0's input, reused each step
      for (int64_t t = 0; t < S; ++t) {
        const int64_t row = t * B + b0;  // first row of the chunk in (S, B, ...) buffers
        T* x0_rows = x0 ? x0 + row * (H + E) : x0_step;
        T* gi0 = gi0_table;
        if (emb_gates.tabled()) {
          emb_gates.lookup(ptr<int64_t>(X) + b0 * S + t, n, S, gi0);
        } else {
          gi0 = gi0_all.data_ptr<T>() + row * 3 * H;
        }
        decoder_step<T>(c, w, G, ptr<T>(kp) + b0 * T_ * H, ptr<T>(enc) + b0 * T_ * H,
                        lens ? ptr<int64_t>(*lens) + b0 : nullptr,
                        attn_mask ? ptr<T>(*attn_mask) + row * T_ : nullptr,
                        layer_mask ? ptr<T>(*layer_mask) + row * H : nullptr, S * B * H, st + row * H,
                        st + (row + B) * H, state_ld, x0_rows, gi0, attention.data_ptr<T>() + row * T_,
                        gates.data_ptr<T>() + (keep_activations ? t * L * B * 4 * H : 0) + b0 * 4 * H, B * 4 * H,
                        layer_mask ? layer_inputs.data_ptr<T>() + row * H : nullptr, S * B * H, buf);
        if (dense_per_step) {
          dense_rows(dense, row, n);
        }
      }
    });
    if (!dense_per_step && V > 0) {
      dense_rows(PackedWeight<T>(true, S * B, V, H, ptr<T>(w.dense_w), H), 0, S * B);
    }
  });
  if (!keep_activations) {
    gates = cpu::empty({0}, opts);
  }
  return {logits, attention, states, inputs, layer_inputs, gates};
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("decoder_forward", &seq2seq_fast::cpu::decoder_forward);
}
