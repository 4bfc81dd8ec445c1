// AVX2 + FMA + F16C GEMM tile kernels.
//
// nt (y = x W^T, W [N, K] row-major as checkpoints store it) has two paths:
//  - few rows of x (decode, < kPackedMinRows): no weight packing. Whole weight rows are
//    streamed once, converted on the fly (bf16: shift left 16; f16: F16C; fp8: bit trick
//    to f16 + block scale), against x packed to match; MR x NR dot products stay in
//    registers. Decode is weight-bandwidth bound and this reads each weight byte once.
//  - many rows (prefill): blocks of weights are converted and transposed into f32 panels
//    once, then a 6 x 16 outer-product micro-kernel runs at close to peak FMA rate.
// nn (y = x W, W [K, N]): the classic broadcast-x, vector-of-W kernel, 16 columns wide.
#include <algorithm>

#include "cpu.h"
#include "simd.h"

#if EM_X86
namespace em::cpu::avx2 {
namespace {

using simd::hsum;

constexpr int kMr = 4;         // dot path: max x rows per micro-tile
constexpr int64_t kNb = 32;    // dot path: weight rows per block (whole rows, L2 sized)
constexpr int64_t kKb = 128;   // nn: weight rows (k) per L2 block

// Weight dtype policies: load16 returns k..k+15 of a row as two vectors that pair with
// the packed x (x packed in order, or as even/odd halves when kDeinterleave).
struct F32W {
  using T = float;
  static constexpr bool kDeinterleave = false, kScaled = false;
  EM_AVX2 static inline void load16(const T* p, __m256& a, __m256& b) {
    a = _mm256_loadu_ps(p);
    b = _mm256_loadu_ps(p + 8);
  }
  EM_AVX2 static inline __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
};

struct Bf16W {
  using T = uint16_t;
  static constexpr bool kDeinterleave = true, kScaled = false;
  // One 32-byte load: the low bf16 of each 32-bit lane is element 2i, the high one 2i+1.
  EM_AVX2 static inline void load16(const T* p, __m256& a, __m256& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  EM_AVX2 static inline __m256 load8(const T* p) { return simd::load8_bf16(p); }
};

struct F16W {
  using T = uint16_t;
  static constexpr bool kDeinterleave = false, kScaled = false;
  EM_AVX2 static inline void load16(const T* p, __m256& a, __m256& b) {
    a = simd::load8_f16(p);
    b = simd::load8_f16(p + 8);
  }
  EM_AVX2 static inline __m256 load8(const T* p) { return simd::load8_f16(p); }
};

// Values come out divided by 256; the kernels multiply the block scale by 256.
struct Fp8W {
  using T = uint8_t;
  static constexpr bool kDeinterleave = false, kScaled = true;
  EM_AVX2 static inline void load16(const T* p, __m256& a, __m256& b) {
    simd::fp8x16_to_f32_div256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), a, b);
  }
  EM_AVX2 static inline __m256 load8(const T* p) { return simd::load8_fp8_div256(p); }
};

// ------------------------------------------------------------------ nt, dot path

// Packs x rows [0, mr) cols [k0, k0 + kc) into panel[(step * mr + m) * 16 + j].
template <bool kDeinterleave>
EM_AVX2 void pack_x(const float* x, int64_t ldx, int mr, int64_t k0, int64_t kc, float* panel) {
  const int64_t steps = kc / 16;
  for (int64_t s = 0; s < steps; ++s) {
    for (int m = 0; m < mr; ++m) {
      const float* src = x + m * ldx + k0 + s * 16;
      float* dst = panel + (s * mr + m) * 16;
      const __m256 x0 = _mm256_loadu_ps(src), x1 = _mm256_loadu_ps(src + 8);
      if constexpr (kDeinterleave) {
        const __m256 ev = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
        const __m256 od = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
        _mm256_store_ps(dst, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), _MM_SHUFFLE(3, 1, 2, 0))));
        _mm256_store_ps(dst + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), _MM_SHUFFLE(3, 1, 2, 0))));
      } else {
        _mm256_store_ps(dst, x0);
        _mm256_store_ps(dst + 8, x1);
      }
    }
  }
}

