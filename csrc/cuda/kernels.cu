// The fused kernels of the CUDA step loops (see kernels.h). Element math runs in
// at::opmath_type<T> (float for float/half/bfloat16, double for double); loads and stores
// convert. Only light c10/ATen headers here: the host logic lives in decoder.cpp/encoder.cpp.
//
// The build uses --use_fast_math, so tanh is written as expm1f(-2|x|) based (no cancellation
// near 0, no overflow for large |x|) rather than left to an approximate intrinsic, and the
// exponentials of the softmax and the sigmoid take non-positive or benign arguments.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/kernels.h"
#include "random.h"

namespace seq2seq_fast::gpu {
namespace {

template <typename T>
using Acc = at::opmath_type<T>;

constexpr int kWarp = 32;
constexpr int kElementwiseThreads = 256;

// ---- element math ---------------------------------------------------------------------------

__device__ __forceinline__ float tanh_acc(float x) {
  const float t = expm1f(-2.0f * fabsf(x));  // in (-1, 0]
  return copysignf(-t / (t + 2.0f), x);
}
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

__device__ __forceinline__ float sigmoid_acc(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid_acc(double x) { return 1.0 / (1.0 + exp(-x)); }

template <typename A, typename T>
__device__ __forceinline__ A ld(const T* p, int64_t i) {
  return static_cast<A>(p[i]);
}

// ---- reductions -----------------------------------------------------------------------------

struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a > b ? a : b;
  }
};

template <typename A, typename Op>
__device__ __forceinline__ A warp_reduce(A v, Op op) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Reduces v over the block and returns the result to every thread. smem holds kWarp + 1 values.
// Every thread of the block must call it (it synchronizes the block).
template <typename A, typename Op>
__device__ A block_reduce(A v, Op op, A identity, A* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_reduce(v, op);
  __syncthreads();  // a previous call may still be reading smem
  if (lane == 0) {
    smem[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    A r = lane < nwarps ? smem[lane] : identity;
    r = warp_reduce(r, op);
    if (lane == 0) {
      smem[kWarp] = r;
    }
  }
  __syncthreads();
  return smem[kWarp];
}

__device__ __forceinline__ int64_t visible_keys(const int64_t* valid_lens, int64_t b, int64_t T) {
  if (valid_lens == nullptr) {
    return T;
  }
  const int64_t v = valid_lens[b];
  return v < 0 ? 0 : (v > T ? T : v);
}

// v clamped into [0, high].
__device__ __forceinline__ int64_t clamp_index(int64_t v, int64_t high) { return v < 0 ? 0 : (v > high ? high : v); }

// Threads per block of the row kernels: a multiple of the warp size, at most 256.
int row_threads(int64_t width) {
  if (width <= 64) {
    return 64;
  }
  if (width <= 128) {
    return 128;
  }
  return 256;
}

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<int>(std::min<int64_t>(blocks, 65535));
}

// ---- GRU gates --------------------------------------------------------------------------------

template <typename T>
__global__ void gates_fwd_kernel(T* h_out, T* __restrict__ save, T* __restrict__ drop_out,
                                 const T* __restrict__ gi, int64_t ld_gi, const T* __restrict__ gh,
                                 int64_t ld_gh, const T* __restrict__ b_ih, const T* __restrict__ b_hh,
                                 const T* h_prev,  // may alias h_out: neither is __restrict__
                                 const T* __restrict__ drop_mask, int64_t B, int64_t H) {
  using A = Acc<T>;
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, i = idx % H;
    const T* gib = gi + b * ld_gi;
    const T* ghb = gh + b * ld_gh;
    const A r = sigmoid_acc(ld<A>(gib, i) + ld<A>(b_ih, i) + ld<A>(ghb, i) + ld<A>(b_hh, i));
    const A z = sigmoid_acc(ld<A>(gib, H + i) + ld<A>(b_ih, H + i) + ld<A>(ghb, H + i) + ld<A>(b_hh, H + i));
    const A ghn = ld<A>(ghb, 2 * H + i) + ld<A>(b_hh, 2 * H + i);
    const A nn = tanh_acc(ld<A>(gib, 2 * H + i) + ld<A>(b_ih, 2 * H + i) + r * ghn);
    const A hp = ld<A>(h_prev, idx);
    T* sv = save + b * 4 * H;
    sv[i] = static_cast<T>(r);
    sv[H + i] = static_cast<T>(z);
    sv[2 * H + i] = static_cast<T>(nn);
    sv[3 * H + i] = static_cast<T>(ghn);
    const T h = static_cast<T>(nn + z * (hp - nn));
    h_out[idx] = h;  // may alias h_prev: this thread alone read and writes idx
    if (drop_out != nullptr) {
      drop_out[idx] = static_cast<T>(static_cast<A>(h) * ld<A>(drop_mask, idx));
    }
  }
}

