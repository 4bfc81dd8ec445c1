// sample: greedy with ties, top-k / top-p / temperature against a reference that sorts
// the whole vocabulary in double, the u -> token mapping (inverse CDF), and the
// distribution on a uniform grid of u.
#include <algorithm>
#include <numeric>

#include "test/harness.h"

using namespace test;

namespace {

struct RefPick {
  std::vector<int32_t> kept;  // walk order
  std::vector<double> cdf;    // normalized cumulative mass along `kept`
};

RefPick reference(const float* logits, int64_t V, float temp, float min_p, int32_t top_k, float top_p) {
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  const double mx = logits[order[0]] / static_cast<double>(temp);
  std::vector<double> w(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) w[i] = std::exp(logits[i] / static_cast<double>(temp) - mx);
  const bool cut_m = min_p > 0.0f, cut_p = top_p < 1.0f;
  // min_p: the tokens with probability >= min_p x the largest (w is 1 for the largest).
  if (cut_m)
    order.erase(std::find_if(order.begin(), order.end(), [&](int32_t id) { return w[id] < min_p * (1.0 - 1e-6); }),
                order.end());
  const bool cut_k = top_k > 0 && static_cast<size_t>(top_k) < order.size();
  if (cut_k) order.resize(static_cast<size_t>(top_k));
  double mass = 0.0;
  for (int32_t id : order) mass += w[id];
  if (cut_p) {
    double cum = 0.0;
    size_t keep = order.size();
    for (size_t j = 0; j < order.size(); ++j) {
      cum += w[order[j]];
      if (cum >= top_p * mass) {
        keep = j + 1;
        break;
      }
    }
    order.resize(keep);
    mass = cum;
  }
  RefPick r;
  if (!cut_k && !cut_p) {  // vocabulary order (of the tokens min_p keeps)
    r.kept = order;
    std::sort(r.kept.begin(), r.kept.end());
  } else {
    r.kept = order;
  }
  double cum = 0.0;
  for (int32_t id : r.kept) r.cdf.push_back((cum += w[id]) / mass);
  return r;
}

void test_against_reference(Backend& be, Rng& rng) {
  const int64_t T = 40, V = 3001;
  std::vector<float> logits = rng.vec(static_cast<size_t>(T * V), -6.0f, 6.0f);
  std::vector<float> temp(T), min_p(T), top_p(T), u(T);
  std::vector<int32_t> top_k(T), out(T);
  for (int64_t t = 0; t < T; ++t) {
    temp[t] = t % 10 == 0 ? 0.0f : rng.uniform(0.3f, 1.5f);
    top_k[t] = t % 3 == 0 ? 0 : rng.integer(1, 100);
    top_p[t] = t % 4 == 0 ? 1.0f : rng.uniform(0.2f, 0.99f);
    min_p[t] = t % 5 < 2 ? 0.0f : rng.uniform(0.001f, 0.5f);
    u[t] = rng.uniform(0.0f, 0.999f);
  }
  em_tensor lt = em_tensor_2d(logits.data(), EM_F32, T, V);
  em_sample_args a{&lt, temp.data(), top_k.data(), top_p.data(), u.data(), out.data(), min_p.data()};
  CHECK_OK(em_sample(be.b, &a));
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.data() + t * V;
    if (temp[t] <= 0.0f) {
      CHECK(out[t] == std::max_element(row, row + V) - row, "greedy row %lld", static_cast<long long>(t));
      continue;
    }
    const RefPick r = reference(row, V, temp[t], min_p[t], top_k[t], top_p[t]);
    const auto it = std::find(r.kept.begin(), r.kept.end(), out[t]);
    CHECK(it != r.kept.end(), "%s row %lld: token %d was filtered out", be.label.c_str(), static_cast<long long>(t), out[t]);
    if (it == r.kept.end()) continue;
    const size_t j = static_cast<size_t>(it - r.kept.begin());
    const double lo = j == 0 ? 0.0 : r.cdf[j - 1], hi = r.cdf[j];
    CHECK(u[t] >= lo - 1e-5 && u[t] <= hi + 1e-5, "%s row %lld: u=%g picked token %d with cdf [%g, %g]",
          be.label.c_str(), static_cast<long long>(t), u[t], out[t], lo, hi);
  }
}

