// Internal interface of the CUDA backend: the context, errors as exceptions (turned into
// em_status at the op table), per-op staging of host tensors and scratch memory, the
// cuBLAS GEMM helper, and the op implementations (one .cu per op family).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "expertmesh/cuda.h"
#include "expertmesh/ops.h"
#include "../internal.h"

namespace em::cuda {

// Thrown inside ops; the op table (guarded) turns it into its status and message.
using Error = StatusError;

void throw_cuda(cudaError_t e, const char* expr, const char* file, int line);
void throw_cublas(cublasStatus_t s, const char* expr, const char* file, int line);

#define EMC_CUDA(expr)                                                              \
  do {                                                                              \
    const cudaError_t e_ = (expr);                                                  \
    if (e_ != cudaSuccess) ::em::cuda::throw_cuda(e_, #expr, __FILE__, __LINE__);   \
  } while (0)
#define EMC_CUBLAS(expr)                                                                  \
  do {                                                                                    \
    const cublasStatus_t s_ = (expr);                                                     \
    if (s_ != CUBLAS_STATUS_SUCCESS) ::em::cuda::throw_cublas(s_, #expr, __FILE__, __LINE__); \
  } while (0)
// After a kernel launch: launch-configuration errors surface here.
#define EMC_LAUNCHED() EMC_CUDA(cudaGetLastError())

struct Fp8Lt;  // fp8.cu: the cuBLASLt block-scaled fp8 path (EM_CUDA_FP8_LT)

// The backend's private state (em_backend::ctx).
struct Context {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  em_cuda_moe_gemm moe_gemm = EM_CUDA_MOE_LOOP;
  em_cuda_fp8_gemm fp8_gemm = EM_CUDA_FP8_DEFAULT;
  bool moe_fuse = true;  // em_cuda_config::moe_fuse_gate_up
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  std::string arch;  // "sm_90"
  Fp8Lt* fp8_lt = nullptr;  // set when fp8_gemm is EM_CUDA_FP8_LT (even where unavailable: it says why)
  // moe_ffn's loop spreads its experts' GEMMs over these side streams (one cuBLAS handle
  // each, so each has its own workspace), forked from and joined back into `stream` with
  // events: one expert's GEMM of a few dozen rows fills a fraction of the SMs, several at
  // once fill the GPU. Empty with moe_streams 1.
  std::vector<cudaStream_t> lanes;
  std::vector<cublasHandle_t> lane_blas;
  std::vector<cudaEvent_t> lane_done;
  cudaEvent_t lane_fork = nullptr;
  // em_cuda_copy_ranges' pinned host staging buffer (grown as needed, freed with the context).
  void* pinned = nullptr;
  size_t pinned_bytes = 0;
};

// Where a GEMM runs: a cuBLAS handle and the stream it is bound to.
struct Lane {
  cublasHandle_t blas;
  cudaStream_t stream;
};
inline Lane main_lane(const Context& ctx) { return {ctx.blas, ctx.stream}; }

// em_cuda_last_status() of the calling thread (cuda_backend.cu).
void set_last_status(const std::string& s);
std::string last_status();

// One op's device-side bookkeeping: scratch allocations (stream-ordered, freed when the op
// ends), host tensors staged to the device, and outputs to copy back. finish() copies the
// outputs back and waits for the stream; the destructor frees everything, on errors too.
class Op {
 public:
  explicit Op(Context& ctx);
  ~Op();
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;

  Context& ctx;
  cudaStream_t stream() const { return ctx.stream; }

  void* alloc(size_t bytes);
  template <typename T>
  T* alloc_n(int64_t n) {
    return static_cast<T*>(alloc(sizeof(T) * static_cast<size_t>(n > 0 ? n : 1)));
  }
  // Copies a host array into fresh scratch memory.
  template <typename T>
  T* upload(const T* host, int64_t n) {
    T* d = alloc_n<T>(n);
    if (n > 0) EMC_CUDA(cudaMemcpyAsync(d, host, sizeof(T) * static_cast<size_t>(n), cudaMemcpyHostToDevice, ctx.stream));
    return d;
  }
  // The tensor with device-reachable data (and fp8 scale). Host data is copied in.
  em_tensor in(const em_tensor& t);
  // As `in`, and the device copy goes back to the host at finish().
  em_tensor out(const em_tensor& t);
  void finish();

 private:
  struct CopyBack {
    void* host;
    const void* dev;
    size_t bytes;
  };
  const void* stage(const void* p, size_t bytes);
  std::vector<void*> scratch_;
  std::vector<CopyBack> copy_back_;
};

// $ENV=1 (read per call; EM_CUDA_MOE_PROFILE, EM_CUDA_MLA_PROFILE): an op records an event
// after each of its phases and prints the times between them to stderr, with the host's wall
// time of the whole call (for the benchmarks; it waits for nothing the op would not). An
// event's time is when the stream reached it, so a phase's time includes the host's time to
// issue it whenever the stream was idle meanwhile (staging, planning, uploads).
class PhaseTimes {
 public:
  PhaseTimes(cudaStream_t s, const char* env_var, const char* op_name)
      : stream_(s), op_name_(op_name), t0_(std::chrono::steady_clock::now()) {
    const char* env = std::getenv(env_var);
    on_ = env != nullptr && std::strcmp(env, "1") == 0;
    if (on_) mark("start");
  }
  ~PhaseTimes() {
    for (auto& m : marks_) cudaEventDestroy(m.second);
  }
  PhaseTimes(const PhaseTimes&) = delete;
  PhaseTimes& operator=(const PhaseTimes&) = delete;
  void mark(const char* phase) {
    if (!on_) return;
    cudaEvent_t e = nullptr;
    EMC_CUDA(cudaEventCreate(&e));
    marks_.emplace_back(phase, e);
    EMC_CUDA(cudaEventRecord(e, stream_));
  }
  bool on() const { return on_; }
  // "<op> profile: <what>: <phase> <ms> ms, ...; total <ms> ms; host wall <ms> ms"
  void print(const std::string& what) {
    if (!on_ || marks_.size() < 2) return;
    EMC_CUDA(cudaEventSynchronize(marks_.back().second));
    const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
    std::string line = std::string(op_name_) + " profile: " + what;
    float total = 0;
    for (size_t i = 1; i < marks_.size(); ++i) {
      float ms = 0;
      EMC_CUDA(cudaEventElapsedTime(&ms, marks_[i - 1].second, marks_[i].second));
      total += ms;
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s%s %.3f ms", i == 1 ? ": " : ", ", marks_[i].first, ms);
      line += buf;
    }
    char buf[80];
    std::snprintf(buf, sizeof buf, "; total %.3f ms; host wall %.3f ms\n", total, wall_ms);
    line += buf;
    std::fputs(line.c_str(), stderr);
  }

 private:
  cudaStream_t stream_;
  const char* op_name_;
  std::chrono::steady_clock::time_point t0_;
  bool on_ = false;
  std::vector<std::pair<const char*, cudaEvent_t>> marks_;
};

// Bytes from a view's first to its last element (0 if empty).
size_t span_bytes(const em_tensor& t);
cudaDataType_t cuda_type(em_dtype d);

// cuBLAS GEMM, torch Linear layout, row-major: y[M, N] (+)= x[M, K] w[N, K]^T with fp32
// accumulation. x and w share `ab` (f32, bf16 or f16); y is `yt` (f32, or ab).
void gemm_nt(const Lane& lane, const void* x, int64_t ldx, const void* w, int64_t ldw, cudaDataType_t ab, void* y,
             int64_t ldy, cudaDataType_t yt, int64_t M, int64_t N, int64_t K, bool accumulate);
inline void gemm_nt(Context& ctx, const void* x, int64_t ldx, const void* w, int64_t ldw, cudaDataType_t ab, void* y,
                    int64_t ldy, cudaDataType_t yt, int64_t M, int64_t N, int64_t K, bool accumulate) {
  gemm_nt(main_lane(ctx), x, ldx, w, ldw, ab, y, ldy, yt, M, N, K, accumulate);
}
// The side streams of moe_streams (see Context::lanes): create n - 1 of them (none for n <= 1),
// and free them (also after a partial creation).
void lanes_create(Context& ctx, int n);
void lanes_destroy(Context& ctx);

// dst[r, c] = dtype(src[r * lds + c]) for r < rows, c < cols, src f32; dst contiguous (ld = cols)
// of `dt` (f32, bf16, f16): activations in a weight's dtype for cuBLAS.
void f32_rows_to(Op& op, const float* src, int64_t lds, const int32_t* row_index, int64_t rows, int64_t cols,
                 em_dtype dt, void* dst);
// A 2-D weight view of any dtype as contiguous f32 [rows, cols] in scratch (gate weights).
float* weight_to_f32(Op& op, const em_tensor& w);

// fp8 e4m3 block-scaled weights (fp8.cu). A scratch buffer reused across GEMMs of one op
// (stream order makes reuse safe); it grows as needed.
struct ScratchBuf {
  void* p = nullptr;
  size_t bytes = 0;
  void* get(Op& op, size_t n);
};
// GEMMs with at most this many rows read the fp8 weight directly (f32 math on the exact
// weight values); more rows dequantize it to bf16 for cuBLAS (see fp8.cu).
constexpr int64_t kFp8SkinnyRows = 8;
// y[M, N] = x[M, K] w[N, K]^T (overwrites y; ld ldy): w a 2-D fp8 view with data and scale on
// the device, x f32 or bf16 (xdt) with ld ldx, fp32 accumulation. wbuf: bf16 weight scratch.
void fp8_gemm(Op& op, const void* x, em_dtype xdt, int64_t ldx, const em_tensor& w, float* y, int64_t ldy, int64_t M,
              ScratchBuf& wbuf);
// dst (contiguous bf16 [rows, cols]) = the 2-D fp8 view w dequantized, as em_convert fp8 -> bf16.
void fp8_to_bf16(Op& op, const em_tensor& w, void* dst);
// EM_CUDA_FP8_LT (fp8.cu): set up ctx.fp8_lt at backend creation (never fails: where the path
// is unavailable the state records why, and every fp8 GEMM takes the default path), free it,
// and whether the path can run at all on this device (moe_ffn then loops over experts).
void fp8_lt_init(Context& ctx);
void fp8_lt_destroy(Context& ctx);
bool fp8_lt_available(const Context& ctx);
// DeepSeek's act_quant (as the EM_CUDA_FP8_LT path) of x [M, K] (f32 or bf16 xdt, ld ldx; K a
// multiple of 128) into q [M, K] e4m3 (ld K) and s [M, K/128] f32 scales, each token's together
// (CUTLASS's K-major blockwise scale layout).
void act_quant_k_major(Op& op, const void* x, em_dtype xdt, int64_t ldx, int64_t M, int64_t K, uint8_t* q, float* s);

// Op implementations; arguments were validated by the dispatcher.
em_status matmul(Context& ctx, const em_tensor* x, const em_tensor* w, em_tensor* y);
em_status rmsnorm(Context& ctx, const em_tensor* x, const em_tensor* weight, float eps, em_tensor* y);
em_status silu_mul(Context& ctx, const em_tensor* gate, const em_tensor* up, em_tensor* y);
em_status moe_ffn(Context& ctx, const em_moe_args* args);
em_status rope(Context& ctx, em_tensor* x, const int32_t* positions, const em_rope_config* cfg);
em_status gate(Context& ctx, const em_tensor* x, const em_tensor* weight, const em_tensor* bias,
               const em_gate_config* cfg, em_tensor* topk_idx, em_tensor* topk_weight);
em_status convert(Context& ctx, const em_tensor* src, em_tensor* dst);
em_status mla_attention(Context& ctx, const em_mla_args* args);  // attention.cu

// cutlass_grouped.cu: moe_ffn's bf16 grouped GEMM as one CUTLASS Hopper kernel. Group g:
// c_g[n_g, m_g] (row-major, ld ldc) = b_g[n_g, k_g] (ld ldb) a_g[m_g, k_g]^T (ld lda) (as the
// cuBLAS grouped call in moe.cu). False, with why, when this build or device cannot run it
// (built without CUTLASS or sm_90a, another device, misaligned operands, can_implement);
// the caller then runs cuBLAS.
bool cutlass_grouped_built();
// The fp8 variant (DeepSeek-V3's inference GEMM, one launch for all groups): group g
// d_g[m_g, n_g] (bf16, row-major, ld ldd) = (a_g [m_g, k_g] e4m3, ld lda, scales sfa_g per token
// per 128 columns, [m_g, k_g/128] row-major) x (b_g [n_g, k_g] e4m3, ld ldb, scales sfb_g per
// 128 x 128 block, [n_g/128, k_g/128] row-major)^T, fp32 accumulation; k_g a multiple of 128.
bool cutlass_grouped_fp8_run(Op& op, int groups, const int* m, const int* n, const int* k, const void* const* a,
                             const int* lda, const float* const* sfa, const void* const* b, const int* ldb,
                             const float* const* sfb, void* const* d, const int* ldd, std::string& why);
bool cutlass_grouped_run(Op& op, int groups, const int* m, const int* n, const int* k, const void* const* a,
                         const int* lda, const void* const* b, const int* ldb, void* const* c, const int* ldc,
                         std::string& why);

// ------------------------------------------------------------------ device helpers
#ifdef __CUDACC__
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
// Round to nearest even; NaN stays NaN with its payload's top bits (as the CPU backend).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
  if (isnan(f)) return static_cast<uint16_t>(((__float_as_uint(f) >> 16) & 0x8000u) | 0x7e00u);
  return __half_as_ushort(__float2half_rn(f));
}
// float8_e4m3fn, as the CPU decoder (no infinities; 0x7f / 0xff are NaN).
__device__ __forceinline__ float fp8_e4m3_to_f32(uint8_t b) {
  const uint32_t exp = (b >> 3) & 0xfu, mant = b & 0x7u;
  float mag;
  if (exp == 0xf && mant == 0x7) mag = __int_as_float(0x7fc00000);
  else if (exp == 0) mag = ldexpf(static_cast<float>(mant), -9);
  else mag = ldexpf(static_cast<float>(8 + mant), static_cast<int>(exp) - 10);
  return (b & 0x80u) ? -mag : mag;
}
// Element (r, c) of a 2-D view (ld elements per row) of any weight dtype, as f32.
__device__ __forceinline__ float load_f32(const void* data, em_dtype dt, int64_t ld, int64_t r, int64_t c,
                                          const float* scale, int64_t scale_ld) {
  const int64_t i = r * ld + c;
  switch (dt) {
    case EM_BF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(data)[i]);
    case EM_F16: return __half2float(__ushort_as_half(static_cast<const uint16_t*>(data)[i]));
    case EM_F8_E4M3:
      return fp8_e4m3_to_f32(static_cast<const uint8_t*>(data)[i]) * scale[(r / EM_FP8_BLOCK) * scale_ld + c / EM_FP8_BLOCK];
    default: return static_cast<const float*>(data)[i];
  }
}
__device__ __forceinline__ void store_f32(void* data, em_dtype dt, int64_t i, float v) {
  switch (dt) {
    case EM_BF16: static_cast<uint16_t*>(data)[i] = f32_to_bf16_bits(v); break;
    case EM_F16: static_cast<uint16_t*>(data)[i] = f32_to_f16_bits(v); break;
    default: static_cast<float*>(data)[i] = v; break;
  }
}
#endif

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace em::cuda
