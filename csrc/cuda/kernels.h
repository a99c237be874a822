// The fused CUDA kernels of the step loops, the loss and the keep-mask (csrc/cuda/kernels.cu),
// behind plain host launchers so that the host code (decoder.cpp, encoder.cpp, loss.cpp,
// dropout.cpp) is compiled by the C++ compiler and only the kernels by nvcc. Every launcher takes the stream to launch on, checks the launch with
// C10_CUDA_KERNEL_LAUNCH_CHECK and launches nothing for an empty problem. Pointers are device
// pointers of the dtype T the launcher is instantiated with (float, double, c10::Half,
// c10::BFloat16); `Acc` buffers are of at::opmath_type<T> (float, or double for double).
// Row-major throughout; `ld_*` are row strides in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace seq2seq_fast::gpu {

// GRU gates, gate order r, z, n (torch's), for B rows of H units:
//   r = sigmoid(gi_r + b_ir + gh_r + b_hr), z likewise, n = tanh(gi_n + b_in + r * (gh_n + b_hn)),
//   h = (1 - z) * n + z * h_prev.
// gi, gh: the GEMM parts without bias. Saves [r | z | n | gh_n + b_hn] per row into save (B, 4H).
// With drop_mask (B, H) given, also writes the next layer's input drop_out = h * drop_mask.
// h_out may alias h_prev.
struct GatesFwdArgs {
  int64_t B, H;
  void* h_out;           // (B, H)
  void* save;            // (B, 4H)
  void* drop_out;        // (B, H) or null
  const void* gi;        // (B, 3H), row stride ld_gi
  int64_t ld_gi;
  const void* gh;        // (B, 3H), row stride ld_gh
  int64_t ld_gh;
  const void* b_ih;      // (3H,)
  const void* b_hh;      // (3H,)
  const void* h_prev;    // (B, H)
  const void* drop_mask; // (B, H) scaled keep-mask or null
};

// Backward of the gates. The gradient of h_out is d = dh + ext + above * above_mask (each of the
// last three optional: ext is an external gradient of the state, above the gradient of the next
// layer's input and above_mask its dropout keep-mask). Writes g_gi = d(gi), g_gh = d(gh) and
// overwrites dh with d * z (the direct part of the gradient of h_prev).
struct GatesBwdArgs {
  int64_t B, H;
  void* dh;               // (B, H) in/out
  void* g_gi;             // (B, 3H), row stride ld_gi
  int64_t ld_gi;
  void* g_gh;             // (B, 3H), row stride ld_gh
  int64_t ld_gh;
  const void* save;       // (B, 4H) from the forward
  const void* h_prev;     // (B, H)
  const void* ext;        // (B, H) or null
  const void* above;      // (B, H) or null
  const void* above_mask; // (B, H) or null (no dropout)
};

// Additive attention of one query per row b (one thread block per row):
//   e_j = w_v . tanh(q + kp_j) for j < valid_len, -1e6 beyond (excluded: exp underflows to 0);
//   a = softmax(e) (uniform over all T when valid_len <= 0, as d2l's fill makes it);
//   ctx = sum_j (a_j * drop_j) enc_j.
struct AttnFwdArgs {
  int64_t B, T, H;
  void* attn;               // (B, T) out: weights before dropout
  void* ctx;                // (B, H) out, row stride ld_ctx
  int64_t ld_ctx;
  void* probs;              // (B, T) Acc scratch: the weights in accumulation precision
  const void* q;            // (B, H), row stride ld_q
  int64_t ld_q;
  const void* kp;           // (B, T, H)
  const void* enc;          // (B, T, H)
  const void* w_v;          // (H,)
  const int64_t* valid_lens;  // (B,) or null
  const void* drop;         // (B, T) scaled keep-mask or null
};

// Backward of AttnFwd for one step: accumulates d_kp, d_enc (B, T, H) and d_wv_rows (B, H) (Acc
// buffers, each row b touched by its own block only: no atomics), writes d_q (B, H).
struct AttnBwdArgs {
  int64_t B, T, H;
  void* d_q;                // (B, H) out, row stride ld_dq
  int64_t ld_dq;
  void* d_kp;               // (B, T, H) Acc, accumulated
  void* d_enc;              // (B, T, H) Acc, accumulated
  void* d_wv_rows;          // (B, H) Acc, accumulated
  void* scratch;            // (B, T) Acc scratch
  const void* d_ctx;        // (B, H), row stride ld_dctx
  int64_t ld_dctx;
  const void* attn;         // (B, T) the forward's weights
  const void* d_attn;       // (B, T) gradient of the returned weights, or null
  const void* q;            // (B, H), row stride ld_q
  int64_t ld_q;
  const void* kp;
  const void* enc;
  const void* w_v;
  const int64_t* valid_lens;
  const void* drop;
};

