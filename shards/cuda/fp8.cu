// fp8 e4m3 block-scaled weights (DeepSeek-V3 checkpoints: 128x128 `weight_scale_inv` blocks)
// in the GEMMs of matmul and moe_ffn. (The gate converts its small weight to f32 in gemm.cu,
// fp8 included, and runs the fp32 GEMM.)
//
// The CPU backend, the reference, dequantizes the weights exactly (e4m3 value * block scale,
// one f32 product) and multiplies with the f32 activations, accumulating in fp32. Two paths
// here, both with fp32 accumulation:
// - skinny, M <= kFp8SkinnyRows rows (decode): a CUDA-core kernel reads each fp8 byte once
//   (1 byte per weight of memory traffic), forms the CPU's exact f32 weight value in
//   registers and multiplies it with the activations in f32. With f32 activations (matmul)
//   that is the CPU's arithmetic up to summation order; moe_ffn passes its bf16 activations.
// - wide, more rows: the weight is dequantized to bf16 (bit for bit as em_convert fp8 -> bf16)
//   into scratch, in chunks of whole 128-row blocks of at most kDequantBytes, and cuBLAS runs
//   the bf16 tensor-core GEMM with the activations rounded to bf16 (as bf16 weights do).
// By default activations are not quantized to fp8 (DeepSeek's per-token-per-128 scheme): that
// costs parity with the CPU backend (~5% of the largest output instead of ~0.5%).
//
// Opt-in (EM_CUDA_FP8_LT, $EM_CUDA_FP8_GEMM=lt; sm_90+, cuBLASLt >= 12.9): DeepSeek-V3
// inference's own fp8 GEMM. The activations are quantized per token per 128 columns as
// DeepSeek's act_quant (scale = amax / 448 in f32, e4m3 = RN-even(x / scale) saturated to +-448;
// an all-zero group gets scale 1), then one cuBLASLt block-scaled fp8 x fp8 GEMM with fp32
// accumulation. cuBLASLt's view, column-major, computes y^T [N, M] = W [N, K] x X^T [K, M]:
//   A = the weight, CUBLAS_OP_T (fp8 on Hopper must be "TN": A transposed, B not), stored
//       K x N with ld = the weight's row stride; scale mode BLK128x128_32F: one f32 per
//       128x128 block, K-blocks contiguous per 128 rows of N, that stride padded to a multiple
//       of 4 ([ceil(N/128)][round_up(ceil(K/128), 4)] row-major: DeepSeek's weight_scale_inv
//       when ceil(K/128) % 4 == 0, else repacked into scratch);
//   B = the quantized activations, CUBLAS_OP_N, stored K x Mp with ld = K; scale mode
//       VEC128_32F: one f32 per 128 columns of a token, tokens contiguous
//       ([K/128][Mp] row-major), Mp = M rounded up to 8 (pad tokens are zero, scale 1; PyTorch's
//       check expects stride M and TransformerEngine pads to 4, which agree for Mp; 8, not 4,
//       because TransformerEngine also reports needing 8 tokens for this operand: untested);
//   D = y^T, f32 (written to y directly when M % 8 == 0 and y is 16-byte aligned), else to
//       scratch and copied; where cuBLASLt has no f32-output algorithm, bf16 output (converted).
// Requirements checked before selecting it: K a positive multiple of 128, weight data and row
// stride 16-byte aligned. Anything else, or no algorithm from the heuristic, runs the default
// path for that GEMM and says why (em_cuda_last_status, and once per reason on stderr).
// Plans (descriptors and the heuristic's algorithm) are cached per shape in Fp8Lt.
#include <cublasLt.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "common.cuh"

