// CUDA vs CPU parity: every op the CUDA backend supports, on random inputs, against the
// CPU backend (the reference, as in ggml's backend tests), with a tolerance per weight
// dtype relative to the largest reference value. Ops the CUDA backend does not support
// must say so (em_supports_op = 0, EM_ERR_UNSUPPORTED), never compute something else.
//
// Exit: 0 all passed, 1 a failure, 77 no CUDA device (ctest: skipped; gpu-check: error).
// Usage: test_cuda_parity [device]   (default $EM_CUDA_DEVICE or 0)
#include <algorithm>
#include <cstdlib>
#include <memory>

#include "expertmesh/cuda.h"
#include "test/harness.h"

using namespace test;

// test/wgmma_probe.cu: the wgmma primitives on their own (see wgmma_cases).
int wgmma_probe(int n, int variant, double* rel_err, const char** what);

namespace {

constexpr int kNoDevice = 77;

// Relative tolerances (max |cuda - cpu| / max |cpu|) per weight dtype: bf16/f16 GEMMs round
// the f32 activations to the weight dtype for tensor cores; f32 GEMMs are plain fp32. fp8
// (cuda/fp8.cu): GEMMs of more than 8 rows round weights and activations to bf16 (and moe_ffn
// keeps bf16 activations throughout), hence bf16's tolerance; fp8 matmuls of up to 8 rows are
// fp32 on the exact weight values (fp8_matmul_tolerance).
double gemm_tolerance(em_dtype d) {
  switch (d) {
    case EM_BF16:
    case EM_F8_E4M3: return 2e-2;
    case EM_F16: return 5e-3;
    default: return 1e-4;
  }
}

struct Backends {
  em_backend* cpu = nullptr;
  em_backend* cuda = nullptr;
  em_backend* cuda_grouped = nullptr;
  em_backend* cuda_lt = nullptr;  // EM_CUDA_FP8_LT (fp8_lt_cases)
  em_backend* cuda_1s = nullptr;  // the loop on one stream (moe_lane_cases)
  em_backend* cuda_cutlass = nullptr;  // EM_CUDA_MOE_CUTLASS (sm_90a builds with CUTLASS)
  em_backend* cuda_auto = nullptr;     // EM_CUDA_MOE_AUTO (what production runs)
  int cc_major = 0;
  ~Backends() {
    em_backend_free(cpu);
    em_backend_free(cuda);
    em_backend_free(cuda_1s);
    em_backend_free(cuda_grouped);
    em_backend_free(cuda_lt);
    em_backend_free(cuda_cutlass);
    em_backend_free(cuda_auto);
  }
};

double rel_err(const std::vector<float>& ref, const std::vector<float>& got) {
  double mx = 0.0, err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    mx = std::max(mx, std::fabs(static_cast<double>(ref[i])));
    const double d = std::fabs(static_cast<double>(ref[i]) - got[i]);
    err = std::max(err, std::isnan(d) ? INFINITY : d);
  }
  return err / std::max(mx, 1e-30);
}

void report(const char* op, const std::string& what, double err, double tol) {
  const bool ok = err <= tol;
  std::printf("%-9s %-44s rel_err %.3e  tol %.0e  %s\n", op, what.c_str(), err, tol, ok ? "ok" : "FAIL");
  CHECK(ok, "%s %s: rel_err %.3e > %.0e", op, what.c_str(), err, tol);
}

std::string shape_str(int64_t a, int64_t b, int64_t c = -1) {
  std::string s = "[" + std::to_string(a) + "x" + std::to_string(b);
  if (c >= 0) s += "x" + std::to_string(c);
  return s + "]";
}

// ------------------------------------------------------------------ matmul

// fp8 e4m3 weights with 128x128 block scales: up to 8 rows (the CUDA backend's
// kFp8SkinnyRows) the fp8 bytes are read directly and the math is fp32 on the exact weight
// values, so f32's tolerance; more rows run bf16 tensor cores.
double fp8_matmul_tolerance(int64_t M) { return M <= 8 ? gemm_tolerance(EM_F32) : gemm_tolerance(EM_F8_E4M3); }

// One fp8 matmul case: the weight view, f32 activations [M, K] with a padded row stride, the
// CPU backend's result y0, and y1 (NaN-filled, as `out`) for the backend under test.
struct Fp8Matmul {
  TestWeight parent;
  std::vector<float> xs, y0, y1;
  em_tensor w, x, out;
  Fp8Matmul(Rng& rng, em_backend* cpu, int64_t M, int64_t N, int64_t K, int64_t row0, int64_t col0, int64_t pr,
            int64_t pc)
      : parent(make_weight(rng, EM_F8_E4M3, pr, pc, 0.5f)),
        xs(rng.vec(static_cast<size_t>(M * (K + 3)))),
        y0(static_cast<size_t>(M * N)),
        y1(y0.size(), NAN) {
    w = parent.view();
    w.data = parent.bytes.data() + row0 * pc + col0;
    w.scale = parent.scale.data() + (row0 / 128) * w.scale_stride + col0 / 128;
    w.shape[0] = N;
    w.shape[1] = K;
    x = em_tensor_2d(xs.data(), EM_F32, M, K);
    x.stride[0] = K + 3;
    out = em_tensor_2d(y1.data(), EM_F32, M, N);
    em_tensor ref = em_tensor_2d(y0.data(), EM_F32, M, N);
    CHECK_OK(em_matmul(cpu, &x, &w, &ref));
  }
  Fp8Matmul(const Fp8Matmul&) = delete;
  Fp8Matmul& operator=(const Fp8Matmul&) = delete;
};

// Weights [N, K] as views at (row0, col0) of a parent [pr, pc] (on the 128-block grid): rows and
// columns off the grid, leading dimensions that are not multiples of 4 (byte loads of the
// codes), scale_stride > ceil(K / 128) and scale row offsets.
void fp8_matmul_cases(Rng& rng, Backends& b) {
  struct Case {
    int64_t M, N, K, row0, col0, pr, pc;
  };
  const Case cases[] = {
      {1, 256, 512, 0, 0, 256, 512},      {7, 300, 129, 0, 0, 300, 129},       {8, 1000, 7168, 0, 0, 1000, 7168},
      {3, 200, 300, 128, 128, 512, 701},  {5, 130, 1030, 0, 0, 130, 1030},     {2, 64, 1090, 0, 0, 64, 1092},
      {9, 129, 300, 0, 0, 129, 300},
      {64, 1024, 768, 0, 0, 1024, 768},   {130, 96, 7168, 0, 0, 96, 7168},     {33, 200, 300, 256, 128, 512, 700},
  };
  for (const Case& c : cases) {
    Fp8Matmul t(rng, b.cpu, c.M, c.N, c.K, c.row0, c.col0, c.pr, c.pc);
    const std::vector<float>& y0 = t.y0;
    std::vector<float>& y1 = t.y1;
    CHECK_OK(em_matmul(b.cuda, &t.x, &t.w, &t.out));
    std::string what = "fp8 " + shape_str(c.M, c.N, c.K);
    if (c.pr != c.N || c.pc != c.K) what += " view of " + shape_str(c.pr, c.pc);
    report("matmul", what, rel_err(y0, y1), fp8_matmul_tolerance(c.M));
  }
}

void matmul_cases(Rng& rng, Backends& b) {
  // {5, 17, 0}: an empty sum, zeros (cuBLAS itself rejects K = 0).
  const int64_t shapes[][3] = {{1, 256, 512}, {7, 300, 129}, {64, 1024, 768}, {130, 96, 7168}, {5, 17, 0}};
  for (em_dtype dt : {EM_F32, EM_BF16, EM_F16}) {
    for (const auto& s : shapes) {
      const int64_t M = s[0], N = s[1], K = s[2];
      TestWeight w = make_weight(rng, dt, N, K, 0.5f);
      // x as a strided view (ld = K + 3) to cover views.
      std::vector<float> xs = rng.vec(static_cast<size_t>(M * (K + 3)));
      em_tensor x = em_tensor_2d(xs.data(), EM_F32, M, K);
      x.stride[0] = K + 3;
      std::vector<float> y0(static_cast<size_t>(M * N)), y1(y0.size(), NAN);
      em_tensor wv = w.view(), t0 = em_tensor_2d(y0.data(), EM_F32, M, N), t1 = em_tensor_2d(y1.data(), EM_F32, M, N);
      CHECK_OK(em_matmul(b.cpu, &x, &wv, &t0));
      CHECK_OK(em_matmul(b.cuda, &x, &wv, &t1));
      report("matmul", std::string(em_dtype_name(dt)) + " " + shape_str(M, N, K), rel_err(y0, y1), gemm_tolerance(dt));
    }
  }
  fp8_matmul_cases(rng, b);
}

// ------------------------------------------------------------------ rmsnorm, silu_mul

void rmsnorm_cases(Rng& rng, Backends& b) {
  const int64_t shapes[][2] = {{1, 7168}, {33, 512}, {5, 100}};
  for (em_dtype dt : {EM_F32, EM_BF16, EM_F16}) {
    for (const auto& s : shapes) {
      const int64_t rows = s[0], dim = s[1];
      TestWeight w = make_weight(rng, dt, 1, dim);
      em_tensor wv = em_tensor_1d(w.bytes.data(), dt, dim);
      std::vector<float> x = rng.vec(static_cast<size_t>(rows * dim), -3.0f, 3.0f), y0(x.size()), y1 = x;
      em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, dim), t0 = em_tensor_2d(y0.data(), EM_F32, rows, dim);
      em_tensor t1 = em_tensor_2d(y1.data(), EM_F32, rows, dim);  // in place on CUDA
      CHECK_OK(em_rmsnorm(b.cpu, &xt, &wv, 1e-6f, &t0));
      CHECK_OK(em_rmsnorm(b.cuda, &t1, &wv, 1e-6f, &t1));
      report("rmsnorm", std::string(em_dtype_name(dt)) + " " + shape_str(rows, dim) + " in place", rel_err(y0, y1), 1e-5);
    }
  }
}

