// Implementation of csrc/cpu/gemm.h: the BLAS shim and the AVX-512 panel GEMM.
//
// Float compares must not count as trapping (as in rows.cpp; torch itself builds with
// -fno-trapping-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu/gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cpu/chunks.h"
#include "cpu/gemm_bf16.h"
#include "cpu/math.h"
#include "cpu/weight_cache.h"
#include "cpu/workspace.h"

// The Fortran BLAS symbols that libtorch_cpu exports on x86-64 builds (MKL, LP64). Weak, so a
// build of torch without them falls back to at::addmm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}


namespace seq2seq_fast::cpu {
namespace {

template <typename T>
at::Tensor matrix_view(const T* data, bool trans, int64_t rows, int64_t cols, int64_t ld) {
  // op(X) is rows x cols; X itself is stored row-major with leading dimension ld.
  auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  if (!trans) {
    return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
  }
  return at::from_blob(const_cast<T*>(data), {cols, rows}, {ld, 1}, options).t();
}

template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                   const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  at::Tensor c = matrix_view(C, false, M, N, ldc);
  c.addmm_(matrix_view(A, ta, M, K, lda), matrix_view(B, tb, K, N, ldb), beta, alpha);
}

template <typename T, typename Blas>
void gemm_impl(Blas blas, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) {
    return;
  }
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
      }
    }
    return;
  }
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M < kMax && N < kMax && K < kMax && lda < kMax && ldb < kMax && ldc < kMax,
              "seq2seq_fast: GEMM sizes exceed the 32-bit BLAS interface");
  yield_cores();  // the BLAS threads itself
  if (blas == nullptr) {
    gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  blas(&trb, &tra, &m, &n, &k, &alpha, B, &ib, A, &ia, &beta, C, &ic);
}

// ---- the panel GEMM ------------------------------------------------------------------------
// C[M, N] (+)= A[M, K] @ B[K, N], B packed as panels of 16 columns (panel p holds
// B[k][16p, 16p + 16) for every k, zero past N). A block of R <= 4 rows by NP <= 4 panels of C
// stays in registers over the whole K loop: per k, R broadcasts of A, NP panel loads and R * NP
// FMAs (16 zmm accumulators at most). Compiled for AVX-512 only and used only where the CPU has
// it (panel_kernel_available); GCC vector types keep it free of intrinsics.
constexpr int64_t kPanel = 16;
constexpr int64_t kPanelMaxValues = int64_t(1) << 16;
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

template <int R, int NP>
SEQ2SEQ_FAST_INLINE void panel_block(int64_t K, const float* A, int64_t lda, const float* panels, float* C,
                                     int64_t ldc, int64_t cols, bool accumulate) {
  v16 acc[R][NP];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NP; ++c) {
      acc[r][c] = v16{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    v16 w[NP];
    for (int c = 0; c < NP; ++c) {
      w[c] = *reinterpret_cast<const v16*>(panels + (c * K + k) * kPanel);
    }
    for (int r = 0; r < R; ++r) {
      const v16 a = v16{} + A[r * lda + k];
      for (int c = 0; c < NP; ++c) {
        acc[r][c] += a * w[c];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NP; ++c) {
      float* dst = C + r * ldc + c * kPanel;
      const int64_t valid = std::min<int64_t>(kPanel, cols - c * kPanel);
      if (valid == kPanel) {
        *reinterpret_cast<v16u*>(dst) = accumulate ? acc[r][c] + *reinterpret_cast<const v16u*>(dst) : acc[r][c];
      } else {
        for (int64_t j = 0; j < valid; ++j) {
          dst[j] = accumulate ? dst[j] + acc[r][c][j] : acc[r][c][j];
        }
      }
    }
  }
}

template <int R>
SEQ2SEQ_FAST_INLINE void panel_row_block(int64_t N, int64_t K, const float* A, int64_t lda, const float* panels,
                                         float* C, int64_t ldc, bool accumulate) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < P; p += 4) {
    const float* pp = panels + p * K * kPanel;
    float* cp = C + p * kPanel;
    const int64_t cols = N - p * kPanel;
    switch (std::min<int64_t>(4, P - p)) {
      case 4: panel_block<R, 4>(K, A, lda, pp, cp, ldc, cols, accumulate); break;
      case 3: panel_block<R, 3>(K, A, lda, pp, cp, ldc, cols, accumulate); break;
      case 2: panel_block<R, 2>(K, A, lda, pp, cp, ldc, cols, accumulate); break;
      default: panel_block<R, 1>(K, A, lda, pp, cp, ldc, cols, accumulate); break;
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEQ2SEQ_FAST_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define SEQ2SEQ_FAST_AVX512
#endif

SEQ2SEQ_FAST_AVX512 void panel_gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                        const float* panels, float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    panel_row_block<4>(N, K, A + i * lda, lda, panels, C + i * ldc, ldc, accumulate);
  }
  switch (M - i) {
    case 3: panel_row_block<3>(N, K, A + i * lda, lda, panels, C + i * ldc, ldc, accumulate); break;
    case 2: panel_row_block<2>(N, K, A + i * lda, lda, panels, C + i * ldc, ldc, accumulate); break;
    case 1: panel_row_block<1>(N, K, A + i * lda, lda, panels, C + i * ldc, ldc, accumulate); break;
    default: break;
  }
}

