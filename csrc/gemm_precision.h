// The precision a call's float32 GEMMs may run in: exact float32, or (under autocast, and for
// bfloat16 models run in float32) operands rounded to bfloat16 with float32 accumulation and
// output -- what torch.set_float32_matmul_precision("medium") lets torch's own matmuls do. A
// per-thread setting, as torch's autocast state is: Python sets it around a call (op
// set_bf16_gemm), the ops' worker threads take their caller's, and the autograd Functions save
// it with the forward so the backward's GEMMs run as the forward's did. Only the CPU ops read
// it; CUDA ops take half-precision tensors instead.
#pragma once

namespace seq2seq_fast {

bool bf16_gemm_enabled();
// Sets the calling thread's setting; returns the previous one (the op set_bf16_gemm).
bool set_bf16_gemm(bool enabled);

// The setting `enabled` for a scope, the previous one after.
class Bf16GemmScope {
 public:
  explicit Bf16GemmScope(bool enabled) : previous_(set_bf16_gemm(enabled)) {}
  ~Bf16GemmScope() { set_bf16_gemm(previous_); }
  Bf16GemmScope(const Bf16GemmScope&) = delete;
  Bf16GemmScope& operator=(const Bf16GemmScope&) = delete;

 private:
  bool previous_;
};

}  // namespace seq2seq_fast
