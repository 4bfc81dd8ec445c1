// MoE family: the grouped expert FFN, y = w2(silu(w1 x) * w3 x), for many experts in
// one call. Rows arrive grouped by expert (offsets per expert). Work is split into
// (expert, row block, weight-row block) items so each expert's weights are streamed
// once for all of its rows, and all threads share the experts of the call.
#include <algorithm>
#include <memory>
#include <vector>

#include "cpu.h"

namespace em::cpu {
namespace {

struct Item {
  int32_t expert;
  int64_t m0, m1;  // rows (absolute, within x)
  int64_t n0, n1;  // weight rows (phase 1: inter; phase 2: dim)
};

constexpr int64_t kRowBlock = 256;

// Cuts each expert's rows x [0, out_rows) into items, choosing the weight-row block so
// that there are enough items for the threads.
std::vector<Item> plan_items(const em_moe_args* a, const std::vector<int64_t>& out_rows, int threads) {
  int64_t nb = 64;
  auto count = [&](int64_t b) {
    int64_t n = 0;
    for (int32_t e = 0; e < a->num_experts; ++e) {
      const int64_t rows = a->expert_offsets[e + 1] - a->expert_offsets[e];
      if (rows == 0) continue;
      n += ((rows + kRowBlock - 1) / kRowBlock) * ((out_rows[e] + b - 1) / b);
    }
    return n;
  };
  while (nb > 16 && count(nb) < 4 * static_cast<int64_t>(threads)) nb /= 2;
  std::vector<Item> items;
  for (int32_t e = 0; e < a->num_experts; ++e) {
    const int64_t r0 = a->expert_offsets[e], r1 = a->expert_offsets[e + 1];
    for (int64_t m = r0; m < r1; m += kRowBlock)
      for (int64_t n = 0; n < out_rows[e]; n += nb)
        items.push_back({e, m, std::min(r1, m + kRowBlock), n, std::min(out_rows[e], n + nb)});
  }
  return items;
}

// AMX: each expert's rows of src packed once (amx::pack_x) for all of its weight-row blocks
// (and, in phase 1, for both w1 and w3). at[e]: where expert e's rows start in the buffer, or
// -1 when its GEMMs do not take the AMX kernel. Null when no expert's do.
std::unique_ptr<AlignedBuffer<uint32_t>> pack_expert_rows(Context& ctx, const em_moe_args* a, const float* src,
                                                          int64_t ld, const std::vector<int64_t>& K,
                                                          const em_tensor* w, std::vector<int64_t>& at) {
  at.assign(static_cast<size_t>(a->num_experts), -1);
  if (ctx.isa != EM_ISA_AMX) return nullptr;
  struct Job {
    int32_t expert;
    int64_t m0, m1;  // rows within the expert's
  };
  constexpr int64_t kRowsPerJob = 64;
  std::vector<Job> jobs;
  int64_t total = 0;
  for (int32_t e = 0; e < a->num_experts; ++e) {
    Gemm probe;
    probe.M = a->expert_offsets[e + 1] - a->expert_offsets[e];
    probe.K = K[e];
    probe.w.dtype = w[e].dtype;
    if (probe.M == 0 || !amx::wants(probe, ctx.invariant)) continue;
    at[e] = total;
    total += amx::packed_x_size(probe.M, probe.K);
    for (int64_t m = 0; m < probe.M; m += kRowsPerJob) jobs.push_back({e, m, std::min(probe.M, m + kRowsPerJob)});
  }
  if (total == 0) return nullptr;
  auto buf = std::make_unique<AlignedBuffer<uint32_t>>(static_cast<size_t>(total));
  ctx.pool.parallel_for(static_cast<int64_t>(jobs.size()), [&](int64_t i, int) {
    const Job& j = jobs[static_cast<size_t>(i)];
    const int64_t k = K[j.expert];
    amx::pack_x(src + (a->expert_offsets[j.expert] + j.m0) * ld, ld, j.m1 - j.m0, k,
                buf->data() + at[j.expert] + (j.m0 / 16) * amx::packed_x_size(16, k));
  });
  return buf;
}

// Item `it`'s rows in a pack_expert_rows buffer (its m0 is 256-aligned within its expert).
const uint32_t* packed_rows(const AlignedBuffer<uint32_t>* buf, const std::vector<int64_t>& at, const em_moe_args* a,
                            const Item& it, int64_t K) {
  if (buf == nullptr || at[it.expert] < 0) return nullptr;
  const int64_t block = (it.m0 - a->expert_offsets[it.expert]) / 16;
  return buf->data() + at[it.expert] + block * amx::packed_x_size(16, K);
}

// Whether any expert's weights are bf16 (pack_rows prepares rows for their kernels only).
bool any_bf16(const em_tensor* w, int32_t num_experts) {
  for (int32_t e = 0; e < num_experts; ++e)
    if (w[e].dtype == EM_BF16) return true;
  return false;
}

}  // namespace

em_status moe_ffn(Context& ctx, const em_moe_args* a) {
  const int64_t dim = a->x->shape[1];
  const float* x = static_cast<const float*>(a->x->data);
  int64_t ldx = a->x->stride[0];
  int64_t rows = a->x->shape[0];
  // A gather index: copy the rows into expert order once, in parallel (the GEMMs want
  // contiguous row blocks); the caller keeps one copy of each token's activations.
  // (The call's large arrays are scratch, recycled per thread: cpu.h AlignedBuffer.)
  std::unique_ptr<AlignedBuffer<float>> gathered;
  if (a->x_index != nullptr) {
    rows = a->num_experts > 0 ? a->expert_offsets[a->num_experts] : 0;
    gathered = std::make_unique<AlignedBuffer<float>>(static_cast<size_t>(rows * dim));
    constexpr int64_t kGatherRows = 16;
    const float* src = x;
    const int64_t ld = ldx;
    float* dst = gathered->data();
    ctx.pool.parallel_for((rows + kGatherRows - 1) / kGatherRows, [&](int64_t item, int) {
      const int64_t r1 = std::min(rows, (item + 1) * kGatherRows);
      for (int64_t r = item * kGatherRows; r < r1; ++r)
        std::copy(src + a->x_index[r] * ld, src + a->x_index[r] * ld + dim, dst + r * dim);
    });
    x = dst;
    ldx = dim;
  }
  float* y = static_cast<float*>(a->y->data);
  const int64_t ldy = a->y->stride[0];

  int64_t max_inter = 0;
  std::vector<int64_t> inter(static_cast<size_t>(a->num_experts)), dims(static_cast<size_t>(a->num_experts), dim);
  for (int32_t e = 0; e < a->num_experts; ++e) {
    inter[e] = a->w1[e].shape[0];
    max_inter = std::max(max_inter, inter[e]);
  }

  // Phase 1: h[rows, inter] = silu(x w1^T) * (x w3^T), per (expert, rows, inter block).
  // (an expert with a narrower inter leaves the columns past it unwritten, and unread)
  AlignedBuffer<float> h_buf(static_cast<size_t>(rows * max_inter));
  float* const h = h_buf.data();
  const std::vector<Item> up_items = plan_items(a, inter, ctx.pool.num_threads());
  std::vector<int64_t> x_at;
  const auto x_packed = pack_expert_rows(ctx, a, x, ldx, dims, a->w1, x_at);
  const PackedRows x_rows = pack_rows(ctx, x, ldx, rows, dim, any_bf16(a->w1, a->num_experts));
  ctx.pool.parallel_for(static_cast<int64_t>(up_items.size()), [&](int64_t i, int) {
    const Item& it = up_items[static_cast<size_t>(i)];
    const int64_t m = it.m1 - it.m0, n = it.n1 - it.n0;
    std::vector<float> up(static_cast<size_t>(m * n));
    Gemm g;
    g.x = x + it.m0 * ldx;
    g.ldx = ldx;
    g.M = m;
    g.N = n;
    g.K = dim;
    g.x_vnni = packed_rows(x_packed.get(), x_at, a, it, dim);
    x_rows.attach(g, it.m0);
    g.w = weight_view(a->w1[it.expert]).row_slice(it.n0, n);
    g.y = h + it.m0 * max_inter + it.n0;
    g.ldy = max_inter;
    ctx.k->gemm_nt(g, 0, m, 0, n);
    g.w = weight_view(a->w3[it.expert]).row_slice(it.n0, n);
    g.y = up.data();
    g.ldy = n;
    ctx.k->gemm_nt(g, 0, m, 0, n);
    for (int64_t r = 0; r < m; ++r) {
      float* hr = h + (it.m0 + r) * max_inter + it.n0;
      ctx.k->silu_mul(hr, up.data() + r * n, hr, n);
    }
  });

  // Phase 2: out = h w2^T, straight into y when rows map 1:1 and are unweighted,
  // otherwise into a scratch that phase 3 combines.
  const bool direct = a->out_index == nullptr && a->row_weight == nullptr && !a->accumulate;
  AlignedBuffer<float> out_buf(direct ? 0 : static_cast<size_t>(rows * dim));
  float* out = direct ? y : out_buf.data();
  const int64_t ldo = direct ? ldy : dim;
  const std::vector<Item> down_items = plan_items(a, dims, ctx.pool.num_threads());
  std::vector<int64_t> h_at;
  const auto h_packed = pack_expert_rows(ctx, a, h, max_inter, inter, a->w2, h_at);
  // Experts of one call share their inter size in every model; with mixed sizes, tiles round
  // their own rows.
  const bool same_inter = std::all_of(inter.begin(), inter.end(), [&](int64_t v) { return v == max_inter; });
  const PackedRows h_rows =
      same_inter ? pack_rows(ctx, h, max_inter, rows, max_inter, any_bf16(a->w2, a->num_experts)) : PackedRows{};
  ctx.pool.parallel_for(static_cast<int64_t>(down_items.size()), [&](int64_t i, int) {
    const Item& it = down_items[static_cast<size_t>(i)];
    Gemm g;
    g.x = h + it.m0 * max_inter;
    g.ldx = max_inter;
    g.M = it.m1 - it.m0;
    g.N = it.n1 - it.n0;
    g.K = inter[it.expert];
    g.x_vnni = packed_rows(h_packed.get(), h_at, a, it, g.K);
    h_rows.attach(g, it.m0);
    g.w = weight_view(a->w2[it.expert]).row_slice(it.n0, g.N);
    g.y = out + it.m0 * ldo + it.n0;
    g.ldy = ldo;
    ctx.k->gemm_nt(g, 0, g.M, 0, g.N);
  });
  if (direct) return EM_OK;

  // Phase 3: y[out_index[r]] (+)= row_weight[r] * out[r]. Split by columns so every
  // thread owns its slice of y: no races, and a fixed summation order.
  const int64_t y_rows = a->y->shape[0];
  constexpr int64_t kCols = 256;
  const int64_t col_blocks = (dim + kCols - 1) / kCols;
  ctx.pool.parallel_for(col_blocks, [&](int64_t cb, int) {
    const int64_t c0 = cb * kCols, c1 = std::min(dim, c0 + kCols);
    if (!a->accumulate) {
      for (int64_t r = 0; r < y_rows; ++r) std::fill(y + r * ldy + c0, y + r * ldy + c1, 0.0f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float w = a->row_weight ? a->row_weight[r] : 1.0f;
      float* yr = y + (a->out_index ? a->out_index[r] : r) * ldy;
      const float* orow = out + r * dim;
      for (int64_t c = c0; c < c1; ++c) yr[c] += w * orow[c];
    }
  });
  return EM_OK;
}

}  // namespace em::cpu
