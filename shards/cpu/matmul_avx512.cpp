// AVX-512 GEMM nt tile kernels: the AVX2 dot-product design (see matmul_avx2.cpp) at 16
// lanes for every row count (32 zmm registers hold 4 x 4 accumulators, enough to hide FMA
// latency without the packed path), and a bf16 variant using AVX512_BF16 dot products
// (x rounded to bf16, fp32 accumulation, as torch's bf16 linear does); and the nn kernel
// for f32 weights (MLA attention's latent products; 1.28x the AVX2 one on attention).
// Selected only when cpuid reports the features; the other AVX-512 kernels come from the
// AVX2 table.
// The development and CI machines have no AVX-512: scripts/avx512-emulated.sh runs the
// tests through these kernels with SIMDe's emulated intrinsics (avx512_emulation.h); on
// AVX-512 hardware the tests run them natively (test/harness.h tests every ISA the CPU has).
#include <algorithm>

// GCC 12's AVX-512 headers trip these inside _mm512_undefined_* (a known false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu.h"
#include "dtype.h"
#include "simd.h"

#if EM_X86
namespace em::cpu::avx512 {
namespace {

// k per x panel for many rows (a multiple of the 32-k step). Each micro-tile's sums are
// reduced across lanes once per panel, so a short panel spends its time in reductions: on a
// Zen 4 with V3 and V2-Lite shapes, 2048 ran 1.1-1.27x faster than 512 (em_bench, every
// weight dtype, both kernels), and 4096 or 8192 no faster. The panel (4 rows: 16 KiB bf16,
// 32 KiB f32) stays in L1 or L2 and a 64-row weight block (256 KiB bf16) in L2.
constexpr int64_t kKc = 2048;
constexpr int kMr = 4;        // x rows per micro-tile
constexpr int64_t kNb = 64;   // weight rows per L2 block

// load32: 32 weights for the nt kernels (Bf16W's deinterleaved: even elements in a, odd in b).
// load16: 16 consecutive weights, in order, for the nn kernel.
struct F32W {
  using T = float;
  static constexpr bool kDeinterleave = false, kScaled = false;
  EM_AVX512 static inline void load32(const T* p, __m512& a, __m512& b) {
    a = _mm512_loadu_ps(p);
    b = _mm512_loadu_ps(p + 16);
  }
  EM_AVX512 static inline __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
};

struct Bf16W {
  using T = uint16_t;
  static constexpr bool kDeinterleave = true, kScaled = false;
  EM_AVX512 static inline void load32(const T* p, __m512& a, __m512& b) {
    const __m512i v = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  EM_AVX512 static inline __m512 load16(const T* p) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
};

struct F16W {
  using T = uint16_t;
  static constexpr bool kDeinterleave = false, kScaled = false;
  EM_AVX512 static inline void load32(const T* p, __m512& a, __m512& b) {
    a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  }
  EM_AVX512 static inline __m512 load16(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

// fp8 e4m3, scaled per 128 x 128 block: load32_scaled gives the weights times the block scale.
struct Fp8W {
  using T = uint8_t;
  static constexpr bool kDeinterleave = false, kScaled = true;
  // 16 fp8 -> 16 f32 whose value is the fp8 value / 2^120. A sign-extended byte shifted left
  // by 20 puts the exponent in the low 4 bits of the f32 exponent and the mantissa in the top
  // 3 of the f32 mantissa (the mask clears the sign's copies from bits 27-30), so the bias is
  // 127 instead of 7. fp8 subnormals land on f32 subnormals with the same factor: both are
  // 0.m x 2^(1 - bias). Three operations per 16 weights; the fp16 route (cvt16) takes seven.
  // (e4m3fn NaN, 0x7f, becomes 480 as in cvt16; checkpoints hold no NaN.)
  EM_AVX512 static inline __m512 bits16(__m128i bytes) {
    const __m512i v = _mm512_slli_epi32(_mm512_cvtepi8_epi32(bytes), 20);
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0x87f00000u))));
  }
  // fp8 -> f16 bits (value / 256, see simd::fp8x8_to_f16_bits) -> f32.
  EM_AVX512 static inline __m512 cvt16(__m128i bytes) {
    const __m256i w = _mm256_cvtepu8_epi16(bytes);
    const __m256i mag = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)), 7);
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8);
    return _mm512_cvtph_ps(_mm256_or_si256(mag, sign));
  }
  // Both routes round each weight times its scale once, so they give the same bits. The
  // 2^120 route needs scale * 2^120 finite: block scales are ~amax / 448, far below 2^7, and a
  // larger one takes the fp16 route. (Under DAZ the subnormal weights would read as 0; the
  // addon's processes never set it.)
  EM_AVX512 static inline void load32_scaled(const T* p, float scale, __m512& a, __m512& b) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    if (scale < 0x1p7f) {
      const __m512 sc = _mm512_set1_ps(scale * 0x1p120f);
      a = _mm512_mul_ps(bits16(lo), sc);
      b = _mm512_mul_ps(bits16(hi), sc);
    } else {
      const __m512 sc = _mm512_set1_ps(scale * 256.0f);
      a = _mm512_mul_ps(cvt16(lo), sc);
      b = _mm512_mul_ps(cvt16(hi), sc);
    }
  }
};

