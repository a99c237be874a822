// The attention decoder's backward through time on CPU (layouts: csrc/cpu/decoder_step.h): the
// gradients of every step's attention and GRU layers, row chunk by row chunk, in blocks of steps
// from the last; after each block, the weights' gradients over its steps as GEMMs.
#include <torch/library.h>

#include "cpu/decoder_step.h"

namespace seq2seq_fast::cpu {
namespace {

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

BackwardResult decoder_backward(
    const c10::optional<at::Tensor>& grad_logits_in, const c10::optional<at::Tensor>& grad_attention_in,
    const c10::optional<at::Tensor>& grad_states_in, const at::Tensor& X_in, const at::Tensor& enc_in,
    const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in, at::TensorList params,
    const c10::optional<at::Tensor>& attn_mask_in, const c10::optional<at::Tensor>& layer_mask_in,
    const at::Tensor& attention_in, const at::Tensor& states_in, const at::Tensor& inputs_in,
    const at::Tensor& layer_inputs_in, const at::Tensor& gates_in) {
  const Placement on = check_reference(enc_in, "enc_outputs", at::kCPU, kCpuFloats);
  Sizes s;
  const DecoderWeights w = check_decoder_backward(grad_logits_in, grad_attention_in, grad_states_in, X_in, enc_in,
                                                  lens_in, kp_in, params, attn_mask_in, layer_mask_in, attention_in,
                                                  states_in, inputs_in, layer_inputs_in, gates_in, on, &s, nullptr);
  const bool small = small_step_weights(step_weight_values(s, s.V * s.H));
  const CallerOnly caller_only(small);
  const int64_t B = s.B, S = s.S, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;

  const at::Tensor X = X_in.contiguous(), enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in), layer_mask = contiguous_opt(layer_mask_in);
  const at::Tensor attention = attention_in.contiguous(), states = states_in.contiguous();
  const at::Tensor inputs = inputs_in.contiguous(), gates = gates_in.contiguous();
  const at::Tensor layer_inputs = layer_inputs_in.contiguous();
  const auto g_attn = contiguous_opt(grad_attention_in);
  auto opts = enc.options();

