// The CUDA ops' one question about the current stream, asked before their only host sync.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

namespace seq2seq_fast::gpu {

// True while the current stream is being captured into a CUDA graph: no host syncs then.
inline bool stream_is_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace seq2seq_fast::gpu
