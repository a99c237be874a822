// d2l's Seq2SeqEncoder on CPU: embedding + multi-layer GRU (zero initial state, dropout between
// layers in training), forward and hand-written backward through time. The forward runs step by
// step through all layers in one chunk of rows per thread; the backward layer by layer, so each
// layer's input-gradient GEMM runs once over all steps. Layouts (row-major, contiguous):
//   states (L, T + 1, B, H), states[:, 0] = 0; output = states[L - 1, 1:], final state = states[:, T];
//   layer_inputs (L - 1, T, B, H) = dropped-out inputs of layers 1.. (when layer_mask is given);
//   gates (L, T, B, 4H) = [r | z | n | W_hn h + b_hn] (kept for backward).
#include <torch/library.h>

#include <vector>

#include "cpu/kernels.h"

namespace seq2seq_fast::cpu {
namespace {

struct EncSizes {
  int64_t B, T, H, E, V, L;
};

EncSizes check_encoder(const at::Tensor& X, const at::Tensor& embedding, at::TensorList w_ih, at::TensorList w_hh,
                       at::TensorList b_ih, at::TensorList b_hh) {
  TORCH_CHECK_TYPE(embedding.scalar_type() == at::kFloat || embedding.scalar_type() == at::kDouble,
                   "seq2seq_fast: embedding must be float32 or float64, got ", embedding.scalar_type());
  const auto dtype = embedding.scalar_type();
  TORCH_CHECK_VALUE(embedding.device().is_cpu(), "seq2seq_fast: embedding must be a CPU tensor, got device ",
                    embedding.device());
  TORCH_CHECK_VALUE(embedding.dim() == 2, "seq2seq_fast: embedding must have shape (V, E), got ",
                    embedding.sizes());
  EncSizes s{};
  s.V = embedding.size(0);
  s.E = embedding.size(1);
  check_tokens(X, "X", s.V);
  s.B = X.size(0);
  s.T = X.size(1);
  TORCH_CHECK_VALUE(s.B >= 1, "seq2seq_fast: X must have at least one row, got shape ", X.sizes());
  s.L = static_cast<int64_t>(w_ih.size());
  const bool biases = !b_ih.empty() || !b_hh.empty();  // the backward passes none
  TORCH_CHECK_VALUE(s.L >= 1 && w_hh.size() == w_ih.size() &&
                        (!biases || (b_ih.size() == w_ih.size() && b_hh.size() == w_ih.size())),
                    "seq2seq_fast: w_ih, w_hh, b_ih, b_hh must list one tensor per GRU layer (>= 1)");
  check_cpu_float(w_hh[0], "w_hh", dtype);
  TORCH_CHECK_VALUE(w_hh[0].dim() == 2, "seq2seq_fast: w_hh[layer] must have shape (3H, H), got ",
                    w_hh[0].sizes());
  s.H = w_hh[0].size(1);
  for (int64_t k = 0; k < s.L; ++k) {
    check_cpu_float(w_ih[k], "w_ih", dtype);
    check_shape(w_ih[k], "w_ih[layer]", {3 * s.H, k == 0 ? s.E : s.H});
    check_cpu_float(w_hh[k], "w_hh", dtype);
    check_shape(w_hh[k], "w_hh[layer]", {3 * s.H, s.H});
    if (biases) {
      check_cpu_float(b_ih[k], "b_ih", dtype);
      check_shape(b_ih[k], "b_ih[layer]", {3 * s.H});
      check_cpu_float(b_hh[k], "b_hh", dtype);
      check_shape(b_hh[k], "b_hh[layer]", {3 * s.H});
    }
  }
  return s;
}

void check_layer_mask(const EncSizes& s, const c10::optional<at::Tensor>& layer_mask, at::ScalarType dtype) {
  if (!layer_mask.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(s.L > 1, "seq2seq_fast: layer_mask needs >= 2 layers");
  check_cpu_float(*layer_mask, "layer_mask", dtype);
  check_shape(*layer_mask, "layer_mask", {s.L - 1, s.T, s.B, s.H});
}

// Multiply-adds x 2 of one row's recurrence through all steps of one layer.
double recurrence_flops_per_row(const EncSizes& s) {
  return 2.0 * static_cast<double>(s.T) * 3.0 * static_cast<double>(s.H * s.H);
}

// Values of the weights a forward step reads through all layers: every W_hh, the W_ih of
// layers > 0, and layer 0's W_ih unless its gates come from a vocabulary table.
int64_t step_weight_values(const EncSizes& s, bool tabled) {
  return 3 * s.H * (s.L * s.H + (s.L - 1) * s.H + (tabled ? 0 : s.E));
}

std::vector<at::Tensor> contiguous_list(at::TensorList list) {
  std::vector<at::Tensor> out;
  for (const auto& t : list) {
    out.push_back(t.contiguous());
  }
  return out;
}

// Embedding rows of X (B, T) in step-major order: out (T, B, E).
template <typename T>
void embed_steps(const at::Tensor& X, const at::Tensor& embedding, T* out, const EncSizes& s) {
  const int64_t* ids = X.data_ptr<int64_t>();
  const T* table = embedding.data_ptr<T>();
  for (int64_t t = 0; t < s.T; ++t) {
    for (int64_t b = 0; b < s.B; ++b) {
      const T* src = table + ids[b * s.T + t] * s.E;
      std::copy(src, src + s.E, out + (t * s.B + b) * s.E);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoder_forward(const at::Tensor& X_in, const at::Tensor& embedding_in,
                                                                at::TensorList w_ih_in, at::TensorList w_hh_in,
                                                                at::TensorList b_ih_in, at::TensorList b_hh_in,
                                                                const c10::optional<at::Tensor>& layer_mask_in,
                                                                bool keep_activations) {
  const EncSizes s = check_encoder(X_in, embedding_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in);
  const auto dtype = embedding_in.scalar_type();
  check_layer_mask(s, layer_mask_in, dtype);
  const int64_t B = s.B, T_ = s.T, H = s.H, E = s.E, L = s.L;
  const at::Tensor X = X_in.contiguous(), embedding = embedding_in.contiguous();
  const auto w_ih = contiguous_list(w_ih_in), w_hh = contiguous_list(w_hh_in);
  const auto b_ih = contiguous_list(b_ih_in), b_hh = contiguous_list(b_hh_in);
  c10::optional<at::Tensor> layer_mask;
  if (layer_mask_in.has_value()) {
    layer_mask = layer_mask_in->contiguous();
  }
  auto opts = embedding.options();
  at::Tensor states = cpu::empty({L, T_ + 1, B, H}, opts);
  at::Tensor layer_inputs = layer_mask.has_value() ? cpu::empty({L - 1, T_, B, H}, opts) : cpu::empty({0}, opts);
  at::Tensor gates = cpu::empty({keep_activations ? L * T_ : 1, B, 4 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "seq2seq_fast::encoder_forward", [&] {
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
      at::Tensor scratch = cpu::empty({n, 6 * H + E}, opts);
      T* gi = scratch.data_ptr<T>();
      T* gh = gi + n * 3 * H;
      T* x_emb = gh + n * 3 * H;
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

using EncoderGrads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                std::vector<at::Tensor>, std::vector<at::Tensor>>;

EncoderGrads encoder_backward(const at::Tensor& grad_states_in, const at::Tensor& X_in,
                              const at::Tensor& embedding_in, at::TensorList w_ih_in, at::TensorList w_hh_in,
                              const c10::optional<at::Tensor>& layer_mask_in, const at::Tensor& states_in,
                              const at::Tensor& layer_inputs_in, const at::Tensor& gates_in) {
  const EncSizes s = check_encoder(X_in, embedding_in, w_ih_in, w_hh_in, {}, {});
  const auto dtype = embedding_in.scalar_type();
  check_layer_mask(s, layer_mask_in, dtype);
  const int64_t B = s.B, T_ = s.T, H = s.H, E = s.E, L = s.L;
  check_shape(grad_states_in, "grad_states", {L, T_ + 1, B, H});
  check_shape(states_in, "states", {L, T_ + 1, B, H});
  check_shape(gates_in, "gates", {L, T_, B, 4 * H});
  if (layer_mask_in.has_value()) {
    check_shape(layer_inputs_in, "layer_inputs", {L - 1, T_, B, H});
  }
  const at::Tensor X = X_in.contiguous(), embedding = embedding_in.contiguous();
  const auto w_ih = contiguous_list(w_ih_in), w_hh = contiguous_list(w_hh_in);
  const at::Tensor D = grad_states_in.contiguous(), states = states_in.contiguous(), gates = gates_in.contiguous();
  const at::Tensor layer_inputs = layer_inputs_in.contiguous();
  c10::optional<at::Tensor> layer_mask;
  if (layer_mask_in.has_value()) {
    layer_mask = layer_mask_in->contiguous();
  }
  auto opts = embedding.options();
  at::Tensor d_emb = cpu::zeros(embedding.sizes(), opts);
  std::vector<at::Tensor> d_wih, d_whh, d_bih, d_bhh;
  for (int64_t k = 0; k < L; ++k) {
    d_wih.push_back(cpu::empty({3 * H, k == 0 ? E : H}, opts));
    d_whh.push_back(cpu::empty({3 * H, H}, opts));
    d_bih.push_back(cpu::empty({3 * H}, opts));
    d_bhh.push_back(cpu::empty({3 * H}, opts));
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "seq2seq_fast::encoder_backward", [&] {
    using T = scalar_t;
    at::Tensor Ggi = cpu::empty({T_, B, 3 * H}, opts), Ggh = cpu::empty({T_, B, 3 * H}, opts);
    at::Tensor d_in = cpu::zeros({T_, B, std::max(E, H)}, opts);  // grad of the layer's input
    const T* st = states.data_ptr<T>();
    const T* Dp = D.data_ptr<T>();
    const int64_t state_ld = (T_ + 1) * B * H;
    T* dinp = d_in.data_ptr<T>();
    for (int64_t k = L - 1; k >= 0; --k) {
      // Backward through time, rows split into independent chunks.
      for_row_chunks(B, 2 * recurrence_flops_per_row(s), 3 * H * H, [&](int64_t b0, int64_t b1) {
        const int64_t n = b1 - b0;
        at::Tensor dh = cpu::zeros({n, H}, opts);
        T* dhp = dh.data_ptr<T>();
        const PackedWeight<T> hh(false, n, H, 3 * H, w_hh[k].data_ptr<T>(), H);
        for (int64_t t = T_ - 1; t >= 0; --t) {
          const int64_t row = t * B + b0;
          const T* ext = Dp + k * state_ld + (row + B) * H;
          const T* from_above = dinp + row * H;  // layer k + 1's input grad (masked), k < L - 1
          for (int64_t i = 0; i < n * H; ++i) {
            dhp[i] += ext[i] + (k < L - 1 ? from_above[i] : T(0));
          }
          T* ggi = Ggi.data_ptr<T>() + row * 3 * H;
          T* ggh = Ggh.data_ptr<T>() + row * 3 * H;
          GatesBwd g{n, H, dhp, gates.data_ptr<T>() + ((k * T_ + t) * B + b0) * 4 * H, st + k * state_ld + row * H,
                     ggi, 3 * H, ggh, 3 * H};
          gates_backward<T>(g);
          hh.gemm(ggh, 3 * H, T(1), dhp, H);
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
      at::Tensor x_emb;
      if (k == 0) {
        x_emb = cpu::empty({T_, B, E}, opts);
        embed_steps<T>(X, embedding, x_emb.data_ptr<T>(), s);
        xin = x_emb.data_ptr<T>();
      }
      const T* gi_all = Ggi.data_ptr<T>();
      const T* gh_all = Ggh.data_ptr<T>();
      gemm<T>(true, false, 3 * H, in, T_ * B, T(1), gi_all, 3 * H, xin, in, T(0), d_wih[k].data_ptr<T>(), in);
      gemm<T>(true, false, 3 * H, H, T_ * B, T(1), gh_all, 3 * H, st + k * state_ld, H, T(0),
              d_whh[k].data_ptr<T>(), H);
      column_sums<T>(gi_all, T_ * B, 3 * H, 3 * H, d_bih[k].data_ptr<T>(), false);
      column_sums<T>(gh_all, T_ * B, 3 * H, 3 * H, d_bhh[k].data_ptr<T>(), false);
      // Gradient of this layer's input for all steps: (T*B, in).
      gemm<T>(false, false, T_ * B, in, 3 * H, T(1), gi_all, 3 * H, w_ih[k].data_ptr<T>(), in, T(0), dinp, in);
      if (k > 0 && layer_mask.has_value()) {
        const T* m = layer_mask->data_ptr<T>() + (k - 1) * T_ * B * H;
        for (int64_t i = 0; i < T_ * B * H; ++i) {
          dinp[i] *= m[i];
        }
      }
    }
    // dinp now holds the gradient of the embedded input (T, B, E): scatter by token.
    T* de = d_emb.data_ptr<T>();
    const int64_t* ids = X.data_ptr<int64_t>();
    for (int64_t t = 0; t < T_; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        T* row = de + ids[b * T_ + t] * E;
        const T* src = dinp + (t * B + b) * E;
        for (int64_t c = 0; c < E; ++c) {
          row[c] += src[c];
        }
      }
    }
  });
  return {d_emb, d_wih, d_whh, d_bih, d_bhh};
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("encoder_forward", &seq2seq_fast::cpu::encoder_forward);
  m.impl("encoder_backward", &seq2seq_fast::cpu::encoder_backward);
}
