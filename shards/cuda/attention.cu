// MLA attention in DeepSeek's absorbed form over the compressed latent cache (the CPU
// backend's cpu/attention.cpp is the reference; ops.h em_mla_args is the contract):
//   q_lat[t, h] = q_nope[t, h] W_uk[h]                  W_uk[h] = wkv_b rows h*(dn+dv) .. +dn  [dn, C]
//   score[s]    = ([q_lat | q_pe] . cache[s]) * softmax_scale   for cache rows s <= positions[t]
//   o_lat[t, h] = softmax(score) @ latent                          (latent = cache[:, :C])
//   out[t, h]   = W_uv[h] o_lat[t, h]                  W_uv[h] = wkv_b rows h*(dn+dv)+dn .. +dv [dv, C]
//
// Steps (one stream, one Op):
//   1. prep: q_pe into qcat[t*H + h, C:], q_nope in the weight's GEMM dtype (bf16/f16) if needed.
//   2. absorb-in: one cuBLAS strided-batched GEMM over heads writes q_lat into qcat[:, :C].
//   3. attention over the cache, flash-decoding style. Query rows (t, h) of one sequence are
//      packed into groups (<= 64 rows: heads of one token, or several tokens x all heads);
//      a group's visible cache rows [0, max pos + 1) are cut into chunks ("items"), one
//      thread block per item, so that a long decode cache is streamed once per group by
//      many SMs. Each block keeps an online softmax (running max m, sum l, unnormalized
//      o[C]) per query row, with the causal mask per row (row s visible iff s <= pos[t]).
//      A group with one item writes o_lat directly; otherwise its items write partials
//      (m, l, o) and a combine kernel merges them. Softmax runs in the log2 domain
//      (scores * softmax_scale * log2 e, exp2), the same math as exp.
//      - tensor-core kernel (bf16 caches with C = 512, dr = 64: DeepSeek V2/V3): 64 query
//        rows per block, 32-row cache tiles double-buffered with cp.async, S = Q K^T and
//        O += P V on mma.sync m16n8k16 bf16 (fp32 accumulation). q and P are rounded to
//        bf16 (as FlashAttention / FlashMLA do).
//      - fp32 SIMT kernel (any dims, f32 or bf16 caches, and the fallback): 8 query rows per
//        block, everything in fp32 as the CPU backend.
//   4. absorb-out: one cuBLAS strided-batched GEMM over heads, o_lat -> out (f32, strided).
//
// Weights: f32 runs fp32 GEMMs (no TF32); bf16/f16 run tensor-core GEMMs with q_nope and
// o_lat rounded to the weight dtype (as matmul does); fp8 is dequantized to bf16 scratch with
// its block scales (as DeepSeek's reference weight_dequant does for the absorbed path).
// Paged caches (em_kv_pages) reach this backend only with their pool in this device's memory
// (reads_pages in cuda_backend.cu: the addon's mirror of a gateway's KV pool): each
// sequence's visible rows are first gathered on the device into contiguous caches (bf16
// stays bf16, fp8 widens to f32, as the dispatcher's host gather does), then the steps above.
// $EM_CUDA_MLA=simt forces the fp32 SIMT kernel (debugging and benchmarks), =simt16 with
// 16-row tiles (what GPUs with 99 KB of shared memory per block run), =tc1 the first
// tensor-core kernel (32-bit fragment loads, one accumulation chain; for comparison).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "common.cuh"
#include "wgmma.cuh"

namespace em::cuda {

namespace {

// A group of query rows of one sequence: row r is token t0 + r / nh, head h0 + r % nh.
struct MlaGroup {
  int32_t seq, t0, h0, nh, nrows;
  int32_t visible;  // cache rows [0, visible) some row of the group sees: max pos + 1
  int32_t item_begin, item_end;
};

// One thread block: cache rows [row_begin, row_end) of a group. part_base < 0: the group's
// only item, which writes o_lat itself; else its partial rows are part_base + r.
struct MlaItem {
  int32_t group, row_begin, row_end, part_base;
};

struct MlaCache {
  const void* data;
  int64_t ld;  // elements per cache row
};

struct MlaParams {
  const float* qcat;  // [T * H, D] f32: [q_lat | q_pe], row t * H + h
  int32_t H, C, D;    // D = C + dr
  float scale_log2;   // softmax_scale * log2(e)
  const int32_t* positions;
  const MlaGroup* groups;
  const MlaItem* items;
  const MlaCache* caches;
  float* part_o;   // [partial rows, C] unnormalized
  float* part_ml;  // [partial rows, 2] running max (log2 domain) and sum
  void* o_lat;     // [T * H, C] in o_dt
  em_dtype o_dt;
};

__device__ __forceinline__ int32_t group_token(const MlaGroup& g, int r) { return g.t0 + r / g.nh; }
__device__ __forceinline__ int32_t group_head(const MlaGroup& g, int r) { return g.h0 + r % g.nh; }

// ------------------------------------------------------------------ step 1: prep

// One block per (t, h) row: q_pe into qcat[row, C:], q_nope as xq[row, :dn] in xdt (if xq).
__global__ void mla_prep_kernel(const float* q, int64_t q_tok, int64_t q_head, int64_t H, int dn, int dr, int C,
                                float* qcat, void* xq, em_dtype xdt) {
  const int64_t row = blockIdx.x;
  const int64_t t = row / H, h = row - t * H;
  const float* src = q + t * q_tok + h * q_head;
  const int64_t D = C + dr;
  for (int c = threadIdx.x; c < dr; c += blockDim.x) qcat[row * D + C + c] = src[dn + c];
  if (xq != nullptr)
    for (int c = threadIdx.x; c < dn; c += blockDim.x) store_f32(xq, xdt, row * dn + c, src[c]);
}

// fp8 (block-scaled) weight [rows, cols] -> contiguous bf16.
__global__ void mla_dequant_kernel(const void* w, int64_t ld, const float* scale, int64_t scale_ld, int64_t rows,
                                   int64_t cols, uint16_t* dst) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[i] = f32_to_bf16_bits(load_f32(w, EM_F8_E4M3, ld, r, c, scale, scale_ld));
  }
}

// ------------------------------------------------------------------ step 3a: fp32 SIMT kernel

constexpr int kSimtQG = 8;  // query rows per block: one warp each
constexpr int kSimtThreads = kSimtQG * 32;
// Cache rows per tile (BN), one lane each for the scores: 32, or 16 (lanes 16-31 idle for the
// scores) where 32 rows do not fit the block's shared memory: DeepSeek's C 512 + dr 64 need
// 110 KB at 32, 72 KB at 16, and sm_86/sm_89 parts (A10, L4, L40S) allow 99 KB.
constexpr int kSimtBNs[] = {32, 16};

__host__ __device__ inline int simt_ks(int D) { return D | 1; }  // odd row stride: no bank conflicts

size_t simt_smem_bytes(int C, int D, int BN) {
  return sizeof(float) * (static_cast<size_t>(kSimtQG) * D + static_cast<size_t>(BN) * simt_ks(D) + kSimtQG * BN +
                          static_cast<size_t>(kSimtQG) * C + 2 * kSimtQG) +
         sizeof(int) * kSimtQG;
}

