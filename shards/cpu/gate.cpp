// Router family: the MoE gate of DeepSeek's reference `Gate.forward`.
//   scores   = softmax(x W^T) or sigmoid(x W^T), in fp32
//   choice   = scores + e_score_correction_bias (if any; for selection only)
//   groups   = (n_group > 1, not greedy) keep the topk_group groups ranked by the max of
//              choice (no bias) or the sum of its top-2 (bias); other experts get -inf
//   indices  = top_k of choice; weights = scores[indices] (unbiased)
//   weights /= sum(weights) if norm_topk_prob;  weights *= routed_scaling_factor
// Ties go to the lower expert index. transformers masks dropped groups with 0 instead of
// -inf; we follow the reference.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "cpu.h"

namespace em::cpu {

em_status gate(Context& ctx, const em_tensor* x, const em_tensor* weight, const em_tensor* bias,
               const em_gate_config* cfg, em_tensor* topk_idx, em_tensor* topk_weight) {
  const int64_t T = x->shape[0], E = weight->shape[0];
  std::vector<float> logits(static_cast<size_t>(T * E));
  Gemm g;
  g.x = static_cast<const float*>(x->data);
  g.ldx = x->stride[0];
  g.w = weight_view(*weight);
  g.y = logits.data();
  g.ldy = E;
  g.M = T;
  g.N = E;
  g.K = x->shape[1];
  gemm_nt_f32(ctx, g);  // fp32 logits on every ISA (the contract; AVX512_BF16 would round x)

  const float* b = bias ? static_cast<const float*>(bias->data) : nullptr;
  const bool grouped = cfg->topk_method != EM_TOPK_GREEDY && cfg->n_group > 1;
  const int64_t per_group = E / cfg->n_group;
  const int k = cfg->top_k;
  constexpr int64_t kTokensPerItem = 16;

  ctx.pool.parallel_for((T + kTokensPerItem - 1) / kTokensPerItem, [&](int64_t item, int) {
    std::vector<float> choice(static_cast<size_t>(E));
    std::vector<float> group_score(static_cast<size_t>(cfg->n_group));
    std::vector<int32_t> order(static_cast<size_t>(std::max<int64_t>(E, cfg->n_group)));
    // Highest value first, lower index on ties.
    auto by_value = [](const std::vector<float>& v) {
      return [&v](int32_t i, int32_t j) { return v[i] > v[j] || (v[i] == v[j] && i < j); };
    };
    const int64_t t1 = std::min(T, (item + 1) * kTokensPerItem);
    for (int64_t t = item * kTokensPerItem; t < t1; ++t) {
      float* scores = logits.data() + t * E;
      if (cfg->score_func == EM_SCORE_SOFTMAX) {
        const float mx = *std::max_element(scores, scores + E);
        const float inv = 1.0f / ctx.k->exp_sum(scores, E, mx);
        for (int64_t e = 0; e < E; ++e) scores[e] *= inv;
      } else {
        for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-scores[e]));
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = b ? scores[e] + b[e] : scores[e];

      if (grouped) {
        for (int32_t gi = 0; gi < cfg->n_group; ++gi) {
          const float* c = choice.data() + gi * per_group;
          if (b == nullptr) {
            group_score[gi] = *std::max_element(c, c + per_group);
          } else {
            float top1 = -INFINITY, top2 = -INFINITY;
            for (int64_t j = 0; j < per_group; ++j) {
              if (c[j] > top1) {
                top2 = top1;
                top1 = c[j];
              } else if (c[j] > top2) {
                top2 = c[j];
              }
            }
            group_score[gi] = per_group > 1 ? top1 + top2 : top1;
          }
        }
        std::iota(order.begin(), order.begin() + cfg->n_group, 0);
        std::partial_sort(order.begin(), order.begin() + cfg->topk_group, order.begin() + cfg->n_group,
                          by_value(group_score));
        std::vector<bool> keep(static_cast<size_t>(cfg->n_group), false);
        for (int32_t j = 0; j < cfg->topk_group; ++j) keep[order[j]] = true;
        for (int32_t gi = 0; gi < cfg->n_group; ++gi) {
          if (!keep[gi]) std::fill(choice.begin() + gi * per_group, choice.begin() + (gi + 1) * per_group, -INFINITY);
        }
      }

      std::iota(order.begin(), order.begin() + E, 0);
      std::partial_sort(order.begin(), order.begin() + k, order.begin() + E, by_value(choice));
      int32_t* idx = static_cast<int32_t*>(topk_idx->data) + t * topk_idx->stride[0];
      float* wt = static_cast<float*>(topk_weight->data) + t * topk_weight->stride[0];
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        idx[j] = order[j];
        wt[j] = scores[order[j]];
        sum += wt[j];
      }
      const float norm = cfg->norm_topk_prob ? 1.0f / sum : 1.0f;
      for (int j = 0; j < k; ++j) wt[j] = wt[j] * norm * cfg->routed_scaling_factor;
    }
  });
  return EM_OK;
}

}  // namespace em::cpu
