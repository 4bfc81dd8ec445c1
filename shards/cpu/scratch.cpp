// Scratch memory for AlignedBuffer (cpu.h): large arrays are recycled per thread.
//
// The ops make their scratch per call: a prefill chunk's packed rows, gathered rows and
// hidden activations are tens of MiB each. Above malloc's mmap threshold every such array
// is mapped afresh, and the kernel faults in and zeroes its pages on first touch (the
// long-prefill profile showed it as clear_page under pack_x_deint). Here an array of at
// least kRecycleMin bytes returns, when freed, to a cache of its thread, and the next
// request that fits takes it back: after the first long call, the same calls find their
// memory mapped. A request that no cached array fits frees the largest smaller one first,
// so the cache holds about the largest set of arrays one call had alive at once.
//
// EM_SCRATCH_POISON=1 (the test suites set it) fills every array handed out with 0xFF
// bytes (NaN as f32, bf16 and e4m3), so that a read of an element no one wrote shows.
//
// The caches hold memory at the largest call's peak until the thread ends: scratch_trim
// (em_scratch_trim, the addon's trimScratch) frees every thread's cached arrays, from any
// thread (each cache has a lock, uncontended but for a trim; every cache is in a registry).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "cpu.h"

namespace em::cpu {
namespace {

constexpr std::align_val_t kAlign{64};
constexpr size_t kRecycleMin = size_t{1} << 20;
constexpr size_t kMaxCached = 8;

bool poison_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("EM_SCRATCH_POISON");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  return on;
}

struct Cache;

// Every live thread's cache. Never destroyed: threads may end after static destructors run.
struct Registry {
  std::mutex m;
  std::vector<Cache*> caches;
};
Registry& registry() {
  static Registry* r = new Registry;
  return *r;
}

struct Cache {
  std::mutex m;                                // guards free (this thread, or a trim)
  std::vector<std::pair<size_t, void*>> free;  // (capacity in bytes, memory)
  Cache() {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.m);
    r.caches.push_back(this);
  }
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;
  ~Cache() {
    {
      Registry& r = registry();
      std::lock_guard<std::mutex> lock(r.m);
      r.caches.erase(std::find(r.caches.begin(), r.caches.end(), this));
    }
    clear();
  }
  // Frees every cached array; returns their bytes. Caller holds m (or owns the cache alone).
  size_t clear() {
    size_t n = 0;
    for (const auto& [cap, p] : free) {
      ::operator delete(p, kAlign);
      n += cap;
    }
    free.clear();
    return n;
  }
  size_t bytes() const {
    size_t n = 0;
    for (const auto& f : free) n += f.first;
    return n;
  }
};

Cache& cache() {
  thread_local Cache c;
  return c;
}

void* handed_out(void* p, size_t bytes) {
  if (poison_enabled()) std::memset(p, 0xFF, bytes);
  return p;
}

}  // namespace

void* scratch_acquire(size_t bytes, size_t* capacity) {
  bytes = std::max<size_t>(bytes, 1);
  if (bytes < kRecycleMin) {
    *capacity = bytes;
    return handed_out(::operator new(bytes, kAlign), bytes);
  }
  Cache& c = cache();
  std::unique_lock<std::mutex> lock(c.m);
  auto& free = c.free;
  // The smallest cached array that fits.
  auto best = free.end();
  for (auto it = free.begin(); it != free.end(); ++it)
    if (it->first >= bytes && (best == free.end() || it->first < best->first)) best = it;
  if (best != free.end()) {
    const auto [cap, p] = *best;
    free.erase(best);
    lock.unlock();
    *capacity = cap;
    return handed_out(p, bytes);
  }
  // None fits: this one supersedes the largest cached array (all are smaller).
  if (!free.empty()) {
    const auto largest = std::max_element(free.begin(), free.end());
    ::operator delete(largest->second, kAlign);
    free.erase(largest);
  }
  lock.unlock();
  *capacity = bytes;
  return handed_out(::operator new(bytes, kAlign), bytes);
}

void scratch_release(void* p, size_t capacity) {
  if (capacity < kRecycleMin) {
    ::operator delete(p, kAlign);
    return;
  }
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.m);
  auto& free = c.free;
  free.emplace_back(capacity, p);
  if (free.size() > kMaxCached) {
    const auto smallest = std::min_element(free.begin(), free.end());
    ::operator delete(smallest->second, kAlign);
    free.erase(smallest);
  }
}

size_t scratch_cached_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.m);
  return c.bytes();
}

namespace {
// The sum of f(cache) over every thread's cache, each under its lock.
template <typename F>
size_t sum_over_caches(F&& f) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.m);
  size_t n = 0;
  for (Cache* c : r.caches) {
    std::lock_guard<std::mutex> cl(c->m);
    n += f(*c);
  }
  return n;
}
}  // namespace

size_t scratch_trim() {
  return sum_over_caches([](Cache& c) { return c.clear(); });
}

size_t scratch_cached_bytes_all() {
  return sum_over_caches([](Cache& c) { return c.bytes(); });
}

}  // namespace em::cpu

extern "C" size_t em_scratch_trim(void) { return em::cpu::scratch_trim(); }
extern "C" size_t em_scratch_cached_bytes(void) { return em::cpu::scratch_cached_bytes_all(); }
