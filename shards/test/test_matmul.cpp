// matmul: y = x W^T for every weight dtype, odd shapes (tails in M, N, K), strided views,
// every ISA and thread count, against a double-precision reference; plus ISA-vs-scalar
// agreement and argument errors.
#include <algorithm>
#include <memory>

#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "test/harness.h"

using namespace test;

namespace {

struct Shape {
  int64_t M, N, K;
};

// Reference: y[m, n] = sum_k x[m, k] * w[n, k], and sum |x w| for the tolerance.
void reference(const std::vector<float>& x, int64_t ldx, const TestWeight& w, int64_t M, std::vector<double>& y,
               std::vector<double>& mag) {
  y.assign(static_cast<size_t>(M * w.rows), 0.0);
  mag.assign(y.size(), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < w.rows; ++n) {
      double acc = 0.0, a = 0.0;
      for (int64_t k = 0; k < w.cols; ++k) {
        const double p = static_cast<double>(x[static_cast<size_t>(m * ldx + k)]) * w.at(n, k);
        acc += p;
        a += std::fabs(p);
      }
      y[static_cast<size_t>(m * w.rows + n)] = acc;
      mag[static_cast<size_t>(m * w.rows + n)] = a;
    }
}

// Runs one matmul with x rows `pad` elements wider than K and y rows `pad` wider than N.
std::vector<float> run(Backend& be, const std::vector<float>& x, int64_t ldx, TestWeight& w, int64_t M, int64_t pad) {
  em_tensor xt = em_tensor_2d(const_cast<float*>(x.data()), EM_F32, M, w.cols);
  xt.stride[0] = ldx;
  const int64_t ldy = w.rows + pad;
  std::vector<float> y(static_cast<size_t>(M * ldy), -7.0f);
  em_tensor yt = em_tensor_2d(y.data(), EM_F32, M, w.rows);
  yt.stride[0] = ldy;
  em_tensor wt = w.view();
  CHECK_OK(em_matmul(be.b, &xt, &wt, &yt));
  std::vector<float> out(static_cast<size_t>(M * w.rows));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < w.rows; ++n) out[static_cast<size_t>(m * w.rows + n)] = y[static_cast<size_t>(m * ldy + n)];
    for (int64_t n = w.rows; n < ldy; ++n)
      CHECK(y[static_cast<size_t>(m * ldy + n)] == -7.0f, "%s wrote past the row (m=%lld)", be.label.c_str(),
            static_cast<long long>(m));
  }
  return out;
}

void test_shapes() {
  const Shape shapes[] = {{1, 1, 1},   {1, 7, 16},   {3, 13, 37},   {4, 64, 128},  {5, 130, 272},
                          {2, 9, 1024}, {17, 70, 531}, {64, 96, 1040}, {9, 260, 300}, {1, 300, 2048},
                          // AMX: 16 weight rows beside 32 (1 x 2 tiles); row blocks of 256 past 512 rows;
                          // k in two slices (1024 + 32 for 256 rows) and a tail of 5
                          {33, 48, 96}, {530, 40, 64}, {256, 48, 1061},
                          // AVX-512 many rows: x panels of 2048 k, 2048 + 2048 + 96 and a tail of 8
                          {18, 20, 4200}};
  Rng rng(1);
  std::vector<std::unique_ptr<Backend>> backends;
  for (em_cpu_isa isa : available_isas())
    for (int t : {1, 3}) backends.push_back(std::make_unique<Backend>(isa, t));

  for (const Shape& s : shapes) {
    for (em_dtype dt : weight_dtypes()) {
      TestWeight w = make_weight(rng, dt, s.N, s.K);
      const int64_t pad = (s.K % 3 == 0) ? 5 : 0;  // strided x and y for some shapes
      const int64_t ldx = s.K + pad;
      std::vector<float> x = rng.vec(static_cast<size_t>(s.M * ldx));
      std::vector<double> ref, mag;
      reference(x, ldx, w, s.M, ref, mag);
      std::vector<float> scalar_out;
      for (auto& be : backends) {
        std::vector<float> y = run(*be, x, ldx, w, s.M, pad);
        const double tol = accumulation_tolerance(be->isa, dt);
        int bad = 0;
        for (size_t i = 0; i < y.size() && bad < 3; ++i) {
          const double err = std::fabs(y[i] - ref[i]);
          if (err > tol * mag[i] + 1e-6) {
            ++bad;
            CHECK(false, "%s %s M=%lld N=%lld K=%lld i=%zu got %.7g want %.7g", be->label.c_str(), em_dtype_name(dt),
                  static_cast<long long>(s.M), static_cast<long long>(s.N), static_cast<long long>(s.K), i, y[i], ref[i]);
          }
        }
        // Every ISA agrees with the scalar path within the accumulation tolerance.
        if (be->isa == EM_ISA_SCALAR && be->threads == 1) {
          scalar_out = y;
        } else {
          for (size_t i = 0; i < y.size(); ++i) {
            if (std::fabs(y[i] - scalar_out[i]) > 2 * tol * mag[i] + 1e-6) {
              CHECK(false, "%s vs scalar %s i=%zu: %.7g vs %.7g", be->label.c_str(), em_dtype_name(dt), i, y[i],
                    scalar_out[i]);
              break;
            }
          }
        }
      }
    }
  }
}

