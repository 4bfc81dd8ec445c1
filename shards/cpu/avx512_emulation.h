// AVX-512 intrinsics emulated with SIMDe, for the test build that runs the AVX-512 kernels
// on machines without AVX-512 (CMake -DEM_EMULATE_AVX512=ON, scripts/avx512-emulated.sh).
// simd.h includes this in matmul_avx512.cpp only, after <immintrin.h>, in that build only;
// the translation unit is compiled with -mavx2, so SIMDe runs each 512-bit operation as AVX2
// halves or plain C. Never part of a build that ships.
//
// What it checks: the kernels' logic (indexing, tails, packing, lane order, the bf16 path's
// operand pairing) through the ordinary test suite. What it cannot: code generation for
// real AVX-512 (register pressure, alignment faults), which only AVX-512 hardware shows.
#pragma once

#include <cstdint>
#include <cstring>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// SIMDe 0.8.2 lacks these three; written after Intel's pseudo-code.

// float -> bf16 as VCVTNE2PS2BF16 does: NaN quieted, denormal inputs as zero, round to
// nearest even.
static inline uint16_t em_emulated_f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// b's 16 floats become bf16 elements 0..15, a's become 16..31.
static inline simde__m512bh em_emulated_mm512_cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
  float fa[16], fb[16];
  uint16_t out[32];
  simde_mm512_storeu_ps(fa, a);
  simde_mm512_storeu_ps(fb, b);
  for (int i = 0; i < 16; ++i) {
    out[i] = em_emulated_f32_to_bf16(fb[i]);
    out[16 + i] = em_emulated_f32_to_bf16(fa[i]);
  }
  simde__m512bh r;
  static_assert(sizeof(r) == sizeof(out), "simde__m512bh is 64 bytes");
  std::memcpy(&r, out, sizeof(out));
  return r;
}
#define _mm512_cvtne2ps_pbh(a, b) em_emulated_mm512_cvtne2ps_pbh(a, b)

static inline float em_emulated_mm512_reduce_add_ps(simde__m512 v) {
  float f[16];
  simde_mm512_storeu_ps(f, v);
  float s = 0.0f;
  for (float x : f) s += x;
  return s;
}
#define _mm512_reduce_add_ps(v) em_emulated_mm512_reduce_add_ps(v)

// 16 bytes, sign-extended to 16 int32 (VPMOVSXBD).
static inline simde__m512i em_emulated_mm512_cvtepi8_epi32(simde__m128i a) {
  int8_t b[16];
  int32_t out[16];
  simde_mm_storeu_si128(reinterpret_cast<simde__m128i*>(b), a);
  for (int i = 0; i < 16; ++i) out[i] = b[i];
  return simde_mm512_loadu_si512(out);
}
#define _mm512_cvtepi8_epi32(a) em_emulated_mm512_cvtepi8_epi32(a)
