// Dropout keep-masks on CUDA: 1 / (1 - p) with probability 1 - p, else 0, from the CPU op's
// counter-based SplitMix64 stream (csrc/random.h), keyed by torch's CUDA generator: element i of
// a mask is output offset + i of the stream keyed by the generator's seed, where offset is the
// generator's philox offset, which the call advances by the mask's size (rounded up to the
// multiple of 4 philox_cuda_state requires). So torch.manual_seed (or torch.cuda.manual_seed)
// makes masks reproducible, successive calls read disjoint parts of the stream, nothing syncs
// with the host, and under CUDA-graph capture the kernel reads seed and offset from the device
// (torch's graph-safe RNG state): each replay of a graph draws fresh masks.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "checks.h"
#include "cuda/kernels.h"

namespace seq2seq_fast::gpu {
namespace {

// The stream position of a mask of n elements on `device`'s default generator.
KeepMaskArgs draw_position(at::Device device, int64_t n) {
  KeepMaskArgs a{};
  a.n = n;
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      c10::nullopt, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  std::lock_guard<std::mutex> lock(gen->mutex_);
  const at::PhiloxCudaState state = gen->philox_cuda_state(static_cast<uint64_t>((n + 3) / 4 * 4));
  if (state.captured_) {
    a.seed_ptr = state.seed_.ptr;
    a.offset_ptr = state.offset_.ptr;
    a.offset_intragraph = static_cast<uint64_t>(state.offset_intragraph_);
  } else {
    a.seed = state.seed_.val;
    a.offset = state.offset_.val;
  }
  return a;
}

at::Tensor keep_mask(const at::Tensor& like, at::IntArrayRef size, double p) {
  check_keep_mask(like, p, kCudaFloats);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor mask = at::empty(size, like.options());
  if (p >= 1 || mask.numel() == 0) {
    return mask.zero_();
  }
  KeepMaskArgs a = draw_position(like.device(), mask.numel());
  a.out = mask.data_ptr();
  a.threshold = keep_threshold(p);
  a.keep = 1.0 / (1.0 - p);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "seq2seq_fast::keep_mask_cuda",
                                  [&] { keep_mask_fill<scalar_t>(a, stream); });
  return mask;
}

}  // namespace
}  // namespace seq2seq_fast::gpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CUDA, m) {
  m.impl("keep_mask", &seq2seq_fast::gpu::keep_mask);
}