// sums[i] = the sum of v[i]'s 16 lanes, for i < N. Four vectors at a time: two levels of
// unpacks and adds leave each 128-bit lane holding the four vectors' partial sums, and two
// adds across lanes finish them: 13 operations per four sums where _mm512_reduce_add_ps takes
// about 8 per sum. Every sum is added in the same order whatever its neighbours (zeros pad
// the last group), so a result does not depend on the tile shape it was computed in.
EM_AVX512 inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int N>
EM_AVX512 inline void reduce_sums(const __m512* v, float* sums) {
  const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int i = 0; i < N; i += 4) {
    const __m128 r = reduce4(v[i], i + 1 < N ? v[i + 1] : z, i + 2 < N ? v[i + 2] : z, i + 3 < N ? v[i + 3] : z);
    if (i + 4 <= N) {
      _mm_storeu_ps(sums + i, r);
    } else {
      float t[4];
      _mm_storeu_ps(t, r);
      for (int j = 0; j < 4 && j < N - i; ++j) sums[i + j] = t[j];
    }
  }
}

// panel[(step * mr + m) * 32 + j]: 32 k per step, in order or as even/odd halves.
template <bool kDeinterleave>
EM_AVX512 void pack_x(const float* x, int64_t ldx, int mr, int64_t k0, int64_t kc, float* panel) {
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t s = 0; s < kc / 32; ++s) {
    for (int m = 0; m < mr; ++m) {
      const float* src = x + m * ldx + k0 + s * 32;
      float* dst = panel + (s * mr + m) * 32;
      const __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
      if constexpr (kDeinterleave) {
        _mm512_store_ps(dst, _mm512_permutex2var_ps(x0, even_idx, x1));
        _mm512_store_ps(dst + 16, _mm512_permutex2var_ps(x0, odd_idx, x1));
      } else {
        _mm512_store_ps(dst, x0);
        _mm512_store_ps(dst + 16, x1);
      }
    }
  }
}

// pf: bytes from each weight row to what the next call will read, fetched into L2 meanwhile.
template <typename W, int MR, int NR>
EM_AVX512 void micro_nt(const float* panel, int64_t step_m, int64_t step_s, int64_t steps,
                        const typename W::T* const* rows, const float* const* scale_rows, int64_t k0, int64_t pf,
                        float* sums) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k = k0 + s * 32;
    const float* p = panel + s * step_s;
    __m512 xa[MR], xb[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      xa[m] = _mm512_loadu_ps(p + m * step_m);
      xb[m] = _mm512_loadu_ps(p + m * step_m + 16);
    }
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      __m512 wa, wb;
      simd::prefetch_l2<32 * sizeof(typename W::T)>(rows[n] + k, pf);
      if constexpr (W::kScaled) {
        W::load32_scaled(rows[n] + k, scale_rows[n][k >> 7], wa, wb);
      } else {
        W::load32(rows[n] + k, wa, wb);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        acc[m][n] = _mm512_fmadd_ps(xa[m], wa, acc[m][n]);
        acc[m][n] = _mm512_fmadd_ps(xb[m], wb, acc[m][n]);
      }
    }
  }
  reduce_sums<MR * NR>(&acc[0][0], sums);
}

template <typename W>
using MicroFn = void (*)(const float*, int64_t, int64_t, int64_t, const typename W::T* const*, const float* const*,
                         int64_t, int64_t, float*);

// 32 zmm registers: MR * NR accumulators + 2 * MR x vectors + 2 weight vectors.
constexpr int kMaxNr = 4;

