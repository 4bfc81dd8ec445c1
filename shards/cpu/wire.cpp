// Wire family: activations to and from the bytes of dispatch/combine frames
// (docs/wire-format.md), and CRC-32. The TypeScript codec in src/moe/wire.ts is the
// reference; every path here produces the same bytes (test/unit/wire-codec.test.ts and
// test/test_wire.cpp check it). One pass per row, on the calling thread: a frame is a few
// MiB at most, and the gateway and shard call this from their event loop.
//
// pack writes rows straight into the caller's frame buffer (with a gather, so the gateway
// need not copy each shard's token rows first) and folds the CRC-32 of each chunk it wrote
// while that chunk is still in cache; unpack adds combine rows straight into the output
// (a scatter-add), so no intermediate f32 array exists on either side, and folds the CRC
// of what it read in the same way, so a receiver checks a frame in the pass that converts it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu.h"
#include "dtype.h"
#include "simd.h"

namespace em::cpu {
namespace {

constexpr int64_t kGroup = 128;        // fp8 scale group (DeepEP's per-128 layout)
constexpr int64_t kCrcChunk = 16384;   // bytes packed before their CRC is folded in

// ------------------------------------------------------------------ CRC-32

struct CrcTable {
  uint32_t t[8][256];
  CrcTable() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
  }
};

const CrcTable& crc_table() {
  static const CrcTable table;
  return table;
}

// Slicing-by-8 on the inverted state c.
uint32_t crc_tables(uint32_t c, const uint8_t* p, size_t n) {
  const CrcTable& T = crc_table();
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = T.t[7][lo & 0xff] ^ T.t[6][(lo >> 8) & 0xff] ^ T.t[5][(lo >> 16) & 0xff] ^ T.t[4][lo >> 24] ^
        T.t[3][hi & 0xff] ^ T.t[2][(hi >> 8) & 0xff] ^ T.t[1][(hi >> 16) & 0xff] ^ T.t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = T.t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

#if EM_X86
#define EM_CLMUL __attribute__((target("pclmul,sse4.1")))

// CRC-32 by folding with carry-less multiplication (Intel, "Fast CRC Computation for
// Generic Polynomials Using PCLMULQDQ", 2009), in the bit-reflected domain of zlib's CRC-32
// (as in Linux crc32-pclmul and Chromium's zlib). The fold constants move a 128-bit lane
// forward by D bits: x^(D+32) and x^(D-32) mod P, bit-reflected and shifted left by one —
// the paper's D = 128 and 512, and D = 1024 for the 256-bit loop.
alignas(16) constexpr uint64_t kFold128[] = {0x01751997d0ull, 0x00ccaa009eull};
alignas(16) constexpr uint64_t kFold512[] = {0x0154442bd4ull, 0x01c6e41596ull};
constexpr uint64_t kFold1024[] = {0x01e88ef372ull, 0x014a7fe880ull};

// x folded forward over the next 16 bytes `next`.
EM_CLMUL inline __m128i crc_fold16(__m128i x, __m128i next) {
  const __m128i k = _mm_load_si128(reinterpret_cast<const __m128i*>(kFold128));
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

// The tail of both folding loops: x1 (the state folded into 128 bits) folded over the
// remaining n bytes (a multiple of 16), then reduced to the inverted 32-bit state.
EM_CLMUL uint32_t crc_clmul_tail(__m128i x1, const uint8_t* buf, size_t n) {
  alignas(16) static const uint64_t k5k0[] = {0x0163cd6124ull, 0x0000000000ull};
  alignas(16) static const uint64_t poly[] = {0x01db710641ull, 0x01f7011641ull};
  while (n >= 16) {
    x1 = crc_fold16(x1, _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf)));
    buf += 16;
    n -= 16;
  }
  // 128 -> 64 bits, then Barrett reduction to 32.
  __m128i x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(kFold128));
  __m128i x2b = _mm_clmulepi64_si128(x1, x0, 0x10);
  const __m128i mask = _mm_setr_epi32(~0, 0, ~0, 0);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2b);
  x0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k5k0));
  x2b = _mm_srli_si128(x1, 4);
  x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask), x0, 0x00), x2b);
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(poly));
  x2b = _mm_clmulepi64_si128(_mm_and_si128(x1, mask), x0, 0x10);
  x2b = _mm_clmulepi64_si128(_mm_and_si128(x2b, mask), x0, 0x00);
  x1 = _mm_xor_si128(x1, x2b);
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}

