// GEMM family on cuBLAS: the row-major Linear helper, matmul, and the router gate (logits
// by an fp32 GEMM, then scoring, group limiting and top-k in one kernel per token).
//
// Precision: f32 weights run an fp32 GEMM (no TF32). bf16 / f16 weights run on tensor
// cores, so the f32 activations are rounded to the weight's dtype first (as PyTorch does
// with bf16 models); accumulation is fp32. The gate converts its (small) weight to f32
// instead, so that top-k selection sees the same logits as the CPU backend up to fp32
// summation order. fp8 weights: see fp8.cu (the gate converts them to f32 like the others).
#include <cmath>
#include <limits>

#include "common.cuh"

namespace em::cuda {

namespace {

int to_int(int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    throw Error(EM_ERR_SHAPE, std::string(what) + " exceeds cuBLAS's 32-bit sizes");
  return static_cast<int>(v);
}

__global__ void f32_rows_kernel(const float* src, int64_t lds, const int32_t* row_index, int64_t rows, int64_t cols,
                                em_dtype dt, void* dst) {
  const int64_t r = blockIdx.y;
  const float* s = src + (row_index ? row_index[r] : r) * lds;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store_f32(dst, dt, r * cols + c, s[c]);
}

__global__ void weight_f32_kernel(const void* data, em_dtype dt, int64_t ld, const float* scale, int64_t scale_ld,
                                  int64_t rows, int64_t cols, float* dst) {
  const int64_t r = blockIdx.y;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[r * cols + c] = load_f32(data, dt, ld, r, c, scale, scale_ld);
}

// One block per token: scores (softmax or sigmoid) in parallel, then thread 0 does the
// selection exactly as the CPU backend (highest first, lower index on ties; dropped groups
// get -inf; group score = max, or with a bias the sum of the top two).
__global__ void gate_select_kernel(const float* logits, int64_t E, const float* bias, em_gate_config cfg,
                                   int32_t* idx, int64_t ld_idx, float* wt, int64_t ld_wt) {
  extern __shared__ float smem[];
  float* scores = smem;           // [E]
  float* choice = smem + E;       // [E]
  float* group_score = smem + 2 * E;  // [n_group]
  const int64_t t = blockIdx.x;
  const float* l = logits + t * E;
  __shared__ float shift, inv_sum;
  if (cfg.score_func == EM_SCORE_SOFTMAX) {
    if (threadIdx.x == 0) {
      float mx = -INFINITY;
      for (int64_t e = 0; e < E; ++e) mx = fmaxf(mx, l[e]);
      shift = mx;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) scores[e] = expf(l[e] - shift);
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) sum += scores[e];
      inv_sum = 1.0f / sum;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) scores[e] *= inv_sum;
  } else {
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) scores[e] = 1.0f / (1.0f + expf(-l[e]));
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) choice[e] = bias ? scores[e] + bias[e] : scores[e];
  __syncthreads();
  if (threadIdx.x != 0) return;

  const int32_t G = cfg.n_group;
  if (cfg.topk_method != EM_TOPK_GREEDY && G > 1) {
    const int64_t per = E / G;
    for (int32_t g = 0; g < G; ++g) {
      const float* c = choice + g * per;
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int64_t j = 0; j < per; ++j) {
        if (c[j] > top1) {
          top2 = top1;
          top1 = c[j];
        } else if (c[j] > top2) {
          top2 = c[j];
        }
      }
      group_score[g] = bias == nullptr ? top1 : (per > 1 ? top1 + top2 : top1);
    }
    // Keep the topk_group best groups (bit set per kept group).
    uint64_t keep_mask[16] = {};  // up to 1024 groups
    for (int32_t j = 0; j < cfg.topk_group; ++j) {
      int32_t best = -1;
      for (int32_t g = 0; g < G; ++g) {
        if (keep_mask[g >> 6] >> (g & 63) & 1u) continue;
        if (best < 0 || group_score[g] > group_score[best]) best = g;
      }
      keep_mask[best >> 6] |= uint64_t{1} << (best & 63);
    }
    for (int32_t g = 0; g < G; ++g)
      if (!(keep_mask[g >> 6] >> (g & 63) & 1u))
        for (int64_t j = 0; j < per; ++j) choice[g * per + j] = -INFINITY;
  }
  int32_t* out_idx = idx + t * ld_idx;
  float* out_wt = wt + t * ld_wt;
  float sum = 0.0f;
  for (int32_t j = 0; j < cfg.top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int32_t i = 0; i < j; ++i) taken |= out_idx[i] == e;
      if (taken) continue;
      if (best < 0 || choice[e] > choice[best]) best = e;
    }
    out_idx[j] = static_cast<int32_t>(best);
    out_wt[j] = scores[best];
    sum += scores[best];
  }
  const float norm = cfg.norm_topk_prob ? 1.0f / sum : 1.0f;
  for (int32_t j = 0; j < cfg.top_k; ++j) out_wt[j] = out_wt[j] * norm * cfg.routed_scaling_factor;
}

dim3 rows_grid(int64_t rows, int64_t cols, int threads) {
  const unsigned x = static_cast<unsigned>(std::min<int64_t>((cols + threads - 1) / threads, 64));
  return dim3(x > 0 ? x : 1, static_cast<unsigned>(rows));
}

}  // namespace