void silu_mul_cases(Rng& rng, Backends& b) {
  const int64_t shapes[][2] = {{1, 2048}, {17, 1407}, {256, 512}};
  for (const auto& s : shapes) {
    const int64_t rows = s[0], cols = s[1];
    std::vector<float> g = rng.vec(static_cast<size_t>(rows * cols), -8.0f, 8.0f), u = rng.vec(g.size(), -2.0f, 2.0f);
    std::vector<float> y0(g.size()), y1(g.size(), NAN);
    em_tensor gt = em_tensor_2d(g.data(), EM_F32, rows, cols), ut = em_tensor_2d(u.data(), EM_F32, rows, cols);
    em_tensor t0 = em_tensor_2d(y0.data(), EM_F32, rows, cols), t1 = em_tensor_2d(y1.data(), EM_F32, rows, cols);
    CHECK_OK(em_silu_mul(b.cpu, &gt, &ut, &t0));
    CHECK_OK(em_silu_mul(b.cuda, &gt, &ut, &t1));
    report("silu_mul", "f32 " + shape_str(rows, cols), rel_err(y0, y1), 1e-5);
  }
}

// ------------------------------------------------------------------ rope

void rope_cases(Rng& rng, Backends& b) {
  struct Case {
    int64_t T, H;
    int32_t dim;
    double factor;
  };
  const Case cases[] = {{5, 1, 64, 1.0}, {37, 16, 64, 40.0}, {3, 128, 64, 40.0}};
  for (const Case& c : cases) {
    em_rope_config cfg{c.dim, 10000.0, c.factor, 4096, 32.0, 1.0};
    std::vector<int32_t> pos(static_cast<size_t>(c.T));
    for (auto& p : pos) p = rng.integer(0, 160000);
    std::vector<float> x0 = rng.vec(static_cast<size_t>(c.T * c.H * c.dim)), x1 = x0;
    em_tensor t0 = em_tensor_3d(x0.data(), EM_F32, c.T, c.H, c.dim), t1 = em_tensor_3d(x1.data(), EM_F32, c.T, c.H, c.dim);
    CHECK_OK(em_rope(b.cpu, &t0, pos.data(), &cfg));
    CHECK_OK(em_rope(b.cuda, &t1, pos.data(), &cfg));
    report("rope", "f32 " + shape_str(c.T, c.H, c.dim) + (c.factor > 1 ? " yarn" : ""), rel_err(x0, x1), 1e-5);
  }
}

// ------------------------------------------------------------------ convert (bit-exact)

void convert_cases(Rng& rng, Backends& b) {
  const int64_t rows = 300, cols = 260;
  struct Pair {
    em_dtype src, dst;
  };
  const Pair pairs[] = {{EM_F32, EM_BF16}, {EM_F32, EM_F16}, {EM_BF16, EM_F32}, {EM_F16, EM_F32},
                        {EM_F8_E4M3, EM_F32}, {EM_F8_E4M3, EM_BF16}, {EM_BF16, EM_F16}};
  for (const Pair& p : pairs) {
    TestWeight w = make_weight(rng, p.src, rows, cols, 0.9f);
    em_tensor src = w.view();
    const size_t bytes = static_cast<size_t>(rows * cols) * em_dtype_size(p.dst);
    std::vector<uint8_t> d0(bytes, 0), d1(bytes, 0xab);
    em_tensor t0 = em_tensor_2d(d0.data(), p.dst, rows, cols), t1 = em_tensor_2d(d1.data(), p.dst, rows, cols);
    CHECK_OK(em_convert(b.cpu, &src, &t0));
    CHECK_OK(em_convert(b.cuda, &src, &t1));
    size_t diff = 0;
    for (size_t i = 0; i < bytes; ++i) diff += d0[i] != d1[i];
    const std::string what = std::string(em_dtype_name(p.src)) + " -> " + em_dtype_name(p.dst) + " " + shape_str(rows, cols);
    std::printf("%-9s %-44s differing bytes %zu  %s\n", "convert", what.c_str(), diff, diff == 0 ? "ok" : "FAIL");
    CHECK(diff == 0, "convert %s: %zu bytes differ", what.c_str(), diff);
  }
}

// ------------------------------------------------------------------ gate

void gate_cases(Rng& rng, Backends& b) {
  struct Case {
    const char* name;
    int64_t T, D, E;
    em_gate_config cfg;
    bool bias;
  };
  const Case cases[] = {
      {"v3 sigmoid noaux_tc", 33, 512, 256, {EM_SCORE_SIGMOID, EM_TOPK_NOAUX_TC, 8, 8, 4, 1, 2.5f}, true},
      {"v2 softmax group_limited", 17, 384, 160, {EM_SCORE_SOFTMAX, EM_TOPK_GROUP_LIMITED_GREEDY, 6, 8, 3, 0, 16.0f}, false},
      {"v2-lite softmax greedy", 9, 256, 64, {EM_SCORE_SOFTMAX, EM_TOPK_GREEDY, 6, 1, 1, 0, 1.0f}, false},
  };
  for (em_dtype dt : {EM_F32, EM_BF16, EM_F8_E4M3}) {
    for (const Case& c : cases) {
      TestWeight w = make_weight(rng, dt, c.E, c.D, 0.2f);
      std::vector<float> x = rng.vec(static_cast<size_t>(c.T * c.D)), bias = rng.vec(static_cast<size_t>(c.E), -0.1f, 0.1f);
      const int k = c.cfg.top_k;
      std::vector<int32_t> i0(static_cast<size_t>(c.T * k)), i1(i0.size(), -1);
      std::vector<float> w0(i0.size()), w1(i0.size(), NAN);
      em_tensor xt = em_tensor_2d(x.data(), EM_F32, c.T, c.D), wv = w.view(), bt = em_tensor_1d(bias.data(), EM_F32, c.E);
      em_tensor it0 = em_tensor_2d(i0.data(), EM_I32, c.T, k), it1 = em_tensor_2d(i1.data(), EM_I32, c.T, k);
      em_tensor wt0 = em_tensor_2d(w0.data(), EM_F32, c.T, k), wt1 = em_tensor_2d(w1.data(), EM_F32, c.T, k);
      CHECK_OK(em_gate(b.cpu, &xt, &wv, c.bias ? &bt : nullptr, &c.cfg, &it0, &wt0));
      CHECK_OK(em_gate(b.cuda, &xt, &wv, c.bias ? &bt : nullptr, &c.cfg, &it1, &wt1));
      // Indices must agree except between (near-)tied experts, whose weights then agree.
      size_t mismatched = 0;
      for (size_t i = 0; i < i0.size(); ++i)
        if (i0[i] != i1[i] && std::fabs(w0[i] - w1[i]) > 1e-5 * std::fabs(w0[i])) ++mismatched;
      const double err = rel_err(w0, w1);
      const std::string what = std::string(em_dtype_name(dt)) + " " + c.name + " " + shape_str(c.T, c.E);
      std::printf("%-9s %-44s rel_err %.3e  tol %.0e  idx mismatches %zu  %s\n", "gate", what.c_str(), err, 1e-5,
                  mismatched, err <= 1e-5 && mismatched == 0 ? "ok" : "FAIL");
      CHECK(err <= 1e-5 && mismatched == 0, "gate %s: rel_err %.3e, %zu index mismatches", what.c_str(), err, mismatched);
    }
  }
}

// ------------------------------------------------------------------ moe_ffn

struct DeviceCopy {  // a host buffer mirrored in device memory of a CUDA backend
  em_backend* b;
  void* ptr = nullptr;
  DeviceCopy(em_backend* b_, const void* host, size_t bytes) : b(b_) {
    CHECK_OK(em_cuda_malloc(b, bytes, &ptr));
    if (ptr && bytes) CHECK_OK(em_cuda_copy(b, ptr, host, bytes));
  }
  ~DeviceCopy() {
    if (ptr) em_cuda_free(b, ptr);
  }
};

// Expert weights of the moe_ffn cases: expert e has counts[e] rows (CSR offsets), and
// w1/w3 [inter, dim], w2 [dim, inter] of dtype dt with their views.
struct MoeExperts {
  std::vector<TestWeight> w1, w2, w3;
  std::vector<em_tensor> v1, v2, v3;
  std::vector<int32_t> offsets;
  MoeExperts(Rng& rng, em_dtype dt, int64_t dim, int64_t inter, const std::vector<int32_t>& counts)
      : offsets(counts.size() + 1, 0) {
    for (size_t e = 0; e < counts.size(); ++e) {
      w1.push_back(make_weight(rng, dt, inter, dim, 0.3f));
      w2.push_back(make_weight(rng, dt, dim, inter, 0.3f));
      w3.push_back(make_weight(rng, dt, inter, dim, 0.3f));
    }
    for (size_t e = 0; e < counts.size(); ++e) {
      v1.push_back(w1[e].view());
      v2.push_back(w2[e].view());
      v3.push_back(w3[e].view());
      offsets[e + 1] = offsets[e] + counts[e];
    }
  }
  // moe_ffn arguments over these experts; rows, indices and the output are the caller's.
  em_moe_args args(const em_tensor* x) const {
    em_moe_args a{};
    a.x = x;
    a.num_experts = static_cast<int32_t>(v1.size());
    a.expert_offsets = offsets.data();
    a.w1 = v1.data();
    a.w2 = v2.data();
    a.w3 = v3.data();
    return a;
  }
};