namespace em::cuda {

namespace {

constexpr int kSkinnyWarps = 8;        // weight rows per block: one per warp
constexpr int kSkinnyCols = 1024;      // columns of x staged in shared memory per step (8 scale blocks)
constexpr size_t kDequantBytes = 256u << 20;  // bf16 scratch per wide-path chunk
constexpr int64_t kRowsPerLaunch = 511 * EM_FP8_BLOCK;  // <= gridDim.y's 65535, whole scale blocks

static_assert(kSkinnyCols % EM_FP8_BLOCK == 0 && EM_FP8_BLOCK == 4 * 32, "one warp covers one scale block");

// Two e4m3 codes (low byte first) as f32: exact (every e4m3 value is an f16 value); NaN codes
// give NaN. One cvt.rn.f16x2.e4m3x2 on sm_89+, cuda_fp8.h's software conversion before.
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two_codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes & 0xffffu), __NV_E4M3);
  return __half22float2(__half2(h));
}

__device__ __forceinline__ float x_to_f32(float v) { return v; }
__device__ __forceinline__ float x_to_f32(uint16_t bf16_bits) { return bf16_bits_to_f32(bf16_bits); }

// y[m, n] = sum_k x[m, k] * (e4m3(w[n, k]) * scale[n / 128, k / 128]) for m < M <= kFp8SkinnyRows,
// n < N. One warp per weight row n: per scale block each lane takes 4 consecutive columns (one
// 32-bit load of codes when `aligned`: w and ldw multiples of 4). The block's warps share x,
// staged in shared memory as f32 (zero past K), kSkinnyCols columns at a time.
template <typename XT>
__global__ void __launch_bounds__(kSkinnyWarps * 32)
    fp8_skinny_kernel(const XT* x, int64_t ldx, int M, const uint8_t* w, int64_t ldw, const float* scale,
                      int64_t scale_ld, int64_t N, int64_t K, int aligned, float* y, int64_t ldy) {
  __shared__ __align__(16) float xs[kFp8SkinnyRows][kSkinnyCols];
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kSkinnyWarps + (threadIdx.x >> 5);
  const bool active = n < N;
  const uint8_t* wr = w + (active ? n : 0) * ldw;
  const float* sr = scale + ((active ? n : 0) / EM_FP8_BLOCK) * scale_ld;
  float acc[kFp8SkinnyRows];
#pragma unroll
  for (int m = 0; m < kFp8SkinnyRows; ++m) acc[m] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kSkinnyCols) {
    const int kn = static_cast<int>(min(static_cast<int64_t>(kSkinnyCols), K - k0));
    __syncthreads();  // every warp is done with the previous step's xs
    for (int i = threadIdx.x; i < M * kSkinnyCols; i += blockDim.x) {
      const int m = i / kSkinnyCols, c = i % kSkinnyCols;
      xs[m][c] = c < kn ? x_to_f32(x[m * ldx + k0 + c]) : 0.0f;
    }
    __syncthreads();
    if (!active) continue;
#pragma unroll
    for (int b = 0; b < kSkinnyCols / EM_FP8_BLOCK; ++b) {
      if (b * EM_FP8_BLOCK >= kn) break;
      const int c = b * EM_FP8_BLOCK + 4 * lane;  // this lane's 4 columns within the step
      const int64_t k = k0 + c;
      const float s = sr[k0 / EM_FP8_BLOCK + b];
      uint32_t codes = 0;  // little-endian: column k in the low byte; columns >= K stay code 0 (+0)
      if (aligned && k + 4 <= K) {
        codes = *reinterpret_cast<const uint32_t*>(wr + k);
      } else {
        for (int j = 0; j < 4; ++j)
          if (k + j < K) codes |= static_cast<uint32_t>(wr[k + j]) << (8 * j);
      }
      const float2 lo = fp8x2_to_float2(codes), hi = fp8x2_to_float2(codes >> 16);
      // The CPU backend's weight values: e4m3 value * scale, rounded once to f32.
      const float w0 = lo.x * s, w1 = lo.y * s, w2 = hi.x * s, w3 = hi.y * s;
#pragma unroll
      for (int m = 0; m < kFp8SkinnyRows; ++m) {
        if (m < M) {
          const float4 xv = *reinterpret_cast<const float4*>(&xs[m][c]);
          acc[m] = fmaf(w3, xv.w, fmaf(w2, xv.z, fmaf(w1, xv.y, fmaf(w0, xv.x, acc[m]))));
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kFp8SkinnyRows; ++m) {
    if (m < M) {  // M is the same for the whole block: every lane shuffles
      float v = acc[m];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (active && lane == 0) y[m * ldy + n] = v;
    }
  }
}

// dst[r, c] = bf16(e4m3(w[r * ld + c]) * scale[(r / 128) * scale_ld + c / 128]) over [rows, cols],
// dst contiguous: one grid row per weight row.
__global__ void fp8_to_bf16_kernel(const uint8_t* w, int64_t ld, const float* scale, int64_t scale_ld, int64_t cols,
                                   uint16_t* dst) {
  const int64_t r = blockIdx.y;
  const uint8_t* wr = w + r * ld;
  const float* sr = scale + (r / EM_FP8_BLOCK) * scale_ld;
  uint16_t* dr = dst + r * cols;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dr[c] = f32_to_bf16_bits(fp8x2_to_float2(wr[c]).x * sr[c / EM_FP8_BLOCK]);
}

// Rows [r0, r0 + n) of an fp8 view (r0 a multiple of 128: scale rows follow the block grid).
em_tensor fp8_rows(const em_tensor& w, int64_t r0, int64_t n) {
  em_tensor s = w;
  s.data = static_cast<uint8_t*>(w.data) + r0 * w.stride[0];
  s.scale = w.scale + (r0 / EM_FP8_BLOCK) * w.scale_stride;
  s.shape[0] = n;
  return s;
}

// DeepSeek's act_quant on x [M, K] (K % 128 == 0), rows >= M (up to Mp) as zeros: one warp per
// (token m, 128-column group g), 4 columns per lane. q [Mp, K] e4m3 codes (ld K), f32 scales at
// s[m * s_m + g * s_g]: (1, Mp) is cuBLASLt's VEC128_32F layout of a K x Mp operand, (K/128, 1)
// CUTLASS's K-major one (each token's scales together).
template <typename XT>
__global__ void __launch_bounds__(256)
    act_quant_kernel(const XT* x, int64_t ldx, int64_t M, int64_t Mp, int64_t K, uint8_t* q, float* s, int64_t s_m,
                     int64_t s_g) {
  const int64_t groups = K / EM_FP8_BLOCK, total = Mp * groups;
  const int lane = threadIdx.x & 31;
  const int64_t step = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); i < total; i += step) {
    const int64_t m = i / groups, g = i - m * groups;  // the same for the whole warp
    const int64_t c = g * EM_FP8_BLOCK + 4 * lane;
    float v[4];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[j] = m < M ? x_to_f32(x[m * ldx + c + j]) : 0.0f;
      amax = fmaxf(amax, fabsf(v[j]));  // a NaN stays in v and becomes the NaN code below
    }
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float sc = amax > 0.0f ? amax / 448.0f : 1.0f;  // IEEE division (no fast math)
    uint32_t codes = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      codes |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(v[j] / sc, __NV_SATFINITE, __NV_E4M3)) << (8 * j);
    *reinterpret_cast<uint32_t*>(q + m * K + c) = codes;
    if (lane == 0) s[m * s_m + g * s_g] = sc;
  }
}

