// Attention family: MLA over the compressed latent cache, in DeepSeek's absorbed form
// (reference `MLA.forward` with attn_impl == "absorb"):
//   q_lat[t, h]  = q_nope[t, h] W_uk[h]                 W_uk[h] = wkv_b[h*(dn+dv) : +dn]   [dn, C]
//   score[t,h,s] = (q_lat . latent[s] + q_pe[t,h] . pe[s]) * softmax_scale,  s <= pos[t]
//   o_lat[t, h]  = softmax(score) @ latent                                               [C]
//   out[t, h]    = W_uv[h] o_lat                        W_uv[h] = wkv_b[h*(dn+dv)+dn : +dv] [dv, C]
// The cache row is [latent (C) | pe (dr)], so the two score terms are one dot product of
// [q_lat | q_pe] with the cache row. Prefill and decode are the same code: a query block
// of a sequence sees the cache rows up to its positions. The rows are read in place: a
// contiguous cache as one run, a paged cache (em_kv_pages) block by block, fp8 blocks
// widened to f32 a chunk at a time.
//
// A sequence with many query tokens in the call (a prefill chunk; mha_min_queries) runs the
// other form instead, DeepSeek's "naive" one (vLLM's MLA prefill): each chunk of cache rows
// is up-projected once through wkv_b to per-head keys and values, and attention is ordinary
// multi-head attention over them:
//   k[s, h] = [W_uk[h] latent[s] | pe[s]],  v[s, h] = W_uv[h] latent[s]
//   out[t, h] = softmax(q[t, h] . k[., h] * softmax_scale) @ v[., h]
// The same numbers in another order: a pair of query token and cache row costs H * (dn + dr
// + dv) multiply-adds instead of H * (2C + dr), 3.4x fewer at V3's and mini-v3's dims, for
// the up-projection's H * (dn + dv) * C per cache row and call, which many queries share.
//
// The context is read in chunks of cache rows small enough to stay in L2 (kChunkBytes): a
// chunk's scores, then its share of o_lat while its rows are still cached, with the softmax
// kept online (a running max and sum per query row; o_lat rescaled when the max grows, and
// divided by the sum at the end), as FlashAttention does. Scores over the whole context
// first and then o_lat read every row from memory twice: at 8192 tokens the second pass
// spent most of its time waiting for the rows.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "../kv_pages.h"
#include "cpu.h"

