// The decoder state's keys, projected once per sentence for the CPU step loops: d2l's
// W_k(enc_outputs), with enc_outputs laid out (B, T, H) as the decoder ops read them.
//
// d2l's init_state hands the encoder's outputs over as a permuted view of (T, B, H), and its
// attention projects them with nn.Linear. Through torch that is a TensorIterator copy and an MKL
// GEMM whose code and data the decoder op's step evicts between sentences: step-by-step decoding
// paid for them at the first step of each sentence. Here both run in the code the step loops
// keep warm: a row copy and the panel kernel the steps' own GEMMs use.
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/loop.h"
#include "gemm_precision.h"

namespace seq2seq_fast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> project_keys(const at::Tensor& enc_in, const at::Tensor& W_k_in) {
  const Placement on = check_reference(enc_in, "enc_outputs", at::kCPU, kCpuFloats);
  const Sizes s = check_enc_outputs(enc_in, on);
  check_float(W_k_in, "W_k", on);
  TORCH_CHECK_VALUE(W_k_in.dim() == 2 && W_k_in.size(0) == W_k_in.size(1), "seq2seq_fast: W_k must have shape (H, H), got ",
                    W_k_in.sizes());
  TORCH_CHECK_VALUE(s.H == W_k_in.size(1), "seq2seq_fast: enc_outputs must have shape (B, T, H) with W_k's H = ",
                    W_k_in.size(1), ", got ", enc_in.sizes());
  const int64_t B = s.B, T_ = s.T, H = s.H;
  at::Tensor values = cpu::empty({B, T_, H}, enc_in.options());
  at::Tensor key_proj = cpu::empty({B, T_, H}, enc_in.options());
  const at::Tensor W_k = W_k_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::project_keys", [&] {
    using T = scalar_t;
    const T* src = enc_in.data_ptr<T>();
    T* out = values.data_ptr<T>();
    const int64_t sb = enc_in.stride(0), st = enc_in.stride(1), sh = enc_in.stride(2);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < T_; ++t, out += H) {
        const T* row = src + b * sb + t * st;
        if (sh == 1) {
          std::copy(row, row + H, out);
        } else {
          for (int64_t h = 0; h < H; ++h) {
            out[h] = row[h * sh];
          }
        }
      }
    }
    if (bf16_gemm_enabled()) {
      // In bfloat16 compute (autocast) a GEMM of B * T rows, not a step's few: the BLAS shim
      // picks float32 or MKL's bfloat16 GEMM by its size. The tile kernel's blocks are made for
      // a step's rows, and at zh's sizes its padding loses to float32.
      blas_gemm(false, true, B * T_, H, H, T(1), values.data_ptr<T>(), H, ptr<T>(W_k), H, T(0),
                key_proj.data_ptr<T>(), H);
    } else {
      PackedWeight<T>(true, B * T_, H, H, ptr<T>(W_k), H).gemm(values.data_ptr<T>(), H, T(0),
                                                              key_proj.data_ptr<T>(), H);
    }
  });
  return {values, key_proj};
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("project_keys", &seq2seq_fast::cpu::project_keys);
}
