// The machine's limits, measured the way BENCHMARKING.md asks: memory bandwidth with a
// large copy (and a large read, which is what streaming weights does), CPU peak with a
// register-only FMA loop of the widest vector unit the compiler targets (-march=native).
//
//   limits membw <threads> <MiB per array> <passes>   -> one JSON line per pass
//   limits fma   <threads> <passes>                   -> one JSON line per pass
//   limits serve <threads> <MiB per array>            -> stdin "membw" | "fma" | "quit", one
//                                                        JSON line (one pass) per command
//
// Every pass: the threads meet at a barrier, the main thread starts the clock, each
// thread works on its own contiguous 1/threads of the arrays (first touched by it), the
// threads meet again, the clock stops. Bytes are counted as STREAM does: copy = bytes
// read + bytes written; read = bytes read.
// Built by bench/run.ts into bench/build/limits (c++ -O2 -march=native -pthread).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
const char* const kVector = "avx512";
#elif defined(__AVX__)
constexpr int kLanes = 8;
const char* const kVector = "avx2";
#else
constexpr int kLanes = 4;
const char* const kVector = "sse/neon";
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));

// A reusable spin barrier: short waits, no syscalls inside the timed region.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    while (gen_.load(std::memory_order_acquire) == gen) std::this_thread::yield();
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

volatile float g_sink;  // keeps the reads and FMAs from being optimized away

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs body(thread, pass) on `threads` threads for `passes` timed passes, after one untimed
// pass -1 when `warm`; returns seconds per timed pass.
template <typename Body>
std::vector<double> timed_passes(int threads, int passes, Body body, bool warm = true) {
  Barrier bar(threads);
  std::vector<double> secs(static_cast<size_t>(passes));
  auto worker = [&](int t) {
    for (int p = warm ? -1 : 0; p < passes; ++p) {  // pass -1: first touch / warm-up, not timed
      bar.wait();
      double t0 = 0;
      if (t == 0) t0 = now();
      body(t, p);
      bar.wait();
      if (t == 0 && p >= 0) secs[static_cast<size_t>(p)] = now() - t0;
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
  return secs;
}

// Sums n floats as 4 interleaved sequential streams (quarters of the range), two vector
// accumulators each: several streams in flight read faster than one, and the decode
// kernels stream several weight rows at once too.
float read_sum(const float* p, size_t n) {
  constexpr int kStreams = 4;
  const size_t per = (n / kStreams) & ~size_t{2 * kLanes - 1};
  vf acc[kStreams][2] = {};
  for (size_t i = 0; i < per; i += 2 * kLanes) {
    for (int s = 0; s < kStreams; ++s) {
      vf a, b;
      std::memcpy(&a, p + s * per + i, sizeof a);
      std::memcpy(&b, p + s * per + i + kLanes, sizeof b);
      acc[s][0] += a;
      acc[s][1] += b;
    }
  }
  float r = 0;
  for (int s = 0; s < kStreams; ++s)
    for (int l = 0; l < kLanes; ++l) r += acc[s][0][l] + acc[s][1][l];
  for (size_t i = kStreams * per; i < n; ++i) r += p[i];
  return r;
}

// Two arrays of `mib` MiB each, first touched in parallel by the thread that will use each part.
struct Arrays {
  int threads;
  size_t mib, chunk;
  float* a;
  float* b;
};

bool make_arrays(int threads, size_t mib, Arrays* out) {
  const size_t n = mib * (size_t{1} << 20) / sizeof(float);
  Arrays r{threads, mib, (n / static_cast<size_t>(threads)) & ~size_t{63}, nullptr, nullptr};
  r.a = static_cast<float*>(std::aligned_alloc(4096, n * sizeof(float)));
  r.b = static_cast<float*>(std::aligned_alloc(4096, n * sizeof(float)));
  if (r.a == nullptr || r.b == nullptr) {
    std::fprintf(stderr, "limits: cannot allocate 2 x %zu MiB\n", mib);
    return false;
  }
  timed_passes(threads, 0, [&](int t, int) {
    float* src = r.a + static_cast<size_t>(t) * r.chunk;
    for (size_t i = 0; i < r.chunk; ++i) src[i] = static_cast<float>(i & 1023) * 0.5f;
    std::memset(r.b + static_cast<size_t>(t) * r.chunk, 0, r.chunk * sizeof(float));
  });
  *out = r;
  return true;
}

// One JSON line per pass: copy GB/s (read + written) and read GB/s, same arrays.
void membw_passes(const Arrays& r, int passes, bool warm) {
  std::vector<float> sink(static_cast<size_t>(r.threads));
  auto copy_secs = timed_passes(r.threads, passes, [&](int t, int) {
    std::memcpy(r.b + static_cast<size_t>(t) * r.chunk, r.a + static_cast<size_t>(t) * r.chunk, r.chunk * sizeof(float));
  }, warm);
  auto read_secs = timed_passes(r.threads, passes, [&](int t, int) {
    sink[static_cast<size_t>(t)] += read_sum(r.a + static_cast<size_t>(t) * r.chunk, r.chunk);
  }, warm);
  g_sink = sink[0];
  const double bytes = static_cast<double>(r.chunk) * r.threads * sizeof(float);
  for (int p = 0; p < passes; ++p)
    std::printf("{\"kind\":\"membw\",\"threads\":%d,\"mib\":%zu,\"copy_gbs\":%.3f,\"read_gbs\":%.3f}\n", r.threads,
                r.mib, 2 * bytes / copy_secs[static_cast<size_t>(p)] / 1e9, bytes / read_secs[static_cast<size_t>(p)] / 1e9);
  std::fflush(stdout);
}

constexpr int kChains = 12;  // independent FMA chains per thread: > latency x FMA ports

__attribute__((noinline)) void fma_loop(int64_t iters, float* out) {
  vf acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = vf{} + (1.0f + 0.001f * j);
  const vf m = vf{} + 0.999999f, c = vf{} + 1e-7f;
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) acc[j] = acc[j] * m + c;  // contracted to one FMA
  }
  vf s = {};
  for (int j = 0; j < kChains; ++j) s += acc[j];
  float r = 0;
  for (int l = 0; l < kLanes; ++l) r += s[l];
  *out = r;
}