  // D: the states' gradients from outside the op. The dense layer adds to the top layer's, so
  // then it is a copy; otherwise the incoming gradient is only read.
  at::Tensor D = !grad_states_in.has_value()  ? cpu::zeros({L, S + 1, B, H}, opts)
                 : grad_logits_in.has_value() ? cpu::empty({L, S + 1, B, H}, opts).copy_(*grad_states_in)
                                              : grad_states_in->contiguous();
  at::Tensor d_enc = cpu::zeros({B, T_, H}, opts), d_kp = cpu::zeros({B, T_, H}, opts);
  at::Tensor d_wv = cpu::empty(w.w_v.sizes(), opts);
  at::Tensor d_dense_w = cpu::zeros({V, H}, opts), d_dense_b = cpu::zeros({V}, opts);
  // The weight gradients below, written by the first block of steps (zeros without steps).
  const auto weight_grad = [&](at::IntArrayRef sizes) {
    return S > 0 ? cpu::empty(sizes, opts) : cpu::zeros(sizes, opts);
  };
  at::Tensor d_emb = cpu::zeros({w.embedding.size(0), E}, opts);
  at::Tensor d_Wq = weight_grad({H, H});
  GruWeights d;  // the GRU's gradients
  for (int64_t k = 0; k < L; ++k) {
    d.w_ih.push_back(weight_grad({3 * H, k == 0 ? H + E : H}));
    d.w_hh.push_back(weight_grad({3 * H, H}));
    d.b_ih.push_back(weight_grad({3 * H}));
    d.b_hh.push_back(weight_grad({3 * H}));
  }
  at::Tensor dh = cpu::zeros({L, B, H}, opts);

  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::decoder_backward", [&] {
    using T = scalar_t;
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
      gemm<T>(false, false, S * B, H, V, T(1), gy, V, ptr<T>(w.dense_w), H, T(1), Dp + (L - 1) * state_ld + B * H, H);
      gemm<T>(true, false, V, H, S * B, T(1), gy, V, tops, H, T(0), d_dense_w.data_ptr<T>(), H);
      column_sums<T>(gy, S * B, V, V, d_dense_b.data_ptr<T>(), false);
    }
    // Backward through time in blocks of steps, the last block first: each block's gate gradients
    // go into its weights' gradients (GEMMs over the block's steps) before the next block reuses
    // the buffers, so that they hold one block, not every step (a training step's peak memory).
    const int64_t block = steps_per_block<T>(S, B * 10 * H * static_cast<int64_t>(sizeof(T)), B, H);
    // The block's queries (the scores' tanh is recomputed too) and gate gradients, rows
    // [d gh_n | d r | d z | d gi_n] (rows.h GatesBwd); the top layer's rows start with the
    // query's gradient, so that [d q | d gh] is one GEMM's operand against [W_q ; W_hn ; W_hr ; W_hz].
    at::Tensor Q = cpu::empty({block, B, H}, opts);
    at::Tensor G_low = cpu::empty({std::max<int64_t>(L - 1, 0), block, B, 4 * H}, opts);
    at::Tensor G_top = cpu::empty({block, B, 5 * H}, opts);
    // Layer 0's embedding columns: their gradients through a table of d(gi) per token when the
    // vocabulary is the smaller (after the last block), else block by block over the tokens.
    c10::optional<TokenGateGrads<T>> per_token;
    if (TokenGateGrads<T>::worth(w.embedding.size(0), S * B)) {
      per_token.emplace(w.embedding.size(0), H, opts);
    }
    at::Tensor d_x = per_token ? at::Tensor() : cpu::empty({block, B, E}, opts);  // the embeddings' gradient
    const auto grad_ld = [&](int64_t k) { return k == L - 1 ? 5 * H : 4 * H; };
    // Layer k's gate-gradient row `row` of the block's (steps, B) rows: its d gh_n column.
    const auto grad_row = [&](int64_t k, int64_t row) {
      return k == L - 1 ? G_top.data_ptr<T>() + row * 5 * H + H
                        : G_low.data_ptr<T>() + (k * block * B + row) * 4 * H;
    };
    at::Tensor dwv_rows = cpu::zeros({B, H}, opts);
    T* dhp = dh.data_ptr<T>();
    const T* gt = ptr<T>(gates);
    int64_t t0 = S, t1 = S;  // the block's steps [t0, t1)
    // Backward through the block's steps for rows [b0, b1): every per-step quantity is per row.
    auto backward_rows = [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      Slab<T> slab(2 * n * H, opts);
      T* dctx = slab.take(n * H);  // (n, H) gradient of the context
      T* dx = slab.take(n * H);    // (n, H) gradient of a dropped-out layer input, before the mask
      // Per-step GEMM weights, packed once: gradients of the layers' inputs and previous states.
      // d(gh) comes in (n, r, z) order: W_hh's rows are stacked to match.
      std::vector<PackedWeight<T>> ih_b(L), hh_b(L);
      for (int64_t k = 0; k < L; ++k) {
        ih_b[k] = PackedWeight<T>(false, n, H, 3 * H, ptr<T>(w.w_ih[k]), k == 0 ? H + E : H);
        if (k < L - 1) {
          const HiddenRowsNrz<T> hh = hidden_rows_nrz(ptr<T>(w.w_hh[k]), H);
          hh_b[k] = PackedWeight<T>(false, n, H, 3 * H, {hh.n, hh.rz});
        }
      }
      const HiddenRowsNrz<T> hh_top = hidden_rows_nrz(ptr<T>(w.w_hh.back()), H);
      const PackedWeight<T> cat_b(false, n, H, 4 * H, {{ptr<T>(w.W_q), H, H}, hh_top.n, hh_top.rz});
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const int64_t row = t * B + b0;          // first row of the chunk in (S, B, ...) buffers
        const int64_t brow = (t - t0) * B + b0;  // ... and in the block's buffers
        T* gtop_t = G_top.data_ptr<T>() + brow * 5 * H;  // [d q | the top layer's gate gradients]
        for (int64_t k = L - 1; k >= 0; --k) {
          T* dhk = dhp + (k * B + b0) * H;
          const T* ext = Dp + k * state_ld + (row + B) * H;
          for (int64_t i = 0; i < n * H; ++i) {
            dhk[i] += ext[i];
          }
          T* ggh = grad_row(k, brow);  // d gh in (n, r, z) order
          T* ggi = ggh + H;             // d gi in (r, z, n) order
          const int64_t ld = grad_ld(k);
          GatesBwd g{n, H, dhk, gt + ((t * L + k) * B + b0) * 4 * H, st + k * state_ld + row * H, ggh, ld};
          gates_backward<T>(g);
          if (k > 0) {
            T* dh_below = dhp + ((k - 1) * B + b0) * H;
            if (layer_mask.has_value()) {
              ih_b[k].gemm(ggi, ld, T(0), dx, H);
              const T* m = ptr<T>(*layer_mask) + ((k - 1) * S * B + row) * H;
              for (int64_t i = 0; i < n * H; ++i) {
                dh_below[i] += dx[i] * m[i];
              }
            } else {
              ih_b[k].gemm(ggi, ld, T(1), dh_below, H);
            }
          } else {
            ih_b[0].gemm(ggi, ld, T(0), dctx, H);
          }
          if (k < L - 1) {
            hh_b[k].gemm(ggh, ld, T(1), dhk, H);
          }
        }
        AttnBwd a{n, T_, H, Q.data_ptr<T>() + brow * H, H, ptr<T>(kp) + b0 * T_ * H, ptr<T>(enc) + b0 * T_ * H,
                  ptr<T>(w.w_v), lens ? ptr<int64_t>(*lens) + b0 : nullptr,
                  attn_mask ? ptr<T>(*attn_mask) + row * T_ : nullptr, ptr<T>(attention) + row * T_,
                  g_attn ? ptr<T>(*g_attn) + row * T_ : nullptr, dctx, d_kp.data_ptr<T>() + b0 * T_ * H,
                  d_enc.data_ptr<T>() + b0 * T_ * H, dwv_rows.data_ptr<T>() + b0 * H, gtop_t, 5 * H};
        attention_backward<T>(a);
        cat_b.gemm(gtop_t, 5 * H, T(1), dhp + ((L - 1) * B + b0) * H, H);
      }
    };
    T* de = d_emb.data_ptr<T>();
    const int64_t* ids = ptr<int64_t>(X);
    for (; t1 > 0; t1 = t0) {
      t0 = std::max<int64_t>(0, t1 - block);
      const int64_t rows = (t1 - t0) * B, first = t0 * B;  // the block's rows of (S * B, ...) buffers
      const bool accumulate = t1 < S;                      // onto the later blocks' gradients
      const T beta = accumulate ? T(1) : T(0);
      gemm<T>(false, true, rows, H, H, T(1), top_prev + first * H, H, ptr<T>(w.W_q), H, T(0), Q.data_ptr<T>(), H);
      for_row_chunks(B, 2 * (t1 - t0) * step_flops_per_row(s), step_weight_values(s, 0), backward_rows);
      // Each layer's gate gradients (the top layer's after [d q]) and previous states, read by
      // several of the weight gradients' GEMMs below.
      std::vector<SharedOperand<T>> grads_of, states_of;
      for (int64_t k = 0; k < L; ++k) {
        const T* g = k == L - 1 ? G_top.data_ptr<T>() : grad_row(k, 0);
        const int64_t cols = k == L - 1 ? 5 * H : 4 * H;
        grads_of.push_back(gate_grads_operand<T>(g, rows, cols, cols, H));
        states_of.push_back(states_operand<T>(st + k * state_ld + first * H, rows, H));
      }
      const auto gate_grads = [&](int64_t k) { return k == L - 1 ? grads_of[k](0, H) : grads_of[k](); };
      // The block's share of the weight gradients: 2 + 2L independent pieces of work, for a small
      // model each on whichever thread claims it (chunks.h run_tasks; each writes its own
      // gradients, so the result does not depend on who ran it). W_hh's in two GEMMs: its
      // gradient rows are stored in (n, r, z) order.
      run_tasks(2 + 2 * L, small, [&](int64_t task) {
        if (task == 0 && per_token) {
          for (int64_t t = t0; t < t1; ++t) {
            per_token->add(ids + t, B, S, grad_row(0, (t - t0) * B) + H, grad_ld(0));
          }
          return;
        }
        if (task == 0) {
          // Embedding: the embedding columns of layer 0's input gradient, scattered by token.
          T* dxe = d_x.data_ptr<T>();
          gemm<T>(false, false, rows, E, 3 * H, T(1), gate_grads(0).at(0, H), {ptr<T>(w.w_ih[0]) + H, H + E}, T(0),
                  dxe, E);
          for (int64_t t = t0; t < t1; ++t) {
            scatter_add_rows<T>(de, E, ids + t, B, S, dxe + (t - t0) * B * E, E);
          }
          return;
        }
        if (task == 1) {
          gemm<T>(true, false, H, H, rows, T(1), grads_of[L - 1](), states_of[L - 1](), beta, d_Wq.data_ptr<T>(), H);
          return;
        }
        const int64_t k = (task - 2) / 2;
        const Operand<T> ggh = gate_grads(k), ggi = ggh.at(0, H);
        if (task % 2 == 1) {
          hidden_weight_grads<T>(rows, H, ggh, states_of[k](), accumulate, d.w_hh[k].data_ptr<T>(),
                                 d.b_hh[k].data_ptr<T>());
          return;
        }
        const int64_t in = k == 0 ? H + E : H;
        const T* xin;
        if (k == 0) {
          xin = ptr<T>(inputs);
        } else {
          xin = layer_mask.has_value() ? ptr<T>(layer_inputs) + (k - 1) * S * B * H : st + (k - 1) * state_ld + B * H;
        }
        // With the per-token table, layer 0's context columns only (the embedding's come after).
        const int64_t columns = k == 0 && per_token ? H : in;
        gemm<T>(true, false, 3 * H, columns, rows, T(1), ggi, {xin + first * in, in}, beta, d.w_ih[k].data_ptr<T>(),
                in);
        column_sums<T>(ggi.data, rows, 3 * H, ggi.ld, d.b_ih[k].data_ptr<T>(), accumulate);
      });
    }
    if (per_token) {  // S * B > 0 tokens
      run_tasks(2, small, [&](int64_t task) {
        if (task == 0) {
          per_token->embedding_grad(ptr<T>(w.w_ih[0]) + H, H + E, E, de);
        } else {
          per_token->weight_grad(ptr<T>(w.embedding), E, d.w_ih[0].data_ptr<T>() + H, H + E);
        }
      });
    }
    for (int64_t k = 0; k < L; ++k) {
      T* dhk = dhp + k * B * H;
      const T* ext = Dp + k * state_ld;
      for (int64_t i = 0; i < B * H; ++i) {
        dhk[i] += ext[i];
      }
    }
    column_sums<T>(dwv_rows.data_ptr<T>(), B, H, H, d_wv.data_ptr<T>(), false);
  });
  return {d_enc, dh, d_kp, pack_grads({d_emb, d_Wq, d_wv}, d, {d_dense_w, d_dense_b})};
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("decoder_backward", &seq2seq_fast::cpu::decoder_backward);
}
