// d2l's Seq2SeqEncoder on CPU: embedding + multi-layer GRU (zero initial state, dropout between
// layers in training), forward and hand-written backward through time. The forward runs step by
// step through all layers in one chunk of rows per thread; the backward layer by layer, so each
// layer's input-gradient GEMM runs once over all steps. Layouts (row-major, contiguous):
//   states (L, T + 1, B, H), states[:, 0] = 0; output = states[L - 1, 1:], final state = states[:, T];
//   layer_inputs (L - 1, T, B, H) = dropped-out inputs of layers 1.. (when layer_mask is given);
//   gates (L, T, B, 4H) = [r | z | n | W_hn h + b_hn] (kept for backward).
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/loop.h"

namespace seq2seq_fast::cpu {
namespace {

// Multiply-adds x 2 of one row's recurrence through all steps of one layer.
double recurrence_flops_per_row(const Sizes& s) {
  return 2.0 * static_cast<double>(s.S) * 3.0 * static_cast<double>(s.H * s.H);
}

// Values of the weights a forward step reads through all layers: every W_hh, the W_ih of
// layers > 0, and layer 0's W_ih unless its gates come from a vocabulary table.
int64_t step_weight_values(const Sizes& s, bool tabled) {
  return 3 * s.H * (s.L * s.H + (s.L - 1) * s.H + (tabled ? 0 : s.E));
}

// Embedding rows of X (B, T) in step-major order: out (T, B, E).
template <typename T>
void embed_steps(const at::Tensor& X, const at::Tensor& embedding, T* out, const Sizes& s) {
  const int64_t* ids = X.data_ptr<int64_t>();
  const T* table = embedding.data_ptr<T>();
  for (int64_t t = 0; t < s.S; ++t) {
    for (int64_t b = 0; b < s.B; ++b) {
      const T* src = table + ids[b * s.S + t] * s.E;
      std::copy(src, src + s.E, out + (t * s.B + b) * s.E);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoder_forward(const at::Tensor& X_in, at::TensorList params,
                                                                const c10::optional<at::Tensor>& layer_mask_in,
                                                                bool keep_activations) {
  Placement on;
  const EncoderWeights w = unpack_encoder_params(params, at::kCPU, kCpuFloats, &on);
  const Sizes s = check_encoder(X_in, w, layer_mask_in, on, nullptr);
  const CallerOnly caller_only(small_step_weights(step_weight_values(s, false)));
  const int64_t B = s.B, T_ = s.S, H = s.H, E = s.E, L = s.L;
  const at::Tensor X = X_in.contiguous();
  const at::Tensor& embedding = w.embedding;
  const std::vector<at::Tensor>&w_ih = w.w_ih, &w_hh = w.w_hh, &b_ih = w.b_ih, &b_hh = w.b_hh;
  const auto layer_mask = contiguous_opt(layer_mask_in);
  auto opts = embedding.options();
  at::Tensor states = cpu::empty({L, T_ + 1, B, H}, opts);
  at::Tensor layer_inputs = layer_mask.has_value() ? cpu::empty({L - 1, T_, B, H}, opts) : cpu::empty({0}, opts);
  at::Tensor gates = cpu::empty({keep_activations ? L * T_ : 1, B, 4 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::encoder_forward", [&] {
    using T = scalar_t;
    const EmbeddingGates<T> emb_gates(embedding, w_ih[0].data_ptr<T>(), E, H, T_ * B);
    T* st = states.data_ptr<T>();
    const int64_t state_ld = (T_ + 1) * B * H;
    // Each chunk of rows runs every step through every layer (layer k at step t needs layer
    // k - 1 at t and itself at t - 1), so the whole encoder is one parallel region.
    for_row_chunks(B, L * recurrence_flops_per_row(s), step_weight_values(s, emb_gates.tabled()),
                   [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      std::vector<PackedWeight<T>> ih(L), hh(L);
      for (int64_t k = 0; k < L; ++k) {
        if (k > 0 || !emb_gates.tabled()) {
          const int64_t in = k == 0 ? E : H;
          ih[k] = PackedWeight<T>(true, n, 3 * H, in, w_ih[k].data_ptr<T>(), in);
        }
        hh[k] = PackedWeight<T>(true, n, 3 * H, H, w_hh[k].data_ptr<T>(), H);
        std::fill(st + k * state_ld + b0 * H, st + k * state_ld + b1 * H, T(0));
      }
      Slab<T> slab(n * (6 * H + E), opts);
      T* gi = slab.take(n * 3 * H);     // (n, 3H) input gates
      T* gh = slab.take(n * 3 * H);     // (n, 3H) recurrent gates
      T* x_emb = slab.take(n * E);      // (n, E) the step's embeddings (no vocabulary table)
      const int64_t* ids = X.data_ptr<int64_t>() + b0 * T_;
      for (int64_t t = 0; t < T_; ++t) {
        const int64_t row = t * B + b0;  // first row of the chunk in (T, B, ...) buffers
        for (int64_t k = 0; k < L; ++k) {
          T* sk = st + k * state_ld;
          if (k == 0 && emb_gates.tabled()) {
            emb_gates.lookup(ids + t, n, T_, gi);
          } else if (k == 0) {
            gather_rows<T>(embedding.data_ptr<T>(), E, ids + t, n, T_, x_emb, E);
            ih[0].gemm(x_emb, E, T(0), gi, 3 * H);
          } else {
            const T* below = st + (k - 1) * state_ld + (row + B) * H;  // layer k - 1's output at t
            if (layer_mask.has_value()) {
              T* xo = layer_inputs.data_ptr<T>() + ((k - 1) * T_ * B + row) * H;
              const T* m = layer_mask->data_ptr<T>() + ((k - 1) * T_ * B + row) * H;
              for (int64_t i = 0; i < n * H; ++i) {
                xo[i] = below[i] * m[i];
              }
              below = xo;
            }
            ih[k].gemm(below, H, T(0), gi, 3 * H);
          }
          const T* hp = sk + row * H;
          hh[k].gemm(hp, H, T(0), gh, 3 * H);
          T* save = gates.data_ptr<T>() + ((keep_activations ? (k * T_ + t) * B : 0) + b0) * 4 * H;
          GatesFwd g{n, H, gi, 3 * H, gh, 3 * H, b_ih[k].data_ptr<T>(), b_hh[k].data_ptr<T>(), hp,
                     sk + (row + B) * H, save};
          gates_forward<T>(g);
        }
      }
    });
  });
  if (!keep_activations) {
    gates = cpu::empty({0}, opts);
  } else {
    gates = gates.view({L, T_, B, 4 * H});
  }
  return {states, layer_inputs, gates};
}

std::vector<at::Tensor> encoder_backward(const at::Tensor& grad_states_in, const at::Tensor& X_in,
                                         at::TensorList params, const c10::optional<at::Tensor>& layer_mask_in,
                                         const at::Tensor& states_in, const at::Tensor& layer_inputs_in,
                                         const at::Tensor& gates_in) {
  Placement on;
  const EncoderWeights w = unpack_encoder_params(params, at::kCPU, kCpuFloats, &on);
  const Sizes s = check_encoder(X_in, w, layer_mask_in, on, nullptr);
  const bool small = small_step_weights(step_weight_values(s, false));
  const CallerOnly caller_only(small);
  const int64_t B = s.B, T_ = s.S, H = s.H, E = s.E, L = s.L;
  check_encoder_activations(s, grad_states_in, states_in, layer_inputs_in, gates_in, layer_mask_in.has_value(), on);
  const at::Tensor X = X_in.contiguous();
  const at::Tensor& embedding = w.embedding;
  const std::vector<at::Tensor>&w_ih = w.w_ih, &w_hh = w.w_hh;
  const at::Tensor D = grad_states_in.contiguous(), states = states_in.contiguous(), gates = gates_in.contiguous();
  const at::Tensor layer_inputs = layer_inputs_in.contiguous();
  const auto layer_mask = contiguous_opt(layer_mask_in);
  auto opts = embedding.options();
  at::Tensor d_emb = cpu::zeros(embedding.sizes(), opts);
  GruWeights d;  // the GRU's gradients
  for (int64_t k = 0; k < L; ++k) {
    d.w_ih.push_back(cpu::empty({3 * H, k == 0 ? E : H}, opts));
    d.w_hh.push_back(cpu::empty({3 * H, H}, opts));
    d.b_ih.push_back(cpu::empty({3 * H}, opts));
    d.b_hh.push_back(cpu::empty({3 * H}, opts));
  }
  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::encoder_backward", [&] {
    using T = scalar_t;
    // One layer's gate gradients, rows [d gh_n | d r | d z | d gi_n] (rows.h GatesBwd).
    at::Tensor G = cpu::empty({T_, B, 4 * H}, opts);
    at::Tensor d_in = cpu::zeros({T_, B, std::max(E, H)}, opts);  // grad of the layer's input
    const T* st = states.data_ptr<T>();
    const T* Dp = D.data_ptr<T>();
    const int64_t state_ld = (T_ + 1) * B * H;
    T* dinp = d_in.data_ptr<T>();
    const int64_t* ids = X.data_ptr<int64_t>();
    bool embedded = false;  // d_emb written through the per-token table
    for (int64_t k = L - 1; k >= 0; --k) {
      // Backward through time, rows split into independent chunks.
      for_row_chunks(B, 2 * recurrence_flops_per_row(s), 3 * H * H, [&](int64_t b0, int64_t b1) {
        const int64_t n = b1 - b0;
        at::Tensor dh = cpu::zeros({n, H}, opts);
        T* dhp = dh.data_ptr<T>();
        const HiddenRowsNrz<T> w_nrz = hidden_rows_nrz(w_hh[k].data_ptr<T>(), H);
        const PackedWeight<T> hh(false, n, H, 3 * H, {w_nrz.n, w_nrz.rz});
        for (int64_t t = T_ - 1; t >= 0; --t) {
          const int64_t row = t * B + b0;
          const T* ext = Dp + k * state_ld + (row + B) * H;
          const T* from_above = dinp + row * H;  // layer k + 1's input grad (masked), k < L - 1
          for (int64_t i = 0; i < n * H; ++i) {
            dhp[i] += ext[i] + (k < L - 1 ? from_above[i] : T(0));
          }
          T* ggh = G.data_ptr<T>() + row * 4 * H;
          GatesBwd g{n, H, dhp, gates.data_ptr<T>() + ((k * T_ + t) * B + b0) * 4 * H, st + k * state_ld + row * H,
                     ggh, 4 * H};
          gates_backward<T>(g);
          hh.gemm(ggh, 4 * H, T(1), dhp, H);
        }
      });
      const T* xin;
      int64_t in = k == 0 ? E : H;
      if (k == 0) {
        xin = nullptr;
      } else if (layer_mask.has_value()) {
        xin = layer_inputs.data_ptr<T>() + (k - 1) * T_ * B * H;
      } else {
        xin = st + (k - 1) * state_ld + B * H;
      }
      const SharedOperand<T> g_all = gate_grads_operand<T>(G.data_ptr<T>(), T_ * B, 4 * H, 4 * H, H);
      const Operand<T> gh_all = g_all();      // d(gh) in (n, r, z) order
      const Operand<T> gi_all = g_all(0, H);  // d(gi) in (r, z, n) order
      // Layer 0's input is embedding rows: its gradients through a table of d(gi) per token when
      // the vocabulary is the smaller, else through the gathered embeddings.
      c10::optional<TokenGateGrads<T>> per_token;
      at::Tensor x_emb;
      if (k == 0 && TokenGateGrads<T>::worth(embedding.size(0), T_ * B)) {
        per_token.emplace(embedding.size(0), H, opts);
        for (int64_t t = 0; t < T_; ++t) {
          per_token->add(ids + t, B, T_, gi_all.data + t * B * 4 * H, 4 * H);
        }
        embedded = true;
      } else if (k == 0) {
        x_emb = cpu::empty({T_, B, E}, opts);
        embed_steps<T>(X, embedding, x_emb.data_ptr<T>(), s);
        xin = x_emb.data_ptr<T>();
      }
      const SharedOperand<T> h_prev = states_operand<T>(st + k * state_ld, T_ * B, H);
      // Three independent pieces of work, for a small model each on whichever thread claims it
      // (chunks.h run_tasks).
      run_tasks(3, small, [&](int64_t task) {
        if (task == 0 && per_token) {
          per_token->embedding_grad(w_ih[0].data_ptr<T>(), E, E, d_emb.data_ptr<T>());
        } else if (task == 0) {
          // Gradient of this layer's input for all steps: (T*B, in).
          gemm<T>(false, false, T_ * B, in, 3 * H, T(1), gi_all, {w_ih[k].data_ptr<T>(), in}, T(0), dinp, in);
          if (k > 0 && layer_mask.has_value()) {
            const T* m = layer_mask->data_ptr<T>() + (k - 1) * T_ * B * H;
            for (int64_t i = 0; i < T_ * B * H; ++i) {
              dinp[i] *= m[i];
            }
          }
        } else if (task == 1) {
          if (per_token) {
            per_token->weight_grad(embedding.data_ptr<T>(), E, d.w_ih[0].data_ptr<T>(), E);
          } else {
            gemm<T>(true, false, 3 * H, in, T_ * B, T(1), gi_all, {xin, in}, T(0), d.w_ih[k].data_ptr<T>(), in);
          }
          column_sums<T>(gi_all.data, T_ * B, 3 * H, 4 * H, d.b_ih[k].data_ptr<T>(), false);
        } else {
          hidden_weight_grads<T>(T_ * B, H, gh_all, h_prev(), false, d.w_hh[k].data_ptr<T>(), d.b_hh[k].data_ptr<T>());
        }
      });
    }
    if (!embedded) {
      // dinp holds the gradient of the embedded input (T, B, E): scatter by token.
      T* de = d_emb.data_ptr<T>();
      for (int64_t t = 0; t < T_; ++t) {
        scatter_add_rows<T>(de, E, ids + t, B, T_, dinp + t * B * E, E);
      }
    }
  });
  return pack_grads({d_emb}, d, {});
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("encoder_forward", &seq2seq_fast::cpu::encoder_forward);
  m.impl("encoder_backward", &seq2seq_fast::cpu::encoder_backward);
}