// y[m, n] = f32(d[m * ldd + n]) for m < M, n < N (the GEMM's output from scratch).
template <typename T>
__global__ void lt_store_kernel(const T* d, int64_t ldd, int64_t M, int64_t N, float* y, int64_t ldy) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i - m * N;
    y[m * ldy + n] = x_to_f32(d[m * ldd + n]);
  }
}

constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation for Hopper

unsigned lt_grid(int64_t work_items, int per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work_items + per_block - 1) / per_block, 65535 * 4)));
}

// Largest power of two (<= 256) dividing the address and the leading dimension in bytes.
uint32_t align_of(const void* p, int64_t ld_bytes) {
  const uint64_t v = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)) | static_cast<uint64_t>(ld_bytes) | 256u;
  return static_cast<uint32_t>(v & (~v + 1));
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace

// ------------------------------------------------------------------ EM_CUDA_FP8_LT state

struct LtPlan {
  bool ok = false;
  std::string why;  // when !ok
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  void release() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
    desc = nullptr;
    a = b = d = nullptr;
  }
};

// (N, Mp, K, ldw, ldd, D dtype, alignment of the weight, alignment of D)
using LtKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int, uint32_t, uint32_t>;

struct Fp8Lt {
  bool available = false;
  std::string why_not;  // when !available
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::mutex mu;  // plans
  std::map<LtKey, LtPlan> plans;
};