// sums[m * NR + n] = dot(x row m, weight row n) over `steps` 16-element steps from k0.
// Register plans (16 ymm): MR >= 3, NR <= 2 keeps the converted weights of all NR rows
// while x rows stream; MR >= 3, NR = 3 takes x straight from the (L1) panel; MR <= 2
// keeps the x vectors while up to 8 weight rows stream (more rows in flight for decode).
// pf: bytes from each weight row to what the next call will read (simd::prefetch_l2).
template <typename W, int MR, int NR>
EM_AVX2 void micro_nt(const float* panel, int64_t steps, const typename W::T* const* rows,
                      const float* const* scale_rows, int64_t k0, int64_t pf, float* sums) {
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();

  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k = k0 + s * 16;
    const float* p = panel + s * MR * 16;
    if constexpr (MR >= 3 && NR <= 2) {
      __m256 wa[NR], wb[NR];
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) {
        simd::prefetch_l2<16 * sizeof(typename W::T)>(rows[n] + k, pf);
        W::load16(rows[n] + k, wa[n], wb[n]);
        if constexpr (W::kScaled) {
          const __m256 sc = _mm256_set1_ps(scale_rows[n][k >> 7] * 256.0f);
          wa[n] = _mm256_mul_ps(wa[n], sc);
          wb[n] = _mm256_mul_ps(wb[n], sc);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 xa = _mm256_load_ps(p + m * 16), xb = _mm256_load_ps(p + m * 16 + 8);
#pragma GCC unroll 8
        for (int n = 0; n < NR; ++n) {
          acc[m][n] = _mm256_fmadd_ps(xa, wa[n], acc[m][n]);
          acc[m][n] = _mm256_fmadd_ps(xb, wb[n], acc[m][n]);
        }
      }
    } else if constexpr (MR >= 3) {
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) {
        __m256 wa, wb;
        simd::prefetch_l2<16 * sizeof(typename W::T)>(rows[n] + k, pf);
        W::load16(rows[n] + k, wa, wb);
        if constexpr (W::kScaled) {
          const __m256 sc = _mm256_set1_ps(scale_rows[n][k >> 7] * 256.0f);
          wa = _mm256_mul_ps(wa, sc);
          wb = _mm256_mul_ps(wb, sc);
        }
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          acc[m][n] = _mm256_fmadd_ps(_mm256_load_ps(p + m * 16), wa, acc[m][n]);
          acc[m][n] = _mm256_fmadd_ps(_mm256_load_ps(p + m * 16 + 8), wb, acc[m][n]);
        }
      }
    } else {
      __m256 xa[MR], xb[MR];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        xa[m] = _mm256_load_ps(p + m * 16);
        xb[m] = _mm256_load_ps(p + m * 16 + 8);
      }
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) {
        __m256 wa, wb;
        simd::prefetch_l2<16 * sizeof(typename W::T)>(rows[n] + k, pf);
        W::load16(rows[n] + k, wa, wb);
        if constexpr (W::kScaled) {
          const __m256 sc = _mm256_set1_ps(scale_rows[n][k >> 7] * 256.0f);
          wa = _mm256_mul_ps(wa, sc);
          wb = _mm256_mul_ps(wb, sc);
        }
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          acc[m][n] = _mm256_fmadd_ps(xa[m], wa, acc[m][n]);
          acc[m][n] = _mm256_fmadd_ps(xb[m], wb, acc[m][n]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) sums[m * NR + n] = hsum(acc[m][n]);
}

