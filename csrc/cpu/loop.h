// What every CPU step loop shares (decoder forward, backward and greedy decoding, the encoder):
// the split of a batch into row chunks, layer 0's embedding gates through a vocabulary table,
// and named scratch arrays carved out of one allocation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/chunks.h"
#include "cpu/gemm.h"
#include "cpu/rows.h"
#include "cpu/weight_cache.h"
#include "cpu/workspace.h"

namespace seq2seq_fast::cpu {

// Weights up to this many values (1 MiB of float) count as small: they stay in a core's L2
// cache across steps, so a per-step GEMM on them belongs inside a row chunk.
constexpr int64_t kSmallWeightValues = int64_t(1) << 18;

// Whether a call keeps its BLAS and ATen work on the calling thread (CallerOnly, chunks.h):
// when the weights its steps read are small, which for_row_chunks splits by rows instead.
inline bool small_step_weights(int64_t values) { return values <= kSmallWeightValues; }

// A GRU's first-layer input gates from an embedding, W e(x) with W the (3H, E) block of W_ih
// that reads the embedding (the bias is added in the gate kernel), for many tokens: through a
// (V, 3H) table of every row's product (one GEMM of V rows) when the vocabulary has fewer rows
// than there are tokens, or when the table is small - it is kept across calls while the weights
// are unchanged (csrc/cpu/weight_cache.h), so decoding one step per call looks tokens up too;
// else the caller runs the GEMM over the gathered embeddings. (d2l's zh setting: V = 201 rows
// against 640 tokens a call.)
template <typename T>
class EmbeddingGates {
 public:
  // w: W's first element, ld_w its row stride; tokens: how many tokens the call projects.
  EmbeddingGates(const at::Tensor& embedding, const T* w, int64_t ld_w, int64_t H, int64_t tokens) : H_(H) {
    const int64_t V = embedding.size(0), E = embedding.size(1);
    if (V >= tokens && V * 3 * H > kSmallWeightValues) {
      return;
    }
    const T* emb = embedding.data_ptr<T>();
    const auto bytes = static_cast<int64_t>(sizeof(T));
    const WeightRows sources[] = {{emb, V, E * bytes, E * bytes}, {w, 3 * H, E * bytes, ld_w * bytes}};
    table_ = derived_from_weights(kKind, sources, [&] {
      at::Tensor table = cpu::empty({V, 3 * H}, embedding.options());
      gemm<T>(false, true, V, 3 * H, E, T(1), emb, E, w, ld_w, T(0), table.data_ptr<T>(), 3 * H);
      return table;
    });
  }
  bool tabled() const { return table_.defined(); }
  // gi[i] = table[ids[i * id_stride]], rows of 3H with leading dimension 3H.
  void lookup(const int64_t* ids, int64_t count, int64_t id_stride, T* gi) const {
    gather_rows<T>(table_.data_ptr<T>(), 3 * H_, ids, count, id_stride, gi, 3 * H_);
  }

 private:
  static constexpr int64_t kKind = 16 + sizeof(T);  // weight_cache kinds: one per dtype
  int64_t H_;
  at::Tensor table_;
};

// The backward of EmbeddingGates' product: with d(gi) the gradients of layer 0's input gates,
// the embedding's gradient d(gi) W and the weight block's d(gi)^T e(x). When the vocabulary has
// fewer rows than there are tokens, d(gi) is first summed per token into a (V, 3H) table, so
// both GEMMs run over V rows instead of one per token (d2l's zh setting: 184 and 201 rows against
// 640 tokens, so the encoder's two and the decoder's two 3.5 and 3.2 times smaller).
template <typename T>
class TokenGateGrads {
 public:
  static bool worth(int64_t V, int64_t tokens) { return V < tokens; }

