// moe_ffn: grouped expert FFN y = w2(silu(w1 x) * w3 x) for experts with 0..many rows,
// every weight dtype (fp8 with inter > 128, so weight-row blocks start inside scale
// blocks), dims with SIMD tails, and the three output modes (direct, weighted, scattered
// + accumulated), against a double reference that computes each expert on its own.
#include <memory>

#include "test/harness.h"

using namespace test;

namespace {

struct Expert {
  TestWeight w1, w2, w3;
};

// Reference FFN of one row through one expert.
std::vector<double> ffn(const Expert& e, const float* x, int64_t dim, int64_t inter) {
  std::vector<double> h(static_cast<size_t>(inter));
  for (int64_t i = 0; i < inter; ++i) {
    double g = 0.0, u = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      g += x[d] * e.w1.at(i, d);
      u += x[d] * e.w3.at(i, d);
    }
    h[i] = g / (1.0 + std::exp(-g)) * u;
  }
  std::vector<double> y(static_cast<size_t>(dim));
  for (int64_t d = 0; d < dim; ++d) {
    double acc = 0.0;
    for (int64_t i = 0; i < inter; ++i) acc += h[i] * e.w2.at(d, i);
    y[d] = acc;
  }
  return y;
}

void run_case(Rng& rng, em_dtype dt, int64_t dim, int64_t inter, const std::vector<int32_t>& counts) {
  const int32_t E = static_cast<int32_t>(counts.size());
  std::vector<Expert> experts;
  for (int32_t e = 0; e < E; ++e)
    experts.push_back({make_weight(rng, dt, inter, dim, 0.5f), make_weight(rng, dt, dim, inter, 0.5f),
                       make_weight(rng, dt, inter, dim, 0.5f)});
  std::vector<int32_t> offsets(static_cast<size_t>(E + 1), 0);
  for (int32_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int64_t rows = offsets[E];
  std::vector<float> x = rng.vec(static_cast<size_t>(rows * dim));
  std::vector<float> row_weight = rng.vec(static_cast<size_t>(rows), 0.1f, 1.0f);
  const int64_t num_out = std::max<int64_t>(1, rows / 2);
  std::vector<int32_t> out_index(static_cast<size_t>(rows));
  for (auto& i : out_index) i = rng.integer(0, static_cast<int>(num_out - 1));

  // References for the three modes.
  std::vector<double> direct(static_cast<size_t>(rows * dim)), scattered(static_cast<size_t>(num_out * dim), 0.5);
  for (int32_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      const std::vector<double> y = ffn(experts[e], x.data() + r * dim, dim, inter);
      for (int64_t d = 0; d < dim; ++d) {
        direct[r * dim + d] = y[d];
        scattered[out_index[r] * dim + d] += row_weight[r] * y[d];
      }
    }

  std::vector<em_tensor> w1, w2, w3;
  for (auto& ex : experts) {
    w1.push_back(ex.w1.view());
    w2.push_back(ex.w2.view());
    w3.push_back(ex.w3.view());
  }
  em_tensor xt = em_tensor_2d(x.data(), EM_F32, rows, dim);
  // Allowed error at element i: 1e-4 x (1 + |ref_i|) for fp32 products. Where x is rounded
  // to bf16 (AVX512_BF16 with bf16 weights, twice: x and the intermediate h), the error is
  // set by the whole output's size, not the element's: 1e-2 x (1 + max |ref|).
  auto max_abs = [](const std::vector<double>& v) {
    double m = 0.0;
    for (double e : v) m = std::max(m, std::fabs(e));
    return m;
  };
  const double direct_max = max_abs(direct), scattered_max = max_abs(scattered);
  for (em_cpu_isa isa : available_isas()) {
    for (int threads : {1, 3}) {
      Backend be(isa, threads);
      const bool rounds_x = accumulation_tolerance(isa, dt) > 1e-3;
      auto allowed = [&](double ref, double ref_max) { return rounds_x ? 1e-2 * (1.0 + ref_max) : 1e-4 * (1.0 + std::fabs(ref)); };
      // Direct: y row r = FFN(x row r).
      std::vector<float> y(static_cast<size_t>(rows * dim), 9.0f);
      em_tensor yt = em_tensor_2d(y.data(), EM_F32, rows, dim);
      em_moe_args a{&xt, E, offsets.data(), w1.data(), w3.data(), w2.data(), nullptr, nullptr, 0, &yt, nullptr};
      CHECK_OK(em_moe_ffn(be.b, &a));
      for (size_t i = 0; i < y.size(); ++i) {
        if (std::fabs(y[i] - direct[i]) > allowed(direct[i], direct_max)) {
          CHECK(false, "%s %s direct i=%zu got %g want %g", be.label.c_str(), em_dtype_name(dt), i, y[i], direct[i]);
          break;
        }
      }
      // Weighted, scattered into num_out rows, accumulated onto 0.5.
      std::vector<float> ys(static_cast<size_t>(num_out * dim), 0.5f);
      em_tensor yst = em_tensor_2d(ys.data(), EM_F32, num_out, dim);
      em_moe_args b{&xt, E, offsets.data(), w1.data(), w3.data(), w2.data(), row_weight.data(), out_index.data(), 1, &yst,
                    nullptr};
      CHECK_OK(em_moe_ffn(be.b, &b));
      for (size_t i = 0; i < ys.size(); ++i) {
        if (std::fabs(ys[i] - scattered[i]) > allowed(scattered[i], scattered_max)) {
          CHECK(false, "%s %s scattered i=%zu got %g want %g", be.label.c_str(), em_dtype_name(dt), i, ys[i],
                scattered[i]);
          break;
        }
      }
      // Gathered: the rows live in a table in another order (plus unused rows); x_index
      // names each grouped row's source. Same bits as the copied rows.
      if (rows > 0) {
        const int64_t table_rows = rows + 3;
        std::vector<float> table(static_cast<size_t>(table_rows * dim), 123.0f);
        std::vector<int32_t> x_index(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r) {
          x_index[r] = static_cast<int32_t>(table_rows - 1 - r);  // reversed, rows 0..2 unused
          std::copy(x.begin() + r * dim, x.begin() + (r + 1) * dim, table.begin() + x_index[r] * dim);
        }
        em_tensor tt = em_tensor_2d(table.data(), EM_F32, table_rows, dim);
        std::vector<float> yg(static_cast<size_t>(num_out * dim), 0.5f);
        em_tensor ygt = em_tensor_2d(yg.data(), EM_F32, num_out, dim);
        em_moe_args g{&tt, E, offsets.data(), w1.data(), w3.data(), w2.data(), row_weight.data(), out_index.data(), 1,
                      &ygt, x_index.data()};
        CHECK_OK(em_moe_ffn(be.b, &g));
        CHECK(std::memcmp(yg.data(), ys.data(), ys.size() * 4) == 0, "%s %s gathered rows differ from copied rows",
              be.label.c_str(), em_dtype_name(dt));
      }
    }
  }
}

void test_errors() {
  Backend be(EM_ISA_SCALAR, 1);
  std::vector<float> x(8), y(8), w(16);
  em_tensor xt = em_tensor_2d(x.data(), EM_F32, 2, 4), yt = em_tensor_2d(y.data(), EM_F32, 2, 4);
  em_tensor w13 = em_tensor_2d(w.data(), EM_F32, 4, 4), w2 = em_tensor_2d(w.data(), EM_F32, 4, 4);
  int32_t bad_offsets[2] = {0, 3};  // 3 rows claimed, x has 2
  em_moe_args a{&xt, 1, bad_offsets, &w13, &w13, &w2, nullptr, nullptr, 0, &yt, nullptr};
  CHECK(em_moe_ffn(be.b, &a) == EM_ERR_SHAPE, "offsets must end at rows");
  int32_t offsets[2] = {0, 2};
  int32_t out_index[2] = {0, 5};
  em_moe_args b{&xt, 1, offsets, &w13, &w13, &w2, nullptr, out_index, 0, &yt, nullptr};
  CHECK(em_moe_ffn(be.b, &b) == EM_ERR_ARG, "out_index out of range");
  em_tensor w2_bad = em_tensor_2d(w.data(), EM_F32, 3, 4);
  em_moe_args c{&xt, 1, offsets, &w13, &w13, &w2_bad, nullptr, nullptr, 0, &yt, nullptr};
  CHECK(em_moe_ffn(be.b, &c) == EM_ERR_SHAPE, "w2 shape");
  int32_t x_index[2] = {1, 2};  // x has 2 rows
  em_moe_args d{&xt, 1, offsets, &w13, &w13, &w2, nullptr, nullptr, 0, &yt, x_index};
  CHECK(em_moe_ffn(be.b, &d) == EM_ERR_ARG, "x_index out of range");
}

}  // namespace

int main() {
  Rng rng(4);
  for (em_dtype dt : weight_dtypes()) {
    run_case(rng, dt, 64, 48, {3, 0, 1, 5});
    run_case(rng, dt, 40, 200, {2, 7, 0, 1, 0, 4});  // tails in dim; inter crosses a 128 block
  }
  run_case(rng, EM_BF16, 128, 96, {20, 1, 33});  // enough rows for the packed GEMM path
  run_case(rng, EM_BF16, 72, 40, {70, 3});        // rows packed once (bf16, even/odd), K with a tail of 8
  run_case(rng, EM_F8_E4M3, 48, 256, {17, 2});
  test_errors();
  return finish("moe");
}
