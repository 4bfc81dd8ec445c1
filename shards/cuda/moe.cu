// MoE family: the grouped expert FFN y = w2(silu(w1 x) * w3 x) for many experts in one
// call, and the SiLU-and-multiply op it fuses.
//
//   1. permute: the rows of x each expert needs (x_index gather, or x as it is), in the
//      weights' dtype, grouped by expert                          [rows, dim]
//   2. gate/up GEMMs per expert (cuBLAS; a loop of cublasGemmEx with fp32 outputs, spread
//      over several streams, or one cublasGemmGroupedBatchedEx with bf16/f16 outputs), gate
//      in the left half of each row and up in the right; one GEMM of twice the width where
//      the expert's up weight directly follows its gate weight in device memory
//                                                                     [rows, 2 x inter]
//   3. fused SiLU-and-multiply into the weights' dtype                [rows, inter]
//   4. down GEMMs per expert                                          [rows, dim]
//   5. unpermute + weighted combine: y[o] (+)= sum of row_weight[r] * out[r] over the rows r
//      with out_index[r] == o, in increasing r (a CSR built on the host: no atomics, and the
//      CPU backend's summation order)
// With no out_index, no row_weight and no accumulate (and fp32 outputs), step 4 writes y.
// fp8 weights (fp8.cu): activations and intermediates are bf16. The loop runs fp8_gemm per
// expert (experts with few rows read the fp8 weights directly, others dequantize into one
// reused bf16 buffer); the grouped variant dequantizes batches of experts' weights into at
// most kFp8GroupedBytes of scratch and runs one grouped bf16 GEMM per batch. With
// EM_CUDA_FP8_LT available (fp8.cu) both modes run the loop: each expert GEMM quantizes its
// bf16 activations per token per 128 columns and runs cuBLASLt's block-scaled fp8 GEMM.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common.cuh"
#include "moe_plan.h"

namespace em::cuda {

namespace {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// h[r, c] = dt(silu(g[r, c]) * u[r, c]); g and u share the leading dimension ld (gate and up
// side by side: ld is twice cols), h is dense (leading dimension cols).
template <typename T>
__global__ void silu_mul_rows_kernel(const T* g, const T* u, int64_t ld, int64_t rows, int64_t cols, em_dtype dt,
                                     void* h) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols, k = r * ld + c;
    store_f32(h, dt, i, silu_times(to_f32(g[k]), to_f32(u[k])));
  }
}

// The silu_mul op: 2-D strided f32 views.
__global__ void silu_mul_2d_kernel(const float* g, int64_t ldg, const float* u, int64_t ldu, float* y, int64_t ldy,
                                   int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    y[r * ldy + c] = silu_times(g[r * ldg + c], u[r * ldu + c]);
  }
}

// y[o, c] = (accumulate ? y[o, c] : 0) + sum over j in [start[o], start[o+1]) of
// weight[list[j]] * out[list[j], c], in order, without fused multiply-adds (CPU's bits).
template <typename T>
__global__ void combine_kernel(const T* out, int64_t ldo, const int32_t* start, const int32_t* list,
                               const float* weight, int32_t accumulate, float* y, int64_t ldy, int64_t o0,
                               int64_t cols) {
  const int64_t o = o0 + blockIdx.y;
  const int32_t j0 = start[o], j1 = start[o + 1];
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = accumulate ? y[o * ldy + c] : 0.0f;
    for (int32_t j = j0; j < j1; ++j) {
      const int32_t r = list[j];
      acc = __fadd_rn(acc, __fmul_rn(weight ? weight[r] : 1.0f, to_f32(out[r * ldo + c])));
    }
    y[o * ldy + c] = acc;
  }
}

constexpr size_t kFp8GroupedBytes = size_t{1} << 30;
// EM_CUDA_MOE_AUTO runs the grouped GEMM below this many rows per expert (on average).
constexpr int64_t kGroupedRowsPerExpert = 64;
#if CUBLAS_VERSION >= 120500
constexpr bool kGroupedBuilt = true;
#else
constexpr bool kGroupedBuilt = false;  // cublasGemmGroupedBatchedEx: cuBLAS 12.5+
#endif

unsigned grid_1d(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535 * 4)));
}

