// What the CPU decoder ops share (decoder_forward.cpp, decoder_backward.cpp, greedy.cpp): one
// decoder step for a chunk of rows, its GEMM weights packed once per call, and its cost model.
// Layouts (all row-major, contiguous):
//   logits (S, B, V), attention (S, B, T), states (L, S + 1, B, H) with states[:, 0] = hidden,
//   inputs (S, B, H + E) = layer 0's input [context ; embedding] per step (with a backward),
//   layer_inputs (L - 1, S, B, H) = dropped-out inputs of layers 1.. (training with dropout),
//   gates (S, L, B, 4H) = [r | z | n | W_hn h + b_hn] per step and layer (kept for backward).
// Every buffer is allocated before the loop; the loop calls BLAS and the fused row kernels only.
#pragma once

#include <vector>

#include "checks.h"
#include "cpu/loop.h"

namespace seq2seq_fast::cpu {

// The weights of the per-step GEMMs, packed (M = B rows each).
template <typename T>
struct StepGemms {
  PackedWeight<T> qg;                // (B, 4H) = top state @ [W_q ; W_hh_top]^T
  PackedWeight<T> ctx0;              // (B, 3H) += context @ W_ih0[:, :H]^T
  std::vector<PackedWeight<T>> ih;   // layers k > 0: (B, 3H) = input @ W_ih_k^T
  std::vector<PackedWeight<T>> hh;   // layers k < L - 1: (B, 3H) = h @ W_hh_k^T

  StepGemms(const Sizes& s, const DecoderWeights& w) {
    const int64_t B = s.B, H = s.H, E = s.E;
    qg = PackedWeight<T>(true, B, 4 * H, H, {{ptr<T>(w.W_q), H, H}, {ptr<T>(w.w_hh.back()), 3 * H, H}});
    ctx0 = PackedWeight<T>(true, B, 3 * H, H, w.w_ih[0].data_ptr<T>(), H + E);
    ih.resize(s.L);
    hh.resize(s.L);
    for (int64_t k = 0; k < s.L; ++k) {
      if (k > 0) {
        ih[k] = PackedWeight<T>(true, B, 3 * H, H, w.w_ih[k].data_ptr<T>(), H);
      }
      if (k < s.L - 1) {
        hh[k] = PackedWeight<T>(true, B, 3 * H, H, w.w_hh[k].data_ptr<T>(), H);
      }
    }
  }
};

// Scratch of decoder_step for n rows.
template <typename T>
struct StepBuffers {
  T* qg;  // (n, 4H): [W_q s ; W_hh_top s] of the previous top state
  T* gi;  // (n, 3H): input GEMM of layers > 0
  T* gh;  // (n, 3H): recurrent GEMM of non-top layers

  StepBuffers(Slab<T>& slab, int64_t n, int64_t H)
      : qg(slab.take(n * 4 * H)), gi(slab.take(n * 3 * H)), gh(slab.take(n * 3 * H)) {}
};

// Multiply-adds x 2 of one row's decoder step: the per-step GEMMs and the attention scores.
inline double step_flops_per_row(const Sizes& s) {
  const double H = static_cast<double>(s.H);
  return 2.0 * ((4 + 3 + 6 * (s.L - 1)) * H * H + 3.0 * static_cast<double>(s.T) * H);
}

// Values of the weights a decoder step reads in its GEMMs ([W_q ; W_hh top], W_ih0's context
// block, the other layers' W_ih and W_hh), plus `extra` (dense, embedding gates).
inline int64_t step_weight_values(const Sizes& s, int64_t extra) {
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

// One decoder step for all rows: attention from the previous top state, layer 0's input GEMM
// (context part; `gi0` already holds the embedding part), the GRU layers. `state_prev` and
// `state_out` are (L, B, H) with stride `state_ld` between layers (they may alias).
template <typename T>
void decoder_step(const Sizes& s, const DecoderWeights& w, const StepGemms<T>& G, const T* kp, const T* enc,
                  const int64_t* lens, const T* attn_drop, const T* layer_drop, int64_t layer_drop_ld,
                  const T* state_prev, T* state_out, int64_t state_ld, T* x0, T* gi0, T* attn_out, T* gates,
                  int64_t gates_ld, T* layer_inputs, int64_t layer_inputs_ld, const StepBuffers<T>& buf) {
  const int64_t B = s.B, H = s.H, E = s.E, L = s.L;
  const T* top_prev = state_prev + (L - 1) * state_ld;
  G.qg.gemm(top_prev, H, T(0), buf.qg, 4 * H);
  AttnFwd a{B, s.T, H, buf.qg, 4 * H, kp, enc, ptr<T>(w.w_v), lens, attn_drop, attn_out, x0, H + E};
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
    GatesFwd g{B, H, gi, 3 * H, gh, ld_gh, ptr<T>(w.b_ih[k]), ptr<T>(w.b_hh[k]), h_prev, h_out,
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

}  // namespace seq2seq_fast::cpu
