// Sampling family: greedy, temperature, min-p, top-k and top-p (nucleus) sampling of one token
// per row of logits, driven by caller-supplied uniform numbers (see em_sample_args).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "cpu.h"

namespace em::cpu {
namespace {

// The id of the largest value, the lowest of equals, in a row with no NaN (`pickable`). Two
// passes the compiler vectorizes, where a compare-and-keep-the-index loop does not: the
// largest value as an integer max over keys that order as the floats do (negative floats
// with their magnitude bits flipped), then the first block of 64 that holds it. The key of
// +0 is above that of -0, but the second pass compares floats, so the first zero wins.
int32_t argmax(const float* v, int64_t n) {
  const auto* bits = reinterpret_cast<const int32_t*>(v);
  const auto key = [](int32_t b) { return b ^ ((b >> 31) & 0x7fffffff); };  // its own inverse
  int32_t best = INT32_MIN;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t k = key(bits[i]);
    best = k > best ? k : best;
  }
  const int32_t top_bits = key(best);
  float top;
  std::memcpy(&top, &top_bits, sizeof top);
  constexpr int64_t kBlock = 64;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    int hit = 0;
    for (int64_t j = 0; j < kBlock; ++j) hit |= v[i + j] == top;
    if (hit) break;
  }
  for (; i < n; ++i) {
    if (v[i] == top) return static_cast<int32_t>(i);
  }
  return 0;  // not reached: the row holds `top`
}

// Indices ordered by value, highest first, lower index on ties.
struct ByValue {
  const float* v;
  bool operator()(int32_t i, int32_t j) const { return v[i] > v[j] || (v[i] == v[j] && i < j); }
};

// The k largest of v[0..n) into `out`, highest first, lower index on ties: one pass with a
// heap of the k best so far, its worst on top; a later index replaces the worst only when
// larger (an equal one has a higher index, so ranks after it).
void top_k_of(const float* v, int64_t n, size_t k, std::vector<int32_t>& out) {
  const ByValue by_value{v};
  out.clear();
  for (int32_t i = 0; i < n; ++i) {
    if (out.size() < k) {
      out.push_back(i);
      std::push_heap(out.begin(), out.end(), by_value);
    } else if (v[i] > v[out.front()]) {
      std::pop_heap(out.begin(), out.end(), by_value);
      out.back() = i;
      std::push_heap(out.begin(), out.end(), by_value);
    }
  }
  std::sort(out.begin(), out.end(), by_value);
}

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

// The ids whose value is at least `lo`, in id order.
void at_least(const float* v, int64_t n, float lo, std::vector<int32_t>& out) {
  out.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] >= lo) out.push_back(static_cast<int32_t>(i));
  }
}

// The top-p nucleus is a prefix of the tokens ordered by weight, and in a language model's
// distribution a short one: instead of ordering the vocabulary, order only the ids within
// a band below the most likely one (weight >= 2^-24 of its), widening the band until its
// mass reaches top_p. Every id in a band ranks above every id outside it, so the result is
// the same as ordering everything.
constexpr float kWeightBand = 5.9604645e-8f;  // 2^-24 (the max weight is 1)
constexpr int kBands = 3;                     // then the whole vocabulary

// Whether a row has a token to pick: no NaN or +inf (numbers that overflowed before the
// sampler would make every weight NaN, and any token the pick) and something above -inf
// (constraints that exclude every token). One pass over the bits, integer operations only,
// which the compiler vectorizes (float compares with NaN it did not: 0.08 ms a row at 129k).
bool pickable(const float* v, int64_t n) {
  const auto* bits = reinterpret_cast<const uint32_t*>(v);
  constexpr uint32_t kNegInf = 0xff800000u, kExpMask = 0x7f800000u;
  uint32_t bad = 0, any = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits[i];
    const uint32_t not_neg_inf = u != kNegInf;
    any |= not_neg_inf;
    bad |= ((u & kExpMask) == kExpMask) & not_neg_inf;  // NaN or +inf: the exponent all ones
  }
  return any && !bad;
}

