// The attention decoder's step loop on CUDA: teacher-forced forward, hand-written backward
// through time and batched greedy decoding, with the CPU ops' semantics and layouts
// (csrc/cpu/decoder_step.h):
//   logits (S, B, V), attention (S, B, T), states (L, S + 1, B, H) with states[:, 0] = hidden,
//   inputs (S, B, H + E) = layer 0's input [context ; embedding] per step,
//   layer_inputs (L - 1, S, B, H) = dropped-out inputs of layers 1.. (with a layer mask),
//   gates (S, L, B, 4H) = [r | z | n | W_hn h + b_hn] per step and layer.
// GEMMs go to cuBLAS through ATen's out= / in-place ops on preallocated buffers (the
// non-recurrent ones batched over all steps); per step, one fused attention kernel and one fused
// gate kernel per layer. Inside the loops nothing allocates, synchronizes or reads device values
// on the host, so the forward and backward can be captured in a CUDA graph. Half and bfloat16
// run the kernels' math in float and accumulate the gradients of enc_outputs, key_proj and w_v
// over the steps in float.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "checks.h"
#include "cuda/kernels.h"
#include "cuda/stream.h"

namespace seq2seq_fast::gpu {
namespace {

// Everything one decoder step reads and writes. `state_prev` and `state_out` are (L, B, H) views
// (they may alias: greedy decoding updates its state in place); x0 (B, H + E) is layer 0's input
// whose embedding part is already filled, gi0 (B, 3H) already holds that part's GEMM.
struct StepIO {
  at::Tensor state_prev, state_out;
  at::Tensor x0, gi0;
  at::Tensor attn_out;                 // (B, T)
  at::Tensor gates;                    // (L, B, 4H)
  at::Tensor layer_inputs;             // (L - 1, B, H) or undefined (no inter-layer dropout)
  at::Tensor layer_drop;               // (L - 1, B, H) or undefined
  const void* attn_drop;               // (B, T) or null
};

// Scratch of the step loop, allocated once per call.
struct StepScratch {
  at::Tensor qg;     // (B, 4H): [W_q s ; W_hh_top s] of the previous top state
  at::Tensor gi;     // (B, 3H): input GEMM of layers > 0
  at::Tensor gh;     // (B, 3H): recurrent GEMM of non-top layers
  at::Tensor probs;  // (B, T) Acc
};

StepScratch make_scratch(const Sizes& s, const at::TensorOptions& opts, at::ScalarType acc) {
  return {at::empty({s.B, 4 * s.H}, opts), at::empty({s.B, 3 * s.H}, opts), at::empty({s.B, 3 * s.H}, opts),
          at::empty({s.B, s.T}, opts.dtype(acc))};
}

// w_cat: w.query_and_top_weights(), (4H, H).
template <typename T>
void decoder_step(const Sizes& s, const DecoderWeights& w, const at::Tensor& w_cat, const at::Tensor& kp,
                  const at::Tensor& enc, const int64_t* lens, const StepIO& io, StepScratch& sc, cudaStream_t stream) {
  const int64_t B = s.B, H = s.H, E = s.E, L = s.L;
  at::mm_out(sc.qg, io.state_prev.select(0, L - 1), w_cat.t());
  AttnFwdArgs a{B,           s.T, H, io.attn_out.data_ptr(), io.x0.data_ptr(), H + E, sc.probs.data_ptr(),
                sc.qg.data_ptr(), 4 * H, kp.data_ptr(), enc.data_ptr(), w.w_v.data_ptr(), lens, io.attn_drop};
  attention_forward<T>(a, stream);
  io.gi0.addmm_(io.x0.narrow(1, 0, H), w.w_ih[0].narrow(1, 0, H).t());
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor h_prev = io.state_prev.select(0, k);
    const at::Tensor h_out = io.state_out.select(0, k);
    const void* gi = io.gi0.data_ptr();
    if (k > 0) {
      const at::Tensor xin = io.layer_inputs.defined() ? io.layer_inputs.select(0, k - 1) : io.state_out.select(0, k - 1);
      at::mm_out(sc.gi, xin, w.w_ih[k].t());
      gi = sc.gi.data_ptr();
    }
    const void* gh;
    int64_t ld_gh;
    if (k == L - 1) {
      gh = static_cast<const T*>(sc.qg.data_ptr()) + H;
      ld_gh = 4 * H;
    } else {
      at::mm_out(sc.gh, h_prev, w.w_hh[k].t());
      gh = sc.gh.data_ptr();
      ld_gh = 3 * H;
    }
    const bool drop = k < L - 1 && io.layer_inputs.defined();
    GatesFwdArgs g{B,
                   H,
                   h_out.data_ptr(),
                   io.gates.select(0, k).data_ptr(),
                   drop ? io.layer_inputs.select(0, k).data_ptr() : nullptr,
                   gi,
                   3 * H,
                   gh,
                   ld_gh,
                   w.b_ih[k].data_ptr(),
                   w.b_hh[k].data_ptr(),
                   h_prev.data_ptr(),
                   drop ? io.layer_drop.select(0, k).data_ptr() : nullptr};
    gates_forward<T>(g, stream);
  }
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult decoder_forward(const at::Tensor& X_in, const at::Tensor& enc_in, const at::Tensor& hidden_in,
                              const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in,
                              at::TensorList params, const c10::optional<at::Tensor>& attn_mask_in,
                              const c10::optional<at::Tensor>& layer_mask_in, bool keep_activations) {
  const Placement on = check_reference(enc_in, "enc_outputs", at::kCUDA, kCudaFloats);
  const c10::cuda::CUDAGuard guard(on.device);
  Sizes s;
  const DecoderWeights w = check_decoder_forward(X_in, enc_in, hidden_in, lens_in, kp_in, params, attn_mask_in,
                                                 layer_mask_in, on, &s, stream_is_capturing);
  const auto dtype = on.dtype;

  const at::Tensor X = X_in.contiguous(), enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in);
  const auto layer_mask = contiguous_opt(layer_mask_in);
  const int64_t B = s.B, S = s.S, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;
  const auto opts = enc.options();
  const auto acc = at::toOpMathType(dtype);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor logits = at::empty({S, B, V}, opts);
  at::Tensor attention = at::empty({S, B, T_}, opts);
  at::Tensor states = at::empty({L, S + 1, B, H}, opts);
  at::Tensor inputs = at::empty({S, B, H + E}, opts);
  at::Tensor layer_inputs = layer_mask.has_value() ? at::empty({L - 1, S, B, H}, opts) : at::empty({0}, opts);
  at::Tensor gates = keep_activations ? at::empty({S, L, B, 4 * H}, opts) : at::empty({1, L, B, 4 * H}, opts);
  states.select(1, 0).copy_(hidden_in);
  const at::Tensor w_cat = w.query_and_top_weights();
  StepScratch sc = make_scratch(s, opts, acc);
  at::Tensor gi0_all = at::empty({S, B, 3 * H}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "seq2seq_fast::decoder_forward_cuda", [&] {
    using T = scalar_t;
    // Embedding part of layer 0's input and its GEMM (b_ih is added in the gate kernel), for
    // all steps at once; rows in step-major order.
    const EmbedArgs emb{S, B, E, w.embedding.size(0), inputs.view({S * B, H + E}).narrow(1, H, E).data_ptr(),
                        H + E, w.embedding.data_ptr(), X.data_ptr<int64_t>(), S, 1};
    embed_rows<T>(emb, stream);
    at::Tensor gi0_rows = gi0_all.view({S * B, 3 * H});
    at::mm_out(gi0_rows, inputs.view({S * B, H + E}).narrow(1, H, E), w.w_ih[0].narrow(1, H, E).t());
    for (int64_t t = 0; t < S; ++t) {
      StepIO io;
      io.state_prev = states.select(1, t);
      io.state_out = states.select(1, t + 1);
      io.x0 = inputs.select(0, t);
      io.gi0 = gi0_all.select(0, t);
      io.attn_out = attention.select(0, t);
      io.gates = gates.select(0, keep_activations ? t : 0);
      if (layer_mask.has_value()) {
        io.layer_inputs = layer_inputs.select(1, t);
        io.layer_drop = layer_mask->select(1, t);
      }
      io.attn_drop = attn_mask.has_value() ? attn_mask->select(0, t).data_ptr() : nullptr;
      decoder_step<T>(s, w, w_cat, kp, enc, opt_ptr<int64_t>(lens), io, sc, stream);
    }
  });
  // dense over all steps at once: logits = tops @ W^T + b.
  at::Tensor logit_rows = logits.view({S * B, V});
  at::addmm_out(logit_rows, w.dense_b, states.select(0, L - 1).narrow(0, 1, S).reshape({S * B, H}),
                w.dense_w.t());
  if (!keep_activations) {  // the schema's shapes without a backward (csrc/ops.cpp)
    inputs = at::empty({0}, opts);
    gates = at::empty({0}, opts);
  }
  return {logits, attention, states, inputs, layer_inputs, gates};
}

using TensorVec = std::vector<at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, TensorVec>;

BackwardResult decoder_backward(
    const c10::optional<at::Tensor>& grad_logits_in, const c10::optional<at::Tensor>& grad_attention_in,
    const c10::optional<at::Tensor>& grad_states_in, const at::Tensor& X_in, const at::Tensor& enc_in,
    const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in, at::TensorList params,
    const c10::optional<at::Tensor>& attn_mask_in, const c10::optional<at::Tensor>& layer_mask_in,
    const at::Tensor& attention_in, const at::Tensor& states_in, const at::Tensor& inputs_in,
    const at::Tensor& layer_inputs_in, const at::Tensor& gates_in) {
  const Placement on = check_reference(enc_in, "enc_outputs", at::kCUDA, kCudaFloats);
  const c10::cuda::CUDAGuard guard(on.device);
  Sizes s;
  const DecoderWeights w = check_decoder_backward(grad_logits_in, grad_attention_in, grad_states_in, X_in, enc_in,
                                                  lens_in, kp_in, params, attn_mask_in, layer_mask_in, attention_in,
                                                  states_in, inputs_in, layer_inputs_in, gates_in, on, &s,
                                                  stream_is_capturing);
  const int64_t B = s.B, S = s.S, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;
  const auto dtype = on.dtype;

  const at::Tensor X = X_in.contiguous(), enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in), layer_mask = contiguous_opt(layer_mask_in);
  const at::Tensor attention = attention_in.contiguous(), states = states_in.contiguous();
  const at::Tensor inputs = inputs_in.contiguous(), gates = gates_in.contiguous();
  const at::Tensor layer_inputs = layer_inputs_in.contiguous();
  const auto g_logits = contiguous_opt(grad_logits_in), g_attn = contiguous_opt(grad_attention_in);
  const auto opts = enc.options();
  const auto acc = at::toOpMathType(dtype);
  const auto acc_opts = opts.dtype(acc);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const TensorVec &wih = w.w_ih, &whh = w.w_hh;
  const at::Tensor w_cat = w.query_and_top_weights();

