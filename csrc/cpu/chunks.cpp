// Implementation of csrc/cpu/chunks.h: one pool of workers, one call at a time.
#include "cpu/chunks.h"

#include <ATen/Parallel.h>
#include <pthread.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <tuple>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gemm_precision.h"

// MKL's per-thread thread count (its C entry point; the lowercase names are the Fortran ones,
// which take a pointer), exported by libtorch_cpu on x86-64 builds. Weak: torch builds without
// MKL leave it null.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace seq2seq_fast::cpu {
namespace {

thread_local bool in_task = false;
thread_local int pool_threads = 0;  // set by CallerOnly: the thread count its call splits over
std::atomic<int> set_threads{0};   // set_cpu_threads's count; 0: torch's
std::atomic<bool> row_split{false};  // set_cpu_row_split's setting

// The calling thread's OpenMP and MKL thread counts set to 1 (returning the previous ones) and
// restored.
std::pair<int, int> serial_blas() {
  std::pair<int, int> previous{1, 0};
#ifdef _OPENMP
  previous.first = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  if (MKL_Set_Num_Threads_Local != nullptr) {
    previous.second = MKL_Set_Num_Threads_Local(1);
  }
  return previous;
}

void restore_blas(std::pair<int, int> previous) {
#ifdef _OPENMP
  omp_set_num_threads(previous.first);
#endif
  if (MKL_Set_Num_Threads_Local != nullptr) {
    MKL_Set_Num_Threads_Local(previous.second);  // 0: back to MKL's global setting
  }
}

// While a thread runs tasks: its BLAS and OpenMP work runs on it alone (the other threads are
// busy with their own chunks), and nested run_chunks calls run inline.
class InTask {
 public:
  InTask() : previous_(serial_blas()) { in_task = true; }
  ~InTask() {
    in_task = false;
    restore_blas(previous_);
  }