// fp8 with few x rows (decode): the block scale is applied once per 128-k block to
// per-block partial sums instead of to every converted weight vector, which makes the
// conversion, not the scaling, the cost. k0 must start a scale block (it is 0 here).
template <int MR, int NR>
EM_AVX2 void micro_nt_fp8(const float* panel, int64_t steps, const uint8_t* const* rows,
                          const float* const* scale_rows, int64_t k0, int64_t pf, float* sums) {
  constexpr int64_t kStepsPerBlock = EM_FP8_BLOCK / 16;
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t s0 = 0; s0 < steps; s0 += kStepsPerBlock) {
    const int64_t s1 = std::min(steps, s0 + kStepsPerBlock);
    __m256 blk[MR][NR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) blk[m][n] = _mm256_setzero_ps();
    for (int64_t s = s0; s < s1; ++s) {
      const float* p = panel + s * MR * 16;
      __m256 xa[MR], xb[MR];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        xa[m] = _mm256_load_ps(p + m * 16);
        xb[m] = _mm256_load_ps(p + m * 16 + 8);
      }
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) {
        __m256 wa, wb;
        simd::prefetch_l2<16>(rows[n] + k0 + s * 16, pf);
        Fp8W::load16(rows[n] + k0 + s * 16, wa, wb);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          blk[m][n] = _mm256_fmadd_ps(xa[m], wa, blk[m][n]);
          blk[m][n] = _mm256_fmadd_ps(xb[m], wb, blk[m][n]);
        }
      }
    }
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const __m256 sc = _mm256_set1_ps(scale_rows[n][(k0 + s0 * 16) / EM_FP8_BLOCK] * 256.0f);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm256_fmadd_ps(blk[m][n], sc, acc[m][n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) sums[m * NR + n] = hsum(acc[m][n]);
}

template <typename W>
using MicroNtFn = void (*)(const float*, int64_t, const typename W::T* const*, const float* const*, int64_t, int64_t,
                           float*);

// Widest weight-row count per x-row count (register budget: 16 ymm; the fp8 decode
// kernel holds two accumulators per dot product).
template <typename W>
constexpr int max_nr(int mr) {
  if constexpr (W::kScaled) {
    if (mr <= 2) return mr == 1 ? 4 : 2;
  }
  return mr >= 3 ? 3 : (mr == 2 ? 4 : 8);
}

template <typename W>
MicroNtFn<W> pick_micro_nt(int mr, int nr) {
  if constexpr (W::kScaled) {
    if (mr == 1) {
      switch (nr) {
        case 4: return micro_nt_fp8<1, 4>;
        case 3: return micro_nt_fp8<1, 3>;
        case 2: return micro_nt_fp8<1, 2>;
        default: return micro_nt_fp8<1, 1>;
      }
    }
    if (mr == 2) return nr == 2 ? micro_nt_fp8<2, 2> : micro_nt_fp8<2, 1>;
  }
  switch (mr) {
    case 4:
      switch (nr) {
        case 3: return micro_nt<W, 4, 3>;
        case 2: return micro_nt<W, 4, 2>;
        default: return micro_nt<W, 4, 1>;
      }
    case 3:
      switch (nr) {
        case 3: return micro_nt<W, 3, 3>;
        case 2: return micro_nt<W, 3, 2>;
        default: return micro_nt<W, 3, 1>;
      }
    case 2:
      switch (nr) {
        case 4: return micro_nt<W, 2, 4>;
        case 3: return micro_nt<W, 2, 3>;
        case 2: return micro_nt<W, 2, 2>;
        default: return micro_nt<W, 2, 1>;
      }
    default:
      switch (nr) {
        case 8: return micro_nt<W, 1, 8>;
        case 7: return micro_nt<W, 1, 7>;
        case 6: return micro_nt<W, 1, 6>;
        case 5: return micro_nt<W, 1, 5>;
        case 4: return micro_nt<W, 1, 4>;
        case 3: return micro_nt<W, 1, 3>;
        case 2: return micro_nt<W, 1, 2>;
        default: return micro_nt<W, 1, 1>;
      }
  }
}

// k per panel of the batch-invariant dot kernel (a multiple of 16 and of fp8's 128-k blocks).
constexpr int64_t kInvariantKc = 2048;

