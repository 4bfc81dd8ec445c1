// silu_mul: y = g / (1 + exp(-g)) * u, including large magnitudes and vector tails,
// strided views (gate and up as halves of one [rows, 2 * n] buffer) and in-place use.
#include "test/harness.h"

using namespace test;

int main() {
  Rng rng(3);
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      for (int64_t n : {1, 5, 8, 23, 1408}) {
        const int64_t rows = 7;
        std::vector<float> gu = rng.vec(static_cast<size_t>(rows * 2 * n), -12.0f, 12.0f);
        if (n >= 5) {  // extremes
          gu[0] = -100.0f;
          gu[1] = 100.0f;
          gu[2] = 0.0f;
          gu[3] = -88.5f;
          gu[4] = 89.0f;
        }
        em_tensor g = em_tensor_2d(gu.data(), EM_F32, rows, n), u = em_tensor_2d(gu.data() + n, EM_F32, rows, n);
        g.stride[0] = u.stride[0] = 2 * n;
        std::vector<float> y(static_cast<size_t>(rows * n));
        em_tensor yt = em_tensor_2d(y.data(), EM_F32, rows, n);
        CHECK_OK(em_silu_mul(be.b, &g, &u, &yt));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < n; ++c) {
            const double gv = gu[r * 2 * n + c], uv = gu[r * 2 * n + n + c];
            const double ref = gv / (1.0 + std::exp(-gv)) * uv;
            const float got = y[r * n + c];
            CHECK(std::isfinite(got) && std::fabs(got - ref) <= 2e-6 * std::fabs(ref) + 1e-30,
                  "%s n=%lld g=%g u=%g got %.9g want %.9g", be.label.c_str(), static_cast<long long>(n), gv, uv, got, ref);
          }
        // In place into the gate half.
        CHECK_OK(em_silu_mul(be.b, &g, &u, &g));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < n; ++c) CHECK(gu[r * 2 * n + c] == y[r * n + c], "in-place differs");
      }
    }
  }
  return finish("silu_mul");
}
