// Persistent worker pool. Workers spin briefly after a job (a layer is usually
// followed by another within microseconds), then sleep on a condition variable.
#include "slmkern/threadpool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace slmkern {
namespace {

constexpr int kSpinIters = 4000;

std::atomic<bool> g_keep_warm{false};  // set_pool_keep_warm: helpers spin instead of sleeping between jobs

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      state_.store(((state_.load() >> 8) + 1) << 8, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> call_guard(call_mu_);
    const int helpers = static_cast<int>(std::min<int64_t>({n_threads - 1, n_tasks - 1, 255}));
    while (static_cast<int>(workers_.size()) < helpers) {
      const int id = static_cast<int>(workers_.size());
      const uint64_t gen = state_.load(std::memory_order_relaxed) >> 8;  // the job after this one is new to it
      workers_.emplace_back([this, id, gen] { worker(id, gen); });
    }
    job_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    {
      // Generation and helper count travel in one word, so a worker that wakes
      // late never mixes one job's helper count with another job's generation.
      std::lock_guard<std::mutex> g(mu_);
      const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 8) + 1;
      join_.store((gen & 0xffffffffu) << 32, std::memory_order_relaxed);
      state_.store((gen << 8) | static_cast<uint64_t>(helpers), std::memory_order_release);
    }
    cv_.notify_all();
    drain();
    // Close the job: helpers that have not joined by now never will (on a busy
    // machine a sleeping helper may wake long after the work is gone), so wait
    // only for the ones that did.
    const uint64_t joined = join_.fetch_or(kClosed, std::memory_order_acq_rel) & kCountMask;
    for (int i = 0; static_cast<uint64_t>(done_.load(std::memory_order_acquire)) != joined; ++i) {
      if (i < kSpinIters * 4) {
        cpu_relax();
      } else {
        std::unique_lock<std::mutex> l(mu_);
        done_cv_.wait(l, [&] { return static_cast<uint64_t>(done_.load(std::memory_order_acquire)) == joined; });
      }
    }
    job_ = nullptr;
  }

 private:
  void drain() {
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks_) return;
      (*job_)(t);
    }
  }

  // Join job `gen` unless it is already closed (or superseded).
  bool try_join(uint64_t gen) {
    uint64_t j = join_.load(std::memory_order_acquire);
    for (;;) {
      if ((j >> 32) != (gen & 0xffffffffu) || (j & kClosed)) return false;
      if (join_.compare_exchange_weak(j, j + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
    }
  }

  void worker(int id, uint64_t seen) {
    for (;;) {
      uint64_t st = state_.load(std::memory_order_acquire);
      for (int spins = 0; (st >> 8) == seen && (spins < kSpinIters || g_keep_warm.load(std::memory_order_relaxed));
           ++spins) {
        cpu_relax();
        st = state_.load(std::memory_order_acquire);
      }
      if ((st >> 8) == seen) {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return (state_.load(std::memory_order_acquire) >> 8) != seen; });
        st = state_.load(std::memory_order_acquire);
      }
      seen = st >> 8;
      if (stop_) return;
      if (id < static_cast<int>(st & 0xff) && try_join(seen)) {
        drain();
        done_.fetch_add(1, std::memory_order_acq_rel);
        { std::lock_guard<std::mutex> g(mu_); }
        done_cv_.notify_one();
      }
    }
  }

  std::mutex call_mu_;  // one parallel region at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::atomic<uint64_t> state_{0};  // (generation << 8) | helpers of that generation
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  static constexpr uint64_t kClosed = 1ull << 31;
  static constexpr uint64_t kCountMask = kClosed - 1;
  std::atomic<uint64_t> join_{0};  // (generation << 32) | closed bit | helpers that joined
  std::atomic<int> done_{0};       // joined helpers that finished
  bool stop_ = false;
};

Pool* g_pool = nullptr;
std::once_flag g_pool_once;

// A forked child has none of the parent's threads: give it a fresh pool and
// deliberately leak the old one (its mutexes may be held by vanished threads).
void reset_after_fork() { g_pool = new Pool(); }

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();  // never destroyed: workers may outlive static destructors at exit
    pthread_atfork(nullptr, nullptr, reset_after_fork);
  });
  return *g_pool;
}

}  // namespace

void set_pool_keep_warm(bool on) {
  g_keep_warm.store(on, std::memory_order_relaxed);
  if (!on) return;
  // Wake sleeping helpers now (an empty job), so the first kernel call of the warm stretch finds them spinning.
  pool().run(1, 1, [](int64_t) {});   // a job with no helpers: sleepers wake, see it, and spin
}

void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  if (n_threads <= 1 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  pool().run(n_tasks, n_threads, fn);
}

void parallel_chunks(int64_t n, int n_threads, int64_t align,
                     const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t units = ceil_div(n, align);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n_threads, units));
  parallel_for(parts, static_cast<int>(parts), [&](int64_t p) {
    const int64_t u0 = units * p / parts, u1 = units * (p + 1) / parts;
    const int64_t b = u0 * align, e = std::min(n, u1 * align);
    if (b < e) fn(b, e);
  });
}

}  // namespace slmkern
