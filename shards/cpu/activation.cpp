// Activation family: SiLU-and-multiply (the expert/MLP gate), the exp kernel that
// softmaxes share, and widening scaled fp8 (the paged KV cache's fp8 rows).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../kv_pages.h"
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

void fp8_to_f32(const uint8_t* codes, int64_t n, float scale, float* y) {
  fp8_widen_portable(codes, n, scale, y);
}

void f32_to_fp8(const float* x, int64_t n, double inv, uint8_t* out) { fp8_quantize_portable(x, n, inv, out); }

float abs_max(const float* x, int64_t n) { return abs_max_portable(x, n); }

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

EM_AVX2 void fp8_to_f32(const uint8_t* codes, int64_t n, float scale, float* y) {
  const __m256i sign = _mm256_set1_epi32(0x80), mag = _mm256_set1_epi32(0x7f);
  const __m256i nan_bits = _mm256_set1_epi32(0x7fc00000);
  const __m256 rebias = _mm256_set1_ps(0x1p120f), s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i raw;
    std::memcpy(&raw, codes + i, 8);
    const __m256i c = _mm256_cvtepu8_epi32(raw);
    const __m256i m = _mm256_and_si256(c, mag);
    __m256i bits = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(c, sign), 24), _mm256_slli_epi32(m, 20));
    bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_cmpeq_epi32(m, mag), nan_bits));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), rebias), s));
  }
  scalar::fp8_to_f32(codes + i, n - i, scale, y + i);
}

// The scalar f32_to_e4m3 on 8 lanes: x scaled in double and rounded to float, then the
// normal-range rounding on the bits, the subnormal range (below 2^-6, multiples of 2^-9) by
// round-to-nearest-even of |x| * 512, saturation to +-448 (0x7e) and NaN (0x7f, no sign).
EM_AVX2 void f32_to_fp8(const float* x, int64_t n, double inv, uint8_t* out) {
  const __m256d vinv = _mm256_set1_pd(inv);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), seven = _mm256_set1_epi32(7);
  const __m256i low20 = _mm256_set1_epi32(0xfffff), half = _mm256_set1_epi32(0x80000), one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(120), max_code = _mm256_set1_epi32(0x7e), nan_code = _mm256_set1_epi32(0x7f);
  const __m256i sign_bit = _mm256_set1_epi32(0x80), sub_limit = _mm256_set1_epi32(0x3c800000);
  const __m256i sat_limit = _mm256_set1_epi32(0x43dfffff), inf_bits = _mm256_set1_epi32(0x7f800000);
  const __m256 x512 = _mm256_set1_ps(512.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), vinv));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), vinv));
    const __m256i bits = _mm256_castps_si256(_mm256_set_m128(hi, lo));
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), sign_bit);
    const __m256i abs = _mm256_and_si256(bits, abs_mask);
    // Normal range: exponent rebiased (127 -> 7), 3 mantissa bits kept, nearest even.
    const __m256i kept = _mm256_and_si256(_mm256_srli_epi32(abs, 20), seven);
    const __m256i dropped = _mm256_and_si256(abs, low20);
    __m256i code = _mm256_or_si256(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_srli_epi32(abs, 23), bias), 3), kept);
    const __m256i up = _mm256_or_si256(
        _mm256_cmpgt_epi32(dropped, half),
        _mm256_and_si256(_mm256_cmpeq_epi32(dropped, half), _mm256_cmpeq_epi32(_mm256_and_si256(kept, one), one)));
    code = _mm256_min_epi32(_mm256_sub_epi32(code, up), max_code);  // up is -1 where it rounds up
    // Subnormal range, saturation, sign, NaN.
    const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_castsi256_ps(abs), x512), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    code = _mm256_blendv_epi8(code, _mm256_cvtps_epi32(q), _mm256_cmpgt_epi32(sub_limit, abs));
    code = _mm256_blendv_epi8(code, max_code, _mm256_cmpgt_epi32(abs, sat_limit));
    code = _mm256_or_si256(code, sign);
    code = _mm256_blendv_epi8(code, nan_code, _mm256_cmpgt_epi32(abs, inf_bits));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(w, w));
  }
  scalar::f32_to_fp8(x + i, n - i, inv, out + i);
}

EM_AVX2 float abs_max(const float* x, int64_t n) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), mask);
    acc = _mm256_blendv_ps(acc, v, _mm256_cmp_ps(v, acc, _CMP_GT_OQ));  // NaN never wins
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float m = scalar::abs_max(x + i, n - i);
  for (float l : lanes) m = l > m ? l : m;
  return m;
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