  // D: external gradients of every state (the top states' include the logits' part).
  at::Tensor D = grad_states_in.has_value() ? grad_states_in->contiguous().clone() : at::zeros({L, S + 1, B, H}, opts);
  const at::Tensor top_prev = states.select(0, L - 1).narrow(0, 0, S).reshape({S * B, H});
  const at::Tensor tops = states.select(0, L - 1).narrow(0, 1, S).reshape({S * B, H});
  at::Tensor d_dense_w, d_dense_b;
  if (g_logits.has_value()) {
    const at::Tensor gy = g_logits->view({S * B, V});
    D.select(0, L - 1).narrow(0, 1, S).view({S * B, H}).addmm_(gy, w.dense_w);
    d_dense_w = at::mm(gy.t(), tops);
    d_dense_b = gy.sum(0);
  } else {
    d_dense_w = at::zeros({V, H}, opts);
    d_dense_b = at::zeros({V}, opts);
  }
  // The queries of every step in one GEMM (the scores' tanh is recomputed in the kernel).
  const at::Tensor Q = at::mm(top_prev, w.W_q.t()).view({S, B, H});

  at::Tensor Ggi = at::empty({L, S, B, 3 * H}, opts);
  at::Tensor Ggh = at::empty({std::max<int64_t>(L - 1, 0), S, B, 3 * H}, opts);
  at::Tensor Gcat = at::empty({S, B, 4 * H}, opts);  // [d q | d gh of the top layer]
  at::Tensor dh = at::zeros({L, B, H}, opts);
  at::Tensor dctx = at::empty({B, H}, opts);
  at::Tensor dx = at::empty({B, H}, opts);  // gradient of a dropped-out layer input, before the mask
  at::Tensor d_enc_acc = at::zeros({B, T_, H}, acc_opts), d_kp_acc = at::zeros({B, T_, H}, acc_opts);
  at::Tensor dwv_rows = at::zeros({B, H}, acc_opts);
  at::Tensor da_scratch = at::empty({B, T_}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "seq2seq_fast::decoder_backward_cuda", [&] {
    using T = scalar_t;
    for (int64_t t = S - 1; t >= 0; --t) {
      const at::Tensor gcat_t = Gcat.select(0, t);
      for (int64_t k = L - 1; k >= 0; --k) {
        const at::Tensor ggi = Ggi.select(0, k).select(0, t);
        void* ggh;
        int64_t ld_gh;
        if (k == L - 1) {
          ggh = static_cast<T*>(gcat_t.data_ptr()) + H;
          ld_gh = 4 * H;
        } else {
          ggh = Ggh.select(0, k).select(0, t).data_ptr();
          ld_gh = 3 * H;
        }
        // With inter-layer dropout, layer k + 1's GEMM left the gradient of its input in dx;
        // the gate kernel applies the mask and adds it.
        const bool from_above = k < L - 1 && layer_mask.has_value();
        GatesBwdArgs g{B,
                       H,
                       dh.select(0, k).data_ptr(),
                       ggi.data_ptr(),
                       3 * H,
                       ggh,
                       ld_gh,
                       gates.select(0, t).select(0, k).data_ptr(),
                       states.select(0, k).select(0, t).data_ptr(),
                       D.select(0, k).select(0, t + 1).data_ptr(),
                       from_above ? dx.data_ptr() : nullptr,
                       from_above ? layer_mask->select(0, k).select(0, t).data_ptr() : nullptr};
        gates_backward<T>(g, stream);
        if (k > 0) {
          if (layer_mask.has_value()) {
            at::mm_out(dx, ggi, wih[k]);
          } else {
            dh.select(0, k - 1).addmm_(ggi, wih[k]);
          }
        } else {
          at::mm_out(dctx, ggi, wih[0].narrow(1, 0, H));
        }
        if (k < L - 1) {
          dh.select(0, k).addmm_(Ggh.select(0, k).select(0, t), whh[k]);
        }
      }
      AttnBwdArgs a{B,
                    T_,
                    H,
                    gcat_t.data_ptr(),
                    4 * H,
                    d_kp_acc.data_ptr(),
                    d_enc_acc.data_ptr(),
                    dwv_rows.data_ptr(),
                    da_scratch.data_ptr(),
                    dctx.data_ptr(),
                    H,
                    attention.select(0, t).data_ptr(),
                    g_attn.has_value() ? g_attn->select(0, t).data_ptr() : nullptr,
                    Q.select(0, t).data_ptr(),
                    H,
                    kp.data_ptr(),
                    enc.data_ptr(),
                    w.w_v.data_ptr(),
                    opt_ptr<int64_t>(lens),
                    attn_mask.has_value() ? attn_mask->select(0, t).data_ptr() : nullptr};
      attention_backward<T>(a, stream);
      dh.select(0, L - 1).addmm_(gcat_t, w_cat);
    }
  });
  dh.add_(D.select(1, 0));

