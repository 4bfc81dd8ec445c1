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
// of zeros; NaN skipped) stored in dst->scale, code = e4m3(f32(double(x) / scale)): the
// division and rounding of floats.ts's quantizeE4m3Blocks, bit for bit.
em_status quantize_fp8(Context& ctx, const Weight& w, int64_t rows, int64_t cols, em_tensor* dst) {
  const int64_t dst_ld = dst->ndim >= 2 ? dst->stride[dst->ndim - 2] : cols;
  const int64_t block_cols = (cols + 127) / 128;
  const int64_t scale_stride = dst->scale_stride > 0 ? dst->scale_stride : block_cols;
  ctx.pool.parallel_for((rows + 127) / 128, [&](int64_t br, int) {
    const int64_t r0 = br * 128, r1 = std::min(rows, r0 + 128);
    std::vector<float> f(static_cast<size_t>((r1 - r0) * cols));
    for (int64_t r = r0; r < r1; ++r) w.row_to_f32(r, 0, cols, f.data() + (r - r0) * cols);
    for (int64_t bc = 0; bc < block_cols; ++bc) {
      const int64_t c0 = bc * 128, c1 = std::min(cols, c0 + 128);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const float a = std::fabs(f[(r - r0) * cols + c]);
          if (a > amax) amax = a;  // NaN compares false: skipped
        }
      const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
      const_cast<float*>(dst->scale)[br * scale_stride + bc] = scale;
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* o = static_cast<uint8_t*>(dst->data) + r * dst_ld;
        const float* x = f.data() + (r - r0) * cols;
        for (int64_t c = c0; c < c1; ++c)
          o[c] = f32_to_e4m3(static_cast<float>(static_cast<double>(x[c]) / static_cast<double>(scale)));
      }
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