// Few rows of x (decode): the x rows are packed once per block of weight rows, then every
// weight row is streamed whole, once, for all of them (long sequential reads prefetch well).
// kInvariant (the batch-invariant kernel, for every row count): k in panels of
// kInvariantKc, so a block of weight rows stays in L2 while many rows use it, and fp8 x rows
// two at a time (micro_nt_fp8, whose order of sums differs from micro_nt's). A row's result
// then follows the same order whatever rows share its tile.
template <typename W, bool kInvariant>
EM_AVX2 void gemm_nt_tile(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  using T = typename W::T;
  const int64_t k16 = g.K & ~int64_t{15};
  const int64_t kc_max = kInvariant ? std::min(kInvariantKc, k16) : k16;
  constexpr int kMrMax = kInvariant && W::kScaled ? 2 : kMr;
  const T* base = static_cast<const T*>(g.w.data);
  AlignedBuffer<float> panel(static_cast<size_t>(kMrMax * kc_max));
  float sums[32];
  const T* rows[8];
  const float* scale_rows[8];
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kNb) {
    const int64_t nb1 = std::min(n1, nb0 + kNb);
    for (int64_t k0 = 0; k0 < k16; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, k16 - k0);
      const bool overwrite = k0 == 0 && !g.accumulate;
      for (int64_t m = m0; m < m1; m += kMrMax) {
        const int mr = static_cast<int>(std::min<int64_t>(kMrMax, m1 - m));
        pack_x<W::kDeinterleave>(g.x + m * g.ldx, g.ldx, mr, k0, kc, panel.data());
        for (int64_t n = nb0; n < nb1;) {
          const int nr = static_cast<int>(std::min<int64_t>(max_nr<W>(mr), nb1 - n));
          for (int j = 0; j < nr; ++j) {
            rows[j] = base + (n + j) * g.w.ld;
            if constexpr (W::kScaled) scale_rows[j] = g.w.scale_row(n + j);
          }
          // What the next call reads: the same rows of the next block (w_next), else the next rows.
          const int64_t pf = g.w_next != 0 ? g.w_next : nr * g.w.ld * static_cast<int64_t>(sizeof(T));
          pick_micro_nt<W>(mr, nr)(panel.data(), kc / 16, rows, scale_rows, k0, pf, sums);
          for (int i = 0; i < mr; ++i) {
            float* yr = g.y + (m + i) * g.ldy + n;
            for (int j = 0; j < nr; ++j) yr[j] = overwrite ? sums[i * nr + j] : yr[j] + sums[i * nr + j];
          }
          n += nr;
        }
      }
    }
  }
  if (k16 == g.K) return;
  // Leftover k (K not a multiple of 16): plain dot products.
  float wtail[16];
  for (int64_t n = n0; n < n1; ++n) {
    g.w.row_to_f32(n, k16, g.K - k16, wtail);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = g.x + m * g.ldx + k16;
      float acc = 0.0f;
      for (int64_t k = 0; k < g.K - k16; ++k) acc += xr[k] * wtail[k];
      float* yv = g.y + m * g.ldy + n;
      *yv = (k16 == 0 && !g.accumulate) ? acc : *yv + acc;
    }
  }
}

// ------------------------------------------------------------------ nt, packed

// For many rows of x (prefill), the weights are worth repacking: a block of kPackNb
// weight rows x kPackKc k is converted to f32 and transposed into panels [k][16], and a
// 6 x 16 outer-product micro-kernel (broadcast x, FMA with a panel row) computes y. Each
// accumulator takes one FMA per k, so FMA latency never limits throughput.
constexpr int64_t kPackNb = 64;   // weight rows per packed block (4 panels of 16)
constexpr int64_t kPackKc = 256;  // k per packed block (multiple of 8: no load straddles an fp8 block)
constexpr int kPackMr = 6;
constexpr int64_t kPackedMinRows = 16;  // fewer x rows: the dot-product kernel wins

