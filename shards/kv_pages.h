// Reading rows of a paged latent cache (em_kv_pages): shared by the CPU attention kernel,
// which reads the blocks in place, and the dispatcher, which gathers them into contiguous
// caches for backends that do not read pages themselves.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu/dtype.h"
#include "expertmesh/ops.h"

namespace em {

// Latent scales per fp8 row: one f32 per 128 latent elements.
inline int64_t kv_fp8_scales(int64_t C) { return (C + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK; }

// Bytes of one row (em_kv_row_bytes); 0 for a dtype pages cannot hold.
inline size_t kv_row_bytes(em_dtype dtype, int64_t C, int64_t dr) {
  switch (dtype) {
    case EM_F32: return static_cast<size_t>(4 * (C + dr));
    case EM_BF16: return static_cast<size_t>(2 * (C + dr));
    case EM_F8_E4M3: return static_cast<size_t>(C + 4 * kv_fp8_scales(C) + 2 * dr);
    default: return 0;
  }
}

// Row r of sequence s (its r-th position), as bytes.
inline const uint8_t* kv_row(const em_kv_pages& p, int32_t s, int64_t r, size_t row_bytes) {
  const int32_t block = p.block_table[p.table_offsets[s] + r / p.block_size];
  return static_cast<const uint8_t*>(p.pool) +
         (static_cast<size_t>(block) * static_cast<size_t>(p.block_size) + static_cast<size_t>(r % p.block_size)) *
             row_bytes;
}

// Widens n e4m3 codes times `scale` into y (the CPU backend passes its ISA's kernel).
using Fp8Widen = void (*)(const uint8_t* codes, int64_t n, float scale, float* y);

// The portable widening: a code's magnitude bits shifted into a float's exponent and
// mantissa fields are its value times 2^-120, exactly (subnormals too); 0x7f/0xff are NaN.
inline void fp8_widen_portable(const uint8_t* codes, int64_t n, float scale, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t code = codes[i];
    const uint32_t nan = 0u - static_cast<uint32_t>((code & 0x7fu) == 0x7fu);
    const uint32_t bits = ((code & 0x80u) << 24) | ((code & 0x7fu) << 20) | (nan & 0x7fc00000u);
    float f;
    std::memcpy(&f, &bits, 4);
    y[i] = (f * 0x1p120f) * scale;
  }
}

// Decodes n consecutive fp8 rows (C codes | scales | dr bf16) into f32 rows [n, C + dr].
inline void kv_fp8_rows_to_f32(const uint8_t* rows, int64_t n, int64_t C, int64_t dr, float* out,
                               Fp8Widen widen = fp8_widen_portable) {
  const int64_t ns = kv_fp8_scales(C);
  const size_t rb = kv_row_bytes(EM_F8_E4M3, C, dr);
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = rows + static_cast<size_t>(r) * rb;
    float* o = out + r * (C + dr);
    for (int64_t b = 0; b < ns; ++b) {
      float scale;
      std::memcpy(&scale, row + C + 4 * b, 4);
      const int64_t c0 = b * EM_FP8_BLOCK, c1 = c0 + EM_FP8_BLOCK < C ? c0 + EM_FP8_BLOCK : C;
      widen(row + c0, c1 - c0, scale, o + c0);
    }
    const uint8_t* pe = row + C + 4 * ns;
    for (int64_t i = 0; i < dr; ++i) {
      uint16_t h;
      std::memcpy(&h, pe + 2 * i, 2);
      o[C + i] = cpu::bf16_to_f32(h);
    }
  }
}

// float32 -> e4m3, rounding to nearest even, saturating at 448, NaN -> 0x7f (kv-format.ts's
// float32ToE4m3, bit for bit).
inline uint8_t f32_to_e4m3(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t sign = (bits >> 24) & 0x80u, abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return 0x7f;
  if (abs >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);
  if (abs < 0x3c800000u) {  // below 2^-6: a multiple of 2^-9
    const double q = std::fabs(static_cast<double>(x)) * 512.0, f = std::floor(q), d = q - f;
    const double m = d > 0.5 ? f + 1 : d < 0.5 ? f : (std::fmod(f, 2.0) == 0.0 ? f : f + 1);
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(m));
  }
  const uint32_t kept = (abs >> 20) & 0x7u, dropped = abs & 0xfffffu;
  uint32_t code = (((abs >> 23) - 120u) << 3) | kept;
  if (dropped > 0x80000u || (dropped == 0x80000u && (kept & 1u))) ++code;
  return static_cast<uint8_t>(sign | (code < 0x7eu ? code : 0x7eu));
}

// out[i] = f32_to_e4m3(float(double(x[i]) * inv)): the reference of cpu's f32_to_fp8 kernels.
inline void fp8_quantize_portable(const float* x, int64_t n, double inv, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_e4m3(static_cast<float>(static_cast<double>(x[i]) * inv));
}
// max |x| (NaNs skipped, 0 for n = 0): the reference of cpu's abs_max kernels.
inline float abs_max_portable(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::fabs(x[i]) > m ? std::fabs(x[i]) : m;
  return m;
}

using Fp8QuantizeFn = void (*)(const float* x, int64_t n, double inv, uint8_t* out);
using AbsMaxFn = float (*)(const float* x, int64_t n);

// Writes n float32 rows [n, C + dr] as `dtype` rows (f32, bf16 or fp8) into `out`, as
// kv-format.ts's encodeKvRows does, bit for bit: fp8 scales are amax / 448 per 128 latent
// values (1 for an all-zero block), values scaled in double and rounded to float first.
// quantize / abs_max: a CPU ISA's kernels (cpu::Kernels), the portable loops by default.
inline void kv_encode_rows(em_dtype dtype, int64_t C, int64_t dr, const float* rows, int64_t n, uint8_t* out,
                           Fp8QuantizeFn quantize = fp8_quantize_portable, AbsMaxFn abs_max = abs_max_portable) {
  const int64_t W = C + dr;
  if (dtype == EM_F32) {
    std::memcpy(out, rows, static_cast<size_t>(n * W) * 4);
    return;
  }
  if (dtype == EM_BF16) {
    for (int64_t i = 0; i < n * W; ++i) {
      const uint16_t h = cpu::f32_to_bf16(rows[i]);
      std::memcpy(out + 2 * i, &h, 2);
    }
    return;
  }
  const int64_t ns = kv_fp8_scales(C);
  const size_t rb = kv_row_bytes(EM_F8_E4M3, C, dr);
  for (int64_t r = 0; r < n; ++r) {
    const float* x = rows + r * W;
    uint8_t* o = out + static_cast<size_t>(r) * rb;
    for (int64_t b = 0; b < ns; ++b) {
      const int64_t c0 = b * EM_FP8_BLOCK, c1 = c0 + EM_FP8_BLOCK < C ? c0 + EM_FP8_BLOCK : C;
      const float amax = abs_max(x + c0, c1 - c0);
      const float scale = amax > 0.0f && std::isfinite(amax) ? static_cast<float>(static_cast<double>(amax) / 448.0) : 1.0f;
      std::memcpy(o + C + 4 * b, &scale, 4);
      quantize(x + c0, c1 - c0, 1.0 / static_cast<double>(scale), o + c0);
    }
    uint8_t* pe = o + C + 4 * ns;
    for (int64_t i = 0; i < dr; ++i) {
      const uint16_t h = cpu::f32_to_bf16(x[C + i]);
      std::memcpy(pe + 2 * i, &h, 2);
    }
  }
}

}  // namespace em