namespace {

constexpr size_t kMaxLtPlans = 4096;

// Status line for this GEMM; the reason's kind (no shapes in it) goes to stderr once per process.
void lt_fallback(const std::string& kind, const std::string& detail) {
  static std::mutex mu;
  static std::set<std::string> printed;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (printed.insert(kind).second)
      std::fprintf(stderr, "expertmesh cuda: fp8 lt: falling back to the default fp8 path: %s\n", kind.c_str());
  }
  set_last_status("fp8 lt: fallback to the default fp8 path: " + detail);
}

#if CUBLAS_VERSION >= 120900
std::string lt_err(const char* what, cublasStatus_t st) {
  return std::string(what) + " failed: " + cublasGetStatusString(st);
}

// Descriptors and the heuristic's best algorithm for one shape (scale pointers set per call;
// the ones given here only serve the heuristic).
LtPlan make_plan(Fp8Lt& lt, const LtKey& key, const void* a_scale, const void* b_scale) {
  const int64_t N = std::get<0>(key), Mp = std::get<1>(key), K = std::get<2>(key), ldw = std::get<3>(key),
                ldd = std::get<4>(key);
  const cudaDataType_t dt = static_cast<cudaDataType_t>(std::get<5>(key));
  const uint32_t align_w = std::get<6>(key), align_d = std::get<7>(key);
  LtPlan p;
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  auto fail = [&](std::string why) {
    p.release();
    p.ok = false;
    p.why = std::move(why);
    return p;
  };
#define EMC_LT(expr)                                         \
  do {                                                       \
    st = (expr);                                             \
    if (st != CUBLAS_STATUS_SUCCESS) return fail(lt_err(#expr, st)); \
  } while (0)
  EMC_LT(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  EMC_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  EMC_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  EMC_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)));
  EMC_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)));
  EMC_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale)));
  EMC_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale)));
  EMC_LT(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, static_cast<uint64_t>(K), static_cast<uint64_t>(N), ldw));
  EMC_LT(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, static_cast<uint64_t>(K), static_cast<uint64_t>(Mp), K));
  EMC_LT(cublasLtMatrixLayoutCreate(&p.d, dt, static_cast<uint64_t>(N), static_cast<uint64_t>(Mp), ldd));
  cublasLtMatmulPreference_t pref = nullptr;
  EMC_LT(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kLtWorkspaceBytes;
  const uint32_t align_b = 256;
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_w, sizeof(align_w));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(lt.handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
#undef EMC_LT
  if (st != CUBLAS_STATUS_SUCCESS) return fail(lt_err("cublasLtMatmulAlgoGetHeuristic", st));
  if (found < 1 || res.state != CUBLAS_STATUS_SUCCESS)
    return fail(std::string("cuBLASLt has no algorithm (") + (dt == CUDA_R_32F ? "f32" : "bf16") + " out)");
  p.algo = res.algo;
  p.ok = true;
  return p;
}