template <typename T>
__global__ void gates_bwd_kernel(T* __restrict__ dh, T* __restrict__ g_gi, int64_t ld_gi, T* __restrict__ g_gh,
                                 int64_t ld_gh, const T* __restrict__ save, const T* __restrict__ h_prev,
                                 const T* __restrict__ ext, const T* __restrict__ above,
                                 const T* __restrict__ above_mask, int64_t B, int64_t H) {
  using A = Acc<T>;
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, i = idx % H;
    A d = ld<A>(dh, idx);
    if (ext != nullptr) {
      d += ld<A>(ext, idx);
    }
    if (above != nullptr) {
      d += above_mask != nullptr ? ld<A>(above, idx) * ld<A>(above_mask, idx) : ld<A>(above, idx);
    }
    const T* sv = save + b * 4 * H;
    const A r = ld<A>(sv, i), z = ld<A>(sv, H + i), nn = ld<A>(sv, 2 * H + i), ghn = ld<A>(sv, 3 * H + i);
    const A dn = d * (A(1) - z) * (A(1) - nn * nn);
    const A dz = d * (ld<A>(h_prev, idx) - nn) * z * (A(1) - z);
    const A dr = dn * ghn * r * (A(1) - r);
    T* gib = g_gi + b * ld_gi;
    T* ghb = g_gh + b * ld_gh;
    gib[i] = static_cast<T>(dr);
    gib[H + i] = static_cast<T>(dz);
    gib[2 * H + i] = static_cast<T>(dn);
    ghb[i] = static_cast<T>(dr);
    ghb[H + i] = static_cast<T>(dz);
    ghb[2 * H + i] = static_cast<T>(dn * r);
    dh[idx] = static_cast<T>(d * z);
  }
}

// ---- attention ----------------------------------------------------------------------------------

template <typename T>
__global__ void attention_fwd_kernel(T* __restrict__ attn, T* __restrict__ ctx, int64_t ld_ctx,
                                     Acc<T>* __restrict__ probs, const T* __restrict__ q, int64_t ld_q,
                                     const T* __restrict__ kp, const T* __restrict__ enc,
                                     const T* __restrict__ w_v, const int64_t* __restrict__ valid_lens,
                                     const T* __restrict__ drop, int64_t Tk, int64_t H) {
  using A = Acc<T>;
  __shared__ A smem[kWarp + 1];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t nv = visible_keys(valid_lens, b, Tk);
  const T* qb = q + b * ld_q;
  const T* kb = kp + b * Tk * H;
  const T* eb = enc + b * Tk * H;
  A* p = probs + b * Tk;
  T* ab = attn + b * Tk;
  if (nv == 0) {
    // Every score is the fill value: the softmax is uniform over all T keys.
    const A u = A(1) / static_cast<A>(Tk);
    for (int64_t j = threadIdx.x; j < Tk; j += blockDim.x) {
      p[j] = u;
      ab[j] = static_cast<T>(u);
    }
  } else {
    // Scores: one warp per key, lanes over the hidden units.
    for (int64_t j = warp; j < nv; j += nwarps) {
      const T* kj = kb + j * H;
      A s = 0;
      for (int64_t i = lane; i < H; i += kWarp) {
        s += ld<A>(w_v, i) * tanh_acc(ld<A>(qb, i) + ld<A>(kj, i));
      }
      s = warp_reduce(s, SumOp());
      if (lane == 0) {
        p[j] = s;
      }
    }
    __syncthreads();  // the scores (global, L1/L2-resident) are visible to the whole block
    A m = A(-INFINITY);
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      m = m > p[j] ? m : p[j];
    }
    m = block_reduce(m, MaxOp(), A(-INFINITY), smem);
    A sum = 0;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      const A e = exp_acc(p[j] - m);
      p[j] = e;
      sum += e;
    }
    sum = block_reduce(sum, SumOp(), A(0), smem);
    const A inv = A(1) / sum;
    for (int64_t j = threadIdx.x; j < Tk; j += blockDim.x) {
      const A v = j < nv ? p[j] * inv : A(0);
      p[j] = v;
      ab[j] = static_cast<T>(v);
    }
  }
  __syncthreads();
  // Context from the dropped weights: threads over the hidden units, keys in order.
  const int64_t used = nv == 0 ? Tk : nv;
  const T* db = drop != nullptr ? drop + b * Tk : nullptr;
  T* cb = ctx + b * ld_ctx;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    A c = 0;
    for (int64_t j = 0; j < used; ++j) {
      const A w = db != nullptr ? p[j] * ld<A>(db, j) : p[j];
      c += w * ld<A>(eb, j * H + i);
    }
    cb[i] = static_cast<T>(c);
  }
}

