// Batch-invariant backends (em_cpu_config::batch_invariant, ADR 0027): a row's result is the
// same bits whatever shares its call. Tables of calls that hold the same rows among different
// company, on every ISA here and 1 to 3 threads:
//  - matmul: row r of x alone against row r among M rows (M across the kernels' thresholds:
//    16 rows, the 64-row x packing, the 512-row tiles), K under and over a panel of 2048, every
//    weight dtype (N 37: AMX's last weight rows in a padded tile);
//  - moe_ffn: a token alone against the same token among others routed to its experts;
//  - mla_attention: each query token of a sequence alone (a decode step) against the same
//    token in prefill chunks of other sizes (from under to over the multi-head form's query
//    count), with the sequence in a batch, over contexts that split.
// And that the invariant numbers are the default backend's within rounding.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "test/harness.h"

using namespace test;

namespace {

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
  return worst / std::max(scale, 1e-30);
}

std::vector<int> thread_counts() { return {1, 2, 3}; }

// ------------------------------------------------------------------ matmul

void test_matmul() {
  Rng rng(7);
  const int64_t N = 37;
  const std::vector<int64_t> Ms = {2, 5, 15, 16, 17, 64, 100, 530};
  const int64_t max_m = 530;
  for (const int64_t K : {int64_t{96}, int64_t{2100}, int64_t{4160}}) {
    const std::vector<float> x = rng.vec(static_cast<size_t>(max_m * K));
    for (em_dtype dt : weight_dtypes()) {
      TestWeight w = make_weight(rng, dt, N, K, 0.5f);
      em_tensor wt = w.view();
      for (em_cpu_isa isa : available_isas()) {
        // Every row alone on one thread: the reference bits.
        std::vector<float> alone(static_cast<size_t>(max_m * N));
        {
          Backend be(isa, 1, true);
          for (int64_t r = 0; r < max_m; ++r) {
            em_tensor xt = em_tensor_2d(const_cast<float*>(x.data() + r * K), EM_F32, 1, K);
            em_tensor yt = em_tensor_2d(alone.data() + r * N, EM_F32, 1, N);
            CHECK_OK(em_matmul(be.b, &xt, &wt, &yt));
          }
        }
        for (int threads : thread_counts()) {
          Backend be(isa, threads, true);
          for (int64_t M : Ms) {
            // Rows [off, off + M): a row sits at another place in each call.
            const int64_t off = (M * 7) % (max_m - M + 1);
            std::vector<float> y(static_cast<size_t>(M * N), 5.0f);
            em_tensor xt = em_tensor_2d(const_cast<float*>(x.data() + off * K), EM_F32, M, K);
            em_tensor yt = em_tensor_2d(y.data(), EM_F32, M, N);
            CHECK_OK(em_matmul(be.b, &xt, &wt, &yt));
            int64_t bad = -1;
            for (int64_t r = 0; r < M && bad < 0; ++r)
              if (!same_bits(y.data() + r * N, alone.data() + (off + r) * N, static_cast<size_t>(N))) bad = r;
            CHECK(bad < 0, "%s %s K=%lld M=%lld: row %lld differs from the row alone", be.label.c_str(),
                  em_dtype_name(dt), static_cast<long long>(K), static_cast<long long>(M), static_cast<long long>(bad));
          }
        }
        // Within rounding of the default backend (the largest M).
        Backend def(isa, 2);
        std::vector<float> y(static_cast<size_t>(max_m * N));
        em_tensor xt = em_tensor_2d(const_cast<float*>(x.data()), EM_F32, max_m, K);
        em_tensor yt = em_tensor_2d(y.data(), EM_F32, max_m, N);
        CHECK_OK(em_matmul(def.b, &xt, &wt, &yt));
        // (AMX rounds fp8 weights x scale to bf16 and the invariant backend's AVX512_BF16
        // kernels do not: accumulation_tolerance says which pairs round.)
        const double d = max_rel_diff(y, alone);
        CHECK(d < (accumulation_tolerance(isa, dt) > 1e-3 ? 1e-2 : 1e-5), "%s %s K=%lld: invariant vs default %g", def.label.c_str(), em_dtype_name(dt),
              static_cast<long long>(K), d);
      }
    }
  }
}

// ------------------------------------------------------------------ moe_ffn