// Four 128-bit lanes (64 bytes) per step. n >= 64 and a multiple of 16; c is the inverted
// state, and so is the result.
EM_CLMUL uint32_t crc_clmul(uint32_t c, const uint8_t* buf, size_t n) {
  auto load = [](const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
  __m128i x1 = load(buf), x2 = load(buf + 16), x3 = load(buf + 32), x4 = load(buf + 48);
  x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128(static_cast<int>(c)));
  const __m128i x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(kFold512));
  buf += 64;
  n -= 64;
  while (n >= 64) {
    const __m128i x5 = _mm_clmulepi64_si128(x1, x0, 0x00), x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
    const __m128i x7 = _mm_clmulepi64_si128(x3, x0, 0x00), x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
    x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
    x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), load(buf));
    x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), load(buf + 16));
    x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), load(buf + 32));
    x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), load(buf + 48));
    buf += 64;
    n -= 64;
  }
  // Fold the four lanes into one.
  x1 = crc_fold16(x1, x2);
  x1 = crc_fold16(x1, x3);
  x1 = crc_fold16(x1, x4);
  return crc_clmul_tail(x1, buf, n);
}

bool have_clmul() {
  static const bool yes = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return yes;
}

#define EM_VCLMUL __attribute__((target("vpclmulqdq,avx2,pclmul,sse4.1")))

// The same folding, 256-bit: four ymm lanes pairs (128 bytes) per step, each 128-bit lane
// moved forward by 1024 bits; then the eight lanes are folded into one in memory order.
// n >= 128 and a multiple of 16; c and the result are inverted states.
EM_VCLMUL inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

EM_VCLMUL uint32_t crc_vclmul(uint32_t c, const uint8_t* buf, size_t n) {
  __m256i y[4] = {load32(buf), load32(buf + 32), load32(buf + 64), load32(buf + 96)};
  y[0] = _mm256_xor_si256(y[0], _mm256_setr_epi32(static_cast<int>(c), 0, 0, 0, 0, 0, 0, 0));
  const __m256i k = _mm256_setr_epi64x(static_cast<int64_t>(kFold1024[0]), static_cast<int64_t>(kFold1024[1]),
                                       static_cast<int64_t>(kFold1024[0]), static_cast<int64_t>(kFold1024[1]));
  buf += 128;
  n -= 128;
  while (n >= 128) {
    for (int i = 0; i < 4; ++i)
      y[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_clmulepi64_epi128(y[i], k, 0x00), _mm256_clmulepi64_epi128(y[i], k, 0x11)),
                              load32(buf + 32 * i));
    buf += 128;
    n -= 128;
  }
  __m128i x = _mm256_castsi256_si128(y[0]);
  x = crc_fold16(x, _mm256_extracti128_si256(y[0], 1));
  for (int i = 1; i < 4; ++i) {
    x = crc_fold16(x, _mm256_castsi256_si128(y[i]));
    x = crc_fold16(x, _mm256_extracti128_si256(y[i], 1));
  }
  return crc_clmul_tail(x, buf, n);
}

bool have_vclmul() {
  static const bool yes = have_clmul() && __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// ------------------------------------------------------------------ scalar codecs

// The e4m3 code of float32 y, as float32ToE4m3 in src/model/floats.ts.
inline uint8_t f32_to_e4m3(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, 4);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return 0x7f;                                      // NaN
  if (abs >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);       // >= 448 saturates
  if (abs < 0x3c800000u) {                                                 // subnormal: m * 2^-9
    const float q = std::nearbyint(std::fabs(y) * 512.0f);                 // exact product; ties to even
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(q));
  }
  const uint32_t kept = (abs >> 20) & 7u, dropped = abs & 0xfffffu;
  uint32_t code = ((((abs >> 23) - 127u + 7u) << 3) | kept);
  if (dropped > 0x80000u || (dropped == 0x80000u && (kept & 1u))) ++code;
  return static_cast<uint8_t>(sign | std::min(code, 0x7eu));
}