template <typename T>
__global__ void attention_bwd_kernel(T* __restrict__ d_q, int64_t ld_dq, Acc<T>* __restrict__ d_kp,
                                     Acc<T>* __restrict__ d_enc, Acc<T>* __restrict__ d_wv_rows,
                                     Acc<T>* __restrict__ scratch, const T* __restrict__ d_ctx, int64_t ld_dctx,
                                     const T* __restrict__ attn, const T* __restrict__ d_attn,
                                     const T* __restrict__ q, int64_t ld_q, const T* __restrict__ kp,
                                     const T* __restrict__ enc, const T* __restrict__ w_v,
                                     const int64_t* __restrict__ valid_lens, const T* __restrict__ drop,
                                     int64_t Tk, int64_t H) {
  using A = Acc<T>;
  __shared__ A smem[kWarp + 1];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t nv = visible_keys(valid_lens, b, Tk);
  const int64_t used = nv == 0 ? Tk : nv;
  const T* ab = attn + b * Tk;
  const T* gab = d_attn != nullptr ? d_attn + b * Tk : nullptr;
  const T* db = drop != nullptr ? drop + b * Tk : nullptr;
  const T* dcb = d_ctx + b * ld_dctx;
  const T* qb = q + b * ld_q;
  const T* kb = kp + b * Tk * H;
  const T* eb = enc + b * Tk * H;
  A* s = scratch + b * Tk;
  A* dencb = d_enc + b * Tk * H;
  A* dkpb = d_kp + b * Tk * H;
  // da_j = d_attn_j + keep_j * <d_ctx, enc_j>; d_enc_j += a_j * keep_j * d_ctx. One warp per key.
  for (int64_t j = warp; j < Tk; j += nwarps) {
    A da = gab != nullptr ? ld<A>(gab, j) : A(0);
    if (j < used) {
      const A keep = db != nullptr ? ld<A>(db, j) : A(1);
      const A ad = ld<A>(ab, j) * keep;
      const T* ej = eb + j * H;
      A* dej = dencb + j * H;
      A acc = 0;
      for (int64_t i = lane; i < H; i += kWarp) {
        const A dc = ld<A>(dcb, i);
        acc += dc * ld<A>(ej, i);
        dej[i] += ad * dc;
      }
      acc = warp_reduce(acc, SumOp());
      da += acc * keep;
    }
    if (lane == 0) {
      s[j] = da;
    }
  }
  __syncthreads();
  T* dqb = d_q + b * ld_dq;
  if (nv == 0) {
    // Every score was the constant fill value: no gradient reaches the scores.
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      dqb[i] = static_cast<T>(A(0));
    }
    return;  // uniform over the block
  }
  A part = 0;
  for (int64_t j = threadIdx.x; j < Tk; j += blockDim.x) {
    part += ld<A>(ab, j) * s[j];
  }
  const A da_sum = block_reduce(part, SumOp(), A(0), smem);
  // Gradient of the scores: de_j = a_j * (da_j - sum_k a_k da_k).
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
    s[j] = ld<A>(ab, j) * (s[j] - da_sum);
  }
  __syncthreads();
  A* dwb = d_wv_rows + b * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const A qi = ld<A>(qb, i), wi = ld<A>(w_v, i);
    A gq = 0, gw = 0;
    for (int64_t j = 0; j < nv; ++j) {
      const A de = s[j];
      const A f = tanh_acc(qi + ld<A>(kb, j * H + i));
      const A g = de * wi * (A(1) - f * f);
      dkpb[j * H + i] += g;
      gq += g;
      gw += de * f;
    }
    dqb[i] = static_cast<T>(gq);
    dwb[i] += gw;
  }
}