// The cached plan (made on first use); a copy of its handles, valid while lt.mu is held (a
// purge releases them). Caller holds lt.mu.
LtPlan get_plan(Fp8Lt& lt, const LtKey& key, const void* a_scale, const void* b_scale) {
  auto it = lt.plans.find(key);
  if (it != lt.plans.end()) return it->second;
  if (lt.plans.size() >= kMaxLtPlans) {  // many distinct shapes: start over
    for (auto& kv : lt.plans) kv.second.release();
    lt.plans.clear();
  }
  return lt.plans.emplace(key, make_plan(lt, key, a_scale, b_scale)).first->second;
}

// Caller holds lt.mu.
void mark_failed(Fp8Lt& lt, const LtKey& key, const std::string& why) {
  auto it = lt.plans.find(key);
  if (it == lt.plans.end()) return;
  it->second.release();
  it->second.ok = false;
  it->second.why = why;
}
#endif

// The EM_CUDA_FP8_LT GEMM (see the top of the file); false: it did not run (status says why)
// and the caller runs the default path. Nothing is enqueued before the plan is known; a
// cublasLtMatmul that refuses at launch leaves only unused scratch behind.
bool fp8_lt_gemm(Op& op, const void* x, em_dtype xdt, int64_t ldx, const em_tensor& w, float* y, int64_t ldy, int64_t M,
                 ScratchBuf& buf) {
  Fp8Lt& lt = *op.ctx.fp8_lt;
  const int64_t N = w.shape[0], K = w.shape[1];
  const std::string shape = " [M " + std::to_string(M) + ", N " + std::to_string(N) + ", K " + std::to_string(K) + "]";
  if (!lt.available) {
    lt_fallback("unavailable: " + lt.why_not, "unavailable: " + lt.why_not);
    return false;
  }
  if (K <= 0 || K % EM_FP8_BLOCK != 0) {
    lt_fallback("K not a positive multiple of 128", "K not a positive multiple of 128" + shape);
    return false;
  }
  if (reinterpret_cast<uintptr_t>(w.data) % 16 != 0 || w.stride[0] % 16 != 0) {
    lt_fallback("weight rows not 16-byte aligned (data or row stride)",
                "weight rows not 16-byte aligned (row stride " + std::to_string(w.stride[0]) + ")" + shape);
    return false;
  }
#if CUBLAS_VERSION >= 120900
  const int64_t Mp = round_up(M, 8), Kb = K / EM_FP8_BLOCK, Nb = (N + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK,
                Kb4 = round_up(Kb, 4);
  const int64_t ldw = w.stride[0];
  const uint32_t align_w = align_of(w.data, ldw);
  const bool scale_direct = w.scale_stride == Kb4 && reinterpret_cast<uintptr_t>(w.scale) % 16 == 0;

  // Scratch, carved from one buffer in 256-byte pieces: q [Mp, K], xs [Kb, Mp], the weight
  // scales repacked when needed, and D when it cannot be y.
  const size_t q_bytes = static_cast<size_t>(round_up(Mp * K, 256));
  const size_t s_bytes = static_cast<size_t>(round_up(Kb * Mp * 4, 256));
  const size_t ws_bytes = scale_direct ? 0 : static_cast<size_t>(round_up(Nb * Kb4 * 4, 256));
  // D: y itself (f32, M % 8 == 0, aligned), else scratch with ld N rounded up to 8.
  const bool y_ok = M == Mp && reinterpret_cast<uintptr_t>(y) % 16 == 0 && ldy % 4 == 0;
  const int64_t ldd_s = round_up(N, 8);
  char* base = nullptr;
  auto carve = [&](size_t d_bytes) {
    base = static_cast<char*>(buf.get(op, q_bytes + s_bytes + ws_bytes + d_bytes));
  };
  // Plans: f32 out (into y when possible), else bf16 out into scratch. The heuristic sees the
  // scale pointers only as attributes; the real ones are set below, before the launch.
  const void* hint = w.scale;
  // One backend may serve several threads: the plan's descriptor is shared and gets this
  // call's scale pointers, so lookup, attributes and launch happen under one lock (launches
  // are asynchronous: it is held for microseconds).
  std::lock_guard<std::mutex> lock(lt.mu);
  LtKey key{N, Mp, K, ldw, y_ok ? ldy : ldd_s, static_cast<int>(CUDA_R_32F), align_w, y_ok ? align_of(y, ldy * 4) : 256u};
  LtPlan plan = get_plan(lt, key, hint, hint);
  std::string why = plan.ok ? "" : plan.why;
  if (!plan.ok) {
    key = LtKey{N, Mp, K, ldw, ldd_s, static_cast<int>(CUDA_R_16BF), align_w, 256u};
    plan = get_plan(lt, key, hint, hint);
    if (!plan.ok) why += "; " + plan.why;
  }
  if (!plan.ok) {
    lt_fallback("cuBLASLt found no block-scaled fp8 algorithm: " + why, "cuBLASLt: " + why + shape);
    return false;
  }
  const bool d_bf16 = std::get<5>(key) == static_cast<int>(CUDA_R_16BF);
  const bool direct = !d_bf16 && y_ok;
  const size_t d_bytes = direct ? 0 : static_cast<size_t>(round_up(Mp * ldd_s * (d_bf16 ? 2 : 4), 256));
  carve(d_bytes);
  uint8_t* q = reinterpret_cast<uint8_t*>(base);
  float* xs = reinterpret_cast<float*>(base + q_bytes);
  float* wsc = scale_direct ? const_cast<float*>(w.scale) : reinterpret_cast<float*>(base + q_bytes + s_bytes);
  void* d = direct ? static_cast<void*>(y) : static_cast<void*>(base + q_bytes + s_bytes + ws_bytes);
  const int64_t ldd = direct ? ldy : ldd_s;

  // 1. act_quant
  const unsigned qgrid = lt_grid(Mp * Kb, 8);
  if (xdt == EM_F32) {
    act_quant_kernel<float><<<qgrid, 256, 0, op.stream()>>>(static_cast<const float*>(x), ldx, M, Mp, K, q, xs, 1, Mp);
  } else {
    act_quant_kernel<uint16_t><<<qgrid, 256, 0, op.stream()>>>(static_cast<const uint16_t*>(x), ldx, M, Mp, K, q, xs, 1,
                                                               Mp);
  }
  EMC_LAUNCHED();
  // 2. the weight scales with cuBLASLt's stride (pads zero)
  if (!scale_direct) {
    EMC_CUDA(cudaMemsetAsync(wsc, 0, static_cast<size_t>(Nb * Kb4) * 4, op.stream()));
    EMC_CUDA(cudaMemcpy2DAsync(wsc, static_cast<size_t>(Kb4) * 4, w.scale, static_cast<size_t>(w.scale_stride) * 4,
                               static_cast<size_t>(Kb) * 4, static_cast<size_t>(Nb), cudaMemcpyDefault, op.stream()));
  }
  // 3. the GEMM
  const void* a_scale = wsc;
  const void* b_scale = xs;
  cublasStatus_t st = cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale));
  const float alpha = 1.0f, beta = 0.0f;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmul(lt.handle, plan.desc, &alpha, w.data, plan.a, q, plan.b, &beta, d, plan.d, d, plan.d, &plan.algo,
                        lt.workspace, kLtWorkspaceBytes, op.stream());
  if (st != CUBLAS_STATUS_SUCCESS) {
    const std::string e = lt_err("cublasLtMatmul", st);
    mark_failed(lt, key, e);
    lt_fallback("cuBLASLt refused the GEMM: " + e, e + shape);
    return false;
  }
  // 4. D -> y when D is scratch
  if (!direct) {
    const unsigned g = lt_grid(M * N, 256);
    if (d_bf16) {
      lt_store_kernel<uint16_t><<<g, 256, 0, op.stream()>>>(static_cast<const uint16_t*>(d), ldd, M, N, y, ldy);
    } else {
      lt_store_kernel<float><<<g, 256, 0, op.stream()>>>(static_cast<const float*>(d), ldd, M, N, y, ldy);
    }
    EMC_LAUNCHED();
  }
  set_last_status(std::string("fp8 lt: cublasLt fp8 GEMM (1x128 act, 128x128 weight scales, ") + (d_bf16 ? "bf16" : "f32") +
                  " out)" + shape);
  return true;