EM_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Packs weight rows [n0, n0 + nn) x k [k0, k0 + kc) into panels: panel p holds rows
// n0 + 16p .. +16 as packed[p * kc * 16 + k * 16 + j]; rows past nn are zero.
template <typename W>
EM_AVX2 void pack_w(const Gemm& g, int64_t n0, int64_t nn, int64_t k0, int64_t kc, float* packed) {
  using T = typename W::T;
  const T* base = static_cast<const T*>(g.w.data);
  const int64_t kc8 = kc & ~int64_t{7};
  for (int64_t j0 = 0; j0 < nn; j0 += 8) {
    float* dst = packed + (j0 / 16) * kc * 16 + (j0 % 16);
    const int live = static_cast<int>(std::min<int64_t>(8, nn - j0));
    for (int64_t kk = 0; kk < kc8; kk += 8) {
      __m256 v[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        if (i < live) {
          const int64_t r = n0 + j0 + i;
          v[i] = W::load8(base + r * g.w.ld + k0 + kk);
          if constexpr (W::kScaled) v[i] = _mm256_mul_ps(v[i], _mm256_set1_ps(g.w.scale_row(r)[(k0 + kk) >> 7] * 256.0f));
        } else {
          v[i] = _mm256_setzero_ps();
        }
      }
      transpose8(v);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_store_ps(dst + (kk + i) * 16, v[i]);
    }
    if (kc8 < kc) {  // k tail: element by element
      float tail[8];
      for (int i = 0; i < 8; ++i) {
        if (i < live) {
          g.w.row_to_f32(n0 + j0 + i, k0 + kc8, kc - kc8, tail);
        } else {
          std::fill(tail, tail + 8, 0.0f);
        }
        for (int64_t kk = kc8; kk < kc; ++kk) dst[kk * 16 + i] = tail[kk - kc8];
      }
    }
  }
  // A trailing half panel (nn % 16 in 1..8) has zero rows 8..15.
  if (nn % 16 != 0 && nn % 16 <= 8) {
    float* dst = packed + (nn / 16) * kc * 16 + 8;
    for (int64_t kk = 0; kk < kc; ++kk) _mm256_store_ps(dst + kk * 16, _mm256_setzero_ps());
  }
}

// y[0:MR, 0:ncols] (+)= x[0:MR, 0:kc] panel[0:kc, 0:16]
template <int MR>
EM_AVX2 void micro_packed(const float* x, int64_t ldx, const float* panel, int64_t kc, float* y, int64_t ldy,
                          bool overwrite, int ncols) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(panel + k * 16), b1 = _mm256_load_ps(panel + k * 16 + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
      acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* yr = y + i * ldy;
    if (ncols == 16) {
      if (!overwrite) {
        acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(yr));
        acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(yr + 8));
      }
      _mm256_storeu_ps(yr, acc[i][0]);
      _mm256_storeu_ps(yr + 8, acc[i][1]);
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, acc[i][0]);
      _mm256_store_ps(tmp + 8, acc[i][1]);
      for (int j = 0; j < ncols; ++j) yr[j] = overwrite ? tmp[j] : yr[j] + tmp[j];
    }
  }
}

EM_AVX2 void micro_packed_rows(int mr, const float* x, int64_t ldx, const float* panel, int64_t kc, float* y,
                               int64_t ldy, bool overwrite, int ncols) {
  switch (mr) {
    case 6: return micro_packed<6>(x, ldx, panel, kc, y, ldy, overwrite, ncols);
    case 5: return micro_packed<5>(x, ldx, panel, kc, y, ldy, overwrite, ncols);
    case 4: return micro_packed<4>(x, ldx, panel, kc, y, ldy, overwrite, ncols);
    case 3: return micro_packed<3>(x, ldx, panel, kc, y, ldy, overwrite, ncols);
    case 2: return micro_packed<2>(x, ldx, panel, kc, y, ldy, overwrite, ncols);
    default: return micro_packed<1>(x, ldx, panel, kc, y, ldy, overwrite, ncols);
  }
}

