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

#include "cpu/bf16_tiles.h"
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
  yield_cores();  // MKL threads itself
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
// large setting (64 x 1536 x 512): with AMX it runs 2.5-3x faster; on Zen 4 (AVX512-BF16) no
// faster; without either MKL emulates it, slower than sgemm. Asked only where no tile kernel
// runs (csrc/cpu/bf16_tiles.h). Timed once per process (about 20 ms), the two
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

}  // namespace

bool bf16_gemm_available() {
  // SEQ2SEQ_FAST_BF16_GEMM=0 keeps every GEMM float32; =1 uses MKL's bfloat16 GEMMs without
  // timing them where no tile kernel runs.
  static const bool available = [] {
    const char* flag = std::getenv("SEQ2SEQ_FAST_BF16_GEMM");
    const std::string setting = flag == nullptr ? "" : flag;
    if (setting == "0") {
      return false;
    }
    if (bf16::tile_kernel() != bf16::TileKernel::none) {
      return true;
    }
    return cblas_gemm_bf16bf16f32 != nullptr && (setting == "1" || (bf16_units() && mkl_bf16_measured_faster()));
  }();
  return available;
}

namespace bf16 {
namespace {

// ---- the tile kernels (csrc/cpu/bf16_tiles.h): their operands and their split over threads ----

// op(A) (M x K; A holds K x M when trans) rounded into rows of K32 values, zeros past K, and zero
// rows up to padded_rows(M): the A operand of tile_gemm.
void round_tile_rows(bool trans, const float* A, int64_t M, int64_t K, int64_t lda, uint16_t* dst) {
  const int64_t K32 = padded_k(K);
  if (trans) {
    parallel_ranges(M, grain_rows(K, int64_t(1) << 18), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        std::fill(dst + m * K32 + K, dst + (m + 1) * K32, uint16_t(0));
      }
      for (int64_t k = 0; k < K; ++k) {  // reads along A's rows
        for (int64_t m = m0; m < m1; ++m) {
          dst[m * K32 + k] = round_bf16(A[k * lda + m]);
        }
      }
    });
  } else {
    round_rows(A, M, K, lda, dst, K32);
  }
  std::fill(dst + M * K32, dst + padded_rows(M) * K32, uint16_t(0));
}

// op(W) (K x N) into tile_gemm's panels at `out` (packed_panels(N) * padded_k(K) * 16 values);
// row(i) is row i of W: N rows of K values when trans, else K rows of N values.
template <typename Row>
void pack_panels(bool trans, int64_t N, int64_t K, const Row& row, uint16_t* out) {
  const int64_t K32 = padded_k(K), panel_values = K32 * kPanelColumns;
  parallel_ranges(packed_panels(N), grain_rows(panel_values, int64_t(1) << 18), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelColumns, n1 = std::min(N, n0 + kPanelColumns);
      if (K != K32 || n1 - n0 < kPanelColumns) {  // zero columns or zero k to pad
        std::fill(out + p * panel_values, out + (p + 1) * panel_values, uint16_t(0));
      }
      for (int64_t n = n0; trans && n < n1; ++n) {
        const float* w = row(n);
        for (int64_t k = 0; k < K; ++k) {
          out[packed_index(K32, k, n)] = round_bf16(w[k]);
        }
      }
      for (int64_t k = 0; !trans && k < K; ++k) {
        const float* w = row(k);
        for (int64_t n = n0; n < n1; ++n) {
          out[packed_index(K32, k, n)] = round_bf16(w[n]);
        }
      }
    }
  });
}

// C[M, N] = A @ B (+ C) by tile_gemm over the threads: columns in the kernel's blocks, each
// chunk streaming only its share of B - what bounds a step's GEMM, whose few rows reuse each
// weight value M times at most -, two chunks per thread of at least kChunkFlops each; and rows
// in pieces too when the column blocks are too few to share (a weight gradient's N = H).
void run_tiles(TileKernel kernel, int64_t M, int64_t N, int64_t K32, const uint16_t* a, const uint16_t* panels,
               bool accumulate, float* C, int64_t ldc) {
  constexpr double kChunkFlops = 8e6;
  constexpr int64_t kRowPiece = 96;  // a multiple of both kernels' row blocks (6 and 32)
  const int64_t width = column_block(kernel), blocks = (N + width - 1) / width, threads = chunk_threads();
  int64_t piece_rows = M;
  if (blocks < 2 * threads && M > kRowPiece) {
    const int64_t pieces = std::min((M + kRowPiece - 1) / kRowPiece, (2 * threads + blocks - 1) / blocks);
    piece_rows = round_up((M + pieces - 1) / pieces, kRowPiece);
  }
  const int64_t pieces = (M + piece_rows - 1) / piece_rows;
  const int64_t chunks_per_piece = std::max<int64_t>(1, (2 * threads + pieces - 1) / pieces);
  const auto by_work = static_cast<int64_t>(std::ceil(kChunkFlops / (2.0 * double(piece_rows) * width * K32)));
  const int64_t grain = std::max(by_work, (blocks + chunks_per_piece - 1) / chunks_per_piece);
  const int64_t column_chunks = (blocks + grain - 1) / grain;
  run_chunks(pieces * column_chunks, [&](int64_t i) {
    const int64_t m0 = (i / column_chunks) * piece_rows, rows = std::min(M - m0, piece_rows);
    const int64_t n0 = (i % column_chunks) * grain * width, n1 = std::min(N, n0 + grain * width);
    tile_gemm(kernel, rows, n1 - n0, K32, a + m0 * K32, panels + n0 * K32, accumulate, C + m0 * ldc + n0, ldc);
  });
}

