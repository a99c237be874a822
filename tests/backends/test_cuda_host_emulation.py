"""The CUDA ops run on the CPU, against the CPU ops, on machines without a GPU.

Two builds of csrc/cuda with its CUDA-only host calls (device guard, stream, capture query, events,
async copies) rewritten to CPU equivalents in a copy of the sources (each rewrite must match, so a
change of those lines fails here instead of silently testing something else; events read as
complete at once, which exercises greedy decoding's early stop at its first check):

* ``contract``: the kernels replaced by plain CPU loops written from kernels.h's contract; checks
  the host code (GEMMs on views, layouts, step order, greedy bookkeeping) over many cases.
* ``kernels``: kernels.cu itself compiled for the CPU, each block's
  threads run as std::threads with __syncthreads and warp shuffles emulated by barriers; checks the
  kernels' indexing, reductions and barriers too. What it cannot check: the GPU memory model,
  --use_fast_math numerics, cuBLAS, real warp scheduling.
"""
import itertools
import os
import re
import sys

import pytest
import torch

from helpers import REPO_ROOT as ROOT
from seq2seq_fast.backends.extension import extension_error

CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

pytestmark = [
    pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}"),
    pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch (its c10/cuda headers)"),
    pytest.mark.skipif(not os.path.exists("/usr/local/cuda/include/cuda_runtime_api.h"),
                       reason="needs the CUDA toolkit headers at /usr/local/cuda/include"),
]

# (pattern, replacement, regex): CUDA-only statements -> CPU equivalents.
REWRITES = [
    (r"\n\s*const c10::cuda::CUDAGuard guard\([^;]*\);", "", True),
    ("at::cuda::getCurrentCUDAStream()", "nullptr", False),
    ("at::kCUDA, kCudaFloats", "at::kCPU, kCudaFloats", False),
    ("TORCH_LIBRARY_IMPL(seq2seq_fast, CUDA, m)", "TORCH_LIBRARY_IMPL(seq2seq_fast_emu, CPU, m)", False),
    ("C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status));", "", False),
    (r"C10_CUDA_CHECK\(cudaMemcpyAsync\(host \+ c, counters\.data_ptr<int32_t>\(\), sizeof\(int32_t\),\s*"
     r"cudaMemcpyDeviceToHost, stream\)\);", "host[c] = counters.data_ptr<int32_t>()[0];", True),
    ("C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));", "", False),
    ("cudaEventDestroy(event);", "", False),
    ("C10_CUDA_CHECK(cudaEventRecord(events.back()->event, stream));", "", False),
    ("C10_CUDA_CHECK(cudaEventSynchronize(ev));", "", False),
    ("const cudaError_t status = cudaEventQuery(ev);", "const cudaError_t status = cudaSuccess;", False),
    ("(void)cudaGetLastError();", "", False),
    ("C10_CUDA_CHECK(status);", "(void)status;", False),
    (".pinned_memory(true)", "", False),
    # keep_mask: torch's CPU generator instead of the CUDA one, at offset 0 of the stream keyed by
    # one 64-bit draw, which is exactly how the CPU op seeds: the two must then agree bit for bit.
    ("#include <ATen/cuda/CUDAGeneratorImpl.h>",
     "#include <ATen/CPUGeneratorImpl.h>\n#include <ATen/cuda/PhiloxCudaState.h>", False),
    (r"at::get_generator_or_default<at::CUDAGeneratorImpl>\(\s*c10::nullopt, "
     r"at::cuda::detail::getDefaultCUDAGenerator\(device\.index\(\)\)\);",
     "at::get_generator_or_default<at::CPUGeneratorImpl>(c10::nullopt, at::detail::getDefaultCPUGenerator());",
     True),
    ("gen->philox_cuda_state(static_cast<uint64_t>((n + 3) / 4 * 4))", "at::PhiloxCudaState(gen->random64(), 0)",
     False),
]