struct E4m3Table {
  float v[256];
  E4m3Table() {
    // NaN codes (0x7f, 0xff) decode to the one quiet NaN, as in JavaScript.
    for (int i = 0; i < 256; ++i) {
      const float f = fp8_e4m3_to_f32(static_cast<uint8_t>(i));
      v[i] = std::isnan(f) ? std::numeric_limits<float>::quiet_NaN() : f;
    }
  }
};

const float* e4m3_values() {
  static const E4m3Table table;
  return table.v;
}

// The scale of one 128-block: max|x| / 448 in float (NaN ignored), 1 when that is zero or
// subnormal (an all-zero block, or values so small that 1 / scale would overflow).
inline float block_scale(float amax) {
  const float s = amax / 448.0f;
  return s >= 0x1p-126f ? s : 1.0f;
}

void pack_bf16_scalar(const float* x, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = f32_to_bf16(x[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

float amax_scalar(const float* x, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) amax = a;
  }
  return amax;
}

void quant_scalar(const float* x, int64_t n, float inv, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_e4m3(x[i] * inv);
}

void unpack_bf16_scalar(const uint8_t* in, int64_t n, float* y, bool acc) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    const float v = bf16_to_f32(h);
    y[i] = acc ? y[i] + v : v;
  }
}

void unpack_f32_scalar(const uint8_t* in, int64_t n, float* y, bool acc) {
  if (!acc) {
    std::memcpy(y, in, static_cast<size_t>(n) * 4);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    float v;
    std::memcpy(&v, in + 4 * i, 4);
    y[i] += v;
  }
}

void dequant_scalar(const uint8_t* codes, int64_t n, float scale, float* y, bool acc) {
  const float* t = e4m3_values();
  for (int64_t i = 0; i < n; ++i) {
    const float v = t[codes[i]] * scale;
    y[i] = acc ? y[i] + v : v;
  }
}

// ------------------------------------------------------------------ AVX2 codecs

#if EM_X86
// 16 int32 (two vectors, values 0..0xffff / 0..0xff) to 16 u16 / u8 in order.
EM_AVX2 inline __m256i pack_u16(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
}

EM_AVX2 inline __m256i bf16_bits8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i abs = _mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

EM_AVX2 void pack_bf16_avx2(const float* x, int64_t n, uint8_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = pack_u16(bf16_bits8(_mm256_loadu_ps(x + i)), bf16_bits8(_mm256_loadu_ps(x + i + 8)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * i), h);
  }
  pack_bf16_scalar(x + i, n - i, out + 2 * i);
}

EM_AVX2 float amax_avx2(const float* x, int64_t n) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  int64_t i = 0;
  // max(a, m) returns m when a is NaN: NaN is ignored, as in the reference.
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), m);
  float amax = simd::hmax(m);
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) amax = a;
  }
  return amax;
}

// e4m3 codes of 8 float32 y (see f32_to_e4m3), as int32.
EM_AVX2 inline __m256i e4m3_8(__m256 y) {
  const __m256i b = _mm256_castps_si256(y);
  const __m256i abs = _mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff));
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(b, 24), _mm256_set1_epi32(0x80));
  // Normal: rebias (127 -> 7) and round the 20 dropped mantissa bits to nearest even; the
  // carry steps the exponent.
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(abs, 20), _mm256_set1_epi32(1));
  __m256i normal = _mm256_sub_epi32(abs, _mm256_set1_epi32(120 << 23));
  normal = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(normal, _mm256_set1_epi32(0x7ffff)), lsb), 20);
  // Saturation: from 448 up (Inf included) the field exceeds 0x7e (signed: abs >= 2^-6
  // here, so the rebiased value is positive).
  normal = _mm256_min_epi32(normal, _mm256_set1_epi32(0x7e));
  // Subnormal: round(|y| * 512), ties to even (cvtps rounds to nearest even).
  const __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(abs), _mm256_set1_ps(512.0f)));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3c800000), abs);
  const __m256i is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  __m256i code = _mm256_or_si256(_mm256_blendv_epi8(normal, sub, is_sub), sign);
  return _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f), is_nan);
}

