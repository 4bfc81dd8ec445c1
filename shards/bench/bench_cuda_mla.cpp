// MLA decode attention on the CUDA backend at DeepSeek-V3 dims (128 heads, kv_lora_rank 512,
// rope 64, nope 128, v 128), bf16 latent cache and bf16 wkv_b in device memory: one query
// token per sequence at position L - 1 of an L-row cache, the whole em_mla_attention call
// (absorption GEMMs included), warm. Reports the achieved bandwidth as bytes of latent cache
// read / time, next to a device-to-device copy of the same bytes measured in the same run
// (copy GB/s counts read + write, as the PyTorch peer's copy_bandwidth), and their ratio.
// After each shape and kernel, one call prints its phases' times (EM_CUDA_MLA_PROFILE).
//
//   em_bench_cuda_mla [--json FILE] [--batch 1,8,32,64,128] [--len 1024,4096,16384,32768] [--runs 5]
//                     [--impls tc,tc1]   (kernels by $EM_CUDA_MLA: tc = the default choice, tc1 = the
//                                         first tensor-core kernel, wgmma = the wgmma kernel on
//                                         compute capability 9.0 (else tc), simt = the fp32 kernel)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "expertmesh/cuda.h"

namespace {

constexpr int64_t kHeads = 128, kNope = 128, kRope = 64, kV = 128, kRank = 512, kRow = kRank + kRope;

using bench::parse_list;
using bench::Stats;
using bench::stats;

uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Seconds per call of fn: calls repeated for >= 20 ms per sample (fn synchronizes).
template <typename Fn>
double seconds_per_call(Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  int calls = 0;
  double el = 0;
  do {
    fn();
    ++calls;
    el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (el < 0.02);
  return el / calls;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a run killed by a timeout keeps its log
  const char* json_path = nullptr;
  std::vector<int64_t> batches = {1, 8, 32, 64, 128}, lens = {1024, 4096, 16384, 32768};
  std::vector<std::string> impls = {"tc", "tc1"};
  int runs = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--json")) json_path = argv[i + 1];
    else if (!std::strcmp(argv[i], "--impls")) {
      impls.clear();
      std::string list = argv[i + 1];
      for (size_t at = 0; at <= list.size();) {
        const size_t comma = std::min(list.find(',', at), list.size());
        if (comma > at) impls.push_back(list.substr(at, comma - at));
        at = comma + 1;
      }
    }
    else if (!std::strcmp(argv[i], "--runs")) runs = std::max(3, std::atoi(argv[i + 1]));
    else if (!std::strcmp(argv[i], "--batch")) batches = parse_list(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--len")) lens = parse_list(argv[i + 1]);
  }
  if (em_cuda_device_count() == 0) {
    std::printf("bench_cuda_mla: NO CUDA DEVICE: %s\n", em_cuda_last_status());
    return 77;
  }
  em_backend* be = nullptr;
  em_cuda_config cfg{0, EM_CUDA_MOE_AUTO, EM_CUDA_FP8_AUTO, 0, 0};
  TRY(em_backend_create_cuda(&cfg, &be));
  em_backend_info info;
  em_backend_get_info(be, &info);
  const int64_t max_b = *std::max_element(batches.begin(), batches.end());
  const int64_t max_l = *std::max_element(lens.begin(), lens.end());

  // Device buffers at the largest sizes: caches [max_b][max_l][576] bf16 (one random
  // sequence copied to every slot), wkv_b [128 * 256, 512] bf16, q, out, and a copy target.
  std::mt19937_64 gen(11);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const size_t seq_elems = static_cast<size_t>(max_l * kRow);
  std::vector<uint16_t> seq(seq_elems);
  for (auto& v : seq) v = bf16(uni(gen));
  std::vector<uint16_t> wh(static_cast<size_t>(kHeads * (kNope + kV) * kRank));
  for (auto& v : wh) v = bf16(uni(gen) * 0.05f);
  std::vector<float> qh(static_cast<size_t>(max_b * kHeads * (kNope + kRope)));
  for (auto& v : qh) v = uni(gen);
  const size_t cache_bytes = static_cast<size_t>(max_b) * seq_elems * 2;
  void *dcache, *dcopy, *dw, *dq, *dout;
  TRY(em_cuda_malloc(be, cache_bytes, &dcache));
  TRY(em_cuda_malloc(be, cache_bytes, &dcopy));
  TRY(em_cuda_malloc(be, wh.size() * 2, &dw));
  TRY(em_cuda_malloc(be, qh.size() * 4, &dq));
  TRY(em_cuda_malloc(be, static_cast<size_t>(max_b * kHeads * kV) * 4, &dout));
  TRY(em_cuda_copy(be, dcache, seq.data(), seq_elems * 2));
  for (int64_t s = 1; s < max_b; ++s)
    TRY(em_cuda_copy(be, static_cast<uint16_t*>(dcache) + s * seq_elems, dcache, seq_elems * 2));
  TRY(em_cuda_copy(be, dw, wh.data(), wh.size() * 2));
  TRY(em_cuda_copy(be, dq, qh.data(), qh.size() * 4));
  const float scale = static_cast<float>(em_mla_softmax_scale(static_cast<int32_t>(kNope + kRope), 40.0, 1.0));
  std::printf("bench_cuda_mla: %s, %d SMs; V3 dims (H %lld, C %lld, dr %lld), bf16 cache and wkv_b\n", info.isa,
              info.num_threads, static_cast<long long>(kHeads), static_cast<long long>(kRank),
              static_cast<long long>(kRope));

  FILE* json = json_path ? std::fopen(json_path, "w") : nullptr;
  if (json) std::fprintf(json, "[\n");
  bool first = true;
  for (const int64_t B : batches) {
    for (const int64_t L : lens) {
     for (const std::string& impl : impls) {
      // The kernel: $EM_CUDA_MLA, read at each call ("tc" = the default kernel choice).
      if (impl == "tc") unsetenv("EM_CUDA_MLA");
      else setenv("EM_CUDA_MLA", impl.c_str(), 1);
      std::vector<em_tensor> caches;
      std::vector<int32_t> positions(static_cast<size_t>(B), static_cast<int32_t>(L - 1)), offsets;
      for (int64_t s = 0; s < B; ++s) {
        caches.push_back(em_tensor_2d(static_cast<uint16_t*>(dcache) + s * seq_elems, EM_BF16, L, kRow));
        offsets.push_back(static_cast<int32_t>(s));
      }
      offsets.push_back(static_cast<int32_t>(B));
      em_tensor q = em_tensor_3d(dq, EM_F32, B, kHeads, kNope + kRope), out = em_tensor_3d(dout, EM_F32, B, kHeads, kV);
      em_tensor w = em_tensor_2d(dw, EM_BF16, kHeads * (kNope + kV), kRank);
      em_mla_args a{static_cast<int32_t>(kHeads), static_cast<int32_t>(kNope), static_cast<int32_t>(kRope),
                    static_cast<int32_t>(kV), static_cast<int32_t>(kRank), scale, &q, positions.data(),
                    static_cast<int32_t>(B), offsets.data(), caches.data(), &w, &out, nullptr};
      // The bytes the kernel must read: B caches of L rows (contiguous per sequence; the
      // copy peer moves the same bytes as one block).
      const size_t bytes = static_cast<size_t>(B * L * kRow) * 2;
      TRY(em_mla_attention(be, &a));  // warm-up
      TRY(em_cuda_copy(be, dcopy, dcache, bytes));
      std::vector<double> att_gbps, copy_gbps, att_us;
      for (int r = 0; r < runs; ++r) {
        const double ta = seconds_per_call([&] { TRY(em_mla_attention(be, &a)); });
        const double tc = seconds_per_call([&] { TRY(em_cuda_copy(be, dcopy, dcache, bytes)); });
        att_us.push_back(ta * 1e6);
        att_gbps.push_back(static_cast<double>(bytes) / ta / 1e9);
        copy_gbps.push_back(2.0 * static_cast<double>(bytes) / tc / 1e9);
      }
      const Stats sa = stats(att_gbps), sc = stats(copy_gbps), su = stats(att_us);
      // Attention FLOPs (scores over C + dr, values over C; the absorption GEMMs not counted).
      const double tflops = 2.0 * static_cast<double>(B * kHeads * L) * (kRow + kRank) / (su.median * 1e-6) / 1e12;
      std::printf("mla decode bf16 %-4s batch %4lld len %6lld  %9.1f us  cache %7.0f GB/s (min %.0f max %.0f)  copy %7.0f "
                  "GB/s  ratio %.2f  %6.1f TFLOP/s\n",
                  impl.c_str(), static_cast<long long>(B), static_cast<long long>(L), su.median, sa.median, sa.min, sa.max,
                  sc.median, sa.median / sc.median, tflops);
      if (json)
        std::fprintf(json,
                     "%s  {\"what\": \"mla_decode\", \"impl\": \"%s\", \"tflops\": %.2f, \"cache_dtype\": \"bf16\", \"weight_dtype\": \"bf16\", "
                     "\"batch\": %lld, \"cache_len\": %lld, \"heads\": %lld, \"kv_lora_rank\": %lld, \"rope_dim\": %lld, "
                     "\"cache_bytes\": %zu, \"us_median\": %.2f, \"gbps_median\": %.2f, \"gbps_min\": %.2f, "
                     "\"gbps_max\": %.2f, \"copy_gbps_median\": %.2f, \"ratio_to_copy\": %.4f, \"runs\": %d, "
                     "\"device\": \"%s\"}",
                     first ? "" : ",\n", impl.c_str(), tflops, static_cast<long long>(B), static_cast<long long>(L),
                     static_cast<long long>(kHeads), static_cast<long long>(kRank), static_cast<long long>(kRope), bytes,
                     su.median, sa.median, sa.min, sa.max, sc.median, sa.median / sc.median, runs, info.isa);
      first = false;
      // Where the time goes: one more call with EM_CUDA_MLA_PROFILE=1 (attention.cu prints its
      // phases' times to stderr; not part of the numbers above).
      setenv("EM_CUDA_MLA_PROFILE", "1", 1);
      std::fprintf(stderr, "bench_cuda_mla: %s batch %lld len %lld: ", impl.c_str(), static_cast<long long>(B),
                   static_cast<long long>(L));
      TRY(em_mla_attention(be, &a));
      unsetenv("EM_CUDA_MLA_PROFILE");
     }
    }
  }
  unsetenv("EM_CUDA_MLA");
  if (json) {
    std::fprintf(json, "\n]\n");
    std::fclose(json);
  }
  for (void* p : {dcache, dcopy, dw, dq, dout}) em_cuda_free(be, p);
  em_backend_free(be);
  return 0;
}