template <typename W, int MR>
MicroFn<W> pick_nr(int nr) {
  switch (nr) {
    case 4: return micro_nt<W, MR, 4>;
    case 3: return micro_nt<W, MR, 3>;
    case 2: return micro_nt<W, MR, 2>;
    default: return micro_nt<W, MR, 1>;
  }
}

template <typename W>
MicroFn<W> pick_micro(int mr, int nr) {
  switch (mr) {
    case 4: return pick_nr<W, 4>(nr);
    case 3: return pick_nr<W, 3>(nr);
    case 2: return pick_nr<W, 2>(nr);
    default: return pick_nr<W, 1>(nr);
  }
}

// Adds (or writes) the K tail [k_done, K) with plain dot products.
void finish_tail(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k_done) {
  if (k_done == g.K) return;
  float wtail[32];
  for (int64_t n = n0; n < n1; ++n) {
    g.w.row_to_f32(n, k_done, g.K - k_done, wtail);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = g.x + m * g.ldx + k_done;
      float acc = 0.0f;
      for (int64_t k = 0; k < g.K - k_done; ++k) acc += xr[k] * wtail[k];
      float* yv = g.y + m * g.ldy + n;
      *yv = (k_done == 0 && !g.accumulate) ? acc : *yv + acc;
    }
  }
}

void store_sums(const Gemm& g, int64_t m, int mr, int64_t n, int nr, const float* sums, bool overwrite) {
  for (int i = 0; i < mr; ++i) {
    float* yr = g.y + (m + i) * g.ldy + n;
    for (int j = 0; j < nr; ++j) yr[j] = overwrite ? sums[i * nr + j] : yr[j] + sums[i * nr + j];
  }
}

// k per x panel: whole rows when x has few rows (decode streams every weight row once,
// sequentially), else kKc so the panel stays in L1 while a weight block sits in L2. Each
// panel's sums are added to y, so the panels decide the summation order: kFixed (the
// batch-invariant kernels) takes kKc whatever the rows, and a row's result no longer
// depends on how many rows its tile has.
template <bool kFixed>
int64_t panel_k(int64_t rows, int64_t k32) {
  return rows < 16 && !kFixed ? k32 : std::min(kKc, k32);
}

// What the micro-kernel at rows m prefetches (simd::prefetch_l2): the next call's weight
// rows, `next` bytes on. With few rows every pass streams whole rows, and a 64-row block of
// them can outgrow L2 before the last pass (8 rows at V3 shapes: 1.24-1.38x with every pass
// prefetching, none with only the first). With panels of kKc the first pass fetches the block
// into L2 for the others, whose prefetches would only take load slots.
int64_t prefetch_ahead(int64_t m0, int64_t m1, int64_t m, int64_t next) { return m1 - m0 < 16 || m == m0 ? next : 0; }

template <typename W, bool kFixed>
EM_AVX512 void gemm_nt_tile(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  using T = typename W::T;
  const int64_t k32 = g.K & ~int64_t{31};
  const int64_t kc_max = panel_k<kFixed>(m1 - m0, k32);
  const T* base = static_cast<const T*>(g.w.data);
  const bool x_in_place = !W::kDeinterleave && (g.ldx * static_cast<int64_t>(sizeof(float))) % 4096 != 0;
  AlignedBuffer<float> panel(static_cast<size_t>(x_in_place ? 0 : kMr * kc_max));
  float sums[kMr * kMaxNr];
  const T* rows[kMaxNr];
  const float* scale_rows[kMaxNr];
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kNb) {
    const int64_t nb1 = std::min(n1, nb0 + kNb);
    for (int64_t k0 = 0; k0 < k32; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, k32 - k0);
      const bool overwrite = k0 == 0 && !g.accumulate;
      for (int64_t m = m0; m < m1; m += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, m1 - m));
        // Weights read in order (f32, f16, fp8) take x in place, unless its rows are a multiple
        // of 4 KiB apart: then the 4 rows' loads share L1 sets (f32 weights at K 7168 ran 0.93x
        // in place). bf16 weights want each 32 k's even elements first: x packed so by the
        // caller for all tiles, or here for these rows.
        const float* xs = panel.data();
        int64_t step_m = 32, step_s = 32 * mr;
        if (x_in_place) {
          xs = g.x + m * g.ldx + k0;
          step_m = g.ldx;
          step_s = 32;
        } else if (W::kDeinterleave && g.x_deint != nullptr) {
          xs = g.x_deint + m * g.x_deint_ld + k0;
          step_m = g.x_deint_ld;
          step_s = 32;
        } else {
          pack_x<W::kDeinterleave>(g.x + m * g.ldx, g.ldx, mr, k0, kc, panel.data());
        }
        for (int64_t n = nb0; n < nb1; n += kMaxNr) {
          const int nr = static_cast<int>(std::min<int64_t>(kMaxNr, nb1 - n));
          for (int j = 0; j < nr; ++j) {
            rows[j] = base + (n + j) * g.w.ld;
            if constexpr (W::kScaled) scale_rows[j] = g.w.scale_row(n + j);
          }
          const int64_t pf =
              prefetch_ahead(m0, m1, m, g.w_next != 0 ? g.w_next : nr * g.w.ld * static_cast<int64_t>(sizeof(T)));
          pick_micro<W>(mr, nr)(xs, step_m, step_s, kc / 32, rows, scale_rows, k0, pf, sums);
          store_sums(g, m, mr, n, nr, sums, overwrite);
        }
      }
    }
  }
  finish_tail(g, m0, m1, n0, n1, k32);
}