namespace em::cpu {
namespace {

// Work of the absorbed form: query tokens [t0, t1) of sequence `seq`, heads [h0, h1), over
// cache rows [r0, r1): all the rows the tokens see, or one split of them. A split writes its
// online softmax's state (unnormalized o_lat, running max and sum per query row) to its
// group's place, and a pass after the items merges a group's splits (flash-decoding).
struct Item {
  int32_t seq;
  int64_t t0, t1;
  int64_t h0, h1;
  int64_t r0, r1;
  int64_t group = -1, split = 0;  // split items: the group (Plan::groups) and which split
};

// The splits of one (sequence, query block, head group): Plan::split_items [first, first +
// splits), whose states are splits x [rows x C o_lat | rows max | rows sum] floats, and who
// share the group's [q_lat | q_pe] rows (rows x (C + dr)), made once.
struct Group {
  int32_t seq;
  int64_t t0, t1, h0, h1;
  int64_t first, splits;
  int64_t rows() const { return (t1 - t0) * (h1 - h0); }
};

struct Plan {
  std::vector<Item> whole;        // items that cover all their rows and write their output
  std::vector<Item> split_items;  // by group, in order
  std::vector<Group> groups;
};

constexpr int64_t kMaxQueryBlock = 16;
constexpr int64_t kChunkBytes = int64_t{256} << 10;  // cache row bytes per chunk (L2-resident)
constexpr int64_t kScoreBudget = int64_t{1} << 21;  // floats of scores per item (8 MiB)
// The multi-head form: cache rows up-projected this many at a time, and query tokens per item.
constexpr int64_t kMhaKeyChunk = 256;
constexpr int64_t kMhaQueryBlock = 64;

// An integer setting from the environment, or none when unset or empty. Read per call, not
// once: a benchmark or a test switches it in process (a call costs far more than getenv).
std::optional<int64_t> env_override(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return std::nullopt;
  return static_cast<int64_t>(std::atoll(env));
}

// The query tokens of sequence s in this call.
int64_t queries_of(const em_mla_args* a, int32_t s) {
  return a->q_offsets ? a->q_offsets[s + 1] - a->q_offsets[s] : a->q->shape[0];
}

// From how many query tokens of a sequence the multi-head form costs less: its up-projection,
// H (dn + dv) C multiply-adds per cache row, against what it saves per query token and row,
// H (2C + dr) - H (dn + dr + dv). V3's dims: 171 (measured at 16 heads and 4096 rows: equal
// at about 150); mini-v3's: 86; never under 32. $EM_MLA_MHA_MIN_QUERIES overrides it (0:
// never).
int64_t mha_min_queries(const em_mla_args* a) {
  if (const std::optional<int64_t> n = env_override("EM_MLA_MHA_MIN_QUERIES"))
    return *n > 0 ? *n : std::numeric_limits<int64_t>::max();
  const int64_t C = a->kv_lora_rank, dn = a->qk_nope_head_dim, dr = a->qk_rope_head_dim, dv = a->v_head_dim;
  const int64_t saved = (2 * C + dr) - (dn + dr + dv);
  if (saved <= 0) return std::numeric_limits<int64_t>::max();
  // At least 32: a decode step's few tokens (speculative drafts: up to 16) stay absorbed
  // whatever the dims, where the multi-head form's per-call buffers would dominate.
  return std::max<int64_t>(32, ((dn + dv) * C + saved - 1) / saved + 1);
}

// A batch-invariant backend never takes it: a query token's numbers would then depend on how
// many tokens of its sequence share the call.
bool multi_head_form(const Context& ctx, const em_mla_args* a, int32_t s) {
  return !ctx.invariant && queries_of(a, s) >= mha_min_queries(a);
}

// Cache rows per chunk: about kChunkBytes of them, a whole number of blocks of a paged cache.
int64_t chunk_rows(const em_mla_args* a, int32_t s) {
  const int64_t C = a->kv_lora_rank, dr = a->qk_rope_head_dim;
  const em_dtype dt = a->pages ? a->pages->dtype : a->caches[s].dtype;
  const int64_t bytes = static_cast<int64_t>(kv_row_bytes(dt == EM_F8_E4M3 ? EM_F32 : dt, C, dr));
  const int64_t unit = a->pages ? a->pages->block_size : 16;
  return std::max<int64_t>(1, kChunkBytes / bytes / unit) * unit;
}

// Where the context of sequence s, whose query tokens see at most L rows, is split: at
// multiples of the rows returned (L or more: not split). A split's state is H (C + 2) floats
// per query token against its rows' C + dr each, so a split has at least 16 H rows (the
// state ~1/16 of what the split reads) and two chunks; the context is cut into an even number
// of near-equal splits (2 or 4 threads get equal shares). Fixed by the sequence's own query
// tokens and the dims, never by the batch, the query blocks or the thread count: a
// sequence's output is the same bits whatever else the call holds. $EM_MLA_SPLIT_ROWS (read
// per call; rounded up to whole blocks) splits every that many rows instead, for tests.
// A batch-invariant backend splits every min_rows rows whatever L is, so that where a query
// token's splits fall depends on its dims alone, not on which of its sequence's tokens share
// the call (a row that sees only the first splits merges exactly as if the others were not
// there; later chunks it does not see add zeros).
int64_t split_rows(const em_mla_args* a, int32_t s, int64_t L, bool invariant) {
  const int64_t unit = a->pages ? a->pages->block_size : 16;
  if (const std::optional<int64_t> n = env_override("EM_MLA_SPLIT_ROWS"); n && *n > 0)
    return (*n + unit - 1) / unit * unit;
  const int64_t chunk = chunk_rows(a, s);
  const int64_t min_rows = chunk * std::max<int64_t>(2, (16 * a->num_heads + chunk - 1) / chunk);
  if (invariant) return min_rows;
  int64_t n = L / min_rows;
  if (n < 2) return std::max<int64_t>(L, 1);
  n -= n % 2;
  const int64_t per = (L + n - 1) / n;
  return (per + unit - 1) / unit * unit;
}

Plan plan_items(const Context& ctx, const em_mla_args* a) {
  const int threads = ctx.pool.num_threads();
  const int64_t H = a->num_heads, T = a->q->shape[0];
  auto seq_range = [&](int32_t s, int64_t& t0, int64_t& t1) {
    t0 = a->q_offsets ? a->q_offsets[s] : 0;
    t1 = a->q_offsets ? a->q_offsets[s + 1] : T;
  };
  auto query_block = [&](int32_t s, int64_t heads) {
    const int64_t rows = std::max<int64_t>(
        1, a->pages ? int64_t{a->pages->table_offsets[s + 1] - a->pages->table_offsets[s]} * a->pages->block_size
                    : a->caches[s].shape[0]);
    return std::clamp<int64_t>(kScoreBudget / (heads * rows), 1, kMaxQueryBlock);
  };
  auto visible = [&](int64_t t0, int64_t t1) {
    int32_t max_pos = 0;
    for (int64_t t = t0; t < t1; ++t) max_pos = std::max(max_pos, a->positions[t]);
    return static_cast<int64_t>(max_pos) + 1;
  };
  // Calls f(s, t0, t1, L, splits) for every query block of the absorbed sequences.
  auto blocks = [&](int64_t heads, auto&& f) {
    for (int32_t s = 0; s < a->num_seqs; ++s) {
      if (multi_head_form(ctx, a, s)) continue;
      int64_t t0, t1;
      seq_range(s, t0, t1);
      const int64_t qb = query_block(s, heads), sr = split_rows(a, s, visible(t0, t1), ctx.invariant);
      for (int64_t t = t0; t < t1; t += qb) {
        const int64_t L = visible(t, std::min(t1, t + qb));
        f(s, t, std::min(t1, t + qb), L, sr, (L + sr - 1) / sr);
      }
    }
  };
  // Fewer heads per item means more items but one more pass over the cache each (splits
  // come first: they cost no extra pass).
  int64_t hb = H;
  auto count = [&](int64_t heads) {
    int64_t n = 0;
    blocks(heads, [&](int32_t, int64_t, int64_t, int64_t, int64_t, int64_t splits) {
      n += splits * ((H + heads - 1) / heads);
    });
    return n;
  };
  while (hb > 1 && count(hb) < 2 * static_cast<int64_t>(threads)) hb = (hb + 1) / 2;
  Plan plan;
  blocks(hb, [&](int32_t s, int64_t t0, int64_t t1, int64_t L, int64_t sr, int64_t splits) {
    for (int64_t h = 0; h < H; h += hb) {
      const int64_t h1 = std::min(H, h + hb);
      if (splits == 1) {
        plan.whole.push_back({s, t0, t1, h, h1, 0, L});
        continue;
      }
      plan.groups.push_back({s, t0, t1, h, h1, static_cast<int64_t>(plan.split_items.size()), splits});
      const int64_t group = static_cast<int64_t>(plan.groups.size()) - 1;
      for (int64_t k = 0; k < splits; ++k)
        plan.split_items.push_back({s, t0, t1, h, h1, k * sr, std::min(L, (k + 1) * sr), group, k});
    }
  });
  return plan;
}

// The row stride of a chunk's scores [rows, n]: n rounded up to a cache line, one line more
// when that is a multiple of 4 KiB, so that the o_lat product's column of 8 rows does not
// fall in one L1 set.
int64_t score_stride(int64_t n) {
  const int64_t lines = (n + 15) / 16 * 16;
  return lines % 1024 == 0 ? lines + 16 : lines;
}

// One query row's scores over a chunk of n cache rows into its online softmax: scaled, the
// first `visible` kept and the rest zeroed, then exp(score - the new running max) in place;
// the running max and sum brought up to date, and the row's output so far `o` (dims values)
// rescaled when the max grows (not in the first chunk, where it holds nothing yet).
void online_softmax_row(const Kernels& k, float* sc, int64_t n, int64_t visible, float scale, bool later_chunk,
                        float& run_max, float& run_sum, float* o, int64_t dims) {
  float mx = run_max;
  for (int64_t j = 0; j < visible; ++j) {
    sc[j] *= scale;
    mx = std::max(mx, sc[j]);
  }
  std::fill(sc + visible, sc + n, 0.0f);
  if (visible == 0) return;
  if (mx > run_max && later_chunk) {
    const float alpha = std::exp(run_max - mx);
    run_sum *= alpha;
    for (int64_t d = 0; d < dims; ++d) o[d] *= alpha;
  }
  run_max = mx;
  run_sum += k.exp_sum(sc, visible, mx);
}

// Calls f(r0, n, rows, next) for consecutive runs of the rows [c0, c1) of sequence s, `rows`
// a view [n, C + dr]: the whole range of a contiguous cache, a block at a time of a paged
// one (f32 or bf16 rows; fp8 pages go through gather_fp8_rows). `next`: bytes from the run
// to the sequence's next block (rows up to `L`), for Gemm::w_next; 0 for none. c0 is a
// multiple of a paged cache's block size.
template <typename F>
void for_each_run(const em_mla_args* a, int32_t s, int64_t c0, int64_t c1, int64_t L, F&& f) {
  const int64_t C = a->kv_lora_rank, dr = a->qk_rope_head_dim, W = C + dr;
  if (a->pages == nullptr) {
    f(c0, c1 - c0, weight_view(a->caches[s]).row_slice(c0, c1 - c0), int64_t{0});
    return;
  }
  const em_kv_pages& p = *a->pages;
  const int64_t B = p.block_size;
  const size_t rb = kv_row_bytes(p.dtype, C, dr);
  for (int64_t r0 = c0; r0 < c1; r0 += B) {
    const int64_t n = std::min(B, c1 - r0);
    const uint8_t* block = kv_row(p, s, r0, rb);
    Weight w;
    w.rows = n;
    w.cols = W;
    w.ld = W;
    w.data = block;
    w.dtype = p.dtype;
    f(r0, n, w, r0 + B < L ? kv_row(p, s, r0 + B, rb) - block : int64_t{0});
  }
}

// The fp8 rows [c0, c1) of paged sequence s widened to f32 into `buf`, contiguous: once for
// both of the chunk's GEMMs (a block at a time widened them twice), and one GEMM per chunk.
// (Copying f32 or bf16 rows so was measured too: no faster than reading them in place.)
Weight gather_fp8_rows(const em_mla_args* a, int32_t s, int64_t c0, int64_t c1, std::vector<float>& buf,
                   Fp8Widen widen) {
  const em_kv_pages& p = *a->pages;
  const int64_t C = a->kv_lora_rank, dr = a->qk_rope_head_dim, W = C + dr, B = p.block_size, n = c1 - c0;
  const size_t rb = kv_row_bytes(p.dtype, C, dr);
  buf.resize(static_cast<size_t>(n * W));
  for (int64_t r0 = c0; r0 < c1; r0 += B)
    kv_fp8_rows_to_f32(kv_row(p, s, r0, rb), std::min(B, c1 - r0), C, dr, buf.data() + (r0 - c0) * W, widen);
  Weight w;
  w.rows = n;
  w.cols = W;
  w.ld = W;
  w.data = buf.data();
  w.dtype = EM_F32;
  return w;
}

// Cache rows [c0, c1) of sequence s as f32 rows of C + dr into `out`.
void rows_to_f32(const em_mla_args* a, int32_t s, int64_t c0, int64_t c1, float* out, Fp8Widen widen) {
  const int64_t C = a->kv_lora_rank, dr = a->qk_rope_head_dim, W = C + dr;
  if (a->pages != nullptr && a->pages->dtype == EM_F8_E4M3) {
    const em_kv_pages& p = *a->pages;
    const size_t rb = kv_row_bytes(p.dtype, C, dr);
    for (int64_t r0 = c0; r0 < c1; r0 += p.block_size)
      kv_fp8_rows_to_f32(kv_row(p, s, r0, rb), std::min<int64_t>(p.block_size, c1 - r0), C, dr, out + (r0 - c0) * W,
                         widen);
    return;
  }
  for_each_run(a, s, c0, c1, c1, [&](int64_t r0, int64_t n, const Weight& run, int64_t) {
    for (int64_t r = 0; r < n; ++r) run.row_to_f32(r, 0, W, out + (r0 - c0 + r) * W);
  });
}

// f32 rows [rows, cols] of stride ld as a Weight.
Weight f32_rows(const float* data, int64_t rows, int64_t cols, int64_t ld) {
  Weight w;
  w.data = data;
  w.dtype = EM_F32;
  w.rows = rows;
  w.cols = cols;
  w.ld = ld;
  return w;
}

// Sequence s in the multi-head form (see the top): per chunk of cache rows, their keys and
// values for every head in one GEMM over the pool, then (head, query block) items over the
// pool, each with its online softmax across the chunks, accumulating into `out`.
void mla_multi_head(Context& ctx, const em_mla_args* a, int32_t s) {
  const int64_t H = a->num_heads, dn = a->qk_nope_head_dim, dr = a->qk_rope_head_dim, dv = a->v_head_dim,
                C = a->kv_lora_rank, W = C + dr, KV = H * (dn + dv);
  const int64_t t0 = a->q_offsets ? a->q_offsets[s] : 0, nq = queries_of(a, s);
  const float* q = static_cast<const float*>(a->q->data);
  const int64_t q_tok = a->q->stride[0], q_head = a->q->stride[1];
  float* out = static_cast<float*>(a->out->data);
  const int64_t o_tok = a->out->stride[0], o_head = a->out->stride[1];
  const Kernels& k = *ctx.k;
  int32_t max_pos = 0;
  for (int64_t t = t0; t < t0 + nq; ++t) max_pos = std::max(max_pos, a->positions[t]);
  const int64_t L = static_cast<int64_t>(max_pos) + 1;
  const int64_t blocks = (nq + kMhaQueryBlock - 1) / kMhaQueryBlock, ls = score_stride(kMhaKeyChunk);

  AlignedBuffer<float> rows(static_cast<size_t>(kMhaKeyChunk * W)), kv(static_cast<size_t>(kMhaKeyChunk * KV));
  // The keys transposed, [H][dn][ldk], then the rope parts [dr][ldk]: the scores as nn
  // products (nt ones reduce over the short dn: 1.2-1.3x slower at V3's dims).
  const int64_t ldk = score_stride(kMhaKeyChunk);
  AlignedBuffer<float> kt(static_cast<size_t>((H * dn + dr) * ldk));
  // Per (token, head): the running max and sum of the online softmax.
  std::vector<float> run_max(static_cast<size_t>(nq * H), -INFINITY), run_sum(static_cast<size_t>(nq * H), 0.0f);
  const Weight wkv_b = weight_view(*a->wkv_b);
  for (int64_t c0 = 0; c0 < L; c0 += kMhaKeyChunk) {
    const int64_t c1 = std::min(L, c0 + kMhaKeyChunk), n = c1 - c0;
    rows_to_f32(a, s, c0, c1, rows.data(), k.fp8_to_f32);
    // kv[r] = [k_nope(h) | v(h)] for every head h: the latent part of the rows times wkv_b^T
    Gemm up;
    up.x = rows.data();
    up.ldx = W;
    up.w = wkv_b;
    up.y = kv.data();
    up.ldy = KV;
    up.M = n;
    up.N = KV;
    up.K = C;
    gemm_nt(ctx, up);
    // ... and transposed: head h's keys [dn, n] (item H: the rope parts [dr, n])
    ctx.pool.parallel_for(H + 1, [&](int64_t h, int) {
      const int64_t dims = h < H ? dn : dr, ld_src = h < H ? KV : W;
      const float* src = h < H ? kv.data() + h * (dn + dv) : rows.data() + C;
      float* dst = kt.data() + h * dn * ldk;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t d = 0; d < dims; ++d) dst[d * ldk + r] = src[r * ld_src + d];
    });

    ctx.pool.parallel_for(H * blocks, [&](int64_t item, int) {
      const int64_t h = item / blocks, b0 = (item % blocks) * kMhaQueryBlock, nb = std::min(kMhaQueryBlock, nq - b0);
      int32_t block_max = 0;
      for (int64_t i = 0; i < nb; ++i) block_max = std::max(block_max, a->positions[t0 + b0 + i]);
      if (block_max < c0) return;  // no token of the block sees this chunk
      std::vector<float> scores(static_cast<size_t>(nb * ls));
      const float* qh = q + (t0 + b0) * q_tok + h * q_head;
      // scores = q_nope . k_nope + q_pe . pe, nn products over the transposed keys
      Gemm sg;
      sg.x = qh;
      sg.ldx = q_tok;
      sg.w = f32_rows(kt.data() + h * dn * ldk, dn, n, ldk);
      sg.y = scores.data();
      sg.ldy = ls;
      sg.M = nb;
      sg.N = n;
      sg.K = dn;
      k.gemm_nn(sg, 0, nb, 0, n);
      sg.x = qh + dn;
      sg.w = f32_rows(kt.data() + H * dn * ldk, dr, n, ldk);
      sg.K = dr;
      sg.accumulate = true;
      k.gemm_nn(sg, 0, nb, 0, n);

      for (int64_t i = 0; i < nb; ++i) {
        const int64_t pos = a->positions[t0 + b0 + i];
        const size_t st = static_cast<size_t>((b0 + i) * H + h);
        online_softmax_row(k, scores.data() + i * ls, n, std::clamp<int64_t>(pos + 1 - c0, 0, n), a->softmax_scale,
                           c0 > 0, run_max[st], run_sum[st], out + (t0 + b0 + i) * o_tok + h * o_head, dv);
      }
      // out += P v
      Gemm pg;
      pg.x = scores.data();
      pg.ldx = ls;
      pg.w = f32_rows(kv.data() + h * (dn + dv) + dn, n, dv, KV);
      pg.y = out + (t0 + b0) * o_tok + h * o_head;
      pg.ldy = o_tok;
      pg.M = nb;
      pg.N = dv;
      pg.K = n;
      pg.accumulate = c0 > 0;
      k.gemm_nn(pg, 0, nb, 0, dv);
    });
  }
  ctx.pool.parallel_for(nq, [&](int64_t i, int) {
    for (int64_t h = 0; h < H; ++h) {
      const float inv = 1.0f / run_sum[static_cast<size_t>(i * H + h)];
      float* o = out + (t0 + i) * o_tok + h * o_head;
      for (int64_t d = 0; d < dv; ++d) o[d] *= inv;
    }
  });
}

// [q_lat | q_pe] of query tokens [t0, t0 + nq) and heads [h0, h0 + nh) into qcat, row
// hl * nq + tl: q_lat = q_nope W_uk[h], q_pe copied beside it.
void make_qcat(const Kernels& k, const em_mla_args* a, int64_t t0, int64_t nq, int64_t h0, int64_t nh, float* qcat) {
  const int64_t dn = a->qk_nope_head_dim, dr = a->qk_rope_head_dim, dv = a->v_head_dim, C = a->kv_lora_rank;
  const int64_t row_len = C + dr;
  const Weight wkv_b = weight_view(*a->wkv_b);
  const float* q = static_cast<const float*>(a->q->data);
  const int64_t q_tok = a->q->stride[0], q_head = a->q->stride[1];
  for (int64_t hl = 0; hl < nh; ++hl) {
    const int64_t h = h0 + hl;
    Gemm g;
    g.x = q + t0 * q_tok + h * q_head;
    g.ldx = q_tok;
    g.w = wkv_b.row_slice(h * (dn + dv), dn);
    g.y = qcat + hl * nq * row_len;
    g.ldy = row_len;
    g.M = nq;
    g.N = C;
    g.K = dn;
    k.gemm_nn(g, 0, nq, 0, C);
    for (int64_t tl = 0; tl < nq; ++tl)
      std::memcpy(qcat + (hl * nq + tl) * row_len + C, q + (t0 + tl) * q_tok + h * q_head + dn,
                  static_cast<size_t>(dr) * sizeof(float));
  }
}

// out[t, h] = W_uv[h] o_lat for the same rows as make_qcat (o_lat normalized).
void project_out(const Kernels& k, const em_mla_args* a, int64_t t0, int64_t nq, int64_t h0, int64_t nh,
                 const float* o_lat) {
  const int64_t dn = a->qk_nope_head_dim, dv = a->v_head_dim, C = a->kv_lora_rank;
  const Weight wkv_b = weight_view(*a->wkv_b);
  float* out = static_cast<float*>(a->out->data);
  const int64_t o_tok = a->out->stride[0], o_head = a->out->stride[1];
  for (int64_t hl = 0; hl < nh; ++hl) {
    const int64_t h = h0 + hl;
    Gemm og;
    og.x = o_lat + hl * nq * C;
    og.ldx = C;
    og.w = wkv_b.row_slice(h * (dn + dv) + dn, dv);
    og.y = out + t0 * o_tok + h * o_head;
    og.ldy = o_tok;
    og.M = nq;
    og.N = dv;
    og.K = C;
    k.gemm_nt(og, 0, nq, 0, dv);
  }
}

// One item of the absorbed form (Item). qcat: its rows' [q_lat | q_pe] made already, or null.
// state: where a split writes its online softmax's state ([rows x C] o_lat, [rows] max,
// [rows] sum); null for an item that covers all its rows and writes the output.
void absorbed_item(Context& ctx, const em_mla_args* a, const Item& it, const float* qcat, float* state) {
  const int64_t C = a->kv_lora_rank, row_len = C + a->qk_rope_head_dim;  // cache row and [q_lat | q_pe]
  const Kernels& k = *ctx.k;
  const int64_t nq = it.t1 - it.t0, nh = it.h1 - it.h0, rows = nq * nh;  // row r = head * nq + token
  const int64_t chunk = std::min(it.r1 - it.r0, chunk_rows(a, it.seq));
  const int64_t ls = score_stride(chunk);
  std::vector<float> own_qcat;
  if (qcat == nullptr) {
    own_qcat.resize(static_cast<size_t>(rows * row_len));
    make_qcat(k, a, it.t0, nq, it.h0, nh, own_qcat.data());
    qcat = own_qcat.data();
  }
  std::vector<float> scores(static_cast<size_t>(rows * ls));
  std::vector<float> o_lat_own(state ? 0 : static_cast<size_t>(rows * C));
  float* const o_lat = state ? state : o_lat_own.data();
  std::vector<float> run_max_own(state ? 0 : static_cast<size_t>(rows)), run_sum_own(state ? 0 : static_cast<size_t>(rows));
  float* const run_max = state ? state + rows * C : run_max_own.data();
  float* const run_sum = state ? state + rows * (C + 1) : run_sum_own.data();
  std::fill(run_max, run_max + rows, -INFINITY);
  std::fill(run_sum, run_sum + rows, 0.0f);

  // A paged cache is a GEMM per block: with bf16 rows the query rows are packed for their
  // kernel once here, not in every block.
  const em_dtype cache_dtype = a->pages ? a->pages->dtype : a->caches[it.seq].dtype;
  const PackedRows packed = pack_rows_here(ctx.isa, qcat, row_len, rows, row_len, cache_dtype == EM_BF16);
  const bool widen = a->pages != nullptr && cache_dtype == EM_F8_E4M3;
  std::vector<float> widened;
  Weight widened_rows;
  // Runs of the chunk's rows: its widened fp8 rows, or as for_each_run reads them in place.
  auto runs = [&](int64_t c0, int64_t c1, auto&& f) {
    if (widen) return f(c0, c1 - c0, widened_rows, int64_t{0});
    for_each_run(a, it.seq, c0, c1, it.r1, f);
  };
  for (int64_t c0 = it.r0; c0 < it.r1; c0 += chunk) {
    const int64_t c1 = std::min(it.r1, c0 + chunk), n_c = c1 - c0;
    if (widen) widened_rows = gather_fp8_rows(a, it.seq, c0, c1, widened, k.fp8_to_f32);
    // scores = [q_lat | q_pe] . cache rows [c0, c1)
    runs(c0, c1, [&](int64_t r0, int64_t n, const Weight& run, int64_t next) {
      Gemm sg;
      sg.x = qcat;
      sg.ldx = row_len;
      packed.attach(sg, 0);
      sg.w = run;
      sg.y = scores.data() + (r0 - c0);
      sg.ldy = ls;
      sg.M = rows;
      sg.N = n;
      sg.K = row_len;
      sg.w_next = next;  // the next block's rows come into L2 while this one computes
      k.gemm_nt(sg, 0, rows, 0, n);
    });

    // Causal softmax in fp32, online: token t sees rows [0, pos[t]]. A row's probabilities
    // are exp(score - its running max); what o_lat and the sum hold is rescaled to a new max.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = a->positions[it.t0 + r % nq];
      online_softmax_row(k, scores.data() + r * ls, n_c, std::clamp<int64_t>(pos + 1 - c0, 0, n_c), a->softmax_scale,
                         c0 > it.r0, run_max[r], run_sum[r], o_lat + r * C, C);
    }

    // o_lat += P latent rows [c0, c1)
    runs(c0, c1, [&](int64_t r0, int64_t n, const Weight& run, int64_t) {
      Gemm pg;
      pg.x = scores.data() + (r0 - c0);
      pg.ldx = ls;
      pg.w = run;
      pg.y = o_lat;
      pg.ldy = C;
      pg.M = rows;
      pg.N = C;
      pg.K = n;
      pg.accumulate = r0 > it.r0;
      k.gemm_nn(pg, 0, rows, 0, C);
    });
  }
  if (state != nullptr) return;  // merge_splits finishes it
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / run_sum[r];
    float* o = o_lat + r * C;
    for (int64_t c = 0; c < C; ++c) o[c] *= inv;
  }
  project_out(k, a, it.t0, nq, it.h0, nh, o_lat);
}

