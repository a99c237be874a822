// d2l's Seq2SeqEncoder on CUDA: embedding + multi-layer GRU (zero initial state, dropout between
// layers in training), forward and hand-written backward through time, with the CPU ops'
// semantics and layouts (csrc/cpu/encoder.cpp):
//   states (L, T + 1, B, H), states[:, 0] = 0; layer_inputs (L - 1, T, B, H); gates (L, T, B, 4H).
// Layer by layer, so each layer's input GEMM (and, backward, its weight GEMMs) runs once over all
// steps; per step one recurrent GEMM and one fused gate kernel. Nothing in the step loops
// allocates or synchronizes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cuda/kernels.h"
#include "cuda/stream.h"

namespace seq2seq_fast::gpu {
namespace {

// Embedding rows of X (B, T) in step-major order: (T, B, E).
template <typename T>
void embed_steps(const at::Tensor& X, const at::Tensor& embedding, const at::Tensor& out, const Sizes& s,
                 cudaStream_t stream) {
  const EmbedArgs a{s.S, s.B, s.E, s.V, out.data_ptr(), s.E, embedding.data_ptr(), X.data_ptr<int64_t>(), s.S, 1};
  embed_rows<T>(a, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoder_forward(const at::Tensor& X_in, at::TensorList params,
                                                                const c10::optional<at::Tensor>& layer_mask_in,
                                                                bool keep_activations) {
  Placement on;
  const EncoderWeights w = unpack_encoder_params(params, at::kCUDA, kCudaFloats, &on);
  const c10::cuda::CUDAGuard guard(on.device);
  const Sizes s = check_encoder(X_in, w, layer_mask_in, on, stream_is_capturing);
  const auto dtype = on.dtype;
  const int64_t B = s.B, T_ = s.S, H = s.H, E = s.E, L = s.L;
  const at::Tensor X = X_in.contiguous();
  const at::Tensor& embedding = w.embedding;
  const std::vector<at::Tensor>&w_ih = w.w_ih, &w_hh = w.w_hh, &b_ih = w.b_ih, &b_hh = w.b_hh;
  const auto layer_mask = contiguous_opt(layer_mask_in);
  const auto opts = embedding.options();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor states = at::empty({L, T_ + 1, B, H}, opts);
  at::Tensor layer_inputs = layer_mask.has_value() ? at::empty({L - 1, T_, B, H}, opts) : at::empty({0}, opts);
  at::Tensor gates = at::empty({keep_activations ? L : 1, keep_activations ? T_ : 1, B, 4 * H}, opts);
  at::Tensor x_emb = at::empty({T_, B, E}, opts);
  at::Tensor GI = at::empty({T_, B, 3 * H}, opts);
  at::Tensor gh = at::empty({B, 3 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "seq2seq_fast::encoder_forward_cuda", [&] {
    using T = scalar_t;
    embed_steps<T>(X, embedding, x_emb, s, stream);
    for (int64_t k = 0; k < L; ++k) {
      const at::Tensor sk = states.select(0, k);
      sk.select(0, 0).zero_();
      at::Tensor xin;
      if (k == 0) {
        xin = x_emb.view({T_ * B, E});
      } else if (layer_mask.has_value()) {
        at::Tensor dropped = layer_inputs.select(0, k - 1);
        at::mul_out(dropped, states.select(0, k - 1).narrow(0, 1, T_), layer_mask->select(0, k - 1));
        xin = layer_inputs.select(0, k - 1).view({T_ * B, H});
      } else {
        xin = states.select(0, k - 1).narrow(0, 1, T_).reshape({T_ * B, H});
      }
      at::Tensor gi_rows = GI.view({T_ * B, 3 * H});
      at::mm_out(gi_rows, xin, w_ih[k].t());
      for (int64_t t = 0; t < T_; ++t) {
        const at::Tensor hp = sk.select(0, t);
        at::mm_out(gh, hp, w_hh[k].t());
        const at::Tensor save = keep_activations ? gates.select(0, k).select(0, t) : gates.select(0, 0).select(0, 0);
        GatesFwdArgs g{B,
                       H,
                       sk.select(0, t + 1).data_ptr(),
                       save.data_ptr(),
                       nullptr,
                       GI.select(0, t).data_ptr(),
                       3 * H,
                       gh.data_ptr(),
                       3 * H,
                       b_ih[k].data_ptr(),
                       b_hh[k].data_ptr(),
                       hp.data_ptr(),
                       nullptr};
        gates_forward<T>(g, stream);
      }
    }
  });
  if (!keep_activations) {
    gates = at::empty({0}, opts);
  }
  return {states, layer_inputs, gates};
}

std::vector<at::Tensor> encoder_backward(const at::Tensor& grad_states_in, const at::Tensor& X_in,
                                         at::TensorList params, const c10::optional<at::Tensor>& layer_mask_in,
                                         const at::Tensor& states_in, const at::Tensor& layer_inputs_in,
                                         const at::Tensor& gates_in) {
  Placement on;
  const EncoderWeights w = unpack_encoder_params(params, at::kCUDA, kCudaFloats, &on);
  const c10::cuda::CUDAGuard guard(on.device);
  const Sizes s = check_encoder(X_in, w, layer_mask_in, on, stream_is_capturing);
  const auto dtype = on.dtype;
  const int64_t B = s.B, T_ = s.S, H = s.H, E = s.E, L = s.L;
  check_encoder_activations(s, grad_states_in, states_in, layer_inputs_in, gates_in, layer_mask_in.has_value(), on);
  const at::Tensor X = X_in.contiguous();
  const at::Tensor& embedding = w.embedding;
  const std::vector<at::Tensor>&w_ih = w.w_ih, &w_hh = w.w_hh;
  const at::Tensor D = grad_states_in.contiguous(), states = states_in.contiguous(), gates = gates_in.contiguous();
  const at::Tensor layer_inputs = layer_inputs_in.contiguous();
  const auto layer_mask = contiguous_opt(layer_mask_in);
  const auto opts = embedding.options();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  GruWeights d;  // the GRU's gradients
  d.w_ih.resize(L);
  d.w_hh.resize(L);
  d.b_ih.resize(L);
  d.b_hh.resize(L);
  at::Tensor Ggi = at::empty({T_, B, 3 * H}, opts), Ggh = at::empty({T_, B, 3 * H}, opts);
  // Gradient of the current layer's input for all steps, (T*B, in) with in = E (layer 0) or H;
  // layer k - 1 reads layer k's (and applies the dropout mask in its gate kernel).
  at::Tensor d_in = at::zeros({T_ * B * std::max(E, H)}, opts);
  at::Tensor dh = at::empty({B, H}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "seq2seq_fast::encoder_backward_cuda", [&] {
    using T = scalar_t;
    for (int64_t k = L - 1; k >= 0; --k) {
      dh.zero_();
      const bool from_above = k < L - 1;
      const at::Tensor above = d_in.narrow(0, 0, T_ * B * H).view({T_, B, H});
      for (int64_t t = T_ - 1; t >= 0; --t) {
        const at::Tensor ggh = Ggh.select(0, t);
        GatesBwdArgs g{B,
                       H,
                       dh.data_ptr(),
                       Ggi.select(0, t).data_ptr(),
                       3 * H,
                       ggh.data_ptr(),
                       3 * H,
                       gates.select(0, k).select(0, t).data_ptr(),
                       states.select(0, k).select(0, t).data_ptr(),
                       D.select(0, k).select(0, t + 1).data_ptr(),
                       from_above ? above.select(0, t).data_ptr() : nullptr,
                       from_above && layer_mask.has_value() ? layer_mask->select(0, k).select(0, t).data_ptr()
                                                            : nullptr};
        gates_backward<T>(g, stream);
        dh.addmm_(ggh, w_hh[k]);
      }
      const int64_t in = k == 0 ? E : H;
      at::Tensor xin;
      if (k == 0) {
        xin = at::empty({T_, B, E}, opts);
        embed_steps<T>(X, embedding, xin, s, stream);
        xin = xin.view({T_ * B, E});
      } else if (layer_mask.has_value()) {
        xin = layer_inputs.select(0, k - 1).view({T_ * B, H});
      } else {
        xin = states.select(0, k - 1).narrow(0, 1, T_).reshape({T_ * B, H});
      }
      const at::Tensor gi_all = Ggi.view({T_ * B, 3 * H}), gh_all = Ggh.view({T_ * B, 3 * H});
      d.w_ih[k] = at::mm(gi_all.t(), xin);
      d.w_hh[k] = at::mm(gh_all.t(), states.select(0, k).narrow(0, 0, T_).reshape({T_ * B, H}));
      d.b_ih[k] = gi_all.sum(0);
      d.b_hh[k] = gh_all.sum(0);
      at::Tensor d_in_rows = d_in.narrow(0, 0, T_ * B * in).view({T_ * B, in});
      at::mm_out(d_in_rows, gi_all, w_ih[k]);
    }
  });
  // d_in now holds the gradient of the embedded input (T, B, E): summed per token by ATen's
  // embedding backward (sorts the ids: deterministic, unlike atomics; sums in float for half).
  at::Tensor d_emb = at::embedding_dense_backward(d_in.narrow(0, 0, T_ * B * E).view({T_ * B, E}),
                                                  X.t().reshape({T_ * B}), s.V, /*padding_idx=*/-1,
                                                  /*scale_grad_by_freq=*/false);
  return pack_grads({d_emb}, d, {});
}

}  // namespace
}  // namespace seq2seq_fast::gpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CUDA, m) {
  m.impl("encoder_forward", &seq2seq_fast::gpu::encoder_forward);
  m.impl("encoder_backward", &seq2seq_fast::gpu::encoder_backward);
}