LAUNCHERS = r"""#include <ATen/OpMathType.h>
#include <cmath>
#include <vector>
#include "cuda/kernels.h"
#include "random.h"

namespace seq2seq_fast::gpu {

template <typename T>
void gates_forward(const GatesFwdArgs& a, cudaStream_t) {
  using A = at::opmath_type<T>;
  const int64_t H = a.H;
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t i = 0; i < H; ++i) {
      const T* gi = static_cast<const T*>(a.gi) + b * a.ld_gi;
      const T* gh = static_cast<const T*>(a.gh) + b * a.ld_gh;
      const T* bi = static_cast<const T*>(a.b_ih);
      const T* bh = static_cast<const T*>(a.b_hh);
      A r = 1 / (1 + std::exp(-(A(gi[i]) + bi[i] + gh[i] + bh[i])));
      A z = 1 / (1 + std::exp(-(A(gi[H + i]) + bi[H + i] + gh[H + i] + bh[H + i])));
      A ghn = A(gh[2 * H + i]) + bh[2 * H + i];
      A n = std::tanh(A(gi[2 * H + i]) + bi[2 * H + i] + r * ghn);
      A hp = static_cast<const T*>(a.h_prev)[b * H + i];
      T* sv = static_cast<T*>(a.save) + b * 4 * H;
      sv[i] = r; sv[H + i] = z; sv[2 * H + i] = n; sv[3 * H + i] = ghn;
      T h = n + z * (hp - n);
      static_cast<T*>(a.h_out)[b * H + i] = h;
      if (a.drop_out) static_cast<T*>(a.drop_out)[b * H + i] = h * static_cast<const T*>(a.drop_mask)[b * H + i];
    }
}

template <typename T>
void gates_backward(const GatesBwdArgs& a, cudaStream_t) {
  const int64_t H = a.H;
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t i = 0; i < H; ++i) {
      const int64_t idx = b * H + i;
      T d = static_cast<T*>(a.dh)[idx];
      if (a.ext) d += static_cast<const T*>(a.ext)[idx];
      if (a.above) d += static_cast<const T*>(a.above)[idx] * (a.above_mask ? static_cast<const T*>(a.above_mask)[idx] : T(1));
      const T* sv = static_cast<const T*>(a.save) + b * 4 * H;
      T r = sv[i], z = sv[H + i], n = sv[2 * H + i], ghn = sv[3 * H + i];
      T dn = d * (1 - z) * (1 - n * n);
      T dz = d * (static_cast<const T*>(a.h_prev)[idx] - n) * z * (1 - z);
      T dr = dn * ghn * r * (1 - r);
      T* gi = static_cast<T*>(a.g_gi) + b * a.ld_gi;
      T* gh = static_cast<T*>(a.g_gh) + b * a.ld_gh;
      gi[i] = dr; gi[H + i] = dz; gi[2 * H + i] = dn;
      gh[i] = dr; gh[H + i] = dz; gh[2 * H + i] = dn * r;
      static_cast<T*>(a.dh)[idx] = d * z;
    }
}

static int64_t nvis(const int64_t* lens, int64_t b, int64_t T) {
  if (!lens) return T;
  return std::min<int64_t>(std::max<int64_t>(lens[b], 0), T);
}

template <typename T>
void attention_forward(const AttnFwdArgs& a, cudaStream_t) {
  const int64_t Tk = a.T, H = a.H;
  for (int64_t b = 0; b < a.B; ++b) {
    const T* q = static_cast<const T*>(a.q) + b * a.ld_q;
    const T* kp = static_cast<const T*>(a.kp) + b * Tk * H;
    const T* enc = static_cast<const T*>(a.enc) + b * Tk * H;
    const T* w = static_cast<const T*>(a.w_v);
    T* p = static_cast<T*>(a.probs) + b * Tk;
    T* at = static_cast<T*>(a.attn) + b * Tk;
    int64_t nv = nvis(a.valid_lens, b, Tk);
    if (nv == 0) { for (int64_t j = 0; j < Tk; ++j) p[j] = at[j] = T(1) / Tk; }
    else {
      T m = -INFINITY;
      for (int64_t j = 0; j < nv; ++j) { T s = 0; for (int64_t i = 0; i < H; ++i) s += w[i] * std::tanh(q[i] + kp[j * H + i]); p[j] = s; m = std::max(m, s); }
      T sum = 0; for (int64_t j = 0; j < nv; ++j) { p[j] = std::exp(p[j] - m); sum += p[j]; }
      for (int64_t j = 0; j < Tk; ++j) { p[j] = j < nv ? p[j] / sum : T(0); at[j] = p[j]; }
    }
    int64_t used = nv == 0 ? Tk : nv;
    const T* drop = a.drop ? static_cast<const T*>(a.drop) + b * Tk : nullptr;
    T* ctx = static_cast<T*>(a.ctx) + b * a.ld_ctx;
    for (int64_t i = 0; i < H; ++i) { T c = 0; for (int64_t j = 0; j < used; ++j) c += p[j] * (drop ? drop[j] : T(1)) * enc[j * H + i]; ctx[i] = c; }
  }
}

template <typename T>
void attention_backward(const AttnBwdArgs& a, cudaStream_t) {
  const int64_t Tk = a.T, H = a.H;
  for (int64_t b = 0; b < a.B; ++b) {
    const T* q = static_cast<const T*>(a.q) + b * a.ld_q;
    const T* kp = static_cast<const T*>(a.kp) + b * Tk * H;
    const T* enc = static_cast<const T*>(a.enc) + b * Tk * H;
    const T* w = static_cast<const T*>(a.w_v);
    const T* at = static_cast<const T*>(a.attn) + b * Tk;
    const T* gat = a.d_attn ? static_cast<const T*>(a.d_attn) + b * Tk : nullptr;
    const T* drop = a.drop ? static_cast<const T*>(a.drop) + b * Tk : nullptr;
    const T* dc = static_cast<const T*>(a.d_ctx) + b * a.ld_dctx;
    T* dkp = static_cast<T*>(a.d_kp) + b * Tk * H;
    T* denc = static_cast<T*>(a.d_enc) + b * Tk * H;
    T* dwv = static_cast<T*>(a.d_wv_rows) + b * H;
    T* dq = static_cast<T*>(a.d_q) + b * a.ld_dq;
    T* s = static_cast<T*>(a.scratch) + b * Tk;
    int64_t nv = nvis(a.valid_lens, b, Tk), used = nv == 0 ? Tk : nv;
    for (int64_t j = 0; j < Tk; ++j) {
      T da = gat ? gat[j] : T(0);
      if (j < used) { T keep = drop ? drop[j] : T(1); T acc = 0; for (int64_t i = 0; i < H; ++i) { acc += dc[i] * enc[j * H + i]; denc[j * H + i] += at[j] * keep * dc[i]; } da += acc * keep; }
      s[j] = da;
    }
    if (nv == 0) { for (int64_t i = 0; i < H; ++i) dq[i] = 0; continue; }
    T sum = 0; for (int64_t j = 0; j < Tk; ++j) sum += at[j] * s[j];
    for (int64_t j = 0; j < nv; ++j) s[j] = at[j] * (s[j] - sum);
    for (int64_t i = 0; i < H; ++i) {
      T gq = 0, gw = 0;
      for (int64_t j = 0; j < nv; ++j) { T f = std::tanh(q[i] + kp[j * H + i]); T g = s[j] * w[i] * (1 - f * f); dkp[j * H + i] += g; gq += g; gw += s[j] * f; }
      dq[i] = gq; dwv[i] += gw;
    }
  }
}

template <typename T>
void embed_rows(const EmbedArgs& a, cudaStream_t) {
  for (int64_t t = 0; t < a.steps; ++t)
    for (int64_t b = 0; b < a.B; ++b) {
      int64_t id = a.ids[b * a.id_stride_b + t * a.id_stride_t];
      for (int64_t c = 0; c < a.E; ++c)
        static_cast<T*>(a.out)[(t * a.B + b) * a.ld_out + c] = static_cast<const T*>(a.table)[id * a.E + c];
    }
}

template <typename T>
void greedy_step(const GreedyArgs& a, cudaStream_t) {
  for (int64_t b = 0; b < a.B; ++b) {
    const T* y = static_cast<const T*>(a.logits) + b * a.V;
    int64_t best = 0;
    for (int64_t v = 1; v < a.V; ++v) if (y[v] > y[best]) best = v;
    bool done = a.finished[b] != 0;
    a.tokens[b * a.max_len + a.t] = done ? a.eos : best;
    if (!done) {
      a.counters[1] = std::max<int32_t>(a.counters[1], a.t + 1);
      if (best == a.eos) { a.finished[b] = 1; a.first_eos[b] = a.t; a.counters[0] += 1; }
    }
    for (int64_t c = 0; c < a.E; ++c) static_cast<T*>(a.next_input)[b * a.ld_next + c] = static_cast<const T*>(a.table)[best * a.E + c];
  }
}

template <typename T>
void cross_entropy_forward(const CeFwdArgs& a, cudaStream_t) {
  using A = at::opmath_type<T>;
  std::vector<A> nll(a.B * a.S);
  for (int64_t r = 0; r < a.B * a.S; ++r) {
    const T* x = static_cast<const T*>(a.pred) + (r / a.S) * a.stride_b + (r % a.S) * a.stride_s;
    A m = -INFINITY, sum = 0;
    for (int64_t v = 0; v < a.V; ++v) m = std::max(m, A(x[v]));
    for (int64_t v = 0; v < a.V; ++v) sum += std::exp(A(x[v]) - m);
    static_cast<T*>(a.lse)[r] = m + std::log(sum);
    nll[r] = m + std::log(sum) - A(x[a.label[r]]);
  }
  for (int64_t b = 0; b < a.B; ++b) {
    A sum = 0;
    for (int64_t s = 0; s < std::min<int64_t>(std::max<int64_t>(a.valid_len[b], 0), a.S); ++s) sum += nll[b * a.S + s];
    static_cast<T*>(a.loss)[b] = sum / A(a.S);
  }
}

template <typename T>
void cross_entropy_backward(const CeBwdArgs& a, cudaStream_t) {
  using A = at::opmath_type<T>;
  for (int64_t r = 0; r < a.B * a.S; ++r) {
    const int64_t b = r / a.S, s = r % a.S, off = b * a.stride_b + s * a.stride_s;
    const T* x = static_cast<const T*>(a.pred) + off;
    T* g = static_cast<T*>(a.grad) + off;
    const A scale = s < a.valid_len[b] ? A(static_cast<const T*>(a.grad_loss)[b]) / A(a.S) : A(0);
    for (int64_t v = 0; v < a.V; ++v) {
      const A p = std::exp(A(x[v]) - A(static_cast<const T*>(a.lse)[r]));
      g[v] = scale * (v == a.label[r] ? p - 1 : p);
    }
  }
}

template <typename T>
void keep_mask_fill(const KeepMaskArgs& a, cudaStream_t) {
  const uint64_t seed = a.seed_ptr ? uint64_t(*a.seed_ptr) : a.seed;
  const uint64_t first = a.offset_ptr ? uint64_t(*a.offset_ptr) + a.offset_intragraph : a.offset;
  for (int64_t i = 0; i < a.n; ++i)
    static_cast<T*>(a.out)[i] = seq2seq_fast::splitmix64_high(seed, first + i) >= a.threshold ? T(a.keep) : T(0);
}

#define INST(T) \
  template void cross_entropy_forward<T>(const CeFwdArgs&, cudaStream_t); \
  template void cross_entropy_backward<T>(const CeBwdArgs&, cudaStream_t); \
  template void keep_mask_fill<T>(const KeepMaskArgs&, cudaStream_t); \
  template void gates_forward<T>(const GatesFwdArgs&, cudaStream_t); \
  template void gates_backward<T>(const GatesBwdArgs&, cudaStream_t); \
  template void attention_forward<T>(const AttnFwdArgs&, cudaStream_t); \
  template void attention_backward<T>(const AttnBwdArgs&, cudaStream_t); \
  template void embed_rows<T>(const EmbedArgs&, cudaStream_t); \
  template void greedy_step<T>(const GreedyArgs&, cudaStream_t);
INST(float)
INST(double)
INST(c10::Half)
INST(c10::BFloat16)
}
"""