void test_errors() {
  Backend be(EM_ISA_SCALAR, 1);
  std::vector<float> x(12), w(12), y(16);
  em_tensor xt = em_tensor_2d(x.data(), EM_F32, 3, 4);
  em_tensor wt = em_tensor_2d(w.data(), EM_F32, 4, 3);  // K mismatch: 4 vs 3
  em_tensor yt = em_tensor_2d(y.data(), EM_F32, 3, 4);
  CHECK(em_matmul(be.b, &xt, &wt, &yt) == EM_ERR_SHAPE, "K mismatch");
  CHECK(std::string(em_last_error()).find("columns") != std::string::npos, "message: %s", em_last_error());
  wt = em_tensor_2d(w.data(), EM_F32, 3, 4);
  yt = em_tensor_2d(y.data(), EM_F32, 3, 3);
  CHECK_OK(em_matmul(be.b, &xt, &wt, &yt));
  em_tensor bad_x = xt;
  bad_x.dtype = EM_BF16;
  CHECK(em_matmul(be.b, &bad_x, &wt, &yt) == EM_ERR_DTYPE, "x must be f32");
  em_tensor fp8 = em_tensor_2d(w.data(), EM_F8_E4M3, 3, 4);
  CHECK(em_matmul(be.b, &xt, &fp8, &yt) == EM_ERR_ARG, "fp8 without scales");
  em_tensor strided = xt;
  strided.stride[1] = 2;
  CHECK(em_matmul(be.b, &strided, &wt, &yt) == EM_ERR_SHAPE, "non-contiguous rows");
  CHECK(em_matmul(nullptr, &xt, &wt, &yt) == EM_ERR_ARG, "no backend");
  CHECK(em_supports_op(be.b, EM_OP_MATMUL, EM_F8_E4M3) == 1, "cpu supports fp8 matmul");
  CHECK(em_supports_op(be.b, EM_OP_MATMUL, EM_I32) == 0, "no i32 weights");
}

// Linux's tile state (XTILEDATA, feature 18) in this process's permitted set, -1 where there is
// no such call (the emulated build needs none).
int tile_state_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl) && !defined(EM_EMULATE_AVX512)
  constexpr int kArchGetXcompPerm = 0x1022;
  uint64_t mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0) return -1;
  return static_cast<int>((mask >> 18) & 1);
#else
  return -1;
#endif
}

