// AMX (Intel Advanced Matrix Extensions, Sapphire Rapids and later) nt GEMM for bf16 and fp8
// weights: y = x W^T with x rounded to bf16 and fp32 accumulation, as the AVX512_BF16 kernel
// computes, on the tile unit (one TDPBF16PS is 16 x 16 x 32 multiply-adds). fp8 (e4m3, 128 x 128
// block scales) is dequantized to bf16 tiles slice by slice (value x scale rounded to bf16, as
// DeepSeek's own fp8-to-bf16 conversion stores V3's weights), once per weight-row pair and slice
// for all the x rows.
//
// Orientation: the tiles compute y^T = W x^T. W's rows (n) are the A operand, loaded straight
// from the checkpoint's row-major [N, K] layout with a stride, so weights are never repacked
// (decode reads each weight byte once, as the dot-product kernels do). x is the B operand, which
// the tile unit wants in "VNNI" layout: B row r holds, for each of 16 x rows, the bf16 pair at
// k = 2r, 2r+1. pack_x builds that once per GEMM (the drivers in matmul.cpp and moe.cpp call it
// and pass the result in Gemm::x_vnni), a 16 x 16 dword transpose per 32 k of 16 x rows; x is
// small next to W except at large prefill, where it is read from L2/L3 once per 32 weight rows.
//
// Register plan (8 tiles of 16 rows x 64 bytes): C0..C3 accumulate a 32 (n) x 32 (m) block of
// y^T, A4/A5 hold 16 weight rows each, B6/B7 16 x rows each; every loaded tile feeds two
// products. K is cut into slices (slice_k) so a slice of packed x stays in L2 while all the
// tile's weight rows stream past it; the accumulators live in memory between slices. Edges: a last m block of 16 rows uses the 2 x 1 kernel; a last 16 weight rows the
// 1 x n kernels; fewer than 16 weight rows, and k past the last multiple of 32, go to the
// AVX512_BF16 kernel (same numerics).
//
// The OS must grant the tile state first (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM), done once per
// process in isa.cpp). Each tile function loads the tile configuration on its thread and
// releases the tiles when done, so threads that never run AMX code carry no tile state.
//
// The emulated test build (CMake -DEM_EMULATE_AVX512=ON) runs this file on any AVX2 machine:
// the AVX-512 intrinsics come from SIMDe and the six tile instructions from amx_emulation.h.
#include <algorithm>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu.h"
#include "simd.h"

#if EM_X86
#if defined(EM_EMULATE_AVX512) && defined(EM_AVX512_TU)
#include "amx_emulation.h"
#define EM_AMX EM_AVX2
#else
#define EM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))
#endif

namespace em::cpu::amx {
namespace {

constexpr int64_t kStepK = 32;       // k per tile product
constexpr int64_t kTileDwords = 256;  // one 16 x 64-byte tile, in 32-bit elements
constexpr int64_t kTileElems = 512;   // ... in bf16 elements

// The palette-1 configuration: 64 bytes, as LDTILECFG reads them.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// Tiles 0..7: 16 rows of 64 bytes (C: 16 x 16 fp32; A: 16 x 32 bf16; B: 16 x 16 bf16 pairs).
EM_AMX void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
#if defined(EM_EMULATE_AVX512) && defined(EM_AVX512_TU)
  _tile_loadconfig(&cfg);
#else
  // Not _tile_loadconfig: GCC 12's version hands the asm an 8-byte memory operand, so the
  // compiler may leave the rest of cfg unwritten when the instruction reads it.
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
#endif
}

// The four kernels: y^T[32 or 16 n, 32 or 16 m] += W x^T over `steps` 32-k steps. w0/w1: the
// first A tile of weight rows 0-15 / 16-31, ldw their row pitch in bytes, wstep elements from one
// step's tile to the next (32 in a bf16 checkpoint, 512 in converted fp8 tiles); b0/b1: x blocks
// (packed, at the slice's first step); c: the accumulator of tile (n0, m0), 16 x 16 fp32; the
// tile for m1 is 256 floats on, for n1 `cstride` floats on. `fresh`: start from zero, not c.
#define EM_AMX_C_IN(t, p) \
  if (fresh) {            \
    _tile_zero(t);        \
  } else {                \
    _tile_loadd(t, p, 64); \
  }

EM_AMX void tiles_2x2(const uint16_t* w0, const uint16_t* w1, int64_t ldw, int64_t wstep, const uint32_t* b0,
                      const uint32_t* b1, int64_t steps, float* c, int64_t cstride, bool fresh) {
  EM_AMX_C_IN(0, c)
  EM_AMX_C_IN(1, c + kTileDwords)
  EM_AMX_C_IN(2, c + cstride)
  EM_AMX_C_IN(3, c + cstride + kTileDwords)
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, w0 + s * wstep, ldw);
    _tile_loadd(6, b0 + s * kTileDwords, 64);
    _tile_loadd(7, b1 + s * kTileDwords, 64);
    _tile_loadd(5, w1 + s * wstep, ldw);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + kTileDwords, 64);
  _tile_stored(2, c + cstride, 64);
  _tile_stored(3, c + cstride + kTileDwords, 64);
}

