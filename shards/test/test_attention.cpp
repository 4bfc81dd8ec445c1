// mla_attention: the absorbed-weight kernel against the *naive* MLA of DeepSeek's
// reference (decompress every cached latent with wkv_b into per-head keys and values,
// then ordinary causal attention), in double. Covers prefill, decode, chunked prefill,
// a batch of sequences with different cache lengths, f32/bf16 caches, and every weight
// dtype (fp8 heads that start inside a 128-row scale block); and the same over paged
// caches (em_kv_pages: f32, bf16 and fp8 rows in shuffled blocks), read in place by the
// CPU backend and gathered by the dispatcher for a backend that does not read pages.
#include <algorithm>
#include <memory>
#include <numeric>

#include "test/harness.h"

using namespace test;

namespace {

struct Dims {
  int64_t H, dn, dr, dv, C;
};

struct Seq {
  int64_t cache_rows;
  std::vector<int32_t> positions;  // of its query tokens
};

// Reference: naive MLA for one query token of one head.
void naive(const Dims& d, const float* q_tok, const std::vector<double>& cache, int64_t pos, const TestWeight& wkv_b,
           double scale, int64_t h, double* out) {
  const int64_t row = d.C + d.dr;
  std::vector<double> score(static_cast<size_t>(pos + 1));
  double mx = -INFINITY;
  for (int64_t s = 0; s <= pos; ++s) {
    double acc = 0.0;
    for (int64_t i = 0; i < d.dn; ++i) {  // k_nope = W_uk[h] latent[s]
      double k = 0.0;
      for (int64_t c = 0; c < d.C; ++c) k += wkv_b.at(h * (d.dn + d.dv) + i, c) * cache[s * row + c];
      acc += q_tok[h * (d.dn + d.dr) + i] * k;
    }
    for (int64_t i = 0; i < d.dr; ++i) acc += q_tok[h * (d.dn + d.dr) + d.dn + i] * cache[s * row + d.C + i];
    score[s] = acc * scale;
    mx = std::max(mx, score[s]);
  }
  double sum = 0.0;
  for (auto& v : score) sum += (v = std::exp(v - mx));
  for (int64_t j = 0; j < d.dv; ++j) {
    double acc = 0.0;
    for (int64_t s = 0; s <= pos; ++s) {  // v = W_uv[h] latent[s]
      double v = 0.0;
      for (int64_t c = 0; c < d.C; ++c) v += wkv_b.at(h * (d.dn + d.dv) + d.dn + j, c) * cache[s * row + c];
      acc += score[s] / sum * v;
    }
    out[j] = acc;
  }
}

// Where the rows live: contiguous caches, a paged pool, or a paged pool handed to a backend
// that does not read pages (the dispatcher gathers them).
enum class Layout { Contiguous, Paged, PagedGathered };

// One random cache row in `dtype` (paged layout for fp8: codes | f32 scales | bf16 pe) and
// the exact value of each of its C + dr elements as stored.
void random_row(Rng& rng, em_dtype dtype, const Dims& d, uint8_t* out, double* ref) {
  const int64_t W = d.C + d.dr;
  if (dtype != EM_F8_E4M3) {
    std::vector<double> r;
    const std::vector<uint8_t> b = random_cache(rng, dtype, static_cast<size_t>(W), &r);
    std::memcpy(out, b.data(), b.size());
    std::copy(r.begin(), r.end(), ref);
    return;
  }
  const int64_t ns = (d.C + 127) / 128;
  for (int64_t b = 0; b < ns; ++b) {
    const float scale = rng.uniform(0.5f, 2.0f) / 448.0f;
    std::memcpy(out + d.C + 4 * b, &scale, 4);
    for (int64_t c = b * 128; c < std::min(d.C, b * 128 + 128); ++c) {
      uint8_t code;
      do code = static_cast<uint8_t>(rng.integer(0, 255));
      while ((code & 0x7f) == 0x7f);  // not NaN
      out[c] = code;
      ref[c] = ref_fp8(code) * static_cast<double>(scale);
    }
  }
  std::vector<double> r;
  const std::vector<uint8_t> pe = random_cache(rng, EM_BF16, static_cast<size_t>(d.dr), &r);
  std::memcpy(out + d.C + 4 * ns, pe.data(), pe.size());
  std::copy(r.begin(), r.end(), ref + d.C);
}

void run_case(Rng& rng, const Dims& d, const std::vector<Seq>& seqs, em_dtype wdt, em_dtype cache_dt,
              Layout layout = Layout::Contiguous, int32_t block_size = 4, bool shuffle = true) {
  const int64_t row = d.C + d.dr;
  const size_t rb = em_kv_row_bytes(cache_dt, static_cast<int32_t>(d.C), static_cast<int32_t>(d.dr));
  TestWeight wkv_b = make_weight(rng, wdt, d.H * (d.dn + d.dv), d.C, 0.25f);
  std::vector<std::vector<uint8_t>> cache_bytes;
  std::vector<std::vector<double>> cache_ref;
  std::vector<em_tensor> caches;
  std::vector<int32_t> positions, q_offsets = {0};
  for (const Seq& s : seqs) {
    std::vector<double> ref(static_cast<size_t>(s.cache_rows * row));
    std::vector<uint8_t> bytes(static_cast<size_t>(s.cache_rows) * rb);
    for (int64_t r = 0; r < s.cache_rows; ++r) random_row(rng, cache_dt, d, bytes.data() + r * rb, ref.data() + r * row);
    cache_bytes.push_back(std::move(bytes));
    cache_ref.push_back(std::move(ref));
    if (layout == Layout::Contiguous)
      caches.push_back(em_tensor_2d(cache_bytes.back().data(), cache_dt, s.cache_rows, row));
    positions.insert(positions.end(), s.positions.begin(), s.positions.end());
    q_offsets.push_back(static_cast<int32_t>(positions.size()));
  }
  // Paged: every sequence's rows in blocks of one pool, blocks in shuffled order, one spare.
  std::vector<uint8_t> pool;
  std::vector<int32_t> table, table_offsets = {0};
  em_kv_pages pages{};
  if (layout != Layout::Contiguous) {
    int32_t num_blocks = 1;
    for (const Seq& s : seqs) num_blocks += static_cast<int32_t>((s.cache_rows + block_size - 1) / block_size);
    std::vector<int32_t> order(static_cast<size_t>(num_blocks));
    std::iota(order.begin(), order.end(), 0);
    if (shuffle)  // else in order: a sequence's blocks follow each other (read as runs)
      for (size_t i = order.size() - 1; i > 0; --i)
        std::swap(order[i], order[static_cast<size_t>(rng.integer(0, static_cast<int>(i)))]);
    pool.assign(static_cast<size_t>(num_blocks) * static_cast<size_t>(block_size) * rb, 0xee);
    size_t next = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
      for (int64_t r = 0; r < seqs[s].cache_rows; r += block_size) {
        const int32_t b = order[next++];
        table.push_back(b);
        const int64_t n = std::min<int64_t>(block_size, seqs[s].cache_rows - r);
        std::memcpy(pool.data() + static_cast<size_t>(b) * static_cast<size_t>(block_size) * rb,
                    cache_bytes[s].data() + static_cast<size_t>(r) * rb, static_cast<size_t>(n) * rb);
      }
      table_offsets.push_back(static_cast<int32_t>(table.size()));
    }
    pages = em_kv_pages{pool.data(), cache_dt, num_blocks, block_size, table.data(), table_offsets.data()};
  }
  const int64_t T = static_cast<int64_t>(positions.size());
  const std::vector<float> q = rng.vec(static_cast<size_t>(T * d.H * (d.dn + d.dr)));
  const double scale = em_mla_softmax_scale(static_cast<int32_t>(d.dn + d.dr), 40.0, 0.707);