__device__ __forceinline__ float cache_f32(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float cache_f32(const uint16_t* p, int64_t i) { return bf16_bits_to_f32(p[i]); }

template <typename CT, int BN>
__global__ void __launch_bounds__(kSimtThreads) mla_simt_kernel(MlaParams p, int32_t item_first) {
  static_assert(BN >= 1 && BN <= 32, "one lane per cache row of a tile");
  extern __shared__ __align__(16) float fsm[];
  const int D = p.D, C = p.C, KS = simt_ks(D);
  float* Qs = fsm;                     // [QG][D]
  float* Ks = Qs + kSimtQG * D;        // [BN][KS]
  float* Ps = Ks + BN * KS;            // [QG][BN]
  float* Os = Ps + kSimtQG * BN;       // [QG][C]
  float* As = Os + kSimtQG * C;        // [QG] alpha of the tile, then l
  float* Ms = As + kSimtQG;            // [QG] (unused slot kept for alignment of vis)
  int* vis = reinterpret_cast<int*>(Ms + kSimtQG);  // [QG] min(pos + 1, row_end); 0 for padding rows

  const MlaItem it = p.items[item_first + blockIdx.x];
  const MlaGroup g = p.groups[it.group];
  const MlaCache cache = p.caches[g.seq];
  const CT* cdata = static_cast<const CT*>(cache.data);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int e = tid; e < kSimtQG * D; e += kSimtThreads) {
    const int r = e / D, c = e - r * D;
    float v = 0.0f;
    if (r < g.nrows) v = p.qcat[(static_cast<int64_t>(group_token(g, r)) * p.H + group_head(g, r)) * D + c];
    Qs[e] = v;
  }
  for (int e = tid; e < kSimtQG * C; e += kSimtThreads) Os[e] = 0.0f;
  if (tid < kSimtQG) vis[tid] = tid < g.nrows ? min(p.positions[group_token(g, tid)] + 1, it.row_end) : 0;

  float m = -INFINITY, l = 0.0f;  // of query row `warp` (every lane holds them)
  for (int j0 = it.row_begin; j0 < it.row_end; j0 += BN) {
    const int n_rows = min(BN, it.row_end - j0);
    __syncthreads();  // the previous tile is consumed (first pass: Qs, Os, vis are written)
    for (int e = tid; e < BN * D; e += kSimtThreads) {
      const int r = e / D, c = e - r * D;
      Ks[r * KS + c] = r < n_rows ? cache_f32(cdata, static_cast<int64_t>(j0 + r) * cache.ld + c) : 0.0f;
    }
    __syncthreads();
    {
      const int r = warp, n = lane;  // lanes n >= BN hold no cache row: score -inf, weight 0
      float s = -INFINITY;
      if (n < BN) {
        const float* qr = Qs + r * D;
        const float* kr = Ks + n * KS;
        float dot = 0.0f;
        for (int k = 0; k < D; ++k) dot = fmaf(qr[k], kr[k], dot);
        if (j0 + n < vis[r]) s = dot * p.scale_log2;
      }
      float mx = s;
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m, mx), m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m - m_use), pv = exp2f(s - m_use);
      float sum = pv;
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l = l * alpha + sum;
      m = m_new;
      if (n < BN) Ps[r * BN + n] = pv;
      if (lane == 0) As[r] = alpha;
    }
    __syncthreads();
    for (int e = tid; e < kSimtQG * C; e += kSimtThreads) {
      const int r = e / C, c = e - r * C;
      const float* pr = Ps + r * BN;
      float acc = Os[e] * As[r];
      for (int n = 0; n < n_rows; ++n) acc = fmaf(pr[n], Ks[n * KS + c], acc);
      Os[e] = acc;
    }
  }
  __syncthreads();
  if (lane == 0) As[warp] = l;
  __syncthreads();
  for (int e = tid; e < kSimtQG * C; e += kSimtThreads) {
    const int r = e / C, c = e - r * C;
    if (r >= g.nrows) continue;
    if (it.part_base < 0) {
      const int64_t row = static_cast<int64_t>(group_token(g, r)) * p.H + group_head(g, r);
      store_f32(p.o_lat, p.o_dt, row * C + c, Os[e] / As[r]);
    } else {
      p.part_o[static_cast<int64_t>(it.part_base + r) * C + c] = Os[e];
    }
  }
  if (it.part_base >= 0 && lane == 0 && warp < g.nrows) {
    p.part_ml[static_cast<int64_t>(it.part_base + warp) * 2] = m;
    p.part_ml[static_cast<int64_t>(it.part_base + warp) * 2 + 1] = l;
  }
}

// ------------------------------------------------------------------ step 3b: tensor-core kernel

constexpr int kTcC = 512, kTcDr = 64, kTcD = kTcC + kTcDr;
constexpr int kTcQG = 64;         // query rows per block: 4 row blocks of 16
constexpr int kTcBN = 32;         // cache rows per tile
constexpr int kTcLd = kTcD + 8;   // bf16 row stride of Q and cache tiles in shared memory (1168 B)
constexpr int kTcSS = kTcBN + 4;  // f32 row stride of the score tile
constexpr int kTcThreads = 256;   // 8 warps: row block (warp & 3) x half of the C columns (warp >> 2)
constexpr size_t kTcSmem = sizeof(uint16_t) * (kTcQG + 2 * kTcBN) * kTcLd + sizeof(float) * kTcQG * kTcSS +
                           sizeof(int) * kTcQG;
static_assert((kTcLd * 2) % 16 == 0, "tile rows must stay 16-byte aligned for cp.async / ldmatrix");
static_assert((kTcBN * (kTcD / 8)) % kTcThreads == 0, "tile loads split evenly");

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint32_t ld_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(f32_to_bf16_bits(lo)) | (static_cast<uint32_t>(f32_to_bf16_bits(hi)) << 16);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define EM_MLA_TC 1
__device__ __forceinline__ void cp_async16(void* s, const void* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(s)), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// d += a (16x16 bf16, row) * b (16x8 bf16, col), fp32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p))
               : "memory");
}
#endif