// A group's splits merged: per query row, the splits' o_lat weighted by exp(their max - the
// largest), over their sums so weighted; then the output. A split the row sees nothing of
// (max -inf) weighs 0, so a row that sees only the first split gets that split's numbers
// exactly as an unsplit item would.
// Head hl of the group (its rows hl * nq ...), so that one group's merge spreads over the pool.
void merge_splits(const Kernels& k, const em_mla_args* a, const Group& g, int64_t hl, const float* state) {
  const int64_t C = a->kv_lora_rank, nq = g.t1 - g.t0, rows = g.rows();
  const int64_t per_split = rows * (C + 2);
  std::vector<float> o_lat(static_cast<size_t>(nq * C), 0.0f);
  for (int64_t r = hl * nq; r < (hl + 1) * nq; ++r) {
    float m = -INFINITY;
    for (int64_t sp = 0; sp < g.splits; ++sp) m = std::max(m, state[sp * per_split + rows * C + r]);
    float sum = 0.0f;
    float* o = o_lat.data() + (r - hl * nq) * C;
    for (int64_t sp = 0; sp < g.splits; ++sp) {
      const float* st = state + sp * per_split;
      const float w = std::exp(st[rows * C + r] - m);
      if (w == 0.0f) continue;
      sum += w * st[rows * (C + 1) + r];
      const float* so = st + r * C;
      for (int64_t c = 0; c < C; ++c) o[c] += w * so[c];
    }
    const float inv = 1.0f / sum;
    for (int64_t c = 0; c < C; ++c) o[c] *= inv;
  }
  project_out(k, a, g.t0, nq, g.h0 + hl, 1, o_lat.data());
}

}  // namespace