// The lt path (cuda/fp8.cu), and the CUTLASS mode's fp8 experts (cuda/moe.cu), quantizes activations per token per 128 columns to e4m3 as
// DeepSeek's act_quant and runs cuBLASLt's block-scaled fp8 GEMM. Tolerances (max |err| / max
// |ref|): against a host reference of that exact quantization (dequantized fp8 activations x
// dequantized fp8 weights, in double) only accumulation order differs: 1e-3 with f32 output,
// 4e-3 where cuBLASLt only offers bf16 output (its rounding: 2^-9 of an element). Against the
// CPU backend (unquantized f32 activations) the activations' e4m3 rounding adds ~3% (numpy
// simulation of these shapes: 2.5-3.0%): 6e-2 for matmul, 8e-2 for moe_ffn (two quantized
// GEMMs and bf16 intermediates).
constexpr double kLtRefTolF32 = 1e-3, kLtRefTolBf16 = 4e-3, kLtCpuTol = 6e-2, kLtMoeCpuTol = 8e-2;

// After a moe_ffn on b.cuda_cutlass: on compute capability 9.0 with the CUTLASS kernels built,
// bf16 and fp8 experts (fp8 x fp8 with their block scales, activations quantized as
// DeepSeek's act_quant) must have run them; f16 runs cuBLAS's grouped GEMM.
void check_cutlass_ran(const Backends& b, em_dtype dt, const std::string& what) {
  const std::string st = em_cuda_last_status();
  const bool ran = st.find("grouped cutlass") != std::string::npos;
  const bool expected = b.cc_major == 9 && dt != EM_F16 && st.find("built without the CUTLASS") == std::string::npos;
  std::printf("%-9s %-44s %s\n", "moe_ffn", (what + " ran cutlass: " + (ran ? "yes" : "no")).c_str(),
              ran == expected ? "ok" : "FAIL");
  if (ran != expected) std::printf("          status: %s\n", st.c_str());
  CHECK(ran == expected, "moe_ffn %s: CUTLASS ran %d, expected %d (status: %s)", what.c_str(), ran, expected, st.c_str());
}

// The tolerance of a moe_ffn that just ran on b.cuda_cutlass: the lt tolerance where its fp8
// experts quantized their activations, else the grouped mode's.
double cutlass_tolerance(em_dtype dt) {
  const std::string st = em_cuda_last_status();
  return st.find("cutlass fp8 blockwise") != std::string::npos ? kLtMoeCpuTol : 2 * gemm_tolerance(dt);
}

// cutlass_mode false: the loop, the grouped mode and the loop on device memory; true: the
// opt-in CUTLASS mode alone (a case group of its own, see main).
void moe_cases(Rng& rng, Backends& b, bool cutlass_mode) {
  const int64_t dim = 256, inter = 384;
  const std::vector<int32_t> counts = {0, 5, 1, 17, 0, 40, 3, 128};
  const int32_t E = static_cast<int32_t>(counts.size());
  for (em_dtype dt : {EM_F32, EM_BF16, EM_F16, EM_F8_E4M3}) {
    MoeExperts ex(rng, dt, dim, inter, counts);
    std::vector<em_tensor>&v1 = ex.v1, &v2 = ex.v2, &v3 = ex.v3;
    const std::vector<int32_t>& offsets = ex.offsets;
    const int64_t rows = offsets[E], num_out = rows / 3, x_rows = rows / 2;
    std::vector<float> x = rng.vec(static_cast<size_t>(rows * dim)), row_weight = rng.vec(static_cast<size_t>(rows), 0.1f, 1.0f);
    std::vector<int32_t> out_index(static_cast<size_t>(rows)), x_index(static_cast<size_t>(rows));
    for (auto& i : out_index) i = rng.integer(0, static_cast<int>(num_out - 1));
    for (auto& i : x_index) i = rng.integer(0, static_cast<int>(x_rows - 1));
    std::vector<float> y_init = rng.vec(static_cast<size_t>(rows * dim));

    enum Mode { kDirect, kScatter, kAccumulate, kGather };
    const char* mode_names[] = {"direct", "weighted scatter", "weighted scatter +=", "x_index gather"};
    for (int mode = kDirect; mode <= kGather; ++mode) {
      // cuda loop, cuda grouped, cuda loop on device memory; or the CUTLASS grouped mode
      for (int variant = cutlass_mode ? 3 : 0; variant < (cutlass_mode ? 4 : 3); ++variant) {
        em_backend* cb = variant == 1 ? b.cuda_grouped : variant == 3 ? b.cuda_cutlass : b.cuda;
        if ((variant == 1 || variant == 3) && (cb == nullptr || dt == EM_F32)) continue;
        const int64_t y_rows = mode == kScatter || mode == kAccumulate ? num_out : rows;
        std::vector<float> y0(y_init.begin(), y_init.begin() + y_rows * dim), y1 = y0;
        em_tensor xt = em_tensor_2d(x.data(), EM_F32, mode == kGather ? x_rows : rows, dim);
        em_tensor yt0 = em_tensor_2d(y0.data(), EM_F32, y_rows, dim);
        em_moe_args a = ex.args(&xt);
        a.row_weight = mode == kScatter || mode == kAccumulate ? row_weight.data() : nullptr;
        a.out_index = mode == kScatter || mode == kAccumulate ? out_index.data() : nullptr;
        a.accumulate = mode == kAccumulate;
        a.x_index = mode == kGather ? x_index.data() : nullptr;
        a.y = &yt0;
        CHECK_OK(em_moe_ffn(b.cpu, &a));

        em_tensor yt1 = em_tensor_2d(y1.data(), EM_F32, y_rows, dim);
        if (variant != 2) {
          a.y = &yt1;
          CHECK_OK(em_moe_ffn(cb, &a));
        } else {
          // The production path: weights, x and y in device memory, nothing staged.
          std::vector<std::unique_ptr<DeviceCopy>> keep;
          std::vector<em_tensor> d1 = v1, d2 = v2, d3 = v3;
          for (int32_t e = 0; e < E; ++e) {
            for (auto* pair : {&d1, &d2, &d3}) {
              em_tensor& t = (*pair)[e];
              keep.push_back(std::make_unique<DeviceCopy>(cb, t.data, static_cast<size_t>(t.shape[0] * t.shape[1]) * em_dtype_size(dt)));
              t.data = keep.back()->ptr;
              if (dt == EM_F8_E4M3) {  // weight_scale_inv on the device too
                const size_t n = static_cast<size_t>((t.shape[0] + 127) / 128 * t.scale_stride);
                keep.push_back(std::make_unique<DeviceCopy>(cb, t.scale, n * sizeof(float)));
                t.scale = static_cast<const float*>(keep.back()->ptr);
              }
            }
          }
          DeviceCopy dx(cb, x.data(), sizeof(float) * static_cast<size_t>(xt.shape[0] * dim));
          DeviceCopy dy(cb, y1.data(), sizeof(float) * y1.size());
          em_tensor dxt = xt, dyt = yt1;
          dxt.data = dx.ptr;
          dyt.data = dy.ptr;
          a.x = &dxt;
          a.y = &dyt;
          a.w1 = d1.data();
          a.w2 = d2.data();
          a.w3 = d3.data();
          CHECK_OK(em_moe_ffn(cb, &a));
          CHECK_OK(em_cuda_copy(cb, y1.data(), dy.ptr, sizeof(float) * y1.size()));
        }
        const char* vname = variant == 0 ? "loop" : variant == 1 ? "grouped" : variant == 2 ? "loop, device memory" : "cutlass";
        report("moe_ffn",
               std::string(em_dtype_name(dt)) + " " + mode_names[mode] + " (" + vname + ") " +
                   shape_str(rows, dim, inter),
               rel_err(y0, y1), variant == 3 ? cutlass_tolerance(dt) : gemm_tolerance(dt) * (variant == 1 ? 2 : 1));
        if (variant == 3) check_cutlass_ran(b, dt, std::string(em_dtype_name(dt)) + " " + mode_names[mode]);
      }
    }
  }
}

// The AUTO choice (the default): fp8 experts of whole 128 x 128 blocks run CUTLASS's blockwise
// fp8 kernel where it is built and the device is compute capability 9.0, other fp8 experts the
// loop; bf16 experts of few rows each the grouped GEMM, of many rows the loop.
void moe_auto_cases(Rng& rng, Backends& b) {
  if (b.cuda_auto == nullptr) return;
  struct Case {
    em_dtype dt;
    int64_t dim, inter;
    std::vector<int32_t> counts;
    const char* want;  // "cutlass" (where it can run, else the loop), "loop" or "grouped" (not in the
                       // status: the bf16 cases check the numbers, and that CUTLASS did not run)
  };
  const std::vector<Case> cases = {
      {EM_F8_E4M3, 256, 384, {0, 5, 1, 17, 0, 40, 3, 128}, "cutlass"},
      {EM_F8_E4M3, 256, 320, {4, 9, 0, 30}, "loop"},  // intermediate not whole 128 blocks
      {EM_BF16, 256, 384, {2, 5, 1, 7}, "grouped"},   // 15 rows over 4 experts: under 64 each
      {EM_BF16, 256, 384, {70, 0, 90}, "loop"},       // 80 each
  };
  // Whether the blockwise kernel can run here at all: the CUTLASS mode says so in its status.
  bool cutlass_here = false;
  if (b.cuda_cutlass != nullptr) {
    MoeExperts ex(rng, EM_F8_E4M3, 256, 384, {3, 9});
    std::vector<float> x = rng.vec(static_cast<size_t>(12 * 256)), y(static_cast<size_t>(12 * 256));
    em_tensor xt = em_tensor_2d(x.data(), EM_F32, 12, 256), yt = em_tensor_2d(y.data(), EM_F32, 12, 256);
    em_moe_args a = ex.args(&xt);
    a.y = &yt;
    CHECK_OK(em_moe_ffn(b.cuda_cutlass, &a));
    cutlass_here = std::string(em_cuda_last_status()).find("grouped cutlass fp8 blockwise") != std::string::npos;
  }
  for (const Case& c : cases) {
    MoeExperts ex(rng, c.dt, c.dim, c.inter, c.counts);
    const int64_t rows = ex.offsets.back();
    std::vector<float> x = rng.vec(static_cast<size_t>(rows * c.dim));
    std::vector<float> y0(static_cast<size_t>(rows * c.dim)), y1 = y0;
    em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, c.dim);
    em_tensor yt0 = em_tensor_2d(y0.data(), EM_F32, rows, c.dim), yt1 = em_tensor_2d(y1.data(), EM_F32, rows, c.dim);
    em_moe_args a = ex.args(&xt);
    a.y = &yt0;
    CHECK_OK(em_moe_ffn(b.cpu, &a));
    a.y = &yt1;
    CHECK_OK(em_moe_ffn(b.cuda_auto, &a));
    const std::string st = em_cuda_last_status();
    const bool cutlass_ran = st.find("grouped cutlass fp8 blockwise") != std::string::npos;
    const bool want_cutlass = std::strcmp(c.want, "cutlass") == 0 && cutlass_here;
    const std::string what = std::string(em_dtype_name(c.dt)) + " auto, want " +
                             (want_cutlass ? "cutlass" : std::strcmp(c.want, "cutlass") == 0 ? "loop" : c.want) + " " +
                             shape_str(rows, c.dim, c.inter);
    report("moe_ffn", what, rel_err(y0, y1),
           cutlass_ran ? kLtMoeCpuTol : gemm_tolerance(c.dt) * (std::strcmp(c.want, "grouped") == 0 ? 2 : 1));
    CHECK(cutlass_ran == want_cutlass, "moe_ffn %s: the CUTLASS fp8 kernel ran %d, expected %d (status: %s)",
          what.c_str(), cutlass_ran, want_cutlass, st.c_str());
  }
}

