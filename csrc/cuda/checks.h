// Argument checks of the CUDA ops: the CPU ops' checks with the device of enc_outputs (or of
// the embedding) in place of the CPU. Every message names the argument; TORCH_CHECK_VALUE /
// TYPE / INDEX raise ValueError / TypeError / IndexError in Python.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

namespace seq2seq_fast::gpu {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_cuda_float(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device,
                             const char* reference = "enc_outputs") {
  TORCH_CHECK_VALUE(t.device() == device, "seq2seq_fast: ", name, " must be on ", reference, "'s device ",
                    device, ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "seq2seq_fast: ", name, " must have dtype ", dtype, " (the dtype of ",
                   reference, "), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "seq2seq_fast: ", name, " must have shape ", expected, ", got ",
                    t.sizes());
}

// True while the current stream is being captured into a CUDA graph: no host syncs then.
inline bool stream_is_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// Token ids: int64 (B, steps) on `device`, each in [0, vocab). The range check costs one host
// sync (one copy of min and max); it is skipped while a CUDA graph is captured (the kernels
// then rely on the ids having been validated by the caller, as torch.nn.Embedding does).
inline void check_tokens(const at::Tensor& X, const char* name, int64_t vocab, const at::Device& device) {
  TORCH_CHECK_VALUE(X.device() == device, "seq2seq_fast: ", name, " must be on device ", device, ", got ",
                    X.device());
  TORCH_CHECK_TYPE(X.scalar_type() == at::kLong, "seq2seq_fast: ", name, " must hold int64 token ids, got dtype ",
                   X.scalar_type());
  TORCH_CHECK_VALUE(X.dim() == 2, "seq2seq_fast: ", name, " must have shape (B, steps), got ", X.sizes());
  if (X.numel() == 0 || stream_is_capturing()) {
    return;
  }
  const auto [low, high] = at::aminmax(X);
  const at::Tensor both = at::stack({low, high}).to(at::kCPU);
  const int64_t lo = both.data_ptr<int64_t>()[0], hi = both.data_ptr<int64_t>()[1];
  const int64_t bad = lo < 0 ? lo : hi;
  TORCH_CHECK_INDEX(lo >= 0 && hi < vocab, "seq2seq_fast: ", name, " holds token id ", bad,
                    ", outside the vocabulary [0, ", vocab, ")");
}

inline void check_valid_lens(const c10::optional<at::Tensor>& lens, int64_t B, const at::Device& device) {
  if (!lens.has_value()) {
    return;
  }
  const at::Tensor& v = *lens;
  TORCH_CHECK_VALUE(v.device() == device, "seq2seq_fast: valid_lens must be on enc_outputs's device ", device,
                    ", got ", v.device());
  TORCH_CHECK_TYPE(v.scalar_type() == at::kLong, "seq2seq_fast: valid_lens must be int64, got dtype ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == B, "seq2seq_fast: valid_lens must have shape (", B, ",), got ",
                    v.sizes());
}

inline c10::optional<at::Tensor> contiguous_opt(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) {
    return t;
  }
  return t->contiguous();
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) {
    out.push_back(t.contiguous());
  }
  return out;
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace seq2seq_fast::gpu
