// bfloat16 GEMMs with float32 accumulation and output, for the CPU ops' float32 GEMMs while the
// calling thread's bf16_gemm_enabled() (csrc/gemm_precision.h): operands rounded to bfloat16 on
// the way in. Two kinds of kernel: MKL's cblas_gemm_bf16bf16f32, and this package's tile
// kernels (csrc/cpu/bf16_tiles.h: AMX, else AVX512-BF16) where the CPU has one.
// - A weight used by many GEMMs (a step loop's) is packed once for the tile kernel: at a step's
//   32-64 rows MKL spends a third of its time re-packing the weight on every call (AMX,
//   64 x 1536 x 512: 490 us against 370 with the weight packed; 32 rows: 330 vs 180).
// - Other GEMMs go to MKL, except with AVX512-BF16 only (AMD Zen 4), where MKL's bfloat16 GEMM
//   is no faster than its sgemm: there the tile kernel runs them, packing B per call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace seq2seq_fast::cpu {

// Whether large float32 GEMMs can run on bfloat16 operands here: a tile kernel runs on this CPU,
// or MKL's bfloat16 GEMM is faster than its sgemm (timed once per process).
bool bf16_gemm_available();

namespace bf16 {

// Whether a float32 GEMM of these sizes runs on bfloat16 operands now: the thread's setting is
// on, bf16_gemm_available(), and the product large enough to pay for rounding its operands.
bool use(int64_t M, int64_t N, int64_t K);

// Whether a weight packed once for a step loop's GEMMs (cpu::PackedWeight) runs on bfloat16
// operands now: on a tile kernel from K, N >= 32 on (the weight is rounded once, only the
// step's few rows of A every call), else at use()'s sizes.
bool use_packed(int64_t M, int64_t N, int64_t K);

// Row-major C[M, N] = alpha * op(A) @ op(B) + beta * C on bfloat16-rounded A and B (MKL).
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Whether gemm of these sizes rounds its operands for MKL now (not on a tile kernel): the rounding
// that several GEMMs reading one operand can share (cpu::SharedOperand).
bool rounds_operands(int64_t M, int64_t N, int64_t K);
// `rows` x `cols` of `src` (row stride ld) rounded to bfloat16, rows `cols` apart.
at::Tensor round_matrix(const float* src, int64_t rows, int64_t cols, int64_t ld);
// gemm with an operand already rounded (a16 / b16, row strides lda16 / ldb16) or null (rounded here).
void gemm_rounded(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                  int64_t lda, const uint16_t* a16, int64_t lda16, const float* B, int64_t ldb, const uint16_t* b16,
                  int64_t ldb16, float beta, float* C, int64_t ldc);

// The weight operand op(W) (K x N) of many GEMMs C[M, N] = A[M, K] @ op(W) + beta * C, rounded
// to bfloat16 once, laid out for weight_gemm: `rows` are W's rows (N rows of K values when
// trans, else K rows of N values).
at::Tensor pack_weight(bool trans, int64_t N, int64_t K, const std::vector<const float*>& rows);
void weight_gemm(const at::Tensor& packed, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, float beta,
                 float* C, int64_t ldc);

}  // namespace bf16
}  // namespace seq2seq_fast::cpu