em_status mla_attention(Context& ctx, const em_mla_args* a) {
  const Kernels& k = *ctx.k;
  const int64_t C = a->kv_lora_rank, row_len = C + a->qk_rope_head_dim;
  const Plan plan = plan_items(ctx, a);
  // The split groups run in waves whose states fit wave_budget (a group larger than that is a
  // wave alone): a call of many query tokens over long contexts (short chunks of many
  // sequences after their cached prefixes) would otherwise hold gigabytes of states at V3's
  // dims. The whole items run with the first wave. Waves change no number.
  // $EM_MLA_WAVE_FLOATS (read per call) overrides the 64 MiB, for tests.
  const int64_t wave_budget = std::max<int64_t>(1, env_override("EM_MLA_WAVE_FLOATS").value_or(int64_t{16} << 20));
  const auto state_floats = [&](const Group& g) { return g.splits * g.rows() * (C + 2); };
  size_t g0 = 0;
  for (bool first = true; first || g0 < plan.groups.size(); first = false) {
    size_t g1 = g0;
    int64_t wave_floats = 0, qcat_floats = 0;
    std::vector<int64_t> state_at, qcat_at;  // per group of the wave
    while (g1 < plan.groups.size() &&
           (g1 == g0 || wave_floats + state_floats(plan.groups[g1]) <= wave_budget)) {
      state_at.push_back(wave_floats);
      qcat_at.push_back(qcat_floats);
      wave_floats += state_floats(plan.groups[g1]);
      qcat_floats += plan.groups[g1].rows() * row_len;
      ++g1;
    }
    AlignedBuffer<float> state(static_cast<size_t>(wave_floats)), qcat(static_cast<size_t>(qcat_floats));
    const int64_t groups = static_cast<int64_t>(g1 - g0);
    // The [q_lat | q_pe] rows each group's splits share, made once, a head per item (one
    // sequence's decode is one group: its heads spread over the pool).
    std::vector<std::pair<int32_t, int32_t>> heads;  // (group of the wave, head of the group)
    for (size_t i = 0; i < g1 - g0; ++i)
      for (int64_t hl = 0; hl < plan.groups[g0 + i].h1 - plan.groups[g0 + i].h0; ++hl)
        heads.emplace_back(static_cast<int32_t>(i), static_cast<int32_t>(hl));
    const int64_t n_heads = static_cast<int64_t>(heads.size());
    ctx.pool.parallel_for(n_heads, [&](int64_t j, int) {
      const auto [i, hl] = heads[static_cast<size_t>(j)];
      const Group& g = plan.groups[g0 + static_cast<size_t>(i)];
      const int64_t nq = g.t1 - g.t0;
      make_qcat(k, a, g.t0, nq, g.h0 + hl, 1, qcat.data() + qcat_at[static_cast<size_t>(i)] + hl * nq * row_len);
    });
    // This wave's split items, then (first wave) the whole ones.
    const int64_t s0 = groups > 0 ? plan.groups[g0].first : 0;
    const int64_t s1 = groups > 0 ? plan.groups[g1 - 1].first + plan.groups[g1 - 1].splits : 0;
    const int64_t whole = first ? static_cast<int64_t>(plan.whole.size()) : 0;
    ctx.pool.parallel_for((s1 - s0) + whole, [&](int64_t i, int) {
      if (i >= s1 - s0) return absorbed_item(ctx, a, plan.whole[static_cast<size_t>(i - (s1 - s0))], nullptr, nullptr);
      const Item& it = plan.split_items[static_cast<size_t>(s0 + i)];
      const size_t w = static_cast<size_t>(it.group) - g0;  // the group's place in this wave
      const Group& g = plan.groups[static_cast<size_t>(it.group)];
      absorbed_item(ctx, a, it, qcat.data() + qcat_at[w], state.data() + state_at[w] + it.split * g.rows() * (C + 2));
    });
    ctx.pool.parallel_for(n_heads, [&](int64_t j, int) {
      const auto [i, hl] = heads[static_cast<size_t>(j)];
      merge_splits(k, a, plan.groups[g0 + static_cast<size_t>(i)], hl, state.data() + state_at[static_cast<size_t>(i)]);
    });
    g0 = g1;
  }
  for (int32_t s = 0; s < a->num_seqs; ++s)
    if (multi_head_form(ctx, a, s)) mla_multi_head(ctx, a, s);
  return EM_OK;
}

}  // namespace em::cpu