  // Weight gradients, each one GEMM over all steps.
  const at::Tensor gc = Gcat.view({S * B, 4 * H});
  at::Tensor d_Wq = at::mm(gc.narrow(1, 0, H).t(), top_prev);
  GruWeights d;  // the GRU's gradients
  d.w_ih.resize(L);
  d.w_hh.resize(L);
  d.b_ih.resize(L);
  d.b_hh.resize(L);
  d.w_hh[L - 1] = at::mm(gc.narrow(1, H, 3 * H).t(), top_prev);
  d.b_hh[L - 1] = gc.narrow(1, H, 3 * H).sum(0);
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor ggi = Ggi.select(0, k).view({S * B, 3 * H});
    if (k < L - 1) {
      const at::Tensor ggh = Ggh.select(0, k).view({S * B, 3 * H});
      d.w_hh[k] = at::mm(ggh.t(), states.select(0, k).narrow(0, 0, S).reshape({S * B, H}));
      d.b_hh[k] = ggh.sum(0);
    }
    at::Tensor xin;
    if (k == 0) {
      xin = inputs.view({S * B, H + E});
    } else if (layer_mask.has_value()) {
      xin = layer_inputs.select(0, k - 1).view({S * B, H});
    } else {
      xin = states.select(0, k - 1).narrow(0, 1, S).reshape({S * B, H});
    }
    d.w_ih[k] = at::mm(ggi.t(), xin);
    d.b_ih[k] = ggi.sum(0);
  }
  // Embedding: the embedding columns of layer 0's input gradient, summed per token by ATen's
  // embedding backward (sorts the ids: deterministic, unlike atomics; sums in float for half).
  const at::Tensor d_x = at::mm(Ggi.select(0, 0).view({S * B, 3 * H}), wih[0].narrow(1, H, E));
  const at::Tensor d_emb = at::embedding_dense_backward(d_x, X.t().reshape({S * B}), w.embedding.size(0),
                                                        /*padding_idx=*/-1, /*scale_grad_by_freq=*/false);
  at::Tensor d_wv = dwv_rows.sum(0).view(w.w_v.sizes()).to(dtype);
  return {d_enc_acc.to(dtype), dh, d_kp_acc.to(dtype), pack_grads({d_emb, d_Wq, d_wv}, d, {d_dense_w, d_dense_b})};
}