// Fragment layouts (PTX mma.m16n8k16, g = lane / 4, q = lane % 4):
//   A regs: {row g, cols 2q..2q+1}, {row g+8, cols 2q..}, {row g, cols 8+2q..}, {row g+8, cols 8+2q..}
//   B regs: {k 2q..2q+1, col g}, {k 8+2q.., col g}
//   C/D:    [0..1] row g, cols 2q..2q+1; [2..3] row g+8, same cols
// so the score accumulators of two adjacent 8-column tiles are the A fragment of P for 16
// cache rows (no shared-memory round trip), and V (= the latent part of the same cache
// tile, [rows, C] row-major) is read as B fragments with ldmatrix.trans.
//
// kLdm (the default; $EM_CUDA_MLA=tc1 runs the first version): S = Q K^T reads its Q and K
// fragments with ldmatrix.x4 (two instructions per k step instead of eight 32-bit loads)
// and accumulates odd and even k steps in separate registers (two dependency chains per
// n tile instead of one, the two halves summed at the end).
template <bool kLdm>
__global__ void __launch_bounds__(kTcThreads, 1) mla_tc_kernel(MlaParams p, int32_t item_first) {
#ifdef EM_MLA_TC
  extern __shared__ __align__(16) unsigned char tsm[];
  uint16_t* Qs = reinterpret_cast<uint16_t*>(tsm);  // [QG][kTcLd] bf16
  uint16_t* Kb = Qs + kTcQG * kTcLd;                 // 2 x [BN][kTcLd] bf16: tile buffers
  float* Ss = reinterpret_cast<float*>(Qs + (kTcQG + 2 * kTcBN) * kTcLd);  // [QG][kTcSS]
  int* vis = reinterpret_cast<int*>(Ss + kTcQG * kTcSS);                // [QG]

  const MlaItem it = p.items[item_first + blockIdx.x];
  const MlaGroup g = p.groups[it.group];
  const MlaCache cache = p.caches[g.seq];
  const uint16_t* cdata = static_cast<const uint16_t*>(cache.data);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rb = warp & 3, ch = warp >> 2, gq = lane >> 2, tq = lane & 3;

  auto load_tile = [&](uint16_t* dst, int j0) {
#pragma unroll
    for (int k = 0; k < kTcBN * (kTcD / 8) / kTcThreads; ++k) {
      const int e = tid + k * kTcThreads;
      const int r = e / (kTcD / 8), c8 = e - r * (kTcD / 8);
      uint16_t* s = dst + r * kTcLd + c8 * 8;
      if (j0 + r < it.row_end)
        cp_async16(s, cdata + static_cast<int64_t>(j0 + r) * cache.ld + c8 * 8);
      else
        *reinterpret_cast<uint4*>(s) = make_uint4(0u, 0u, 0u, 0u);
    }
  };

  const int ntiles = (it.row_end - it.row_begin + kTcBN - 1) / kTcBN;
  load_tile(Kb, it.row_begin);
  cp_async_commit();

  // Q rows (padding rows zero) as bf16, and each row's visible limit within this item.
  for (int e = tid; e < kTcQG * (kTcD / 2); e += kTcThreads) {
    const int r = e / (kTcD / 2), c2 = e - r * (kTcD / 2);
    float2 v = make_float2(0.0f, 0.0f);
    if (r < g.nrows)
      v = *reinterpret_cast<const float2*>(
          p.qcat + (static_cast<int64_t>(group_token(g, r)) * p.H + group_head(g, r)) * kTcD + 2 * c2);
    *reinterpret_cast<uint32_t*>(Qs + r * kTcLd + 2 * c2) = pack_bf16(v.x, v.y);
  }
  if (tid < kTcQG) vis[tid] = tid < g.nrows ? min(p.positions[group_token(g, tid)] + 1, it.row_end) : 0;

  const bool active = rb * 16 < g.nrows;  // warp-uniform
  const int r0 = rb * 16 + gq;              // this thread's rows: r0 and r0 + 8
  float o[32][4];
#pragma unroll
  for (int nt = 0; nt < 32; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  for (int i = 0; i < ntiles; ++i) {
    const int j0 = it.row_begin + i * kTcBN;
    if (i + 1 < ntiles) {
      load_tile(Kb + ((i + 1) & 1) * kTcBN * kTcLd, j0 + kTcBN);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile i (and on the first pass Q, vis) visible to all
    const uint16_t* Kt = Kb + (i & 1) * kTcBN * kTcLd;

    // S[16 rows of rb][16 cache rows of ch] = Q K^T over D = 576.
    if (active) {
      float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      if constexpr (kLdm) {
        // ldmatrix.x4, lane l addresses row (l & 15) of its 16-row block at column k + (l >> 4) * 8
        // for Q (a0..a3 = rows 0-7 / 8-15 x k low / high), and cache row (l >> 4) * 8 + (l & 7)
        // at column k + ((l >> 3) & 1) * 8 for K (b0, b1 of n tile 0, then of n tile 1).
        const uint16_t* qa = Qs + (rb * 16 + (lane & 15)) * kTcLd + (lane >> 4) * 8;
        const uint16_t* kb = Kt + (ch * 16 + (lane >> 4) * 8 + (lane & 7)) * kTcLd + ((lane >> 3) & 1) * 8;
        float s2[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll 6
        for (int k = 0; k < kTcD; k += 32) {
          uint32_t a[4], b[4], a2[4], b2[4];
          ldsm_x4(a[0], a[1], a[2], a[3], qa + k);
          ldsm_x4(b[0], b[1], b[2], b[3], kb + k);
          ldsm_x4(a2[0], a2[1], a2[2], a2[3], qa + k + 16);
          ldsm_x4(b2[0], b2[1], b2[2], b2[3], kb + k + 16);
          mma_bf16(s[0], a, b[0], b[1]);
          mma_bf16(s[1], a, b[2], b[3]);
          mma_bf16(s2[0], a2, b2[0], b2[1]);
          mma_bf16(s2[1], a2, b2[2], b2[3]);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) s[nt][j] += s2[nt][j];
      } else {
        const uint16_t* qa = Qs + r0 * kTcLd + tq * 2;
        const uint16_t* kb = Kt + (ch * 16 + gq) * kTcLd + tq * 2;
#pragma unroll 4
        for (int k = 0; k < kTcD; k += 16) {
          const uint32_t a[4] = {ld_u32(qa + k), ld_u32(qa + 8 * kTcLd + k), ld_u32(qa + k + 8),
                                 ld_u32(qa + 8 * kTcLd + k + 8)};
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const uint16_t* kp = kb + nt * 8 * kTcLd + k;
            mma_bf16(s[nt], a, ld_u32(kp), ld_u32(kp + 8));
          }
        }
      }
      float* srow = Ss + r0 * kTcSS + ch * 16 + tq * 2;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        *reinterpret_cast<float2*>(srow + nt * 8) = make_float2(s[nt][0], s[nt][1]);
        *reinterpret_cast<float2*>(srow + 8 * kTcSS + nt * 8) = make_float2(s[nt][2], s[nt][3]);
      }
    }
    __syncthreads();  // the whole 64 x 32 score tile is written

    if (active) {
      // Online softmax over the 32 columns of rows r0, r0 + 8 (each quad of lanes shares a row).
      const int lim[2] = {vis[r0] - j0, vis[r0 + 8] - j0};
      float pr[2][4][2];
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = j * 8 + tq * 2;
          const float2 v = *reinterpret_cast<const float2*>(Ss + (r0 + 8 * h) * kTcSS + col);
          pr[h][j][0] = col < lim[h] ? v.x * p.scale_log2 : -INFINITY;
          pr[h][j][1] = col + 1 < lim[h] ? v.y * p.scale_log2 : -INFINITY;
          mx[h] = fmaxf(mx[h], fmaxf(pr[h][j][0], pr[h][j][1]));
        }
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      }
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = fmaxf(m[h], mx[h]), m_use = m_new == -INFINITY ? 0.0f : m_new;
        alpha[h] = exp2f(m[h] - m_use);
        m[h] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          pr[h][j][0] = exp2f(pr[h][j][0] - m_use);
          pr[h][j][1] = exp2f(pr[h][j][1] - m_use);
          sum += pr[h][j][0] + pr[h][j][1];
        }
        l[h] = l[h] * alpha[h] + sum;  // this lane's columns; the quad is summed at the end
      }
      uint32_t pa[2][4];
