// Element math of the CPU row kernels: exp, sigmoid and tanh that vectorize in float (polynomial
// and rational approximations), the C library's in double (gradcheck precision); and the
// function attributes that compile the float kernels once per ISA.
//
// The row kernels are written as plain loops under `#pragma omp simd` so that the compiler
// vectorizes them; the float versions are compiled for AVX-512, AVX2 and baseline x86-64 with
// `target_clones` and picked at load time (the extension is built without -march flags, which
// leaves at::vec::Vectorized<float> scalar and its exp/tanh without Sleef in an extension).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEQ2SEQ_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SEQ2SEQ_FAST_CLONES
#endif
#define SEQ2SEQ_FAST_INLINE inline __attribute__((always_inline))

namespace seq2seq_fast::cpu {

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
  float scale;  // 2^fx from its exponent bits (memcpy: C++20's bit cast is not in C++17, which torch 2.11 builds)
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

// bfloat16 as its 16 bits: float32 -> bfloat16 rounded to nearest even as c10::BFloat16 rounds
// (NaN stays NaN), and back (exact). Written on the bits so that row loops over them vectorize.
SEQ2SEQ_FAST_INLINE uint16_t round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return 0x7fc0;
  }
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
SEQ2SEQ_FAST_INLINE float widen_bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

}  // namespace seq2seq_fast::cpu