  std::vector<double> want(static_cast<size_t>(T * d.H * d.dv));
  for (size_t s = 0; s < seqs.size(); ++s)
    for (int64_t t = q_offsets[s]; t < q_offsets[s + 1]; ++t)
      for (int64_t h = 0; h < d.H; ++h)
        naive(d, q.data() + t * d.H * (d.dn + d.dr), cache_ref[s], positions[t], wkv_b, scale, h,
              want.data() + (t * d.H + h) * d.dv);

  em_tensor qt = em_tensor_3d(const_cast<float*>(q.data()), EM_F32, T, d.H, d.dn + d.dr);
  em_tensor wt = wkv_b.view();
  const char* layout_name = layout == Layout::Contiguous ? "contiguous" : layout == Layout::Paged ? "paged" : "gathered";
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      // A backend that does not read pages: the CPU's op table without reads_pages.
      em_backend_iface no_pages = *be.b->iface;
      no_pages.reads_pages = nullptr;
      em_backend gathering{&no_pages, be.b->ctx};
      em_backend* target = layout == Layout::PagedGathered ? &gathering : be.b;
      std::vector<float> out(static_cast<size_t>(T * d.H * d.dv), 7.0f);
      em_tensor ot = em_tensor_3d(out.data(), EM_F32, T, d.H, d.dv);
      em_mla_args a{static_cast<int32_t>(d.H),
                    static_cast<int32_t>(d.dn),
                    static_cast<int32_t>(d.dr),
                    static_cast<int32_t>(d.dv),
                    static_cast<int32_t>(d.C),
                    static_cast<float>(scale),
                    &qt,
                    positions.data(),
                    static_cast<int32_t>(seqs.size()),
                    q_offsets.data(),
                    layout == Layout::Contiguous ? caches.data() : nullptr,
                    &wt,
                    &ot,
                    layout == Layout::Contiguous ? nullptr : &pages};
      CHECK_OK(em_mla_attention(target, &a));
      // bf16 dot products round the query rows to bf16: over contexts of hundreds of rows the
      // softmax's shifts reach a few percent of the largest output.
      const bool bf16_dots = isa >= EM_ISA_AVX512_BF16;
      const double tol = bf16_dots ? 2e-2 : 2e-4;
      double scale = 0;
      for (double v : want) scale = std::max(scale, std::fabs(v));
      for (size_t i = 0; i < out.size(); ++i) {
        const double bound = std::max(tol * (0.1 + std::fabs(want[i])), bf16_dots ? 5e-2 * scale : 0.0);
        if (std::fabs(out[i] - want[i]) > bound) {
          CHECK(false, "%s %s w=%s cache=%s i=%zu got %g want %g", be.label.c_str(), layout_name, em_dtype_name(wdt),
                em_dtype_name(cache_dt), i, out[i], want[i]);
          break;
        }
      }
    }
  }
}

