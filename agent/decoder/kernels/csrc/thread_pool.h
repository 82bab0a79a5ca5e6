// A work-claiming thread pool that never waits for a thread that has not started.
//
// Why not OpenMP (at::parallel_for): its fork/join ends in a barrier that every thread of
// the team must reach. On a small machine shared with other work (speech models, other
// requests) a helper thread is often descheduled, and each of the ~200 matmuls of a decode
// step then waits a scheduler time slice for it: decode ran 10x slower with 2 threads
// than with 1. Here the calling thread and the helpers claim chunks from one atomic
// counter; the caller waits only for chunks a helper has already claimed. A helper that
// is late simply finds nothing left to do.
//
// Claims take an eighth of what is left per thread (at least one chunk): the output
// head's 3,072 chunks per call each cost an atomic on a cache line both cores write, and
// one chunk per claim made that call 1.2x slower at 8 rows; the last claims are still
// single chunks, so the threads finish together.
//
// Helpers spin briefly after a job (decode steps come back to back), then sleep on a
// condition variable.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NF4_PAUSE() _mm_pause()
#else
#define NF4_PAUSE() std::this_thread::yield()
#endif

namespace nf4 {

class ThreadPool {
 public:
  explicit ThreadPool(int helpers) {
    for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { helper_loop(); });
    for (auto& t : threads_) t.detach();  // the pool lives as long as the process
  }

  int size() const { return int(threads_.size()) + 1; }

  // Calls fn(chunk) for every chunk in [0, n_chunks), spread over the caller and helpers.
  template <class Fn>
  void run(int64_t n_chunks, const Fn& fn) {
    if (n_chunks <= 0) return;
    // One job at a time: a concurrent or nested caller runs its chunks itself.
    if (n_chunks == 1 || threads_.empty() || busy_.exchange(true, std::memory_order_acquire)) {
      for (int64_t i = 0; i < n_chunks; ++i) fn(i);
      return;
    }
    // Generations advance by two per job: odd while the job is being written (nothing
    // claimable, so no helper reads half-written fields), even once it is open.
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 2;
    state_.store(((gen - 1) << 32) | 0xFFFFFFFFu, std::memory_order_seq_cst);
    call_ = [](const void* ctx, int64_t i) { (*static_cast<const Fn*>(ctx))(i); };
    ctx_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    n_chunks_.store(n_chunks, std::memory_order_relaxed);
    state_.store(gen << 32, std::memory_order_seq_cst);  // open the job
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    int64_t mine = 0;
    int64_t first, last;
    while (claim(gen, &first, &last)) {
      for (int64_t c = first; c < last; ++c) fn(c);
      mine += last - first;
    }
    done_.fetch_add(mine, std::memory_order_acq_rel);
    while (done_.load(std::memory_order_acquire) < n_chunks) NF4_PAUSE();
    busy_.store(false, std::memory_order_release);
  }

 private:
  // Takes the next chunks of job `gen` ([*first, *last)); false when the job is exhausted
  // or superseded.
  bool claim(uint64_t gen, int64_t* first, int64_t* last) {
    uint64_t s = state_.load(std::memory_order_acquire);
    const int64_t n = n_chunks_.load(std::memory_order_acquire);
    while ((s >> 32) == gen) {
      const int64_t index = int64_t(s & 0xFFFFFFFFu);
      if (index >= n) return false;
      const int64_t take = std::max<int64_t>(1, (n - index) / (4 * size()));
      if (state_.compare_exchange_weak(s, s + uint64_t(take), std::memory_order_acq_rel)) {
        *first = index;
        *last = std::min(n, index + take);
        return true;
      }
    }
    return false;
  }

  void helper_loop() {
    uint64_t finished_gen = 0;
    auto idle_since = std::chrono::steady_clock::now();
    for (uint64_t spins = 0;; ++spins) {
      const uint64_t gen = state_.load(std::memory_order_acquire) >> 32;
      if (gen != finished_gen && (gen & 1) == 0) {
        int64_t first, last, mine = 0;
        while (claim(gen, &first, &last)) {
          // stable: the caller waits for these chunks before moving on
          for (int64_t c = first; c < last; ++c) call_(ctx_, c);
          mine += last - first;
        }
        if (mine) done_.fetch_add(mine, std::memory_order_acq_rel);
        finished_gen = gen;
        idle_since = std::chrono::steady_clock::now();
        continue;
      }
      NF4_PAUSE();
      if ((spins & 255) != 0) continue;
      if (std::chrono::steady_clock::now() - idle_since < std::chrono::microseconds(200)) {
        continue;
      }
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] {
          return (state_.load(std::memory_order_seq_cst) >> 32) != finished_gen;
        });
      }
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::vector<std::thread> threads_;
  void (*call_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  std::atomic<uint64_t> state_{0};  // generation << 32 | next chunk index
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> busy_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace nf4
