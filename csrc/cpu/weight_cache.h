// Tensors derived from weights (a GEMM's packed panels, an embedding-gate table), kept across
// calls while the weights they come from hold the same bytes.
//
// Decoding calls the decoder op once per step on unchanged weights: re-deriving its packed
// weights at every call cost about a tenth of a one-step call. An entry is found by the weights'
// addresses and shapes and then verified against a copy of their bytes (a contiguous compare,
// cheaper than the strided repack it saves), so a weight changed in any way - an optimizer
// step, a write through .data, freed memory reused for another tensor - is re-derived, never
// served stale. At most 64 entries (least recently used first out); the op release_cpu_cache
// drops them with the cached blocks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

#include <c10/util/ArrayRef.h>

namespace seq2seq_fast::cpu {

// `rows` rows of `row_bytes` bytes, `ld_bytes` apart: one operand a derived tensor reads.
struct WeightRows {
  const void* data;
  int64_t rows, row_bytes, ld_bytes;
};

// The tensor `derive()` makes from `sources`, or the one it made before from the same bytes.
// `kind` tells apart derivations of the same sources (e.g. the two layouts of one weight).
at::Tensor derived_from_weights(int64_t kind, c10::ArrayRef<WeightRows> sources,
                                const std::function<at::Tensor()>& derive);

// Bytes the entries hold: the weights' copies and the derived tensors.
int64_t derived_weight_bytes();
// Drops every entry (the derived tensors' memory goes back where it came from, e.g. the block cache).
void release_derived_weights();

}  // namespace seq2seq_fast::cpu