int fma(int threads, int passes) {
  const int64_t iters = 20'000'000;
  std::vector<float> sink(static_cast<size_t>(threads));
  auto secs = timed_passes(threads, passes, [&](int t, int p) {
    fma_loop(p < 0 ? iters / 10 : iters, &sink[static_cast<size_t>(t)]);
  });
  g_sink = sink[0];
  const double flops = 2.0 * kLanes * kChains * static_cast<double>(iters) * threads;
  for (int p = 0; p < passes; ++p)
    std::printf("{\"kind\":\"fma\",\"threads\":%d,\"vector\":\"%s\",\"lanes\":%d,\"gflops\":%.3f}\n", threads, kVector,
                kLanes, flops / secs[static_cast<size_t>(p)] / 1e9);
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 5 && std::strcmp(argv[1], "membw") == 0) {
    Arrays r;
    if (!make_arrays(std::atoi(argv[2]), static_cast<size_t>(std::atoll(argv[3])), &r)) return 1;
    membw_passes(r, std::atoi(argv[4]), true);
    return 0;
  }
  if (argc >= 4 && std::strcmp(argv[1], "fma") == 0) return fma(std::atoi(argv[2]), std::atoi(argv[3]));
  if (argc >= 4 && std::strcmp(argv[1], "serve") == 0) {
    // Persistent: allocate once, then one pass per stdin line "membw" or "fma"; "quit" ends.
    const int threads = std::atoi(argv[2]);
    Arrays r;
    if (!make_arrays(threads, static_cast<size_t>(std::atoll(argv[3])), &r)) return 1;
    std::printf("{\"kind\":\"ready\"}\n");
    std::fflush(stdout);
    char line[64];
    while (std::fgets(line, sizeof line, stdin) != nullptr) {
      if (std::strncmp(line, "membw", 5) == 0) {
        membw_passes(r, 1, false);
      } else if (std::strncmp(line, "fma", 3) == 0) {
        fma(threads, 1);
      } else if (std::strncmp(line, "quit", 4) == 0) {
        break;
      } else {
        std::printf("{\"kind\":\"error\",\"message\":\"unknown command\"}\n");
        std::fflush(stdout);
      }
    }
    return 0;
  }
  std::fprintf(stderr,
               "usage: limits membw <threads> <MiB> <passes> | limits fma <threads> <passes> |\n"
               "       limits serve <threads> <MiB>   (stdin lines: membw | fma | quit)\n");
  return 2;
}