// ---- embedding rows and the greedy step --------------------------------------------------------

template <typename T>
__global__ void embed_rows_kernel(T* __restrict__ out, int64_t ld_out, const T* __restrict__ table,
                                  const int64_t* __restrict__ ids, int64_t id_stride_b, int64_t id_stride_t,
                                  int64_t rows, int64_t B, int64_t E, int64_t V) {
  const int64_t n = rows * E;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / E, c = idx % E;
    const int64_t t = r / B, b = r % B;
    int64_t id = ids[b * id_stride_b + t * id_stride_t];
    id = id < 0 ? 0 : (id >= V ? V - 1 : id);
    out[r * ld_out + c] = table[id * E + c];
  }
}

template <typename T>
__global__ void greedy_step_kernel(int64_t* __restrict__ tokens, int32_t* __restrict__ finished,
                                   int64_t* __restrict__ first_eos, int32_t* __restrict__ counters,
                                   T* __restrict__ next_input, int64_t ld_next, const T* __restrict__ logits,
                                   const T* __restrict__ table, int64_t V, int64_t E, int64_t t,
                                   int64_t max_len, int64_t eos) {
  using A = Acc<T>;
  __shared__ A best_v[kWarp];
  __shared__ int64_t best_i[kWarp + 1];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const T* yb = logits + b * V;
  // (value, index) maximum with the smallest index among equal values; NaN never wins.
  A bv = A(-INFINITY);
  int64_t bi = V;  // V: none yet
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const A y = ld<A>(yb, v);
    if (y > bv || (y == bv && v < bi)) {
      bv = y;
      bi = v;
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, bv, offset);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, offset);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    best_v[warp] = bv;
    best_i[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
      if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) {
        bv = best_v[w];
        bi = best_i[w];
      }
    }
    if (bi >= V) {
      bi = 0;  // every logit NaN: the CPU loop keeps index 0
    }
    const bool done_before = finished[b] != 0;
    tokens[b * max_len + t] = done_before ? eos : bi;
    if (!done_before) {
      atomicMax(&counters[1], static_cast<int32_t>(t + 1));
      if (bi == eos) {
        finished[b] = 1;
        first_eos[b] = t;
        atomicAdd(&counters[0], 1);
      }
    }
    best_i[kWarp] = bi;
  }
  __syncthreads();
  const int64_t tok = best_i[kWarp];
  T* nb = next_input + b * ld_next;
  for (int64_t c = threadIdx.x; c < E; c += blockDim.x) {
    nb[c] = table[tok * E + c];
  }
}

// ---- loss ---------------------------------------------------------------------------------------

template <typename T>
__global__ void ce_rows_kernel(T* __restrict__ lse, Acc<T>* __restrict__ nll, const T* __restrict__ pred,
                               int64_t stride_b, int64_t stride_s, const int64_t* __restrict__ label, int64_t S,
                               int64_t V) {
  using A = Acc<T>;
  __shared__ A smem[kWarp + 1];
  const int64_t r = blockIdx.x, b = r / S, s = r % S;
  const T* x = pred + b * stride_b + s * stride_s;
  A m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    m = MaxOp()(m, ld<A>(x, v));
  }
  m = block_reduce(m, MaxOp(), A(-INFINITY), smem);
  A sum = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    sum += exp_acc(ld<A>(x, v) - m);  // argument <= 0
  }
  sum = block_reduce(sum, SumOp(), A(0), smem);
  if (threadIdx.x == 0) {
    const A l = m + log_acc(sum);
    const int64_t y = clamp_index(label[r], V - 1);
    lse[r] = static_cast<T>(l);
    nll[r] = l - ld<A>(x, y);
  }
}

template <typename T>
__global__ void ce_sum_kernel(T* __restrict__ loss, const Acc<T>* __restrict__ nll,
                              const int64_t* __restrict__ valid_len, int64_t B, int64_t S) {
  using A = Acc<T>;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t kept = clamp_index(valid_len[b], S);
    A sum = 0;
    for (int64_t s = 0; s < kept; ++s) {  // in step order, as the CPU op: deterministic
      sum += nll[b * S + s];
    }
    loss[b] = static_cast<T>(sum / static_cast<A>(S));
  }
}

