// Conversion family: dtype conversion between views, including fp8 e4m3 dequantization
// with 128x128 weight_scale_inv blocks ("dequantize on load"; the GEMM kernels can also
// consume fp8 directly).
#include <algorithm>
#include <vector>

#include "cpu.h"
#include "dtype.h"

namespace em::cpu {

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