#pragma unroll
      for (int kc = 0; kc < 2; ++kc) {
        pa[kc][0] = pack_bf16(pr[0][2 * kc][0], pr[0][2 * kc][1]);
        pa[kc][1] = pack_bf16(pr[1][2 * kc][0], pr[1][2 * kc][1]);
        pa[kc][2] = pack_bf16(pr[0][2 * kc + 1][0], pr[0][2 * kc + 1][1]);
        pa[kc][3] = pack_bf16(pr[1][2 * kc + 1][0], pr[1][2 * kc + 1][1]);
      }
#pragma unroll
      for (int nt = 0; nt < 32; ++nt) {
        o[nt][0] *= alpha[0];
        o[nt][1] *= alpha[0];
        o[nt][2] *= alpha[1];
        o[nt][3] *= alpha[1];
      }
      // O[16 rows][256 columns of ch] += P[16][32] V[32][256].
#pragma unroll
      for (int kc = 0; kc < 2; ++kc) {
        const uint16_t* vrow = Kt + (kc * 16 + (lane & 15)) * kTcLd + ch * 256 + (lane >> 4) * 8;
#pragma unroll
        for (int ntp = 0; ntp < 16; ++ntp) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4_trans(b0, b1, b2, b3, vrow + ntp * 16);
          mma_bf16(o[2 * ntp], pa[kc], b0, b1);
          mma_bf16(o[2 * ntp + 1], pa[kc], b2, b3);
        }
      }
    }
    __syncthreads();  // tile i and the scores are consumed before they are overwritten
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  if (!active) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + 8 * h;
    if (r >= g.nrows) continue;
    const int col = ch * 256 + tq * 2;
    if (it.part_base < 0) {
      const int64_t base = (static_cast<int64_t>(group_token(g, r)) * p.H + group_head(g, r)) * kTcC + col;
      const float inv = 1.0f / l[h];
#pragma unroll
      for (int nt = 0; nt < 32; ++nt) {
        store_f32(p.o_lat, p.o_dt, base + nt * 8, o[nt][2 * h] * inv);
        store_f32(p.o_lat, p.o_dt, base + nt * 8 + 1, o[nt][2 * h + 1] * inv);
      }
    } else {
      float* dst = p.part_o + static_cast<int64_t>(it.part_base + r) * kTcC + col;
#pragma unroll
      for (int nt = 0; nt < 32; ++nt)
        *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o[nt][2 * h], o[nt][2 * h + 1]);
      if (ch == 0 && tq == 0) {
        p.part_ml[static_cast<int64_t>(it.part_base + r) * 2] = m[h];
        p.part_ml[static_cast<int64_t>(it.part_base + r) * 2 + 1] = l[h];
      }
    }
  }
#else
  __trap();  // the host only launches this kernel on sm_80+
#endif
}

// ------------------------------------------------------------------ step 3d: wgmma kernel (sm_90a)
//
// $EM_CUDA_MLA=wgmma, compute capability 9.0 with an sm_90a build; bf16 caches with C 512,
// dr 64 (as the tensor-core kernel). Not the default: written without a GPU at hand, checked
// by the parity suite (and its wgmma primitives, test/wgmma_probe.cu) on the next GPU run.
// The mma.sync kernel above is bound by shared memory (every warp copies its operands into
// registers: ~290 KB of shared-memory reads per 32-row tile); wgmma reads its operands from
// shared memory once per warpgroup (FlashMLA's design, without its TMA and warp
// specialization).
//
// 64 query rows x 64-row cache tiles, two warpgroups; Q, two cache tiles and P in shared
// memory in the core-matrix layout of wgmma.cuh (230 KB). Per tile:
//   S = Q K^T: warpgroup h computes the scores of cache rows 32h..32h+31 for all 64 query
//      rows (36 x wgmma m64n32k16, A = Q, B = the tile, both K-major);
//   softmax: row maxima exchanged through shared memory, so both warpgroups rescale with the
//      same running max; each keeps the sum over its own columns (added at the end);
//   P (bf16) into shared memory; O[:, 256h..256h+255] += P V (4 x wgmma m64n256k16, A = P,
//      B = the tile read N-major: the latent part of the same rows).
constexpr int kWgBN = 64;          // cache rows per tile (= kTcQG: Q and tiles share a size)
constexpr int kWgThreads = 256;    // two warpgroups
constexpr uint32_t kWgTile = static_cast<uint32_t>(kTcQG) * kTcD * 2;  // 73728 bytes
[[maybe_unused]] constexpr uint32_t kWgRow8 = (kTcD / 8) * 128;                      // bytes per 8 rows of a tile
constexpr size_t kWgSmem = 3 * static_cast<size_t>(kWgTile) + kTcQG * kWgBN * 2 + sizeof(float) * 2 * kTcQG +
                           sizeof(int) * kTcQG;
static_assert(kWgBN == kTcQG, "Q and the cache tiles share a layout");
static_assert(kWgSmem <= 232448, "fits an H100/H200 block's 227 KB of shared memory");