// Greedy against a plain first-of-max loop on rows built to trip a vectorized argmax: values
// from a small set (many ties), signed zeros, -inf, negatives only, the maximum in the last
// block or the last element, lengths off the block size.
void test_greedy_rows(Backend& be, Rng& rng) {
  const float inf = INFINITY;
  const float pool[] = {-inf, -3.5f, -1.0f, -0.0f, 0.0f, 0.25f, 2.0f};
  for (int64_t V : {1, 2, 63, 64, 65, 130, 1000}) {
    for (int trial = 0; trial < 40; ++trial) {
      std::vector<float> row(static_cast<size_t>(V));
      const int top = trial % 7;  // the row's values from pool[0..top]: negatives only when small
      for (auto& x : row) x = pool[rng.integer(0, top)];
      if (trial % 5 == 1) row.back() = 9.0f;
      if (std::all_of(row.begin(), row.end(), [](float x) { return x == -INFINITY; })) row[0] = -7.0f;
      int64_t want = 0;
      for (int64_t i = 1; i < V; ++i)
        if (row[i] > row[want]) want = i;
      float temp0 = 0.0f;
      int32_t tok = -2;
      em_tensor rt = em_tensor_2d(row.data(), EM_F32, 1, V);
      em_sample_args a{&rt, &temp0, nullptr, nullptr, nullptr, &tok};
      CHECK_OK(em_sample(be.b, &a));
      CHECK(tok == want, "%s greedy V=%lld trial %d: got %d, want %lld", be.label.c_str(), static_cast<long long>(V),
            trial, tok, static_cast<long long>(want));
    }
  }
}

void test_special(Backend& be) {
  // Greedy ties go to the lower id; top_k = 1 is greedy.
  std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  float temp0 = 0.0f, temp1 = 1.0f, u = 0.99f, p = 1.0f;
  int32_t k1 = 1, tok = -1;
  em_tensor lt = em_tensor_2d(logits.data(), EM_F32, 1, 4);
  em_sample_args a{&lt, &temp0, nullptr, nullptr, nullptr, &tok};
  CHECK_OK(em_sample(be.b, &a));
  CHECK(tok == 1, "greedy tie -> lower id, got %d", tok);
  em_sample_args b{&lt, &temp1, &k1, &p, &u, &tok};
  CHECK_OK(em_sample(be.b, &b));
  CHECK(tok == 1, "top_k 1 -> argmax, got %d", tok);
  // Distribution on a grid of u: counts match softmax probabilities.
  std::vector<float> l2 = {std::log(0.1f), std::log(0.2f), std::log(0.3f), std::log(0.4f)};
  em_tensor l2t = em_tensor_2d(l2.data(), EM_F32, 1, 4);
  int counts[4] = {0, 0, 0, 0};
  const int n = 1000;
  for (int i = 0; i < n; ++i) {
    float ui = (i + 0.5f) / n;
    em_sample_args c{&l2t, &temp1, nullptr, nullptr, &ui, &tok};
    CHECK_OK(em_sample(be.b, &c));
    counts[tok]++;
  }
  for (int i = 0; i < 4; ++i) CHECK(std::abs(counts[i] - (i + 1) * 100) <= 1, "token %d count %d", i, counts[i]);
  // top_p 0.5 keeps {3 (0.4), 2 (0.3)}: renormalized 4/7 and 3/7, most likely first.
  float half = 0.5f, u_low = 0.5f, u_high = 0.6f;
  em_sample_args d{&l2t, &temp1, nullptr, &half, &u_low, &tok};
  CHECK_OK(em_sample(be.b, &d));
  CHECK(tok == 3, "top_p: u=0.5 -> token 3, got %d", tok);
  d.uniform = &u_high;
  CHECK_OK(em_sample(be.b, &d));
  CHECK(tok == 2, "top_p: u=0.6 -> token 2, got %d", tok);
  // min_p 0.7 keeps {2 (0.3 >= 0.28), 3 (0.4)}, renormalized 3/7 and 4/7 in id order (no
  // top_k or top_p: no sort); min_p 1 keeps only the most likely; min_p 0.3 keeps {1, 2,
  // 3}, renormalized 2/9, 3/9, 4/9: u = 0.3 falls on token 2.
  float mp = 0.7f, mp1 = 1.0f, mp_low = 0.3f, u_4 = 0.4f, u_3 = 0.3f;
  em_sample_args m{&l2t, &temp1, nullptr, nullptr, &u_4, &tok, &mp};
  CHECK_OK(em_sample(be.b, &m));
  CHECK(tok == 2, "min_p: u=0.4 -> token 2, got %d", tok);
  m.uniform = &u_low;
  CHECK_OK(em_sample(be.b, &m));
  CHECK(tok == 3, "min_p: u=0.5 -> token 3, got %d", tok);
  // With top_p, most likely first: top_p 1 - 1e-7 cuts nothing here but orders.
  float almost = 0.9999999f;
  m.top_p = &almost;
  m.uniform = &u_4;
  CHECK_OK(em_sample(be.b, &m));
  CHECK(tok == 3, "min_p + top_p: u=0.4 -> token 3, got %d", tok);
  m.top_p = nullptr;
  m.min_p = &mp1;
  CHECK_OK(em_sample(be.b, &m));
  CHECK(tok == 3, "min_p 1 -> argmax, got %d", tok);
  m.min_p = &mp_low;
  m.uniform = &u_3;
  CHECK_OK(em_sample(be.b, &m));
  CHECK(tok == 2, "min_p 0.3: u=0.3 -> token 2, got %d", tok);
  float bad_mp = 1.5f;
  m.min_p = &bad_mp;
  CHECK(em_sample(be.b, &m) == EM_ERR_ARG, "min_p 1.5");
  // Nothing to pick: -1, greedy or sampled, for a NaN or +inf anywhere in the row (upstream
  // overflow) and for a row of -inf (constraints that exclude every token); one -inf among
  // finite logits is only a masked token. Rows are independent.
  const float inf = INFINITY;
  const std::vector<std::vector<float>> unpickable = {
      {0.5f, NAN, 1.0f, 0.0f}, {0.5f, 1.0f, 0.0f, inf}, {-inf, -inf, -inf, -inf}, {NAN, NAN, NAN, NAN}};
  for (const auto& row : unpickable) {
    std::vector<float> two(row);
    two.insert(two.end(), {-inf, 0.0f, 3.0f, -inf});
    em_tensor rt = em_tensor_2d(two.data(), EM_F32, 2, 4);
    for (float* temp : {&temp0, &temp1}) {
      float temps[2] = {*temp, *temp}, us[2] = {0.5f, 0.5f};
      int32_t toks[2] = {7, 7};
      em_sample_args r{&rt, temps, nullptr, nullptr, us, toks};
      CHECK_OK(em_sample(be.b, &r));
      CHECK(toks[0] == -1, "row {%g, %g, %g, %g}, temperature %g: -1, got %d", row[0], row[1], row[2], row[3], *temp,
            toks[0]);
      CHECK(toks[1] == 2, "the next row is sampled: got %d", toks[1]);
    }
  }
  // Errors: u outside [0, 1), missing u.
  float bad_u = 1.0f;
  em_sample_args e{&l2t, &temp1, nullptr, nullptr, &bad_u, &tok};
  CHECK(em_sample(be.b, &e) == EM_ERR_ARG, "u = 1");
  e.uniform = nullptr;
  CHECK(em_sample(be.b, &e) == EM_ERR_ARG, "no u");
}

