// Implementation of csrc/cpu/gemm_bf16.h.
#include "cpu/gemm_bf16.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define SEQ2SEQ_FAST_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SEQ2SEQ_FAST_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#endif

#include "cpu/chunks.h"
#include "cpu/gemm.h"
#include "cpu/math.h"
#include "cpu/rows.h"
#include "cpu/workspace.h"
#include "gemm_precision.h"

// MKL's bfloat16 GEMM (float32 accumulation and output), exported by libtorch_cpu on x86-64
// builds (torch 2.11 too), CBLAS row-major convention, bfloat16 values as their 16 bits. Weak:
// without it every GEMM stays float32.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace seq2seq_fast::cpu {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS's enum values

SEQ2SEQ_FAST_CLONES void round_row_range(const float* src, int64_t r0, int64_t r1, int64_t cols, int64_t ld,
                                         uint16_t* dst, int64_t dst_cols) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* in = src + r * ld;
    uint16_t* out = dst + r * dst_cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      out[c] = round_bf16(in[c]);
    }
    std::fill(out + cols, out + dst_cols, uint16_t(0));
  }
}

// `rows` rows of `cols` values, `ld` apart, into `dst` (rows of `dst_cols` >= cols values, the
// rest zero); a batched GEMM's operands (millions of values) over the ops' threads.
void round_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, uint16_t* dst, int64_t dst_cols) {
  parallel_ranges(rows, grain_rows(cols, int64_t(1) << 18),
                  [&](int64_t r0, int64_t r1) { round_row_range(src, r0, r1, cols, ld, dst, dst_cols); });
}

// A GEMM's operands in bfloat16, per thread, reused across calls (a decoder step rounds one
// (B, K) operand per GEMM; the weights are rounded once, in pack_weight).
uint16_t* scratch(int which, int64_t values) {
  thread_local std::vector<uint16_t> buffers[2];
  std::vector<uint16_t>& s = buffers[which];
  if (static_cast<int64_t>(s.size()) < values) {
    s.resize(static_cast<size_t>(values));
  }
  return s.data();
}