EMU_CUDA = r"""// Runs CUDA kernel source on the CPU: blocks one after another, each block's threads as std::threads
// (__syncthreads and warp shuffles by barriers; __shared__ as function statics, shared by a block).
#pragma once
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
namespace emu {
struct Dim {
  unsigned x = 0;
};
struct Block {
  std::barrier<>* block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers;
  std::vector<std::array<unsigned char, 8>>* exchange;
};
inline thread_local Dim tl_thread, tl_block, tl_bdim, tl_gdim;
inline thread_local Block* tl_ctx = nullptr;

template <typename K, typename... Args>
void launch(K kernel, unsigned grid, unsigned block, Args... args) {
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bb(block);
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (unsigned w = 0; w * 32 < block; ++w) {
      wb.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - w * 32)));
    }
    std::vector<std::array<unsigned char, 8>> ex(block);
    Block ctx{&bb, &wb, &ex};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        tl_thread.x = t;
        tl_block.x = b;
        tl_bdim.x = block;
        tl_gdim.x = grid;
        tl_ctx = &ctx;
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
  }
}
}  // namespace emu
#define threadIdx emu::tl_thread
#define blockIdx emu::tl_block
#define blockDim emu::tl_bdim
#define gridDim emu::tl_gdim
inline void __syncthreads() { emu::tl_ctx->block_barrier->arrive_and_wait(); }
template <typename V>
V __shfl_xor_sync(unsigned, V v, int offset) {
  auto& ex = *emu::tl_ctx->exchange;
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  auto& bar = *(*emu::tl_ctx->warp_barriers)[warp];
  std::memcpy(ex[t].data(), &v, sizeof(V));
  bar.arrive_and_wait();
  V r;
  std::memcpy(&r, ex[warp * 32 + (lane ^ offset)].data(), sizeof(V));
  bar.arrive_and_wait();
  return r;
}
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
"""