#else
  (void)x, (void)xdt, (void)ldx, (void)y, (void)ldy, (void)buf;
  lt_fallback("built without cuBLAS >= 12.9", "built without cuBLAS >= 12.9" + shape);
  return false;
#endif
}

}  // namespace

void fp8_lt_init(Context& ctx) {
  fp8_lt_destroy(ctx);
  Fp8Lt* lt = new Fp8Lt();
  ctx.fp8_lt = lt;
#if CUBLAS_VERSION >= 120900
  const size_t version = cublasLtGetVersion();
  if (version < 120900) {
    lt->why_not = "cuBLASLt " + std::to_string(version) + " at run time (block-scaled fp8 needs >= 12.9)";
  } else if (ctx.cc_major < 9) {
    lt->why_not = "device " + ctx.arch + " (block-scaled fp8 GEMMs need sm_90+)";
  } else {
    const cublasStatus_t st = cublasLtCreate(&lt->handle);
    if (st != CUBLAS_STATUS_SUCCESS) {
      lt->handle = nullptr;
      lt->why_not = lt_err("cublasLtCreate", st);
    } else {
      const cudaError_t e = cudaMalloc(&lt->workspace, kLtWorkspaceBytes);
      if (e != cudaSuccess) {
        cudaGetLastError();
        lt->workspace = nullptr;
        lt->why_not = std::string("cuBLASLt workspace: ") + cudaGetErrorString(e);
      } else {
        lt->available = true;
      }
    }
  }
#else
  lt->why_not = "built against cuBLAS " + std::to_string(CUBLAS_VERSION) + " (block-scaled fp8 needs >= 12.9)";
#endif
  if (!lt->available) lt_fallback("unavailable: " + lt->why_not, "unavailable: " + lt->why_not);
}