// The tile state is asked for when an amx backend is created, not before: a process on the
// other ISAs keeps Linux's default signal frame (runs first, before any amx backend exists).
void test_tile_state() {
  const int before = tile_state_permitted();
  {
    Backend be(em_cpu_best_isa() >= EM_ISA_AVX512 ? EM_ISA_AVX512 : EM_ISA_SCALAR, 1);
    std::vector<float> x(32 * 64, 0.5f), w(16 * 64, 0.25f), y(32 * 16);
    em_tensor xt = em_tensor_2d(x.data(), EM_F32, 32, 64), wt = em_tensor_2d(w.data(), EM_F32, 16, 64);
    em_tensor yt = em_tensor_2d(y.data(), EM_F32, 32, 16);
    CHECK_OK(em_matmul(be.b, &xt, &wt, &yt));
  }
  const int after_other = tile_state_permitted();
  if (before >= 0) {
    CHECK(before == 0 && after_other == 0, "tile state asked for without amx: %d, %d", before, after_other);
  }
  if (em_cpu_best_isa() == EM_ISA_AMX) {
    Backend amx(EM_ISA_AMX, 1);
    CHECK(amx.b != nullptr, "amx backend: %s", em_last_error());
    if (before >= 0) CHECK(tile_state_permitted() == 1, "amx backend without the tile state");
    std::printf("tile state: asked for by the amx backend only (%s)\n",
                before >= 0 ? "checked with ARCH_GET_XCOMP_PERM" : "emulated tiles");
  } else {
    em_backend* b = nullptr;
    em_cpu_config cfg{EM_ISA_AMX, 1, 0};
    CHECK(em_backend_create_cpu(&cfg, &b) == EM_ERR_UNSUPPORTED && b == nullptr, "amx without AMX");
    std::printf("tile state: no AMX on this CPU; the other ISAs never asked for it\n");
  }
}

// Every fp8 byte times its block scale, exactly: x rows are one-hot, so y[m, n] is one
// weight times its scale, which every kernel must round once, as float(value * scale) does.
// The scales cover the AVX-512 decode kernel's two routes (2^120 below scale 2^7, fp16 at
// and above it) and both fp8 subnormals and the largest magnitudes. AMX rounds fp8 x scale
// to bf16 and is left out.
void test_fp8_exact() {
  constexpr int64_t N = 16, K = 256;  // row n holds byte (n * 37 + k) & 255 at k; NaN bytes read 0
  for (const float scale : {1.0f / 448.0f, 3.0e-7f, 1.0f, 100.0f, 128.0f, 200.0f, 300.0f, 1.0e6f}) {
    TestWeight w{EM_F8_E4M3, N, K, {}, {}, {}};
    w.bytes.resize(static_cast<size_t>(N * K));
    w.ref.resize(w.bytes.size());
    w.scale.assign(2, scale);  // one 128-row block, two 128-k blocks
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        uint8_t b = static_cast<uint8_t>((n * 37 + k) & 255);
        if ((b & 0x7f) == 0x7f) b = 0;
        w.bytes[static_cast<size_t>(n * K + k)] = b;
        w.ref[static_cast<size_t>(n * K + k)] = ref_fp8(b);
      }
    for (const em_cpu_isa isa : available_isas()) {
      if (isa == EM_ISA_AMX) continue;
      Backend be(isa, 1);
      for (const int64_t M : {int64_t{1}, int64_t{3}, int64_t{4}}) {
        int bad = 0;
        for (int64_t k0 = 0; k0 + M <= K; k0 += M) {
          std::vector<float> x(static_cast<size_t>(M * K), 0.0f);
          for (int64_t m = 0; m < M; ++m) x[static_cast<size_t>(m * K + k0 + m)] = 1.0f;
          const std::vector<float> y = run(be, x, K, w, M, 0);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              const float want = static_cast<float>(w.at(n, k0 + m) * static_cast<double>(scale));
              const float got = y[static_cast<size_t>(m * N + n)];
              if (got != want && bad++ < 3)
                std::fprintf(stderr, "  %s scale %g M %lld: byte 0x%02x -> %.9g, want %.9g\n", be.label.c_str(),
                             static_cast<double>(scale), static_cast<long long>(M),
                             w.bytes[static_cast<size_t>(n * K + k0 + m)], static_cast<double>(got),
                             static_cast<double>(want));
            }
        }
        CHECK(bad == 0, "%s: %d fp8 weights x scale %g not exact (M=%lld)", be.label.c_str(), bad,
              static_cast<double>(scale), static_cast<long long>(M));
      }
    }
  }
}

}  // namespace

int main() {
  test_tile_state();
  test_shapes();
  test_fp8_exact();
  test_errors();
  return finish("matmul");
}