int32_t sample_row(const Kernels& k, const float* logits, int64_t V, float temperature, float min_p, int32_t top_k,
                   float top_p, float u, std::vector<float>& w, std::vector<int32_t>& order) {
  if (!pickable(logits, V)) return -1;
  if (temperature <= 0.0f) return argmax(logits, V);
  w.resize(static_cast<size_t>(V));
  order.clear();  // kept tokens, most likely first; empty: all, vocabulary order
  double mass;
  if (min_p > 0.0f) {
    // p_i >= min_p * p_max  <=>  l_i >= l_max + T log(min_p), in logits: two passes over
    // the row, and only the kept tokens scaled. They stay in id order (the walk order when
    // nothing else cuts), by value when top_k or top_p will cut.
    const float lmax = *std::max_element(logits, logits + V);
    at_least(logits, V, lmax + temperature * std::log(min_p), order);
    for (int32_t id : order) w[id] = logits[id] / temperature;
    const float top = lmax / temperature;
    const ByValue by_value{w.data()};
    if (top_k > 0 && static_cast<size_t>(top_k) < order.size()) {
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(), by_value);
      order.resize(static_cast<size_t>(top_k));
    } else if (top_p < 1.0f) {
      std::sort(order.begin(), order.end(), by_value);
    }
    mass = 0.0;
    for (int32_t id : order) {
      w[id] = std::exp(w[id] - top);
      mass += w[id];
    }
  } else if (top_k > 0 && top_k < V) {
    for (int64_t i = 0; i < V; ++i) w[i] = logits[i] / temperature;
    top_k_of(w.data(), V, static_cast<size_t>(top_k), order);
    const float top = w[order[0]];
    mass = 0.0;
    for (int32_t id : order) {
      w[id] = std::exp(w[id] - top);
      mass += w[id];
    }
  } else {
    for (int64_t i = 0; i < V; ++i) w[i] = logits[i] / temperature;
    // The weights by the vectorized exp; their sum again in double: exp_sum's float lanes
    // drop a long tail's tiny weights next to a large one (1 + 4e-8 == 1 in float).
    k.exp_sum(w.data(), V, *std::max_element(w.begin(), w.end()));
    mass = 0.0;
    for (int64_t i = 0; i < V; ++i) mass += w[i];
  }

  if (top_p < 1.0f) {
    const double target_mass = static_cast<double>(top_p) * mass;
    if (order.empty()) {
      const ByValue by_weight{w.data()};
      float lo = 1.0f;
      for (int band = 1;; ++band) {
        if (band > kBands) {
          order.resize(static_cast<size_t>(V));
          std::iota(order.begin(), order.end(), 0);
          std::sort(order.begin(), order.end(), by_weight);
          break;
        }
        lo *= kWeightBand;
        at_least(w.data(), V, lo, order);
        double cum = 0.0;
        for (int32_t id : order) cum += w[id];
        if (cum >= target_mass) {
          std::sort(order.begin(), order.end(), by_weight);
          break;
        }
      }
    }
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

// One row: logprob of `id`, and the k largest (highest first, lower id on ties).
void logprobs_row(const Kernels& kern, const float* x, int64_t V, int32_t id, int32_t k, double* logprob,
                  int32_t* top_ids, double* top_lp, std::vector<int32_t>& heap, std::vector<float>& w) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, x[i]);
  double lse;
  if (mx == -INFINITY) {
    lse = INFINITY;  // nothing is possible: every logprob is -inf
  } else {
    // The exponentials by the vectorized kernel (float), summed in double (float lanes
    // would drop a long tail next to the largest term).
    w.assign(x, x + V);
    kern.exp_sum(w.data(), V, mx);
    double sum = 0.0;
    for (int64_t i = 0; i < V; ++i) sum += w[i];
    lse = mx + std::log(sum);
  }
  const auto lp = [&](int32_t i) { return lse == INFINITY ? -INFINITY : static_cast<double>(x[i]) - lse; };
  *logprob = lp(id);
  if (k == 0) return;
  const auto kk = static_cast<size_t>(k);
  top_k_of(x, V, kk, heap);
  for (size_t j = 0; j < kk; ++j) {
    top_ids[j] = heap[j];
    top_lp[j] = lp(heap[j]);
  }
}

}  // namespace

em_status sample(Context& ctx, const em_sample_args* a) {
  const int64_t T = a->logits->shape[0], V = a->logits->shape[1];
  const float* logits = static_cast<const float*>(a->logits->data);
  ctx.pool.parallel_for(T, [&](int64_t t, int) {
    // Scratch per thread, kept between rows and calls.
    thread_local std::vector<float> w;
    thread_local std::vector<int32_t> order;
    a->out_tokens[t] = sample_row(*ctx.k, logits + t * a->logits->stride[0], V, a->temperature[t],
                                  a->min_p ? a->min_p[t] : 0.0f, a->top_k ? a->top_k[t] : 0,
                                  a->top_p ? a->top_p[t] : 1.0f, a->uniform ? a->uniform[t] : 0.0f, w, order);
  });
  return EM_OK;
}

em_status logprobs(Context& ctx, const em_logprobs_args* a) {
  const int64_t T = a->logits->shape[0], V = a->logits->shape[1];
  const float* logits = static_cast<const float*>(a->logits->data);
  const int32_t k = a->k;
  ctx.pool.parallel_for(T, [&](int64_t t, int) {
    thread_local std::vector<int32_t> heap;
    thread_local std::vector<float> w;
    logprobs_row(*ctx.k, logits + t * a->logits->stride[0], V, a->ids[t], k, a->logprob + t,
                 k ? a->top_ids + t * k : nullptr, k ? a->top_logprobs + t * k : nullptr, heap, w);
  });
  return EM_OK;
}

}  // namespace em::cpu