// Widths that are not multiples of 8 (hidden 100, intermediate 36) in the grouped mode: some
// operands of the grouped GEMM are then not 16-byte aligned, which cuBLAS's grouped call may
// assume of the pointers it gets in device arrays; those run one GEMM at a time.
void moe_odd_width_cases(Rng& rng, Backends& b) {
  if (b.cuda_grouped == nullptr) return;
  const int64_t dim = 100, inter = 36;
  const std::vector<int32_t> counts = {3, 0, 7, 1, 12};
  for (em_dtype dt : {EM_BF16, EM_F16}) {
    MoeExperts ex(rng, dt, dim, inter, counts);
    const int64_t rows = ex.offsets.back();
    std::vector<float> x = rng.vec(static_cast<size_t>(rows * dim));
    std::vector<float> y0(static_cast<size_t>(rows * dim)), y1 = y0;
    em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, dim);
    em_tensor yt0 = em_tensor_2d(y0.data(), EM_F32, rows, dim), yt1 = em_tensor_2d(y1.data(), EM_F32, rows, dim);
    em_moe_args a = ex.args(&xt);
    a.y = &yt0;
    CHECK_OK(em_moe_ffn(b.cpu, &a));
    a.y = &yt1;
    CHECK_OK(em_moe_ffn(b.cuda_grouped, &a));
    std::printf("%-9s %-44s status: %s\n", "moe_ffn", "odd widths (grouped)", em_cuda_last_status());
    report("moe_ffn", std::string(em_dtype_name(dt)) + " odd widths (grouped) " + shape_str(rows, dim, inter),
           rel_err(y0, y1), gemm_tolerance(dt) * 2);
  }
}

// The loop's experts spread over streams (Context::lanes): many experts of uneven rows, the
// shard's scatter call, several times with fresh inputs; against the CPU and against the
// same loop on one stream (same cuBLAS GEMMs per expert: a race between the lanes, or a
// missing fork/join, shows as a difference far beyond rounding).
void moe_lane_cases(Rng& rng, Backends& b) {
  if (b.cuda_1s == nullptr) return;
  const int64_t dim = 256, inter = 128;
  std::vector<int32_t> counts(64);
  for (auto& c : counts) c = rng.integer(0, 3) == 0 ? 0 : rng.integer(1, 40);
  for (em_dtype dt : {EM_BF16, EM_F32}) {
    MoeExperts ex(rng, dt, dim, inter, counts);
    const int64_t rows = ex.offsets.back(), num_out = std::max<int64_t>(1, rows / 6);
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<float> x = rng.vec(static_cast<size_t>(rows * dim)), row_weight = rng.vec(static_cast<size_t>(rows), 0.1f, 1.0f);
      std::vector<int32_t> out_index(static_cast<size_t>(rows));
      for (auto& i : out_index) i = rng.integer(0, static_cast<int>(num_out - 1));
      std::vector<float> y0(static_cast<size_t>(num_out * dim)), y1 = y0, y2 = y0;
      em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, dim);
      em_tensor t0 = em_tensor_2d(y0.data(), EM_F32, num_out, dim), t1 = em_tensor_2d(y1.data(), EM_F32, num_out, dim),
                t2 = em_tensor_2d(y2.data(), EM_F32, num_out, dim);
      em_moe_args a = ex.args(&xt);
      a.row_weight = row_weight.data();
      a.out_index = out_index.data();
      a.y = &t0;
      CHECK_OK(em_moe_ffn(b.cpu, &a));
      a.y = &t1;
      CHECK_OK(em_moe_ffn(b.cuda, &a));
      a.y = &t2;
      CHECK_OK(em_moe_ffn(b.cuda_1s, &a));
      const std::string what = std::string(em_dtype_name(dt)) + " 64 experts, run " + std::to_string(rep) + " " +
                               shape_str(rows, dim, inter);
      report("moe_ffn", what + " (lanes) vs cpu", rel_err(y0, y1), gemm_tolerance(dt));
      report("moe_ffn", what + " lanes vs 1 stream", rel_err(y2, y1), 1e-5);
    }
  }
}

// Gate and up weights side by side in device memory (as the addon keeps resident weights):
// moe_ffn runs one GEMM of twice the width per expert (moe.cu, gate_up_adjacent), in the
// loop and in the grouped mode, fp8 with its scales side by side too. Checked against the
// CPU, and through em_cuda_last_status() that the fusion ran for every expert with rows.
void moe_fused_cases(Rng& rng, Backends& b) {
  const int64_t dim = 256, inter = 256;  // inter: whole 128-row fp8 blocks
  const std::vector<int32_t> counts = {3, 0, 70, 9, 1, 130};
  const int32_t E = static_cast<int32_t>(counts.size());
  int32_t with_rows = 0;
  for (int32_t c : counts) with_rows += c > 0;
  for (em_dtype dt : {EM_F32, EM_BF16, EM_F16, EM_F8_E4M3}) {
    MoeExperts ex(rng, dt, dim, inter, counts);
    const int64_t rows = ex.offsets[E], num_out = rows / 2;
    std::vector<float> x = rng.vec(static_cast<size_t>(rows * dim)), row_weight = rng.vec(static_cast<size_t>(rows), 0.1f, 1.0f);
    std::vector<int32_t> out_index(static_cast<size_t>(rows));
    for (auto& i : out_index) i = rng.integer(0, static_cast<int>(num_out - 1));
    for (int variant = 0; variant < 3; ++variant) {  // loop, grouped, cutlass
      em_backend* cb = variant == 0 ? b.cuda : variant == 1 ? b.cuda_grouped : b.cuda_cutlass;
      if (cb == nullptr || (variant > 0 && dt == EM_F32)) continue;
      std::vector<float> y0(static_cast<size_t>(num_out * dim)), y1 = y0;
      em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, dim);
      em_tensor yt0 = em_tensor_2d(y0.data(), EM_F32, num_out, dim);
      em_moe_args a = ex.args(&xt);
      a.row_weight = row_weight.data();
      a.out_index = out_index.data();
      a.y = &yt0;
      CHECK_OK(em_moe_ffn(b.cpu, &a));

      std::vector<std::unique_ptr<DeviceCopy>> keep;
      std::vector<em_tensor> d1 = ex.v1, d2 = ex.v2, d3 = ex.v3;
      auto side_by_side = [&](const void* p1, const void* p3, size_t bytes) {
        std::vector<uint8_t> both(2 * bytes);
        std::memcpy(both.data(), p1, bytes);
        std::memcpy(both.data() + bytes, p3, bytes);
        keep.push_back(std::make_unique<DeviceCopy>(cb, both.data(), both.size()));
        return static_cast<char*>(keep.back()->ptr);
      };
      for (int32_t e = 0; e < E; ++e) {
        const size_t bytes = static_cast<size_t>(inter * dim) * em_dtype_size(dt);
        char* gu = side_by_side(d1[e].data, d3[e].data, bytes);
        d1[e].data = gu;
        d3[e].data = gu + bytes;
        keep.push_back(std::make_unique<DeviceCopy>(cb, d2[e].data, bytes));
        d2[e].data = keep.back()->ptr;
        if (dt == EM_F8_E4M3) {
          const size_t sb = ex.w1[e].scale.size() * sizeof(float);
          char* s = side_by_side(d1[e].scale, d3[e].scale, sb);
          d1[e].scale = reinterpret_cast<const float*>(s);
          d3[e].scale = reinterpret_cast<const float*>(s + sb);
          keep.push_back(std::make_unique<DeviceCopy>(cb, d2[e].scale, ex.w2[e].scale.size() * sizeof(float)));
          d2[e].scale = static_cast<const float*>(keep.back()->ptr);
        }
      }
      em_tensor yt1 = em_tensor_2d(y1.data(), EM_F32, num_out, dim);
      a.y = &yt1;
      a.w1 = d1.data();
      a.w2 = d2.data();
      a.w3 = d3.data();
      CHECK_OK(em_moe_ffn(cb, &a));
      const std::string st = em_cuda_last_status();
      const std::string want = "gate/up fused for " + std::to_string(with_rows);
      const bool ran = st.size() >= want.size() && st.compare(st.size() - want.size(), want.size(), want) == 0;
      const std::string what = std::string(em_dtype_name(dt)) + " gate/up side by side (" +
                               (variant == 0 ? "loop" : variant == 1 ? "grouped" : "cutlass") + ") " +
                               shape_str(rows, dim, inter);
      report("moe_ffn", what, rel_err(y0, y1), variant == 2 ? cutlass_tolerance(dt) : gemm_tolerance(dt) * (variant > 0 ? 2 : 1));
      if (variant == 2) check_cutlass_ran(b, dt, std::string(em_dtype_name(dt)) + " side by side");
      std::printf("%-9s %-44s %s\n", "moe_ffn", (what + " fused").c_str(), ran ? "ok" : "FAIL");
      CHECK(ran, "moe_ffn %s: the gate/up fusion did not run (status: %s)", what.c_str(), st.c_str());
    }
  }
}