// 32 weight rows x 16 x rows.
EM_AMX void tiles_2x1(const uint16_t* w0, const uint16_t* w1, int64_t ldw, int64_t wstep, const uint32_t* b0,
                      int64_t steps, float* c, int64_t cstride, bool fresh) {
  EM_AMX_C_IN(0, c)
  EM_AMX_C_IN(1, c + cstride)
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(6, b0 + s * kTileDwords, 64);
    _tile_loadd(4, w0 + s * wstep, ldw);
    _tile_loadd(5, w1 + s * wstep, ldw);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + cstride, 64);
}

// 16 weight rows x 32 x rows.
EM_AMX void tiles_1x2(const uint16_t* w0, int64_t ldw, int64_t wstep, const uint32_t* b0, const uint32_t* b1,
                      int64_t steps, float* c, bool fresh) {
  EM_AMX_C_IN(0, c)
  EM_AMX_C_IN(1, c + kTileDwords)
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, w0 + s * wstep, ldw);
    _tile_loadd(6, b0 + s * kTileDwords, 64);
    _tile_loadd(7, b1 + s * kTileDwords, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + kTileDwords, 64);
}

EM_AMX void tiles_1x1(const uint16_t* w0, int64_t ldw, int64_t wstep, const uint32_t* b0, int64_t steps, float* c,
                      bool fresh) {
  EM_AMX_C_IN(0, c)
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, w0 + s * wstep, ldw);
    _tile_loadd(6, b0 + s * kTileDwords, 64);
    _tile_dpbf16ps(0, 4, 6);
  }
  _tile_stored(0, c, 64);
}
#undef EM_AMX_C_IN

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] = row i).
EM_AVX512 inline void transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j.
  __m512i u[16];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // Row 4L + j gathers lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512i p = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i q = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i p2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i q2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    r[0 + j] = _mm512_shuffle_i32x4(p, p2, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + j] = _mm512_shuffle_i32x4(p, p2, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + j] = _mm512_shuffle_i32x4(q, q2, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + j] = _mm512_shuffle_i32x4(q, q2, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// y[m0 + j, n0 + i] (+)= c[i * 16 + j] for j < mr, i < nc: one C tile written back transposed.
EM_AVX512 void store_tile(const float* c, float* y, int64_t ldy, int mr, int nc, bool overwrite) {
  __m512i r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + i * 16);
  transpose16(r);
  for (int j = 0; j < mr; ++j) {
    float* yr = y + j * ldy;
    const __m512 v = _mm512_castsi512_ps(r[j]);
    if (nc == 16) {
      _mm512_storeu_ps(yr, overwrite ? v : _mm512_add_ps(_mm512_loadu_ps(yr), v));
      continue;
    }
    // (Not a masked store: SIMDe's, in the emulated build, writes zeros past the mask.)
    alignas(64) float part[16];
    _mm512_store_ps(part, v);
    for (int i = 0; i < nc; ++i) yr[i] = overwrite ? part[i] : yr[i] + part[i];
  }
}

}  // namespace