// ------------------------------------------------------------- AVX512_BF16

// x rows packed as bf16 (round to nearest even), 32 per step, natural order.
EM_AVX512BF16 void pack_x_bf16(const float* x, int64_t ldx, int mr, int64_t k0, int64_t kc, uint16_t* panel) {
  for (int64_t s = 0; s < kc / 32; ++s) {
    for (int m = 0; m < mr; ++m) {
      const float* src = x + m * ldx + k0 + s * 32;
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
      _mm512_store_si512(panel + (s * mr + m) * 32, (__m512i)v);
    }
  }
}

// x of row m at step s (32 k): x + s * step_s + m * step_m (a panel packed for mr rows:
// step_m 32, step_s 32 mr; rows rounded by the caller: step_m their length, step_s 32).
template <int MR, int NR>
EM_AVX512BF16 void micro_bf16dot(const uint16_t* x, int64_t step_m, int64_t step_s, int64_t steps,
                                 const uint16_t* const* rows, int64_t k0, int64_t pf, float* sums) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* p = x + s * step_s;
    __m512i xv[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_si512(p + m * step_m);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      simd::prefetch_l2<64>(rows[n] + k0 + s * 32, pf);
      const __m512i wv = _mm512_loadu_si512(rows[n] + k0 + s * 32);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)xv[m], (__m512bh)wv);
    }
  }
  reduce_sums<MR * NR>(&acc[0][0], sums);
}

using MicroBf16Fn = void (*)(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t* const*, int64_t, int64_t,
                             float*);

template <int MR>
MicroBf16Fn pick_bf16_nr(int nr) {
  switch (nr) {
    case 4: return micro_bf16dot<MR, 4>;
    case 3: return micro_bf16dot<MR, 3>;
    case 2: return micro_bf16dot<MR, 2>;
    default: return micro_bf16dot<MR, 1>;
  }
}

MicroBf16Fn pick_bf16(int mr, int nr) {
  switch (mr) {
    case 4: return pick_bf16_nr<4>(nr);
    case 3: return pick_bf16_nr<3>(nr);
    case 2: return pick_bf16_nr<2>(nr);
    default: return pick_bf16_nr<1>(nr);
  }
}

template <bool kFixed>
EM_AVX512BF16 void gemm_nt_bf16dot_tile(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t k32 = g.K & ~int64_t{31};
  const int64_t kc_max = panel_k<kFixed>(m1 - m0, k32);
  const uint16_t* base = static_cast<const uint16_t*>(g.w.data);
  AlignedBuffer<uint16_t> panel(static_cast<size_t>(kMr * kc_max));
  float sums[kMr * kMaxNr];
  const uint16_t* rows[kMaxNr];
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kNb) {
    const int64_t nb1 = std::min(n1, nb0 + kNb);
    for (int64_t k0 = 0; k0 < k32; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, k32 - k0);
      const bool overwrite = k0 == 0 && !g.accumulate;
      for (int64_t m = m0; m < m1; m += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, m1 - m));
        // x rounded by the caller for all tiles, or here into a panel for these rows.
        const uint16_t* xs = panel.data();
        int64_t step_m = 32, step_s = 32 * mr;
        if (g.x_bf16 != nullptr) {
          xs = g.x_bf16 + m * g.x_bf16_ld + k0;
          step_m = g.x_bf16_ld;
          step_s = 32;
        } else {
          pack_x_bf16(g.x + m * g.ldx, g.ldx, mr, k0, kc, panel.data());
        }
        for (int64_t n = nb0; n < nb1; n += kMaxNr) {
          const int nr = static_cast<int>(std::min<int64_t>(kMaxNr, nb1 - n));
          for (int j = 0; j < nr; ++j) rows[j] = base + (n + j) * g.w.ld;
          const int64_t pf = prefetch_ahead(m0, m1, m, g.w_next != 0 ? g.w_next : nr * g.w.ld * 2);
          pick_bf16(mr, nr)(xs, step_m, step_s, kc / 32, rows, k0, pf, sums);
          store_sums(g, m, mr, n, nr, sums, overwrite);
        }
      }
    }
  }
  finish_tail(g, m0, m1, n0, n1, k32);
}