std::vector<int32_t> range(int32_t a, int32_t b) {
  std::vector<int32_t> v;
  for (int32_t i = a; i < b; ++i) v.push_back(i);
  return v;
}

// A long sequence's context is split at fixed rows (cpu/attention.cpp split_rows), never by
// what else the call holds or the thread count: its output must be the same bits alone, beside
// other sequences (which change how the call is cut into items), and on 1, 2 or 3 threads.
// Contiguous f32 caches; its one decode token sees 700 rows (two splits of 352 at C 512).
void test_split_invariance() {
  const Dims d{4, 16, 8, 16, 512};
  const int64_t row = d.C + d.dr;
  Rng rng(11);
  TestWeight wkv_b = make_weight(rng, EM_BF16, d.H * (d.dn + d.dv), d.C, 0.25f);
  em_tensor wt = wkv_b.view();
  const std::vector<int64_t> lengths = {700, 90, 300, 16};  // the first is the subject
  std::vector<std::vector<float>> cache;
  for (int64_t n : lengths) cache.push_back(rng.vec(static_cast<size_t>(n * row)));
  const std::vector<float> q_all = rng.vec(static_cast<size_t>(lengths.size() * d.H * (d.dn + d.dr)));
  const double scale = em_mla_softmax_scale(static_cast<int32_t>(d.dn + d.dr), 40.0, 0.707);
  // The subject's output (its one decode token) for the first `n` sequences on `threads`.
  auto subject = [&](em_cpu_isa isa, int threads, size_t n) {
    Backend be(isa, threads);
    std::vector<em_tensor> caches;
    std::vector<int32_t> positions, q_offsets = {0};
    for (size_t s = 0; s < n; ++s) {
      caches.push_back(em_tensor_2d(cache[s].data(), EM_F32, lengths[s], row));
      positions.push_back(static_cast<int32_t>(lengths[s] - 1));
      q_offsets.push_back(static_cast<int32_t>(s + 1));
    }
    const int64_t T = static_cast<int64_t>(n);
    em_tensor qt = em_tensor_3d(const_cast<float*>(q_all.data()), EM_F32, T, d.H, d.dn + d.dr);
    std::vector<float> out(static_cast<size_t>(T * d.H * d.dv), 7.0f);
    em_tensor ot = em_tensor_3d(out.data(), EM_F32, T, d.H, d.dv);
    em_mla_args a{static_cast<int32_t>(d.H), static_cast<int32_t>(d.dn), static_cast<int32_t>(d.dr),
                  static_cast<int32_t>(d.dv), static_cast<int32_t>(d.C), static_cast<float>(scale),
                  &qt, positions.data(), static_cast<int32_t>(n), q_offsets.data(), caches.data(), &wt, &ot, nullptr};
    CHECK_OK(em_mla_attention(be.b, &a));
    out.resize(static_cast<size_t>(d.H * d.dv));
    return out;
  };
  for (em_cpu_isa isa : available_isas()) {
    const std::vector<float> alone = subject(isa, 1, 1);
    for (int threads : {1, 2, 3})
      for (size_t n : {size_t{1}, size_t{2}, lengths.size()}) {
        const std::vector<float> got = subject(isa, threads, n);
        CHECK(std::memcmp(got.data(), alone.data(), alone.size() * sizeof(float)) == 0,
              "%s: the split sequence's output changed with %d threads and %zu sequences", em_cpu_isa_name(isa),
              threads, n);
      }
  }
}

