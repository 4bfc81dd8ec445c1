// Grouped expert FFN on the CUDA backend at DeepSeek-V3 shapes: TFLOP/s of em_moe_ffn
// (gate/up/down GEMMs + SiLU-and-multiply + weighted combine) with bf16 weights, and fp8
// e4m3 weights with 128x128 block scales (as the V3 checkpoint), in device memory: the loop
// and the grouped-GEMM variant of each dtype, and for fp8 also "fp8 lt" (EM_CUDA_FP8_LT:
// activations quantized per token per 128 columns, cuBLASLt's block-scaled fp8 GEMM per
// expert; sm_90+, else its rows say "fp8 lt (fallback)"), interleaved (A B C D E A B ...), median with
// min and max of the counted runs, and the median as a fraction of the device's dense bf16
// and fp8 tensor-core peaks (defaults: H200 SXM datasheet, 989 and 1979 TFLOP/s). The
// PyTorch peer is shards/bench/torch_moe_peer.py.
//
//   em_bench_cuda_moe [--json FILE] [--tokens 8,64,512,4096] [--runs 7] [--dtypes bf16,fp8]
//                     [--peak-bf16 989] [--peak-fp8 1979]
// Shapes: hidden 7168, moe_intermediate 2048, 256 experts, 8 experts per token, uniform
// random routing (seeded). FLOPs = 6 * rows * hidden * inter (rows = tokens * 8). Each
// expert's gate and up weights lie side by side in device memory: the "fused" sides read them
// as one weight of twice the rows (em_cuda_config::moe_fuse_gate_up), the others as two.
// "default (auto, fused)" is what a shard runs unconfigured: EM_CUDA_MOE_AUTO's per-call
// choice with the fusion on (the addon's resident weights lie side by side).
// After each token count, one call per side prints its phases' times (EM_CUDA_MOE_PROFILE).
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

constexpr int64_t kHidden = 7168, kInter = 2048, kExperts = 256, kTopK = 8;