  TokenGateGrads(int64_t V, int64_t H, const at::TensorOptions& opts)
      : H_(H), table_(cpu::zeros({V, 3 * H}, opts)) {}
  // Adds count rows of d(gi) (3H values, `ld` apart) to the rows of their tokens ids[i * id_stride].
  void add(const int64_t* ids, int64_t count, int64_t id_stride, const T* ggi, int64_t ld) {
    scatter_add_rows<T>(table_.data_ptr<T>(), 3 * H_, ids, count, id_stride, ggi, ld);
  }
  // d_emb (V, E) = table @ W, W the (3H, E) weight block, rows ld_w apart.
  void embedding_grad(const T* w, int64_t ld_w, int64_t E, T* d_emb) const {
    gemm<T>(false, false, table_.size(0), E, 3 * H_, T(1), table_.data_ptr<T>(), 3 * H_, w, ld_w, T(0), d_emb, E);
  }
  // d_w (3H, E), rows ld_dw apart, = table^T @ embedding (V, E).
  void weight_grad(const T* embedding, int64_t E, T* d_w, int64_t ld_dw) const {
    gemm<T>(true, false, 3 * H_, E, table_.size(0), T(1), table_.data_ptr<T>(), 3 * H_, embedding, E, T(0), d_w,
            ld_dw);
  }

 private:
  int64_t H_;
  at::Tensor table_;
};

// Runs f(b0, b1) over contiguous chunks of the rows [0, B), each a whole step loop whose BLAS
// calls run single-threaded, on this package's threads (csrc/cpu/chunks.h), when the row split
// is on (set_cpu_row_split); otherwise f(0, B) on the calling thread. Rows of a recurrence never
// meet, so this split needs no synchronization per step, where threading each step's small
// GEMMs forks and joins at every call. It splits only when each chunk gets at least
// `kChunkFlops` of work and 8 rows, and when the weights a step reads (`step_weight_values`) are
// small: each chunk streams them at every step, where a threaded GEMM splits them between the
// threads (the large benchmark's forward, 13 MB of step weights and a 16 MB dense layer: 323 ms
// split by rows, 211 ms unsplit).
//
// Why off by default: a chunk is a whole recurrence, so nobody can take over the rest of a
// worker's chunk, and a worker that shares its core with another process holds the call up for
// its time slices. On the 2-core VM with one competing process, the zh training step on 2
// threads took 34.6 ms split against 3.3 ms on 1 thread (8.2 ms unsplit); quiet, the split made
// the zh 10-step decoder op 1.2-1.4x as fast (490 -> 355-407 us), the training step no faster
// (benchmarks/contention.py, benchmarks/call_overhead.py; benchmarks/RESULTS.md).
template <typename F>
void for_row_chunks(int64_t B, double flops_per_row, int64_t step_weight_values, const F& f) {
  // A chunk must pay for waking a pool thread, which sleeps between calls separated by the
  // caller's Python: one decoding step of d2l's zh setting (2.6 MFLOP for 64 rows) decodes
  // faster unsplit (3.2-3.4x the reference step by step against 2.6-3.3x split 32 + 32, five
  // rounds of benchmarks/call_overhead.py on 2 threads).
  constexpr double kChunkFlops = 4e6;
  // One chunk per thread, claimed as threads come free: a thread that starts late (a busy core)
  // finds its chunk taken by one that finished. Two per thread, 16 rows each on d2l's zh step,
  // made a quiet 2-core VM's 2-thread step 1.8-2.0x its 1-thread step (the chunk's GEMMs
  // slower, each worker wake-up paid twice).
  constexpr int64_t kChunksPerThread = 1;
  if (!row_split_enabled() || step_weight_values > kSmallWeightValues) {
    f(int64_t(0), B);
    return;
  }
  // The pool's count (inside a CallerOnly scope torch's own is 1).
  const int64_t threads = std::max<int64_t>(1, chunk_threads());
  const auto by_work = static_cast<int64_t>(std::ceil(kChunkFlops / std::max(flops_per_row, 1.0)));
  const int64_t even = (B + kChunksPerThread * threads - 1) / (kChunksPerThread * threads);
  // As many chunks as the smallest chunk allows, of equal size: B = 64 rows at 49 rows each
  // would split 49 + 15, the whole call waiting for the larger; 32 + 32 finishes sooner.
  const int64_t smallest = std::max<int64_t>({8, by_work, even});
  const int64_t chunks = (B + smallest - 1) / smallest;
  parallel_ranges(B, (B + chunks - 1) / chunks, f);
}

// One allocation for a loop's scratch arrays, handed out in pieces that the loop names, e.g.
//   Slab<T> slab(n * 7 * H, opts);  T* qg = slab.take(n * 4 * H);  T* gi = slab.take(n * 3 * H);
// (one block from the cache per call instead of one per array; take() checks the total).
template <typename T>
class Slab {
 public:
  Slab(int64_t values, const at::TensorOptions& options) : block_(cpu::empty({values}, options)), size_(values) {}
  T* take(int64_t values) {
    TORCH_INTERNAL_ASSERT(used_ + values <= size_, "seq2seq_fast: scratch slab overrun");
    T* p = block_.data_ptr<T>() + used_;
    used_ += values;
    return p;
  }