int64_t packed_x_size(int64_t M, int64_t K) { return ((M + 15) / 16) * (K / kStepK) * kTileDwords; }

// Block b (x rows 16b .. 16b + 15, rows past M zero), step s: out[(b * steps + s) * 256 + r * 16 + j]
// = bf16 pair (x[16b + j][32s + 2r], x[16b + j][32s + 2r + 1]), the low half the even k.
EM_AVX512BF16 void pack_x(const float* x, int64_t ldx, int64_t M, int64_t K, uint32_t* out) {
  const int64_t steps = K / kStepK;
  for (int64_t b = 0; b * 16 < M; ++b) {
    const int live = static_cast<int>(std::min<int64_t>(16, M - b * 16));
    for (int64_t s = 0; s < steps; ++s) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        if (j < live) {
          const float* src = x + (b * 16 + j) * ldx + s * kStepK;
          r[j] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
        } else {
          r[j] = _mm512_setzero_si512();
        }
      }
      transpose16(r);
      uint32_t* dst = out + (b * steps + s) * kTileDwords;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_store_si512(dst + i * 16, r[i]);
    }
  }
}

namespace {
bool takes(em_dtype d) { return d == EM_BF16 || d == EM_F8_E4M3; }
int64_t min_rows(em_dtype d) { return d == EM_F8_E4M3 ? kMinRowsFp8 : kMinRows; }
}  // namespace

bool wants(const Gemm& g, bool invariant) {
  return takes(g.w.dtype) && g.K >= kStepK && (invariant || g.M >= min_rows(g.w.dtype));
}