def kernels_for_cpu(source):
    """kernels.cu with its launches ``k<T><<<grid, block, 0, stream>>>(`` as ``emu::launch(k<T>, grid, block, ``."""
    source = source.replace("#include <cuda_runtime.h>\n", "")
    source = source.replace('#include "cuda/kernels.h"\n', '#include "cuda/kernels.h"\n#include "emu_cuda.h"\n')
    source = source.replace("C10_CUDA_KERNEL_LAUNCH_CHECK();", "")
    out, i, launches = [], 0, 0
    while (j := source.find("<<<", i)) >= 0:
        k = j
        while source[k - 1] not in " \n(":
            k -= 1
        end = source.index(">>>(", j)
        parts, depth, cur = [], 0, ""
        for ch in source[j + 3:end]:
            if ch == "," and depth == 0:
                parts.append(cur.strip())
                cur = ""
                continue
            depth += ch in "(<"
            depth -= ch in ")>"
            cur += ch
        parts.append(cur.strip())
        assert len(parts) == 4, f"unexpected launch configuration {parts}"
        out.append(source[i:k] + f"emu::launch({source[k:j]}, {parts[0]}, {parts[1]}, ")
        i = end + 4
        launches += 1
    assert launches == 10, f"expected the 10 kernel launches of kernels.cu, found {launches}"
    return "".join(out) + source[i:]