void test_errors() {
  Backend be(EM_ISA_SCALAR, 1);
  std::vector<float> q(2 * 2 * 6), cache(4 * 6), w(2 * 8 * 4), out(2 * 2 * 4);
  em_tensor qt = em_tensor_3d(q.data(), EM_F32, 2, 2, 6), ct = em_tensor_2d(cache.data(), EM_F32, 4, 6);
  em_tensor wt = em_tensor_2d(w.data(), EM_F32, 16, 4), ot = em_tensor_3d(out.data(), EM_F32, 2, 2, 4);
  int32_t pos[2] = {0, 4};  // 4 is past the cache's 4 rows
  em_mla_args a{2, 4, 2, 4, 4, 0.5f, &qt, pos, 1, nullptr, &ct, &wt, &ot, nullptr};
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_ARG, "position past the cache");
  pos[1] = 3;
  CHECK_OK(em_mla_attention(be.b, &a));
  em_tensor bad_cache = em_tensor_2d(cache.data(), EM_F32, 4, 5);
  a.caches = &bad_cache;
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_SHAPE, "cache row width");

  // Paged: two blocks of 2 rows (row width 6 f32); positions must stay inside the table.
  std::vector<float> pool(3 * 2 * 6);
  int32_t table[2] = {2, 0}, offsets[2] = {0, 2};
  em_kv_pages pages{pool.data(), EM_F32, 3, 2, table, offsets};
  a.caches = nullptr;
  a.pages = &pages;
  CHECK_OK(em_mla_attention(be.b, &a));
  CHECK(em_kv_row_bytes(EM_F8_E4M3, 512, 64) == 656, "fp8 row bytes (FlashMLA's 656)");
  CHECK(em_kv_row_bytes(EM_I32, 512, 64) == 0, "no i32 rows");
  a.caches = &ct;
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_ARG, "caches and pages both");
  a.caches = nullptr;
  table[0] = 3;
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_ARG, "block id past the pool");
  table[0] = 2;
  offsets[1] = 1;  // one block: 2 rows, position 3 outside
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_ARG, "position past the sequence's blocks");
  offsets[1] = 2;
  pages.dtype = EM_F16;
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_DTYPE, "f16 pages");
}

}  // namespace