// ------------------------------------------------------------------ nn: f32, bf16 and f16 weights

// y[m0 + i, n .. n + 32) for MR rows over k in [k0, k1): broadcast x, two zmm of w per k
// (the AVX2 kernel's design at 16 lanes): attention's q_nope W_uk (bf16 kv_b_proj) and its
// probability-weighted latent sums (f32 or bf16 cache rows).
template <typename W, int MR>
EM_AVX512 void micro_nn(const Gemm& g, int64_t m0, int64_t n, int64_t k0, int64_t k1, bool accumulate) {
  const typename W::T* w = static_cast<const typename W::T*>(g.w.data) + n;
  const float* x = g.x + m0 * g.ldx;
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const __m512 w0 = W::load16(w + k * g.w.ld), w1 = W::load16(w + k * g.w.ld + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 b = _mm512_set1_ps(x[m * g.ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(b, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(b, w1, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float* yr = g.y + (m0 + m) * g.ldy + n;
    if (accumulate) {
      acc[m][0] = _mm512_add_ps(acc[m][0], _mm512_loadu_ps(yr));
      acc[m][1] = _mm512_add_ps(acc[m][1], _mm512_loadu_ps(yr + 16));
    }
    _mm512_storeu_ps(yr, acc[m][0]);
    _mm512_storeu_ps(yr + 16, acc[m][1]);
  }
}

template <typename W>
EM_AVX512 void micro_nn_rows(const Gemm& g, int64_t m, int mr, int64_t n, int64_t k0, int64_t k1, bool acc) {
  switch (mr) {
    case 8: return micro_nn<W, 8>(g, m, n, k0, k1, acc);
    case 7: return micro_nn<W, 7>(g, m, n, k0, k1, acc);
    case 6: return micro_nn<W, 6>(g, m, n, k0, k1, acc);
    case 5: return micro_nn<W, 5>(g, m, n, k0, k1, acc);
    case 4: return micro_nn<W, 4>(g, m, n, k0, k1, acc);
    case 3: return micro_nn<W, 3>(g, m, n, k0, k1, acc);
    case 2: return micro_nn<W, 2>(g, m, n, k0, k1, acc);
    default: return micro_nn<W, 1>(g, m, n, k0, k1, acc);
  }
}

constexpr int64_t kNnKb = 128;  // weight rows (k) per L2 block, as the AVX2 kernel

template <typename W>
EM_AVX512 void gemm_nn_tile(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t n32 = n0 + ((n1 - n0) & ~int64_t{31});
  if (g.K == 0 && !g.accumulate) {
    for (int64_t m = m0; m < m1; ++m) std::fill(g.y + m * g.ldy + n0, g.y + m * g.ldy + n32, 0.0f);
  }
  for (int64_t k0 = 0; k0 < g.K; k0 += kNnKb) {
    const int64_t k1 = std::min(g.K, k0 + kNnKb);
    const bool acc = g.accumulate || k0 > 0;
    for (int64_t n = n0; n < n32; n += 32)
      for (int64_t m = m0; m < m1; m += 8)
        micro_nn_rows<W>(g, m, static_cast<int>(std::min<int64_t>(8, m1 - m)), n, k0, k1, acc);
  }
  // Columns past the last 32 (n32 - n0 is a multiple of 16, as the AVX2 kernel needs).
  if (n32 < n1) avx2::gemm_nn(g, m0, m1, n32, n1);
}

}  // namespace

// f32, bf16 and f16 weights on 16 lanes; fp8 (block scales per 128 columns) as the AVX2
// kernel does.
void gemm_nn(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (g.w.dtype) {
    case EM_F32: return gemm_nn_tile<F32W>(g, m0, m1, n0, n1);
    case EM_BF16: return gemm_nn_tile<Bf16W>(g, m0, m1, n0, n1);
    case EM_F16: return gemm_nn_tile<F16W>(g, m0, m1, n0, n1);
    default: return avx2::gemm_nn(g, m0, m1, n0, n1);
  }
}

// fp8 weights from this many rows: the AVX2 packed kernel, which widens each weight block
// once for all rows, where the dot kernel widens it again for every 4 rows. On a Zen 4 at
// V3 shapes (em_bench): equal at 16 rows, 1.2x at 24, 1.4-1.6x from 48.
constexpr int64_t kFp8PackedMinRows = 16;

template <bool kFixed>
void gemm_nt_by_dtype(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (g.w.dtype) {
    case EM_BF16: return gemm_nt_tile<Bf16W, kFixed>(g, m0, m1, n0, n1);
    case EM_F16: return gemm_nt_tile<F16W, kFixed>(g, m0, m1, n0, n1);
    case EM_F8_E4M3: return gemm_nt_tile<Fp8W, kFixed>(g, m0, m1, n0, n1);
    default: return gemm_nt_tile<F32W, kFixed>(g, m0, m1, n0, n1);
  }
}

void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.w.dtype == EM_F8_E4M3 && m1 - m0 >= kFp8PackedMinRows) return avx2::gemm_nt(g, m0, m1, n0, n1);
  gemm_nt_by_dtype<false>(g, m0, m1, n0, n1);
}

// Batch-invariant: one kernel for every row count (fp8 too) and fixed panels.
void gemm_nt_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  gemm_nt_by_dtype<true>(g, m0, m1, n0, n1);
}