void fp8_lt_destroy(Context& ctx) {
  Fp8Lt* lt = ctx.fp8_lt;
  if (lt == nullptr) return;
  ctx.fp8_lt = nullptr;
  for (auto& kv : lt->plans) kv.second.release();
  if (lt->handle) cublasLtDestroy(lt->handle);
  if (lt->workspace) cudaFree(lt->workspace);
  delete lt;
}

bool fp8_lt_available(const Context& ctx) { return ctx.fp8_lt != nullptr && ctx.fp8_lt->available; }

void act_quant_k_major(Op& op, const void* x, em_dtype xdt, int64_t ldx, int64_t M, int64_t K, uint8_t* q, float* s) {
  if (M == 0 || K == 0) return;
  const int64_t Kb = K / EM_FP8_BLOCK;
  const unsigned grid = lt_grid(M * Kb, 8);
  if (xdt == EM_F32)
    act_quant_kernel<float><<<grid, 256, 0, op.stream()>>>(static_cast<const float*>(x), ldx, M, M, K, q, s, Kb, 1);
  else
    act_quant_kernel<uint16_t><<<grid, 256, 0, op.stream()>>>(static_cast<const uint16_t*>(x), ldx, M, M, K, q, s, Kb, 1);
  EMC_LAUNCHED();
}

void* ScratchBuf::get(Op& op, size_t n) {
  if (n > bytes) {  // the old buffer stays allocated until the op ends: queued work may still read it
    p = op.alloc(n);
    bytes = n;
  }
  return p;
}