EM_AVX2 void quant_avx2(const float* x, int64_t n, float inv, uint8_t* out) {
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i w = pack_u16(e4m3_8(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)),
                               e4m3_8(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vinv)));
    const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), bytes);
  }
  quant_scalar(x + i, n - i, inv, out + i);
}

EM_AVX2 void unpack_bf16_avx2(const uint8_t* in, int64_t n, float* y, bool acc) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = simd::load8_bf16(reinterpret_cast<const uint16_t*>(in + 2 * i));
    if (acc) v = _mm256_add_ps(_mm256_loadu_ps(y + i), v);
    _mm256_storeu_ps(y + i, v);
  }
  unpack_bf16_scalar(in + 2 * i, n - i, y + i, acc);
}

EM_AVX2 void unpack_f32_avx2(const uint8_t* in, int64_t n, float* y, bool acc) {
  if (!acc) {
    std::memcpy(y, in, static_cast<size_t>(n) * 4);
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(reinterpret_cast<const float*>(in + 4 * i))));
  unpack_f32_scalar(in + 4 * i, n - i, y + i, acc);
}

// The values of 8 e4m3 codes, computed from their bits (a gather from the 256-entry table
// is slow on some CPUs): normals rebias the exponent (7 -> 127) and move the mantissa into
// place, subnormals are m * 2^-9, NaN codes the one quiet NaN (as the table).
EM_AVX2 inline __m256 e4m3_values8(__m256i code) {
  const __m256i m7f = _mm256_set1_epi32(0x7f);
  const __m256i abs = _mm256_and_si256(code, m7f);
  const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(abs, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(abs), _mm256_set1_ps(1.0f / 512.0f));
  const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), abs));
  const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(0x80)), 24));
  const __m256 v = _mm256_or_ps(_mm256_blendv_ps(normal, sub, is_sub), sign);
  const __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(abs, m7f));
  return _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), is_nan);
}

EM_AVX2 void dequant_avx2(const uint8_t* codes, int64_t n, float scale, float* y, bool acc) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    __m256 v = _mm256_mul_ps(e4m3_values8(code), s);
    if (acc) v = _mm256_add_ps(_mm256_loadu_ps(y + i), v);
    _mm256_storeu_ps(y + i, v);
  }
  dequant_scalar(codes + i, n - i, scale, y + i, acc);
}
#endif

// The row kernels of one ISA.
struct WireKernels {
  void (*pack_bf16)(const float*, int64_t, uint8_t*);
  float (*amax)(const float*, int64_t);
  void (*quant)(const float*, int64_t, float, uint8_t*);
  void (*unpack_bf16)(const uint8_t*, int64_t, float*, bool);
  void (*unpack_f32)(const uint8_t*, int64_t, float*, bool);
  void (*dequant)(const uint8_t*, int64_t, float, float*, bool);
};

WireKernels wire_kernels(em_cpu_isa isa) {
#if EM_X86
  if (isa >= EM_ISA_AVX2)
    return {pack_bf16_avx2, amax_avx2, quant_avx2, unpack_bf16_avx2, unpack_f32_avx2, dequant_avx2};
#endif
  (void)isa;
  return {pack_bf16_scalar, amax_scalar, quant_scalar, unpack_bf16_scalar, unpack_f32_scalar, dequant_scalar};
}

}  // namespace

uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n) {
  uint32_t c = ~crc;
#if EM_X86
  if (n >= 64 && have_clmul()) {
    const size_t chunk = n & ~static_cast<size_t>(15);
    c = n >= 256 && have_vclmul() ? crc_vclmul(c, p, chunk) : crc_clmul(c, p, chunk);
    p += chunk;
    n -= chunk;
  }
#endif
  return ~crc_tables(c, p, n);
}