__global__ void __launch_bounds__(kWgThreads, 1) mla_wgmma_kernel(MlaParams p, int32_t item_first) {
#ifdef EM_WGMMA
  extern __shared__ __align__(128) unsigned char wsm[];
  unsigned char* Qs = wsm;
  unsigned char* Kb = wsm + kWgTile;  // two tiles
  unsigned char* Ps = wsm + 3 * kWgTile;
  float* red = reinterpret_cast<float*>(Ps + kTcQG * kWgBN * 2);  // [2][64]: per warpgroup
  int* vis = reinterpret_cast<int*>(red + 2 * kTcQG);

  const MlaItem it = p.items[item_first + blockIdx.x];
  const MlaGroup g = p.groups[it.group];
  const MlaCache cache = p.caches[g.seq];
  const uint16_t* cdata = static_cast<const uint16_t*>(cache.data);
  const int tid = threadIdx.x, wg = tid >> 7, w = (tid & 127) >> 5, gq = (tid & 31) >> 2, tq = tid & 3;

  // Cache rows [j0, j0 + 64) into a tile: 16-byte chunk e is tile byte 16 e (consecutive
  // threads, consecutive bytes), i.e. row 8 ((e / 8) / 72) + e % 8, chunk (e / 8) % 72.
  auto load_tile = [&](unsigned char* dst, int j0) {
#pragma unroll 2
    for (int e = tid; e < kWgBN * (kTcD / 8); e += kWgThreads) {
      const int q8 = e >> 3, r = (q8 / (kTcD / 8)) * 8 + (e & 7), c = q8 % (kTcD / 8);
      unsigned char* s = dst + 16 * e;
      if (j0 + r < it.row_end)
        cp_async16(s, cdata + static_cast<int64_t>(j0 + r) * cache.ld + c * 8);
      else
        *reinterpret_cast<uint4*>(s) = make_uint4(0u, 0u, 0u, 0u);
    }
  };

  const int ntiles = (it.row_end - it.row_begin + kWgBN - 1) / kWgBN;
  load_tile(Kb, it.row_begin);
  cp_async_commit();
  for (int e = tid; e < kTcQG * (kTcD / 2); e += kWgThreads) {
    const int r = e / (kTcD / 2), k = 2 * (e - r * (kTcD / 2));
    float2 v = make_float2(0.0f, 0.0f);
    if (r < g.nrows)
      v = *reinterpret_cast<const float2*>(
          p.qcat + (static_cast<int64_t>(group_token(g, r)) * p.H + group_head(g, r)) * kTcD + k);
    *reinterpret_cast<uint32_t*>(Qs + cm_offset(r, k, kTcD)) = pack_bf16(v.x, v.y);
  }
  if (tid < kTcQG) vis[tid] = tid < g.nrows ? min(p.positions[group_token(g, tid)] + 1, it.row_end) : 0;

  const int r0 = 16 * w + gq;  // this thread's rows r0, r0 + 8 (the same in both warpgroups)
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  for (int t = 0; t < ntiles; ++t) {
    const int j0 = it.row_begin + t * kWgBN;
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // tile t (and Q, vis) in place; every read of tile t - 1, P and red done
    if (t + 1 < ntiles) {
      load_tile(Kb + ((t + 1) & 1) * kWgTile, j0 + kWgBN);
      cp_async_commit();
    }
    const unsigned char* Kt = Kb + (t & 1) * kWgTile;

    float s[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) s[i] = 0.0f;
    wgmma_fence_operands(s);
    wgmma_fence();
    // Fully unrolled: with `unroll 4` ptxas injected warpgroup.arrive fences inside the chain
    // (C7519), each one waiting on the MMAs issued so far.
#pragma unroll
    for (int k = 0; k < kTcD / 16; ++k)
      wgmma_m64n32k16<0>(s, wg_desc(Qs + 256 * k, 128, kWgRow8), wg_desc(Kt + 4 * wg * kWgRow8 + 256 * k, 128, kWgRow8),
                         k > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(s);

    // Masked, scaled scores and this warpgroup's row maxima (a quad of lanes shares a row).
    const int lim[2] = {vis[r0] - j0, vis[r0 + 8] - j0};
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int h = (i >> 1) & 1, col = 32 * wg + 8 * (i >> 2) + 2 * tq + (i & 1);
      s[i] = col < lim[h] ? s[i] * p.scale_log2 : -INFINITY;
      mx[h] = fmaxf(mx[h], s[i]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    if (tq == 0) {
      red[wg * kTcQG + r0] = mx[0];
      red[wg * kTcQG + r0 + 8] = mx[1];
    }
    __syncthreads();  // both warpgroups' maxima
    float alpha[2], m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + 8 * h;
      const float m_new = fmaxf(m[h], fmaxf(red[r], red[kTcQG + r]));
      m_use[h] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[h] = exp2f(m[h] - m_use[h]);
      m[h] = m_new;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int i = 0; i < 16; i += 2) {
      const int h = (i >> 1) & 1, col = 32 * wg + 8 * (i >> 2) + 2 * tq;
      const float p0 = exp2f(s[i] - m_use[h]), p1 = exp2f(s[i + 1] - m_use[h]);
      l[h] += p0 + p1;
      *reinterpret_cast<uint32_t*>(Ps + cm_offset(r0 + 8 * h, col, kWgBN)) = pack_bf16(p0, p1);
    }
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] *= alpha[(i >> 1) & 1];
    fence_proxy_async();
    __syncthreads();  // P complete

    wgmma_fence_operands(o);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kWgBN / 16; ++k)
      wgmma_m64n256k16<1>(o, wg_desc(Ps + 256 * k, 128, (kWgBN / 8) * 128),
                          wg_desc(Kt + 2 * k * kWgRow8 + 32 * wg * 128, kWgRow8, 128), 1);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(o);
  }

  // Row sums: this lane's columns, the quad, then both warpgroups.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  __syncthreads();  // every read of red done
  if (tq == 0) {
    red[wg * kTcQG + r0] = l[0];
    red[wg * kTcQG + r0 + 8] = l[1];
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + 8 * h;
    if (r >= g.nrows) continue;
    const float L = red[r] + red[kTcQG + r];
    if (it.part_base < 0) {
      const int64_t base = (static_cast<int64_t>(group_token(g, r)) * p.H + group_head(g, r)) * kTcC;
      const float inv = 1.0f / L;
#pragma unroll
      for (int i = 0; i < 128; ++i)
        if (((i >> 1) & 1) == h) store_f32(p.o_lat, p.o_dt, base + 256 * wg + 8 * (i >> 2) + 2 * tq + (i & 1), o[i] * inv);
    } else {
      float* dst = p.part_o + static_cast<int64_t>(it.part_base + r) * kTcC + 256 * wg + 2 * tq;
#pragma unroll
      for (int i = 0; i < 128; i += 2)
        if (((i >> 1) & 1) == h) *reinterpret_cast<float2*>(dst + 8 * (i >> 2)) = make_float2(o[i], o[i + 1]);
      if (wg == 0 && tq == 0) {
        p.part_ml[static_cast<int64_t>(it.part_base + r) * 2] = m[h];
        p.part_ml[static_cast<int64_t>(it.part_base + r) * 2 + 1] = L;
      }
    }
  }
#else
  __trap();  // the host launches this kernel only on compute capability 9.0 with an sm_90a build
#endif
}

// ------------------------------------------------------------------ step 3c: combine

// grid (groups with several items, 64): block (gi, r) merges row r's partials of group gi.
__global__ void mla_combine_kernel(MlaParams p, const int32_t* multi) {
  const MlaGroup g = p.groups[multi[blockIdx.x]];
  const int r = blockIdx.y;
  if (r >= g.nrows) return;
  float M = -INFINITY;
  for (int i = g.item_begin; i < g.item_end; ++i)
    M = fmaxf(M, p.part_ml[static_cast<int64_t>(p.items[i].part_base + r) * 2]);
  if (M == -INFINITY) M = 0.0f;  // cannot happen (row 0 is always visible)
  float L = 0.0f;
  for (int i = g.item_begin; i < g.item_end; ++i) {
    const float* ml = p.part_ml + static_cast<int64_t>(p.items[i].part_base + r) * 2;
    L += exp2f(ml[0] - M) * ml[1];
  }
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;  // a row that saw no cache row: zeros, not NaN
  const int64_t row = static_cast<int64_t>(group_token(g, r)) * p.H + group_head(g, r);
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    float acc = 0.0f;
    for (int i = g.item_begin; i < g.item_end; ++i) {
      const int64_t pr = p.items[i].part_base + r;
      acc += exp2f(p.part_ml[pr * 2] - M) * p.part_o[pr * p.C + c];
    }
    store_f32(p.o_lat, p.o_dt, row * p.C + c, acc * inv);
  }
}

// ------------------------------------------------------------------ host side

int to_int(int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    throw Error(EM_ERR_SHAPE, std::string("mla_attention: ") + what + " exceeds 32-bit sizes");
  return static_cast<int>(v);
}