// ---- greedy decoding --------------------------------------------------------------------------

// Every kCheckEvery steps the count of finished rows is copied (asynchronously, into pinned host
// memory) behind an event; the host polls the events without blocking and stops enqueuing steps
// once a copy says every row has finished. It blocks only on an event kMaxAheadChecks checks
// old, so it never runs more than that many checks ahead of the GPU (which then still has
// that much work queued: the stream never drains).
constexpr int64_t kCheckEvery = 4;
constexpr int64_t kMaxAheadChecks = 2;

struct Event {
  cudaEvent_t event = nullptr;
  Event() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (event != nullptr) {
      cudaEventDestroy(event);
    }
  }
};

using GreedyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

GreedyResult greedy_decode(const at::Tensor& enc_in, const at::Tensor& hidden_in,
                           const c10::optional<at::Tensor>& lens_in, const at::Tensor& kp_in, at::TensorList params,
                           const c10::optional<at::Tensor>& attn_mask_in,
                           const c10::optional<at::Tensor>& layer_mask_in, int64_t bos, int64_t eos,
                           int64_t max_len, bool return_attention) {
  const Placement on = check_reference(enc_in, "enc_outputs", at::kCUDA, kCudaFloats);
  const c10::cuda::CUDAGuard guard(on.device);
  Sizes s;
  const DecoderWeights w = check_greedy_decode(enc_in, hidden_in, lens_in, kp_in, params, attn_mask_in,
                                               layer_mask_in, bos, eos, max_len, on, &s, false);
  const auto dtype = on.dtype;
  const at::Tensor enc = enc_in.contiguous(), kp = kp_in.contiguous();
  const auto lens = contiguous_opt(lens_in);
  const auto attn_mask = contiguous_opt(attn_mask_in), layer_mask = contiguous_opt(layer_mask_in);
  const int64_t B = s.B, T_ = s.T, H = s.H, E = s.E, V = s.V, L = s.L;
  const auto opts = enc.options();
  const auto long_opts = opts.dtype(at::kLong);
  const auto acc = at::toOpMathType(dtype);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor w_cat = w.query_and_top_weights();
  // The lengths' values are checked in the call's one host read, after the loop (check_values
  // before it would be a second sync); negative lengths only read as "all keys" meanwhile.
  const at::Tensor low_len = lens.has_value() ? lens->min() : at::Tensor();
  at::Tensor state = hidden_in.contiguous().clone();
  at::Tensor attn_buf = at::empty({return_attention ? max_len : 1, B, T_}, opts);
  at::Tensor tokens_buf = at::empty({B, max_len}, long_opts);
  at::Tensor x0 = at::empty({B, H + E}, opts), gi0 = at::empty({B, 3 * H}, opts);
  at::Tensor gates = at::empty({L, B, 4 * H}, opts);
  at::Tensor layer_inputs = layer_mask.has_value() ? at::empty({L - 1, B, H}, opts) : at::Tensor();
  at::Tensor logits = at::empty({B, V}, opts);
  StepScratch sc = make_scratch(s, opts, acc);
  at::Tensor finished = at::zeros({B}, opts.dtype(at::kInt));
  at::Tensor first_eos = at::full({B}, -1, long_opts);
  at::Tensor counters = at::zeros({2}, opts.dtype(at::kInt));  // [num_finished, steps]
  const at::Tensor bos_ids = at::full({B}, bos, long_opts);
  const int64_t checks = (max_len + kCheckEvery - 1) / kCheckEvery;
  at::Tensor host_finished = at::empty({checks}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  std::vector<std::unique_ptr<Event>> events;
  events.reserve(checks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "seq2seq_fast::greedy_decode_cuda", [&] {
    using T = scalar_t;
    int32_t* host = host_finished.data_ptr<int32_t>();
    int64_t next_poll = 0;  // the oldest check whose result the host has not read yet
    bool all_done = false;
    const EmbedArgs first{1, B, E, V, x0.narrow(1, H, E).data_ptr(), H + E, w.embedding.data_ptr(),
                          bos_ids.data_ptr<int64_t>(), 1, 0};
    embed_rows<T>(first, stream);
    for (int64_t t = 0; t < max_len && !all_done; ++t) {
      at::mm_out(gi0, x0.narrow(1, H, E), w.w_ih[0].narrow(1, H, E).t());
      StepIO io;
      io.state_prev = state;
      io.state_out = state;
      io.x0 = x0;
      io.gi0 = gi0;
      io.attn_out = attn_buf.select(0, return_attention ? t : 0);
      io.gates = gates;
      if (layer_mask.has_value()) {
        io.layer_inputs = layer_inputs;
        io.layer_drop = layer_mask->select(1, t);
      }
      io.attn_drop = attn_mask.has_value() ? attn_mask->select(0, t).data_ptr() : nullptr;
      decoder_step<T>(s, w, w_cat, kp, enc, opt_ptr<int64_t>(lens), io, sc, stream);
      at::addmm_out(logits, w.dense_b, state.select(0, L - 1), w.dense_w.t());
      GreedyArgs g{B,
                   V,
                   E,
                   t,
                   max_len,
                   eos,
                   tokens_buf.data_ptr<int64_t>(),
                   finished.data_ptr<int32_t>(),
                   first_eos.data_ptr<int64_t>(),
                   counters.data_ptr<int32_t>(),
                   x0.narrow(1, H, E).data_ptr(),
                   H + E,
                   logits.data_ptr(),
                   w.embedding.data_ptr()};
      greedy_step<T>(g, stream);
      if ((t + 1) % kCheckEvery != 0 || t + 1 >= max_len) {
        continue;
      }
      const int64_t c = static_cast<int64_t>(events.size());
      C10_CUDA_CHECK(cudaMemcpyAsync(host + c, counters.data_ptr<int32_t>(), sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, stream));
      events.push_back(std::make_unique<Event>());
      C10_CUDA_CHECK(cudaEventRecord(events.back()->event, stream));
      for (; next_poll <= c && !all_done; ++next_poll) {
        cudaEvent_t ev = events[next_poll]->event;
        if (next_poll + kMaxAheadChecks <= c) {
          C10_CUDA_CHECK(cudaEventSynchronize(ev));
        } else {
          const cudaError_t status = cudaEventQuery(ev);
          if (status == cudaErrorNotReady) {
            (void)cudaGetLastError();  // not an error: clear it before the next launch check
            break;
          }
          C10_CUDA_CHECK(status);
        }
        all_done = host[next_poll] == static_cast<int32_t>(B);
      }
    }
  });
  // The number of steps any row was unfinished in (and the lowest length): the one host sync of
  // the call.
  int64_t steps = 0;
  if (low_len.defined()) {
    const at::Tensor host = at::stack({counters.select(0, 1).to(at::kLong), low_len}).to(at::kCPU);
    steps = host.data_ptr<int64_t>()[0];
    if (host.data_ptr<int64_t>()[1] < 0) {
      raise_bad_length("enc_valid_lens", host.data_ptr<int64_t>()[1]);
    }
  } else {
    steps = counters.select(0, 1).item<int32_t>();
  }
  at::Tensor tokens = tokens_buf.narrow(1, 0, steps).contiguous();
  at::Tensor lengths = at::where(first_eos >= 0, first_eos, at::full({}, steps, long_opts));
  at::Tensor attention =
      return_attention ? attn_buf.narrow(0, 0, steps).permute({1, 0, 2}).contiguous() : at::empty({0}, opts);
  return {tokens, lengths, attention};
}

}  // namespace
}  // namespace seq2seq_fast::gpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CUDA, m) {
  m.impl("decoder_forward", &seq2seq_fast::gpu::decoder_forward);
  m.impl("decoder_backward", &seq2seq_fast::gpu::decoder_backward);
  m.impl("greedy_decode", &seq2seq_fast::gpu::greedy_decode);
}
