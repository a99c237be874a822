// GEMMs of the CPU step loops on raw pointers: a BLAS entry point, and PackedWeight, the weight
// operand of a step loop's many GEMMs packed once for a register-blocked panel kernel. Large
// float32 GEMMs run on bfloat16 operands while the calling thread asks for it
// (csrc/gemm_precision.h, csrc/cpu/gemm_bf16.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace seq2seq_fast::cpu {

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

// A GEMM operand: row-major values with row stride `ld`, and, where several large GEMMs read one
// float32 matrix (SharedOperand), its bfloat16 copy, rounded once for all of them.
template <typename T>
struct Operand {
  const T* data;
  int64_t ld;
  const uint16_t* rounded = nullptr;  // the same values in bfloat16, row stride rounded_ld
  int64_t rounded_ld = 0;
  // The sub-matrix from row r, column c.
  Operand at(int64_t r, int64_t c) const {
    return {data + r * ld + c, ld, rounded == nullptr ? nullptr : rounded + r * rounded_ld + c, rounded_ld};
  }
};

// `rows` x `cols` of `data` for several GEMMs, rounded to bfloat16 once when the smallest of them
// (min_m x min_n x min_k) runs on MKL's bfloat16 GEMM now. A backward's weight gradients read each
// layer's gate gradients in three GEMMs; rounding both operands took a third of such a GEMM's time
// on AMX (csrc/cpu/gemm_bf16.h).
template <typename T>
class SharedOperand {
 public:
  SharedOperand(const T* data, int64_t rows, int64_t cols, int64_t ld, int64_t min_m, int64_t min_n, int64_t min_k);
  Operand<T> operator()(int64_t r = 0, int64_t c = 0) const { return operand_.at(r, c); }
  // Whether an operand of GEMMs of at least these sizes is rounded now.
  static bool rounds(int64_t min_m, int64_t min_n, int64_t min_k);

 private:
  at::Tensor rounded_;
  Operand<T> operand_;
};

// gemm on operands that may come rounded.
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const Operand<float>& A,
               const Operand<float>& B, float beta, float* C, int64_t ldc);
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const Operand<T>& A,
                 const Operand<T>& B, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    blas_gemm(trans_a, trans_b, M, N, K, alpha, A, B, beta, C, ldc);
  } else {
    blas_gemm(trans_a, trans_b, M, N, K, alpha, A.data, A.ld, B.data, B.ld, beta, C, ldc);
  }
}

// The weight operand of many row-major GEMMs C[M, N] = A[M, K] @ op(W) + beta * C that share W
// (a step loop's GEMMs). Small float weights (K * N up to 64k values, every per-step GEMM of
// d2l's models) on an AVX-512 CPU are packed once into panels of 16 columns for this file's
// register-blocked kernel: on this package's 2-core Zen 4 VM MKL runs M = 32, N = 96..201,
// K = 32 at ~80 GFLOP/s, the panel kernel at ~112 (a standalone timing on one thread). Anything
// else goes to the BLAS (MKL's own packed API measured no faster than plain sgemm here). While
// bfloat16 GEMMs are on, weights the tile kernels take (bf16::use_packed) are packed for those.
// Rows of a weight: `rows` rows of a row-major matrix with row stride `ld` (in elements).
template <typename T>
struct RowBlock {
  const T* data;
  int64_t rows, ld;
};

template <typename T>
class PackedWeight {
 public:
  PackedWeight() = default;
  // op(W) = W^T when trans (W is N x K), else W (K x N); ldw is W's row stride. M: rows of A.
  PackedWeight(bool trans, int64_t M, int64_t N, int64_t K, const T* W, int64_t ldw)
      : PackedWeight(trans, M, N, K, {RowBlock<T>{W, trans ? N : K, ldw}}) {}
  // W stacked from row blocks (e.g. [W_q ; W_hh] without a concatenated copy): their rows
  // add up to N when trans, else to K. Panels are cached across calls (csrc/cpu/weight_cache.h).
  PackedWeight(bool trans, int64_t M, int64_t N, int64_t K, std::initializer_list<RowBlock<T>> blocks);
  // beta is 0 or 1.
  void gemm(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const;

 private:
  bool trans_ = false;
  int64_t M_ = 0, N_ = 0, K_ = 0;
  std::vector<RowBlock<T>> blocks_;  // for the BLAS: one GEMM per block, no stacked copy
  at::Tensor panels_;   // (ceil(N / 16), K, 16) when the panel kernel runs it
  at::Tensor bf16_;     // op(W) in bfloat16 (csrc/cpu/gemm_bf16.h) when the GEMM runs on bfloat16 operands
};

}  // namespace seq2seq_fast::cpu