// Row-major per head h (batch): y_h (f32) = op(A_h) x_h in cuBLAS column-major terms.
void gemm_batched(Context& ctx, cublasOperation_t ta, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda,
                  int64_t stride_a, const void* B, int64_t ldb, int64_t stride_b, cudaDataType_t ab, float* Cm,
                  int64_t ldc, int64_t stride_c, int64_t batch) {
  const float alpha = 1.0f, beta = 0.0f;
  EMC_CUBLAS(cublasGemmStridedBatchedEx(ctx.blas, ta, CUBLAS_OP_N, to_int(m, "m"), to_int(n, "n"), to_int(k, "k"),
                                        &alpha, A, ab, to_int(lda, "lda"), stride_a, B, ab, to_int(ldb, "ldb"),
                                        stride_b, &beta, Cm, CUDA_R_32F, to_int(ldc, "ldc"), stride_c,
                                        to_int(batch, "heads"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

enum MlaKernel { kTensorCore = 0, kSimtF32 = 1, kSimtBf16 = 2, kWgmma = 3, kKernels = 4 };

struct Plan {
  std::vector<MlaGroup> groups;
  std::vector<MlaItem> items;
  std::vector<int32_t> multi;  // groups with more than one item
  int64_t part_rows = 0;
};

// Groups and items of the sequences `seqs` for a kernel with `qg` rows per block and
// `target_blocks` blocks resident at once; items are whole `tile`s of at least `min_chunk` rows.
void plan_kernel(const em_mla_args* a, int64_t T, const std::vector<int32_t>& seqs, int qg, int64_t min_chunk,
                 int64_t target_blocks, int64_t tile, Plan& plan) {
  const int32_t H = a->num_heads;
  const size_t first = plan.groups.size();
  for (const int32_t s : seqs) {
    const int64_t t0 = a->q_offsets ? a->q_offsets[s] : 0, t1 = a->q_offsets ? a->q_offsets[s + 1] : T;
    auto add = [&](int64_t t, int64_t ntok, int32_t h0, int32_t nh) {
      int32_t vis = 0;
      for (int64_t u = t; u < t + ntok; ++u) vis = std::max(vis, a->positions[u] + 1);
      plan.groups.push_back({s, static_cast<int32_t>(t), h0, nh, static_cast<int32_t>(ntok * nh), vis, 0, 0});
    };
    if (H >= qg) {
      const int32_t chunks = (H + qg - 1) / qg, nh = (H + chunks - 1) / chunks;
      for (int64_t t = t0; t < t1; ++t)
        for (int32_t h0 = 0; h0 < H; h0 += nh) add(t, 1, h0, std::min(nh, H - h0));
    } else {
      const int64_t per = qg / H;
      for (int64_t t = t0; t < t1; t += per) add(t, std::min(per, t1 - t), 0, H);
    }
  }
  // The chunk: for w = 1..4 waves of target_blocks blocks, the smallest chunk (whole tiles,
  // >= min_chunk) whose items fit in w waves; keep the w with the least w * chunk (the rows
  // the slowest SM streams). Many groups (prefill) fill the device unsplit.
  const int64_t ngroups = static_cast<int64_t>(plan.groups.size() - first);
  const int64_t target = std::max<int64_t>(1, target_blocks);
  int64_t max_vis = 1;
  for (size_t i = first; i < plan.groups.size(); ++i) max_vis = std::max<int64_t>(max_vis, plan.groups[i].visible);
  auto round_tile = [&](int64_t v) { return (v + tile - 1) / tile * tile; };
  auto count = [&](int64_t ck) {
    int64_t n = 0;
    for (size_t i = first; i < plan.groups.size(); ++i) n += (plan.groups[i].visible + ck - 1) / ck;
    return n;
  };
  const int64_t whole = round_tile(std::max(max_vis, min_chunk));  // one item per group
  int64_t chunk = whole, best_cost = (ngroups + target - 1) / target * whole;
  if (ngroups < 4 * target) {
    for (int64_t w = 1; w <= 4; ++w) {
      if (ngroups > w * target) continue;
      int64_t lo = round_tile(min_chunk) / tile, hi = whole / tile;  // in tiles; count(hi) <= w * target
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (count(mid * tile) <= w * target) hi = mid;
        else lo = mid + 1;
      }
      if (w * lo * tile < best_cost) {
        best_cost = w * lo * tile;
        chunk = lo * tile;
      }
    }
  }
  for (size_t i = first; i < plan.groups.size(); ++i) {
    MlaGroup& g = plan.groups[i];
    const int64_t n = (g.visible + chunk - 1) / chunk;
    const int64_t step = ((g.visible + n - 1) / n + tile - 1) / tile * tile;  // even chunks, whole tiles
    g.item_begin = static_cast<int32_t>(plan.items.size());
    for (int64_t r = 0; r < g.visible; r += step) {
      const bool single = step >= g.visible;
      plan.items.push_back({static_cast<int32_t>(i), static_cast<int32_t>(r),
                            static_cast<int32_t>(std::min<int64_t>(g.visible, r + step)),
                            single ? -1 : static_cast<int32_t>(plan.part_rows)});
      if (!single) plan.part_rows += g.nrows;
    }
    g.item_end = static_cast<int32_t>(plan.items.size());
    if (g.item_end - g.item_begin > 1) plan.multi.push_back(static_cast<int32_t>(i));
    if (plan.part_rows > std::numeric_limits<int32_t>::max() / 2 ||
        plan.items.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max() / 2))
      throw Error(EM_ERR_SHAPE, "mla_attention: too many query rows for one call");
  }
}

// $EM_CUDA_MLA: "simt" forces the fp32 SIMT kernel, "simt16" that kernel with 16-row tiles
// (the small-shared-memory variant, for tests on GPUs where 32 rows fit), "tc1" the first
// tensor-core kernel, "wgmma" the wgmma kernel where it can run (else the tensor-core one).
bool env_is(const char* value) {
  const char* env = std::getenv("EM_CUDA_MLA");
  return env != nullptr && std::strcmp(env, value) == 0;
}

template <typename CT>
void launch_simt(int bn, size_t n, size_t smem, cudaStream_t stream, const MlaParams& p, int32_t first) {
  auto kernel = bn == 32 ? mla_simt_kernel<CT, 32> : mla_simt_kernel<CT, 16>;
  EMC_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(n), kSimtThreads, smem, stream>>>(p, first);
}

// Rows [0, first_row[s + 1] - first_row[s]) of each sequence s (blockIdx.y) from a paged
// pool in device memory into contiguous caches: row r of sequence s becomes row
// first_row[s] + r of `dst` (dst_row_bytes each). f32 and bf16 rows are copied; fp8 rows
// (C e4m3 codes | ceil(C / 128) f32 scales | dr bf16) widen to f32 as kv_fp8_rows_to_f32.
__global__ void kv_gather_kernel(const uint8_t* pool, int64_t row_bytes, int32_t block_size, const int32_t* table,
                                 const int32_t* table_off, const int64_t* first_row, int32_t fp8, int32_t C, int32_t dr,
                                 uint8_t* dst, int64_t dst_row_bytes) {
  const int s = blockIdx.y;
  const int64_t n = first_row[s + 1] - first_row[s];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t blk = table[table_off[s] + r / block_size];
    const uint8_t* src = pool + (blk * block_size + r % block_size) * row_bytes;
    uint8_t* d = dst + (first_row[s] + r) * dst_row_bytes;
    if (!fp8) {
      if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(d) | static_cast<uintptr_t>(row_bytes)) & 15) == 0) {
        for (int64_t k = threadIdx.x; k < row_bytes / 16; k += blockDim.x)
          reinterpret_cast<uint4*>(d)[k] = reinterpret_cast<const uint4*>(src)[k];
      } else {
        for (int64_t k = threadIdx.x; k < row_bytes; k += blockDim.x) d[k] = src[k];
      }
      continue;
    }
    float* o = reinterpret_cast<float*>(d);
    const uint8_t* scales = src + C;
    for (int32_t c = threadIdx.x; c < C; c += blockDim.x) {
      float scale;
      memcpy(&scale, scales + 4 * (c / EM_FP8_BLOCK), 4);
      o[c] = fp8_e4m3_to_f32(src[c]) * scale;
    }
    const uint8_t* pe = scales + 4 * ((C + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK);
    for (int32_t i = threadIdx.x; i < dr; i += blockDim.x)
      o[C + i] = bf16_bits_to_f32(static_cast<uint16_t>(pe[2 * i] | (pe[2 * i + 1] << 8)));
  }
}