// fp8 weight rows [n, n + rows) (16 or 32) x `steps` 32-k steps from k0, dequantized to bf16 A
// tiles in order: out + (t * steps + s) * 512 is the tile of rows n + 16t.. and step s. Each value
// is fp8 x its block scale rounded to bf16 (what DeepSeek's fp8-to-bf16 conversion stores). A step
// never straddles a 128-k scale block.
EM_AVX512BF16 void dequant_fp8_tiles(const Weight& w, int64_t n, int rows, int64_t k0, int64_t steps, uint16_t* out) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const __m256i low7 = _mm256_set1_epi16(0x7f), sign = _mm256_set1_epi16(static_cast<short>(0x80));
  for (int r = 0; r < rows; ++r) {
    const uint8_t* src = base + (n + r) * w.ld + k0;
    const float* scales = w.scale_row(n + r);
    uint16_t* dst = out + (r / 16) * steps * kTileElems + (r % 16) * kStepK;
    for (int64_t s = 0; s < steps; ++s) {
      // e4m3 -> f16 bits of value / 256 (exponent bias 7 vs 15), then f32 x (scale x 256).
      const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + s * kStepK)));
      const __m256i b2 =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + s * kStepK + 16)));
      const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, low7), 7),
                                        _mm256_slli_epi16(_mm256_and_si256(b, sign), 8));
      const __m256i h2 = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b2, low7), 7),
                                         _mm256_slli_epi16(_mm256_and_si256(b2, sign), 8));
      const __m512 sc = _mm512_set1_ps(scales[(k0 + s * kStepK) / EM_FP8_BLOCK] * 256.0f);
      const __m512 lo = _mm512_mul_ps(_mm512_cvtph_ps(h), sc), hi = _mm512_mul_ps(_mm512_cvtph_ps(h2), sc);
      _mm512_store_si512(dst + s * kTileElems, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

// k per slice: the x rows' packed slice stays within ~512 KiB (L2) while every weight-row pair
// streams past it, instead of the whole row block (256 rows x 7168 k is 3.5 MiB) coming from L3
// once per pair. A multiple of 32; whole K for up to 64 rows at K <= 4096.
int64_t slice_k(int64_t rows, int64_t K) {
  const int64_t kc = std::max<int64_t>(256, (int64_t{512} * 1024 / 2 / std::max<int64_t>(rows, 16)) & ~int64_t{31});
  return std::min(kc, K & ~int64_t{31});
}

namespace {

// kInvariant: the tile unit for every row count and every weight row (a row's sums then do not
// depend on the rows beside it, or on where a call's weight rows end: each element of a
// TDPBF16PS is its own chain over k, the k slices reload the accumulators exactly, and padding
// rows are zeros). The weight rows past the last 16 are copied into a zero-padded tile; the
// AVX512_BF16 invariant kernel takes what the tiles cannot (dtypes they do not take, the k past
// the last 32: both fixed by the weight). The default kernel hands those rows, and calls of
// few x rows, to the dot kernel instead.
template <bool kInvariant>
EM_AMX void gemm_nt_tiles(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const GemmTileFn dot = kInvariant ? avx512::gemm_nt_bf16dot_invariant : avx512::gemm_nt_bf16dot;
  const bool fp8 = g.w.dtype == EM_F8_E4M3;
  // (fp8 with a k tail: the tail's scales are indexed from the row start, so the whole GEMM goes
  // to the AVX-512 kernel; DeepSeek's K are multiples of 128.)
  if (!takes(g.w.dtype) || g.K < kStepK || (fp8 && g.K % kStepK != 0) ||
      (!kInvariant && (m1 - m0 < min_rows(g.w.dtype) || n1 - n0 < 16))) {
    return dot(g, m0, m1, n0, n1);
  }
  const int64_t steps = g.K / kStepK, k32 = steps * kStepK;
  // x packed for these rows: the driver's (rows from m0, a multiple of 16) or our own.
  AlignedBuffer<uint32_t> own(g.x_vnni != nullptr ? 0 : static_cast<size_t>(packed_x_size(m1 - m0, g.K)));
  const uint32_t* xp = g.x_vnni;
  if (xp != nullptr) {
    xp += (m0 / 16) * steps * kTileDwords;
  } else {
    pack_x(g.x + m0 * g.ldx, g.ldx, m1 - m0, g.K, own.data());
    xp = own.data();
  }
  const uint16_t* wbase = static_cast<const uint16_t*>(g.w.data);
  const int64_t ldw = g.w.ld * 2;
  // Weight rows [n0, n16) in whole tiles; [n16, nt_end) in one zero-padded tile (invariant only).
  const int64_t n16 = n0 + ((n1 - n0) & ~int64_t{15});
  const int64_t nt_end = kInvariant ? n1 : n16;
  const int64_t mblocks = (m1 - m0 + 15) / 16, nblocks = (nt_end - n0 + 15) / 16;
  // bf16: the padded tile's rows, at the weight's pitch (fp8 pads its dequantized tiles).
  const bool padded = !fp8 && nt_end > n16;
  AlignedBuffer<uint16_t> pad(padded ? static_cast<size_t>(16 * g.w.ld) : 0);
  if (padded) {
    std::fill(pad.data(), pad.data() + 16 * g.w.ld, uint16_t{0});
    for (int64_t n = n16; n < nt_end; ++n)
      std::copy(wbase + n * g.w.ld, wbase + n * g.w.ld + g.K, pad.data() + (n - n16) * g.w.ld);
  }
  const int64_t block_dwords = steps * kTileDwords;
  // The accumulators of the whole tile, 16 x 16 fp32 per (n block, m block), across k slices.
  const int64_t cstride = mblocks * kTileDwords;  // from one n block to the next
  AlignedBuffer<float> acc(static_cast<size_t>(nblocks * cstride));
  const int64_t kc = slice_k(m1 - m0, g.K);
  // fp8: each slice of a weight-row pair dequantized to bf16 tiles, for all the x blocks.
  const int64_t wtiles_size = fp8 ? 2 * (kc / kStepK) * kTileElems : 0;
  AlignedBuffer<uint16_t> wtiles(static_cast<size_t>(wtiles_size));
  // Block i's first weight row at k0 (bf16).
  auto rows_at = [&](int64_t i, int64_t k0) {
    const int64_t n = n0 + i * 16;
    return (n < n16 ? wbase + n * g.w.ld : pad.data()) + k0;
  };
  configure_tiles();
  for (int64_t k0 = 0; k0 < k32; k0 += kc) {
    const int64_t s0 = k0 / kStepK, ns = std::min(kc, k32 - k0) / kStepK;
    const bool fresh = k0 == 0;
    for (int64_t i = 0; i < nblocks;) {
      const int nt = i + 2 <= nblocks ? 2 : 1;
      const uint16_t* w0 = rows_at(i, k0);
      const uint16_t* w1 = nt == 2 ? rows_at(i + 1, k0) : nullptr;
      int64_t lda = ldw, wstep = kStepK;
      if (fp8) {
        const int64_t rows = std::min<int64_t>(nt * 16, nt_end - (n0 + i * 16));
        if (rows < nt * 16) std::fill(wtiles.data(), wtiles.data() + wtiles_size, uint16_t{0});
        dequant_fp8_tiles(g.w, n0 + i * 16, static_cast<int>(rows), k0, ns, wtiles.data());
        w0 = wtiles.data();
        w1 = w0 + ns * kTileElems;
        lda = 64;
        wstep = kTileElems;
      }
      for (int64_t b = 0; b < mblocks;) {
        const int mt = b + 2 <= mblocks ? 2 : 1;
        const uint32_t* b0 = xp + b * block_dwords + s0 * kTileDwords;
        float* c = acc.data() + i * cstride + b * kTileDwords;
        if (nt == 2 && mt == 2) {
          tiles_2x2(w0, w1, lda, wstep, b0, b0 + block_dwords, ns, c, cstride, fresh);
        } else if (nt == 2) {
          tiles_2x1(w0, w1, lda, wstep, b0, ns, c, cstride, fresh);
        } else if (mt == 2) {
          tiles_1x2(w0, lda, wstep, b0, b0 + block_dwords, ns, c, fresh);
        } else {
          tiles_1x1(w0, lda, wstep, b0, ns, c, fresh);
        }
        b += mt;
      }
      i += nt;
    }
  }
  _tile_release();
  for (int64_t i = 0; i < nblocks; ++i) {
    const int nc = static_cast<int>(std::min<int64_t>(16, nt_end - (n0 + i * 16)));
    for (int64_t b = 0; b < mblocks; ++b) {
      const int64_t m = m0 + b * 16;
      const int mr = static_cast<int>(std::min<int64_t>(16, m1 - m));
      store_tile(acc.data() + i * cstride + b * kTileDwords, g.y + m * g.ldy + n0 + i * 16, g.ldy, mr, nc,
                 !g.accumulate);
    }
  }
  // The k past the last multiple of 32 (added), and weight rows past the tiles' (whole).
  if (k32 < g.K) {
    Gemm tail = g;
    tail.x = g.x + k32;
    tail.w.data = wbase + k32;  // bf16 (fp8 has no tail here)
    tail.K = g.K - k32;
    tail.accumulate = true;
    tail.x_vnni = nullptr;
    dot(tail, m0, m1, n0, nt_end);
  }
  if (nt_end < n1) dot(g, m0, m1, nt_end, n1);
}

}  // namespace

void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  gemm_nt_tiles<false>(g, m0, m1, n0, n1);
}

void gemm_nt_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  gemm_nt_tiles<true>(g, m0, m1, n0, n1);
}

}  // namespace em::cpu::amx
#endif  // EM_X86
