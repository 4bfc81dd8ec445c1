// Rotary embedding family: YaRN frequencies (DeepSeek `precompute_freqs_cis`) and the
// in-place rotation of interleaved pairs (x[2i], x[2i+1]), as torch.view_as_complex does.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu.h"

namespace {
constexpr double kPi = 3.14159265358979323846;
}

extern "C" double em_yarn_mscale(double factor, double mscale) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

extern "C" double em_mla_softmax_scale(int32_t qk_head_dim, double factor, double mscale_all_dim) {
  const double m = em_yarn_mscale(factor, mscale_all_dim);
  return m * m / std::sqrt(static_cast<double>(qk_head_dim));
}

extern "C" void em_rope_inv_freq(const em_rope_config* cfg, float* inv_freq) {
  const int dim = cfg->rope_dim, half = dim / 2;
  const double base = cfg->theta;
  // freqs = 1 / base^(2i / dim), in fp32 as the reference computes it.
  for (int i = 0; i < half; ++i)
    inv_freq[i] = static_cast<float>(1.0 / std::pow(base, static_cast<double>(2 * i) / dim));
  if (!(cfg->factor > 1.0)) return;
  // Dimensions that rotate fewer than beta_slow times over the original context are
  // interpolated (freq / factor), those above beta_fast kept, with a linear ramp between.
  auto correction_dim = [&](double rotations) {
    return dim * std::log(static_cast<double>(cfg->original_max_position) / (rotations * 2.0 * kPi)) /
           (2.0 * std::log(base));
  };
  const double low = std::max(std::floor(correction_dim(cfg->beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(cfg->beta_slow)), static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  for (int i = 0; i < half; ++i) {
    const float ramp = std::clamp(static_cast<float>((i - low) / (high - low)), 0.0f, 1.0f);
    const float smooth = 1.0f - ramp;
    const float f = inv_freq[i];
    inv_freq[i] = f / static_cast<float>(cfg->factor) * (1.0f - smooth) + f * smooth;
  }
}

namespace em::cpu {

em_status rope(Context& ctx, em_tensor* x, const int32_t* positions, const em_rope_config* cfg) {
  const int half = cfg->rope_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  em_rope_inv_freq(cfg, inv_freq.data());
  const int64_t tokens = x->shape[0];
  const int64_t heads = x->ndim == 3 ? x->shape[1] : 1;
  const int64_t head_stride = x->ndim == 3 ? x->stride[1] : 0;
  float* data = static_cast<float*>(x->data);
  constexpr int64_t kTokensPerItem = 64;
  ctx.pool.parallel_for((tokens + kTokensPerItem - 1) / kTokensPerItem, [&](int64_t item, int) {
    std::vector<float> cs(static_cast<size_t>(2 * half));
    const int64_t t1 = std::min(tokens, (item + 1) * kTokensPerItem);
    for (int64_t t = item * kTokensPerItem; t < t1; ++t) {
      // angle = pos * freq in fp32 (torch.outer), then cos/sin of that fp32 angle.
      const float pos = static_cast<float>(positions[t]);
      for (int i = 0; i < half; ++i) {
        const double angle = static_cast<double>(pos * inv_freq[static_cast<size_t>(i)]);
        cs[2 * i] = static_cast<float>(std::cos(angle));
        cs[2 * i + 1] = static_cast<float>(std::sin(angle));
      }
      for (int64_t hd = 0; hd < heads; ++hd) {
        float* v = data + t * x->stride[0] + hd * head_stride;
        for (int i = 0; i < half; ++i) {
          const float re = v[2 * i], im = v[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
          v[2 * i] = re * c - im * s;
          v[2 * i + 1] = re * s + im * c;
        }
      }
    }
  });
  return EM_OK;
}

}  // namespace em::cpu
