// Norm family: RMSNorm, y = x * rsqrt(mean(x^2) + eps) * weight, computed in fp32.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu.h"
#include "simd.h"

namespace em::cpu {

namespace scalar {

float sum_squares(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
  return acc;
}

void scale_mul(const float* x, float s, const float* w, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * s * w[i];
}

}  // namespace scalar

#if EM_X86
namespace avx2 {

EM_AVX2 float sum_squares(const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  return simd::hsum(_mm256_add_ps(a0, a1)) + scalar::sum_squares(x + i, n - i);
}

EM_AVX2 void scale_mul(const float* x, float s, const float* w, float* y, int64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), sv), _mm256_loadu_ps(w + i)));
  scalar::scale_mul(x + i, s, w + i, y + i, n - i);
}

}  // namespace avx2
#endif

em_status rmsnorm(Context& ctx, const em_tensor* x, const em_tensor* weight, float eps, em_tensor* y) {
  const int64_t rows = x->shape[0], dim = x->shape[1];
  // Norm weights are tiny (dim values); convert them once per call.
  std::vector<float> w(static_cast<size_t>(dim));
  weight_view(*weight).row_to_f32(0, 0, dim, w.data());
  const float* xd = static_cast<const float*>(x->data);
  float* yd = static_cast<float*>(y->data);
  const int64_t rows_per_item = std::max<int64_t>(1, 65536 / std::max<int64_t>(dim, 1));
  const int64_t items = (rows + rows_per_item - 1) / rows_per_item;
  ctx.pool.parallel_for(items, [&](int64_t item, int) {
    const int64_t r1 = std::min(rows, (item + 1) * rows_per_item);
    for (int64_t r = item * rows_per_item; r < r1; ++r) {
      const float* xr = xd + r * x->stride[0];
      const float mean_sq = ctx.k->sum_squares(xr, dim) / static_cast<float>(dim);
      ctx.k->scale_mul(xr, 1.0f / std::sqrt(mean_sq + eps), w.data(), yd + r * y->stride[0], dim);
    }
  });
  return EM_OK;
}

}  // namespace em::cpu
