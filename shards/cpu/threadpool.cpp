#include "threadpool.h"

#include <chrono>
#include <cstdlib>

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

void ThreadPool::run_items(int thread_index) {
  tls_in_loop = true;
  tls_thread_index = thread_index;
  for (;;) {
    if (failed_.load(std::memory_order_relaxed)) break;
    const int64_t item = next_item_.fetch_add(1, std::memory_order_relaxed);
    if (item >= num_items_) break;
    try {
      (*fn_)(item, thread_index);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!failed_.exchange(true)) error_ = std::current_exception();
    }
  }
  tls_in_loop = false;
}

void ThreadPool::worker_main(int thread_index) {
  uint64_t seen = 0;
  for (;;) {
    auto has_work = [&] { return stopping_.load() || generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(has_work)) {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, has_work);
    }
    if (stopping_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    run_items(thread_index);
    if (busy_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_one();
    }
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
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    num_items_ = num_items;
    next_item_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    busy_workers_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  work_cv_.notify_all();
  run_items(0);
  auto all_done = [&] { return busy_workers_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, all_done);
  }
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = nullptr;
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace em::cpu