void gemm_nt(const Lane& lane, const void* x, int64_t ldx, const void* w, int64_t ldw, cudaDataType_t ab, void* y,
             int64_t ldy, cudaDataType_t yt, int64_t M, int64_t N, int64_t K, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum (cuBLAS rejects the leading dimensions of 0 it would get)
    if (accumulate) return;
    const size_t esz = yt == CUDA_R_32F ? 4 : 2;
    EMC_CUDA(cudaMemset2DAsync(y, static_cast<size_t>(ldy) * esz, 0, static_cast<size_t>(N) * esz,
                               static_cast<size_t>(M), lane.stream));
    return;
  }
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  // Row-major y[M, N] is column-major y^T[N, M] = w x^T: A = w (transposed), B = x.
  EMC_CUBLAS(cublasGemmEx(lane.blas, CUBLAS_OP_T, CUBLAS_OP_N, to_int(N, "N"), to_int(M, "M"), to_int(K, "K"), &alpha,
                          w, ab, to_int(ldw, "ldw"), x, ab, to_int(ldx, "ldx"), &beta, y, yt, to_int(ldy, "ldy"),
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void f32_rows_to(Op& op, const float* src, int64_t lds, const int32_t* row_index, int64_t rows, int64_t cols,
                 em_dtype dt, void* dst) {
  if (rows == 0 || cols == 0) return;
  if (rows > 65535 * 1024LL) throw Error(EM_ERR_SHAPE, "too many rows for one launch");
  // gridDim.y is limited to 65535: launch in chunks of rows.
  for (int64_t r0 = 0; r0 < rows; r0 += 65535) {
    const int64_t n = std::min<int64_t>(65535, rows - r0);
    const size_t esz = em_dtype_size(dt);
    f32_rows_kernel<<<rows_grid(n, cols, 256), 256, 0, op.stream()>>>(
        row_index ? src : src + r0 * lds, lds, row_index ? row_index + r0 : nullptr, n, cols, dt,
        static_cast<char*>(dst) + static_cast<size_t>(r0 * cols) * esz);
    EMC_LAUNCHED();
  }
}

float* weight_to_f32(Op& op, const em_tensor& w) {
  const int64_t rows = w.ndim == 2 ? w.shape[0] : 1, cols = w.shape[w.ndim - 1];
  const int64_t ld = w.ndim == 2 ? w.stride[0] : cols;
  float* dst = op.alloc_n<float>(rows * cols);
  constexpr int64_t kChunk = 511 * EM_FP8_BLOCK;  // <= gridDim.y's 65535, whole scale blocks
  for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, rows - r0);
    const size_t esz = em_dtype_size(w.dtype);
    // fp8 scale rows follow absolute row numbers: offset data only by whole 128-row blocks.
    weight_f32_kernel<<<rows_grid(n, cols, 256), 256, 0, op.stream()>>>(
        static_cast<const char*>(w.data) + static_cast<size_t>(r0 * ld) * esz, w.dtype, ld,
        w.scale ? w.scale + (r0 / EM_FP8_BLOCK) * w.scale_stride : nullptr, w.scale_stride, n, cols, dst + r0 * cols);
    EMC_LAUNCHED();
  }
  return dst;
}

em_status matmul(Context& ctx, const em_tensor* x_, const em_tensor* w_, em_tensor* y_) {
  Op op(ctx);
  const em_tensor x = op.in(*x_), w = op.in(*w_), y = op.out(*y_);
  const int64_t M = x.shape[0], K = x.shape[1], N = w.shape[0];
  if (w.dtype == EM_F32) {
    gemm_nt(ctx, x.data, x.stride[0], w.data, w.stride[0], CUDA_R_32F, y.data, y.stride[0], CUDA_R_32F, M, N, K, false);
  } else if (w.dtype == EM_F8_E4M3) {  // fp8.cu: f32 activations as they are up to kFp8SkinnyRows rows
    ScratchBuf wbuf;
    fp8_gemm(op, x.data, EM_F32, x.stride[0], w, static_cast<float*>(y.data), y.stride[0], M, wbuf);
  } else {
    void* xc = op.alloc(static_cast<size_t>(M * K) * em_dtype_size(w.dtype));
    f32_rows_to(op, static_cast<const float*>(x.data), x.stride[0], nullptr, M, K, w.dtype, xc);
    gemm_nt(ctx, xc, K, w.data, w.stride[0], cuda_type(w.dtype), y.data, y.stride[0], CUDA_R_32F, M, N, K, false);
  }
  op.finish();
  return EM_OK;
}

em_status gate(Context& ctx, const em_tensor* x_, const em_tensor* weight_, const em_tensor* bias_,
               const em_gate_config* cfg, em_tensor* idx_, em_tensor* wt_) {
  Op op(ctx);
  const em_tensor x = op.in(*x_), w = op.in(*weight_);
  const em_tensor idx = op.out(*idx_), wt = op.out(*wt_);
  const float* bias = bias_ ? static_cast<const float*>(op.in(*bias_).data) : nullptr;
  const int64_t T = x.shape[0], D = x.shape[1], E = w.shape[0];
  if (cfg->n_group > 1024) throw Error(EM_ERR_UNSUPPORTED, "more than 1024 expert groups");
  const float* wf = w.dtype == EM_F32 && w.stride[0] == D ? static_cast<const float*>(w.data) : weight_to_f32(op, w);
  float* logits = op.alloc_n<float>(T * E);
  gemm_nt(ctx, x.data, x.stride[0], wf, D, CUDA_R_32F, logits, E, CUDA_R_32F, T, E, D, false);
  const size_t smem = sizeof(float) * static_cast<size_t>(2 * E + cfg->n_group);
  if (smem > 48 * 1024) throw Error(EM_ERR_UNSUPPORTED, "gate: too many experts for one block's shared memory");
  if (T > 0) {
    gate_select_kernel<<<static_cast<unsigned>(T), 128, smem, op.stream()>>>(
        logits, E, bias, *cfg, static_cast<int32_t*>(idx.data), idx.stride[0], static_cast<float*>(wt.data),
        wt.stride[0]);
    EMC_LAUNCHED();
  }
  op.finish();
  return EM_OK;
}

}  // namespace em::cuda