void mkl_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
              const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M < kMax && N < kMax && K < kMax && lda < kMax && ldb < kMax && ldc < kMax,
              "seq2seq_fast: GEMM sizes exceed the 32-bit BLAS interface");
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(M),
                         static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B,
                         static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}

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
bool mkl_bf16_measured_faster() {
  constexpr int64_t M = 64, N = 1536, K = 512;
  std::vector<float> a(M * K, 0.5f), w(N * K, 0.25f), c(M * N);
  std::vector<uint16_t> a16(M * K), w16(N * K);
  round_rows(a.data(), M, K, K, a16.data(), K);
  round_rows(w.data(), N, K, K, w16.data(), K);
  const Bf16GemmScope float32(false);  // blas_gemm below: sgemm
  auto run_bf16 = [&] { mkl_gemm(false, true, M, N, K, 1.0f, a16.data(), K, w16.data(), K, 0.0f, c.data(), N); };
  auto run_f32 = [&] { blas_gemm(false, true, M, N, K, 1.0f, a.data(), K, w.data(), K, 0.0f, c.data(), N); };
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

// ---- the AMX tile kernel --------------------------------------------------------------------
// C[M, N] = A[M, K] @ B[K, N] (+ beta C) in blocks of 32 x 32: two 16-row tiles of A (32
// bfloat16 of K each) by two 16-column panels of B, four float32 accumulator tiles. B is packed
// as panels of 16 columns, each K / 2 rows of (16 columns x 2 consecutive k) - the pair layout
// TDPBF16PS reads -, K padded to 32 and the panels to an even count with zeros; A is rounded per
// call into rows of K32 values, padded to 32 rows with zeros.
constexpr int64_t kTile = 16, kBlock = 32;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#ifdef SEQ2SEQ_FAST_HAS_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (rows r, panel q) at 2r + q; 4-5: A's two row tiles; 6-7: B's two panels.
SEQ2SEQ_FAST_AMX_TARGET void amx_gemm(int64_t M, int64_t N, int64_t K32, const uint16_t* A, const uint16_t* panels,
                                      bool accumulate, float* C, int64_t ldc) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float edge[4][kTile * kTile];
  const int64_t panel_values = K32 * kTile;  // bfloat16 values of one packed panel
  const int64_t rows_a = round_up(M, kBlock), panels_b = round_up(N, kBlock) / kTile;
  // Panels outer: each pair of weight panels is read from memory once and stays in cache for
  // every row block (a step loop's weights do not fit in L2; its A, a step's rows, does).
  for (int64_t p = 0; p < panels_b; p += 2) {
    for (int64_t m = 0; m < rows_a; m += kBlock) {
      const bool inside = m + kBlock <= M && (p + 2) * kTile <= N;
      float* c = C + m * ldc + p * kTile;
      // Each accumulator tile's place: in C, or (a block over C's edge) in `edge`.
      auto tile_rows = [&](int t) { return std::clamp<int64_t>(M - m - (t / 2) * kTile, 0, kTile); };
      auto tile_cols = [&](int t) { return std::clamp<int64_t>(N - (p + t % 2) * kTile, 0, kTile); };
      auto at = [&](int t) { return c + (t / 2) * kTile * ldc + (t % 2) * kTile; };
      if (inside) {
        if (accumulate) {
          _tile_loadd(0, at(0), ldc * 4);
          _tile_loadd(1, at(1), ldc * 4);
          _tile_loadd(2, at(2), ldc * 4);
          _tile_loadd(3, at(3), ldc * 4);
        } else {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
      } else {
        for (int t = 0; t < 4; ++t) {
          std::fill(edge[t], edge[t] + kTile * kTile, 0.0f);
          for (int64_t r = 0; accumulate && r < tile_rows(t); ++r) {
            std::copy(at(t) + r * ldc, at(t) + r * ldc + tile_cols(t), edge[t] + r * kTile);
          }
        }
        _tile_loadd(0, edge[0], 64);
        _tile_loadd(1, edge[1], 64);
        _tile_loadd(2, edge[2], 64);
        _tile_loadd(3, edge[3], 64);
      }
      const uint16_t* b0 = panels + p * panel_values;
      const uint16_t* b1 = b0 + panel_values;
      const uint16_t* a0 = A + m * K32;
      const uint16_t* a1 = a0 + kTile * K32;
      for (int64_t k = 0; k < K32; k += kBlock) {
        _tile_loadd(4, a0 + k, K32 * 2);
        _tile_loadd(5, a1 + k, K32 * 2);
        _tile_loadd(6, b0 + k * kTile, 64);
        _tile_loadd(7, b1 + k * kTile, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      if (inside) {
        _tile_stored(0, at(0), ldc * 4);
        _tile_stored(1, at(1), ldc * 4);
        _tile_stored(2, at(2), ldc * 4);
        _tile_stored(3, at(3), ldc * 4);
      } else {
        _tile_stored(0, edge[0], 64);
        _tile_stored(1, edge[1], 64);
        _tile_stored(2, edge[2], 64);
        _tile_stored(3, edge[3], 64);
        for (int t = 0; t < 4; ++t) {
          for (int64_t r = 0; r < tile_rows(t); ++r) {
            std::copy(edge[t] + r * kTile, edge[t] + r * kTile + tile_cols(t), at(t) + r * ldc);
          }
        }
      }
    }
  }
  _tile_release();
}
#endif

// Whether the AMX kernel runs here: the CPU has AMX-BF16 and Linux lets this process use the
// tile registers (SEQ2SEQ_FAST_AMX=0 sends every bfloat16 GEMM to MKL instead).
bool amx_available() {
  static const bool available = [] {
    const char* flag = std::getenv("SEQ2SEQ_FAST_AMX");
    if (flag != nullptr && std::string(flag) == "0") {
      return false;
    }
#ifdef SEQ2SEQ_FAST_HAS_AMX
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
           syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
    return false;
#endif
  }();
  return available;
}

}  // namespace

bool bf16_gemm_available() {
  // SEQ2SEQ_FAST_BF16_GEMM=0 keeps every GEMM float32; =1 uses bfloat16 GEMMs without timing them.
  static const bool available = [] {
    const char* flag = std::getenv("SEQ2SEQ_FAST_BF16_GEMM");
    const std::string setting = flag == nullptr ? "" : flag;
    if (cblas_gemm_bf16bf16f32 == nullptr || setting == "0") {
      return false;
    }
    return setting == "1" || (bf16_units() && mkl_bf16_measured_faster());
  }();
  return available;
}

namespace bf16 {

// bfloat16 operands pay for their rounding and win only on large products: K and N of 64 or
// more and 4M multiply-adds (d2l's zh GEMMs, K = 32, stay float32; a large-setting step's
// 64 x 1536 x 512 runs about 3x faster in bfloat16 on AMX).
bool use(int64_t M, int64_t N, int64_t K) {
  return bf16_gemm_enabled() && K >= 64 && N >= 64 && M * N * K >= (int64_t(1) << 22) && bf16_gemm_available();
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  // op(A) is M x K: A holds M x K rows, or K x M when transposed; likewise B.
  const int64_t a_rows = ta ? K : M, a_cols = ta ? M : K, b_rows = tb ? N : K, b_cols = tb ? K : N;
  uint16_t* a = scratch(0, a_rows * a_cols);
  uint16_t* b = scratch(1, b_rows * b_cols);
  round_rows(A, a_rows, a_cols, lda, a, a_cols);
  round_rows(B, b_rows, b_cols, ldb, b, b_cols);
  mkl_gemm(ta, tb, M, N, K, alpha, a, a_cols, b, b_cols, beta, C, ldc);
}

at::Tensor pack_weight(bool trans, int64_t N, int64_t K, const std::vector<const float*>& rows) {
  // op(W)[k][n]: row n of W when trans, else row k.
  auto value = [&](int64_t k, int64_t n) { return trans ? rows[n][k] : rows[k][n]; };
  const auto options = at::TensorOptions().dtype(at::kBFloat16);
  if (amx_available()) {
    const int64_t K32 = round_up(K, kBlock), panels = round_up(N, kBlock) / kTile;
    at::Tensor packed = cpu::zeros({panels, K32 / 2, kTile * 2}, options);
    uint16_t* out = reinterpret_cast<uint16_t*>(packed.data_ptr());
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        out[((n / kTile) * (K32 / 2) + k / 2) * kTile * 2 + (n % kTile) * 2 + k % 2] = round_bf16(value(k, n));
      }
    }
    return packed;
  }
  // For MKL: op(W)^T (N x K), which it runs as A @ B^T, 10-20 % faster than A @ B at a step's rows.
  at::Tensor packed = cpu::empty({N, K}, options);
  uint16_t* out = reinterpret_cast<uint16_t*>(packed.data_ptr());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      out[n * K + k] = round_bf16(value(k, n));
    }
  }
  return packed;
}