// logprobs: against log-softmax in double with a full sort (ties: lower id first).
void test_logprobs(Backend& be, Rng& rng) {
  const int64_t T = 12, V = 2001;
  const int32_t k = 7;
  std::vector<float> logits = rng.vec(static_cast<size_t>(T * V), -8.0f, 8.0f);
  for (int64_t i = 0; i < V; i += 3) logits[i] = 2.0f;  // row 0: ties
  for (int64_t i = V; i < 2 * V; ++i) logits[i] = -INFINITY;  // row 1: nothing possible
  std::vector<int32_t> ids(T), top_ids(T * k);
  std::vector<double> lp(T), top_lp(T * k);
  for (int64_t t = 0; t < T; ++t) ids[t] = rng.integer(0, static_cast<int>(V - 1));
  em_tensor lt = em_tensor_2d(logits.data(), EM_F32, T, V);
  em_logprobs_args a{&lt, ids.data(), k, lp.data(), top_ids.data(), top_lp.data()};
  CHECK_OK(em_logprobs(be.b, &a));
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.data() + t * V;
    double mx = -INFINITY, sum = 0.0;
    for (int64_t i = 0; i < V; ++i) mx = std::max(mx, static_cast<double>(row[i]));
    for (int64_t i = 0; i < V; ++i) sum += mx == -INFINITY ? 0.0 : std::exp(row[i] - mx);
    const double lse = mx == -INFINITY ? INFINITY : mx + std::log(sum);
    std::vector<int32_t> order(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t p, int32_t q) { return row[p] > row[q]; });
    const auto close = [&](double got, double want) {
      return std::isinf(want) ? got == want : std::abs(got - want) < 2e-6;
    };
    CHECK(close(lp[t], row[ids[t]] - lse), "%s row %lld: logprob %g, want %g", be.label.c_str(),
          static_cast<long long>(t), lp[t], row[ids[t]] - lse);
    for (int32_t j = 0; j < k; ++j) {
      CHECK(top_ids[t * k + j] == order[j], "%s row %lld: top %d is %d, want %d", be.label.c_str(),
            static_cast<long long>(t), j, top_ids[t * k + j], order[j]);
      CHECK(close(top_lp[t * k + j], row[order[j]] - lse), "%s row %lld: top %d logprob", be.label.c_str(),
            static_cast<long long>(t), j);
    }
  }
  // Errors: an id outside the vocabulary, k past it.
  ids[3] = static_cast<int32_t>(V);
  CHECK(em_logprobs(be.b, &a) == EM_ERR_ARG, "id == V");
  ids[3] = 0;
  a.k = static_cast<int32_t>(V + 1);
  CHECK(em_logprobs(be.b, &a) == EM_ERR_ARG, "k > V");
}

}  // namespace

int main() {
  Rng rng(9);
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      test_against_reference(be, rng);
      test_special(be);
      test_greedy_rows(be, rng);
      test_logprobs(be, rng);
    }
  }
  return finish("sample");
}
