// Implementation of csrc/cpu/rows.h: the row kernels, written once as inline templates, their
// float versions compiled per ISA, and their row-parallel entry points.
//
// Float compares must not count as trapping, else GCC keeps the clamps and selects of the
// exp/tanh polynomials as branches and vectorizes none of the row loops (torch itself builds
// with -fno-trapping-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu/rows.h"
#include "cpu/chunks.h"

#include <c10/util/Exception.h>

#include <limits>
#include <vector>

namespace seq2seq_fast::cpu {
namespace {

// ---- row kernels, written once as inline templates --------------------------------------

template <typename T>
SEQ2SEQ_FAST_INLINE void gates_forward_rows(const GatesFwd& p, int64_t b0, int64_t b1) {
  const int64_t H = p.H;
  const T* bi = static_cast<const T*>(p.b_ih);
  const T* bh = static_cast<const T*>(p.b_hh);
  for (int64_t b = b0; b < b1; ++b) {
    const T* gi = static_cast<const T*>(p.gi) + b * p.ld_gi;
    const T* gh = static_cast<const T*>(p.gh) + b * p.ld_gh;
    const T* hp = static_cast<const T*>(p.h_prev) + b * H;
    T* ho = static_cast<T*>(p.h_out) + b * H;
    T* sv = static_cast<T*>(p.save) + b * 4 * H;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) {
      T r = sigmoid_t<T>(gi[i] + bi[i] + gh[i] + bh[i]);
      T z = sigmoid_t<T>(gi[H + i] + bi[H + i] + gh[H + i] + bh[H + i]);
      T ghn = gh[2 * H + i] + bh[2 * H + i];
      T n = tanh_t<T>(gi[2 * H + i] + bi[2 * H + i] + r * ghn);
      T h = hp[i];
      sv[i] = r;
      sv[H + i] = z;
      sv[2 * H + i] = n;
      sv[3 * H + i] = ghn;
      ho[i] = n + z * (h - n);
    }
  }
}

template <typename T>
SEQ2SEQ_FAST_INLINE void gates_backward_rows(const GatesBwd& p, int64_t b0, int64_t b1) {
  const int64_t H = p.H;
  for (int64_t b = b0; b < b1; ++b) {
    T* dh = static_cast<T*>(p.dh) + b * H;
    const T* sv = static_cast<const T*>(p.save) + b * 4 * H;
    const T* hp = static_cast<const T*>(p.h_prev) + b * H;
    T* g = static_cast<T*>(p.g) + b * p.ld_g;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) {
      T r = sv[i], z = sv[H + i], n = sv[2 * H + i], ghn = sv[3 * H + i];
      T d = dh[i];
      T dn = d * (T(1) - z) * (T(1) - n * n);
      T dz = d * (hp[i] - n) * z * (T(1) - z);
      T dr = dn * ghn * r * (T(1) - r);
      g[i] = dn * r;
      g[H + i] = dr;
      g[2 * H + i] = dz;
      g[3 * H + i] = dn;
      dh[i] = d * z;
    }
  }
}

// Reductions of short rows (a row of H values, a row's keys, a vocabulary) in kLanes lanes,
// combined in a tree at the end, the last block masked: GCC ends an `omp simd` reduction with
// kLanes scalar additions in a chain and runs a loop of fewer than kLanes iterations in its scalar
// remainder. On d2l's zh setting (H = 32, 10 keys) both took about half the attention's time
// (perf annotate). One running value instead of lanes would also bind a loop to the latency of
// one dependent operation per element (the compiler does not reorder std::max's comparisons).
constexpr int64_t kLanes = 16;

// term(0), ..., term(n - 1) combined by `combine` (associative and commutative, `identity` its
// neutral value), in lanes; term may also write index i.
template <typename T, typename Combine, typename Term>
SEQ2SEQ_FAST_INLINE T reduce_over(int64_t n, T identity, const Combine& combine, const Term& term) {
  T lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    lanes[l] = identity;
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] = combine(lanes[l], term(i + l));
    }
  }
  const int64_t rest = n - i;
  if (rest > 0) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      if (l < rest) {
        lanes[l] = combine(lanes[l], term(i + l));
      }
    }
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int64_t l = 0; l < width; ++l) {
      lanes[l] = combine(lanes[l], lanes[l + width]);
    }
  }
  return lanes[0];
}

