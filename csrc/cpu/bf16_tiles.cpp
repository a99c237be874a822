// Implementation of csrc/cpu/bf16_tiles.h.
#include "cpu/bf16_tiles.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define SEQ2SEQ_FAST_HAS_BF16_TILES 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SEQ2SEQ_FAST_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#define SEQ2SEQ_FAST_AVX512BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace seq2seq_fast::cpu::bf16 {
namespace {

bool allowed(const char* variable) {
  const char* flag = std::getenv(variable);
  return !(flag != nullptr && std::string(flag) == "0");
}

#ifdef SEQ2SEQ_FAST_HAS_BF16_TILES
// ---- AMX: blocks of 32 x 32, two 16-row tiles of A by two 16-column panels of B, four float32
// accumulator tiles --------------------------------------------------------------------------
constexpr int64_t kTile = 16, kAmxBlock = 32;

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
  const int64_t rows_a = round_up(M, kAmxBlock), panels_b = round_up(N, kAmxBlock) / kTile;
  // Panels outer: each pair of weight panels is read from memory once and stays in cache for
  // every row block (a step loop's weights do not fit in L2; its A, a step's rows, does).
  for (int64_t p = 0; p < panels_b; p += 2) {
    for (int64_t m = 0; m < rows_a; m += kAmxBlock) {
      const bool inside = m + kAmxBlock <= M && (p + 2) * kTile <= N;
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
      for (int64_t k = 0; k < K32; k += kAmxBlock) {
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

// ---- AVX512-BF16: R rows x P panels of float32 accumulators (at most 6 x 4: 24 registers, 4
// more for B's panels, A's pairs broadcast from memory) over the whole of K --------------------
constexpr int kAvxRows = 6, kAvxPanels = 4;

template <int R, int P>
SEQ2SEQ_FAST_AVX512BF16_TARGET void avx512_block(int64_t pairs, const uint16_t* A, int64_t lda, const uint16_t* B,
                                                 int64_t panel_values, bool accumulate, float* C, int64_t ldc,
                                                 const __mmask16* columns) {
  __m512 acc[R][P];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      acc[r][p] = accumulate ? _mm512_maskz_loadu_ps(columns[p], C + r * ldc + p * kTile) : _mm512_setzero_ps();
    }
  }
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh b[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      b[p] = (__m512bh)_mm512_loadu_si512(B + p * panel_values + j * 2 * kTile);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;  // A[r][2j], A[r][2j + 1]
      std::memcpy(&pair, A + r * lda + 2 * j, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a, b[p]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      _mm512_mask_storeu_ps(C + r * ldc + p * kTile, columns[p], acc[r][p]);
    }
  }
}

using AvxBlock = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, bool, float*, int64_t,
                          const __mmask16*);

template <int R>
AvxBlock avx512_block_of(int P) {
  switch (P) {
    case 4: return &avx512_block<R, 4>;
    case 3: return &avx512_block<R, 3>;
    case 2: return &avx512_block<R, 2>;
    default: return &avx512_block<R, 1>;
  }
}

AvxBlock avx512_block_of(int R, int P) {
  switch (R) {
    case 6: return avx512_block_of<6>(P);
    case 5: return avx512_block_of<5>(P);
    case 4: return avx512_block_of<4>(P);
    case 3: return avx512_block_of<3>(P);
    case 2: return avx512_block_of<2>(P);
    default: return avx512_block_of<1>(P);
  }
}

// Column blocks outer, as in amx_gemm: a block's panels (K32 x 128 bytes) stay in L2 for every
// row block.
void avx512_gemm(int64_t M, int64_t N, int64_t K32, const uint16_t* A, const uint16_t* panels, bool accumulate,
                 float* C, int64_t ldc) {
  const int64_t panel_values = K32 * kTile, used_panels = (N + kTile - 1) / kTile;
  for (int64_t p = 0; p < used_panels; p += kAvxPanels) {
    const int P = static_cast<int>(std::min<int64_t>(kAvxPanels, used_panels - p));
    __mmask16 columns[kAvxPanels];
    for (int q = 0; q < P; ++q) {
      const int64_t valid = std::min<int64_t>(kTile, N - (p + q) * kTile);
      columns[q] = static_cast<__mmask16>((1u << valid) - 1u);
    }
    for (int64_t m = 0; m < M; m += kAvxRows) {
      const int R = static_cast<int>(std::min<int64_t>(kAvxRows, M - m));
      avx512_block_of(R, P)(K32 / 2, A + m * K32, K32, panels + p * panel_values, panel_values, accumulate,
                            C + m * ldc + p * kTile, ldc, columns);
    }
  }
}
#endif

bool amx_usable() {
#ifdef SEQ2SEQ_FAST_HAS_BF16_TILES
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
         syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

bool avx512bf16_usable() {
#ifdef SEQ2SEQ_FAST_HAS_BF16_TILES
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace

TileKernel tile_kernel() {
  static const TileKernel kernel = [] {
    if (allowed("SEQ2SEQ_FAST_AMX") && amx_usable()) {
      return TileKernel::amx;
    }
    if (allowed("SEQ2SEQ_FAST_AVX512BF16") && avx512bf16_usable()) {
      return TileKernel::avx512;
    }
    return TileKernel::none;
  }();
  return kernel;
}

const char* kernel_name(TileKernel kernel) {
  switch (kernel) {
    case TileKernel::amx: return "amx";
    case TileKernel::avx512: return "avx512bf16";
    default: return "none";
  }
}

int64_t column_block(TileKernel kernel) {
  return kernel == TileKernel::avx512 ? 4 * kPanelColumns : 2 * kPanelColumns;
}

void tile_gemm(TileKernel kernel, int64_t M, int64_t N, int64_t K32, const uint16_t* A, const uint16_t* panels,
               bool accumulate, float* C, int64_t ldc) {
#ifdef SEQ2SEQ_FAST_HAS_BF16_TILES
  if (kernel == TileKernel::amx) {
    amx_gemm(M, N, K32, A, panels, accumulate, C, ldc);
    return;
  }
  if (kernel == TileKernel::avx512) {
    avx512_gemm(M, N, K32, A, panels, accumulate, C, ldc);
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "seq2seq_fast: no bfloat16 tile kernel on this CPU");
}

}  // namespace seq2seq_fast::cpu::bf16
