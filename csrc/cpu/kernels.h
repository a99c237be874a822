// Building blocks of the CPU step loops: a BLAS GEMM entry point on raw pointers, vectorizable
// exp/sigmoid/tanh, and the fused per-row kernels (GRU gates and additive attention, forward
// and backward). Everything works on preallocated buffers; nothing here allocates.
//
// The row kernels are written as plain loops under `#pragma omp simd` so that the compiler
// vectorizes them; the float versions are compiled for AVX-512, AVX2 and baseline x86-64 with
// `target_clones` and picked at load time (the extension is built without -march flags, which
// leaves at::vec::Vectorized<float> scalar and its exp/tanh without Sleef in an extension).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/workspace.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEQ2SEQ_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SEQ2SEQ_FAST_CLONES
#endif
#define SEQ2SEQ_FAST_INLINE inline __attribute__((always_inline))

namespace seq2seq_fast::cpu {

// d2l's fill value for the scores of hidden keys.
constexpr double kMaskValue = -1e6;

// ---------------------------------------------------------------------------------------------
// GEMM: row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C, leading dimensions in
// elements. Goes to the BLAS that torch links (MKL's sgemm_/dgemm_ on x86-64 builds), else to
// at::addmm on views of the same memory.
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
               int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                 const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  blas_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// The weight operand of many row-major GEMMs C[M, N] = A[M, K] @ op(W) + beta * C that share W
// (a step loop's GEMMs). Small float weights (K * N up to 64k values, every per-step GEMM of
// d2l's models) on an AVX-512 CPU are packed once into panels of 16 columns for this file's
// register-blocked kernel: on this package's 2-core Zen 4 VM MKL runs M = 32, N = 96..201,
// K = 32 at ~80 GFLOP/s, the panel kernel at ~112 (a standalone timing on one thread). Anything
// else goes to the BLAS (MKL's own packed API measured no faster than plain sgemm here).
template <typename T>
class PackedWeight {
 public:
  PackedWeight() = default;
  // op(W) = W^T when trans (W is N x K), else W (K x N); ldw is W's row stride. M: rows of A.
  PackedWeight(bool trans, int64_t M, int64_t N, int64_t K, const T* W, int64_t ldw);
  // beta is 0 or 1.
  void gemm(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const;

 private:
  bool trans_ = false;
  int64_t M_ = 0, N_ = 0, K_ = 0, ldw_ = 0;
  const T* W_ = nullptr;
  at::Tensor panels_;  // (ceil(N / 16), K, 16) when the panel kernel runs it
};

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

// ---------------------------------------------------------------------------------------------
// Element math. Float uses polynomial approximations (exp: Cephes-style, about 2 ulp; tanh:
// rational, at most 5 ulp) that vectorize; double uses the C library (gradcheck precision).
SEQ2SEQ_FAST_INLINE float exp_f(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f;
  x = x + fx * 2.12194440e-4f;
  float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;  // 2^fx from its exponent bits (memcpy: std::bit_cast is C++20, torch 2.11 builds C++17)
  std::memcpy(&scale, &e, sizeof scale);
  return y * scale;
}

SEQ2SEQ_FAST_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// tanh as x P(x^2) / Q(x^2) on |x| <= 9 (beyond, tanh rounds to +-1 in float): a rational
// fit of relative error 2e-8 (this package's own, by iterated weighted least squares), at most
// 5 ulp in float arithmetic; one division and ten FMAs, no exp and no branch to select.
SEQ2SEQ_FAST_INLINE float tanh_f(float x) {
  x = std::min(std::max(x, -9.0f), 9.0f);
  const float z = x * x;
  float p = -8.8569072906e-14f;
  p = p * z + 5.4198247325e-11f;
  p = p * z - 2.0516942012e-08f;
  p = p * z + 1.1225655532e-05f;
  p = p * z + 3.1107486122e-03f;
  p = p * z + 1.3090084144e-01f;
  p = p * z + 9.9999999551e-01f;
  float q = 2.5560526873e-04f;
  q = q * z + 2.4522205154e-02f;
  q = q * z + 4.6423412482e-01f;
  q = q * z + 1.0f;
  return std::min(std::max(x * p / q, -1.0f), 1.0f);
}

template <typename T>
SEQ2SEQ_FAST_INLINE T exp_t(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_f(x);
  } else {
    return std::exp(x);
  }
}
template <typename T>
SEQ2SEQ_FAST_INLINE T sigmoid_t(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return sigmoid_f(x);
  } else {
    return T(1) / (T(1) + std::exp(-x));
  }
}
template <typename T>
SEQ2SEQ_FAST_INLINE T tanh_t(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return tanh_f(x);
  } else {
    return std::tanh(x);
  }
}