em_status wire_pack(Context& ctx, const em_wire_pack_args* a) {
  const WireKernels k = wire_kernels(ctx.isa);
  const int64_t dim = a->x->shape[1], ldx = a->x->stride[0];
  const float* x = static_cast<const float*>(a->x->data);
  auto row = [&](int64_t r) { return x + (a->row_index ? a->row_index[r] : r) * ldx; };
  uint8_t* out = a->out;
  uint32_t crc = a->crc ? *a->crc : 0;
  // Rows are packed in chunks of about kCrcChunk bytes; each chunk's CRC is folded in
  // right after it is written, while it is still in cache.
  const int64_t row_bytes = a->dtype == EM_WIRE_BF16 ? 2 * dim : a->dtype == EM_WIRE_F32 ? 4 * dim : dim;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kCrcChunk / std::max<int64_t>(1, row_bytes));
  float* scales = nullptr;
  const int64_t groups = (dim + kGroup - 1) / kGroup;
  uint8_t* scale_bytes = out + a->rows * dim;
  std::vector<float> scale_buf;
  if (a->dtype == EM_WIRE_FP8) {
    scale_buf.resize(static_cast<size_t>(a->rows * groups));
    scales = scale_buf.data();
  }
  for (int64_t r0 = 0; r0 < a->rows; r0 += rows_per_chunk) {
    const int64_t r1 = std::min(a->rows, r0 + rows_per_chunk);
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = row(r);
      uint8_t* dst = out + r * row_bytes;
      if (a->dtype == EM_WIRE_BF16) {
        k.pack_bf16(src, dim, dst);
      } else if (a->dtype == EM_WIRE_F32) {
        std::memcpy(dst, src, static_cast<size_t>(row_bytes));
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t c0 = g * kGroup, n = std::min(dim, c0 + kGroup) - c0;
          const float scale = block_scale(k.amax(src + c0, n));
          scales[r * groups + g] = scale;
          k.quant(src + c0, n, 1.0f / scale, dst + c0);
        }
      }
    }
    if (a->crc) crc = crc32_update(crc, out + r0 * row_bytes, static_cast<size_t>((r1 - r0) * row_bytes));
  }
  if (a->dtype == EM_WIRE_FP8) {
    std::memcpy(scale_bytes, scales, scale_buf.size() * 4);
    if (a->crc) crc = crc32_update(crc, scale_bytes, scale_buf.size() * 4);
  }
  if (a->crc) *a->crc = crc;
  return EM_OK;
}

em_status wire_unpack(Context& ctx, const em_wire_unpack_args* a) {
  const WireKernels k = wire_kernels(ctx.isa);
  const int64_t dim = a->y->shape[1], ldy = a->y->stride[0];
  float* y = static_cast<float*>(a->y->data);
  const bool acc = a->accumulate != 0;
  const int64_t groups = (dim + kGroup - 1) / kGroup;
  const uint8_t* scale_bytes = a->in + a->rows * dim;
  // As in pack: rows in chunks of about kCrcChunk bytes, each chunk's CRC folded in right
  // after it was read, while it is still in cache.
  const int64_t row_bytes = a->dtype == EM_WIRE_BF16 ? 2 * dim : a->dtype == EM_WIRE_F32 ? 4 * dim : dim;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kCrcChunk / std::max<int64_t>(1, row_bytes));
  uint32_t crc = a->crc ? *a->crc : 0;
  for (int64_t r0 = 0; r0 < a->rows; r0 += rows_per_chunk) {
    const int64_t r1 = std::min(a->rows, r0 + rows_per_chunk);
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = y + (a->out_index ? a->out_index[r] : r) * ldy;
      if (a->dtype == EM_WIRE_BF16) {
        k.unpack_bf16(a->in + 2 * r * dim, dim, dst, acc);
      } else if (a->dtype == EM_WIRE_F32) {
        k.unpack_f32(a->in + 4 * r * dim, dim, dst, acc);
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t c0 = g * kGroup, n = std::min(dim, c0 + kGroup) - c0;
          float scale;
          std::memcpy(&scale, scale_bytes + 4 * (r * groups + g), 4);
          k.dequant(a->in + r * dim + c0, n, scale, dst + c0, acc);
        }
      }
    }
    if (a->crc) crc = crc32_update(crc, a->in + r0 * row_bytes, static_cast<size_t>((r1 - r0) * row_bytes));
  }
  if (a->crc) {
    if (a->dtype == EM_WIRE_FP8) crc = crc32_update(crc, scale_bytes, static_cast<size_t>(a->rows * groups * 4));
    *a->crc = crc;
  }
  return EM_OK;
}

}  // namespace em::cpu

extern "C" uint32_t em_crc32(uint32_t crc, const void* data, size_t n) {
  return em::cpu::crc32_update(crc, static_cast<const uint8_t*>(data), n);
}