// ------------------------------------------------------------------ wgmma primitives

// cuda/wgmma.cuh on its own (sm_90a builds on compute capability 9.0 only): B K-major and
// N-major as the MLA wgmma kernel reads them. (The probe's third variant, N-major with its
// strides swapped, is not run: on the H200 of 2026-12-04 it faulted, an illegal address that
// poisons the context for every later case, while both layouts above matched.)
// Set when a wgmma probe ran here: EM_CUDA_MLA=wgmma must then run the wgmma kernel.
bool g_wgmma_probed = false;

void wgmma_cases(int cc_major) {
  const char* names[] = {"B K-major", "B N-major"};
  for (int n : {32, 256}) {
    for (int variant = 0; variant < 2; ++variant) {
      double err = 0.0;
      const char* what = "";
      const int rc = wgmma_probe(n, variant, &err, &what);
      const std::string name = std::string("m64n") + std::to_string(n) + "k16 " + names[variant];
      if (rc == 1 || cc_major != 9) {
        std::printf("%-9s %-44s not run: needs an sm_90a build on a compute capability 9.0 GPU\n", "wgmma",
                    name.c_str());
        continue;
      }
      CHECK(rc == 0, "wgmma %s: CUDA error %s", name.c_str(), what);
      if (rc != 0) continue;
      g_wgmma_probed = true;
      report("wgmma", name, err, 1e-4);
    }
  }
}

// ------------------------------------------------------------------ fp8 lt (EM_CUDA_FP8_LT)


std::string lt_status() { return em_cuda_last_status(); }
bool lt_ran(const std::string& st) { return st.rfind("fp8 lt: cublasLt", 0) == 0; }
bool lt_fell_back(const std::string& st) { return st.rfind("fp8 lt: fallback", 0) == 0; }

// e4m3 (float8_e4m3fn) code of v: round to nearest, ties to even, saturated to +-448 (as
// __nv_cvt_float_to_fp8 with __NV_SATFINITE). Written independently of the engine.
uint8_t ref_to_e4m3(float v) {
  if (std::isnan(v)) return 0x7f;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  const double a = std::fabs(static_cast<double>(v));
  if (a >= 448.0) return sign | 0x7e;
  int lo = 0, hi = 0x7e;  // codes 0..0x7e increase with their value: largest code with value <= a
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (ref_fp8(static_cast<uint8_t>(mid)) <= a) lo = mid;
    else hi = mid - 1;
  }
  const double below = ref_fp8(static_cast<uint8_t>(lo)), above = ref_fp8(static_cast<uint8_t>(lo + 1));
  const double d0 = a - below, d1 = above - a;
  const int code = d0 < d1 ? lo : d1 < d0 ? lo + 1 : (lo % 2 == 0 ? lo : lo + 1);
  return static_cast<uint8_t>(sign | code);
}

// x [M, K] (ld ldx, K % 128 == 0) as act_quant leaves it: dequantized, in double.
std::vector<double> ref_act_quant(const float* x, int64_t ldx, int64_t M, int64_t K) {
  std::vector<double> out(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < K; g += 128) {
      float amax = 0.0f;
      for (int64_t c = g; c < g + 128; ++c) amax = std::max(amax, std::fabs(x[m * ldx + c]));
      const float sc = amax > 0.0f ? amax / 448.0f : 1.0f;
      for (int64_t c = g; c < g + 128; ++c)
        out[static_cast<size_t>(m * K + c)] = ref_fp8(ref_to_e4m3(x[m * ldx + c] / sc)) * static_cast<double>(sc);
    }
  }
  return out;
}

void fp8_lt_cases(Rng& rng, Backends& b, int cc_major) {
  if (b.cuda_lt == nullptr) return;
  struct Case {
    int64_t M, N, K, row0, col0, pr, pc;
    bool eligible;  // meets the lt path's requirements (K % 128 == 0, 16-byte aligned weight rows)
  };
  const Case cases[] = {
      {33, 2048, 7168, 0, 0, 2048, 7168, true},  // V3 expert gate/up (7168 -> 2048); M % 8 != 0 (padded)
      {64, 7168, 2048, 0, 0, 7168, 2048, true},  // V3 expert down (2048 -> 7168)
      {1, 256, 512, 0, 0, 256, 512, true},       // decode
      {7, 300, 384, 0, 0, 300, 384, true},       // N off the 128 grid
      {12, 576, 1024, 0, 0, 576, 1024, true},    // V3 wkv_a-like N 576
      {3, 200, 256, 128, 128, 512, 704, true},   // view: scale stride 6 != round_up(2, 4): repacked
      {9, 129, 300, 0, 0, 129, 300, false},      // K not a multiple of 128
      {5, 64, 256, 0, 0, 64, 260, false},        // weight row stride 260 (not 16-byte aligned)
  };
  bool printed_unavailable = false;
  for (const Case& c : cases) {
    Fp8Matmul t(rng, b.cpu, c.M, c.N, c.K, c.row0, c.col0, c.pr, c.pc);
    const std::vector<float>& xs = t.xs;
    const std::vector<float>& y0 = t.y0;
    std::vector<float>& y1 = t.y1;
    const TestWeight& parent = t.parent;
    CHECK_OK(em_matmul(b.cuda_lt, &t.x, &t.w, &t.out));
    const std::string st = lt_status();
    std::string what = "fp8 lt " + shape_str(c.M, c.N, c.K);
    if (c.pr != c.N || c.pc != c.K) what += " view of " + shape_str(c.pr, c.pc);
    if (!lt_ran(st)) {
      // The default path ran: it must say why, and be the default path's result.
      CHECK(lt_fell_back(st), "%s: em_cuda_last_status '%s' names neither path", what.c_str(), st.c_str());
      if (cc_major < 9 && !printed_unavailable) {
        std::printf("matmul    fp8 lt: not available on this device (%s), asserting the fallback\n", st.c_str());
        printed_unavailable = true;
      }
      // On sm_90 every eligible shape must take the lt path (Blackwell: cuBLASLt decides).
      CHECK(!(c.eligible && cc_major == 9), "%s: expected the cuBLASLt path on sm_90, got '%s'", what.c_str(), st.c_str());
      std::printf("          %s -> %s\n", what.c_str(), st.c_str());
      report("matmul", what + " (fallback)", rel_err(y0, y1), fp8_matmul_tolerance(c.M));
      continue;
    }
    CHECK(c.eligible, "%s: took the lt path but should have fallen back (%s)", what.c_str(), st.c_str());
    // Host reference: act_quant'ed activations x the exact weight values, in double.
    const std::vector<double> xq = ref_act_quant(xs.data(), c.K + 3, c.M, c.K);
    std::vector<float> ref(y0.size());
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t n = 0; n < c.N; ++n) {
        double acc = 0.0;
        const double* xr = &xq[static_cast<size_t>(m * c.K)];
        for (int64_t k = 0; k < c.K; ++k) acc += xr[k] * parent.at(c.row0 + n, c.col0 + k);
        ref[static_cast<size_t>(m * c.N + n)] = static_cast<float>(acc);
      }
    }
    const bool bf16_out = st.find("bf16 out") != std::string::npos;
    report("matmul", what + (bf16_out ? " vs act_quant ref (bf16 out)" : " vs act_quant ref"), rel_err(ref, y1),
           bf16_out ? kLtRefTolBf16 : kLtRefTolF32);
    report("matmul", what + " vs cpu", rel_err(y0, y1), kLtCpuTol);
  }

  // moe_ffn: every expert GEMM on the lt path (the status after the call names the last one),
  // against the CPU backend. Direct and weighted scatter (the loop's two output paths).
  const int64_t dim = 256, inter = 384;
  const std::vector<int32_t> counts = {0, 5, 1, 17, 0, 40, 3, 128};
  const int32_t E = static_cast<int32_t>(counts.size());
  MoeExperts ex(rng, EM_F8_E4M3, dim, inter, counts);
  const std::vector<int32_t>& offsets = ex.offsets;
  const int64_t rows = offsets[E], num_out = rows / 3;
  std::vector<float> x = rng.vec(static_cast<size_t>(rows * dim)), row_weight = rng.vec(static_cast<size_t>(rows), 0.1f, 1.0f);
  std::vector<int32_t> out_index(static_cast<size_t>(rows));
  for (auto& i : out_index) i = rng.integer(0, static_cast<int>(num_out - 1));
  for (int scatter = 0; scatter < 2; ++scatter) {
    const int64_t y_rows = scatter ? num_out : rows;
    std::vector<float> y0(static_cast<size_t>(y_rows * dim), 0.0f), y1(y0.size(), NAN);
    em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, dim);
    em_tensor yt0 = em_tensor_2d(y0.data(), EM_F32, y_rows, dim), yt1 = em_tensor_2d(y1.data(), EM_F32, y_rows, dim);
    em_moe_args a = ex.args(&xt);
    a.row_weight = scatter ? row_weight.data() : nullptr;
    a.out_index = scatter ? out_index.data() : nullptr;
    a.y = &yt0;
    CHECK_OK(em_moe_ffn(b.cpu, &a));
    a.y = &yt1;
    CHECK_OK(em_moe_ffn(b.cuda_lt, &a));
    const std::string st = lt_status();
    const std::string what = std::string("fp8 lt ") + (scatter ? "weighted scatter " : "direct ") + shape_str(rows, dim, inter);
    if (cc_major == 9) CHECK(lt_ran(st), "%s: expected the cuBLASLt path on sm_90, got '%s'", what.c_str(), st.c_str());
    else CHECK(lt_ran(st) || lt_fell_back(st), "%s: em_cuda_last_status '%s' names neither path", what.c_str(), st.c_str());
    if (!lt_ran(st)) std::printf("          %s -> %s\n", what.c_str(), st.c_str());
    report("moe_ffn", what + (lt_ran(st) ? " vs cpu" : " (fallback) vs cpu"), rel_err(y0, y1),
           lt_ran(st) ? kLtMoeCpuTol : 2 * gemm_tolerance(EM_F8_E4M3));  // fallback: the grouped mode's
  }
}