template <typename T>
void launch_silu_rows(Op& op, const void* g, const void* u, int64_t ld, int64_t rows, int64_t cols, em_dtype dt,
                      void* h) {
  silu_mul_rows_kernel<T><<<grid_1d(rows * cols, 256), 256, 0, op.stream()>>>(
      static_cast<const T*>(g), static_cast<const T*>(u), ld, rows, cols, dt, h);
  EMC_LAUNCHED();
}

template <typename T>
void launch_combine(Op& op, const void* out, int64_t ldo, const int32_t* start, const int32_t* list,
                    const float* weight, bool accumulate, float* y, int64_t ldy, int64_t y_rows, int64_t cols) {
  const unsigned bx = static_cast<unsigned>(std::min<int64_t>((cols + 255) / 256, 64));
  for (int64_t o0 = 0; o0 < y_rows; o0 += 65535) {
    const unsigned n = static_cast<unsigned>(std::min<int64_t>(65535, y_rows - o0));
    combine_kernel<T><<<dim3(bx > 0 ? bx : 1, n), 256, 0, op.stream()>>>(
        static_cast<const T*>(out), ldo, start, list, weight, accumulate ? 1 : 0, y, ldy, o0, cols);
    EMC_LAUNCHED();
  }
}

// The main stream and the context's side lanes (Context::lanes) for one op: fork() makes
// every side lane wait for what the main stream has queued, join() makes the main stream
// wait for every side lane. A fork left unjoined (an exception) is joined by the destructor,
// before the Op frees the scratch memory the lanes may still read.
class Lanes {
 public:
  Lanes(Context& ctx, bool use) : ctx_(ctx), n_(use ? 1 + static_cast<int>(ctx.lanes.size()) : 1) {}
  ~Lanes() {
    if (forked_) join_nothrow();
  }
  Lanes(const Lanes&) = delete;
  Lanes& operator=(const Lanes&) = delete;

  Lane at(int i) const { return i == 0 ? main_lane(ctx_) : Lane{ctx_.lane_blas[i - 1], ctx_.lanes[i - 1]}; }
  // Each expert's lane (moe_plan.h).
  std::vector<int> assign(const int32_t* offsets, int32_t E) const { return lanes_assign(offsets, E, n_); }
  void fork() {
    if (n_ == 1) return;
    EMC_CUDA(cudaEventRecord(ctx_.lane_fork, ctx_.stream));
    for (int i = 1; i < n_; ++i) EMC_CUDA(cudaStreamWaitEvent(ctx_.lanes[i - 1], ctx_.lane_fork, 0));
    forked_ = true;
  }
  void join() {
    if (!forked_) return;
    for (int i = 1; i < n_; ++i) {
      EMC_CUDA(cudaEventRecord(ctx_.lane_done[i - 1], ctx_.lanes[i - 1]));
      EMC_CUDA(cudaStreamWaitEvent(ctx_.stream, ctx_.lane_done[i - 1], 0));
    }
    // Only once every lane is joined: a throw above leaves the destructor to join them all
    // (again), before the scratch they write goes back to the pool.
    forked_ = false;
  }

 private:
  void join_nothrow() {
    for (int i = 1; i < n_; ++i) {
      if (cudaEventRecord(ctx_.lane_done[i - 1], ctx_.lanes[i - 1]) == cudaSuccess)
        cudaStreamWaitEvent(ctx_.stream, ctx_.lane_done[i - 1], 0);
      else
        cudaStreamSynchronize(ctx_.lanes[i - 1]);
    }
    cudaGetLastError();
  }
  Context& ctx_;
  int n_;
  bool forked_ = false;
};

