// The CPU ops' own work sharing: chunks of a call claimed one at a time by the calling thread and
// this package's worker threads, which poll briefly after a call for the next and then sleep.
//
// Why not at::parallel_for (OpenMP): an OpenMP region ends at a barrier that every thread of its
// team must reach, each having started. On a busy machine a team thread that shares its core
// with another process starts a time slice late (milliseconds) and the whole call waits for it,
// at every region; and between regions the team spins, taking the core from the caller's own
// Python. Here a worker that has not started when the caller claims the last chunk takes none,
// so the caller waits at most for the chunks already running. The workers poll only for the
// next region of a step loop (csrc/cpu/chunks.cpp: 50 us, SEQ2SEQ_FAST_POLL_US) and only where no
// BLAS team took turns with them, then sleep: between Python calls nobody spins.
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace seq2seq_fast::cpu {

// Runs task(i) once for every i in [0, count), on the calling thread and at most
// N - 1 workers, N = set_cpu_threads's count, else at::get_num_threads() (before a CallerOnly
// scope, inside one), and returns when all have run (rethrowing the first
// exception a task raised). Inside a task the BLAS and at::parallel_for run single-threaded.
// Runs inline when one thread is set, when count < 2, and when called from a task or while
// another thread's call is running.
void run_chunks(int64_t count, c10::function_ref<void(int64_t)> task);

// Before work that threads itself (the BLAS's OpenMP team): the pool's workers, which poll
// for a while after a call for the next one, sleep at once instead of taking a core from it.
void yield_cores();

// The threads run_chunks splits a call over now.
int64_t chunk_threads();

// The threads run_chunks splits over from now on, whatever torch's own count (0: torch's count,
// at::get_num_threads()); returns the previous setting. The op set_cpu_threads (csrc/ops.cpp).
int64_t set_cpu_threads(int64_t threads);

// Whether the step loops split their rows over the threads (for_row_chunks, csrc/cpu/loop.h),
// and setting it (the op set_cpu_row_split): returns the previous setting. Process-wide, off by
// default.
bool row_split_enabled();
bool set_row_split(bool enabled);

// For the lifetime of a call on a small model (when `enabled`): the BLAS calls and the ATen
// work (copies, fills) the calling thread starts run on it alone, and only run_chunks spreads
// work over threads. Their OpenMP teams would make the call wait at each region for threads
// that a busy machine starts late, for GEMMs of a few hundred microseconds at most.
class CallerOnly {
 public:
  explicit CallerOnly(bool enabled);
  ~CallerOnly();
  CallerOnly(const CallerOnly&) = delete;
  CallerOnly& operator=(const CallerOnly&) = delete;

 private:
  bool enabled_;
  int omp_threads_ = 1, mkl_threads_ = 0, pool_threads_ = 0;
};

// Runs task(i) for every i in [0, count): by run_chunks when `spread` (independent pieces of a
// small model's work, e.g. a backward's weight-gradient GEMMs), else in order on the calling
// thread, whose BLAS calls then split each large GEMM over the BLAS's own threads (a task's
// run single-threaded: pieces of unequal size would leave threads idle).
inline void run_tasks(int64_t count, bool spread, c10::function_ref<void(int64_t)> task) {
  if (spread) {
    run_chunks(count, task);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    task(i);
  }
}

// f(begin, end) over [0, n) in pieces of `grain` items (the last shorter), by run_chunks.
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f) {
  grain = grain < 1 ? 1 : grain;
  run_chunks((n + grain - 1) / grain, [&](int64_t i) {
    const int64_t begin = i * grain;
    f(begin, begin + grain < n ? begin + grain : n);
  });
}

}  // namespace seq2seq_fast::cpu
