// mla_attention: the absorbed-weight kernel against the *naive* MLA of DeepSeek's
// reference (decompress every cached latent with wkv_b into per-head keys and values,
// then ordinary causal attention), in double. Covers prefill, decode, chunked prefill,
// a batch of sequences with different cache lengths, f32/bf16 caches, and every weight
// dtype (fp8 heads that start inside a 128-row scale block).
#include <memory>

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

void run_case(Rng& rng, const Dims& d, const std::vector<Seq>& seqs, em_dtype wdt, em_dtype cache_dt) {
  const int64_t row = d.C + d.dr;
  TestWeight wkv_b = make_weight(rng, wdt, d.H * (d.dn + d.dv), d.C, 0.25f);
  std::vector<std::vector<uint8_t>> cache_bytes;
  std::vector<std::vector<double>> cache_ref;
  std::vector<em_tensor> caches;
  std::vector<int32_t> positions, q_offsets = {0};
  for (const Seq& s : seqs) {
    const size_t n = static_cast<size_t>(s.cache_rows * row);
    std::vector<double> ref;
    std::vector<uint8_t> bytes = random_cache(rng, cache_dt, n, &ref);
    cache_bytes.push_back(std::move(bytes));
    cache_ref.push_back(std::move(ref));
    caches.push_back(em_tensor_2d(cache_bytes.back().data(), cache_dt, s.cache_rows, row));
    positions.insert(positions.end(), s.positions.begin(), s.positions.end());
    q_offsets.push_back(static_cast<int32_t>(positions.size()));
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
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      std::vector<float> out(static_cast<size_t>(T * d.H * d.dv), 7.0f);
      em_tensor ot = em_tensor_3d(out.data(), EM_F32, T, d.H, d.dv);
      em_mla_args a{static_cast<int32_t>(d.H), static_cast<int32_t>(d.dn), static_cast<int32_t>(d.dr),
                    static_cast<int32_t>(d.dv), static_cast<int32_t>(d.C), static_cast<float>(scale), &qt,
                    positions.data(), static_cast<int32_t>(seqs.size()), q_offsets.data(), caches.data(), &wt, &ot};
      CHECK_OK(em_mla_attention(be.b, &a));
      const double tol = isa == EM_ISA_AVX512_BF16 ? 2e-2 : 2e-4;
      for (size_t i = 0; i < out.size(); ++i) {
        if (std::fabs(out[i] - want[i]) > tol * (0.1 + std::fabs(want[i]))) {
          CHECK(false, "%s w=%s cache=%s i=%zu got %g want %g", be.label.c_str(), em_dtype_name(wdt),
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

void test_errors() {
  Backend be(EM_ISA_SCALAR, 1);
  std::vector<float> q(2 * 2 * 6), cache(4 * 6), w(2 * 8 * 4), out(2 * 2 * 4);
  em_tensor qt = em_tensor_3d(q.data(), EM_F32, 2, 2, 6), ct = em_tensor_2d(cache.data(), EM_F32, 4, 6);
  em_tensor wt = em_tensor_2d(w.data(), EM_F32, 16, 4), ot = em_tensor_3d(out.data(), EM_F32, 2, 2, 4);
  int32_t pos[2] = {0, 4};  // 4 is past the cache's 4 rows
  em_mla_args a{2, 4, 2, 4, 4, 0.5f, &qt, pos, 1, nullptr, &ct, &wt, &ot};
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_ARG, "position past the cache");
  pos[1] = 3;
  CHECK_OK(em_mla_attention(be.b, &a));
  em_tensor bad_cache = em_tensor_2d(cache.data(), EM_F32, 4, 5);
  a.caches = &bad_cache;
  CHECK(em_mla_attention(be.b, &a) == EM_ERR_SHAPE, "cache row width");
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
  test_errors();
  return finish("attention");
}