template <typename T, typename Term>
SEQ2SEQ_FAST_INLINE T sum_over(int64_t n, const Term& term) {
  return reduce_over<T>(n, T(0), [](T a, T b) { return a + b; }, term);
}

// Number of keys that take part in the softmax of a row: 0 means "uniform over all T".
SEQ2SEQ_FAST_INLINE int64_t visible_keys(const int64_t* valid_lens, int64_t b, int64_t T) {
  if (valid_lens == nullptr) {
    return T;
  }
  return std::min<int64_t>(std::max<int64_t>(valid_lens[b], 0), T);
}

template <typename T>
SEQ2SEQ_FAST_INLINE void attention_forward_rows(const AttnFwd& p, int64_t b0, int64_t b1) {
  const int64_t Tk = p.T, H = p.H;
  const T* w = static_cast<const T*>(p.w_v);
  for (int64_t b = b0; b < b1; ++b) {
    const T* q = static_cast<const T*>(p.q) + b * p.ld_q;
    const T* kp = static_cast<const T*>(p.kp) + b * Tk * H;
    const T* enc = static_cast<const T*>(p.enc) + b * Tk * H;
    T* a = static_cast<T*>(p.attn) + b * Tk;
    T* ctx = static_cast<T*>(p.ctx) + b * p.ld_ctx;
    const T* drop = p.drop ? static_cast<const T*>(p.drop) + b * Tk : nullptr;
    const int64_t nv = visible_keys(p.valid_lens, b, Tk);
    if (nv == 0) {
      // Every score is the fill value: the softmax is uniform.
      for (int64_t j = 0; j < Tk; ++j) {
        a[j] = T(1) / T(Tk);
      }
    } else {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < nv; ++j) {
        const T* k = kp + j * H;
        a[j] = sum_over<T>(H, [&](int64_t i) { return w[i] * tanh_t<T>(q[i] + k[i]); });
        m = std::max(m, a[j]);
      }
      const T inv = T(1) / sum_over<T>(nv, [&](int64_t j) {
        a[j] = exp_t<T>(a[j] - m);
        return a[j];
      });
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) {
        a[j] *= inv;
      }
      for (int64_t j = nv; j < Tk; ++j) {
        a[j] = T(0);
      }
    }
    const int64_t used = nv == 0 ? Tk : nv;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) {
      ctx[i] = T(0);
    }
    for (int64_t j = 0; j < used; ++j) {
      const T aj = drop ? a[j] * drop[j] : a[j];
      const T* e = enc + j * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        ctx[i] += aj * e[i];
      }
    }
  }
}

template <typename T>
SEQ2SEQ_FAST_INLINE void attention_backward_rows(const AttnBwd& p, int64_t b0, int64_t b1) {
  const int64_t Tk = p.T, H = p.H;
  const T* w = static_cast<const T*>(p.w_v);
  for (int64_t b = b0; b < b1; ++b) {
    const T* q = static_cast<const T*>(p.q) + b * p.ld_q;
    const T* kp = static_cast<const T*>(p.kp) + b * Tk * H;
    const T* enc = static_cast<const T*>(p.enc) + b * Tk * H;
    const T* a = static_cast<const T*>(p.attn) + b * Tk;
    const T* da_ext = p.d_attn ? static_cast<const T*>(p.d_attn) + b * Tk : nullptr;
    const T* drop = p.drop ? static_cast<const T*>(p.drop) + b * Tk : nullptr;
    const T* dc = static_cast<const T*>(p.d_ctx) + b * H;
    T* dkp = static_cast<T*>(p.d_kp) + b * Tk * H;
    T* denc = static_cast<T*>(p.d_enc) + b * Tk * H;
    T* dwv = static_cast<T*>(p.d_wv_rows) + b * H;
    T* dq = static_cast<T*>(p.d_q) + b * p.ld_dq;
    const int64_t nv = visible_keys(p.valid_lens, b, Tk);
    const int64_t used = nv == 0 ? Tk : nv;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) {
      dq[i] = T(0);
    }
    // d(a_j) from the context (through the dropout mask) and from the returned weights.
    T da_sum = 0;  // sum_j a_j * da_j
    T da_buf[64];
    const bool small = Tk <= 64;
    for (int64_t j = 0; j < Tk; ++j) {
      T da = da_ext ? da_ext[j] : T(0);
      if (j < used) {
        const T keep = drop ? drop[j] : T(1);
        const T* e = enc + j * H;
        T* de = denc + j * H;
        const T ad = a[j] * keep;
        const T acc = sum_over<T>(H, [&](int64_t i) {
          de[i] += ad * dc[i];
          return dc[i] * e[i];
        });
        da += acc * keep;
      }
      da_sum += a[j] * da;
      if (small) {
        da_buf[j] = da;
      }
    }
    if (nv == 0) {
      continue;  // every score was the constant fill value: no gradient reaches the scores
    }
    for (int64_t j = 0; j < nv; ++j) {
      T da;
      if (small) {
        da = da_buf[j];
      } else {
        // Recompute da_j (long rows only; keeps the kernel free of heap buffers).
        da = da_ext ? da_ext[j] : T(0);
        const T keep = drop ? drop[j] : T(1);
        const T* e = enc + j * H;
        da += sum_over<T>(H, [&](int64_t i) { return dc[i] * e[i]; }) * keep;
      }
      const T de = a[j] * (da - da_sum);
      const T* k = kp + j * H;
      T* dk = dkp + j * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        T f = tanh_t<T>(q[i] + k[i]);
        T g = de * w[i] * (T(1) - f * f);
        dk[i] += g;
        dq[i] += g;
        dwv[i] += de * f;
      }
    }
  }
}