// Embedding rows of a (B, steps) id matrix in step-major order: for t < steps, b < B,
//   out[t * B + b, :E] = table[ids[b * id_stride_b + t * id_stride_t], :E]   (out row stride ld_out);
// ids are clamped into [0, V) so that a bad id can never read outside the table (callers
// validate ids).
struct EmbedArgs {
  int64_t steps, B, E, V;
  void* out;
  int64_t ld_out;
  const void* table;  // (V, E)
  const int64_t* ids;
  int64_t id_stride_b, id_stride_t;
};

// One greedy step for B rows (one block per row): best = argmax of logits (B, V) (first index
// among equal maxima, as the CPU loop), then
//   tokens[b, t] = finished[b] ? eos : best        (tokens (B, max_len))
//   for a row not finished before step t: steps = max(steps, t + 1); if best == eos: finished,
//   first_eos[b] = t, ++num_finished;
//   embedding row of best -> next_input (B, E) (row stride ld_next): the next step's input.
// A finished row keeps feeding its own argmax (its outputs are discarded), so the other rows and
// the returned attention equal the CPU loop's.
struct GreedyArgs {
  int64_t B, V, E, t, max_len, eos;
  int64_t* tokens;
  int32_t* finished;       // (B,)
  int64_t* first_eos;      // (B,), -1 until the row's first eos
  int32_t* counters;       // [num_finished, steps]
  void* next_input;
  int64_t ld_next;
  const void* logits;      // (B, V)
  const void* table;       // (V, E)
};

// d2l's masked softmax cross-entropy over logits rows x = pred[b, s, :] (V contiguous values at
// b * stride_b + s * stride_s), one block per row (b, s), fp32 (double for double) accumulation:
//   lse[b, s] = log sum_v exp(x_v);  nll[b, s] = lse - x[label[b, s]]   (nll: Acc (B, S) scratch)
// then one thread per b, summing in step order: loss[b] = sum_{s < valid_len[b]} nll[b, s] / S.
// Labels are clamped into [0, V) and lengths into [0, S] (callers validate them).
struct CeFwdArgs {
  int64_t B, S, V;
  void* loss;                // (B,)
  void* lse;                 // (B, S)
  void* nll;                 // (B, S) Acc scratch
  const void* pred;
  int64_t stride_b, stride_s;
  const int64_t* label;      // (B, S)
  const int64_t* valid_len;  // (B,)
};

// Its gradient: grad[b, s, v] = scale * (exp(x_v - lse[b, s]) - [v == label]) with
// scale = grad_loss[b] / S for s < valid_len[b], else 0; grad has pred's strides.
struct CeBwdArgs {
  int64_t B, S, V;
  void* grad;
  const void* pred;
  int64_t stride_b, stride_s;
  const int64_t* label;
  const int64_t* valid_len;
  const void* lse;           // (B, S)
  const void* grad_loss;     // (B,)
};

// A dropout keep-mask of n elements: out[i] = keep if splitmix64_high(seed, offset + i) >=
// threshold, else 0 (csrc/random.h). While a CUDA graph is captured, seed and offset are read on
// the device from seed_ptr and *offset_ptr + offset_intragraph (torch's graph-safe philox state),
// so that each replay draws fresh masks.
struct KeepMaskArgs {
  int64_t n;
  void* out;
  uint64_t seed, offset;
  const int64_t* seed_ptr;    // null outside capture
  const int64_t* offset_ptr;  // null outside capture
  uint64_t offset_intragraph;
  uint32_t threshold;
  double keep;                // 1 / (1 - p)
};

template <typename T>
void gates_forward(const GatesFwdArgs& a, cudaStream_t stream);
template <typename T>
void gates_backward(const GatesBwdArgs& a, cudaStream_t stream);
template <typename T>
void attention_forward(const AttnFwdArgs& a, cudaStream_t stream);
template <typename T>
void attention_backward(const AttnBwdArgs& a, cudaStream_t stream);
template <typename T>
void embed_rows(const EmbedArgs& a, cudaStream_t stream);
template <typename T>
void greedy_step(const GreedyArgs& a, cudaStream_t stream);
template <typename T>
void cross_entropy_forward(const CeFwdArgs& a, cudaStream_t stream);
template <typename T>
void cross_entropy_backward(const CeBwdArgs& a, cudaStream_t stream);
template <typename T>
void keep_mask_fill(const KeepMaskArgs& a, cudaStream_t stream);

}  // namespace seq2seq_fast::gpu
