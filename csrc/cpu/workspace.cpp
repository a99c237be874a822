// The block cache of csrc/cpu/workspace.h: a c10::Allocator whose freed blocks wait, by size
// class, for the next allocation of their class (or of one up to half their size).
#include "cpu/workspace.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/weight_cache.h"

namespace seq2seq_fast::cpu {
namespace {

// Below this, torch's allocator (malloc's heap) is served without fresh pages anyway.
constexpr size_t kMinCachedBytes = size_t(64) << 10;
constexpr size_t kAlignment = 64;

// Rounds up to a class m * 2^k with m in [8, 16): at most 12.5 % of a block goes unused, and
// a buffer whose size wobbles a little between calls still finds its block.
size_t size_class(size_t n) {
  size_t shift = 0;
  while ((n >> shift) >= 16) {
    ++shift;
  }
  size_t m = (n + (size_t(1) << shift) - 1) >> shift;
  return m << shift;
}

size_t capacity_from_env() {
  const char* text = std::getenv("SEQ2SEQ_FAST_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') {
    return size_t(512) << 20;
  }
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(end != text && *end == '\0' && mb >= 0,
                    "seq2seq_fast: SEQ2SEQ_FAST_CPU_CACHE_MB must be a number of megabytes >= 0, got '", text, "'");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* data;
  size_t bytes;
};

class BlockCache final : public c10::Allocator {
 public:
  BlockCache() : capacity_(capacity_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes || capacity_ == 0) {
      return c10::GetCPUAllocator()->allocate(n);
    }
    const size_t bytes = size_class(n);
    Block* block = take(bytes);
    if (block == nullptr) {
      void* data = nullptr;
      if (posix_memalign(&data, kAlignment, bytes) != 0) {
        release_cached_blocks();  // maybe the cache holds what the system lacks
        TORCH_CHECK(posix_memalign(&data, kAlignment, bytes) == 0, "seq2seq_fast: out of memory allocating ",
                    bytes, " bytes");
      }
      block = new Block{data, bytes};
    }
    return {block->data, block, &BlockCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release_all() {
    std::vector<Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : free_) {
        blocks.insert(blocks.end(), entry.second.begin(), entry.second.end());
      }
      free_.clear();
      cached_ = 0;
    }
    int64_t bytes = 0;
    for (Block* block : blocks) {
      bytes += static_cast<int64_t>(block->bytes);
      destroy(block);
    }
    return bytes;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  static BlockCache& instance();

 private:
  static void give_back(void* ctx) {
    instance().keep(static_cast<Block*>(ctx));
  }

  static void destroy(Block* block) {
    std::free(block->data);
    delete block;
  }

  // The smallest cached block of the class or up to twice its size: a block that one phase of a
  // training step freed (the forward's scratch) serves the next phase's buffers of other sizes
  // instead of waiting beside them for its own class.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.lower_bound(bytes); it != free_.end() && it->first <= 2 * bytes; ++it) {
      if (!it->second.empty()) {
        Block* block = it->second.back();
        it->second.pop_back();
        cached_ -= block->bytes;
        return block;
      }
    }
    return nullptr;
  }

  void keep(Block* block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + block->bytes <= capacity_) {
        free_[block->bytes].push_back(block);
        cached_ += block->bytes;
        return;
      }
    }
    destroy(block);
  }

  const size_t capacity_;
  std::mutex mutex_;
  std::map<size_t, std::vector<Block*>> free_;  // by block size
  size_t cached_ = 0;
};

BlockCache& BlockCache::instance() {
  // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
  static BlockCache* cache = new BlockCache();
  return *cache;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "seq2seq_fast: cpu::empty makes CPU tensors");
  return at::detail::empty_generic(sizes, &BlockCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // memset, not zero_(): ATen's fill splits large tensors over an OpenMP team (see chunks.h).
  at::Tensor t = empty(sizes, options);
  std::memset(t.data_ptr(), 0, t.nbytes());
  return t;
}

int64_t release_cached_blocks() { return BlockCache::instance().release_all(); }

int64_t cached_bytes() { return BlockCache::instance().cached(); }

namespace {

// The ops cpu_cache_bytes and release_cpu_cache: the cached blocks and the derived weights
// (csrc/cpu/weight_cache.h), released first so that their blocks are among those freed.
int64_t cpu_cache_bytes() { return cached_bytes() + derived_weight_bytes(); }

int64_t release_cpu_cache() {
  const int64_t held = cpu_cache_bytes();
  release_derived_weights();
  release_cached_blocks();
  return held;
}

}  // namespace

}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_bytes", &seq2seq_fast::cpu::cpu_cache_bytes);
  m.impl("release_cpu_cache", &seq2seq_fast::cpu::release_cpu_cache);
}