def rewrite(text, used):
    for i, (pattern, replacement, regex) in enumerate(REWRITES):
        if regex:
            text, n = re.subn(pattern, replacement, text)
        else:
            n = text.count(pattern)
            text = text.replace(pattern, replacement)
        used[i] += n
    return text


def build(out, library, kernels):
    from torch.utils.cpp_extension import load

    (out / "cuda").mkdir()
    used = [0] * len(REWRITES)
    for name in ("cuda/decoder.cpp", "cuda/encoder.cpp", "cuda/loss.cpp", "cuda/linear_loss.cpp", "cuda/dropout.cpp",
                 "cuda/stream.h", "cuda/kernels.h", "checks.h", "random.h"):
        with open(os.path.join(ROOT, "csrc", name)) as f:
            text = rewrite(f.read(), used).replace("seq2seq_fast_emu,", f"{library},")
        (out / name).write_text(text)
    unused = [REWRITES[i][0] for i, n in enumerate(used) if n == 0]
    assert not unused, f"rewrites that matched nothing (update this test with the sources): {unused}"
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        ops = f.read()
    ops = ops[ops.index("TORCH_LIBRARY(seq2seq_fast, m)"):].replace(
        "TORCH_LIBRARY(seq2seq_fast, m)", f"TORCH_LIBRARY({library}, m)")
    (out / "ops_emu.cpp").write_text("#include <torch/library.h>\n" + ops)
    if kernels:
        (out / "emu_cuda.h").write_text(EMU_CUDA)
        with open(os.path.join(CUDA_DIR, "kernels.cu")) as f:
            (out / "launchers.cpp").write_text(kernels_for_cpu(f.read()))
    else:
        (out / "launchers.cpp").write_text(LAUNCHERS)
    includes = [str(out), "/usr/local/cuda/include"]
    includes += [os.path.join(p, "nvidia", sub, "include") for p in sys.path for sub in ("cu13", "cu12")
                 if os.path.isdir(os.path.join(p, "nvidia", sub, "include"))]
    sources = [str(out / n) for n in ("ops_emu.cpp", "cuda/decoder.cpp", "cuda/encoder.cpp", "cuda/loss.cpp",
                                      "cuda/linear_loss.cpp", "cuda/dropout.cpp", "launchers.cpp")]
    load(name=library, sources=sources, extra_include_paths=includes, extra_cflags=["-O1", "-std=c++20", "-pthread"],
         extra_ldflags=["-pthread"], build_directory=str(out), is_python_module=False)
    return getattr(torch.ops, library)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_contract_emulation"), "seq2seq_fast_emu", kernels=False)


