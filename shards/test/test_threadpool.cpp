// ThreadPool: every item runs exactly once, thread indices stay in range, nested loops
// run inline, exceptions reach the caller, the pool is reusable afterwards, and many short
// loops back to back with late workers keep all of that.
#include <atomic>
#include <chrono>
#include <thread>
#include <stdexcept>
#include <vector>

#include "cpu/threadpool.h"
#include "test/harness.h"

int main() {
  for (int threads : {1, 2, 5}) {
    em::cpu::ThreadPool pool(threads);
    CHECK(pool.num_threads() == threads, "num_threads");
    for (int64_t n : {0, 1, 3, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      std::atomic<bool> bad_index{false};
      pool.parallel_for(n, [&](int64_t i, int t) {
        hits[static_cast<size_t>(i)]++;
        if (t < 0 || t >= threads) bad_index = true;
      });
      for (int64_t i = 0; i < n; ++i) CHECK(hits[static_cast<size_t>(i)] == 1, "item %lld ran %d times", static_cast<long long>(i), hits[static_cast<size_t>(i)].load());
      CHECK(!bad_index, "thread index out of range");
    }
    // Nested: inner loops run inline on the same thread index.
    std::atomic<int> inner{0};
    pool.parallel_for(8, [&](int64_t, int outer_t) {
      pool.parallel_for(4, [&](int64_t, int t) {
        if (t == outer_t) inner++;
      });
    });
    CHECK(inner == 32, "nested items %d", inner.load());
    // Exceptions propagate; the pool keeps working.
    bool caught = false;
    try {
      pool.parallel_for(100, [&](int64_t i, int) {
        if (i == 37) throw std::runtime_error("boom");
      });
    } catch (const std::runtime_error&) {
      caught = true;
    }
    CHECK(caught, "exception not propagated");
    std::atomic<int> after{0};
    pool.parallel_for(50, [&](int64_t, int) { after++; });
    CHECK(after == 50, "pool broken after exception");
  }
  // Many short loops back to back (decode's pattern), some items slow: a worker that wakes
  // late must not run an item of a loop that has ended or of the next one twice, and the
  // caller must not return before every item of its loop ran. Each loop counts into its own
  // array and checks it after the call.
  for (int threads : {2, 3, 5}) {
    em::cpu::ThreadPool pool(threads);
    int wrong = 0;
    for (int loop = 0; loop < 20000; ++loop) {
      const int64_t n = 1 + loop % 7;
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      const int slow = loop % 97 == 0 ? static_cast<int>(loop % n) : -1;
      pool.parallel_for(n, [&](int64_t i, int) {
        if (i == slow) std::this_thread::sleep_for(std::chrono::microseconds(200));
        hits[static_cast<size_t>(i)]++;
      });
      for (int64_t i = 0; i < n; ++i) wrong += hits[static_cast<size_t>(i)].load() != 1;
    }
    CHECK(wrong == 0, "%d threads: %d items ran other than once over 20000 short loops", threads, wrong);
  }
  return test::finish("threadpool");
}