void fp8_to_bf16(Op& op, const em_tensor& w, void* dst) {
  const int64_t rows = w.shape[0], cols = w.shape[1], ld = w.stride[0];
  if (rows == 0 || cols == 0) return;
  const unsigned bx = static_cast<unsigned>(std::min<int64_t>((cols + 255) / 256, 64));
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerLaunch) {
    const int64_t n = std::min(kRowsPerLaunch, rows - r0);
    const em_tensor part = fp8_rows(w, r0, n);
    fp8_to_bf16_kernel<<<dim3(bx, static_cast<unsigned>(n)), 256, 0, op.stream()>>>(
        static_cast<const uint8_t*>(part.data), ld, part.scale, w.scale_stride, cols,
        static_cast<uint16_t*>(dst) + r0 * cols);
    EMC_LAUNCHED();
  }
}

void fp8_gemm(Op& op, const void* x, em_dtype xdt, int64_t ldx, const em_tensor& w, float* y, int64_t ldy, int64_t M,
              ScratchBuf& wbuf) {
  const int64_t N = w.shape[0], K = w.shape[1];
  if (M == 0 || N == 0) return;
  if (xdt != EM_F32 && xdt != EM_BF16) throw Error(EM_ERR_INTERNAL, "fp8_gemm: activations must be f32 or bf16");
  if (op.ctx.fp8_lt != nullptr && fp8_lt_gemm(op, x, xdt, ldx, w, y, ldy, M, wbuf)) return;  // EM_CUDA_FP8_LT
  if (M <= kFp8SkinnyRows) {
    const int aligned = reinterpret_cast<uintptr_t>(w.data) % 4 == 0 && w.stride[0] % 4 == 0;
    const unsigned blocks = static_cast<unsigned>((N + kSkinnyWarps - 1) / kSkinnyWarps);
    if (xdt == EM_F32) {
      fp8_skinny_kernel<float><<<blocks, kSkinnyWarps * 32, 0, op.stream()>>>(
          static_cast<const float*>(x), ldx, static_cast<int>(M), static_cast<const uint8_t*>(w.data), w.stride[0],
          w.scale, w.scale_stride, N, K, aligned, y, ldy);
    } else {
      fp8_skinny_kernel<uint16_t><<<blocks, kSkinnyWarps * 32, 0, op.stream()>>>(
          static_cast<const uint16_t*>(x), ldx, static_cast<int>(M), static_cast<const uint8_t*>(w.data), w.stride[0],
          w.scale, w.scale_stride, N, K, aligned, y, ldy);
    }
    EMC_LAUNCHED();
    return;
  }
  if (K == 0) {  // y = 0 (cuBLAS wants leading dimensions >= 1)
    EMC_CUDA(cudaMemset2DAsync(y, sizeof(float) * static_cast<size_t>(ldy), 0, sizeof(float) * static_cast<size_t>(N),
                               static_cast<size_t>(M), op.stream()));
    return;
  }
  const void* xb = x;
  int64_t ldxb = ldx;
  if (xdt == EM_F32) {
    void* buf = op.alloc(static_cast<size_t>(M * K) * 2);
    f32_rows_to(op, static_cast<const float*>(x), ldx, nullptr, M, K, EM_BF16, buf);
    xb = buf;
    ldxb = K;
  }
  // Weight rows per chunk: whole 128-row blocks, at most kDequantBytes of bf16 (at least one block).
  const int64_t block_bytes = EM_FP8_BLOCK * K * 2;
  const int64_t chunk = EM_FP8_BLOCK * std::max<int64_t>(1, static_cast<int64_t>(kDequantBytes) / block_bytes);
  void* wb = wbuf.get(op, static_cast<size_t>(std::min(N, chunk) * K) * 2);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0);
    fp8_to_bf16(op, fp8_rows(w, n0, nc), wb);
    gemm_nt(op.ctx, xb, ldxb, wb, K, CUDA_R_16BF, y + n0, ldy, CUDA_R_32F, M, nc, K, false);
  }
}

}  // namespace em::cuda
