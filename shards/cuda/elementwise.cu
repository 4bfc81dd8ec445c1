// Row-wise and element-wise ops: RMSNorm, rotary embedding (YaRN frequencies from the
// shared em_rope_inv_freq), and dtype conversion (fp8 dequantization included).
#include <algorithm>
#include <vector>

#include "common.cuh"

namespace em::cuda {

namespace {

// One block per row: sum of squares in fp32, then y = x * rsqrt(mean + eps) * w.
__global__ void rmsnorm_kernel(const float* x, int64_t ldx, const void* w, em_dtype wdt, float eps, float* y,
                               int64_t ldy, int64_t dim) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * ldx;
  float acc = 0.0f;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) acc += xr[c] * xr[c];
  __shared__ float partial[32];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  __shared__ float inv;
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (unsigned i = 0; i < (blockDim.x + 31) / 32; ++i) s += partial[i];
    inv = 1.0f / sqrtf(s / static_cast<float>(dim) + eps);
  }
  __syncthreads();
  float* yr = y + r * ldy;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = xr[c] * inv * load_f32(w, wdt, 0, 0, c, nullptr, 0);
}

// One block per token, threads over (head, pair): angle = pos * inv_freq in fp32 (as
// torch.outer), cos/sin of that angle in double, rounded to fp32 (as the CPU backend).
__global__ void rope_kernel(float* x, int64_t ld_t, int64_t ld_h, int64_t heads, int half, const int32_t* positions,
                            const float* inv_freq) {
  const int64_t t = blockIdx.x;
  const float pos = static_cast<float>(positions[t]);
  for (int64_t i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int64_t hd = i / half;
    const int p = static_cast<int>(i - hd * half);
    double s, c;
    sincos(static_cast<double>(pos * inv_freq[p]), &s, &c);
    const float cf = static_cast<float>(c), sf = static_cast<float>(s);
    float* v = x + t * ld_t + hd * ld_h + 2 * p;
    const float re = v[0], im = v[1];
    v[0] = __fsub_rn(__fmul_rn(re, cf), __fmul_rn(im, sf));
    v[1] = __fadd_rn(__fmul_rn(re, sf), __fmul_rn(im, cf));
  }
}

// dst[r, c] = dst_dtype(src[r, c] as f32) over [rows, cols] views (fp8 with block scales).
__global__ void convert_kernel(const void* src, em_dtype sdt, int64_t lds, const float* scale, int64_t scale_ld,
                               void* dst, em_dtype ddt, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    store_f32(dst, ddt, r * ldd + c, load_f32(src, sdt, lds, r, c, scale, scale_ld));
  }
}

unsigned grid_1d(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535 * 4)));
}

}  // namespace

em_status rmsnorm(Context& ctx, const em_tensor* x_, const em_tensor* weight_, float eps, em_tensor* y_) {
  Op op(ctx);
  const em_tensor x = op.in(*x_), w = op.in(*weight_), y = op.out(*y_);
  const int64_t rows = x.shape[0], dim = x.shape[1];
  if (rows > 0 && dim > 0) {
    rmsnorm_kernel<<<static_cast<unsigned>(rows), 256, 0, op.stream()>>>(static_cast<const float*>(x.data),
                                                                       x.stride[0], w.data, w.dtype, eps,
                                                                       static_cast<float*>(y.data), y.stride[0], dim);
    EMC_LAUNCHED();
  }
  op.finish();
  return EM_OK;
}

em_status rope(Context& ctx, em_tensor* x_, const int32_t* positions, const em_rope_config* cfg) {
  Op op(ctx);
  const em_tensor x = op.out(*x_);
  const int half = cfg->rope_dim / 2;
  const int64_t tokens = x.shape[0], heads = x.ndim == 3 ? x.shape[1] : 1;
  const int64_t ld_h = x.ndim == 3 ? x.stride[1] : 0;
  if (tokens > 0 && heads > 0) {
    std::vector<float> inv_freq(static_cast<size_t>(half));
    em_rope_inv_freq(cfg, inv_freq.data());
    const float* d_freq = op.upload(inv_freq.data(), half);
    const int32_t* d_pos = op.upload(positions, tokens);
    const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, heads * half)));
    rope_kernel<<<static_cast<unsigned>(tokens), threads, 0, op.stream()>>>(static_cast<float*>(x.data), x.stride[0],
                                                                           ld_h, heads, half, d_pos, d_freq);
    EMC_LAUNCHED();
  }
  op.finish();
  return EM_OK;
}

em_status convert(Context& ctx, const em_tensor* src_, em_tensor* dst_) {
  Op op(ctx);
  const em_tensor s = op.in(*src_), d = op.out(*dst_);
  // As [rows, cols]: 1-D is one row; rank > 2 is contiguous (checked by the dispatcher).
  int64_t rows = 1, cols = s.shape[s.ndim - 1];
  for (int i = 0; i + 1 < s.ndim; ++i) rows *= s.shape[i];
  const int64_t lds = s.ndim >= 2 ? s.stride[s.ndim - 2] : cols, ldd = d.ndim >= 2 ? d.stride[d.ndim - 2] : cols;
  if (rows > 0 && cols > 0) {
    convert_kernel<<<grid_1d(rows * cols, 256), 256, 0, op.stream()>>>(s.data, s.dtype, lds, s.scale, s.scale_stride,
                                                                       d.data, d.dtype, ldd, rows, cols);
    EMC_LAUNCHED();
  }
  op.finish();
  return EM_OK;
}

}  // namespace em::cuda