 private:
  at::Tensor block_;
  int64_t size_, used_ = 0;
};

// W_hh (3H, H, gate rows r, z, n) as row blocks in d(gh)'s (n, r, z) order (rows.h GatesBwd):
// the weight operand of a step's d(h_prev) = d(gh) @ W_hh, stacked without a copy.
template <typename T>
struct HiddenRowsNrz {
  RowBlock<T> n, rz;
};

template <typename T>
HiddenRowsNrz<T> hidden_rows_nrz(const T* w_hh, int64_t H) {
  return {{w_hh + 2 * H * H, H, H}, {w_hh, 2 * H, H}};
}

// The gradients of W_hh (3H, H) and b_hh (3H) over `rows` rows of gate gradients g whose first 3H
// columns are d(gh) in (n, r, z) order (rows.h GatesBwd), h_prev (rows, H), written or, with
// accumulate, added: two GEMMs, so that they come out in the weights' (r, z, n) row order.
template <typename T>
void hidden_weight_grads(int64_t rows, int64_t H, const Operand<T>& g, const Operand<T>& h_prev, bool accumulate,
                         T* d_w_hh, T* d_b_hh) {
  const T beta = accumulate ? T(1) : T(0);
  gemm<T>(true, false, 2 * H, H, rows, T(1), g.at(0, H), h_prev, beta, d_w_hh, H);
  gemm<T>(true, false, H, H, rows, T(1), g, h_prev, beta, d_w_hh + 2 * H * H, H);
  column_sums<T>(g.data + H, rows, 2 * H, g.ld, d_b_hh, accumulate);
  column_sums<T>(g.data, rows, H, g.ld, d_b_hh + 2 * H, accumulate);
}

// A layer's gate gradients (`rows` x `cols`, row stride ld) and previous states (rows x H) as
// operands of its weight gradients' GEMMs (the smallest: H x H x rows), each rounded once.
template <typename T>
SharedOperand<T> gate_grads_operand(const T* g, int64_t rows, int64_t cols, int64_t ld, int64_t H) {
  return SharedOperand<T>(g, rows, cols, ld, H, H, rows);
}
template <typename T>
SharedOperand<T> states_operand(const T* h_prev, int64_t rows, int64_t H) {
  return SharedOperand<T>(h_prev, rows, H, H, H, H, rows);
}

// Steps per block of a backward through time whose buffers take `step_bytes` a step: as many as
// keep them within a budget, at least one (all of them for d2l's small settings). The budget
// bounds a training step's peak memory: 8 MB, but 64 MB where the blocks' weight-gradient GEMMs
// (H x H and larger, over `rows_per_step` rows a step) run on rounded bfloat16 operands, which gain
// from fewer, longer GEMMs: d2l's large training step under CPU autocast took about 0.98x the time with
// its 30 steps in one block (39 MB) instead of five (benchmarks/RESULTS.md, fifteenth session).
template <typename T>
int64_t steps_per_block(int64_t steps, int64_t step_bytes, int64_t rows_per_step, int64_t H) {
  const bool rounded = SharedOperand<T>::rounds(H, H, rows_per_step * steps);
  const int64_t budget = int64_t(rounded ? 64 : 8) << 20;
  return std::clamp<int64_t>(budget / std::max<int64_t>(step_bytes, 1), 1, std::max<int64_t>(steps, 1));
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

}  // namespace seq2seq_fast::cpu