// Rows from which gemm_nt rounds x to bf16 once for all tiles (Gemm::x_bf16): each tile
// otherwise rounds its rows again, and for a large x reads them from far (V3 shapes on a
// Zen 4, em_bench: 1.06-1.19x from 256 rows; decode keeps its one parallel loop).
constexpr int64_t kPrepackMinRows = 16;

// Rows from which gemm_nt packs x once for all tiles with bf16 weights (Gemm::x_deint), as
// for the bf16 kernel: 1.02-1.08x from 64 rows at V3 and V2-Lite shapes on a Zen 4
// (em_bench); at 16 rows no gain beyond the noise.
constexpr int64_t kDeintMinRows = 64;

bool wants_x_deint(int64_t M, int64_t K) { return M >= kDeintMinRows && K >= 32; }

EM_AVX512 void pack_x_deint(const float* x, int64_t ldx, int64_t M, int64_t K, float* out, int64_t ld) {
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    float* dst = out + m * ld;  // any alignment: the kernel loads these rows unaligned
    for (int64_t k = 0; k < k32; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(src + k), x1 = _mm512_loadu_ps(src + k + 16);
      _mm512_storeu_ps(dst + k, _mm512_permutex2var_ps(x0, even_idx, x1));
      _mm512_storeu_ps(dst + k + 16, _mm512_permutex2var_ps(x0, odd_idx, x1));
    }
  }
}

bool wants_x_bf16(int64_t M, int64_t K) { return M >= kPrepackMinRows && K >= 32; }

EM_AVX512BF16 void pack_x_bf16(const float* x, int64_t ldx, int64_t M, int64_t K, uint16_t* out, int64_t ld) {
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    uint16_t* dst = out + m * ld;
    for (int64_t k = 0; k < k32; k += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
      _mm512_storeu_si512(dst + k, (__m512i)v);
    }
    for (int64_t k = k32; k < K; ++k) dst[k] = f32_to_bf16(src[k]);
    std::fill(dst + K, dst + ld, uint16_t{0});
  }
}

void gemm_nt_bf16dot(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.w.dtype == EM_BF16) return gemm_nt_bf16dot_tile<false>(g, m0, m1, n0, n1);
  gemm_nt(g, m0, m1, n0, n1);
}

void gemm_nt_bf16dot_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.w.dtype == EM_BF16) return gemm_nt_bf16dot_tile<true>(g, m0, m1, n0, n1);
  gemm_nt_invariant(g, m0, m1, n0, n1);
}

}  // namespace em::cpu::avx512
#endif  // EM_X86
