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
// Activations are not quantized to fp8 (DeepSeek's per-token-per-128 scheme): that would cost
// parity with the CPU backend (~5% of the largest output instead of ~0.5%). An fp8 tensor-core
// path (cuBLASLt VEC128 / BLK128x128 scale modes, sm_90) would go next to the wide path.
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

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

}  // namespace

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
