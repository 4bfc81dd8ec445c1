// Sampling family: greedy, temperature, top-k and top-p (nucleus) sampling of one token
// per row of logits, driven by caller-supplied uniform numbers (see em_sample_args).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "cpu.h"

namespace em::cpu {
namespace {

int32_t argmax(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (v[i] > v[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

// Indices ordered by value, highest first, lower index on ties.
struct ByValue {
  const float* v;
  bool operator()(int32_t i, int32_t j) const { return v[i] > v[j] || (v[i] == v[j] && i < j); }
};

// Picks from `order` (token ids) with weights w[id]: the first id whose running sum
// exceeds `target`; the last one if rounding leaves the target unreached.
int32_t walk(const int32_t* order, int64_t n, const float* w, double target) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    acc += w[order[j]];
    if (acc > target) return order[j];
  }
  return order[n - 1];
}

int32_t sample_row(const Kernels& k, const float* logits, int64_t V, float temperature, int32_t top_k, float top_p,
                   float u) {
  if (temperature <= 0.0f) return argmax(logits, V);
  std::vector<float> w(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) w[i] = logits[i] / temperature;
  const ByValue by_logit{w.data()};

  std::vector<int32_t> order;  // kept tokens, most likely first; empty: all, vocabulary order
  double mass;
  if (top_k > 0 && top_k < V) {
    order.resize(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + top_k, order.end(), by_logit);
    order.resize(static_cast<size_t>(top_k));
    std::sort(order.begin(), order.end(), by_logit);
    const float mx = w[order[0]];
    mass = 0.0;
    for (int32_t id : order) {
      w[id] = std::exp(w[id] - mx);
      mass += w[id];
    }
  } else {
    const float mx = *std::max_element(w.begin(), w.end());
    mass = k.exp_sum(w.data(), V, mx);
  }

  if (top_p < 1.0f) {
    // Sort enough of the candidates to cover top_p of the mass: grow the sorted prefix
    // until it does (usually a few hundred tokens of a large vocabulary).
    if (order.empty()) {
      order.resize(static_cast<size_t>(V));
      std::iota(order.begin(), order.end(), 0);
      const ByValue by_weight{w.data()};
      int64_t sorted = std::min<int64_t>(V, 1024);
      for (;;) {
        std::partial_sort(order.begin(), order.begin() + sorted, order.end(), by_weight);
        double cum = 0.0;
        for (int64_t j = 0; j < sorted; ++j) cum += w[order[j]];
        if (cum >= top_p * mass || sorted == V) break;
        sorted = std::min<int64_t>(V, sorted * 4);
      }
    }
    const double target_mass = static_cast<double>(top_p) * mass;
    double cum = 0.0;
    size_t keep = order.size();
    for (size_t j = 0; j < order.size(); ++j) {
      cum += w[order[j]];
      if (cum >= target_mass) {
        keep = j + 1;
        break;
      }
    }
    order.resize(keep);
    mass = cum;
  }

  const double target = static_cast<double>(u) * mass;
  if (!order.empty()) return walk(order.data(), static_cast<int64_t>(order.size()), w.data(), target);
  double acc = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    acc += w[i];
    if (acc > target) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(V - 1);
}

}  // namespace

em_status sample(Context& ctx, const em_sample_args* a) {
  const int64_t T = a->logits->shape[0], V = a->logits->shape[1];
  const float* logits = static_cast<const float*>(a->logits->data);
  ctx.pool.parallel_for(T, [&](int64_t t, int) {
    a->out_tokens[t] = sample_row(*ctx.k, logits + t * a->logits->stride[0], V, a->temperature[t],
                                  a->top_k ? a->top_k[t] : 0, a->top_p ? a->top_p[t] : 1.0f,
                                  a->uniform ? a->uniform[t] : 0.0f);
  });
  return EM_OK;
}

}  // namespace em::cpu
