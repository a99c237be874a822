// The attention decoder's backward through time on CPU (layouts: csrc/cpu/decoder_step.h): the
// gradients of every step's attention and GRU layers, row chunk by row chunk, then each weight
// gradient as one GEMM over all steps.
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
  const CallerOnly caller_only(small_step_weights(step_weight_values(s, s.V * s.H)));
  const int64_t B = s.B, S = s.S, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;

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
  at::Tensor d_emb = cpu::zeros({w.embedding.size(0), E}, opts);
  at::Tensor d_Wq = cpu::empty({H, H}, opts), d_wv = cpu::empty(w.w_v.sizes(), opts);
  at::Tensor d_dense_w = cpu::zeros({V, H}, opts), d_dense_b = cpu::zeros({V}, opts);
  GruWeights d;  // the GRU's gradients
  for (int64_t k = 0; k < L; ++k) {
    d.w_ih.push_back(cpu::empty({3 * H, k == 0 ? H + E : H}, opts));
    d.w_hh.push_back(cpu::empty({3 * H, H}, opts));
    d.b_ih.push_back(cpu::empty({3 * H}, opts));
    d.b_hh.push_back(cpu::empty({3 * H}, opts));
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
    // The queries of every step, recomputed in one GEMM (the scores' tanh is recomputed too).
    at::Tensor Q = cpu::empty({S, B, H}, opts);
    gemm<T>(false, true, S * B, H, H, T(1), top_prev, H, ptr<T>(w.W_q), H, T(0), Q.data_ptr<T>(), H);
    at::Tensor Ggi = cpu::empty({L, S, B, 3 * H}, opts);
    at::Tensor Ggh = cpu::empty({std::max<int64_t>(L - 1, 0), S, B, 3 * H}, opts);
    at::Tensor Gcat = cpu::empty({S, B, 4 * H}, opts);  // [d q | d gh of the top layer]
    at::Tensor dwv_rows = cpu::zeros({B, H}, opts);
    T* dhp = dh.data_ptr<T>();
    const T* gt = ptr<T>(gates);
    // Backward through time for rows [b0, b1): every per-step quantity is per row.
    auto backward_rows = [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      Slab<T> slab(2 * n * H, opts);
      T* dctx = slab.take(n * H);  // (n, H) gradient of the context
      T* dx = slab.take(n * H);    // (n, H) gradient of a dropped-out layer input, before the mask
      // Per-step GEMM weights, packed once: gradients of the layers' inputs and previous states.
      std::vector<PackedWeight<T>> ih_b(L), hh_b(L);
      for (int64_t k = 0; k < L; ++k) {
        ih_b[k] = PackedWeight<T>(false, n, H, 3 * H, ptr<T>(w.w_ih[k]), k == 0 ? H + E : H);
        if (k < L - 1) {
          hh_b[k] = PackedWeight<T>(false, n, H, 3 * H, ptr<T>(w.w_hh[k]), H);
        }
      }
      const PackedWeight<T> cat_b(false, n, H, 4 * H, {{ptr<T>(w.W_q), H, H}, {ptr<T>(w.w_hh.back()), 3 * H, H}});
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
                  ptr<T>(w.w_v), lens ? ptr<int64_t>(*lens) + b0 : nullptr,
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
    gemm<T>(true, false, 3 * H, H, S * B, T(1), gc + H, 4 * H, top_prev, H, T(0), d.w_hh[L - 1].data_ptr<T>(), H);
    column_sums<T>(gc + H, S * B, 3 * H, 4 * H, d.b_hh[L - 1].data_ptr<T>(), false);
    for (int64_t k = 0; k < L; ++k) {
      const T* ggi = Ggi.data_ptr<T>() + k * S * B * 3 * H;
      if (k < L - 1) {
        const T* ggh = Ggh.data_ptr<T>() + k * S * B * 3 * H;
        gemm<T>(true, false, 3 * H, H, S * B, T(1), ggh, 3 * H, st + k * state_ld, H, T(0),
                d.w_hh[k].data_ptr<T>(), H);
        column_sums<T>(ggh, S * B, 3 * H, 3 * H, d.b_hh[k].data_ptr<T>(), false);
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
      gemm<T>(true, false, 3 * H, in, S * B, T(1), ggi, 3 * H, xin, in, T(0), d.w_ih[k].data_ptr<T>(), in);
      column_sums<T>(ggi, S * B, 3 * H, 3 * H, d.b_ih[k].data_ptr<T>(), false);
    }
    // Embedding: the embedding columns of layer 0's input gradient, scattered by token.
    at::Tensor d_x = cpu::empty({S, B, E}, opts);
    T* dxe = d_x.data_ptr<T>();
    gemm<T>(false, false, S * B, E, 3 * H, T(1), Ggi.data_ptr<T>(), 3 * H, ptr<T>(w.w_ih[0]) + H, H + E, T(0), dxe, E);
    T* de = d_emb.data_ptr<T>();
    const int64_t* ids = ptr<int64_t>(X);
    for (int64_t t = 0; t < S; ++t) {
      scatter_add_rows<T>(de, E, ids + t, B, S, dxe + t * B * E, E);
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
