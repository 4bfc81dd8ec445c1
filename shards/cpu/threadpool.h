// A fixed pool of worker threads for data-parallel loops over work items.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace em::cpu {

class ThreadPool {
 public:
  using ItemFn = std::function<void(int64_t item, int thread_index)>;

  // num_threads counts the calling thread: 1 means no workers.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs fn(item, thread_index) for every item in [0, num_items), handing items out in
  // order to whichever thread is free; returns when all are done. thread_index is in
  // [0, num_threads()) and identifies per-thread scratch. The first exception thrown by
  // fn is rethrown here (remaining items are skipped). Calls from inside a running loop
  // (nested parallelism) run inline on the calling thread. One loop runs at a time.
  void parallel_for(int64_t num_items, const ItemFn& fn);

 private:
  void worker_main(int thread_index);
  // Claims and runs items of loop `generation` until none is left (or a newer loop began).
  void run_items(uint32_t generation, int thread_index);

  const int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex loop_mu_;  // serializes parallel_for callers

  // One loop's work, published by bumping the generation in `work_`: its upper 32 bits are
  // the loop's generation, its lower 32 bits the next unclaimed item. A thread claims an item
  // with a compare-and-swap that also checks the generation, so a worker that wakes late
  // (after its loop ended, while the next is being set up) claims nothing from the wrong loop;
  // the caller returns as soon as every item has run (`done_`), not once every worker has
  // checked in (a worker the OS has not scheduled yet costs nothing). Each loop's function and
  // size live in the slot of its generation's parity, which the next loop leaves alone.
  // Workers spin briefly before sleeping on `work_cv_`, and the caller before `done_cv_`:
  // decode runs many short loops back to back, and a condition-variable wake-up costs more
  // than the work of a small GEMM.
  struct Job {
    std::atomic<const ItemFn*> fn{nullptr};
    std::atomic<int64_t> num_items{0};
  };
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::atomic<uint64_t> work_{0};
  Job jobs_[2];
  std::atomic<int64_t> done_{0};  // items of the current loop that have run (or were skipped)
  std::atomic<bool> stopping_{false};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

// Default thread count: $EM_NUM_THREADS if set and positive, else hardware concurrency.
int default_num_threads();

}  // namespace em::cpu