// The largest of x[0, n) (NaNs skipped, as std::max(m, x) skips them).
template <typename T>
SEQ2SEQ_FAST_INLINE T row_max(const T* x, int64_t n) {
  return reduce_over<T>(n, -std::numeric_limits<T>::infinity(), [](T m, T v) { return v > m ? v : m; },
                        [&](int64_t i) { return x[i]; });
}

template <typename T>
SEQ2SEQ_FAST_INLINE void argmax_rows_impl(const T* Y, int64_t rows, int64_t V, int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* y = Y + r * V;
    const T m = row_max<T>(y, V);
    int64_t best = 0;
    for (int64_t v = 0; v < V; ++v) {
      if (y[v] == m) {
        best = v;
        break;
      }
    }
    out[r] = best;
  }
}

// The loss rows: row r = (b, s) = (r / S, r % S) of the B * S rows starts at this offset.
SEQ2SEQ_FAST_INLINE int64_t ce_row_offset(int64_t r, int64_t S, int64_t stride_b, int64_t stride_s) {
  return (r / S) * stride_b + (r % S) * stride_s;
}

template <typename T>
SEQ2SEQ_FAST_INLINE T log_sum_exp(const T* x, int64_t V) {
  const T m = row_max<T>(x, V);
  return m + std::log(sum_over<T>(V, [&](int64_t v) { return exp_t<T>(x[v] - m); }));
}

// g = scale * (softmax(x) - one_hot(label)), from the row's log-sum-exp; g may be x.
template <typename T>
SEQ2SEQ_FAST_INLINE void ce_grad_row(const T* x, int64_t V, T lse, T scale, int64_t label, T* g) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    g[v] = scale * exp_t<T>(x[v] - lse);
  }
  g[label] -= scale;
}

template <typename T>
SEQ2SEQ_FAST_INLINE void cross_entropy_forward_rows(const CeFwd& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.x) + ce_row_offset(r, p.S, p.stride_b, p.stride_s);
    const T lse = log_sum_exp<T>(x, p.V);
    static_cast<T*>(p.lse)[r] = lse;
    static_cast<T*>(p.nll)[r] = lse - x[p.label[r]];
  }
}

template <typename T>
SEQ2SEQ_FAST_INLINE void cross_entropy_backward_rows(const CeBwd& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t offset = ce_row_offset(r, p.S, p.stride_b, p.stride_s);
    ce_grad_row<T>(static_cast<const T*>(p.x) + offset, p.V, static_cast<const T*>(p.lse)[r],
                   static_cast<const T*>(p.scale)[r], p.label[r], static_cast<T*>(p.grad) + offset);
  }
}

template <typename T>
SEQ2SEQ_FAST_INLINE void column_sums_impl(const T* G, int64_t rows, int64_t cols, int64_t ld, T* out,
                                          bool accumulate) {
  if (!accumulate) {
    for (int64_t c = 0; c < cols; ++c) {
      out[c] = T(0);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = G + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      out[c] += g[c];
    }
  }
}

