// Conversion family: dtype conversion between views, including fp8 e4m3 dequantization
// with 128x128 weight_scale_inv blocks ("dequantize on load"; the GEMM kernels can also
// consume fp8 directly) and quantization into such blocks (serving a bf16 checkpoint in fp8).
#include <algorithm>
#include <cmath>
#include <vector>

#include "../kv_pages.h"
#include "cpu.h"
#include "dtype.h"

namespace em::cpu {

namespace {

// dst [rows, cols] fp8 from any src: per 128 x 128 block, scale = amax / 448 (1 for a block
// of zeros; NaN skipped) stored in dst->scale, code = e4m3(x / scale): the division and
// rounding of floats.ts's quantizeE4m3Blocks, bit for bit. (x / scale in f32 is the f32
// rounding of the exact quotient, as floats.ts's double division then rounding to f32 is:
// a double holds more than twice f32's bits. f32_to_fp8 with inv 1 then rounds it to e4m3.)
// One work item per block, so that a matrix of a few row blocks still fills the threads.
em_status quantize_fp8(Context& ctx, const Weight& w, int64_t rows, int64_t cols, em_tensor* dst) {
  const int64_t dst_ld = dst->ndim >= 2 ? dst->stride[dst->ndim - 2] : cols;
  const int64_t block_cols = (cols + 127) / 128;
  const int64_t scale_stride = dst->scale_stride > 0 ? dst->scale_stride : block_cols;
  const Kernels& k = *ctx.k;
  ctx.pool.parallel_for(((rows + 127) / 128) * block_cols, [&](int64_t item, int) {
    const int64_t br = item / block_cols, bc = item % block_cols;
    const int64_t r0 = br * 128, r1 = std::min(rows, r0 + 128);
    const int64_t c0 = bc * 128, n = std::min(cols, c0 + 128) - c0;
    float f[128 * 128];
    float amax = 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
      float* x = f + (r - r0) * 128;
      w.row_to_f32(r, c0, n, x);
      amax = std::max(amax, k.abs_max(x, n));
    }
    const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
    const_cast<float*>(dst->scale)[br * scale_stride + bc] = scale;
    for (int64_t r = r0; r < r1; ++r) {
      float* x = f + (r - r0) * 128;
      for (int64_t c = 0; c < n; ++c) x[c] = x[c] / scale;
      k.f32_to_fp8(x, n, 1.0, static_cast<uint8_t*>(dst->data) + r * dst_ld + c0);
    }
  });
  return EM_OK;
}

}  // namespace

em_status convert(Context& ctx, const em_tensor* src, em_tensor* dst) {
  // View both as [rows, cols]: 1-D is one row; rank > 2 is contiguous (validated).
  const int64_t cols = src->shape[src->ndim - 1];
  int64_t rows = 1;
  for (int i = 0; i + 1 < src->ndim; ++i) rows *= src->shape[i];
  const int64_t src_ld = src->ndim >= 2 ? src->stride[src->ndim - 2] : cols;
  const int64_t dst_ld = dst->ndim >= 2 ? dst->stride[dst->ndim - 2] : cols;
  Weight w = weight_view(*src);
  w.rows = rows;
  w.cols = cols;
  w.ld = src_ld;
  if (dst->dtype == EM_F8_E4M3) return quantize_fp8(ctx, w, rows, cols, dst);
  constexpr int64_t kRowsPerItem = 64;
  ctx.pool.parallel_for((rows + kRowsPerItem - 1) / kRowsPerItem, [&](int64_t item, int) {
    std::vector<float> buf(static_cast<size_t>(cols));
    const int64_t r1 = std::min(rows, (item + 1) * kRowsPerItem);
    for (int64_t r = item * kRowsPerItem; r < r1; ++r) {
      float* f = dst->dtype == EM_F32 ? static_cast<float*>(dst->data) + r * dst_ld : buf.data();
      w.row_to_f32(r, 0, cols, f);
      if (dst->dtype == EM_BF16) {
        uint16_t* o = static_cast<uint16_t*>(dst->data) + r * dst_ld;
        for (int64_t c = 0; c < cols; ++c) o[c] = f32_to_bf16(f[c]);
      } else if (dst->dtype == EM_F16) {
        uint16_t* o = static_cast<uint16_t*>(dst->data) + r * dst_ld;
        for (int64_t c = 0; c < cols; ++c) o[c] = f32_to_f16(f[c]);
      }
    }
  });
  return EM_OK;
}

}  // namespace em::cpu