// The panel kernel is compiled for AVX-512 only (elsewhere its 16 accumulators would spill).
bool panel_kernel_available() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // SEQ2SEQ_FAST_PANEL_GEMM=0 sends every GEMM to the BLAS (to compare the two).
  static const bool available = [] {
    const char* flag = std::getenv("SEQ2SEQ_FAST_PANEL_GEMM");
    return __builtin_cpu_supports("avx512f") && !(flag != nullptr && std::string(flag) == "0");
  }();
  return available;
#else
  return false;
#endif
}

}  // namespace

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (bf16::use(M, N, K)) {
    bf16::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  gemm_impl<float>(sgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const Operand<float>& A,
               const Operand<float>& B, float beta, float* C, int64_t ldc) {
  if ((A.rounded != nullptr || B.rounded != nullptr) && bf16::use(M, N, K)) {
    bf16::gemm_rounded(ta, tb, M, N, K, alpha, A.data, A.ld, A.rounded, A.rounded_ld, B.data, B.ld, B.rounded,
                       B.rounded_ld, beta, C, ldc);
    return;
  }
  blas_gemm(ta, tb, M, N, K, alpha, A.data, A.ld, B.data, B.ld, beta, C, ldc);
}

template <typename T>
SharedOperand<T>::SharedOperand(const T* data, int64_t rows, int64_t cols, int64_t ld, int64_t min_m,
                                int64_t min_n, int64_t min_k)
    : operand_{data, ld} {
  if constexpr (std::is_same_v<T, float>) {
    if (rounds(min_m, min_n, min_k)) {
      rounded_ = bf16::round_matrix(data, rows, cols, ld);
      operand_.rounded = reinterpret_cast<const uint16_t*>(rounded_.data_ptr());
      operand_.rounded_ld = cols;
    }
  }
}

template <typename T>
bool SharedOperand<T>::rounds(int64_t min_m, int64_t min_n, int64_t min_k) {
  return std::is_same_v<T, float> && bf16::rounds_operands(min_m, min_n, min_k);
}

template class SharedOperand<float>;
template class SharedOperand<double>;

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_impl<double>(dgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

namespace {

// Panels of the panel kernel from the rows of W (rows[i]: row i of W, N x K when trans, else K x N).
at::Tensor pack_panels(bool trans, int64_t N, int64_t K, const std::vector<const float*>& rows) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = cpu::zeros({panels, K, kPanel}, at::TensorOptions().dtype(at::kFloat));
  float* out = packed.data_ptr<float>();
  if (trans) {  // row n of W is column n of op(W): panel n / 16, lane n % 16
    for (int64_t n = 0; n < N; ++n) {
      float* lane = out + (n / kPanel) * K * kPanel + n % kPanel;
      for (int64_t k = 0; k < K; ++k) {
        lane[k * kPanel] = rows[n][k];
      }
    }
  } else {  // row k of W is row k of op(W), split across the panels
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t n = 0; n < N; ++n) {
        out[((n / kPanel) * K + k) * kPanel + n % kPanel] = rows[k][n];
      }
    }
  }
  return packed;
}

}  // namespace

