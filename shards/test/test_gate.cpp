// gate: the router of DeepSeek's reference Gate.forward, reimplemented here with plain
// loops in double: softmax/greedy (V2-Lite), softmax/group_limited_greedy (V2),
// sigmoid/noaux_tc with e_score_correction_bias (V3), norm_topk_prob on and off.
#include <algorithm>
#include <numeric>

#include "test/harness.h"

using namespace test;

namespace {

struct Routed {
  std::vector<int32_t> idx;
  std::vector<double> weight;
};

Routed reference(const std::vector<double>& logits, const std::vector<float>* bias, const em_gate_config& c) {
  const int64_t E = static_cast<int64_t>(logits.size());
  std::vector<double> scores(logits.size());
  if (c.score_func == EM_SCORE_SOFTMAX) {
    const double mx = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(logits[e] - mx));
    for (auto& s : scores) s /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0 / (1.0 + std::exp(-logits[e]));
  }
  std::vector<double> choice = scores;
  if (bias)
    for (int64_t e = 0; e < E; ++e) choice[e] += (*bias)[e];
  if (c.topk_method != EM_TOPK_GREEDY && c.n_group > 1) {
    const int64_t per = E / c.n_group;
    std::vector<std::pair<double, int>> groups;
    for (int g = 0; g < c.n_group; ++g) {
      std::vector<double> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      groups.push_back({bias ? v[0] + v[1] : v[0], g});
    }
    std::sort(groups.begin(), groups.end(), [](auto a, auto b) { return a.first > b.first; });
    for (int j = c.topk_group; j < c.n_group; ++j)
      for (int64_t e = 0; e < per; ++e) choice[groups[j].second * per + e] = -INFINITY;
  }
  std::vector<int32_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return choice[a] > choice[b]; });
  Routed r;
  double sum = 0.0;
  for (int j = 0; j < c.top_k; ++j) {
    r.idx.push_back(order[j]);
    r.weight.push_back(scores[order[j]]);
    sum += scores[order[j]];
  }
  for (auto& w : r.weight) w = (c.norm_topk_prob ? w / sum : w) * c.routed_scaling_factor;
  return r;
}

void run_case(Rng& rng, const em_gate_config& c, int64_t E, bool with_bias, em_dtype wdt) {
  const int64_t T = 21, D = 72;
  TestWeight w = make_weight(rng, wdt, E, D, 0.3f);
  std::vector<float> x = rng.vec(static_cast<size_t>(T * D));
  std::vector<float> bias = rng.vec(static_cast<size_t>(E), -0.05f, 0.05f);
  em_tensor xt = em_tensor_2d(x.data(), EM_F32, T, D), wt = w.view(), bt = em_tensor_1d(bias.data(), EM_F32, E);
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      std::vector<int32_t> idx(static_cast<size_t>(T * c.top_k));
      std::vector<float> wts(static_cast<size_t>(T * c.top_k));
      em_tensor it = em_tensor_2d(idx.data(), EM_I32, T, c.top_k), wtt = em_tensor_2d(wts.data(), EM_F32, T, c.top_k);
      CHECK_OK(em_gate(be.b, &xt, &wt, with_bias ? &bt : nullptr, &c, &it, &wtt));
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> logits(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e)
          for (int64_t d = 0; d < D; ++d) logits[e] += static_cast<double>(x[t * D + d]) * w.at(e, d);
        const Routed r = reference(logits, with_bias ? &bias : nullptr, c);
        for (int j = 0; j < c.top_k; ++j) {
          CHECK(idx[t * c.top_k + j] == r.idx[j], "%s method=%d t=%lld j=%d got expert %d want %d", be.label.c_str(),
                c.topk_method, static_cast<long long>(t), j, idx[t * c.top_k + j], r.idx[j]);
          CHECK(std::fabs(wts[t * c.top_k + j] - r.weight[j]) <= 1e-5 * (1.0 + std::fabs(r.weight[j])),
                "%s weight got %g want %g", be.label.c_str(), wts[t * c.top_k + j], r.weight[j]);
        }
      }
    }
  }
}

void test_errors() {
  Backend be(EM_ISA_SCALAR, 1);
  std::vector<float> x(8), w(32);
  std::vector<int32_t> idx(4);
  std::vector<float> wts(4);
  em_tensor xt = em_tensor_2d(x.data(), EM_F32, 2, 4), wt = em_tensor_2d(w.data(), EM_F32, 8, 4);
  em_tensor it = em_tensor_2d(idx.data(), EM_I32, 2, 2), wtt = em_tensor_2d(wts.data(), EM_F32, 2, 2);
  em_gate_config c{EM_SCORE_SIGMOID, EM_TOPK_NOAUX_TC, 2, 2, 1, 1, 1.0f};
  CHECK(em_gate(be.b, &xt, &wt, nullptr, &c, &it, &wtt) == EM_ERR_ARG, "noaux_tc needs a bias");
  c = {EM_SCORE_SOFTMAX, EM_TOPK_GROUP_LIMITED_GREEDY, 2, 3, 1, 0, 1.0f};
  CHECK(em_gate(be.b, &xt, &wt, nullptr, &c, &it, &wtt) == EM_ERR_ARG, "experts not divisible by n_group");
  c = {EM_SCORE_SOFTMAX, EM_TOPK_GREEDY, 9, 1, 1, 0, 1.0f};
  CHECK(em_gate(be.b, &xt, &wt, nullptr, &c, &it, &wtt) == EM_ERR_ARG, "top_k > experts");
}

}  // namespace

int main() {
  Rng rng(7);
  for (em_dtype wdt : {EM_F32, EM_BF16}) {
    // V2-Lite: softmax, greedy, no renormalization, scale 1.
    run_case(rng, {EM_SCORE_SOFTMAX, EM_TOPK_GREEDY, 6, 1, 1, 0, 1.0f}, 64, false, wdt);
    // V2: softmax, group_limited_greedy (8 groups keep 3), scale 16.
    run_case(rng, {EM_SCORE_SOFTMAX, EM_TOPK_GROUP_LIMITED_GREEDY, 6, 8, 3, 0, 16.0f}, 64, false, wdt);
    // V3: sigmoid, noaux_tc with bias (8 groups keep 4), renormalized, scale 2.5.
    run_case(rng, {EM_SCORE_SIGMOID, EM_TOPK_NOAUX_TC, 8, 8, 4, 1, 2.5f}, 256, true, wdt);
    // sigmoid without renormalization; softmax with renormalization.
    run_case(rng, {EM_SCORE_SIGMOID, EM_TOPK_NOAUX_TC, 4, 4, 2, 0, 1.0f}, 32, true, wdt);
    run_case(rng, {EM_SCORE_SOFTMAX, EM_TOPK_GREEDY, 3, 1, 1, 1, 1.0f}, 16, false, wdt);
  }
  test_errors();
  return finish("gate");
}
