// Scratch arrays (cpu/scratch.cpp): large ones come back from the thread's cache, the cache
// keeps about one call's worth, small ones are never cached, each thread has its own, and
// with EM_SCRATCH_POISON=1 every array is handed out as 0xFF bytes.
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu/cpu.h"
#include "test/harness.h"

namespace {

constexpr size_t MiB = size_t{1} << 20;

bool all_ff(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i)
    if (b[i] != 0xFF) return false;
  return true;
}

// One step of a table: hold array `slot` of `bytes` (acquire), or drop it (bytes 0). After
// the step: `cached` bytes in this thread's cache, and, for an acquire, whether the memory
// is that of the array last released from slot `same_as` (-1: not checked).
struct Step {
  int slot;
  size_t bytes;
  size_t cached;
  int same_as = -1;
};

struct Held {
  void* p = nullptr;
  size_t cap = 0;
  void* last = nullptr;  // the memory this slot released last
};

void run(const char* name, const std::vector<Step>& steps) {
  std::vector<Held> held(16);
  for (size_t i = 0; i < steps.size(); ++i) {
    const Step& s = steps[i];
    Held& h = held[static_cast<size_t>(s.slot)];
    if (s.bytes > 0) {
      h.p = em::cpu::scratch_acquire(s.bytes, &h.cap);
      CHECK(h.cap >= s.bytes, "%s step %zu: capacity %zu < %zu", name, i, h.cap, s.bytes);
      CHECK(all_ff(h.p, s.bytes), "%s step %zu: not poisoned", name, i);
      CHECK(reinterpret_cast<uintptr_t>(h.p) % 64 == 0, "%s step %zu: not 64-byte aligned", name, i);
      if (s.same_as >= 0)
        CHECK(h.p == held[static_cast<size_t>(s.same_as)].last, "%s step %zu: not the memory of slot %d", name, i,
              s.same_as);
      std::memset(h.p, 0, s.bytes);  // the next user must see 0xFF again
    } else {
      em::cpu::scratch_release(h.p, h.cap);
      h.last = h.p;
      h.p = nullptr;
    }
    CHECK(em::cpu::scratch_cached_bytes() == s.cached, "%s step %zu: cached %zu, want %zu", name, i,
          em::cpu::scratch_cached_bytes(), s.cached);
  }
  for (Held& h : held)
    if (h.p != nullptr) em::cpu::scratch_release(h.p, h.cap);
}

}  // namespace