void test_moe() {
  Rng rng(8);
  const int64_t dim = 2112, inter = 2080;  // both over a panel: up and down GEMMs split k
  const int32_t E = 2;
  std::vector<TestWeight> w1, w3, w2;
  for (int32_t e = 0; e < E; ++e) {
    w1.push_back(make_weight(rng, EM_BF16, inter, dim, 0.05f));
    w3.push_back(make_weight(rng, EM_BF16, inter, dim, 0.05f));
    w2.push_back(make_weight(rng, EM_BF16, dim, inter, 0.05f));
  }
  std::vector<em_tensor> w1v, w3v, w2v;
  for (int32_t e = 0; e < E; ++e) {
    w1v.push_back(w1[e].view());
    w3v.push_back(w3[e].view());
    w2v.push_back(w2[e].view());
  }
  const int64_t tokens = 24;
  const std::vector<float> x = rng.vec(static_cast<size_t>(tokens * dim));
  // Token t goes to both experts with weights 0.6 and 0.4; `count` tokens from `first`.
  auto run = [&](Backend& be, int64_t first, int64_t count) {
    std::vector<int32_t> offsets = {0, static_cast<int32_t>(count), static_cast<int32_t>(2 * count)};
    std::vector<int32_t> x_index, out_index;
    std::vector<float> weight;
    for (int32_t e = 0; e < E; ++e)
      for (int64_t t = 0; t < count; ++t) {
        x_index.push_back(static_cast<int32_t>(first + t));
        out_index.push_back(static_cast<int32_t>(t));
        weight.push_back(e == 0 ? 0.6f : 0.4f);
      }
    std::vector<float> y(static_cast<size_t>(count * dim), 3.0f);
    em_tensor xt = em_tensor_2d(const_cast<float*>(x.data()), EM_F32, tokens, dim);
    em_tensor yt = em_tensor_2d(y.data(), EM_F32, count, dim);
    em_moe_args a{&xt,          E, offsets.data(), w1v.data(), w3v.data(), w2v.data(), weight.data(),
                  out_index.data(), 0, &yt,          x_index.data()};
    CHECK_OK(em_moe_ffn(be.b, &a));
    return y;
  };
  for (em_cpu_isa isa : available_isas()) {
    Backend one(isa, 1, true);
    const std::vector<float> alone = run(one, 5, 1);  // token 5 by itself
    for (int threads : thread_counts()) {
      Backend be(isa, threads, true);
      for (int64_t first : {int64_t{0}, int64_t{3}}) {
        const int64_t count = tokens - first;
        const std::vector<float> y = run(be, first, count);
        CHECK(same_bits(y.data() + (5 - first) * dim, alone.data(), static_cast<size_t>(dim)),
              "%s moe: token 5 among %lld tokens differs from it alone", be.label.c_str(), static_cast<long long>(count));
      }
    }
  }
}

// ------------------------------------------------------------------ mla_attention

struct Dims {
  int64_t H, dn, dr, dv, C;
};

// The outputs of query tokens at positions [p0, p0 + n) of a sequence whose cache holds
// `rows` rows, computed in calls of `chunk` tokens, each call with a second sequence (its
// one decode token over `other` rows) when `other` > 0. [n, H, dv] floats.
std::vector<float> attention_outputs(Backend& be, const Dims& d, const std::vector<uint8_t>& cache, em_dtype cache_dt,
                                     int64_t rows, const std::vector<uint8_t>& other_cache, int64_t other,
                                     const std::vector<float>& q, em_tensor* wkv_b, int64_t p0, int64_t n,
                                     int64_t chunk) {
  const int64_t row = d.C + d.dr, qw = d.H * (d.dn + d.dr), ow = d.H * d.dv;
  const double scale = em_mla_softmax_scale(static_cast<int32_t>(d.dn + d.dr), 40.0, 0.707);
  std::vector<float> out(static_cast<size_t>(n * ow));
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t m = std::min(chunk, n - c0);
    const int64_t T = m + (other > 0 ? 1 : 0);
    std::vector<float> qs(static_cast<size_t>(T * qw));
    std::copy(q.begin() + (p0 + c0) * qw, q.begin() + (p0 + c0 + m) * qw, qs.begin());
    std::vector<int32_t> positions, q_offsets = {0, static_cast<int32_t>(m)};
    for (int64_t t = 0; t < m; ++t) positions.push_back(static_cast<int32_t>(p0 + c0 + t));
    std::vector<em_tensor> caches = {em_tensor_2d(const_cast<uint8_t*>(cache.data()), cache_dt, rows, row)};
    if (other > 0) {
      std::copy(q.begin(), q.begin() + qw, qs.begin() + m * qw);
      positions.push_back(static_cast<int32_t>(other - 1));
      q_offsets.push_back(static_cast<int32_t>(T));
      caches.push_back(em_tensor_2d(const_cast<uint8_t*>(other_cache.data()), cache_dt, other, row));
    }
    em_tensor qt = em_tensor_3d(qs.data(), EM_F32, T, d.H, d.dn + d.dr);
    std::vector<float> o(static_cast<size_t>(T * ow), 7.0f);
    em_tensor ot = em_tensor_3d(o.data(), EM_F32, T, d.H, d.dv);
    em_mla_args a{static_cast<int32_t>(d.H), static_cast<int32_t>(d.dn), static_cast<int32_t>(d.dr),
                  static_cast<int32_t>(d.dv), static_cast<int32_t>(d.C), static_cast<float>(scale),
                  &qt, positions.data(), static_cast<int32_t>(caches.size()), q_offsets.data(), caches.data(), wkv_b,
                  &ot, nullptr};
    CHECK_OK(em_mla_attention(be.b, &a));
    std::copy(o.begin(), o.begin() + m * ow, out.begin() + c0 * ow);
  }
  return out;
}