// Asks for weight rows [n0, n0 + nn) x k [k0, k0 + kc) to be fetched into L2 while the
// current block computes: packing reads short runs of many rows, which the hardware
// prefetchers do not pick up, and experts' weights usually come from DRAM.
template <typename W>
EM_AVX2 void prefetch_block(const Gemm& g, int64_t n0, int64_t nn, int64_t k0, int64_t kc) {
  using T = typename W::T;
  const T* base = static_cast<const T*>(g.w.data);
  const int64_t bytes = kc * static_cast<int64_t>(sizeof(T));
  for (int64_t r = n0; r < n0 + nn; ++r) {
    const char* p = reinterpret_cast<const char*>(base + r * g.w.ld + k0);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  }
}

template <typename W>
EM_AVX2 void gemm_nt_tile_packed(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  alignas(32) float packed[kPackNb * kPackKc];
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kPackNb) {
    const int64_t nn = std::min(kPackNb, n1 - nb0);
    if (g.K == 0 && !g.accumulate) {
      for (int64_t m = m0; m < m1; ++m) std::fill(g.y + m * g.ldy + nb0, g.y + m * g.ldy + nb0 + nn, 0.0f);
    }
    for (int64_t k0 = 0; k0 < g.K; k0 += kPackKc) {
      const int64_t kc = std::min(kPackKc, g.K - k0);
      pack_w<W>(g, nb0, nn, k0, kc, packed);
      if (k0 + kc < g.K) {
        prefetch_block<W>(g, nb0, nn, k0 + kc, std::min(kPackKc, g.K - k0 - kc));
      } else if (nb0 + kPackNb < n1) {
        prefetch_block<W>(g, nb0 + kPackNb, std::min(kPackNb, n1 - nb0 - kPackNb), 0, std::min(kPackKc, g.K));
      }
      const bool overwrite = k0 == 0 && !g.accumulate;
      for (int64_t m = m0; m < m1; m += kPackMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kPackMr, m1 - m));
        for (int64_t j = 0; j < nn; j += 16)
          micro_packed_rows(mr, g.x + m * g.ldx + k0, g.ldx, packed + (j / 16) * kc * 16, kc,
                            g.y + m * g.ldy + nb0 + j, g.ldy, overwrite, static_cast<int>(std::min<int64_t>(16, nn - j)));
      }
    }
  }
}

// ------------------------------------------------------------------ nn

