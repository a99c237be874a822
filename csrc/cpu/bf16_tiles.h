// The bfloat16 tile kernels of csrc/cpu/gemm_bf16.h: C[M, N] (+)= A[M, K] @ B[K, N] on
// bfloat16 operands with float32 accumulation, one thread, on one packed layout of B that both
// kernels read:
// - AMX (Intel Sapphire Rapids and later): TDPBF16PS on 16 x 32 tiles;
// - AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later): VDPBF16PS, 6 rows x 64 columns of
//   float32 accumulators in registers. On the 2-core Zen 4 VM it runs a large-setting step's
//   64 x 1536 x 512 at 231 GFLOP/s on one thread, where MKL's sgemm and its bfloat16 GEMM run
//   about 92 (a standalone timing; MKL has no AVX512-BF16 path there).
//
// Packed B: panels of 16 columns (N padded to an even number of panels with zero columns); a
// panel holds K32 / 2 rows of (16 columns x 2 consecutive k) - the pairs both instructions
// multiply -, K padded to K32, a multiple of 32, with zeros. A: M rows of K32 values (zeros
// past K), the rows padded to a multiple of 32 with zero rows (AMX reads whole tiles).
#pragma once

#include <cstdint>

namespace seq2seq_fast::cpu::bf16 {

enum class TileKernel { none, avx512, amx };

// The kernel this process runs, chosen once: AMX where the CPU has AMX-BF16 and Linux grants
// the tile registers, else AVX512-BF16 where the CPU has it, else none.
// SEQ2SEQ_FAST_AMX=0 and SEQ2SEQ_FAST_AVX512BF16=0 rule either out (to compare them).
TileKernel tile_kernel();
const char* kernel_name(TileKernel kernel);

constexpr int64_t kPanelColumns = 16, kPadK = 32, kPadRows = 32;

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
inline int64_t padded_k(int64_t K) { return round_up(K, kPadK); }
inline int64_t packed_panels(int64_t N) { return round_up(N, 2 * kPanelColumns) / kPanelColumns; }
inline int64_t padded_rows(int64_t M) { return round_up(M, kPadRows); }
// Where op(B)[k][n] goes in the packed panels.
inline int64_t packed_index(int64_t K32, int64_t k, int64_t n) {
  return ((n / kPanelColumns) * (K32 / 2) + k / 2) * 2 * kPanelColumns + (n % kPanelColumns) * 2 + k % 2;
}

// The columns one call of tile_gemm should take at least (its register or tile block), so that
// callers splitting columns over threads split on its blocks.
int64_t column_block(TileKernel kernel);

// C[M, N] = A @ B (+ C when accumulate), C row-major with row stride ldc. `panels` points at
// the panel of B's first column wanted (a multiple of column_block away from panel 0);
// A's rows M..padded_rows(M) are read as zeros by AMX.
void tile_gemm(TileKernel kernel, int64_t M, int64_t N, int64_t K32, const uint16_t* A, const uint16_t* panels,
               bool accumulate, float* C, int64_t ldc);

}  // namespace seq2seq_fast::cpu::bf16
