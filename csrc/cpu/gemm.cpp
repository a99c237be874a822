// Implementation of csrc/cpu/gemm.h: the BLAS shim and the AVX-512 panel GEMM.
//
// Float compares must not count as trapping (as in rows.cpp; torch itself builds with
// -fno-trapping-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu/gemm.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/math.h"
#include "gemm_precision.h"
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
// MKL's bfloat16 GEMM (float32 accumulation and output), CBLAS row-major convention; bfloat16
// values as their 16 bits.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
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

// ---- bfloat16 GEMMs (csrc/gemm_precision.h) ---------------------------------------------------

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS's enum values

// float32 -> bfloat16 bits, rounded to nearest even as c10::BFloat16 rounds (NaN stays NaN).
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return 0x7fc0;
  }
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// `rows` rows of `cols` values, `ld` apart, into `dst` (rows x cols, contiguous).
void to_bf16_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * ld;
    uint16_t* out = dst + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      out[c] = to_bf16(in[c]);
    }
  }
}

// A GEMM's operands in bfloat16, per thread, reused across calls (a decoder step converts one
// (B, H) state per GEMM; the weights are converted once, in PackedWeight).
uint16_t* bf16_scratch(int which, int64_t values) {
  thread_local std::vector<uint16_t> scratch[2];
  std::vector<uint16_t>& s = scratch[which];
  if (static_cast<int64_t>(s.size()) < values) {
    s.resize(static_cast<size_t>(values));
  }
  return s.data();
}

void bf16_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
               const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M < kMax && N < kMax && K < kMax && lda < kMax && ldb < kMax && ldc < kMax,
              "seq2seq_fast: GEMM sizes exceed the 32-bit BLAS interface");
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(M),
                         static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B,
                         static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}

// Seconds of one run of f.
template <typename F>
double seconds(const F& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Whether MKL's bfloat16 GEMM beats sgemm by a margin here, on a decoder step's shape of the
// large setting (64 x 1536 x 512): with AMX or AVX512-BF16 it runs 2.5-3x faster; without
// them MKL emulates it, slower than sgemm. Timed once per process (about 20 ms), the two
// interleaved and each at its fastest, so that a busy machine slows both alike.
bool bf16_gemm_measured_faster() {
  constexpr int64_t M = 64, N = 1536, K = 512;
  std::vector<float> a(M * K, 0.5f), w(N * K, 0.25f), c(M * N);
  std::vector<uint16_t> a16(M * K), w16(N * K);
  to_bf16_rows(a.data(), M, K, K, a16.data());
  to_bf16_rows(w.data(), N, K, K, w16.data());
  auto run_bf16 = [&] { bf16_gemm(false, true, M, N, K, 1.0f, a16.data(), K, w16.data(), K, 0.0f, c.data(), N); };
  auto run_f32 = [&] {
    gemm_impl<float>(sgemm_, false, true, M, N, K, 1.0f, a.data(), K, w.data(), K, 0.0f, c.data(), N);
  };
  double bf16 = 1e30, f32 = 1e30;
  for (int i = 0; i < 10; ++i) {
    bf16 = std::min(bf16, seconds(run_bf16));
    f32 = std::min(f32, seconds(run_f32));
  }
  return bf16 < 0.8 * f32;
}

bool bf16_units() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

// bfloat16 operands pay for their conversion and win only on large products: K and N of 64 or
// more and 4M multiply-adds (d2l's zh GEMMs, K = 32, stay float32; a large-setting step's
// 64 x 1536 x 512 runs about 3x faster in bfloat16 on AMX).
bool bf16_worth(int64_t M, int64_t N, int64_t K) { return K >= 64 && N >= 64 && M * N * K >= (int64_t(1) << 22); }

bool use_bf16(int64_t M, int64_t N, int64_t K) {
  return bf16_gemm_enabled() && bf16_worth(M, N, K) && bf16_gemm_available();
}

}  // namespace