// ------------------------------------------------------------------ mla_attention

// Tolerances: f32 weights with an f32 cache are fp32 throughout (summation order only).
// bf16/f16/fp8 weights round q_nope and o_lat for tensor-core GEMMs (fp8: dequantized to
// bf16), as gemm_tolerance. A bf16 cache: the tensor-core kernel (C 512, dr 64) rounds q_lat
// and the softmax weights to bf16 (and a CPU reference run with EM_CPU_ISA=avx512bf16
// rounds q for its bf16 dot products), so bf16's tolerance.
double mla_tolerance(em_dtype w, em_dtype cache) {
  return std::max(gemm_tolerance(w), cache == EM_BF16 ? gemm_tolerance(EM_BF16) : gemm_tolerance(EM_F32));
}

struct MlaDims {
  const char* name;
  int64_t H, dn, dr, dv, C;
};

struct MlaSeq {
  int64_t cache_rows;
  std::vector<int32_t> positions;  // of its query tokens
};

std::vector<int32_t> mla_range(int32_t a, int32_t b) {
  std::vector<int32_t> v;
  for (int32_t i = a; i < b; ++i) v.push_back(i);
  return v;
}

enum MlaMemory { kMlaHost, kMlaDevice };

// Random q for `positions`, the two outputs (y0: CPU, y1: CUDA) and the call's arguments,
// writing y0; the caller sets a.caches or a.pages. Not copyable: a points into it.
struct MlaCall {
  std::vector<float> q, y0, y1;
  em_tensor qt, wt, ot0, ot1;
  em_mla_args a;
  MlaCall(Rng& rng, const MlaDims& d, TestWeight& wkv_b, const std::vector<int32_t>& positions,
          const int32_t* q_offsets, int32_t num_seqs) {
    const int64_t T = static_cast<int64_t>(positions.size());
    q = rng.vec(static_cast<size_t>(T * d.H * (d.dn + d.dr)));
    y0.assign(static_cast<size_t>(T * d.H * d.dv), 0.0f);
    y1.assign(y0.size(), NAN);
    qt = em_tensor_3d(q.data(), EM_F32, T, d.H, d.dn + d.dr);
    wt = wkv_b.view();
    ot0 = em_tensor_3d(y0.data(), EM_F32, T, d.H, d.dv);
    ot1 = em_tensor_3d(y1.data(), EM_F32, T, d.H, d.dv);
    const float scale = static_cast<float>(em_mla_softmax_scale(static_cast<int32_t>(d.dn + d.dr), 40.0, 0.707));
    a = em_mla_args{static_cast<int32_t>(d.H), static_cast<int32_t>(d.dn), static_cast<int32_t>(d.dr),
                    static_cast<int32_t>(d.dv), static_cast<int32_t>(d.C), scale, &qt, positions.data(),
                    num_seqs, q_offsets, nullptr, &wt, &ot0, nullptr};
  }
  MlaCall(const MlaCall&) = delete;
  MlaCall& operator=(const MlaCall&) = delete;
};

// With EM_CUDA_MLA=wgmma where the probe ran: the wgmma kernel is what ran (the backend
// falls back to the tensor-core kernel quietly: a pass would say nothing about wgmma).
void expect_wgmma_ran(const std::string& what) {
  const char* want = std::getenv("EM_CUDA_MLA");
  if (!g_wgmma_probed || want == nullptr || std::strcmp(want, "wgmma") != 0) return;
  const std::string st = em_cuda_last_status();
  CHECK(st.find("wgmma=") != std::string::npos, "%s: the wgmma kernel did not run (%s)", what.c_str(), st.c_str());
}

// One em_mla_attention call on both backends. cache_pad: extra elements per cache row (a
// strided view; an odd pad on a bf16 cache takes the fp32 kernel's unaligned fallback).
void mla_case(Rng& rng, Backends& b, const MlaDims& d, TestWeight& wkv_b, const std::vector<MlaSeq>& seqs,
              em_dtype cdt, const std::string& what, int64_t cache_pad = 0, MlaMemory mem = kMlaHost) {
  const int64_t row = d.C + d.dr, ld = row + cache_pad;
  std::vector<std::vector<uint8_t>> cache_bytes;
  std::vector<em_tensor> caches;
  std::vector<int32_t> positions, q_offsets = {0};
  for (const MlaSeq& s : seqs) {
    const size_t n = static_cast<size_t>(s.cache_rows * ld);
    std::vector<uint8_t> bytes = random_cache(rng, cdt, n);
    cache_bytes.push_back(std::move(bytes));
    em_tensor c = em_tensor_2d(cache_bytes.back().data(), cdt, s.cache_rows, row);
    c.stride[0] = ld;
    caches.push_back(c);
    positions.insert(positions.end(), s.positions.begin(), s.positions.end());
    q_offsets.push_back(static_cast<int32_t>(positions.size()));
  }
  MlaCall call(rng, d, wkv_b, positions, seqs.size() > 1 ? q_offsets.data() : nullptr,
               static_cast<int32_t>(seqs.size()));
  em_mla_args& a = call.a;
  a.caches = caches.data();
  CHECK_OK(em_mla_attention(b.cpu, &a));
  if (mem == kMlaHost) {
    a.out = &call.ot1;
    CHECK_OK(em_mla_attention(b.cuda, &a));
    expect_wgmma_ran(what);
  } else {
    // The production path: q, wkv_b (and its scales), caches and out in device memory.
    std::vector<std::unique_ptr<DeviceCopy>> keep;
    auto dev = [&](const void* p, size_t bytes) {
      keep.push_back(std::make_unique<DeviceCopy>(b.cuda, p, bytes));
      return keep.back()->ptr;
    };
    em_tensor dq = call.qt, dw = call.wt, dout = call.ot1;
    dq.data = dev(call.q.data(), call.q.size() * sizeof(float));
    dw.data = dev(wkv_b.bytes.data(), wkv_b.bytes.size());
    if (wkv_b.dtype == EM_F8_E4M3) dw.scale = static_cast<const float*>(dev(wkv_b.scale.data(), wkv_b.scale.size() * sizeof(float)));
    dout.data = dev(call.y1.data(), call.y1.size() * sizeof(float));
    std::vector<em_tensor> dcaches = caches;
    for (size_t s = 0; s < caches.size(); ++s) dcaches[s].data = dev(cache_bytes[s].data(), cache_bytes[s].size());
    a.q = &dq;
    a.wkv_b = &dw;
    a.caches = dcaches.data();
    a.out = &dout;
    CHECK_OK(em_mla_attention(b.cuda, &a));
    expect_wgmma_ran(what);
    CHECK_OK(em_cuda_copy(b.cuda, call.y1.data(), dout.data, call.y1.size() * sizeof(float)));
  }
  report("mla", std::string(em_dtype_name(wkv_b.dtype)) + "/" + em_dtype_name(cdt) + " " + d.name + " " + what,
         rel_err(call.y0, call.y1), mla_tolerance(wkv_b.dtype, cdt));
}

// Paged rows (em_kv_pages): the CPU backend reads the blocks in place; the CUDA backend gets
// a pool in host memory gathered by the dispatcher, and gathers one in its device memory
// itself (mem = kMlaDevice: the addon's KV mirror); blocks in reverse order.
void mla_paged_case(Rng& rng, Backends& b, const MlaDims& d, TestWeight& wkv_b, const std::vector<MlaSeq>& seqs,
                    em_dtype pdt, int32_t block_size, MlaMemory mem = kMlaHost) {
  const size_t rb = em_kv_row_bytes(pdt, static_cast<int32_t>(d.C), static_cast<int32_t>(d.dr));
  int32_t num_blocks = 0;
  for (const MlaSeq& s : seqs) num_blocks += static_cast<int32_t>((s.cache_rows + block_size - 1) / block_size);
  std::vector<uint8_t> pool(static_cast<size_t>(num_blocks) * static_cast<size_t>(block_size) * rb);
  const int64_t rows = static_cast<int64_t>(pool.size() / rb);
  if (pdt == EM_F8_E4M3) {
    const int64_t ns = (d.C + 127) / 128;
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* row = pool.data() + static_cast<size_t>(r) * rb;
      for (int64_t c = 0; c < d.C; ++c) {
        const int code = rng.integer(0, 253);  // 0x7f (NaN) skipped below
        row[c] = static_cast<uint8_t>(code >= 0x7f ? code + 1 : code);
      }
      for (int64_t k = 0; k < ns; ++k) {
        const float sc = rng.uniform(0.5f, 2.0f) / 448.0f;
        std::memcpy(row + d.C + 4 * k, &sc, 4);
      }
      const std::vector<uint8_t> pe = random_cache(rng, EM_BF16, static_cast<size_t>(d.dr));
      std::memcpy(row + d.C + 4 * ns, pe.data(), pe.size());
    }
  } else {
    pool = random_cache(rng, pdt, static_cast<size_t>(rows * (d.C + d.dr)));
  }
  std::vector<int32_t> table, table_offsets = {0}, positions, q_offsets = {0};
  int32_t next = num_blocks;
  for (const MlaSeq& s : seqs) {
    for (int64_t r = 0; r < s.cache_rows; r += block_size) table.push_back(--next);
    table_offsets.push_back(static_cast<int32_t>(table.size()));
    positions.insert(positions.end(), s.positions.begin(), s.positions.end());
    q_offsets.push_back(static_cast<int32_t>(positions.size()));
  }
  em_kv_pages pages{pool.data(), pdt, num_blocks, block_size, table.data(), table_offsets.data()};
  MlaCall call(rng, d, wkv_b, positions, q_offsets.data(), static_cast<int32_t>(seqs.size()));
  call.a.pages = &pages;
  CHECK_OK(em_mla_attention(b.cpu, &call.a));
  call.a.out = &call.ot1;
  std::unique_ptr<DeviceCopy> device_pool;
  if (mem == kMlaDevice) {
    device_pool = std::make_unique<DeviceCopy>(b.cuda, pool.data(), pool.size());
    pages.pool = device_pool->ptr;
  }
  CHECK_OK(em_mla_attention(b.cuda, &call.a));
  if (pdt == EM_BF16) expect_wgmma_ran(std::string("paged bf16 ") + d.name);  // (others gather to f32)
  report("mla",
         std::string(em_dtype_name(wkv_b.dtype)) + "/paged " + em_dtype_name(pdt) + " " + d.name + " blocks of " +
             std::to_string(block_size) + (mem == kMlaDevice ? ", pool in device memory" : ""),
         rel_err(call.y0, call.y1), mla_tolerance(wkv_b.dtype, pdt == EM_BF16 ? EM_BF16 : EM_F32));
}