void weight_gemm(const at::Tensor& packed, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, float beta,
                 float* C, int64_t ldc) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr());
#ifdef SEQ2SEQ_FAST_HAS_AMX
  if (amx_available()) {
    TORCH_INTERNAL_ASSERT(beta == 0.0f || beta == 1.0f, "seq2seq_fast: the AMX GEMM takes beta 0 or 1");
    const int64_t K32 = round_up(K, kBlock), rows = round_up(M, kBlock);
    uint16_t* a = scratch(0, rows * K32);
    round_rows(A, M, K, lda, a, K32);
    std::fill(a + M * K32, a + rows * K32, uint16_t(0));
    // Column blocks over the threads: each streams only its share of the weight, which is what
    // bounds a step's GEMM (its few rows reuse each weight value M times at most). Two chunks
    // per thread, claimed as threads come free, of at least kChunkFlops each.
    constexpr double kChunkFlops = 8e6;
    const int64_t blocks = round_up(N, kBlock) / kBlock;
    const auto by_work = static_cast<int64_t>(std::ceil(kChunkFlops / (2.0 * double(M) * kBlock * K)));
    const int64_t grain = std::max(by_work, (blocks + 2 * chunk_threads() - 1) / (2 * chunk_threads()));
    parallel_ranges(blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * kBlock, n1 = std::min(N, b1 * kBlock);
      amx_gemm(M, n1 - n0, K32, a, w + n0 * K32, beta != 0.0f, C + n0, ldc);
    });
    return;
  }
#endif
  uint16_t* a = scratch(0, M * K);
  round_rows(A, M, K, lda, a, K);
  mkl_gemm(false, true, M, N, K, 1.0f, a, K, w, K, beta, C, ldc);
}

}  // namespace bf16

namespace {
std::string bf16_gemm_kernel() {
  return !bf16_gemm_available() ? "none" : amx_available() ? "amx" : "mkl";
}
}  // namespace

}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_bf16_gemm", &seq2seq_fast::cpu::bf16_gemm_kernel);
}
