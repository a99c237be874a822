// The keep-masks' random stream, one definition for the CPU op and the CUDA kernel: output i of
// the SplitMix64 stream with key `seed` is a pure function of (seed, i), so any thread or block
// can compute any element and the result does not depend on how the work is split.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SEQ2SEQ_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SEQ2SEQ_FAST_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace seq2seq_fast {

// The high 32 bits of output i of SplitMix64 (Steele, Lea, Flood 2014) seeded with `seed`.
SEQ2SEQ_FAST_HOST_DEVICE uint32_t splitmix64_high(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

}  // namespace seq2seq_fast