// em_cuda_copy_ranges (the addon's KV mirror flush): host ranges into a device buffer at the
// same offsets, 1, 2 (plain copies) and many (packed, scattered by a kernel): aligned rows,
// odd offsets and lengths, empty and overlapping ranges; every other device byte untouched.
void copy_ranges_cases(Rng& rng, Backends& b) {
  const size_t bytes = 1 << 20;
  std::vector<uint8_t> host(bytes), before(bytes);
  for (auto& v : host) v = static_cast<uint8_t>(rng.integer(0, 255));
  for (auto& v : before) v = static_cast<uint8_t>(rng.integer(0, 255));
  for (int n : {1, 2, 3, 64, 700}) {
    DeviceCopy dev(b.cuda, before.data(), bytes);
    std::vector<size_t> at, len;
    std::vector<uint8_t> want = before;
    for (int i = 0; i < n; ++i) {
      const bool row = i % 3 == 0;  // 1152-byte rows at 1152-byte offsets (V3's bf16 rows), else odd
      const size_t l = row ? 1152 : static_cast<size_t>(rng.integer(0, 3000));
      const size_t o = row ? 1152 * static_cast<size_t>(rng.integer(0, static_cast<int>(bytes / 1152) - 1))
                           : static_cast<size_t>(rng.integer(0, static_cast<int>(bytes - l)));
      at.push_back(o);
      len.push_back(l);
      std::memcpy(want.data() + o, host.data() + o, l);
    }
    if (n >= 3) {  // overlapping the first range
      at.push_back(at[0] + len[0] / 2);
      len.push_back(len[0]);
      std::memcpy(want.data() + at.back(), host.data() + at.back(), len.back());
    }
    CHECK_OK(em_cuda_copy_ranges(b.cuda, dev.ptr, host.data(), at.data(), len.data(), at.size()));
    std::vector<uint8_t> got(bytes);
    CHECK_OK(em_cuda_copy(b.cuda, got.data(), dev.ptr, bytes));
    size_t differing = 0;
    for (size_t i = 0; i < bytes; ++i) differing += got[i] != want[i];
    std::printf("%-9s %-44s differing bytes %zu  %s\n", "copy", (std::to_string(at.size()) + " ranges to device").c_str(),
                differing, differing == 0 ? "ok" : "FAIL");
    CHECK(differing == 0, "em_cuda_copy_ranges, %zu ranges: %zu bytes differ", at.size(), differing);
  }
}

// Paged pools in device memory (the addon's KV mirror): the CUDA backend gathers the rows
// there (attention.cu, kv_gather_kernel). V2-Lite and V3 dims; a sequence with no query token
// in the batch; blocks of 16 and 7 rows; and tiny dims whose rows are not 16-byte multiples
// (fp8: 40 codes, one scale, 8 bf16).
void mla_device_pool_cases(Rng& rng, Backends& b) {
  const MlaDims small{"small", 3, 16, 8, 12, 40}, lite{"v2-lite", 16, 128, 64, 128, 512}, v3{"v3", 128, 128, 64, 128, 512};
  TestWeight ws = make_weight(rng, EM_BF16, small.H * (small.dn + small.dv), small.C, 0.25f);
  TestWeight wl = make_weight(rng, EM_BF16, lite.H * (lite.dn + lite.dv), lite.C, 0.25f);
  TestWeight w3 = make_weight(rng, EM_F8_E4M3, v3.H * (v3.dn + v3.dv), v3.C, 0.25f);
  for (em_dtype pdt : {EM_F32, EM_BF16, EM_F8_E4M3}) {
    mla_paged_case(rng, b, small, ws, {{33, {32}}, {5, mla_range(0, 5)}}, pdt, 4, kMlaDevice);
    mla_paged_case(rng, b, lite, wl, {{37, {36}}, {1000, {999}}, {70, mla_range(60, 70)}}, pdt, 16, kMlaDevice);
    mla_paged_case(rng, b, lite, wl, {{50, {49}}, {9, {}}, {300, mla_range(280, 300)}}, pdt, 7, kMlaDevice);
  }
  mla_paged_case(rng, b, v3, w3, {{1, {0}}, {2000, {1999}}, {4096, {4095}}}, EM_BF16, 16, kMlaDevice);
}

void mla_cases(Rng& rng, Backends& b) {
  for (em_dtype dt : {EM_F32, EM_BF16, EM_F16, EM_F8_E4M3})
    CHECK(em_supports_op(b.cuda, EM_OP_MLA_ATTENTION, dt) == 1, "mla_attention must support %s weights", em_dtype_name(dt));
  // Tiny-model dims (as test_attention): the fp32 kernel for both cache dtypes.
  const MlaDims small{"small", 3, 16, 8, 12, 40}, wide{"wide", 16, 32, 16, 32, 64};
  for (em_dtype wdt : {EM_F32, EM_BF16, EM_F16, EM_F8_E4M3}) {
    TestWeight ws = make_weight(rng, wdt, small.H * (small.dn + small.dv), small.C, 0.25f);
    for (em_dtype cdt : {EM_F32, EM_BF16}) {
      mla_case(rng, b, small, ws, {{9, mla_range(0, 9)}}, cdt, "prefill 9");
      mla_case(rng, b, small, ws, {{1, {0}}, {37, {36}}, {1000, {999}}, {4096, {4095}}}, cdt, "decode S=1,37,1000,4096");
      mla_case(rng, b, small, ws, {{30, mla_range(5, 30)}, {3, {2}}, {7, mla_range(4, 7)}}, cdt, "chunked batch", 5);
    }
  }
  {
    TestWeight ww = make_weight(rng, EM_BF16, wide.H * (wide.dn + wide.dv), wide.C, 0.25f);
    mla_case(rng, b, wide, ww, {{70, mla_range(0, 70)}}, EM_BF16, "prefill 70");
    mla_case(rng, b, wide, ww, {{2000, {1999}}, {5, {4}}}, EM_F32, "decode S=2000,5");
  }
  // V2-Lite (16 heads: groups of 4 tokens x 16 heads on the tensor-core kernel) and V3 dims.
  const MlaDims lite{"v2-lite", 16, 128, 64, 128, 512}, v3{"v3", 128, 128, 64, 128, 512};
  {
    TestWeight wl = make_weight(rng, EM_BF16, lite.H * (lite.dn + lite.dv), lite.C, 0.25f);
    mla_case(rng, b, lite, wl, {{70, mla_range(0, 70)}}, EM_BF16, "prefill 70");
    mla_case(rng, b, lite, wl, {{1, {0}}, {37, {36}}, {1000, {999}}, {4096, {4095}}}, EM_BF16, "decode S=1,37,1000,4096");
    for (em_dtype pdt : {EM_F32, EM_BF16, EM_F8_E4M3})
      mla_paged_case(rng, b, lite, wl, {{37, {36}}, {1000, {999}}, {70, mla_range(60, 70)}}, pdt, 16);
    mla_case(rng, b, lite, wl, {{300, mla_range(250, 300)}, {9, {7, 8}}}, EM_BF16, "chunked prefill + MTP");
    // Two tokens far apart in one group: the first sees none of the cache rows of 31 of the
    // group's 32 chunks (fully masked rows in a split group).
    mla_case(rng, b, lite, wl, {{4096, {100, 4095}}}, EM_BF16, "tokens at 100, 4095 (fully masked chunk rows)");
  }
  {
    // 20 heads: groups of 60 rows, not a multiple of the kernel's 16-row blocks.
    const MlaDims h20{"h20", 20, 128, 64, 128, 512};
    TestWeight wh = make_weight(rng, EM_BF16, h20.H * (h20.dn + h20.dv), h20.C, 0.25f);
    mla_case(rng, b, h20, wh, {{4096, {1000, 2000, 4095}}}, EM_BF16, "tokens at 1000, 2000, 4095 (partial row blocks)");
  }
  const std::vector<MlaSeq> decode = {{1, {0}}, {37, {36}}, {1000, {999}}, {4096, {4095}}};
  for (em_dtype wdt : {EM_BF16, EM_F32, EM_F8_E4M3}) {
    TestWeight w = make_weight(rng, wdt, v3.H * (v3.dn + v3.dv), v3.C, 0.25f);
    if (wdt == EM_F32) {
      mla_case(rng, b, v3, w, decode, EM_F32, "decode S=1,37,1000,4096");
      mla_case(rng, b, v3, w, {{200, mla_range(0, 200)}}, EM_F32, "prefill 200");
      mla_case(rng, b, v3, w, decode, EM_BF16, "decode S=1,37,1000,4096");
    } else if (wdt == EM_BF16) {
      mla_case(rng, b, v3, w, decode, EM_BF16, "decode S=1,37,1000,4096");
      mla_case(rng, b, v3, w, decode, EM_BF16, "decode, device memory", 0, kMlaDevice);
      mla_case(rng, b, v3, w, {{5000, {4999}}}, EM_BF16, "decode S=5000, ld +8", 8);
      mla_case(rng, b, v3, w, {{1000, {999}}, {64, {63}}}, EM_BF16, "decode, ld +3 (fp32 kernel)", 3);
      mla_case(rng, b, v3, w, {{200, mla_range(0, 200)}}, EM_BF16, "prefill 200");
      mla_case(rng, b, v3, w, {{300, mla_range(250, 300)}, {40, mla_range(0, 40)}}, EM_BF16, "chunked prefill batch");
      mla_case(rng, b, v3, w, {{1000, {999}}, {37, {36}}}, EM_F32, "decode S=1000,37");
      // The SIMT kernel's 16-row tiles, which GPUs with 99 KB of shared memory per block run.
      setenv("EM_CUDA_MLA", "simt16", 1);
      mla_case(rng, b, v3, w, {{1000, {999}}, {37, {36}}}, EM_BF16, "decode S=1000,37, 16-row SIMT tiles");
      mla_case(rng, b, v3, w, {{70, mla_range(0, 70)}}, EM_F32, "prefill 70, 16-row SIMT tiles");
      unsetenv("EM_CUDA_MLA");
    } else {
      mla_case(rng, b, v3, w, decode, EM_BF16, "decode S=1,37,1000,4096");
      mla_case(rng, b, v3, w, decode, EM_BF16, "decode, device memory", 0, kMlaDevice);
    }
  }
}