// ---- float entry points, compiled per ISA ----------------------------------------------------
SEQ2SEQ_FAST_CLONES void gates_forward_f32(const GatesFwd& p, int64_t b0, int64_t b1) {
  gates_forward_rows<float>(p, b0, b1);
}
SEQ2SEQ_FAST_CLONES void gates_backward_f32(const GatesBwd& p, int64_t b0, int64_t b1) {
  gates_backward_rows<float>(p, b0, b1);
}
SEQ2SEQ_FAST_CLONES void attention_forward_f32(const AttnFwd& p, int64_t b0, int64_t b1) {
  attention_forward_rows<float>(p, b0, b1);
}
SEQ2SEQ_FAST_CLONES void attention_backward_f32(const AttnBwd& p, int64_t b0, int64_t b1) {
  attention_backward_rows<float>(p, b0, b1);
}
SEQ2SEQ_FAST_CLONES void column_sums_f32(const float* G, int64_t rows, int64_t cols, int64_t ld, float* out,
                                         bool accumulate) {
  column_sums_impl<float>(G, rows, cols, ld, out, accumulate);
}

SEQ2SEQ_FAST_CLONES void argmax_rows_f32(const float* Y, int64_t rows, int64_t V, int64_t* out) {
  argmax_rows_impl<float>(Y, rows, V, out);
}
SEQ2SEQ_FAST_CLONES void cross_entropy_forward_f32(const CeFwd& p, int64_t r0, int64_t r1) {
  cross_entropy_forward_rows<float>(p, r0, r1);
}
SEQ2SEQ_FAST_CLONES void cross_entropy_backward_f32(const CeBwd& p, int64_t r0, int64_t r1) {
  cross_entropy_backward_rows<float>(p, r0, r1);
}

// bfloat16 logits: the forward widens each row into `row` (V floats, read by two passes); the
// backward widens, computes and rounds each value in one pass (three passes over `row` took a
// third longer than the float32 backward).
SEQ2SEQ_FAST_CLONES void cross_entropy_forward_bf16_rows(const CeFwd& p, int64_t r0, int64_t r1, float* row) {
  const int64_t V = p.V;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + ce_row_offset(r, p.S, p.stride_b, p.stride_s);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      row[v] = widen_bf16(x[v]);
    }
    const float lse = log_sum_exp<float>(row, V);
    static_cast<float*>(p.lse)[r] = lse;
    static_cast<float*>(p.nll)[r] = lse - row[p.label[r]];
  }
}
SEQ2SEQ_FAST_CLONES void cross_entropy_backward_bf16_rows(const CeBwd& p, int64_t r0, int64_t r1) {
  const int64_t V = p.V;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t offset = ce_row_offset(r, p.S, p.stride_b, p.stride_s);
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + offset;
    uint16_t* g = static_cast<uint16_t*>(p.grad) + offset;
    const float lse = static_cast<const float*>(p.lse)[r], scale = static_cast<const float*>(p.scale)[r];
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      g[v] = round_bf16(scale * exp_t<float>(widen_bf16(x[v]) - lse));
    }
    const int64_t label = p.label[r];
    g[label] = round_bf16(scale * exp_t<float>(widen_bf16(x[label]) - lse) - scale);
  }
}

template <typename T, typename P, typename F32, typename F64>
void run_rows(const P& p, int64_t B, int64_t per_row, F32 f32, F64 f64) {
  parallel_ranges(B, grain_rows(per_row), [&](int64_t b0, int64_t b1) {
    if constexpr (std::is_same_v<T, float>) {
      f32(p, b0, b1);
    } else {
      f64(p, b0, b1);
    }
  });
}

}  // namespace

