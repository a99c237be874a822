// Memory of the CPU ops: outputs and scratch buffers come from a cache of freed blocks.
//
// A step loop's buffers are large (the logits of a batch are 0.5 MB in d2l's setting, 61 MB on a
// large vocabulary) and short-lived. From glibc malloc each call maps fresh pages and the kernel
// zero-fills them on first touch: on this package's benchmarks that page-fault work costs a
// quarter of a decoder call. Blocks freed by a tensor go back to a size-classed cache and are
// reused, already resident, by the next call (the idea of CUDA's caching allocator, for host
// memory). The cache holds at most SEQ2SEQ_FAST_CPU_CACHE_MB megabytes (default 512; 0 turns it
// off); `release_cached_blocks` hands every cached block back to the system.
#pragma once

#include <ATen/ATen.h>

namespace seq2seq_fast::cpu {

// Uninitialized / zero-filled contiguous CPU tensors whose storage comes from the cache
// (resizable like any tensor's; small ones come straight from torch's CPU allocator).
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block; returns the bytes released.
int64_t release_cached_blocks();
// Bytes held in the cache (free blocks, not those in use).
int64_t cached_bytes();

}  // namespace seq2seq_fast::cpu