// One cublasGemmGroupedBatchedEx: group g computes C_g[n_g, m_g] (row-major) =
// B_g[n_g, k_g] A_g[m_g, k_g]^T, all in `ab`, fp32 accumulation.
struct Grouped {
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<const void*> a, b;
  std::vector<void*> c;
  void add(const void* A, int64_t ldA, const void* B, int64_t ldB, void* C, int64_t ldC, int64_t M, int64_t N,
           int64_t K) {
    m.push_back(static_cast<int>(M));
    n.push_back(static_cast<int>(N));
    k.push_back(static_cast<int>(K));
    lda.push_back(static_cast<int>(ldA));
    ldb.push_back(static_cast<int>(ldB));
    ldc.push_back(static_cast<int>(ldC));
    size.push_back(1);
    a.push_back(A);
    b.push_back(B);
    c.push_back(C);
  }
  // cuBLAS's grouped GEMM, or with `cutlass` CUTLASS's Hopper kernel for bf16 where it can run
  // (else cuBLAS, and `note` says why).
  void run(Op& op, cudaDataType_t ab, bool cutlass = false, std::string* note = nullptr) {
    const int groups = static_cast<int>(m.size());
    if (groups == 0) return;
    if (cutlass) {
      std::string why = ab == CUDA_R_16BF ? "" : "the CUTLASS grouped GEMM is bf16 only";
      if (ab == CUDA_R_16BF && cutlass_grouped_run(op, groups, m.data(), n.data(), k.data(), a.data(), lda.data(),
                                                   b.data(), ldb.data(), c.data(), ldc.data(), why)) {
        if (note && note->empty()) *note = "cutlass";
        return;
      }
      if (note) *note = "cublas grouped (cutlass: " + why + ")";
    }
#if CUBLAS_VERSION >= 120500
    // cuBLAS cannot look at the pointers it is given in device arrays, and may take them as
    // 16-byte aligned. A misaligned one (a width that is not a multiple of 8) runs the groups
    // one at a time instead, where cuBLAS sees each pointer.
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    for (int g = 0; g < groups; ++g) {
      if (aligned(a[g]) && aligned(b[g]) && aligned(c[g])) continue;
      if (note && (cutlass || note->empty())) *note = "cublas loop (an operand not 16-byte aligned)";
      run_each(op, ab);
      return;
    }
    std::vector<cublasOperation_t> ta(groups, CUBLAS_OP_T), tb(groups, CUBLAS_OP_N);
    std::vector<float> alpha(groups, 1.0f), beta(groups, 0.0f);
    const void** da = op.upload(a.data(), groups);
    const void** db = op.upload(b.data(), groups);
    void** dc = op.upload(c.data(), groups);
    EMC_CUBLAS(cublasGemmGroupedBatchedEx(op.ctx.blas, ta.data(), tb.data(), m.data(), n.data(), k.data(),
                                          alpha.data(), da, ab, lda.data(), db, ab, ldb.data(), beta.data(), dc, ab,
                                          ldc.data(), groups, size.data(), CUBLAS_COMPUTE_32F));
#else
    // cublasGemmGroupedBatchedEx is cuBLAS 12.5+: one GEMM per group instead (AUTO never
    // picks this path then; EM_CUDA_MOE_GEMM=grouped or cutlass does).
    if (note && (cutlass || note->empty())) *note = "cublas loop (grouped GEMM: cuBLAS < 12.5)";
    run_each(op, ab);
#endif
  }
  // The groups one cublasGemmEx at a time (built always, so that compile checks cover it).
  void run_each(Op& op, cudaDataType_t ab) {
    const float alpha = 1.0f, beta = 0.0f;
    for (size_t g = 0; g < m.size(); ++g)
      EMC_CUBLAS(cublasGemmEx(op.ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, m[g], n[g], k[g], &alpha, a[g], ab, lda[g], b[g],
                              ab, ldb[g], &beta, c[g], ab, ldc[g], CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
};

// The CUTLASS mode's fp8 experts (DeepSeek-V3's inference numerics): activations quantized per
// token per 128 columns (act_quant), one CUTLASS blockwise-scaled fp8 grouped GEMM per phase
// with the weights' own 128 x 128 scales (cutlass_grouped_fp8_run), bf16 intermediates; which
// experts qualify: fp8_blockwise_ready (moe_plan.h).

// One phase's groups for cutlass_grouped_fp8_run.
struct Fp8Groups {
  std::vector<int> m, n, k, lda, ldb, ldd;
  std::vector<const void*> a, b;
  std::vector<const float*> sfa, sfb;
  std::vector<void*> d;
  void add(const void* A, int64_t ldA, const float* sA, const em_tensor& w, void* D, int64_t ldD, int64_t M) {
    m.push_back(static_cast<int>(M));
    n.push_back(static_cast<int>(w.shape[0]));
    k.push_back(static_cast<int>(w.shape[1]));
    a.push_back(A);
    lda.push_back(static_cast<int>(ldA));
    sfa.push_back(sA);
    b.push_back(w.data);
    ldb.push_back(static_cast<int>(w.stride[0]));
    sfb.push_back(w.scale);
    d.push_back(D);
    ldd.push_back(static_cast<int>(ldD));
  }
  bool run(Op& op, std::string& why) {
    return cutlass_grouped_fp8_run(op, static_cast<int>(m.size()), m.data(), n.data(), k.data(), a.data(), lda.data(),
                                   sfa.data(), b.data(), ldb.data(), sfb.data(), d.data(), ldd.data(), why);
  }
};

// Whether the CUTLASS fp8 kernel can run in this build on this device, before quantizing the
// activations and allocating for it (the fallback would allocate its own buffers as well).
bool cutlass_fp8_here(const Op& op, std::string& why) {
  if (!cutlass_grouped_built()) {
    why = "dequantized to bf16 (cutlass fp8: this build has no CUTLASS sm_90a code)";
    return false;
  }
  if (op.ctx.cc_major != 9 || op.ctx.cc_minor != 0) {
    why = "dequantized to bf16 (cutlass fp8: built for sm_90a; this device is " + op.ctx.arch + ")";
    return false;
  }
  return true;
}

// Steps 2-4 of moe_ffn for fp8 experts in the CUTLASS mode, from the permuted bf16 rows xg
// into `outh` (bf16 [rows, dim], allocated here); h is the [rows, max_inter] bf16 scratch.
// False (with `note`) when CUTLASS refuses the first phase: nothing is written then, and the
// caller runs the dequantizing grouped path.
bool run_fp8_blockwise(Op& op, const void* xg, int64_t ldx, const std::vector<em_tensor>& w1,
                       const std::vector<em_tensor>& w3, const std::vector<em_tensor>& w2,
                       const std::vector<char>& fused, const int32_t* offsets, int32_t E, int64_t rows, int64_t dim,
                       int64_t max_inter, void* h, PhaseTimes& phases, std::string& note, void*& outh) {
  const int64_t ldgu = 2 * max_inter;
  auto at = [](void* base, int64_t elements) { return static_cast<void*>(static_cast<char*>(base) + 2 * elements); };
  uint8_t* xq = static_cast<uint8_t*>(op.alloc(static_cast<size_t>(rows * dim)));
  float* xs = op.alloc_n<float>(rows * (dim / EM_FP8_BLOCK));
  act_quant_k_major(op, xg, EM_BF16, ldx, rows, dim, xq, xs);
  void* gu = op.alloc(static_cast<size_t>(rows * ldgu) * 2);
  Fp8Groups up;
  for (int32_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
    if (n == 0) continue;
    const uint8_t* xr = xq + r0 * dim;
    const float* sr = xs + r0 * (dim / EM_FP8_BLOCK);
    if (fused[e]) {
      up.add(xr, dim, sr, gate_up_view(w1[e]), at(gu, r0 * ldgu), ldgu, n);
    } else {
      up.add(xr, dim, sr, w1[e], at(gu, r0 * ldgu), ldgu, n);
      up.add(xr, dim, sr, w3[e], at(gu, r0 * ldgu + max_inter), ldgu, n);
    }
  }
  std::string why;
  if (!up.run(op, why)) {
    note = "dequantized to bf16 (cutlass fp8: " + why + ")";
    return false;
  }
  phases.mark("gate/up");
  launch_silu_rows<__nv_bfloat16>(op, gu, at(gu, max_inter), ldgu, rows, max_inter, EM_BF16, h);
  phases.mark("silu");
  uint8_t* hq = static_cast<uint8_t*>(op.alloc(static_cast<size_t>(rows * max_inter)));
  float* hs = op.alloc_n<float>(rows * (max_inter / EM_FP8_BLOCK));
  act_quant_k_major(op, h, EM_BF16, max_inter, rows, max_inter, hq, hs);
  outh = op.alloc(static_cast<size_t>(rows * dim) * 2);
  Fp8Groups down;
  for (int32_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
    if (n == 0) continue;
    down.add(hq + r0 * max_inter, max_inter, hs + r0 * (max_inter / EM_FP8_BLOCK), w2[e], at(outh, r0 * dim), dim, n);
  }
  if (!down.run(op, why)) throw Error(EM_ERR_INTERNAL, "moe_ffn: CUTLASS fp8 ran the gate/up phase but refused down: " + why);
  phases.mark("down");
  note = "cutlass fp8 blockwise";
  return true;
}

}  // namespace

em_status silu_mul(Context& ctx, const em_tensor* gate, const em_tensor* up, em_tensor* y_) {
  Op op(ctx);
  const em_tensor g = op.in(*gate), u = op.in(*up), y = op.out(*y_);
  const int64_t rows = g.shape[0], cols = g.shape[1];
  if (rows > 0 && cols > 0) {
    silu_mul_2d_kernel<<<grid_1d(rows * cols, 256), 256, 0, op.stream()>>>(
        static_cast<const float*>(g.data), g.stride[0], static_cast<const float*>(u.data), u.stride[0],
        static_cast<float*>(y.data), y.stride[0], rows, cols);
    EMC_LAUNCHED();
  }
  op.finish();
  return EM_OK;
}

em_status moe_ffn(Context& ctx, const em_moe_args* a) {
  Op op(ctx);
  set_last_status("");  // what this call ran: fp8 lt GEMMs, then the fusion (below)
  const int32_t E = a->num_experts;
  const int64_t dim = a->x->shape[1];
  const int64_t rows = a->x_index != nullptr ? (E > 0 ? a->expert_offsets[E] : 0) : a->x->shape[0];
  const em_tensor x = op.in(*a->x), y = op.out(*a->y);
  const int64_t y_rows = y.shape[0], ldy = y.stride[0];

  // One activation dtype for the call: the experts' weight dtype (bf16 for fp8 weights).
  const em_dtype wdt = E > 0 ? a->w1[0].dtype : EM_F32;
  const bool fp8 = wdt == EM_F8_E4M3;
  const em_dtype dt = fp8 ? EM_BF16 : wdt;
  int64_t max_inter = 0;
  for (int32_t e = 0; e < E; ++e) {
    if (a->w1[e].dtype != wdt || a->w3[e].dtype != wdt || a->w2[e].dtype != wdt)
      throw Error(EM_ERR_UNSUPPORTED, "the experts of one call must share one weight dtype on CUDA");
    max_inter = std::max<int64_t>(max_inter, a->w1[e].shape[0]);
  }
  const size_t esz = em_dtype_size(dt);
  const cudaDataType_t ab = cuda_type(dt);
  // An empty sum (dim 0, or an expert with rows and no intermediate) is the loop's case:
  // cuBLAS rejects K = 0, gemm_nt writes the zeros itself.
  bool empty_sum = dim == 0;
  for (int32_t e = 0; e < E; ++e)
    if (a->expert_offsets[e + 1] > a->expert_offsets[e] && a->w1[e].shape[0] == 0) empty_sum = true;
  // AUTO: the grouped GEMM for bf16/f16 experts of few rows each (at V3 shapes on an H200 it
  // ran 1.4-1.7x the loop at 1-16 rows per expert, 0.8x at 128: BENCHMARKS.md), else the loop.
  int32_t active = 0;
  for (int32_t e = 0; e < E; ++e) active += a->expert_offsets[e + 1] > a->expert_offsets[e];
  // AUTO, fp8 experts: CUTLASS's blockwise-scaled fp8 grouped GEMM (DeepSeek-V3's act_quant
  // numerics) where this build and device have it and the weights are whole 128 x 128 blocks,
  // else the loop. At V3 shapes on an H200 (2026-12-04) it ran 3.2-10x the loop and 2-4x
  // cuBLASLt's fp8 path from 8 to 16384 tokens (BENCHMARKS.md, "GPU"). An explicit
  // EM_CUDA_FP8_GEMM=lt keeps the lt path.
  std::string auto_refusal;
  const bool fp8_cutlass_auto =
      ctx.moe_gemm == EM_CUDA_MOE_AUTO && fp8 && !fp8_lt_available(ctx) && !empty_sum &&
      cutlass_fp8_here(op, auto_refusal) &&
      fp8_blockwise_ready(std::vector<em_tensor>(a->w1, a->w1 + E), std::vector<em_tensor>(a->w3, a->w3 + E),
                          std::vector<em_tensor>(a->w2, a->w2 + E), a->expert_offsets, E, dim, max_inter, auto_refusal);
  const bool cutlass = ctx.moe_gemm == EM_CUDA_MOE_CUTLASS || fp8_cutlass_auto;
  const bool want_grouped = ctx.moe_gemm == EM_CUDA_MOE_GROUPED || cutlass ||
                            (ctx.moe_gemm == EM_CUDA_MOE_AUTO && kGroupedBuilt && !fp8 && rows < kGroupedRowsPerExpert * active);
  const bool grouped = want_grouped && dt != EM_F32 && !(fp8 && fp8_lt_available(ctx)) && !empty_sum;
  std::string gemm_note;  // the CUTLASS mode: which grouped GEMM ran (and why not CUTLASS)
  const bool direct = a->out_index == nullptr && a->row_weight == nullptr && !a->accumulate && !grouped;

  float* outf = nullptr;  // fp32 down-projection outputs (loop path)
  void* outh = nullptr;   // bf16/f16 outputs (grouped path)
  int64_t ldo = dim;
  PhaseTimes phases(op.stream(), "EM_CUDA_MOE_PROFILE", "moe_ffn");
  int32_t fused_count = 0;
  if (rows > 0 && max_inter > 0) {
    // 1. permute
    const void* xg = x.data;
    int64_t ldx = x.stride[0];
    if (dt != EM_F32 || a->x_index != nullptr) {
      void* buf = op.alloc(static_cast<size_t>(rows * dim) * esz);
      const int32_t* d_index = a->x_index ? op.upload(a->x_index, rows) : nullptr;
      f32_rows_to(op, static_cast<const float*>(x.data), x.stride[0], d_index, rows, dim, dt, buf);
      xg = buf;
      ldx = dim;
    }
    phases.mark("permute");
    std::vector<em_tensor> w1(static_cast<size_t>(E)), w3(static_cast<size_t>(E)), w2(static_cast<size_t>(E));
    std::vector<char> fused(static_cast<size_t>(E), 0);  // gate and up as one GEMM (gate_up_adjacent)
    for (int32_t e = 0; e < E; ++e) {
      if (a->expert_offsets[e + 1] == a->expert_offsets[e]) continue;
      w1[e] = op.in(a->w1[e]);
      w3[e] = op.in(a->w3[e]);
      w2[e] = op.in(a->w2[e]);
      fused[e] = ctx.moe_fuse && gate_up_adjacent(w1[e], w3[e], max_inter);
      fused_count += fused[e];
    }
    // The host's pointer checks (and any copies) of 3 weights per active expert: time here
    // beyond the permute kernel's is the stream waiting for the host.
    phases.mark("stage");
    auto xrow = [&](int64_t r) { return static_cast<const char*>(xg) + static_cast<size_t>(r * ldx) * esz; };
    void* h = op.alloc(static_cast<size_t>(rows * max_inter) * esz);
    auto hrow = [&](int64_t r) { return static_cast<char*>(h) + static_cast<size_t>(r * max_inter) * esz; };
    // Gate/up outputs: row r holds gate in columns [0, max_inter) and up in [max_inter, 2 x max_inter).
    const int64_t ldgu = 2 * max_inter;

    if (!grouped) {
      // 2. gate/up, 3. silu * up, 4. down: one cublasGemmEx (or fp8_gemm) per expert and
      // projection; bf16/f16/f32 experts spread over the context's lanes (fp8 GEMMs share
      // one weight scratch buffer: one stream).
      ScratchBuf wbuf;
      Lanes lanes(ctx, !fp8);
      const std::vector<int> lane_of = lanes.assign(a->expert_offsets, E);
      auto expert_gemm = [&](int32_t e, const void* xr, int64_t ldxr, const em_tensor& w, float* yr, int64_t ldyr,
                             int64_t n) {
        if (fp8) fp8_gemm(op, xr, dt, ldxr, w, yr, ldyr, n, wbuf);
        else
          gemm_nt(lanes.at(lane_of[e]), xr, ldxr, w.data, w.stride[0], ab, yr, ldyr, CUDA_R_32F, n, w.shape[0],
                  w.shape[1], false);
      };
      float* gu = op.alloc_n<float>(rows * ldgu);
      outf = direct ? static_cast<float*>(y.data) : op.alloc_n<float>(rows * dim);
      ldo = direct ? ldy : dim;
      lanes.fork();
      for (int32_t e = 0; e < E; ++e) {
        const int64_t r0 = a->expert_offsets[e], n = a->expert_offsets[e + 1] - r0;
        if (n == 0) continue;
        float* g = gu + r0 * ldgu;
        if (fused[e]) {
          expert_gemm(e, xrow(r0), ldx, gate_up_view(w1[e]), g, ldgu, n);
        } else {
          expert_gemm(e, xrow(r0), ldx, w1[e], g, ldgu, n);
          expert_gemm(e, xrow(r0), ldx, w3[e], g + max_inter, ldgu, n);
        }
      }
      lanes.join();
      phases.mark("gate/up");
      launch_silu_rows<float>(op, gu, gu + max_inter, ldgu, rows, max_inter, dt, h);
      phases.mark("silu");
      lanes.fork();
      for (int32_t e = 0; e < E; ++e) {
        const int64_t r0 = a->expert_offsets[e], n = a->expert_offsets[e + 1] - r0;
        if (n == 0) continue;
        expert_gemm(e, hrow(r0), max_inter, w2[e], outf + r0 * ldo, ldo, n);
      }
      lanes.join();
      phases.mark("down");
    } else if (fp8 && cutlass && cutlass_fp8_here(op, gemm_note) &&
               fp8_blockwise_ready(w1, w3, w2, a->expert_offsets, E, dim, max_inter, gemm_note) &&
               run_fp8_blockwise(op, xg, ldx, w1, w3, w2, fused, a->expert_offsets, E, rows, dim, max_inter, h,
                                 phases, gemm_note, outh)) {
      // done: outh holds the down projections (bf16)
    } else {
      // The same with one grouped GEMM per phase; intermediates in the weights' dtype. Why the
      // fp8 blockwise path did not run (if it was tried) goes after what runs here, so that
      // the status says "cutlass" when the bf16 kernel ran on the dequantized weights.
      const std::string fp8_refusal = std::move(gemm_note);
      gemm_note.clear();
      void* gu = op.alloc(static_cast<size_t>(rows * ldgu) * esz);
      auto at = [&](void* base, int64_t r, int64_t ld) {
        return static_cast<void*>(static_cast<char*>(base) + static_cast<size_t>(r * ld) * esz);
      };
      // fp8: weights dequantized to bf16 into `wpool` (every single weight fits); a full pool
      // runs the batch's grouped GEMM first, after which stream order lets the pool be reused.
      char* wpool = nullptr;
      size_t wcap = 0, wused = 0;
      auto wbytes = [](const em_tensor& w) {  // bf16 bytes, 256-byte aligned
        return (static_cast<size_t>(w.shape[0] * w.shape[1]) * 2 + 255) & ~size_t{255};
      };
      if (fp8) {
        size_t up_total = 0, down_total = 0, largest = 0;
        for (int32_t e = 0; e < E; ++e) {
          if (a->expert_offsets[e + 1] == a->expert_offsets[e]) continue;
          up_total += fused[e] ? wbytes(gate_up_view(w1[e])) : wbytes(w1[e]) + wbytes(w3[e]);
          down_total += wbytes(w2[e]);
          largest = std::max({largest, wbytes(w1[e]), wbytes(w3[e]), wbytes(w2[e])});
          if (fused[e]) largest = std::max(largest, wbytes(gate_up_view(w1[e])));
        }
        wcap = std::max(largest, std::min(kFp8GroupedBytes, std::max(up_total, down_total)));
        wpool = static_cast<char*>(op.alloc(wcap));
      }
      // The weight as cuBLAS reads it (ld: its leading dimension); may run and clear `batch`.
      auto weight = [&](Grouped& batch, const em_tensor& w, int64_t& ld) -> const void* {
        if (!fp8) {
          ld = w.stride[0];
          return w.data;
        }
        const size_t bytes = wbytes(w);
        if (wused > 0 && wused + bytes > wcap) {
          batch.run(op, ab, cutlass, &gemm_note);
          batch = Grouped();
          wused = 0;
        }
        void* dst = wpool + wused;
        wused += bytes;
        fp8_to_bf16(op, w, dst);
        ld = std::max<int64_t>(1, w.shape[1]);
        return dst;
      };
      Grouped up;
      for (int32_t e = 0; e < E; ++e) {
        const int64_t r0 = a->expert_offsets[e], n = a->expert_offsets[e + 1] - r0;
        if (n == 0) continue;
        const int64_t inter = w1[e].shape[0];
        void* g = at(gu, r0, ldgu);
        if (fused[e]) {
          int64_t ld = 0;
          const em_tensor w = gate_up_view(w1[e]);
          const void* p = weight(up, w, ld);
          up.add(p, ld, xrow(r0), ldx, g, ldgu, 2 * inter, n, dim);
          continue;
        }
        int64_t ld1 = 0, ld3 = 0;
        const void* p1 = weight(up, w1[e], ld1);
        up.add(p1, ld1, xrow(r0), ldx, g, ldgu, inter, n, dim);
        const void* p3 = weight(up, w3[e], ld3);
        up.add(p3, ld3, xrow(r0), ldx, static_cast<char*>(g) + static_cast<size_t>(max_inter) * esz, ldgu, inter, n,
               dim);
      }
      up.run(op, ab, cutlass, &gemm_note);
      phases.mark("gate/up");
      wused = 0;
      const void* u = static_cast<const char*>(gu) + static_cast<size_t>(max_inter) * esz;
      if (dt == EM_BF16) launch_silu_rows<__nv_bfloat16>(op, gu, u, ldgu, rows, max_inter, dt, h);
      else launch_silu_rows<__half>(op, gu, u, ldgu, rows, max_inter, dt, h);
      phases.mark("silu");
      outh = op.alloc(static_cast<size_t>(rows * dim) * esz);
      Grouped down;
      for (int32_t e = 0; e < E; ++e) {
        const int64_t r0 = a->expert_offsets[e], n = a->expert_offsets[e + 1] - r0;
        if (n == 0) continue;
        int64_t ld2 = 0;
        const void* p2 = weight(down, w2[e], ld2);
        down.add(p2, ld2, hrow(r0), max_inter, at(outh, r0, dim), dim, dim, n, w2[e].shape[1]);
      }
      down.run(op, ab, cutlass, &gemm_note);
      phases.mark("down");
      if (!fp8_refusal.empty()) gemm_note += (gemm_note.empty() ? "(" : " (") + fp8_refusal + ")";
    }
  } else if (rows > 0) {  // experts with no intermediate width: the FFN is 0
    outf = direct ? static_cast<float*>(y.data) : op.alloc_n<float>(rows * dim);
    ldo = direct ? ldy : dim;
    EMC_CUDA(cudaMemset2DAsync(outf, sizeof(float) * static_cast<size_t>(ldo), 0, sizeof(float) * static_cast<size_t>(dim),
                               static_cast<size_t>(rows), op.stream()));
  }
  // What ran, for the profile line and em_cuda_last_status() (appended to an fp8 lt status);
  // built only when one of them wants it.
  const bool say = fused_count > 0 || (grouped && cutlass);
  const std::string summary =
      say || phases.on() ? std::string(grouped ? (cutlass ? "grouped " + gemm_note : "grouped") : "loop") + ", " +
                               std::to_string(rows) + " rows, " + std::to_string(active) +
                               " experts, gate/up fused for " + std::to_string(fused_count)
                         : std::string();
  if (say) {
    const std::string prev = last_status();
    set_last_status(prev.empty() ? "moe_ffn: " + summary : prev + "; moe_ffn: " + summary);
  }
  if (direct) {
    op.finish();
    phases.print(summary);
    return EM_OK;
  }

  // 5. unpermute + weighted combine (every y row is written: 0 or y when no row maps to it).
  std::vector<int32_t> start(static_cast<size_t>(y_rows + 1), 0), list(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) ++start[static_cast<size_t>((a->out_index ? a->out_index[r] : r) + 1)];
  for (int64_t o = 0; o < y_rows; ++o) start[o + 1] += start[o];
  {
    std::vector<int32_t> fill(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < rows; ++r) list[fill[a->out_index ? a->out_index[r] : r]++] = static_cast<int32_t>(r);
  }
  const int32_t* d_start = op.upload(start.data(), y_rows + 1);
  const int32_t* d_list = op.upload(list.data(), rows);
  const float* d_weight = a->row_weight ? op.upload(a->row_weight, rows) : nullptr;
  float* yd = static_cast<float*>(y.data);
  if (outh == nullptr) {
    launch_combine<float>(op, outf, ldo, d_start, d_list, d_weight, a->accumulate != 0, yd, ldy, y_rows, dim);
  } else if (dt == EM_BF16) {
    launch_combine<__nv_bfloat16>(op, outh, dim, d_start, d_list, d_weight, a->accumulate != 0, yd, ldy, y_rows, dim);
  } else {
    launch_combine<__half>(op, outh, dim, d_start, d_list, d_weight, a->accumulate != 0, yd, ldy, y_rows, dim);
  }
  phases.mark("combine");
  op.finish();
  phases.print(summary);
  return EM_OK;
}

}  // namespace em::cuda