// Whether a GEMM with no packed operand runs on the tile kernel (packing B per call) rather than
// MKL's bfloat16 GEMM: with AVX512-BF16 only, where MKL's is no faster than sgemm (on Zen 4; it
// has no AVX512-BF16 path), or where torch exports no MKL. With AMX, MKL's GEMM uses AMX itself.
bool general_on_tiles() {
  const TileKernel kernel = tile_kernel();
  return kernel == TileKernel::avx512 || (kernel != TileKernel::none && cblas_gemm_bf16bf16f32 == nullptr);
}

// C[M, N] = op(A) @ B (+ C when beta is 1) on the tile kernel, B already in its panels: op(A)
// rounded into the thread's scratch, then run_tiles.
void tiles_gemm(bool ta, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* panels,
                float beta, float* C, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(beta == 0.0f || beta == 1.0f, "seq2seq_fast: the bfloat16 tile GEMM takes beta 0 or 1");
  const int64_t K32 = padded_k(K);
  uint16_t* a = scratch(0, padded_rows(M) * K32);
  round_tile_rows(ta, A, M, K, lda, a);
  run_tiles(tile_kernel(), M, N, K32, a, panels, beta != 0.0f, C, ldc);
}

}  // namespace

// A GEMM rounding both operands per call wins only on large products: K and N of 64 or more and
// 4M multiply-adds (a large-setting step's 64 x 1536 x 512 runs about 3x faster in bfloat16 on
// AMX, 2.5x with AVX512-BF16 on Zen 4; lower limits made d2l's zh training step 1.17x slower).
bool use(int64_t M, int64_t N, int64_t K) {
  return bf16_gemm_enabled() && K >= 64 && N >= 64 && M * N * K >= (int64_t(1) << 22) && bf16_gemm_available();
}

// On a tile kernel even d2l's zh step GEMMs (M = 64, K = 32 or 64, N = 32..201) run faster than on
// the float32 panel kernel (the decoder op with and without bfloat16 GEMMs, interleaved on the
// Zen 4 VM: 0.79x the time for 10 steps, 0.82x for one); below K or N of 32 the tiles' padding
// loses (H = 8: 1.16x).
bool use_packed(int64_t M, int64_t N, int64_t K) {
  const bool tiles_fit = K >= kPadK && N >= 2 * kPanelColumns && tile_kernel() != TileKernel::none;
  return tiles_fit ? bf16_gemm_enabled() && bf16_gemm_available() : use(M, N, K);
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (general_on_tiles()) {
    TORCH_INTERNAL_ASSERT(alpha == 1.0f, "seq2seq_fast: the bfloat16 tile GEMM takes alpha 1");
    uint16_t* b = scratch(1, packed_panels(N) * padded_k(K) * kPanelColumns);
    pack_panels(tb, N, K, [&](int64_t i) { return B + i * ldb; }, b);
    tiles_gemm(ta, M, N, K, A, lda, b, beta, C, ldc);
    return;
  }
  gemm_rounded(ta, tb, M, N, K, alpha, A, lda, nullptr, 0, B, ldb, nullptr, 0, beta, C, ldc);
}

bool rounds_operands(int64_t M, int64_t N, int64_t K) {
  return use(M, N, K) && !general_on_tiles() && cblas_gemm_bf16bf16f32 != nullptr;
}

at::Tensor round_matrix(const float* src, int64_t rows, int64_t cols, int64_t ld) {
  at::Tensor out = cpu::empty({rows, cols}, at::TensorOptions().dtype(at::kBFloat16));
  round_rows(src, rows, cols, ld, reinterpret_cast<uint16_t*>(out.data_ptr()), cols);
  return out;
}