int main() {
  Rng rng(6);
  const Dims small{3, 16, 8, 12, 40};   // C + dr = 48, C has an 8-wide tail
  const Dims wide{16, 32, 16, 32, 64};  // H * (dn + dv) = 1024 rows: fp8 heads straddle 128-row blocks
  for (em_dtype wdt : weight_dtypes()) {
    for (em_dtype cdt : {EM_F32, EM_BF16}) {
      run_case(rng, small, {{9, range(0, 9)}}, wdt, cdt);                   // prefill
      run_case(rng, small, {{20, {19}}}, wdt, cdt);                          // decode
      run_case(rng, small, {{30, range(5, 30)}, {3, {2}}, {7, range(4, 7)}}, wdt, cdt);  // batch, chunked
    }
  }
  run_case(rng, wide, {{70, range(0, 70)}}, EM_BF16, EM_BF16);  // several query blocks
  run_case(rng, wide, {{33, {32}}, {12, {11}}}, EM_F8_E4M3, EM_F32);
  // Paged caches: block sizes that do and do not divide the lengths, a partial last block,
  // a sequence attending to fewer rows than it holds (chunked prefill).
  for (em_dtype cdt : {EM_F32, EM_BF16, EM_F8_E4M3}) {
    for (Layout layout : {Layout::Paged, Layout::PagedGathered}) {
      run_case(rng, small, {{9, range(0, 9)}}, EM_BF16, cdt, layout, 4);
      run_case(rng, small, {{20, {19}}, {1, {0}}, {17, range(10, 14)}}, EM_F32, cdt, layout, 16);
      run_case(rng, small, {{30, range(5, 30)}, {3, {2}}, {7, range(4, 7)}}, EM_F8_E4M3, cdt, layout, 5);
    }
  }
  run_case(rng, wide, {{70, {69}}, {40, range(30, 40)}}, EM_BF16, EM_F8_E4M3, Layout::Paged, 16);
  run_case(rng, Dims{2, 8, 8, 8, 200}, {{12, {11}}}, EM_F32, EM_F8_E4M3, Layout::Paged, 3);  // 2 scales per row
  run_case(rng, Dims{2, 8, 6, 8, 45}, {{20, {19}}}, EM_F32, EM_F8_E4M3, Layout::Paged, 4);  // SIMD tail of 5 codes
  // Contexts of several chunks (kChunkBytes of cache rows: 112-row chunks of f32 rows at
  // C 512): the online softmax's rescaling when a later chunk raises the max, and query
  // tokens that see none of a later chunk (positions 100.. in blocks of 16 queries). From
  // 448 rows (twice split_rows' minimum at these dims) the context is split and the splits
  // merged. (ctest also runs every case split every 16 rows: attention_split.)
  const Dims long_rows{2, 16, 8, 16, 512};
  for (em_dtype cdt : {EM_F32, EM_BF16, EM_F8_E4M3}) {
    run_case(rng, long_rows, {{300, {299}}, {113, {112}}, {230, range(100, 230)}}, EM_BF16, cdt, Layout::Paged, 16);
    if (cdt != EM_F8_E4M3) run_case(rng, long_rows, {{300, {299}}, {260, range(100, 260)}}, EM_F32, cdt);
    // Split contexts (two near-equal splits of 352 and of 240 rows at these dims).
    run_case(rng, long_rows, {{700, {699}}, {460, range(440, 460)}}, EM_BF16, cdt, Layout::Paged, 16);
  }
  // The multi-head form (from 32 query tokens of a sequence at these dims; mha_min_queries):
  // query blocks of 64 with a partial last one, cache rows up-projected 256 at a time (three
  // chunks, the last partial), beside sequences in the absorbed form in the same call. (ctest
  // also runs every case in each form: attention_absorbed, attention_multi_head.)
  for (em_dtype cdt : {EM_F32, EM_BF16, EM_F8_E4M3}) {
    run_case(rng, small, {{600, range(400, 600)}, {50, {49}}, {90, range(80, 90)}}, EM_BF16, cdt, Layout::Paged, 16);
    run_case(rng, small, {{200, range(0, 200)}}, EM_F8_E4M3, cdt, Layout::Paged, 5);
  }
  run_case(rng, small, {{520, range(250, 520)}, {30, range(0, 30)}}, EM_F32, EM_BF16);
  // Blocks in pool order (a prompt's blocks, reserved together, usually are).
  for (em_dtype cdt : {EM_F32, EM_BF16, EM_F8_E4M3})
    run_case(rng, small, {{150, {149}}, {7, range(2, 7)}, {66, range(60, 66)}}, EM_BF16, cdt, Layout::Paged, 4, false);
  test_split_invariance();
  test_errors();
  return finish("attention");
}
