// The fused per-row kernels of the CPU step loops (GRU gates and additive attention, forward and
// backward; softmax cross-entropy; argmax; column sums) and the row copies around them. They
// work on preallocated buffers; nothing here allocates.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/math.h"

namespace seq2seq_fast::cpu {

// Copies a (D0, D1, D2) tensor of any strides into contiguous memory `out`, blocked so that an
// innermost dimension with a large stride (a transposed gradient) reads whole cache lines.
template <typename T>
void copy_contiguous(const at::Tensor& src, T* out);

// out[r] = index of the first largest of Y[r * V, (r + 1) * V), r < rows (torch.argmax's choice
// among ties).
template <typename T>
void argmax_rows(const T* Y, int64_t rows, int64_t V, int64_t* out);

// out[c] (+)= sum over rows r of G[r * ld + c], c < cols.
template <typename T>
void column_sums(const T* G, int64_t rows, int64_t cols, int64_t ld, T* out, bool accumulate);

// GRU gates, gate order r, z, n (torch's):
//   r = sigmoid(gi_r + b_ir + gh_r + b_hr), z likewise, n = tanh(gi_n + b_in + r * (gh_n + b_hn)),
//   h = (1 - z) * n + z * h_prev.
// Rows [0, B): gi (ld_gi), gh (ld_gh) the GEMM parts without bias; saves [r | z | n | gh_n + b_hn]
// per row into `save` (B, 4H). h_out may alias h_prev.
struct GatesFwd {
  int64_t B, H;
  const void* gi;
  int64_t ld_gi;
  const void* gh;
  int64_t ld_gh;
  const void* b_ih;
  const void* b_hh;
  const void* h_prev;
  void* h_out;
  void* save;
};

// Backward of the gates: from dh (B, H) (the gradient of h_out; overwritten with dh * z, the
// direct part of the gradient of h_prev) writes each row of g (row stride ld_g) as
// [d gh_n | d r | d z | d gi_n]: the pre-activation gradients of the hidden side's n (d gi_n * r)
// and of r, z, n on the input side (d gh_r = d gi_r, d gh_z = d gi_z are stored once). g + H is
// then d(gi) in the weights' (r, z, n) order, and g is d(gh) in (n, r, z) order: 4H per row
// instead of 6H for separate d(gi) and d(gh).
struct GatesBwd {
  int64_t B, H;
  void* dh;
  const void* save;
  const void* h_prev;
  void* g;
  int64_t ld_g;
};

// Additive attention of one query per row b in [0, B):
//   e_j = w_v . tanh(q + kp_j) for j < valid_len, -1e6 beyond; a = softmax(e);
//   ctx = sum_j (a_j * drop_j) enc_j. A row with valid_len 0 is uniform, as d2l.
struct AttnFwd {
  int64_t B, T, H;
  const void* q;  // (B, H), row stride ld_q
  int64_t ld_q;
  const void* kp;   // (B, T, H)
  const void* enc;  // (B, T, H)
  const void* w_v;  // (H,)
  const int64_t* valid_lens;  // (B,) or null
  const void* drop;  // (B, T) scaled keep mask or null
  void* attn;  // (B, T) out, softmax weights before dropout
  void* ctx;   // (B, H) out, row stride ld_ctx
  int64_t ld_ctx;
};

// Backward of AttnFwd for one step: accumulates d_kp, d_enc (B, T, H) and d_wv_rows (B, H),
// writes d_q (B, H) (row stride ld_dq). d_attn (B, T) is the gradient of the returned weights
// (may be null).
struct AttnBwd {
  int64_t B, T, H;
  const void* q;
  int64_t ld_q;
  const void* kp;
  const void* enc;
  const void* w_v;
  const int64_t* valid_lens;
  const void* drop;
  const void* attn;
  const void* d_attn;
  const void* d_ctx;  // (B, H)
  void* d_kp;
  void* d_enc;
  void* d_wv_rows;
  void* d_q;
  int64_t ld_dq;
};

// Softmax cross-entropy of rows (b, s) of logits x with row (b, s) at x + b * stride_b +
// s * stride_s (V contiguous values): lse = log sum exp x, nll = lse - x[label].
struct CeFwd {
  int64_t B, S, V, stride_b, stride_s;
  const void* x;
  const int64_t* label;  // (B, S)
  void* lse;             // (B, S) out
  void* nll;             // (B, S) out
};

// Its gradient: g[b, s, v] = scale[b, s] * (softmax(x)[v] - [v == label]), g strided as x.
struct CeBwd {
  int64_t B, S, V, stride_b, stride_s;
  const void* x;
  const int64_t* label;
  const void* lse;
  const void* scale;  // (B, S)
  void* grad;
};

template <typename T>
void gates_forward(const GatesFwd& p);
template <typename T>
void gates_backward(const GatesBwd& p);
template <typename T>
void attention_forward(const AttnFwd& p);
template <typename T>
void attention_backward(const AttnBwd& p);
template <typename T>
void cross_entropy_forward(const CeFwd& p);
template <typename T>
void cross_entropy_backward(const CeBwd& p);
// The same on bfloat16 logits: x and grad bfloat16; lse, nll and scale float32; the math in float32.
void cross_entropy_forward_bf16(const CeFwd& p);
void cross_entropy_backward_bf16(const CeBwd& p);

// Rows per parallel chunk so that each chunk does at least `work` element operations: a
// d2l-sized step (B = 64, H = 32, T = 10) stays on one thread, where waking a pool thread costs
// more than it saves. At 2^17 a one-step zh decoder call split its attention into 4 chunks: 74
// against 63 us a call (benchmarks/call_overhead.py, 2 threads, Zen 4 VM).
inline int64_t grain_rows(int64_t per_row, int64_t work = int64_t(1) << 19) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, per_row));
}

// out[i] = table row ids[i * id_stride] (width values), rows of out `out_ld` apart.
template <typename T>
void gather_rows(const T* table, int64_t width, const int64_t* ids, int64_t count, int64_t id_stride, T* out,
                 int64_t out_ld) {
  for (int64_t i = 0; i < count; ++i) {
    std::copy(table + ids[i * id_stride] * width, table + (ids[i * id_stride] + 1) * width, out + i * out_ld);
  }
}

// table[ids[i * id_stride]] += src[i] (width values; rows of src `src_ld` apart), i < count, in
// order (a deterministic embedding gradient).
template <typename T>
void scatter_add_rows(T* table, int64_t width, const int64_t* ids, int64_t count, int64_t id_stride, const T* src,
                      int64_t src_ld) {
  for (int64_t i = 0; i < count; ++i) {
    T* row = table + ids[i * id_stride] * width;
    const T* from = src + i * src_ld;
    for (int64_t c = 0; c < width; ++c) {
      row[c] += from[c];
    }
  }
}

// d2l's MaskedSoftmaxCELoss from per-row losses: out[b] = (1 / S) * sum over t < min(len[b], S)
// of nll(b, t), the row of (b, t) at t * B + b when step_major, else b * S + t. S = 0 gives
// 0 / 0, NaN, as d2l's mean of nothing.
template <typename T>
void masked_sequence_means(const T* nll, const int64_t* len, int64_t B, int64_t S, bool step_major, T* out) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t kept = std::min(len[b], S);
    T sum = 0;
    for (int64_t t = 0; t < kept; ++t) {
      sum += nll[step_major ? t * B + b : b * S + t];
    }
    out[b] = sum / static_cast<T>(S);
  }
}

}  // namespace seq2seq_fast::cpu