int main() {
  // The suites set it; a run by hand needs it too (read once, at the first array).
  setenv("EM_SCRATCH_POISON", "1", 1);

  run("small arrays are never cached", {{0, 1000, 0}, {0, 0, 0}, {0, MiB - 1, 0}, {0, 0, 0}});
  // (the cache is now empty: every table below ends by emptying it or says what it holds)
  run("a smaller request takes the cached array, whole",
      {{0, 4 * MiB, 0}, {0, 0, 4 * MiB}, {1, 2 * MiB, 0, 0}, {1, 0, 4 * MiB}, {2, 4 * MiB, 0, 1}, {2, 0, 4 * MiB},
       // a larger one frees the smaller cached array first
       {3, 8 * MiB, 0}, {3, 0, 8 * MiB}});
  run("arrays alive together are cached together; each takes the smallest that fits",
      {{0, 8 * MiB, 0, -1}, {1, 3 * MiB, 0}, {2, 5 * MiB, 0}, {1, 0, 3 * MiB}, {2, 0, 8 * MiB}, {0, 0, 16 * MiB},
       {3, 5 * MiB, 11 * MiB, 2}, {4, 2 * MiB, 8 * MiB, 1}, {3, 0, 13 * MiB}, {4, 0, 16 * MiB},
       // nothing fits 9 MiB: the largest (8) goes, 3 + 5 stay
       {5, 9 * MiB, 8 * MiB}, {5, 0, 17 * MiB}});
  // At most 8 arrays, the largest kept. The cache holds 3, 5 and 9 MiB from above; ten
  // arrays of 1..10 MiB alive at once take those three (smallest fit first: 1 -> 3, 2 -> 5,
  // 3 -> 9) and map the rest; released in order (capacities 3, 5, 9, 4, 5, 6, 7, 8, 9, 10),
  // the ninth and tenth push out the smallest (3, then 4).
  run("at most 8 cached arrays, the largest kept",
      {{0, 1 * MiB, 14 * MiB}, {1, 2 * MiB, 9 * MiB}, {2, 3 * MiB, 0}, {3, 4 * MiB, 0}, {4, 5 * MiB, 0},
       {5, 6 * MiB, 0}, {6, 7 * MiB, 0}, {7, 8 * MiB, 0}, {8, 9 * MiB, 0}, {9, 10 * MiB, 0},
       {0, 0, 3 * MiB}, {1, 0, 8 * MiB}, {2, 0, 17 * MiB}, {3, 0, 21 * MiB}, {4, 0, 26 * MiB},
       {5, 0, 32 * MiB}, {6, 0, 39 * MiB}, {7, 0, 47 * MiB}, {8, 0, 53 * MiB}, {9, 0, 59 * MiB}});
  {
    // Each thread has its own cache: arrays released on another thread stay there.
    const size_t before = em::cpu::scratch_cached_bytes();
    size_t other = 0;
    std::thread t([&] {
      em::cpu::AlignedBuffer<float> a(MiB);  // 4 MiB
      other = em::cpu::scratch_cached_bytes();
    });
    t.join();
    CHECK(other == 0, "a new thread's cache starts empty: %zu", other);
    CHECK(em::cpu::scratch_cached_bytes() == before, "another thread's array came here");
  }
  {
    // AlignedBuffer: the same size again gets the same memory, poisoned again.
    void* first = nullptr;
    {
      em::cpu::AlignedBuffer<float> a(3 * MiB);
      first = a.data();
      a.data()[0] = 1.0f;
    }
    em::cpu::AlignedBuffer<float> b(3 * MiB);
    CHECK(b.data() == first, "AlignedBuffer did not recycle");
    CHECK(all_ff(b.data(), 4), "a recycled AlignedBuffer is not poisoned");
  }
  {
    // em_scratch_trim frees every thread's cache, from another thread; an array alive during
    // the trim is not touched, and goes to the (now empty) cache when freed.
    em::cpu::AlignedBuffer<float> alive(2 * MiB);  // 8 MiB, taken from this thread's cache or new
    const size_t here = em::cpu::scratch_cached_bytes();
    std::mutex m;
    std::condition_variable cv;
    bool cached = false, trimmed = false;
    size_t other_after = 1;
    std::thread t([&] {
      { em::cpu::AlignedBuffer<float> a(MiB); }  // 4 MiB into this thread's cache
      std::unique_lock<std::mutex> lock(m);
      cached = true;
      cv.notify_all();
      cv.wait(lock, [&] { return trimmed; });
      other_after = em::cpu::scratch_cached_bytes();
    });
    {
      std::unique_lock<std::mutex> lock(m);
      cv.wait(lock, [&] { return cached; });
    }
    CHECK(em_scratch_cached_bytes() >= here + 4 * MiB, "all caches: %zu, want >= %zu", em_scratch_cached_bytes(),
          here + 4 * MiB);
    const size_t freed = em_scratch_trim();
    CHECK(freed >= here + 4 * MiB, "trim freed %zu, want >= %zu", freed, here + 4 * MiB);
    CHECK(em_scratch_cached_bytes() == 0, "after a trim the caches hold %zu", em_scratch_cached_bytes());
    {
      std::lock_guard<std::mutex> lock(m);
      trimmed = true;
    }
    cv.notify_all();
    t.join();
    CHECK(other_after == 0, "the other thread's cache holds %zu after the trim", other_after);
    alive.data()[0] = 1.0f;  // still ours
  }
  CHECK(em::cpu::scratch_cached_bytes() == 8 * MiB, "the array alive during the trim was cached after it: %zu",
        em::cpu::scratch_cached_bytes());
  CHECK(em_scratch_trim() == 8 * MiB && em_scratch_cached_bytes() == 0, "a second trim");
  return test::finish("scratch");
}