// The weight rows a derived tensor reads, for the cache's check of their bytes.
template <typename T>
std::vector<WeightRows> sources_of(std::initializer_list<RowBlock<T>> blocks, int64_t cols) {
  std::vector<WeightRows> sources;
  for (const RowBlock<T>& b : blocks) {
    sources.push_back({b.data, b.rows, cols * int64_t(sizeof(T)), b.ld * int64_t(sizeof(T))});
  }
  return sources;
}

template <typename T>
PackedWeight<T>::PackedWeight(bool trans, int64_t M, int64_t N, int64_t K, std::initializer_list<RowBlock<T>> blocks)
    : trans_(trans), M_(M), N_(N), K_(K) {
  const int64_t cols = trans ? K : N;
  int64_t total_rows = 0;
  for (const RowBlock<T>& b : blocks) {
    total_rows += b.rows;
  }
  TORCH_INTERNAL_ASSERT(total_rows == (trans ? N : K), "seq2seq_fast: weight blocks");
  const auto stacked_rows = [&] {
    std::vector<const T*> rows;
    for (const RowBlock<T>& b : blocks) {
      for (int64_t r = 0; r < b.rows; ++r) {
        rows.push_back(b.data + r * b.ld);
      }
    }
    return rows;
  };
  if constexpr (std::is_same_v<T, float>) {
    // kind: the two layouts of one weight (W^T or W) pack differently, and so do the precisions.
    if (bf16::use_packed(M, N, K)) {
      bf16_ = derived_from_weights(trans ? 3 : 4, sources_of(blocks, cols),
                                   [&] { return bf16::pack_weight(trans, N, K, stacked_rows()); });
      return;
    }
    if (panel_kernel_available() && N > 0 && K > 0 && K * N <= kPanelMaxValues) {
      panels_ = derived_from_weights(trans ? 1 : 2, sources_of(blocks, cols), [&] { return pack_panels(trans, N, K, stacked_rows()); });
      return;
    }
  }
  blocks_.assign(blocks.begin(), blocks.end());
}

template <typename T>
void PackedWeight<T>::gemm(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
  if constexpr (std::is_same_v<T, float>) {
    if (panels_.defined()) {
      TORCH_INTERNAL_ASSERT(beta == 0.0f || beta == 1.0f, "seq2seq_fast: panel GEMM takes beta 0 or 1");
      panel_gemm_f32(M_, N_, K_, A, lda, panels_.data_ptr<float>(), C, ldc, beta != 0.0f);
      return;
    }
    if (bf16_.defined()) {
      bf16::weight_gemm(bf16_, M_, N_, K_, A, lda, beta, C, ldc);
      return;
    }
  }
  // Blocks of W^T are column ranges of C; blocks of W are row ranges of K, summed into C.
  int64_t offset = 0;
  for (const RowBlock<T>& b : blocks_) {
    if (trans_) {
      blas_gemm(false, true, M_, b.rows, K_, T(1), A, lda, b.data, b.ld, beta, C + offset, ldc);
    } else {
      blas_gemm(false, false, M_, N_, b.rows, T(1), A + offset, lda, b.data, b.ld, offset == 0 ? beta : T(1), C, ldc);
    }
    offset += b.rows;
  }
}

template class PackedWeight<float>;
template class PackedWeight<double>;

}  // namespace seq2seq_fast::cpu

