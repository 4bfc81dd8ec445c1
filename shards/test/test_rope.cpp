// rope: YaRN frequencies against the reference formula (DeepSeek precompute_freqs_cis,
// computed here in double), the interleaved-pair rotation on [T, H, dr] views inside a
// wider q row (the nope part untouched), and the MLA softmax scale.
#include "test/harness.h"

using namespace test;

namespace {

// precompute_freqs_cis' frequencies, in double.
std::vector<double> ref_inv_freq(const em_rope_config& c) {
  const int dim = c.rope_dim;
  std::vector<double> f(static_cast<size_t>(dim / 2));
  for (int i = 0; i < dim / 2; ++i) f[i] = 1.0 / std::pow(c.theta, 2.0 * i / dim);
  if (c.factor <= 1.0) return f;
  auto corr = [&](double rot) {
    return dim * std::log(c.original_max_position / (rot * 2 * M_PI)) / (2 * std::log(c.theta));
  };
  double low = std::floor(corr(c.beta_fast)), high = std::ceil(corr(c.beta_slow));
  low = std::max(low, 0.0);
  high = std::min(high, dim - 1.0);
  if (low == high) high += 0.001;
  for (int i = 0; i < dim / 2; ++i) {
    const double ramp = std::min(1.0, std::max(0.0, (i - low) / (high - low)));
    const double smooth = 1.0 - ramp;
    f[i] = f[i] / c.factor * (1 - smooth) + f[i] * smooth;
  }
  return f;
}

void test_freqs() {
  // DeepSeek-V2 / V3 rope_scaling, plus plain RoPE.
  const em_rope_config cfgs[] = {{64, 10000.0, 40.0, 4096, 32.0, 1.0}, {64, 10000.0, 1.0, 0, 0, 0},
                                 {16, 500000.0, 8.0, 8192, 32.0, 1.0}};
  for (const auto& c : cfgs) {
    std::vector<float> got(static_cast<size_t>(c.rope_dim / 2));
    em_rope_inv_freq(&c, got.data());
    const std::vector<double> want = ref_inv_freq(c);
    for (size_t i = 0; i < got.size(); ++i)
      CHECK(std::fabs(got[i] - want[i]) <= 1e-6 * want[i], "inv_freq[%zu] factor=%g got %.9g want %.9g", i, c.factor,
            got[i], want[i]);
    if (c.factor > 1.0) {
      CHECK(got[0] == static_cast<float>(want[0]), "fastest dimension is not interpolated");
      CHECK(std::fabs(got.back() - want.back()) < 1e-6 * want.back(), "slowest dimension divided by factor");
    }
  }
}

void test_rotation() {
  Rng rng(5);
  const int64_t T = 37, H = 5, dn = 24, dr = 64;
  const em_rope_config c{static_cast<int32_t>(dr), 10000.0, 40.0, 4096, 32.0, 1.0};
  std::vector<float> inv(static_cast<size_t>(dr / 2));
  em_rope_inv_freq(&c, inv.data());
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (auto& p : pos) p = rng.integer(0, 200000);
  pos[0] = 0;
  const std::vector<float> q0 = rng.vec(static_cast<size_t>(T * H * (dn + dr)));
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      std::vector<float> q = q0;
      em_tensor view = em_tensor_3d(q.data() + dn, EM_F32, T, H, dr);
      view.stride[0] = H * (dn + dr);
      view.stride[1] = dn + dr;
      CHECK_OK(em_rope(be.b, &view, pos.data(), &c));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const float* a = q0.data() + (t * H + h) * (dn + dr);
          const float* b = q.data() + (t * H + h) * (dn + dr);
          for (int64_t d = 0; d < dn; ++d) CHECK(a[d] == b[d], "nope part changed");
          for (int64_t i = 0; i < dr / 2; ++i) {
            // The reference's angle: fp32 product of position and frequency (torch.outer).
            const double ang = static_cast<float>(static_cast<float>(pos[t]) * inv[i]);
            const double re = a[dn + 2 * i], im = a[dn + 2 * i + 1];
            const double wr = re * std::cos(ang) - im * std::sin(ang), wi = re * std::sin(ang) + im * std::cos(ang);
            CHECK(std::fabs(b[dn + 2 * i] - wr) < 1e-6 && std::fabs(b[dn + 2 * i + 1] - wi) < 1e-6,
                  "%s t=%lld h=%lld i=%lld got (%g, %g) want (%g, %g)", be.label.c_str(), static_cast<long long>(t),
                  static_cast<long long>(h), static_cast<long long>(i), b[dn + 2 * i], b[dn + 2 * i + 1], wr, wi);
          }
        }
      // 2-D [T, dr] input and errors.
      std::vector<float> k = rng.vec(static_cast<size_t>(T * dr));
      em_tensor kt = em_tensor_2d(k.data(), EM_F32, T, dr);
      CHECK_OK(em_rope(be.b, &kt, pos.data(), &c));
      em_rope_config odd = c;
      odd.rope_dim = 63;
      CHECK(em_rope(be.b, &kt, pos.data(), &odd) == EM_ERR_ARG, "odd rope_dim");
      std::vector<int32_t> neg(pos);
      neg[3] = -1;
      CHECK(em_rope(be.b, &kt, neg.data(), &c) == EM_ERR_ARG, "negative position");
    }
  }
}

void test_softmax_scale() {
  // DeepSeek-V2: qk_head_dim 192, factor 40, mscale_all_dim 0.707.
  const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
  CHECK(std::fabs(em_mla_softmax_scale(192, 40.0, 0.707) - m * m / std::sqrt(192.0)) < 1e-12, "V2 softmax scale");
  CHECK(std::fabs(em_mla_softmax_scale(192, 1.0, 0.707) - 1.0 / std::sqrt(192.0)) < 1e-12, "no YaRN");
  CHECK(em_yarn_mscale(1.0, 1.0) == 1.0, "mscale without scaling");
}

}  // namespace

int main() {
  test_freqs();
  test_rotation();
  test_softmax_scale();
  return finish("rope");
}
