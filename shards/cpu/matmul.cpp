// Matmul family: weight views, the scalar GEMM kernels, the parallel GEMM drivers, and
// the matmul op. The AVX2 / AVX-512 tile kernels live in matmul_avx2.cpp / matmul_avx512.cpp.
#include <algorithm>
#include <cstring>
#include <memory>

#include "cpu.h"
#include "dtype.h"

namespace em::cpu {

Weight weight_view(const em_tensor& t) {
  Weight w;
  w.data = t.data;
  w.dtype = t.dtype;
  if (t.ndim == 1) {
    w.rows = 1;
    w.cols = t.shape[0];
    w.ld = t.shape[0];
  } else {
    w.rows = t.shape[0];
    w.cols = t.shape[1];
    w.ld = t.stride[0];
  }
  w.scale = t.scale;
  w.scale_ld = t.scale_stride;
  return w;
}

Weight Weight::row_slice(int64_t r0, int64_t n) const {
  Weight s = *this;
  s.data = static_cast<const char*>(data) + r0 * ld * static_cast<int64_t>(em_dtype_size(dtype));
  s.rows = n;
  if (dtype == EM_F8_E4M3) {
    s.scale = scale_row(r0);
    s.scale_row0 = (scale_row0 + r0) % EM_FP8_BLOCK;
  }
  return s;
}

namespace {
// Exact fp8 e4m3 -> f32 table.
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i) v[i] = fp8_e4m3_to_f32(static_cast<uint8_t>(i));
  }
};
const Fp8Table& fp8_table() {
  static const Fp8Table table;
  return table;
}
}  // namespace

void Weight::row_to_f32(int64_t r, int64_t c0, int64_t n, float* out) const {
  switch (dtype) {
    case EM_F32: {
      std::memcpy(out, static_cast<const float*>(data) + r * ld + c0, static_cast<size_t>(n) * 4);
      return;
    }
    case EM_BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(data) + r * ld + c0;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      return;
    }
    case EM_F16: {
      const uint16_t* p = static_cast<const uint16_t*>(data) + r * ld + c0;
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      return;
    }
    case EM_F8_E4M3: {
      const uint8_t* p = static_cast<const uint8_t*>(data) + r * ld + c0;
      const float* srow = scale_row(r);
      const float* lut = fp8_table().v;
      for (int64_t i = 0; i < n; ++i) out[i] = lut[p[i]] * srow[(c0 + i) / EM_FP8_BLOCK];
      return;
    }
    default:
      std::memset(out, 0, static_cast<size_t>(n) * 4);
  }
}

// ------------------------------------------------------------ scalar kernels

namespace scalar {

namespace {

constexpr int64_t kChunk = 256;  // weight elements converted at a time

// Eight independent partial sums: compilers vectorize this without -ffast-math.
float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[k + j] * b[k + j];
  float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

}  // namespace

void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  float wrow[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = m0; m < m1; ++m) {
      if (!g.accumulate) g.y[m * g.ldy + n] = 0.0f;
    }
    for (int64_t k0 = 0; k0 < g.K; k0 += kChunk) {
      const int64_t kn = std::min(kChunk, g.K - k0);
      g.w.row_to_f32(n, k0, kn, wrow);
      for (int64_t m = m0; m < m1; ++m) g.y[m * g.ldy + n] += dot(g.x + m * g.ldx + k0, wrow, kn);
    }
  }
}

void gemm_nn(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  float wrow[kChunk];
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t cn = std::min(kChunk, n1 - c0);
    if (!g.accumulate) {
      for (int64_t m = m0; m < m1; ++m) std::memset(g.y + m * g.ldy + c0, 0, static_cast<size_t>(cn) * 4);
    }
    for (int64_t k = 0; k < g.K; ++k) {
      g.w.row_to_f32(k, c0, cn, wrow);
      for (int64_t m = m0; m < m1; ++m) {
        const float xv = g.x[m * g.ldx + k];
        float* yr = g.y + m * g.ldy + c0;
        for (int64_t c = 0; c < cn; ++c) yr[c] += xv * wrow[c];
      }
    }
  }
}

}  // namespace scalar

// ------------------------------------------------------------ parallel drivers

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits y into (row block, column block) work items: enough items for the threads,
// each large enough that a weight block is streamed once for all its rows.
struct TilePlan {
  int64_t mb, nb, m_blocks, n_blocks;
};

TilePlan plan_tiles(int64_t M, int64_t N, int threads, int64_t nb_max, int64_t nb_min) {
  TilePlan p;
  p.mb = M <= 512 ? M : 256;
  p.m_blocks = ceil_div(M, p.mb);
  p.nb = nb_max;
  while (p.nb > nb_min && p.m_blocks * ceil_div(N, p.nb) < 4 * static_cast<int64_t>(threads)) p.nb /= 2;
  p.n_blocks = ceil_div(N, p.nb);
  return p;
}

void run_tiles(Context& ctx, const Gemm& g, GemmTileFn tile, const TilePlan& p) {
  ctx.pool.parallel_for(p.m_blocks * p.n_blocks, [&](int64_t item, int) {
    const int64_t mi = item % p.m_blocks, ni = item / p.m_blocks;
    const int64_t m0 = mi * p.mb, n0 = ni * p.nb;
    tile(g, m0, std::min(g.M, m0 + p.mb), n0, std::min(g.N, n0 + p.nb));
  });
}

}  // namespace