// y[m0 + i, n + 8v ...] for MR rows and NV vectors of 8 columns, over k in [k0, k1).
template <typename W, int MR, int NV>
EM_AVX2 void micro_nn(const Gemm& g, int64_t m0, int64_t n, int64_t k0, int64_t k1, bool accumulate) {
  using T = typename W::T;
  const T* base = static_cast<const T*>(g.w.data) + n;
  const float* x = g.x + m0 * g.ldx;
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const T* row = base + k * g.w.ld;
    __m256 w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = W::load8(row + 8 * v);
    if constexpr (W::kScaled) {
      const __m256 sc = _mm256_set1_ps(g.w.scale_row(k)[n / EM_FP8_BLOCK] * 256.0f);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = _mm256_mul_ps(w[v], sc);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 b = _mm256_broadcast_ss(x + m * g.ldx + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(b, w[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float* yr = g.y + (m0 + m) * g.ldy + n;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m256 r = accumulate ? _mm256_add_ps(_mm256_loadu_ps(yr + 8 * v), acc[m][v]) : acc[m][v];
      _mm256_storeu_ps(yr + 8 * v, r);
    }
  }
}

template <typename W, int NV>
EM_AVX2 void micro_nn_rows(const Gemm& g, int64_t m, int mr, int64_t n, int64_t k0, int64_t k1, bool acc) {
  switch (mr) {
    case 6: micro_nn<W, 6, NV>(g, m, n, k0, k1, acc); break;
    case 5: micro_nn<W, 5, NV>(g, m, n, k0, k1, acc); break;
    case 4: micro_nn<W, 4, NV>(g, m, n, k0, k1, acc); break;
    case 3: micro_nn<W, 3, NV>(g, m, n, k0, k1, acc); break;
    case 2: micro_nn<W, 2, NV>(g, m, n, k0, k1, acc); break;
    default: micro_nn<W, 1, NV>(g, m, n, k0, k1, acc); break;
  }
}

// k in blocks of kKb weight rows, so a block stays in L2 while every x row uses it.
template <typename W>
EM_AVX2 void gemm_nn_tile(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t n16 = n0 + ((n1 - n0) & ~int64_t{15}), n8 = n0 + ((n1 - n0) & ~int64_t{7});
  if (g.K == 0 && !g.accumulate) {
    for (int64_t m = m0; m < m1; ++m) std::fill(g.y + m * g.ldy + n0, g.y + m * g.ldy + n8, 0.0f);
  }
  for (int64_t k0 = 0; k0 < g.K; k0 += kKb) {
    const int64_t k1 = std::min(g.K, k0 + kKb);
    const bool acc = g.accumulate || k0 > 0;
    for (int64_t n = n0; n < n16; n += 16)
      for (int64_t m = m0; m < m1; m += 6)
        micro_nn_rows<W, 2>(g, m, static_cast<int>(std::min<int64_t>(6, m1 - m)), n, k0, k1, acc);
    for (int64_t n = n16; n < n8; n += 8)
      for (int64_t m = m0; m < m1; m += 6)
        micro_nn_rows<W, 1>(g, m, static_cast<int>(std::min<int64_t>(6, m1 - m)), n, k0, k1, acc);
  }
  if (n8 < n1) scalar::gemm_nn(g, m0, m1, n8, n1);
}

}  // namespace

// Batch-invariant: the dot kernel with fixed k panels for every row count (gemm_nt_tile).
void gemm_nt_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (g.w.dtype) {
    case EM_BF16: return gemm_nt_tile<Bf16W, true>(g, m0, m1, n0, n1);
    case EM_F16: return gemm_nt_tile<F16W, true>(g, m0, m1, n0, n1);
    case EM_F8_E4M3: return gemm_nt_tile<Fp8W, true>(g, m0, m1, n0, n1);
    default: return gemm_nt_tile<F32W, true>(g, m0, m1, n0, n1);
  }
}

void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 - m0 >= kPackedMinRows) {
    switch (g.w.dtype) {
      case EM_BF16: return gemm_nt_tile_packed<Bf16W>(g, m0, m1, n0, n1);
      case EM_F16: return gemm_nt_tile_packed<F16W>(g, m0, m1, n0, n1);
      case EM_F8_E4M3: return gemm_nt_tile_packed<Fp8W>(g, m0, m1, n0, n1);
      default: return gemm_nt_tile_packed<F32W>(g, m0, m1, n0, n1);
    }
  }
  switch (g.w.dtype) {
    case EM_BF16: return gemm_nt_tile<Bf16W, false>(g, m0, m1, n0, n1);
    case EM_F16: return gemm_nt_tile<F16W, false>(g, m0, m1, n0, n1);
    case EM_F8_E4M3: return gemm_nt_tile<Fp8W, false>(g, m0, m1, n0, n1);
    default: return gemm_nt_tile<F32W, false>(g, m0, m1, n0, n1);
  }
}

void gemm_nn(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (g.w.dtype) {
    case EM_BF16: return gemm_nn_tile<Bf16W>(g, m0, m1, n0, n1);
    case EM_F16: return gemm_nn_tile<F16W>(g, m0, m1, n0, n1);
    case EM_F8_E4M3: return gemm_nn_tile<Fp8W>(g, m0, m1, n0, n1);
    default: return gemm_nn_tile<F32W>(g, m0, m1, n0, n1);
  }
}

}  // namespace em::cpu::avx2
#endif  // EM_X86