template <typename T>
void copy_contiguous(const at::Tensor& src, T* out) {
  TORCH_CHECK(src.dim() == 3, "seq2seq_fast: copy_contiguous expects 3 dimensions");
  const int64_t D0 = src.size(0), D1 = src.size(1), D2 = src.size(2);
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2);
  const T* in = src.data_ptr<T>();
  if (s2 == 1) {
    for (int64_t i = 0; i < D0; ++i) {
      for (int64_t j = 0; j < D1; ++j) {
        std::copy(in + i * s0 + j * s1, in + i * s0 + j * s1 + D2, out + (i * D1 + j) * D2);
      }
    }
    return;
  }
  // Innermost output dimension strided: walk it in blocks, the smallest-stride outer dimension
  // inside, so each block's source lines stay in cache.
  constexpr int64_t kBlock = 256;
  const bool inner_is_0 = s0 <= s1;
  const int64_t Dout = inner_is_0 ? D1 : D0, Din = inner_is_0 ? D0 : D1;
  const int64_t sout = inner_is_0 ? s1 : s0, sin = inner_is_0 ? s0 : s1;
  parallel_ranges(Dout, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t c0 = 0; c0 < D2; c0 += kBlock) {
        const int64_t c1 = std::min(D2, c0 + kBlock);
        for (int64_t n = 0; n < Din; ++n) {
          const T* src_row = in + o * sout + n * sin;
          T* dst = out + (inner_is_0 ? (n * D1 + o) : (o * D1 + n)) * D2;
          for (int64_t c = c0; c < c1; ++c) {
            dst[c] = src_row[c * s2];
          }
        }
      }
    }
  });
}

template void copy_contiguous<float>(const at::Tensor&, float*);
template void copy_contiguous<double>(const at::Tensor&, double*);

template <>
void argmax_rows<float>(const float* Y, int64_t rows, int64_t V, int64_t* out) {
  argmax_rows_f32(Y, rows, V, out);
}
template <>
void argmax_rows<double>(const double* Y, int64_t rows, int64_t V, int64_t* out) {
  argmax_rows_impl<double>(Y, rows, V, out);
}

template <>
void column_sums<float>(const float* G, int64_t rows, int64_t cols, int64_t ld, float* out, bool accumulate) {
  column_sums_f32(G, rows, cols, ld, out, accumulate);
}
template <>
void column_sums<double>(const double* G, int64_t rows, int64_t cols, int64_t ld, double* out, bool accumulate) {
  column_sums_impl<double>(G, rows, cols, ld, out, accumulate);
}

template <typename T>
void gates_forward(const GatesFwd& p) {
  run_rows<T>(p, p.B, 40 * p.H, gates_forward_f32, gates_forward_rows<double>);
}
template <typename T>
void gates_backward(const GatesBwd& p) {
  run_rows<T>(p, p.B, 20 * p.H, gates_backward_f32, gates_backward_rows<double>);
}
template <typename T>
void attention_forward(const AttnFwd& p) {
  run_rows<T>(p, p.B, 20 * p.T * p.H, attention_forward_f32, attention_forward_rows<double>);
}
template <typename T>
void attention_backward(const AttnBwd& p) {
  run_rows<T>(p, p.B, 30 * p.T * p.H, attention_backward_f32, attention_backward_rows<double>);
}

template <typename T>
void cross_entropy_forward(const CeFwd& p) {
  run_rows<T>(p, p.B * p.S, 30 * p.V, cross_entropy_forward_f32, cross_entropy_forward_rows<double>);
}
template <typename T>
void cross_entropy_backward(const CeBwd& p) {
  run_rows<T>(p, p.B * p.S, 20 * p.V, cross_entropy_backward_f32, cross_entropy_backward_rows<double>);
}

void cross_entropy_forward_bf16(const CeFwd& p) {
  parallel_ranges(p.B * p.S, grain_rows(30 * p.V), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(p.V);
    cross_entropy_forward_bf16_rows(p, r0, r1, row.data());
  });
}
void cross_entropy_backward_bf16(const CeBwd& p) {
  parallel_ranges(p.B * p.S, grain_rows(20 * p.V),
                  [&](int64_t r0, int64_t r1) { cross_entropy_backward_bf16_rows(p, r0, r1); });
}

template void cross_entropy_forward<float>(const CeFwd&);
template void cross_entropy_forward<double>(const CeFwd&);
template void cross_entropy_backward<float>(const CeBwd&);
template void cross_entropy_backward<double>(const CeBwd&);
template void gates_forward<float>(const GatesFwd&);
template void gates_forward<double>(const GatesFwd&);
template void gates_backward<float>(const GatesBwd&);
template void gates_backward<double>(const GatesBwd&);
template void attention_forward<float>(const AttnFwd&);
template void attention_forward<double>(const AttnFwd&);
template void attention_backward<float>(const AttnBwd&);
template void attention_backward<double>(const AttnBwd&);

}  // namespace seq2seq_fast::cpu