void test_attention() {
  // V3's latent and few heads: chunks of 112 (f32) or 224 (bf16) rows, splits of twice that,
  // so the 1500 rows split several ways.
  const Dims d{4, 16, 64, 16, 512};
  const int64_t row = d.C + d.dr, rows = 1500, other = 1100;
  Rng rng(9);
  TestWeight wkv_b = make_weight(rng, EM_BF16, d.H * (d.dn + d.dv), d.C, 0.25f);
  em_tensor wt = wkv_b.view();
  const std::vector<float> q = rng.vec(static_cast<size_t>(rows * d.H * (d.dn + d.dr)));
  // The last 200 tokens of the sequence: a prefill's last chunks, then decode steps.
  const int64_t p0 = rows - 200, n = 200;
  for (em_dtype cache_dt : {EM_F32, EM_BF16}) {
    const std::vector<uint8_t> cache = random_cache(rng, cache_dt, static_cast<size_t>(rows * row));
    const std::vector<uint8_t> other_cache = random_cache(rng, cache_dt, static_cast<size_t>(other * row));
    for (em_cpu_isa isa : available_isas()) {
      Backend one(isa, 1, true);
      const std::vector<float> alone = attention_outputs(one, d, cache, cache_dt, rows, other_cache, 0, q, &wt, p0, n, 1);
      for (int threads : thread_counts()) {
        Backend be(isa, threads, true);
        for (int64_t chunk : {int64_t{7}, int64_t{40}, int64_t{200}})
          for (int64_t with_other : {int64_t{0}, other}) {
            const std::vector<float> got =
                attention_outputs(be, d, cache, cache_dt, rows, other_cache, with_other, q, &wt, p0, n, chunk);
            int64_t bad = -1;
            const int64_t ow = d.H * d.dv;
            for (int64_t t = 0; t < n && bad < 0; ++t)
              if (!same_bits(got.data() + t * ow, alone.data() + t * ow, static_cast<size_t>(ow))) bad = t;
            CHECK(bad < 0, "%s %s cache: chunks of %lld%s: token %lld differs from it alone", be.label.c_str(),
                  em_dtype_name(cache_dt), static_cast<long long>(chunk), with_other ? " with another sequence" : "",
                  static_cast<long long>(bad));
          }
      }
      // Within rounding of the default backend's prefill (which takes the multi-head form).
      Backend def(isa, 2);
      const std::vector<float> ref = attention_outputs(def, d, cache, cache_dt, rows, other_cache, 0, q, &wt, p0, n, n);
      const double diff = max_rel_diff(alone, ref);
      // (AVX512_BF16 rounds the multi-head form's up-projection inputs to bf16: 1e-3 apart.)
      CHECK(diff < (isa >= EM_ISA_AVX512_BF16 ? 1e-2 : 1e-5), "%s %s cache: invariant vs default %g", def.label.c_str(), em_dtype_name(cache_dt), diff);
    }
  }
}

void test_info() {
  Backend inv(EM_ISA_AUTO, 1, true), def(EM_ISA_AUTO, 1);
  em_backend_info a, b;
  em_backend_get_info(inv.b, &a);
  em_backend_get_info(def.b, &b);
  CHECK(a.batch_invariant == 1 && b.batch_invariant == 0, "info: batch_invariant %d / %d", a.batch_invariant,
        b.batch_invariant);
  // A batch-invariant backend asked for AMX runs the tile unit (its invariant kernel).
  if (em_cpu_best_isa() == EM_ISA_AMX) {
    Backend amx(EM_ISA_AMX, 1, true);
    em_backend_info c;
    em_backend_get_info(amx.b, &c);
    CHECK(std::strcmp(c.isa, "amx") == 0, "invariant amx runs %s", c.isa);
  }
}

}  // namespace

int main() {
  test_info();
  test_matmul();
  test_moe();
  test_attention();
  return finish("batch_invariant");
}