template <typename T>
__global__ void ce_bwd_kernel(T* __restrict__ grad, const T* __restrict__ pred, int64_t stride_b, int64_t stride_s,
                              const int64_t* __restrict__ label, const int64_t* __restrict__ valid_len,
                              const T* __restrict__ lse, const T* __restrict__ grad_loss, int64_t S, int64_t V) {
  using A = Acc<T>;
  const int64_t r = blockIdx.x, b = r / S, s = r % S;
  const int64_t offset = b * stride_b + s * stride_s;
  const T* x = pred + offset;
  T* g = grad + offset;
  const A scale = s < valid_len[b] ? ld<A>(grad_loss, b) / static_cast<A>(S) : A(0);
  const A l = ld<A>(lse, r);
  const int64_t y = clamp_index(label[r], V - 1);
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const A p = exp_acc(ld<A>(x, v) - l);
    g[v] = static_cast<T>(scale * (v == y ? p - A(1) : p));
  }
}

// ---- dropout keep-mask ---------------------------------------------------------------------------

template <typename T>
__global__ void keep_mask_kernel(T* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset,
                                 const int64_t* seed_ptr, const int64_t* offset_ptr, uint64_t offset_intragraph,
                                 uint32_t threshold, T keep) {
  // Under capture the generator's state lives on the device (torch's graph-safe philox state).
  const uint64_t key = seed_ptr != nullptr ? static_cast<uint64_t>(*seed_ptr) : seed;
  const uint64_t first = offset_ptr != nullptr ? static_cast<uint64_t>(*offset_ptr) + offset_intragraph : offset;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = splitmix64_high(key, first + static_cast<uint64_t>(i)) >= threshold ? keep : T(0);
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

template <typename T>
void gates_forward(const GatesFwdArgs& a, cudaStream_t stream) {
  const int64_t n = a.B * a.H;
  if (n == 0) {
    return;
  }
  gates_fwd_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, stream>>>(
      static_cast<T*>(a.h_out), static_cast<T*>(a.save), static_cast<T*>(a.drop_out),
      static_cast<const T*>(a.gi), a.ld_gi, static_cast<const T*>(a.gh), a.ld_gh, static_cast<const T*>(a.b_ih),
      static_cast<const T*>(a.b_hh), static_cast<const T*>(a.h_prev), static_cast<const T*>(a.drop_mask), a.B,
      a.H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void gates_backward(const GatesBwdArgs& a, cudaStream_t stream) {
  const int64_t n = a.B * a.H;
  if (n == 0) {
    return;
  }
  gates_bwd_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, stream>>>(
      static_cast<T*>(a.dh), static_cast<T*>(a.g_gi), a.ld_gi, static_cast<T*>(a.g_gh), a.ld_gh,
      static_cast<const T*>(a.save), static_cast<const T*>(a.h_prev), static_cast<const T*>(a.ext),
      static_cast<const T*>(a.above), static_cast<const T*>(a.above_mask), a.B, a.H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void attention_forward(const AttnFwdArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.T == 0) {
    return;
  }
  attention_fwd_kernel<T><<<static_cast<unsigned>(a.B), row_threads(std::max(a.H, a.T)), 0, stream>>>(
      static_cast<T*>(a.attn), static_cast<T*>(a.ctx), a.ld_ctx, static_cast<Acc<T>*>(a.probs),
      static_cast<const T*>(a.q), a.ld_q, static_cast<const T*>(a.kp), static_cast<const T*>(a.enc),
      static_cast<const T*>(a.w_v), a.valid_lens, static_cast<const T*>(a.drop), a.T, a.H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void attention_backward(const AttnBwdArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.T == 0) {
    return;
  }
  attention_bwd_kernel<T><<<static_cast<unsigned>(a.B), row_threads(std::max(a.H, a.T)), 0, stream>>>(
      static_cast<T*>(a.d_q), a.ld_dq, static_cast<Acc<T>*>(a.d_kp), static_cast<Acc<T>*>(a.d_enc),
      static_cast<Acc<T>*>(a.d_wv_rows), static_cast<Acc<T>*>(a.scratch), static_cast<const T*>(a.d_ctx),
      a.ld_dctx, static_cast<const T*>(a.attn), static_cast<const T*>(a.d_attn), static_cast<const T*>(a.q),
      a.ld_q, static_cast<const T*>(a.kp), static_cast<const T*>(a.enc), static_cast<const T*>(a.w_v),
      a.valid_lens, static_cast<const T*>(a.drop), a.T, a.H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void embed_rows(const EmbedArgs& a, cudaStream_t stream) {
  const int64_t rows = a.steps * a.B;
  const int64_t n = rows * a.E;
  if (n == 0 || a.V == 0) {
    return;
  }
  embed_rows_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, stream>>>(
      static_cast<T*>(a.out), a.ld_out, static_cast<const T*>(a.table), a.ids, a.id_stride_b, a.id_stride_t, rows,
      a.B, a.E, a.V);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void greedy_step(const GreedyArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.V == 0) {
    return;
  }
  greedy_step_kernel<T><<<static_cast<unsigned>(a.B), row_threads(a.V), 0, stream>>>(
      a.tokens, a.finished, a.first_eos, a.counters, static_cast<T*>(a.next_input), a.ld_next,
      static_cast<const T*>(a.logits), static_cast<const T*>(a.table), a.V, a.E, a.t, a.max_len, a.eos);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void cross_entropy_forward(const CeFwdArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * a.S;
  if (rows == 0) {
    return;
  }
  ce_rows_kernel<T><<<static_cast<unsigned>(rows), row_threads(a.V), 0, stream>>>(
      static_cast<T*>(a.lse), static_cast<Acc<T>*>(a.nll), static_cast<const T*>(a.pred), a.stride_b, a.stride_s,
      a.label, a.S, a.V);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ce_sum_kernel<T><<<elementwise_blocks(a.B), kElementwiseThreads, 0, stream>>>(
      static_cast<T*>(a.loss), static_cast<const Acc<T>*>(a.nll), a.valid_len, a.B, a.S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void cross_entropy_backward(const CeBwdArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * a.S;
  if (rows == 0) {
    return;
  }
  ce_bwd_kernel<T><<<static_cast<unsigned>(rows), row_threads(a.V), 0, stream>>>(
      static_cast<T*>(a.grad), static_cast<const T*>(a.pred), a.stride_b, a.stride_s, a.label, a.valid_len,
      static_cast<const T*>(a.lse), static_cast<const T*>(a.grad_loss), a.S, a.V);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void keep_mask_fill(const KeepMaskArgs& a, cudaStream_t stream) {
  if (a.n == 0) {
    return;
  }
  keep_mask_kernel<T><<<elementwise_blocks(a.n), kElementwiseThreads, 0, stream>>>(
      static_cast<T*>(a.out), a.n, a.seed, a.offset, a.seed_ptr, a.offset_ptr, a.offset_intragraph, a.threshold,
      static_cast<T>(a.keep));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define SEQ2SEQ_FAST_INSTANTIATE(T)                                          \
  template void gates_forward<T>(const GatesFwdArgs&, cudaStream_t);         \
  template void gates_backward<T>(const GatesBwdArgs&, cudaStream_t);        \
  template void attention_forward<T>(const AttnFwdArgs&, cudaStream_t);      \
  template void attention_backward<T>(const AttnBwdArgs&, cudaStream_t);     \
  template void embed_rows<T>(const EmbedArgs&, cudaStream_t);               \
  template void greedy_step<T>(const GreedyArgs&, cudaStream_t);             \
  template void cross_entropy_forward<T>(const CeFwdArgs&, cudaStream_t);    \
  template void cross_entropy_backward<T>(const CeBwdArgs&, cudaStream_t);   \
  template void keep_mask_fill<T>(const KeepMaskArgs&, cudaStream_t);

SEQ2SEQ_FAST_INSTANTIATE(float)
SEQ2SEQ_FAST_INSTANTIATE(double)
SEQ2SEQ_FAST_INSTANTIATE(c10::Half)
SEQ2SEQ_FAST_INSTANTIATE(c10::BFloat16)
#undef SEQ2SEQ_FAST_INSTANTIATE

}  // namespace seq2seq_fast::gpu
