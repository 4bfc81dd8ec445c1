// Matmul throughput: GFLOP/s (and weight GB/s) of y = x W^T per weight dtype and ISA.
//   em_bench [M N K [threads [isa]]]    default: prefill 256x1408x2048 and decode 1x1408x2048
// EM_BENCH_ROTATE_MIB=N rotates over copies of the weights at least N MiB in all, so that every
// call streams them from memory as a shard's decode does (without it they stay in cache);
// EM_BENCH_DTYPES=bf16,fp8 narrows the weight dtypes; EM_BENCH_INVARIANT=1 runs the
// batch-invariant kernels (em_cpu_config::batch_invariant).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "expertmesh/ops.h"

namespace {

// Best of five ~0.2 s windows: the fastest window is the least disturbed by other load.
// ws: one weight tensor per copy; call i uses copy i mod copies.
double seconds_per_call(em_backend* b, em_tensor& x, std::vector<em_tensor>& ws, em_tensor& y) {
  for (auto& w : ws) em_matmul(b, &x, &w, &y);  // warm-up
  int iters = 1;
  double best = 1e30;
  size_t next = 0;
  for (int window = 0; window < 5;) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) {
      em_matmul(b, &x, &ws[next], &y);
      next = (next + 1) % ws.size();
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < 0.2 && iters < (1 << 20)) {
      iters *= 2;
      continue;
    }
    best = std::min(best, s / iters);
    ++window;
  }
  return best;
}

// EM_BENCH_DTYPES, a comma-separated list of dtype names (exact: "bf16" is not "f16"), or all.
bool wanted(em_dtype dt) {
  const char* only = std::getenv("EM_BENCH_DTYPES");
  if (only == nullptr) return true;
  std::istringstream names(only);
  for (std::string name; std::getline(names, name, ',');)
    if (name == em_dtype_name(dt)) return true;
  return false;
}

void bench(int64_t M, int64_t N, int64_t K, int threads, em_cpu_isa isa) {
  const char* inv = std::getenv("EM_BENCH_INVARIANT");
  em_cpu_config cfg{isa, threads, inv != nullptr && std::string(inv) == "1" ? 1 : 0};
  em_backend* b = nullptr;
  if (em_backend_create_cpu(&cfg, &b) != EM_OK) {
    std::printf("%s: %s\n", em_cpu_isa_name(isa), em_last_error());
    return;
  }
  em_backend_info info;
  em_backend_get_info(b, &info);
  std::vector<float> xs(static_cast<size_t>(M * K), 0.01f), ys(static_cast<size_t>(M * N));
  // Each copy is sized for f32 and viewed as every dtype; counting copies by fp8's N x K bytes
  // gives every dtype at least the asked MiB.
  const size_t bytes = static_cast<size_t>(N * K * 4), smallest = static_cast<size_t>(N * K);
  const char* rotate = std::getenv("EM_BENCH_ROTATE_MIB");
  const size_t copies = rotate ? (std::strtoull(rotate, nullptr, 10) << 20) / smallest + 1 : 1;
  std::vector<std::vector<uint8_t>> wbufs(copies, std::vector<uint8_t>(bytes, 0x3c));
  std::vector<float> scale(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)), 1.0f);
  em_tensor x = em_tensor_2d(xs.data(), EM_F32, M, K), y = em_tensor_2d(ys.data(), EM_F32, M, N);
  for (em_dtype dt : {EM_BF16, EM_F16, EM_F32, EM_F8_E4M3}) {
    if (!wanted(dt)) continue;
    std::vector<em_tensor> ws;
    for (auto& buf : wbufs)
      ws.push_back(dt == EM_F8_E4M3 ? em_tensor_fp8(buf.data(), scale.data(), N, K) : em_tensor_2d(buf.data(), dt, N, K));
    const double s = seconds_per_call(b, x, ws, y);
    const double gflops = 2.0 * M * N * K / s / 1e9;
    const double gbs = static_cast<double>(N * K * em_dtype_size(dt)) / s / 1e9;
    std::printf("%-10s threads=%d M=%-5lld N=%-6lld K=%-6lld %-4s %8.3f ms %8.1f GFLOP/s %7.1f GB/s(weights)\n",
                info.isa, info.num_threads, static_cast<long long>(M), static_cast<long long>(N),
                static_cast<long long>(K), em_dtype_name(dt), s * 1e3, gflops, gbs);
  }
  em_backend_free(b);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 4 ? std::atoi(argv[4]) : 0;
  const em_cpu_isa isa = argc > 5 ? static_cast<em_cpu_isa>(em_cpu_isa_parse(argv[5])) : EM_ISA_AUTO;
  if (argc > 3) {
    bench(std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), threads, isa);
    return 0;
  }
  bench(256, 1408, 2048, threads, isa);
  bench(1, 1408, 2048, threads, isa);
  bench(4, 1408, 2048, threads, isa);
  return 0;
}
