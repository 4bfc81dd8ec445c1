// Activation family: SiLU-and-multiply (the expert/MLP gate) and the exp kernel that
// softmaxes share.
#include <algorithm>
#include <cmath>

#include "cpu.h"
#include "simd.h"

namespace em::cpu {

namespace scalar {

void silu_mul(const float* gate, const float* up, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

float exp_sum(float* x, int64_t n, float shift) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

}  // namespace scalar

#if EM_X86
namespace avx2 {

EM_AVX2 void silu_mul(const float* gate, const float* up, float* y, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  scalar::silu_mul(gate + i, up + i, y + i, n - i);
}

EM_AVX2 float exp_sum(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  return simd::hsum(acc) + scalar::exp_sum(x + i, n - i, shift);
}

}  // namespace avx2
#endif

em_status silu_mul(Context& ctx, const em_tensor* gate, const em_tensor* up, em_tensor* y) {
  const int64_t rows = gate->shape[0], cols = gate->shape[1];
  const float* g = static_cast<const float*>(gate->data);
  const float* u = static_cast<const float*>(up->data);
  float* out = static_cast<float*>(y->data);
  // Rows per work item: about 64k elements, enough to amortize a wake-up.
  const int64_t rows_per_item = std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1));
  const int64_t items = (rows + rows_per_item - 1) / rows_per_item;
  ctx.pool.parallel_for(items, [&](int64_t item, int) {
    const int64_t r1 = std::min(rows, (item + 1) * rows_per_item);
    for (int64_t r = item * rows_per_item; r < r1; ++r)
      ctx.k->silu_mul(g + r * gate->stride[0], u + r * up->stride[0], out + r * y->stride[0], cols);
  });
  return EM_OK;
}

}  // namespace em::cpu