// ---------------------------------------------------------------------------------------------
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
// direct part of the gradient of h_prev) writes g_gi = d(gi) (ld_gi) and g_gh = d(gh) (ld_gh).
struct GatesBwd {
  int64_t B, H;
  void* dh;
  const void* save;
  const void* h_prev;
  void* g_gi;
  int64_t ld_gi;
  void* g_gh;
  int64_t ld_gh;
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

// Rows per parallel chunk so that each chunk does at least `work` element operations: a
// d2l-sized step (B = 64, H = 32) stays on one thread, where a fork/join costs more than it saves.
inline int64_t grain_rows(int64_t per_row, int64_t work = 131072) {
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

// A GRU's first-layer input gates from an embedding, W e(x) with W the (3H, E) block of W_ih
// that reads the embedding (the bias is added in the gate kernel), for many tokens: when the
// vocabulary has fewer rows than there are tokens, through a (V, 3H) table of every row's
// product, one GEMM of V rows; else the caller runs the GEMM over the gathered embeddings.
// (d2l's zh setting: V = 201 rows against 640 tokens a call.)
template <typename T>
class EmbeddingGates {
 public:
  // w: W's first element, ld_w its row stride; tokens: how many tokens the call projects.
  EmbeddingGates(const at::Tensor& embedding, const T* w, int64_t ld_w, int64_t H, int64_t tokens) : H_(H) {
    const int64_t V = embedding.size(0), E = embedding.size(1);
    if (V < tokens) {
      table_ = cpu::empty({V, 3 * H}, embedding.options());
      gemm<T>(false, true, V, 3 * H, E, T(1), embedding.data_ptr<T>(), E, w, ld_w, T(0), table_.data_ptr<T>(),
              3 * H);
    }
  }
  bool tabled() const { return table_.defined(); }
  // gi[i] = table[ids[i * id_stride]], rows of 3H with leading dimension 3H.
  void lookup(const int64_t* ids, int64_t count, int64_t id_stride, T* gi) const {
    gather_rows<T>(table_.data_ptr<T>(), 3 * H_, ids, count, id_stride, gi, 3 * H_);
  }

 private:
  int64_t H_;
  at::Tensor table_;
};

// Weights up to this many values (1 MiB of float) count as small: they stay in a core's L2
// cache across steps, so a per-step GEMM on them belongs inside a row chunk.
constexpr int64_t kSmallWeightValues = int64_t(1) << 18;

// Runs f(b0, b1) over contiguous chunks of the rows [0, B), one chunk per thread, each a whole
// step loop whose BLAS calls run single-threaded (MKL does inside a parallel region). Rows of a
// recurrence never meet, so this split needs no synchronization per step, where threading each
// step's small GEMMs forks and joins at every call. Splits only when each chunk gets at least
// `kChunkFlops` of work and 8 rows, and when the weights a step reads (`step_weight_values`)
// are small: each chunk streams them at every step, where a threaded GEMM splits them between
// the threads (the large benchmark's forward, 13 MB of step weights and a 16 MB dense layer:
// 323 ms split by rows, 211 ms unsplit). Otherwise f(0, B) runs on the calling thread and the
// BLAS threads each GEMM.
template <typename F>
void for_row_chunks(int64_t B, double flops_per_row, int64_t step_weight_values, const F& f) {
  constexpr double kChunkFlops = 2e6;
  if (step_weight_values > kSmallWeightValues) {
    f(int64_t(0), B);
    return;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const auto by_work = static_cast<int64_t>(std::ceil(kChunkFlops / std::max(flops_per_row, 1.0)));
  const int64_t even = (B + threads - 1) / threads;
  at::parallel_for(0, B, std::max<int64_t>({8, by_work, even}), f);
}

// ---------------------------------------------------------------------------------------------
// Argument checks shared by the ops: every message names the argument.
void check_cpu_float(const at::Tensor& t, const char* name, at::ScalarType dtype);
void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected);
void check_tokens(const at::Tensor& X, const char* name, int64_t vocab);
void check_valid_lens(const c10::optional<at::Tensor>& lens, int64_t B);

}  // namespace seq2seq_fast::cpu
