// SIMD building blocks shared by the per-ISA kernels.
//
// SIMD code is compiled per function with target attributes (never -march), so one
// binary runs on any x86-64 and picks its path at run time (isa.cpp). Every helper that
// uses intrinsics carries the same attribute as its callers; lambdas cannot, so kernels
// avoid intrinsics inside lambdas. On other architectures only the scalar path exists.
#pragma once

#include <cstdint>

// EM_NO_SIMD (CMake -DEM_SIMD=OFF) builds the scalar path only, as on other architectures.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(EM_NO_SIMD)
#define EM_X86 1
#include <immintrin.h>
#define EM_AVX2 __attribute__((target("avx2,fma,f16c")))
#if defined(EM_EMULATE_AVX512) && defined(EM_AVX512_TU)
// Test builds only (CMake -DEM_EMULATE_AVX512=ON): the AVX-512 kernels' translation unit,
// compiled with -mavx2, gets the AVX-512 intrinsics from SIMDe (portable C on AVX2 halves),
// so machines without AVX-512 run those kernels through the same tests. See avx512_emulation.h.
#include "avx512_emulation.h"
#define EM_AVX512 EM_AVX2
#define EM_AVX512BF16 EM_AVX2
#else
#define EM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define EM_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))
#endif
#else
#define EM_X86 0
#endif

#if EM_X86
namespace em::cpu::simd {

// Asks for the cache lines of [p + ahead, p + ahead + bytes) in L2. The decode kernels read
// a few weight rows at once, each a stream the hardware prefetchers must find anew every few
// KiB, and on their own they kept the weights at 0.55-0.65 of the read bandwidth. The
// kernels ask for the rows the next micro-kernel call will read (ahead = those rows' distance),
// one call early: 1.15-1.36x at 1-16 tokens on a Zen 4 (BENCHMARKS.md, the kernels suite).
// Past the end of the weights it asks for nothing useful, and a prefetch never faults.
// Always inlined: GCC 12 dropped every call of an out-of-line copy (a prefetch has no side
// effects to it), which em_bench showed and the disassembly confirmed.
template <int kBytes>
__attribute__((always_inline)) static inline void prefetch_l2(const void* p, int64_t ahead) {
  if (ahead == 0) return;
  const char* q = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead));
  for (int b = 0; b < kBytes; b += 64) _mm_prefetch(q + b, _MM_HINT_T1);
}

// 8 bf16 -> 8 f32, in order: bf16 is the high half of an f32.
EM_AVX2 static inline __m256 load8_bf16(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

EM_AVX2 static inline __m256 load8_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// fp8 e4m3 bits -> fp16 bits whose value is the fp8 value / 256: the 7 magnitude bits
// shifted into the fp16 exponent/mantissa field make exponent bias 15 instead of 7, and
// fp8 subnormals land on fp16 subnormals with the same factor. Callers fold the 256 into
// the block scale. (e4m3fn NaN, 0x7f, becomes 480 * 256; checkpoints hold no NaN.)
EM_AVX2 static inline __m128i fp8x8_to_f16_bits(__m128i bytes8) {
  const __m128i w = _mm_cvtepu8_epi16(bytes8);
  const __m128i mag = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7f)), 7);
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
  return _mm_or_si128(mag, sign);
}

// 16 fp8 -> 16 f32 (elements 0-7 in lo, 8-15 in hi), scaled by 1/256. The same bits as
// fp8x8_to_f16_bits in fewer operations: b << 8 puts the sign at bit 15; an arithmetic
// shift right by one moves the magnitude to bits 13..7 and copies the sign into bit 14,
// which the mask clears.
EM_AVX2 static inline void fp8x16_to_f32_div256(__m128i bytes16, __m256& lo, __m256& hi) {
  __m256i w = _mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes16), 8);
  w = _mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16(static_cast<short>(0xbfff)));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(w));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1));
}

// 8 fp8 -> 8 f32, scaled by 1/256 (see fp8x8_to_f16_bits).
EM_AVX2 static inline __m256 load8_fp8_div256(const uint8_t* p) {
  return _mm256_cvtph_ps(fp8x8_to_f16_bits(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

EM_AVX2 static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

EM_AVX2 static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats, Cephes polynomial (about 2 ulp). Inputs are clamped to
// [-88.38, 88.38]: below that the result is 0, above it ~2.4e38 (never inf).
EM_AVX2 static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

}  // namespace em::cpu::simd
#endif