void gemm_rounded(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const uint16_t* a16, int64_t lda16, const float* B, int64_t ldb, const uint16_t* b16,
                  int64_t ldb16, float beta, float* C, int64_t ldc) {
  // An operand not given rounded, rounded into scratch buffer `which`.
  const auto rounded = [](int which, const uint16_t* given, const float* src, int64_t rows, int64_t cols,
                          int64_t ld, int64_t* ld16) -> const uint16_t* {
    if (given != nullptr) {
      return given;
    }
    uint16_t* dst = scratch(which, rows * cols);
    round_rows(src, rows, cols, ld, dst, cols);
    *ld16 = cols;
    return dst;
  };
  // op(A) is M x K: A holds M x K rows, or K x M when transposed; likewise B.
  a16 = rounded(0, a16, A, ta ? K : M, ta ? M : K, lda, &lda16);
  b16 = rounded(1, b16, B, tb ? N : K, tb ? K : N, ldb, &ldb16);
  mkl_gemm(ta, tb, M, N, K, alpha, a16, lda16, b16, ldb16, beta, C, ldc);
}

at::Tensor pack_weight(bool trans, int64_t N, int64_t K, const std::vector<const float*>& rows) {
  const auto options = at::TensorOptions().dtype(at::kBFloat16);
  if (tile_kernel() != TileKernel::none) {
    at::Tensor packed = cpu::empty({packed_panels(N), padded_k(K) / 2, 2 * kPanelColumns}, options);
    pack_panels(trans, N, K, [&](int64_t i) { return rows[i]; }, reinterpret_cast<uint16_t*>(packed.data_ptr()));
    return packed;
  }
  // For MKL: op(W)^T (N x K), which it runs as A @ B^T, 10-20 % faster than A @ B at a step's rows.
  auto value = [&](int64_t k, int64_t n) { return trans ? rows[n][k] : rows[k][n]; };  // op(W)[k][n]
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
  if (tile_kernel() != TileKernel::none) {
    tiles_gemm(false, M, N, K, A, lda, w, beta, C, ldc);
    return;
  }
  uint16_t* a = scratch(0, M * K);
  round_rows(A, M, K, lda, a, K);
  mkl_gemm(false, true, M, N, K, 1.0f, a, K, w, K, beta, C, ldc);
}

}  // namespace bf16

namespace {

// A matrix argument of cpu_bf16_matmul: row-major, or the transpose of a row-major matrix.
struct Operand {
  const float* data;
  bool trans;
  int64_t ld;
};

Operand operand_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "seq2seq_fast: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "seq2seq_fast: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2, "seq2seq_fast: ", name, " must be 2-D, got shape ", t.sizes());
  const float* data = t.data_ptr<float>();
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) {
    return {data, false, t.stride(0)};
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0))) {
    return {data, true, t.stride(1)};
  }
  TORCH_CHECK_VALUE(false, "seq2seq_fast: ", name, " must be row-major or the transpose of a row-major matrix, got ",
                    "strides ", t.strides(), " for shape ", t.sizes());
}

at::Tensor bf16_matmul(const at::Tensor& a, const at::Tensor& b, bool packed) {
  TORCH_CHECK_VALUE(bf16_gemm_available(), "seq2seq_fast: cpu_bf16_matmul needs a bfloat16 GEMM kernel, and ",
                    "cpu_bf16_gemm() is \"none\" on this machine");
  const Operand A = operand_of(a, "a"), B = operand_of(b, "b");
  TORCH_CHECK_VALUE(a.size(1) == b.size(0), "seq2seq_fast: b must have a.size(1) = ", a.size(1), " rows, got shape ",
                    b.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = at::zeros({M, N}, a.options());
  if (M == 0 || N == 0 || K == 0) {
    return out;
  }
  if (!packed) {
    bf16::gemm(A.trans, B.trans, M, N, K, 1.0f, A.data, A.ld, B.data, B.ld, 0.0f, out.data_ptr<float>(), N);
    return out;
  }
  std::vector<const float*> rows(B.trans ? N : K);  // B = op(W): W is N x K when transposed
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i] = B.data + static_cast<int64_t>(i) * B.ld;
  }
  const at::Tensor w = bf16::pack_weight(B.trans, N, K, rows);
  const at::Tensor a_rows = a.contiguous();  // a step's A is row-major
  bf16::weight_gemm(w, M, N, K, a_rows.data_ptr<float>(), K, 0.0f, out.data_ptr<float>(), N);
  return out;
}

std::string bf16_gemm_kernel() {
  if (!bf16_gemm_available()) {
    return "none";
  }
  const bf16::TileKernel kernel = bf16::tile_kernel();
  return kernel != bf16::TileKernel::none ? bf16::kernel_name(kernel) : "mkl";
}
}  // namespace

}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_bf16_gemm", &seq2seq_fast::cpu::bf16_gemm_kernel);
}

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("cpu_bf16_matmul", &seq2seq_fast::cpu::bf16_matmul);
}
