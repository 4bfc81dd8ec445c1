// The six AMX tile instructions matmul_amx.cpp uses, in portable C++, for the emulated test
// build (CMake -DEM_EMULATE_AVX512=ON, scripts/avx512-emulated.sh): machines without AMX then
// run the AMX kernels' logic (tiling, operand layout, packing, edges, write-back) through the
// ordinary tests. Written after Intel's pseudo-code for palette 1; each thread has its own
// tiles, as on hardware. Included by matmul_amx.cpp only, in that build only; never shipped.
//
// What it checks: that the kernels feed the tile unit the layout it defines (A row-major
// bf16, B in pairs of k, C fp32) and write back the right elements. What it cannot: the
// instructions' exact rounding (TDPBF16PS flushes denormals and may fuse differently; the
// tests' bf16 tolerances cover both) or code generation and speed, which only AMX hardware shows.
#pragma once

#include <cstdint>
#include <cstring>

namespace em_amx_emulation {

struct Tiles {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};

inline Tiles& tiles() {
  thread_local Tiles t;
  return t;
}

inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline Tiles& configured() {
  Tiles& t = tiles();
  if (!t.configured) __builtin_trap();  // hardware: #UD
  return t;
}

inline void loadconfig(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  if (c[0] != 1) __builtin_trap();  // only palette 1 exists
  Tiles& t = tiles();
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&t.colsb[i], c + 16 + 2 * i, 2);
    t.rows[i] = c[48 + i];
    if (t.rows[i] > 16 || t.colsb[i] > 64) __builtin_trap();  // hardware: #GP
  }
  std::memset(t.data, 0, sizeof(t.data));
  t.configured = true;
}

inline void release() { tiles() = Tiles{}; }

inline void zero(int t) { std::memset(configured().data[t], 0, sizeof(Tiles::data[0])); }

inline void loadd(int t, const void* base, int64_t stride) {
  Tiles& s = configured();
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(s.data[t][r], static_cast<const char*>(base) + r * stride, s.colsb[t]);
}

inline void stored(int t, void* base, int64_t stride) {
  Tiles& s = configured();
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(static_cast<char*>(base) + r * stride, s.data[t][r], s.colsb[t]);
}

// C[m][n] += sum over k pairs of A[m][2k] B[k][2n] + A[m][2k + 1] B[k][2n + 1] (bf16 -> fp32).
inline void dpbf16ps(int dst, int a, int b) {
  Tiles& s = configured();
  const int M = s.rows[dst], N = s.colsb[dst] / 4, K = s.colsb[a] / 4;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc;
      std::memcpy(&acc, s.data[dst][m] + 4 * n, 4);
      for (int k = 0; k < K; ++k) {
        uint16_t a0, a1, b0, b1;
        std::memcpy(&a0, s.data[a][m] + 4 * k, 2);
        std::memcpy(&a1, s.data[a][m] + 4 * k + 2, 2);
        std::memcpy(&b0, s.data[b][k] + 4 * n, 2);
        std::memcpy(&b1, s.data[b][k] + 4 * n + 2, 2);
        acc += bf16_value(a0) * bf16_value(b0);
        acc += bf16_value(a1) * bf16_value(b1);
      }
      std::memcpy(s.data[dst][m] + 4 * n, &acc, 4);
    }
  }
}

}  // namespace em_amx_emulation

// <immintrin.h> defines these as inline asm; the emulation replaces them.
#undef _tile_loadconfig
#undef _tile_release
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) em_amx_emulation::loadconfig(config)
#define _tile_release() em_amx_emulation::release()
#define _tile_zero(t) em_amx_emulation::zero(t)
#define _tile_loadd(t, base, stride) em_amx_emulation::loadd(t, base, stride)
#define _tile_stored(t, base, stride) em_amx_emulation::stored(t, base, stride)
#define _tile_dpbf16ps(dst, a, b) em_amx_emulation::dpbf16ps(dst, a, b)
