// Internal interface of the CPU backend: weight views, per-ISA kernel tables, the
// backend context, and the op implementations (one .cpp per op family).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#include "expertmesh/ops.h"
#include "../internal.h"
#include "threadpool.h"

namespace em::cpu {

// A 2-D weight view [rows, cols] of any weight dtype, rows `ld` elements apart.
// fp8: element (r, c) = fp8(r, c) * scale_row(r)[c / 128], where scale_row(r) =
// scale + ((scale_row0 + r) / 128) * scale_ld; scale_row0 lets a row slice start
// inside a 128-row block.
struct Weight {
  const void* data = nullptr;
  em_dtype dtype = EM_F32;
  int64_t rows = 0, cols = 0, ld = 0;
  const float* scale = nullptr;
  int64_t scale_ld = 0;
  int64_t scale_row0 = 0;

  const float* scale_row(int64_t r) const { return scale + ((scale_row0 + r) / EM_FP8_BLOCK) * scale_ld; }
  // Rows [r0, r0 + n), any r0.
  Weight row_slice(int64_t r0, int64_t n) const;
  // Converts cols [c0, c0 + n) of row r to f32.
  void row_to_f32(int64_t r, int64_t c0, int64_t n, float* out) const;
};

// Scratch memory, 64-byte aligned, NOT initialized (scratch.cpp): arrays of 1 MiB or more
// are recycled through a cache of the thread that frees them, so a call finds the pages of
// the last one's arrays already mapped. With EM_SCRATCH_POISON=1 every array is handed out
// filled with 0xFF bytes (NaN). *capacity receives the bytes the memory really has.
void* scratch_acquire(size_t bytes, size_t* capacity);
void scratch_release(void* p, size_t capacity);
// The bytes this thread's cache holds (for tests).
size_t scratch_cached_bytes();
// Frees every thread's cached arrays (any thread may call it); returns their bytes.
size_t scratch_trim();
// The bytes every thread's cache holds.
size_t scratch_cached_bytes_all();

// A scratch array of n T's (SIMD panels, packed rows, a call's intermediates), uninitialized.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t n) : data_(static_cast<T*>(scratch_acquire(sizeof(T) * n, &capacity_))) {}
  ~AlignedBuffer() { scratch_release(data_, capacity_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }

 private:
  size_t capacity_ = 0;
  T* data_;
};

// The 2-D weight a tensor view describes (a 1-D tensor is one row).
Weight weight_view(const em_tensor& t);

// One GEMM with f32 activations and a weight of any dtype.
//   nt: y[M, N] (+)= x[M, K] w[N, K]^T   (torch Linear)
//   nn: y[M, N] (+)= x[M, K] w[K, N]     (latent-space products in attention)
struct Gemm {
  const float* x = nullptr;
  int64_t ldx = 0;
  Weight w;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t M = 0, N = 0, K = 0;
  bool accumulate = false;  // y += result instead of y = result
  // nt with few x rows: bytes from each weight row to the same row of the weight the next
  // call will read (a paged cache's next block), fetched into L2 while this call computes;
  // 0: the rows after this tile's, as in a contiguous weight.
  int64_t w_next = 0;
  // x rows [0, M) already packed for the AMX kernel (amx::pack_x), or null: the AMX tile
  // function then packs its rows itself. Tiles must then start at rows that are multiples of 16.
  const uint32_t* x_vnni = nullptr;
  // x rows [0, M) already rounded to bf16 for the AVX512_BF16 kernel (avx512::pack_x_bf16:
  // rows of x_bf16_ld elements, zero past K), or null: each tile then rounds its own rows.
  const uint16_t* x_bf16 = nullptr;
  int64_t x_bf16_ld = 0;
  // x rows [0, M) already packed for the AVX-512 kernel with bf16 weights (avx512::pack_x_deint:
  // each 32 k as its even then its odd elements; K rounded down to 32), or null.
  const float* x_deint = nullptr;
  int64_t x_deint_ld = 0;
};

// Computes the tile y[m0:m1, n0:n1] of a Gemm on the calling thread. For nn, n0 must
// be a multiple of 16.
using GemmTileFn = void (*)(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// The kernels one ISA provides; ops are written against this table only.
struct Kernels {
  em_cpu_isa isa;
  GemmTileFn gemm_nt;
  GemmTileFn gemm_nn;
  void (*silu_mul)(const float* gate, const float* up, float* y, int64_t n);
  float (*sum_squares)(const float* x, int64_t n);
  void (*scale_mul)(const float* x, float s, const float* w, float* y, int64_t n);  // y = x*s*w
  float (*exp_sum)(float* x, int64_t n, float shift);  // x = exp(x - shift); returns the sum
  void (*fp8_to_f32)(const uint8_t* codes, int64_t n, float scale, float* y);  // y = e4m3(codes) * scale
  // out = e4m3(float(double(x) * inv)), rounded as kv_pages.h's f32_to_e4m3 (bit for bit)
  void (*f32_to_fp8)(const float* x, int64_t n, double inv, uint8_t* out);
  float (*abs_max)(const float* x, int64_t n);  // max |x|, NaNs skipped, 0 for n = 0
};

// Per-ISA kernel functions (defined next to their op family).
namespace scalar {
void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_nn(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void silu_mul(const float* gate, const float* up, float* y, int64_t n);
float sum_squares(const float* x, int64_t n);
void scale_mul(const float* x, float s, const float* w, float* y, int64_t n);
float exp_sum(float* x, int64_t n, float shift);
void fp8_to_f32(const uint8_t* codes, int64_t n, float scale, float* y);
void f32_to_fp8(const float* x, int64_t n, double inv, uint8_t* out);
float abs_max(const float* x, int64_t n);
}  // namespace scalar
namespace avx2 {
void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_nt_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_nn(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void silu_mul(const float* gate, const float* up, float* y, int64_t n);
float sum_squares(const float* x, int64_t n);
void scale_mul(const float* x, float s, const float* w, float* y, int64_t n);
float exp_sum(float* x, int64_t n, float shift);
void fp8_to_f32(const uint8_t* codes, int64_t n, float scale, float* y);
void f32_to_fp8(const float* x, int64_t n, double inv, uint8_t* out);
float abs_max(const float* x, int64_t n);
}  // namespace avx2
namespace avx512 {
void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_nt_bf16dot(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_nt_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_nt_bf16dot_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void gemm_nn(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// Whether x of M rows and K columns, multiplied by bf16 weights, is worth packing once for
// every tile (pack_rows): for gemm_nt_bf16dot as bf16 (pack_x_bf16, Gemm::x_bf16), for
// gemm_nt with each 32 k's even elements first (pack_x_deint, Gemm::x_deint), in rows of
// ld >= K elements (pack_x_bf16 zeroes past K; pack_x_deint writes K rounded down to 32).
bool wants_x_bf16(int64_t M, int64_t K);
bool wants_x_deint(int64_t M, int64_t K);
void pack_x_bf16(const float* x, int64_t ldx, int64_t M, int64_t K, uint16_t* out, int64_t ld);
void pack_x_deint(const float* x, int64_t ldx, int64_t M, int64_t K, float* out, int64_t ld);
}  // namespace avx512
namespace amx {
// Fewer x rows go to the AVX512_BF16 / AVX-512 dot-product kernels, which stream weights faster
// there (measured at V2-Lite and V3 shapes: bf16 at 1-3 rows took 1.0-1.6x as long with AMX, 4
// rows 0.85x; fp8, which AMX must dequantize first, ties at 4 rows and wins from 5, where the
// fp8 dot kernel starts a second pass over the weights).
constexpr int64_t kMinRows = 4;
constexpr int64_t kMinRowsFp8 = 5;
// Whether the AMX kernel takes this GEMM (bf16 or fp8 weights, K >= 32, enough rows; the
// batch-invariant kernel takes every row count): then packing x once (pack_x into
// packed_x_size uint32s, 64-byte aligned) and setting Gemm::x_vnni saves every tile from packing
// its rows again.
bool wants(const Gemm& g, bool invariant = false);
int64_t packed_x_size(int64_t M, int64_t K);
void pack_x(const float* x, int64_t ldx, int64_t M, int64_t K, uint32_t* out);
void gemm_nt(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// Batch-invariant: the tile unit from one row up (1-3 rows then stream the weights up to 1.6x
// slower than the dot kernel; the tiles' sums are another order than AVX512_BF16's).
void gemm_nt_invariant(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
}  // namespace amx

// isa.cpp
bool isa_supported(em_cpu_isa isa);
// The kernels of an ISA; `invariant`: those whose every output row is the same bits whatever
// rows share the call (one nt kernel for every row count: fixed panels over k, or AMX's tiles).
const Kernels& kernels_for(em_cpu_isa isa, bool invariant = false);

// The CPU backend's private state (em_backend::ctx).
struct Context {
  Context(em_cpu_isa isa_, int num_threads, bool invariant_ = false)
      : isa(isa_), invariant(invariant_), k(&kernels_for(isa_, invariant_)), pool(num_threads) {}
  em_cpu_isa isa;
  // Batch-invariant (em_cpu_config::batch_invariant): every op computes a row, or a sequence's
  // attention for a query token, in an order fixed by that row alone.
  bool invariant;
  const Kernels* k;
  ThreadPool pool;
};

// Parallel GEMM drivers (matmul.cpp): split y into tiles over the thread pool.
void gemm_nt(Context& ctx, const Gemm& g);
// x rows [0, M) packed once for every tile of the GEMMs that read them, in the form this ISA's
// kernel for bf16 weights reads (each tile would pack its rows again): AVX512_BF16 rounds
// them to bf16 (Gemm::x_bf16), AVX-512 puts each 32 k's even elements before its odd ones
// (Gemm::x_deint). Empty for other ISAs and weights, and too few rows.
// Rows of ld elements (a multiple of 32), 64-byte aligned: every 32-element load stays in
// one cache line.
struct PackedRows {
  std::unique_ptr<AlignedBuffer<uint16_t>> bf16;
  std::unique_ptr<AlignedBuffer<float>> deint;
  int64_t ld = 0;
  bool empty() const { return !bf16 && !deint; }
  // Points g, whose rows start at row m0 of the packed x, at them.
  void attach(Gemm& g, int64_t m0) const {
    if (bf16) {
      g.x_bf16 = bf16->data() + m0 * ld;
      g.x_bf16_ld = ld;
    } else if (deint) {
      g.x_deint = deint->data() + m0 * ld;
      g.x_deint_ld = ld;
    }
  }
};
PackedRows pack_rows(Context& ctx, const float* x, int64_t ldx, int64_t M, int64_t K, bool bf16_weights);
// The same on this thread, whatever the row count: for a caller already on a pool worker
// whose rows meet many GEMMs (attention's query rows meet every block of a paged cache).
PackedRows pack_rows_here(em_cpu_isa isa, const float* x, int64_t ldx, int64_t M, int64_t K, bool bf16_weights);
// gemm_nt with fp32 products whatever the ISA (x never rounded to bf16): the gate's logits.
void gemm_nt_f32(Context& ctx, const Gemm& g);
void gemm_nn(Context& ctx, const Gemm& g);
// amx::pack_x of rows [0, M) on the pool (out: amx::packed_x_size(M, K) uint32s).
void pack_x_amx(Context& ctx, const float* x, int64_t ldx, int64_t M, int64_t K, uint32_t* out);

// Op implementations; arguments were validated by the dispatcher.
em_status matmul(Context& ctx, const em_tensor* x, const em_tensor* w, em_tensor* y);
em_status rmsnorm(Context& ctx, const em_tensor* x, const em_tensor* weight, float eps, em_tensor* y);
em_status silu_mul(Context& ctx, const em_tensor* gate, const em_tensor* up, em_tensor* y);
em_status moe_ffn(Context& ctx, const em_moe_args* args);
em_status rope(Context& ctx, em_tensor* x, const int32_t* positions, const em_rope_config* cfg);
em_status mla_attention(Context& ctx, const em_mla_args* args);
em_status gate(Context& ctx, const em_tensor* x, const em_tensor* weight, const em_tensor* bias,
               const em_gate_config* cfg, em_tensor* topk_idx, em_tensor* topk_weight);
em_status convert(Context& ctx, const em_tensor* src, em_tensor* dst);
em_status sample(Context& ctx, const em_sample_args* args);
em_status logprobs(Context& ctx, const em_logprobs_args* args);
// wire.cpp: the frame codec (see em_wire_pack_args) and CRC-32 (zlib's, continuing from crc).
em_status wire_pack(Context& ctx, const em_wire_pack_args* a);
em_status wire_unpack(Context& ctx, const em_wire_unpack_args* a);
uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n);

}  // namespace em::cpu