@pytest.fixture(scope="module")
def emu_kernels(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_kernel_emulation"), "seq2seq_fast_emu_kernels", kernels=True)


def cuda_tests():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_cuda_ops

    return test_cuda_ops


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_decoder_host_code_matches_cpu_ops(emu, dtype):
    T = cuda_tests()
    cpu = torch.ops.seq2seq_fast
    for shape, valid, dropout in itertools.product(T.SHAPES + [(2, 5, 0, 4, 2)], ["ragged", "none"], [False, True]):
        tag = f"{T.shape_id(shape)} {valid} dropout={dropout}"
        args = T.decoder_args(shape, dtype, dropout, valid)
        expected, actual = cpu.decoder_forward(*args), emu.decoder_forward(*args)
        for name, a, e in zip(T.FORWARD_NAMES, actual, expected):
            T.assert_close(a, e, f"{tag}: {name}", dtype)
        g = torch.Generator().manual_seed(7)
        for given in ([1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]):
            grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) if m else None
                     for t, m in zip(expected[:3], given)]
            expected_grads = cpu.decoder_backward(*T.backward_args(args, expected, grads))
            actual_grads = emu.decoder_backward(*T.backward_args(args, actual, grads))
            for name, a, e in zip(T.backward_names(shape[4]), T.flat(actual_grads), T.flat(expected_grads)):
                T.assert_close(a, e, f"{tag} grads {given}: grad {name}", dtype)
        args[-1] = False
        for name, a, e in zip(T.FORWARD_NAMES[:5], emu.decoder_forward(*args), cpu.decoder_forward(*args)):
            T.assert_close(a, e, f"{tag} without activations: {name}", dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_encoder_host_code_matches_cpu_ops(emu, dtype):
    T = cuda_tests()
    cpu = torch.ops.seq2seq_fast
    for shape, dropout in itertools.product([(1, 1, 5, 1), (3, 7, 5, 2), (8, 7, 33, 3), (3, 10, 32, 2)],
                                            [False, True]):
        B, steps, H, L = shape
        args = T.encoder_args(B, steps, H, L, dtype, dropout)
        expected, actual = cpu.encoder_forward(*args), emu.encoder_forward(*args)
        for name, a, e in zip(("states", "layer_inputs", "gates"), actual, expected):
            T.assert_close(a, e, f"{shape} {name}", dtype)
        grad = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        X, params, mask, _ = args
        expected_grads = cpu.encoder_backward(grad.to(dtype), X, params, mask, *expected)
        actual_grads = emu.encoder_backward(grad.to(dtype), X, params, mask, *actual)
        for i, (a, e) in enumerate(zip(T.flat(actual_grads), T.flat(expected_grads))):
            T.assert_close(a, e, f"{shape} dropout={dropout}: gradient {i}", dtype)


def test_greedy_host_code_matches_cpu_op(emu):
    T = cuda_tests()
    cpu = torch.ops.seq2seq_fast
    for shape, bias, masks in itertools.product([(1, 1, 5, 1), (3, 7, 33, 2), (16, 6, 32, 3)],
                                                [-100.0, 0.0, 1.0, 100.0], [False, True]):
        B, steps, H, L = shape
        net = T.greedy_model(H, L, bias, torch.float64)
        for max_len, attention in itertools.product([1, 4, 5, 9, 23], [True, False]):
            args = T.greedy_args(net, B, steps, max_len, return_attention=attention, masks=masks)
            expected, actual = cpu.greedy_decode(*args), emu.greedy_decode(*args)
            tag = f"{shape} eos bias {bias} masks={masks} max_len={max_len}"
            assert torch.equal(actual[0], expected[0]), f"{tag}: tokens differ"
            assert torch.equal(actual[1], expected[1]), f"{tag}: lengths differ"
            if attention:
                T.assert_close(actual[2], expected[2], f"{tag}: attention", torch.float64)
            else:
                assert actual[2].numel() == 0


def check_loss_and_keep_mask(emu, dtype):
    """The emulated CUDA loss ops equal the CPU ops (both layouts, lengths 0 and > S, no steps), and
    the emulated keep_mask equals the CPU op bit for bit (the rewrite seeds both the same way)."""
    T = cuda_tests()
    cpu = torch.ops.seq2seq_fast
    for shape, layout in itertools.product([(1, 1, 1), (3, 4, 5), (5, 7, 70)], ["contiguous", "step-major"]):
        pred, label, valid_len, grad = T.loss_case(*shape, dtype, layout)
        tag = f"{shape} {layout}"
        expected, actual = cpu.masked_ce_loss(pred, label, valid_len), emu.masked_ce_loss(pred, label, valid_len)
        for name, a, e in zip(("loss", "lse"), actual, expected):
            T.assert_close(a, e, f"{tag}: {name}", dtype)
        e_grad = cpu.masked_ce_loss_backward(grad, pred, label, valid_len, expected[1])
        a_grad = emu.masked_ce_loss_backward(grad, pred, label, valid_len, actual[1])
        T.assert_close(a_grad, e_grad, f"{tag}: grad_pred", dtype)
        assert a_grad.stride() == e_grad.stride(), f"{tag}: the gradient keeps the logits' layout"
    empty = emu.masked_ce_loss(torch.zeros(2, 0, 3, dtype=dtype), torch.zeros(2, 0, dtype=torch.long),
                               torch.tensor([0, 1]))[0]
    assert torch.isnan(empty).all(), "no steps: NaN, as d2l"
    with pytest.raises(IndexError, match="label holds token id 70"):  # V = 70
        emu.masked_ce_loss(pred, torch.full_like(label, 70), valid_len)
    like = torch.zeros((), dtype=dtype)
    for shape, p in (((7, 9), 0.3), ((1000,), 0.5), ((3, 5, 11), 0.0)):
        torch.manual_seed(5)
        expected = cpu.keep_mask(like, shape, p)
        torch.manual_seed(5)
        assert torch.equal(emu.keep_mask(like, shape, p), expected), f"keep_mask {shape} p={p}"
    assert torch.count_nonzero(emu.keep_mask(like, (4, 4), 1.0)) == 0
    with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\]"):
        emu.keep_mask(like, (3,), 1.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_loss_and_keep_mask_host_code_match_cpu_ops(emu, dtype):
    check_loss_and_keep_mask(emu, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_linear_loss_host_code_matches_cpu_op(emu, dtype):
    """The CUDA fused output layer + loss (ATen row ops on chunks) equals the CPU op: loss, lse and
    every gradient, made in the forward and recomputed, both layouts, chunks around the row count."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_cpp_linear_loss import SHAPES, case

    cpu = torch.ops.seq2seq_fast
    for (B, S, H, V, chunk), layout in itertools.product(SHAPES + [(3, 0, 4, 5, 2)], ["contiguous", "step-major"]):
        hidden, weight, bias, label, valid_len = (t.detach() for t in case(B, S, H, V, dtype, layout))
        tag = f"B{B}-S{S}-H{H}-V{V}-chunk{chunk} {layout}"
        expected = cpu.linear_masked_ce(hidden, weight, bias, label, valid_len, chunk, True)
        actual = emu.linear_masked_ce(hidden, weight, bias, label, valid_len, chunk, True)
        names = ("loss", "lse", "grad_hidden", "grad_weight", "grad_bias")
        for name, a, e in zip(names, actual, expected):
            torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{tag}: {name}: {m}")
        assert actual[2].stride() == expected[2].stride(), f"{tag}: grad_hidden keeps hidden's layout"
        grad = torch.randn(B, dtype=dtype)
        e_grads = cpu.linear_masked_ce_backward(grad, hidden, weight, bias, label, valid_len, expected[1], chunk)
        a_grads = emu.linear_masked_ce_backward(grad, hidden, weight, bias, label, valid_len, actual[1], chunk)
        for name, a, e in zip(names[2:], a_grads, e_grads):
            torch.testing.assert_close(a, e, msg=lambda m: f"{tag} backward: {name}: {m}")
        without = emu.linear_masked_ce(hidden, weight, bias, label, valid_len, chunk, False)
        torch.testing.assert_close(without[0], expected[0], equal_nan=True)
        assert all(t.shape == (0,) for t in without[2:])
    hidden, weight, bias, label, valid_len = (t.detach() for t in case(3, 4, 5, 7, dtype, "contiguous"))
    with pytest.raises(IndexError, match="label holds token id 7"):
        emu.linear_masked_ce(hidden, weight, bias, torch.full_like(label, 7), valid_len, 2, False)


def test_loss_and_keep_mask_kernels_run_on_cpu_threads_match_cpu_ops(emu_kernels):
    check_loss_and_keep_mask(emu_kernels, torch.float64)


def test_kernels_run_on_cpu_threads_match_cpu_ops(emu_kernels):
    T = cuda_tests()
    cpu = torch.ops.seq2seq_fast
    for shape, dtype in (((3, 7, 5, 5, 2), torch.float64), ((8, 33, 3, 33, 3), torch.float64),
                         ((2, 5, 0, 4, 2), torch.float64), ((3, 7, 4, 32, 2), torch.float32)):
        args = T.decoder_args(shape, dtype, dropout=True)
        expected, actual = cpu.decoder_forward(*args), emu_kernels.decoder_forward(*args)
        for name, a, e in zip(T.FORWARD_NAMES, actual, expected):
            T.assert_close(a, e, f"{T.shape_id(shape)}: {name}", dtype)
        g = torch.Generator().manual_seed(7)
        grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in expected[:3]]
        expected_grads = cpu.decoder_backward(*T.backward_args(args, expected, grads))
        actual_grads = emu_kernels.decoder_backward(*T.backward_args(args, actual, grads))
        for name, a, e in zip(T.backward_names(shape[4]), T.flat(actual_grads), T.flat(expected_grads)):
            T.assert_close(a, e, f"{T.shape_id(shape)}: grad {name}", dtype)
    args = T.encoder_args(3, 7, 33, 2, torch.float64, dropout=True)
    expected, actual = cpu.encoder_forward(*args), emu_kernels.encoder_forward(*args)
    for name, a, e in zip(("states", "layer_inputs", "gates"), actual, expected):
        T.assert_close(a, e, f"encoder {name}", torch.float64)
    grad = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    X, params, mask, _ = args
    expected_grads = cpu.encoder_backward(grad, X, params, mask, *expected)
    actual_grads = emu_kernels.encoder_backward(grad, X, params, mask, *actual)
    for i, (a, e) in enumerate(zip(T.flat(actual_grads), T.flat(expected_grads))):
        T.assert_close(a, e, f"encoder gradient {i}", torch.float64)
    for bias in (1.0, 100.0):
        net = T.greedy_model(32, 2, bias, torch.float64)
        args = T.greedy_args(net, 5, 6, 9, masks=True)
        expected, actual = cpu.greedy_decode(*args), emu_kernels.greedy_decode(*args)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1]), f"greedy bias {bias}"
        T.assert_close(actual[2], expected[2], f"greedy bias {bias}: attention", torch.float64)