 private:
  std::pair<int, int> previous_;
};

// One iteration of a polling loop: tells the core (and a hyperthread sibling) that it waits.
inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long a worker that finished its chunks, and a caller whose chunks are done, poll before
// sleeping on the condition variable. A step loop starts its next region within microseconds
// (a decoder step makes several), and waking a sleeping thread costs a futex call and, on a VM,
// an inter-processor interrupt: tens of microseconds on the caller's path, per region. Polling
// this briefly catches the loop's regions; between calls from Python the workers sleep.
std::chrono::nanoseconds poll_time() {
  static const std::chrono::nanoseconds poll = [] {
    const char* flag = std::getenv("SEQ2SEQ_FAST_POLL_US");  // 0: sleep at once (to compare)
    return std::chrono::microseconds(flag == nullptr ? 50 : std::max(0, std::atoi(flag)));
  }();
  return poll;
}

// Polls `done()` until it holds or poll_time() has passed; returns whether it holds.
template <typename Done>
bool poll_until(const Done& done) {
  const auto until = std::chrono::steady_clock::now() + poll_time();
  for (int i = 1;; ++i) {
    if (done()) {
      return true;
    }
    if (i % 16 == 0 && std::chrono::steady_clock::now() >= until) {
      return false;
    }
    relax();
  }
}

class Pool {
 public:
  void run(int64_t count, int workers_wanted, c10::function_ref<void(int64_t)> task) {
    bool sleepers = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_) < workers_wanted) {
        std::thread([this] { work(); }).detach();  // the pool lives as long as the process
        ++workers_;
      }
      task_ = &task;
      count_ = count;
      next_.store(0);
      seats_ = workers_wanted;
      bf16_gemm_ = bf16_gemm_enabled();
      error_ = nullptr;
      // Workers poll after this call only if no BLAS call threaded itself since the previous one:
      // a step loop alternating its regions with the BLAS's own threads (a large float32 model's
      // GEMMs) would have them poll on the core the BLAS's team wants.
      const uint64_t parks = parks_.load(std::memory_order_relaxed);
      poll_after_ = parks == parks_at_last_call_;
      parks_at_last_call_ = parks;
      generation_.fetch_add(1, std::memory_order_release);
      sleepers = sleeping_ > 0;
    }
    if (sleepers) {  // polling workers see the generation change by themselves
      wake_.notify_all();
    }
    claim_and_run();
    std::unique_lock<std::mutex> lock(mutex_);
    seats_ = 0;  // a worker arriving from now on finds no seat and goes back to waiting
    if (active_.load(std::memory_order_acquire) != 0) {
      lock.unlock();
      poll_until([this] { return active_.load(std::memory_order_acquire) == 0; });
      lock.lock();
      idle_.wait(lock, [this] { return active_.load(std::memory_order_acquire) == 0; });
    }
    task_ = nullptr;
    if (error_) {
      std::rethrow_exception(error_);
    }
  }

  // Polling workers stop polling and sleep (see yield_cores).
  void park() { parks_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void claim_and_run() {
    InTask scope;
    const Bf16GemmScope precision(bf16_gemm_);  // the caller's, for workers
    const c10::function_ref<void(int64_t)>& task = *task_;
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) {
      try {
        task(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) {
          error_ = std::current_exception();
        }
        next_.store(count_);  // the remaining chunks are not started
      }
    }
  }

  void work() {
    uint64_t seen = 0, parks = 0;
    bool poll = false;
    auto called = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    auto parked = [&] { return parks_.load(std::memory_order_relaxed) != parks; };
    for (;;) {
      // `parks` was read when the worker joined its last call: a park its caller made right after
      // that call (the next thing it runs is a BLAS call) ends the polling at once.
      const bool early = poll && poll_until([&] { return called() || parked(); }) && called();
      std::unique_lock<std::mutex> lock(mutex_);
      if (!early) {
        ++sleeping_;
        wake_.wait(lock, called);
        --sleeping_;
      }
      seen = generation_.load(std::memory_order_relaxed);
      if (seats_ == 0) {
        continue;
      }
      --seats_;
      active_.fetch_add(1, std::memory_order_relaxed);
      parks = parks_.load(std::memory_order_relaxed);
      poll = poll_after_;
      lock.unlock();
      claim_and_run();
      lock.lock();
      if (active_.fetch_sub(1, std::memory_order_release) == 1) {
        idle_.notify_all();  // no system call when the caller is still polling
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  size_t workers_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> parks_{0};
  uint64_t parks_at_last_call_ = 0;
  bool poll_after_ = false;
  int seats_ = 0, sleeping_ = 0;  // workers that may still join the call; workers asleep
  std::atomic<int> active_{0};    // workers in the call
  bool bf16_gemm_ = false;        // the caller's GEMM precision (csrc/gemm_precision.h)
  const c10::function_ref<void(int64_t)>* task_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

// The threads the calling thread's BLAS and OpenMP work would use.
int call_blas_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The threads a call splits over: its CallerOnly scope's, else set_cpu_threads's, else torch's.
int call_threads() {
  if (pool_threads > 0) {
    return pool_threads;
  }
  const int set = set_threads.load(std::memory_order_relaxed);
  return set > 0 ? set : at::get_num_threads();
}

// One caller at a time uses the pool; a second runs its chunks inline.
std::mutex caller_mutex;
Pool* pool = nullptr;

Pool& the_pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    pool = new Pool();
    // A forked child has none of the workers and maybe a mutex held by one: it starts afresh.
    pthread_atfork(nullptr, nullptr, [] {
      pool = new Pool();
      new (&caller_mutex) std::mutex();
    });
  });
  return *pool;
}

}  // namespace

CallerOnly::CallerOnly(bool enabled) : enabled_(enabled) {
  if (!enabled_) {
    return;
  }
  pool_threads_ = pool_threads;
  pool_threads = call_threads();
  std::tie(omp_threads_, mkl_threads_) = serial_blas();
}

CallerOnly::~CallerOnly() {
  if (!enabled_) {
    return;
  }
  pool_threads = pool_threads_;
  restore_blas({omp_threads_, mkl_threads_});
}

int64_t chunk_threads() { return call_threads(); }

void yield_cores() {
  if (!in_task && call_blas_threads() > 1) {
    the_pool().park();
  }
}

bool row_split_enabled() { return row_split.load(std::memory_order_relaxed); }

bool set_row_split(bool enabled) { return row_split.exchange(enabled); }

int64_t set_cpu_threads(int64_t threads) {
  TORCH_CHECK_VALUE(threads >= 0 && threads <= 4096, "seq2seq_fast: threads must be in [0, 4096] (0: torch's count), got ",
                    threads);
  return set_threads.exchange(static_cast<int>(threads));
}

void run_chunks(int64_t count, c10::function_ref<void(int64_t)> task) {
  const int threads = call_threads();
  std::unique_lock<std::mutex> caller(caller_mutex, std::defer_lock);
  if (count < 2 || threads < 2 || in_task || !caller.try_lock()) {
    for (int64_t i = 0; i < count; ++i) {
      task(i);
    }
    return;
  }
  the_pool().run(count, static_cast<int>(std::min<int64_t>(threads - 1, count - 1)), task);
}

}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CompositeExplicitAutograd, m) {
  m.impl("set_cpu_threads", &seq2seq_fast::cpu::set_cpu_threads);
  m.impl("set_cpu_row_split", &seq2seq_fast::cpu::set_row_split);
}