void gemm_nt(Context& ctx, const Gemm& g) {
  if (g.M == 0 || g.N == 0) return;
  const TilePlan plan = plan_tiles(g.M, g.N, ctx.pool.num_threads(), 64, 16);
  if (ctx.isa == EM_ISA_AMX && amx::wants(g, ctx.invariant)) {
    // x packed once for every tile (row blocks start at multiples of 16: plan.mb is M or 256).
    AlignedBuffer<uint32_t> xp(static_cast<size_t>(amx::packed_x_size(g.M, g.K)));
    pack_x_amx(ctx, g.x, g.ldx, g.M, g.K, xp.data());
    Gemm packed = g;
    packed.x_vnni = xp.data();
    return run_tiles(ctx, packed, ctx.k->gemm_nt, plan);
  }
  if (const PackedRows rows = pack_rows(ctx, g.x, g.ldx, g.M, g.K, g.w.dtype == EM_BF16); !rows.empty()) {
    Gemm packed = g;
    rows.attach(packed, 0);
    return run_tiles(ctx, packed, ctx.k->gemm_nt, plan);
  }
  run_tiles(ctx, g, ctx.k->gemm_nt, plan);
}

namespace {

// The buffers for M packed rows of K, in the form isa's kernel for bf16 weights reads.
PackedRows packed_rows_for(em_cpu_isa isa, int64_t M, int64_t K, bool to_bf16, bool to_deint) {
  PackedRows out;
  to_bf16 = to_bf16 && isa == EM_ISA_AVX512_BF16;
  to_deint = to_deint && isa == EM_ISA_AVX512;
  if (!(to_bf16 || to_deint) || K < 32) return out;
  out.ld = (K + 31) & ~int64_t{31};
  if (to_bf16) out.bf16 = std::make_unique<AlignedBuffer<uint16_t>>(static_cast<size_t>(M * out.ld));
  if (to_deint) out.deint = std::make_unique<AlignedBuffer<float>>(static_cast<size_t>(M * out.ld));
  return out;
}

void pack_rows_range(const PackedRows& out, const float* x, int64_t ldx, int64_t m0, int64_t n, int64_t K) {
  if (out.bf16) avx512::pack_x_bf16(x + m0 * ldx, ldx, n, K, out.bf16->data() + m0 * out.ld, out.ld);
  if (out.deint) avx512::pack_x_deint(x + m0 * ldx, ldx, n, K, out.deint->data() + m0 * out.ld, out.ld);
}

}  // namespace

PackedRows pack_rows(Context& ctx, const float* x, int64_t ldx, int64_t M, int64_t K, bool bf16_weights) {
  if (!bf16_weights) return {};
  PackedRows out = packed_rows_for(ctx.isa, M, K, avx512::wants_x_bf16(M, K), avx512::wants_x_deint(M, K));
  if (out.empty()) return out;
  constexpr int64_t kRowsPerItem = 16;
  ctx.pool.parallel_for(ceil_div(M, kRowsPerItem), [&](int64_t item, int) {
    const int64_t m0 = item * kRowsPerItem;
    pack_rows_range(out, x, ldx, m0, std::min(kRowsPerItem, M - m0), K);
  });
  return out;
}

PackedRows pack_rows_here(em_cpu_isa isa, const float* x, int64_t ldx, int64_t M, int64_t K, bool bf16_weights) {
  if (!bf16_weights) return {};
  PackedRows out = packed_rows_for(isa, M, K, true, true);
  if (!out.empty()) pack_rows_range(out, x, ldx, 0, M, K);
  return out;
}

void pack_x_amx(Context& ctx, const float* x, int64_t ldx, int64_t M, int64_t K, uint32_t* out) {
  constexpr int64_t kRowsPerItem = 64;
  const int64_t block = amx::packed_x_size(16, K);
  ctx.pool.parallel_for(ceil_div(M, kRowsPerItem), [&](int64_t item, int) {
    const int64_t m0 = item * kRowsPerItem;
    amx::pack_x(x + m0 * ldx, ldx, std::min(kRowsPerItem, M - m0), K, out + (m0 / 16) * block);
  });
}

void gemm_nt_f32(Context& ctx, const Gemm& g) {
  if (g.M == 0 || g.N == 0) return;
  // The AVX512_BF16 and AMX kernels round x to bf16 for bf16 weights; the plain AVX-512 one does not.
  const GemmTileFn tile = ctx.isa >= EM_ISA_AVX512_BF16 ? kernels_for(EM_ISA_AVX512, ctx.invariant).gemm_nt : ctx.k->gemm_nt;
  run_tiles(ctx, g, tile, plan_tiles(g.M, g.N, ctx.pool.num_threads(), 64, 16));
}

void gemm_nn(Context& ctx, const Gemm& g) {
  if (g.M == 0 || g.N == 0) return;
  run_tiles(ctx, g, ctx.k->gemm_nn, plan_tiles(g.M, g.N, ctx.pool.num_threads(), 256, 16));
}

// ------------------------------------------------------------ op

em_status matmul(Context& ctx, const em_tensor* x, const em_tensor* w, em_tensor* y) {
  Gemm g;
  g.x = static_cast<const float*>(x->data);
  g.ldx = x->stride[0];
  g.w = weight_view(*w);
  g.y = static_cast<float*>(y->data);
  g.ldy = y->stride[0];
  g.M = x->shape[0];
  g.K = x->shape[1];
  g.N = w->shape[0];
  gemm_nt(ctx, g);
  return EM_OK;
}

}  // namespace em::cpu