// The wgmma kernel ($EM_CUDA_MLA=wgmma, opt-in): it runs on compute capability 9.0 with an
// sm_90a build (where the wgmma probe cases say "ok"; elsewhere these cases run the
// tensor-core kernel). In their own run (--wgmma): a kernel that faults leaves the CUDA
// context unusable, and its verdict is not the backend's.
void mla_wgmma_cases(Rng& rng, Backends& b) {
  const MlaDims lite{"v2-lite", 16, 128, 64, 128, 512}, v3{"v3", 128, 128, 64, 128, 512};
  setenv("EM_CUDA_MLA", "wgmma", 1);
  TestWeight w = make_weight(rng, EM_BF16, v3.H * (v3.dn + v3.dv), v3.C, 0.25f);
  mla_case(rng, b, v3, w, {{1, {0}}, {37, {36}}, {1000, {999}}, {4096, {4095}}}, EM_BF16, "decode S=1,37,1000,4096 (wgmma)");
  mla_case(rng, b, v3, w, {{200, mla_range(0, 200)}}, EM_BF16, "prefill 200 (wgmma)");
  mla_case(rng, b, v3, w, {{300, mla_range(250, 300)}, {40, mla_range(0, 40)}}, EM_BF16, "chunked batch (wgmma)");
  mla_case(rng, b, v3, w, {{5000, {4999}}}, EM_BF16, "decode S=5000, ld +8 (wgmma)", 8);
  mla_case(rng, b, v3, w, {{4096, {100, 4095}}}, EM_BF16, "tokens at 100, 4095 (wgmma)");
  TestWeight wl = make_weight(rng, EM_BF16, lite.H * (lite.dn + lite.dv), lite.C, 0.25f);
  mla_case(rng, b, lite, wl, {{70, mla_range(0, 70)}}, EM_BF16, "prefill 70: 4 tokens x 16 heads (wgmma)");
  // Rows fully masked in a split group (merged by the combine kernel), decode with 16 live
  // rows of 64, and 60-row groups.
  mla_case(rng, b, lite, wl, {{4096, {100, 4095}}}, EM_BF16, "tokens at 100, 4095: masked split rows (wgmma)");
  mla_case(rng, b, lite, wl, {{1, {0}}, {37, {36}}, {1000, {999}}}, EM_BF16, "decode, 16 rows (wgmma)");
  {
    const MlaDims h20{"h20", 20, 128, 64, 128, 512};
    TestWeight wh = make_weight(rng, EM_BF16, h20.H * (h20.dn + h20.dv), h20.C, 0.25f);
    mla_case(rng, b, h20, wh, {{4096, {1000, 2000, 4095}}}, EM_BF16, "60-row groups (wgmma)");
  }
  // The addon's KV mirror: the pool gathered on the device, then the wgmma kernel.
  mla_paged_case(rng, b, v3, w, {{1, {0}}, {2000, {1999}}}, EM_BF16, 16, kMlaDevice);
  unsetenv("EM_CUDA_MLA");
}

void support_table(Backends& b) {
  std::printf("cuda supports_op (op: f32 bf16 f16 fp8):\n");
  for (int op = 0; op < EM_OP_COUNT; ++op) {
    std::printf("  %-14s", em_op_name(static_cast<em_op>(op)));
    for (em_dtype d : {EM_F32, EM_BF16, EM_F16, EM_F8_E4M3})
      std::printf(" %s", em_supports_op(b.cuda, static_cast<em_op>(op), d) ? "yes" : " - ");
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a run killed by a timeout keeps its log
  if (!em_cuda_compiled()) {
    std::printf("cuda_parity: NO CUDA DEVICE: %s\n", em_cuda_last_status());
    return kNoDevice;
  }
  const int count = em_cuda_device_count();
  if (count == 0) {
    std::printf("cuda_parity: NO CUDA DEVICE: %s\n", em_cuda_last_status());
    return kNoDevice;
  }
  // test_cuda_parity [device] [--wgmma | --opt-in]: --wgmma runs the opt-in wgmma kernel's
  // cases alone (its primitives, then MLA with EM_CUDA_MLA=wgmma), --opt-in the other opt-in
  // paths written without a GPU (gate/up side by side, the CUTLASS mode, the KV pool in device
  // memory); the default run leaves both out, so their verdicts stay apart from the backend's.
  bool wgmma_only = false, opt_in_only = false;
  const char* device_arg = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--wgmma") == 0) wgmma_only = true;
    else if (std::strcmp(argv[i], "--opt-in") == 0) opt_in_only = true;
    else device_arg = argv[i];
  }
  const char* env = std::getenv("EM_CUDA_DEVICE");
  const int device = device_arg ? std::atoi(device_arg) : env ? std::atoi(env) : 0;
  Backends b;
  CHECK_OK(em_backend_create_cpu(nullptr, &b.cpu));
  em_cuda_config cfg{device, EM_CUDA_MOE_LOOP, EM_CUDA_FP8_DEFAULT, EM_CUDA_MOE_STREAMS_DEFAULT, 0};
  CHECK_OK(em_backend_create_cuda(&cfg, &b.cuda));
  cfg.moe_streams = 1;
  CHECK_OK(em_backend_create_cuda(&cfg, &b.cuda_1s));
  cfg.moe_streams = 0;
  cfg.moe_gemm = EM_CUDA_MOE_GROUPED;
  CHECK_OK(em_backend_create_cuda(&cfg, &b.cuda_grouped));
  cfg.fp8_gemm = EM_CUDA_FP8_LT;  // grouped + lt: moe_ffn must loop over experts on the lt path
  CHECK_OK(em_backend_create_cuda(&cfg, &b.cuda_lt));
  cfg.fp8_gemm = EM_CUDA_FP8_DEFAULT;
  cfg.moe_gemm = EM_CUDA_MOE_CUTLASS;
  CHECK_OK(em_backend_create_cuda(&cfg, &b.cuda_cutlass));
  cfg.moe_gemm = EM_CUDA_MOE_AUTO;
  CHECK_OK(em_backend_create_cuda(&cfg, &b.cuda_auto));
  if (b.cpu == nullptr || b.cuda == nullptr) return finish("cuda_parity");
  em_backend_info ci, gi;
  em_backend_get_info(b.cpu, &ci);
  em_backend_get_info(b.cuda, &gi);
  std::printf("cuda_parity: reference cpu/%s x%d threads, device cuda:%d %s (%d SMs), %d device(s)\n", ci.isa,
              ci.num_threads, device, gi.isa, gi.num_threads, count);
  const int cc_major = std::atoi(gi.isa + 3) / 10;  // "sm_90" -> 9
  b.cc_major = cc_major;
  if (wgmma_only) {
    wgmma_cases(cc_major);
    Rng wg_rng(20261131);
    mla_wgmma_cases(wg_rng, b);
    return finish("cuda_parity --wgmma");
  }
  if (opt_in_only) {
    // The paths written on 2026-11-30 without a GPU, all opt-in: gate/up side by side (the
    // addon's resident weights), the CUTLASS mode, the KV pool in device memory.
    Rng fused_rng(20261201);
    moe_fused_cases(fused_rng, b);
    Rng cutlass_rng(20261203);
    moe_cases(cutlass_rng, b, true);
    Rng pool_rng(20261202);
    copy_ranges_cases(pool_rng, b);
    mla_device_pool_cases(pool_rng, b);
    return finish("cuda_parity --opt-in");
  }
  support_table(b);
  Rng rng(20261128);
  matmul_cases(rng, b);
  rmsnorm_cases(rng, b);
  silu_mul_cases(rng, b);
  rope_cases(rng, b);
  convert_cases(rng, b);
  gate_cases(rng, b);
  moe_cases(rng, b, false);
  mla_cases(rng, b);
  Rng lane_rng(20261130);  // its own stream: the cases around it keep their data
  moe_lane_cases(lane_rng, b);
  Rng odd_rng(20261201);
  moe_odd_width_cases(odd_rng, b);
  Rng auto_rng(20261204);
  moe_auto_cases(auto_rng, b);

  Rng lt_rng(20261129);  // its own stream: the cases above keep their data
  fp8_lt_cases(lt_rng, b, cc_major);
  return finish("cuda_parity");
}