bool bf16_gemm_available() {
  // SEQ2SEQ_FAST_BF16_GEMM=0 keeps every GEMM float32; =1 uses MKL's bfloat16 GEMM without timing it.
  static const bool available = [] {
    const char* flag = std::getenv("SEQ2SEQ_FAST_BF16_GEMM");
    const std::string setting = flag == nullptr ? "" : flag;
    if (cblas_gemm_bf16bf16f32 == nullptr || sgemm_ == nullptr || setting == "0") {
      return false;
    }
    return setting == "1" || (bf16_units() && bf16_gemm_measured_faster());
  }();
  return available;
}

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (use_bf16(M, N, K)) {
    // op(A) is M x K: A holds M x K rows, or K x M when transposed; likewise B.
    const int64_t a_rows = ta ? K : M, a_cols = ta ? M : K, b_rows = tb ? N : K, b_cols = tb ? K : N;
    uint16_t* a = bf16_scratch(0, a_rows * a_cols);
    uint16_t* b = bf16_scratch(1, b_rows * b_cols);
    to_bf16_rows(A, a_rows, a_cols, lda, a);
    to_bf16_rows(B, b_rows, b_cols, ldb, b);
    bf16_gemm(ta, tb, M, N, K, alpha, a, a_cols, b, b_cols, beta, C, ldc);
    return;
  }
  gemm_impl<float>(sgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

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
  const auto stacked_rows = [&] {
    std::vector<const T*> rows;
    for (const RowBlock<T>& b : blocks) {
      for (int64_t r = 0; r < b.rows; ++r) {
        rows.push_back(b.data + r * b.ld);
      }
    }
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(rows.size()) == (trans ? N : K), "seq2seq_fast: weight blocks");
    return rows;
  };
  if constexpr (std::is_same_v<T, float>) {
    if (panel_kernel_available() && N > 0 && K > 0 && K * N <= kPanelMaxValues) {
      // kind: the two layouts of one weight (W^T or W) pack differently.
      panels_ = derived_from_weights(trans ? 1 : 2, sources_of(blocks, cols), [&] { return pack_panels(trans, N, K, stacked_rows()); });
      return;
    }
    if (use_bf16(M, N, K)) {
      // op(W)^T (N x K) in bfloat16: MKL runs A @ B^T faster than A @ B at a step's M = B
      // rows (10-20 % at 64 x 512 x 1536 here), so both layouts of W take that form.
      bf16_ = derived_from_weights(trans ? 3 : 4, sources_of(blocks, cols), [&] {
        const std::vector<const T*> rows = stacked_rows();
        at::Tensor out = cpu::empty({N, K}, at::TensorOptions().dtype(at::kBFloat16));
        uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
        for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); ++r) {
          if (trans) {  // row n of W is row n of op(W)^T
            to_bf16_rows(rows[r], 1, K, K, dst + r * K);
          } else {  // row k of W is column k of op(W)^T
            for (int64_t n = 0; n < N; ++n) {
              dst[n * K + r] = to_bf16(rows[r][n]);
            }
          }
        }
        return out;
      });
      return;
    }
  }
  if (blocks.size() == 1) {
    W_ = blocks.begin()->data;
    ldw_ = blocks.begin()->ld;
    return;
  }
  const std::vector<const T*> rows = stacked_rows();
  stacked_ = cpu::empty({static_cast<int64_t>(rows.size()), cols},
                        at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* out = stacked_.data_ptr<T>();
  for (size_t r = 0; r < rows.size(); ++r) {
    std::copy(rows[r], rows[r] + cols, out + r * cols);
  }
  W_ = out;
  ldw_ = cols;
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
      uint16_t* a = bf16_scratch(0, M_ * K_);
      to_bf16_rows(A, M_, K_, lda, a);
      bf16_gemm(false, true, M_, N_, K_, 1.0f, a, K_, reinterpret_cast<const uint16_t*>(bf16_.data_ptr()), K_, beta,
                C, ldc);
      return;
    }
  }
  blas_gemm(false, trans_, M_, N_, K_, T(1), A, lda, W_, ldw_, beta, C, ldc);
}

template class PackedWeight<float>;
template class PackedWeight<double>;

}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_bf16_gemm_available", &seq2seq_fast::cpu::bf16_gemm_available);
}