using bench::parse_list;
using bench::Stats;
using bench::stats;

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a run killed by a timeout keeps its log
  const char* json_path = nullptr;
  std::vector<int64_t> token_counts = {8, 64, 512, 4096};
  int runs = 7;
  bool with_bf16 = true, with_fp8 = true;
  double peak_bf16 = 989.0, peak_fp8 = 1979.0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--json")) json_path = argv[i + 1];
    else if (!std::strcmp(argv[i], "--dtypes")) {
      with_bf16 = std::strstr(argv[i + 1], "bf16") != nullptr;
      with_fp8 = std::strstr(argv[i + 1], "fp8") != nullptr;
    } else if (!std::strcmp(argv[i], "--peak-bf16")) peak_bf16 = std::atof(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--peak-fp8")) peak_fp8 = std::atof(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--runs")) runs = std::max(5, std::atoi(argv[i + 1]));
    else if (!std::strcmp(argv[i], "--tokens")) {
      token_counts = parse_list(argv[i + 1]);
    }
  }
  if (em_cuda_device_count() == 0) {
    std::printf("bench_cuda_moe: NO CUDA DEVICE: %s\n", em_cuda_last_status());
    return 77;
  }
  // The loop on one stream, on the default number of streams (EM_CUDA_MOE_STREAMS_DEFAULT)
  // and on twice that; the grouped GEMM; the fp8 lt path.
  em_backend* loop1 = nullptr;
  em_backend* loop = nullptr;
  em_backend* loop2x = nullptr;
  em_backend* grouped = nullptr;
  em_backend* lt = nullptr;
  // The gate and up weights of an expert lie side by side (as the addon's resident weights):
  // these sides run with the fusion off (moe_fuse_gate_up -1), the "fused" ones with it on.
  em_cuda_config cfg{0, EM_CUDA_MOE_LOOP, EM_CUDA_FP8_DEFAULT, 1, -1};
  TRY(em_backend_create_cuda(&cfg, &loop1));
  cfg.moe_streams = EM_CUDA_MOE_STREAMS_DEFAULT;
  TRY(em_backend_create_cuda(&cfg, &loop));
  cfg.moe_streams = 2 * EM_CUDA_MOE_STREAMS_DEFAULT;
  TRY(em_backend_create_cuda(&cfg, &loop2x));
  cfg.moe_streams = 1;
  cfg.moe_gemm = EM_CUDA_MOE_GROUPED;
  TRY(em_backend_create_cuda(&cfg, &grouped));
  cfg.moe_gemm = EM_CUDA_MOE_LOOP;
  cfg.fp8_gemm = EM_CUDA_FP8_LT;
  TRY(em_backend_create_cuda(&cfg, &lt));
  em_backend* loop_fused = nullptr;
  em_backend* grouped_fused = nullptr;
  em_cuda_config fcfg{0, EM_CUDA_MOE_LOOP, EM_CUDA_FP8_DEFAULT, EM_CUDA_MOE_STREAMS_DEFAULT, 1};
  TRY(em_backend_create_cuda(&fcfg, &loop_fused));
  fcfg.moe_gemm = EM_CUDA_MOE_GROUPED;
  fcfg.moe_streams = 1;
  TRY(em_backend_create_cuda(&fcfg, &grouped_fused));
  // The CUTLASS Hopper grouped GEMM (EM_CUDA_MOE_CUTLASS), unfused and fused.
  em_backend* cutlass = nullptr;
  em_backend* cutlass_fused = nullptr;
  fcfg.moe_gemm = EM_CUDA_MOE_CUTLASS;
  TRY(em_backend_create_cuda(&fcfg, &cutlass_fused));
  fcfg.moe_fuse_gate_up = -1;
  TRY(em_backend_create_cuda(&fcfg, &cutlass));
  // What the shard runs by default: AUTO's per-call choice, gate and up fused (resident weights).
  em_backend* dflt = nullptr;
  em_cuda_config dcfg{0, EM_CUDA_MOE_AUTO, EM_CUDA_FP8_DEFAULT, EM_CUDA_MOE_STREAMS_DEFAULT, 1};
  unsetenv("EM_CUDA_MOE_GEMM");  // AUTO reads it
  TRY(em_backend_create_cuda(&dcfg, &dflt));
  char loop_name[32], loop2x_name[32], fused_name[40];
  std::snprintf(loop_name, sizeof loop_name, "cublas loop x%d", EM_CUDA_MOE_STREAMS_DEFAULT);
  std::snprintf(fused_name, sizeof fused_name, "cublas loop x%d fused", EM_CUDA_MOE_STREAMS_DEFAULT);
  std::snprintf(loop2x_name, sizeof loop2x_name, "cublas loop x%d", 2 * EM_CUDA_MOE_STREAMS_DEFAULT);
  em_backend_info info;
  em_backend_get_info(loop, &info);

  // Weights: 256 experts x (w1, w3, w2) bf16 in device memory (22.5 GB), filled from a few
  // random host patterns (their values do not change the timing).
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<float> uni(-0.02f, 0.02f);
  const size_t wn = static_cast<size_t>(kHidden * kInter);
  std::vector<std::vector<uint16_t>> patterns(3, std::vector<uint16_t>(wn));
  for (auto& p : patterns)
    for (auto& v : p) {
      const float f = uni(gen);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      v = static_cast<uint16_t>(u >> 16);
    }
  std::vector<em_tensor> w1(kExperts), w2(kExperts), w3(kExperts);
  std::vector<void*> allocations;
  const auto t_load = std::chrono::steady_clock::now();
  for (int64_t e = 0; e < kExperts; ++e) {
    void* gate_up = nullptr;  // w1 then w3
    void* down = nullptr;
    TRY(em_cuda_malloc(loop, wn * 4, &gate_up));
    TRY(em_cuda_malloc(loop, wn * 2, &down));
    allocations.push_back(gate_up);
    allocations.push_back(down);
    void* p[3] = {gate_up, static_cast<char*>(gate_up) + wn * 2, down};
    for (int j = 0; j < 3; ++j) TRY(em_cuda_copy(loop, p[j], patterns[(e + j) % 3].data(), wn * 2));
    w1[e] = em_tensor_2d(p[0], EM_BF16, kInter, kHidden);
    w3[e] = em_tensor_2d(p[1], EM_BF16, kInter, kHidden);
    w2[e] = em_tensor_2d(p[2], EM_BF16, kHidden, kInter);
  }
  std::printf("bench_cuda_moe: %s, %d SMs; weights %.1f GB bf16 loaded in %.1f s\n", info.isa, info.num_threads,
              3.0 * kExperts * wn * 2 / 1e9,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count());

  // fp8 e4m3 weights (11.3 GB) with weight_scale_inv [16, 56] / [56, 16] blocks: random codes
  // (no NaN) and scales of about 0.02 / 448, from a few host patterns.
  std::vector<em_tensor> f1(kExperts), f2(kExperts), f3(kExperts);
  if (with_fp8) {
    const auto t_fp8 = std::chrono::steady_clock::now();
    const size_t sn = static_cast<size_t>((kInter / 128) * (kHidden / 128));
    std::vector<std::vector<uint8_t>> codes(3, std::vector<uint8_t>(wn));
    std::vector<std::vector<float>> scales(3, std::vector<float>(sn));
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& c : codes)
      for (auto& v : c) {
        do v = static_cast<uint8_t>(byte(gen));
        while ((v & 0x7f) == 0x7f);
      }
    for (auto& sc : scales)
      for (auto& v : sc) v = (0.5f + uni(gen) * 25.0f) * 0.02f / 448.0f;
    for (int64_t e = 0; e < kExperts; ++e) {
      void* p[3];  // codes: w1 and w3 side by side, then w2
      void* q[3];  // their scales, the same way
      void *codes_gu = nullptr, *codes_d = nullptr, *scales_gu = nullptr, *scales_d = nullptr;
      TRY(em_cuda_malloc(loop, 2 * wn, &codes_gu));
      TRY(em_cuda_malloc(loop, wn, &codes_d));
      TRY(em_cuda_malloc(loop, 2 * sn * 4, &scales_gu));
      TRY(em_cuda_malloc(loop, sn * 4, &scales_d));
      for (void* a : {codes_gu, codes_d, scales_gu, scales_d}) allocations.push_back(a);
      p[0] = codes_gu;
      p[1] = static_cast<char*>(codes_gu) + wn;
      p[2] = codes_d;
      q[0] = scales_gu;
      q[1] = static_cast<char*>(scales_gu) + sn * 4;
      q[2] = scales_d;
      for (int j = 0; j < 3; ++j) {
        TRY(em_cuda_copy(loop, p[j], codes[(e + j) % 3].data(), wn));
        TRY(em_cuda_copy(loop, q[j], scales[(e + j) % 3].data(), sn * 4));
      }
      f1[e] = em_tensor_fp8(p[0], static_cast<const float*>(q[0]), kInter, kHidden);
      f3[e] = em_tensor_fp8(p[1], static_cast<const float*>(q[1]), kInter, kHidden);
      f2[e] = em_tensor_fp8(p[2], static_cast<const float*>(q[2]), kHidden, kInter);
    }
    std::printf("bench_cuda_moe: weights %.1f GB fp8 (128x128 block scales) loaded in %.1f s\n",
                3.0 * kExperts * wn / 1e9,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t_fp8).count());
  }

  FILE* json = json_path ? std::fopen(json_path, "w") : nullptr;
  if (json) std::fprintf(json, "[\n");
  bool first = true;
  for (const int64_t tokens : token_counts) {
    // Routing: each token picks 8 distinct experts; rows grouped by expert.
    std::vector<std::vector<int32_t>> by_expert(kExperts);
    std::uniform_int_distribution<int> pick(0, kExperts - 1);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<int> chosen;
      while (static_cast<int64_t>(chosen.size()) < kTopK) {
        const int e = pick(gen);
        if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
      }
      for (int e : chosen) by_expert[e].push_back(static_cast<int32_t>(t));
    }
    std::vector<int32_t> offsets(kExperts + 1, 0), x_index, out_index;
    for (int64_t e = 0; e < kExperts; ++e) {
      offsets[e + 1] = offsets[e] + static_cast<int32_t>(by_expert[e].size());
      for (int32_t t : by_expert[e]) {
        x_index.push_back(t);
        out_index.push_back(t);
      }
    }
    const int64_t rows = offsets[kExperts];
    std::vector<float> row_weight(static_cast<size_t>(rows), 0.125f), xh(static_cast<size_t>(tokens * kHidden));
    for (auto& v : xh) v = uni(gen) * 50.0f;
    void *dx, *dy;
    TRY(em_cuda_malloc(loop, xh.size() * 4, &dx));
    TRY(em_cuda_malloc(loop, xh.size() * 4, &dy));
    TRY(em_cuda_copy(loop, dx, xh.data(), xh.size() * 4));
    em_tensor x = em_tensor_2d(dx, EM_F32, tokens, kHidden), y = em_tensor_2d(dy, EM_F32, tokens, kHidden);
    // The shard's call: gather tokens by x_index, weighted combine back into y by token.
    em_moe_args a{};
    a.x = &x;
    a.num_experts = static_cast<int32_t>(kExperts);
    a.expert_offsets = offsets.data();
    a.w1 = w1.data();
    a.w2 = w2.data();
    a.w3 = w3.data();
    a.row_weight = row_weight.data();
    a.out_index = out_index.data();
    a.x_index = x_index.data();
    a.accumulate = 0;
    a.y = &y;

    em_moe_args af = a;  // the same call with the fp8 weights
    af.w1 = f1.data();
    af.w2 = f2.data();
    af.w3 = f3.data();

    const double flops = 6.0 * static_cast<double>(rows) * kHidden * kInter;
    struct Side {
      em_backend* b;
      const em_moe_args* args;
      std::string name;
      const char* dtype;
    };
    std::vector<Side> sides;
    if (with_bf16) {
      sides.push_back({loop1, &a, "cublas loop x1", "bf16"});
      sides.push_back({loop, &a, loop_name, "bf16"});
      sides.push_back({loop2x, &a, loop2x_name, "bf16"});
      sides.push_back({grouped, &a, "cublas grouped", "bf16"});
      sides.push_back({loop_fused, &a, fused_name, "bf16"});
      sides.push_back({grouped_fused, &a, "cublas grouped fused", "bf16"});
      sides.push_back({cutlass, &a, "cutlass grouped", "bf16"});
      sides.push_back({cutlass_fused, &a, "cutlass grouped fused", "bf16"});
      sides.push_back({dflt, &a, "default (auto, fused)", "bf16"});
    }
    if (with_fp8) {  // fp8.cu: direct fp8 reads for experts of <= 8 rows, else bf16 dequantization
      sides.push_back({loop, &af, "fp8 loop", "fp8"});
      sides.push_back({grouped, &af, "fp8 grouped", "fp8"});
      sides.push_back({lt, &af, "fp8 lt", "fp8"});  // fp8 x fp8 on cuBLASLt (sm_90+)
      sides.push_back({loop_fused, &af, "fp8 loop fused", "fp8"});
      // fp8 x fp8 with the block scales, activations quantized per token per 128 (one CUTLASS
      // blockwise-scaled kernel per phase; DeepSeek-V3 inference numerics)
      sides.push_back({cutlass_fused, &af, "fp8 cutlass blockwise fused", "fp8"});
      sides.push_back({dflt, &af, "fp8 default (auto, fused)", "fp8"});
    }
    const size_t ns = sides.size();
    std::vector<std::vector<double>> tflops(ns);
    for (size_t s = 0; s < ns; ++s) {  // warm-up (the lt side also plans its cuBLASLt GEMMs here)
      TRY(em_moe_ffn(sides[s].b, sides[s].args));
      if (sides[s].b == cutlass || sides[s].b == cutlass_fused) {  // which grouped GEMM ran, and why
        const std::string st = em_cuda_last_status();
        if (st.find("grouped cutlass,") == std::string::npos) sides[s].name += " (fallback: cublas)";
        std::printf("bench_cuda_moe: tokens %lld, %s: %s\n", static_cast<long long>(tokens), sides[s].name.c_str(),
                    st.c_str());
      }
      if (sides[s].b == lt) {
        const std::string st = em_cuda_last_status();
        if (st.rfind("fp8 lt: cublasLt", 0) != 0) sides[s].name = "fp8 lt (fallback)";
        std::printf("bench_cuda_moe: tokens %lld, fp8 lt: %s\n", static_cast<long long>(tokens), st.c_str());
      }
    }
    for (int r = 0; r < runs; ++r) {
      for (size_t s = 0; s < ns; ++s) {
        // Enough calls for ~50 ms per sample.
        const auto t0 = std::chrono::steady_clock::now();
        int calls = 0;
        double el = 0;
        do {
          TRY(em_moe_ffn(sides[s].b, sides[s].args));
          ++calls;
          el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        } while (el < 0.05);
        tflops[s].push_back(flops * calls / el / 1e12);
      }
    }
    for (size_t s = 0; s < ns; ++s) {
      const Stats st = stats(tflops[s]);
      const double of_bf16 = st.median / peak_bf16, of_fp8 = st.median / peak_fp8;
      std::printf("moe_ffn %-4s tokens %5lld rows %6lld  %-15s %8.2f TFLOP/s (min %.2f max %.2f, %d runs; "
                  "%.3f of bf16 peak, %.3f of fp8 peak)\n",
                  sides[s].dtype, static_cast<long long>(tokens), static_cast<long long>(rows), sides[s].name.c_str(),
                  st.median, st.min, st.max, runs, of_bf16, of_fp8);
      if (json)
        std::fprintf(json,
                     "%s  {\"what\": \"moe_ffn\", \"impl\": \"%s\", \"dtype\": \"%s\", \"tokens\": %lld, \"rows\": %lld, "
                     "\"hidden\": %lld, \"inter\": %lld, \"experts\": %lld, \"top_k\": %lld, \"tflops_median\": %.4f, "
                     "\"tflops_min\": %.4f, \"tflops_max\": %.4f, \"runs\": %d, \"device\": \"%s\", "
                     "\"peak_bf16_tflops\": %.1f, \"peak_fp8_tflops\": %.1f, \"of_bf16_peak\": %.4f, "
                     "\"of_fp8_peak\": %.4f}",
                     first ? "" : ",\n", sides[s].name.c_str(), sides[s].dtype, static_cast<long long>(tokens),
                     static_cast<long long>(rows), static_cast<long long>(kHidden), static_cast<long long>(kInter),
                     static_cast<long long>(kExperts), static_cast<long long>(kTopK), st.median, st.min, st.max, runs,
                     info.isa, peak_bf16, peak_fp8, of_bf16, of_fp8);
      first = false;
    }
    // Where the time goes: one call per side with EM_CUDA_MOE_PROFILE=1 (moe.cu prints each
    // phase's time to stderr, waiting for each; not part of the numbers above).
    setenv("EM_CUDA_MOE_PROFILE", "1", 1);
    for (size_t s = 0; s < ns; ++s) {
      std::fprintf(stderr, "bench_cuda_moe: tokens %lld, %s %s: ", static_cast<long long>(tokens), sides[s].dtype,
                   sides[s].name.c_str());
      TRY(em_moe_ffn(sides[s].b, sides[s].args));
    }
    unsetenv("EM_CUDA_MOE_PROFILE");
    em_cuda_free(loop, dx);
    em_cuda_free(loop, dy);
  }
  if (json) {
    std::fprintf(json, "\n]\n");
    std::fclose(json);
  }
  for (void* p : allocations) em_cuda_free(loop, p);
  em_backend_free(loop1);
  em_backend_free(loop);
  em_backend_free(loop2x);
  em_backend_free(grouped);
  em_backend_free(lt);
  em_backend_free(loop_fused);
  em_backend_free(grouped_fused);
  em_backend_free(cutlass);
  em_backend_free(cutlass_fused);
  em_backend_free(dflt);
  return 0;
}
