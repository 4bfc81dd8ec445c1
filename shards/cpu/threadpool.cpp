#include "threadpool.h"

#include <chrono>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace em::cpu {

namespace {

// Set while a thread runs items, so nested parallel_for calls run inline (on the same
// thread index, so per-thread scratch stays private).
thread_local bool tls_in_loop = false;
thread_local int tls_thread_index = 0;

constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until done() or kSpin has passed; returns done().
template <typename Done>
bool spin_until(Done done) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (done()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return done();
  }
}

}  // namespace

int default_num_threads() {
  if (const char* env = std::getenv("EM_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

ThreadPool::ThreadPool(int num_threads) : num_threads_(num_threads > 0 ? num_threads : 1) {
  workers_.reserve(static_cast<size_t>(num_threads_ - 1));
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] { worker_main(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

namespace {
inline uint32_t generation_of(uint64_t work) { return static_cast<uint32_t>(work >> 32); }
inline int64_t item_of(uint64_t work) { return static_cast<int64_t>(work & 0xffffffffu); }
}  // namespace

void ThreadPool::run_items(uint32_t generation, int thread_index) {
  tls_in_loop = true;
  tls_thread_index = thread_index;
  const Job& job = jobs_[generation & 1];
  for (;;) {
    uint64_t w = work_.load(std::memory_order_acquire);
    int64_t item = -1;
    while (generation_of(w) == generation) {
      // The size read here is this loop's whenever the claim below succeeds: the next loop
      // that reuses this slot is set up only after this loop's generation is gone from work_.
      if (item_of(w) >= job.num_items.load(std::memory_order_relaxed)) break;
      if (work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        item = item_of(w);
        break;
      }
    }
    if (item < 0) break;
    if (!failed_.load(std::memory_order_relaxed)) {  // after a failure the rest are skipped
      try {
        (*job.fn.load(std::memory_order_relaxed))(item, thread_index);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!failed_.exchange(true)) error_ = std::current_exception();
      }
    }
    if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == job.num_items.load(std::memory_order_relaxed)) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_all();
    }
  }
  tls_in_loop = false;
}

void ThreadPool::worker_main(int thread_index) {
  uint32_t seen = 0;
  for (;;) {
    auto has_work = [&] {
      return stopping_.load() || generation_of(work_.load(std::memory_order_acquire)) != seen;
    };
    if (!spin_until(has_work)) {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, has_work);
    }
    if (stopping_.load()) return;
    seen = generation_of(work_.load(std::memory_order_acquire));
    run_items(seen, thread_index);
  }
}

void ThreadPool::parallel_for(int64_t num_items, const ItemFn& fn) {
  if (num_items <= 0) return;
  if (tls_in_loop) {
    for (int64_t i = 0; i < num_items; ++i) fn(i, tls_thread_index);
    return;
  }
  std::lock_guard<std::mutex> loop_lock(loop_mu_);
  if (num_threads_ == 1 || num_items == 1) {
    struct InLoop {  // marks this thread as inside a loop, also when fn throws
      InLoop() { tls_in_loop = true, tls_thread_index = 0; }
      ~InLoop() { tls_in_loop = false; }
    } in_loop;
    for (int64_t i = 0; i < num_items; ++i) fn(i, 0);
    return;
  }
  if (num_items > 0xffffffffLL) throw std::length_error("ThreadPool::parallel_for: more than 2^32 - 1 items");
  const uint32_t generation = generation_of(work_.load(std::memory_order_relaxed)) + 1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Job& job = jobs_[generation & 1];
    job.fn.store(&fn, std::memory_order_relaxed);
    job.num_items.store(num_items, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    work_.store(static_cast<uint64_t>(generation) << 32, std::memory_order_release);  // publishes the above
  }
  work_cv_.notify_all();
  run_items(generation, 0);
  auto all_done = [&] { return done_.load(std::memory_order_acquire) == num_items; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, all_done);
  }
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(mu_);
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace em::cpu
