// Implementation of csrc/gemm_precision.h.
#include "gemm_precision.h"

#include <torch/library.h>

namespace seq2seq_fast {
namespace {
thread_local bool bf16_gemm = false;
}  // namespace

bool bf16_gemm_enabled() { return bf16_gemm; }

bool set_bf16_gemm(bool enabled) {
  const bool previous = bf16_gemm;
  bf16_gemm = enabled;
  return previous;
}

}  // namespace seq2seq_fast

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("set_bf16_gemm", &seq2seq_fast::set_bf16_gemm);
}