em_status mla_attention_caches(Context& ctx, const em_mla_args* a);

}  // namespace

em_status mla_attention(Context& ctx, const em_mla_args* a) {
  if (a->pages == nullptr) return mla_attention_caches(ctx, a);
  // Pages in this device's memory: gather each sequence's visible rows (up to its largest
  // position) into contiguous device caches, then attend over those.
  Op op(ctx);
  const em_kv_pages& p = *a->pages;
  const int64_t C = a->kv_lora_rank, dr = a->qk_rope_head_dim, W = C + dr, T = a->q->shape[0];
  const int32_t S = a->num_seqs;
  if (S > 65535) throw Error(EM_ERR_ARG, "mla_attention: more than 65535 sequences in one call");
  const size_t rb = em_kv_row_bytes(p.dtype, static_cast<int32_t>(C), static_cast<int32_t>(dr));
  const em_dtype out_dt = p.dtype == EM_BF16 ? EM_BF16 : EM_F32;
  const size_t orb = static_cast<size_t>(W) * em_dtype_size(out_dt);
  std::vector<int64_t> first(static_cast<size_t>(S) + 1, 0);
  int64_t longest = 0;
  for (int32_t s = 0; s < S; ++s) {
    const int64_t t0 = a->q_offsets ? a->q_offsets[s] : 0, t1 = a->q_offsets ? a->q_offsets[s + 1] : T;
    int64_t rows = 0;
    for (int64_t t = t0; t < t1; ++t) rows = std::max<int64_t>(rows, a->positions[t] + 1);
    first[s + 1] = first[s] + rows;
    longest = std::max(longest, rows);
  }
  uint8_t* dst = static_cast<uint8_t*>(op.alloc(static_cast<size_t>(first[S]) * orb));
  if (longest > 0) {
    const int32_t* table = op.upload(p.block_table, p.table_offsets[S]);
    const int32_t* table_off = op.upload(p.table_offsets, S + 1);
    const int64_t* d_first = op.upload(first.data(), S + 1);
    const unsigned gx = static_cast<unsigned>(std::min<int64_t>(longest, 4096));
    kv_gather_kernel<<<dim3(gx, static_cast<unsigned>(S)), 128, 0, op.stream()>>>(
        static_cast<const uint8_t*>(p.pool), static_cast<int64_t>(rb), p.block_size, table, table_off, d_first,
        p.dtype == EM_F8_E4M3 ? 1 : 0, static_cast<int32_t>(C), static_cast<int32_t>(dr), dst, static_cast<int64_t>(orb));
    EMC_LAUNCHED();
  }
  std::vector<em_tensor> caches;
  for (int32_t s = 0; s < S; ++s)
    caches.push_back(em_tensor_2d(dst + static_cast<size_t>(first[s]) * orb, out_dt, first[s + 1] - first[s], W));
  em_mla_args c = *a;
  c.caches = caches.data();
  c.pages = nullptr;
  return mla_attention_caches(ctx, &c);  // same stream: runs after the gather; `op` frees it after
}

namespace {

em_status mla_attention_caches(Context& ctx, const em_mla_args* a) {
  Op op(ctx);
  // EM_CUDA_MLA_PROFILE=1: the phases' times on stderr (bench_cuda_mla prints one per shape).
  PhaseTimes phases(op.stream(), "EM_CUDA_MLA_PROFILE", "mla_attention");
  const int64_t H = a->num_heads, dn = a->qk_nope_head_dim, dr = a->qk_rope_head_dim, dv = a->v_head_dim,
                C = a->kv_lora_rank, D = C + dr;
  const em_tensor q = op.in(*a->q), out = op.out(*a->out);
  const int64_t T = q.shape[0];
  if (T == 0) {
    set_last_status("mla_attention: no tokens");
    op.finish();
    return EM_OK;
  }
  to_int(T * H, "tokens x heads");
  to_int(D, "kv_lora_rank + rope dims");
  const em_tensor w = op.in(*a->wkv_b);

  int major = 0, optin = 0;
  EMC_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, ctx.device));
  EMC_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx.device));
  const bool force16 = env_is("simt16");
  const bool tc_ok =
      C == kTcC && dr == kTcDr && major >= 8 && static_cast<size_t>(optin) >= kTcSmem && !env_is("simt") && !force16;
  // The wgmma kernel: opt-in, compute capability 9.0 (sm_90a code runs there only) and a
  // build that has sm_90a code (EM_CUDA_SM90A, from CMake's architectures).
#ifdef EM_CUDA_SM90A
  const bool wg_ok = tc_ok && env_is("wgmma") && major == 9 && static_cast<size_t>(optin) >= kWgSmem;
#else
  const bool wg_ok = false;
