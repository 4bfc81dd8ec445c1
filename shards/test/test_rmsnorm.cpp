// rmsnorm: y = x / sqrt(mean(x^2) + eps) * w for f32/bf16/f16 weights, odd widths,
// strided rows and in-place use, every ISA, against a double reference.
#include <memory>

#include "test/harness.h"

using namespace test;

int main() {
  Rng rng(2);
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      for (int64_t dim : {1, 7, 64, 2053}) {
        for (em_dtype dt : {EM_F32, EM_BF16, EM_F16}) {
          const int64_t rows = 9, ld = dim + 3;
          TestWeight w = make_weight(rng, dt, 1, dim);
          em_tensor wt = w.view();
          wt.ndim = 1;
          wt.shape[0] = dim;
          wt.stride[0] = 1;
          std::vector<float> x = rng.vec(static_cast<size_t>(rows * ld), -3.0f, 3.0f);
          const float eps = 1e-6f;
          std::vector<double> ref(static_cast<size_t>(rows * dim));
          for (int64_t r = 0; r < rows; ++r) {
            double ss = 0.0;
            for (int64_t c = 0; c < dim; ++c) ss += static_cast<double>(x[r * ld + c]) * x[r * ld + c];
            const double inv = 1.0 / std::sqrt(ss / dim + eps);
            for (int64_t c = 0; c < dim; ++c) ref[r * dim + c] = x[r * ld + c] * inv * w.at(0, c);
          }
          em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, dim);
          xt.stride[0] = ld;
          std::vector<float> y(static_cast<size_t>(rows * dim));
          em_tensor yt = em_tensor_2d(y.data(), EM_F32, rows, dim);
          CHECK_OK(em_rmsnorm(be.b, &xt, &wt, eps, &yt));
          for (size_t i = 0; i < y.size(); ++i) {
            if (std::fabs(y[i] - ref[i]) > 1e-5 * (1.0 + std::fabs(ref[i]))) {
              CHECK(false, "%s %s dim=%lld i=%zu got %g want %g", be.label.c_str(), em_dtype_name(dt),
                    static_cast<long long>(dim), i, y[i], ref[i]);
              break;
            }
          }
          // In place: y aliases x.
          CHECK_OK(em_rmsnorm(be.b, &xt, &wt, eps, &xt));
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < dim; ++c)
              CHECK(x[r * ld + c] == y[r * dim + c], "in-place result differs at %lld,%lld", static_cast<long long>(r),
                    static_cast<long long>(c));
        }
      }
      // Errors: wrong weight length, fp8 norm weight.
      std::vector<float> x(8), w(3);
      em_tensor xt = em_tensor_2d(x.data(), EM_F32, 2, 4);
      em_tensor wt = em_tensor_1d(w.data(), EM_F32, 3);
      CHECK(em_rmsnorm(be.b, &xt, &wt, 1e-6f, &xt) == EM_ERR_SHAPE, "weight length");
    }
  }
  return finish("rmsnorm");
}