#endif
  int simt_bn = 0;  // the SIMT kernel's tile rows: the largest that fits (0: none)
  for (int bn : kSimtBNs)
    if (simt_bn == 0 && (!force16 || bn == 16) && simt_smem_bytes(static_cast<int>(C), static_cast<int>(D), bn) <= static_cast<size_t>(optin))
      simt_bn = bn;
  const size_t simt_smem = simt_bn > 0 ? simt_smem_bytes(static_cast<int>(C), static_cast<int>(D), simt_bn) : 0;

  // Caches on the device, and the kernel each sequence runs.
  std::vector<MlaCache> caches(static_cast<size_t>(a->num_seqs));
  std::vector<int32_t> by_kernel[kKernels];
  for (int32_t s = 0; s < a->num_seqs; ++s) {
    const int64_t t0 = a->q_offsets ? a->q_offsets[s] : 0, t1 = a->q_offsets ? a->q_offsets[s + 1] : T;
    if (t1 == t0) {
      caches[static_cast<size_t>(s)] = {nullptr, 0};
      continue;
    }
    const em_tensor c = op.in(a->caches[s]);
    const int64_t ld = c.shape[0] > 1 ? c.stride[0] : D;
    caches[static_cast<size_t>(s)] = {c.data, ld};
    const bool aligned = reinterpret_cast<uintptr_t>(c.data) % 16 == 0 && ld % 8 == 0;
    const MlaKernel k =
        c.dtype == EM_BF16 ? (tc_ok && aligned ? (wg_ok ? kWgmma : kTensorCore) : kSimtBf16) : kSimtF32;
    by_kernel[k].push_back(s);
  }
  if ((!by_kernel[kSimtF32].empty() || !by_kernel[kSimtBf16].empty()) && simt_bn == 0)
    throw Error(EM_ERR_UNSUPPORTED, "mla_attention: kv_lora_rank + rope dims too large for one block's shared memory");

  Plan plan;
  size_t item_first[kKernels + 1];
  for (int k = 0; k < kKernels; ++k) {
    item_first[k] = plan.items.size();
    if (by_kernel[k].empty()) continue;  // (an unused SIMT kernel may have simt_bn 0)
    if (k == kTensorCore)
      plan_kernel(a, T, by_kernel[k], kTcQG, 128, ctx.sm_count, kTcBN, plan);
    else if (k == kWgmma)
      plan_kernel(a, T, by_kernel[k], kTcQG, 128, ctx.sm_count, kWgBN, plan);
    else
      plan_kernel(a, T, by_kernel[k], kSimtQG, 64, 2 * static_cast<int64_t>(ctx.sm_count), simt_bn, plan);
  }
  item_first[kKernels] = plan.items.size();
  std::string ran;
  {
    // What ran, for em_cuda_last_status(): the parity test checks that EM_CUDA_MLA=wgmma
    // really ran the wgmma kernel (it falls back to the tensor-core one quietly).
    static const char* const kNames[kKernels] = {"tc", "simt_f32", "simt_bf16", "wgmma"};
    for (int k = 0; k < kKernels; ++k)
      if (item_first[k + 1] > item_first[k])
        ran += std::string(" ") + kNames[k] + "=" + std::to_string(item_first[k + 1] - item_first[k]);
    set_last_status("mla_attention:" + ran);
  }
  phases.mark("plan");  // host: staging, kernel choice and split plan (the stream idles meanwhile)

  // Weight operands of the two absorption GEMMs.
  const void* wd = w.data;
  int64_t ldw = w.shape[0] > 1 ? w.stride[0] : C;
  em_dtype gdt = w.dtype;  // GEMM operand dtype
  if (w.dtype == EM_F8_E4M3) {
    const int64_t rows = w.shape[0];
    uint16_t* wb = op.alloc_n<uint16_t>(rows * C);
    const int64_t n = rows * C;
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 65535 * 8)));
    mla_dequant_kernel<<<blocks, 256, 0, op.stream()>>>(w.data, w.stride[0], w.scale, w.scale_stride, rows, C, wb);
    EMC_LAUNCHED();
    wd = wb;
    ldw = C;
    gdt = EM_BF16;
    phases.mark("dequant");
  }
  const cudaDataType_t ab = cuda_type(gdt);
  const size_t gsz = em_dtype_size(gdt);

  // 1. prep
  float* qcat = op.alloc_n<float>(T * H * D);
  void* xq = gdt == EM_F32 ? nullptr : op.alloc(static_cast<size_t>(T * H * dn) * gsz);
  mla_prep_kernel<<<static_cast<unsigned>(T * H), 64, 0, op.stream()>>>(
      static_cast<const float*>(q.data), q.stride[0], q.stride[1], H, static_cast<int>(dn), static_cast<int>(dr),
      static_cast<int>(C), qcat, xq, gdt);
  EMC_LAUNCHED();
  phases.mark("prep");

  // 2. absorb-in: qcat[t*H + h, :C] = q_nope[t, h] W_uk[h] (column-major: [C x T] = W^T x^T).
  {
    const void* x = xq ? xq : q.data;
    int64_t ldx = xq ? H * dn : q.stride[0];
    const int64_t sx = xq ? dn : q.stride[1];
    if (T == 1) ldx = std::max(ldx, dn);
    gemm_batched(ctx, CUBLAS_OP_N, C, T, dn, wd, ldw, (dn + dv) * ldw, x, ldx, sx, ab, qcat, H * D, D, H);
  }
  phases.mark("absorb_in");

  // 3. attention
  const int32_t* d_pos = op.upload(a->positions, T);
  MlaParams p{};
  p.qcat = qcat;
  p.H = static_cast<int32_t>(H);
  p.C = static_cast<int32_t>(C);
  p.D = static_cast<int32_t>(D);
  p.scale_log2 = a->softmax_scale * 1.4426950408889634f;
  p.positions = d_pos;
  p.groups = op.upload(plan.groups.data(), static_cast<int64_t>(plan.groups.size()));
  p.items = op.upload(plan.items.data(), static_cast<int64_t>(plan.items.size()));
  p.caches = op.upload(caches.data(), static_cast<int64_t>(caches.size()));
  p.part_o = op.alloc_n<float>(plan.part_rows * C);
  p.part_ml = op.alloc_n<float>(plan.part_rows * 2);
  p.o_dt = gdt;
  p.o_lat = op.alloc(static_cast<size_t>(T * H * C) * gsz);
  phases.mark("upload");
  for (int k = 0; k < kKernels; ++k) {
    const size_t n = item_first[k + 1] - item_first[k];
    if (n == 0) continue;
    const int32_t f = static_cast<int32_t>(item_first[k]);
    if (n > static_cast<size_t>(std::numeric_limits<int32_t>::max())) throw Error(EM_ERR_SHAPE, "mla_attention: too many blocks");
    if (k == kTensorCore) {
      auto kernel = env_is("tc1") ? mla_tc_kernel<false> : mla_tc_kernel<true>;
      EMC_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kTcSmem)));
      kernel<<<static_cast<unsigned>(n), kTcThreads, kTcSmem, op.stream()>>>(p, f);
    } else if (k == kWgmma) {
      EMC_CUDA(cudaFuncSetAttribute(mla_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kWgSmem)));
      mla_wgmma_kernel<<<static_cast<unsigned>(n), kWgThreads, kWgSmem, op.stream()>>>(p, f);
    } else if (k == kSimtF32) {
      launch_simt<float>(simt_bn, n, simt_smem, op.stream(), p, f);
    } else {
      launch_simt<uint16_t>(simt_bn, n, simt_smem, op.stream(), p, f);
    }
    EMC_LAUNCHED();
  }
  phases.mark("attend");
  if (!plan.multi.empty()) {
    const int32_t* d_multi = op.upload(plan.multi.data(), static_cast<int64_t>(plan.multi.size()));
    mla_combine_kernel<<<dim3(static_cast<unsigned>(plan.multi.size()), kTcQG), 128, 0, op.stream()>>>(p, d_multi);
    EMC_LAUNCHED();
    phases.mark("combine");
  }

  // 4. absorb-out: out[t, h] = W_uv[h] o_lat[t, h] (column-major: [dv x T] = W_uv o_lat^T).
  {
    int64_t ldo = out.stride[0];
    if (T == 1) ldo = std::max(ldo, dv);
    gemm_batched(ctx, CUBLAS_OP_T, dv, T, C, static_cast<const char*>(wd) + static_cast<size_t>(dn * ldw) * gsz, ldw,
                 (dn + dv) * ldw, p.o_lat, H * C, C, ab, static_cast<float*>(out.data), ldo, out.stride[1], H);
  }
  phases.mark("absorb_out");
  op.finish();
  if (phases.on())
    phases.print(std::to_string(T) + " tokens, " + std::to_string(a->num_seqs) + " seqs, " +
                 std::to_string(plan.groups.size()) + " groups, blocks" + ran + ", " +
                 std::to_string(plan.multi.size()) + " groups split");
  return EM_OK;
}

}  // namespace
}  // namespace em::cuda
