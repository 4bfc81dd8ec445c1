// convert: every bf16 / f16 / fp8 bit pattern to f32 against independent decoders,
// f32 -> bf16 / f16 rounding (nearest even, subnormals, overflow) on chosen values and
// random ones, fp8 dequantization with 128x128 block scales to f32 and bf16, and
// quantization of f32 and bf16 weights into such blocks.
#include "cpu/cpu.h"
#include "kv_pages.h"
#include "test/harness.h"

using namespace test;

namespace {

uint16_t bits_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

// Round-to-nearest-even reference: the representable neighbour closest to v (ties to
// even mantissa), found by search over the decoder.
template <typename Decode>
uint16_t nearest(double v, Decode decode, uint16_t max_finite_bits) {
  uint16_t best = 0;
  double best_err = INFINITY;
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  for (uint32_t m = 0; m <= max_finite_bits; ++m) {
    const uint16_t b = static_cast<uint16_t>(sign | m);
    const double err = std::fabs(decode(b) - v);
    if (err < best_err || (err == best_err && (b & 1) == 0)) {
      best = b;
      best_err = err;
    }
  }
  return best;
}

void test_decode_all(Backend& be) {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> out(65536);
  em_tensor dst = em_tensor_1d(out.data(), EM_F32, 65536);
  for (em_dtype dt : {EM_BF16, EM_F16}) {
    em_tensor src = em_tensor_1d(all.data(), dt, 65536);
    CHECK_OK(em_convert(be.b, &src, &dst));
    for (uint32_t i = 0; i < 65536; ++i) {
      const double want = dt == EM_BF16 ? ref_bf16(static_cast<uint16_t>(i)) : ref_f16(static_cast<uint16_t>(i));
      if (std::isnan(want)) {
        CHECK(std::isnan(out[i]), "%s %04x should be NaN", em_dtype_name(dt), i);
      } else if (!(out[i] == want)) {
        CHECK(false, "%s %04x got %g want %g", em_dtype_name(dt), i, out[i], want);
        break;
      }
    }
  }
}

void test_round(Backend& be, Rng& rng) {
  std::vector<float> v = {1.0f, 1.00390625f /* 1 + 2^-8: tie, stays 1 */, 1.01171875f /* 1 + 3*2^-8: tie, up */,
                          -2.5f, 65504.0f, 65520.0f /* f16 overflow */, 1e-8f /* f16 subnormal */, 6.0e-8f,
                          3.0e38f, -0.0f, 1e-40f};
  for (int i = 0; i < 2000; ++i) v.push_back(rng.uniform(-70000.0f, 70000.0f) * std::pow(2.0f, -rng.integer(0, 40)));
  const int64_t n = static_cast<int64_t>(v.size());
  std::vector<uint16_t> out(static_cast<size_t>(n));
  em_tensor src = em_tensor_1d(v.data(), EM_F32, n);
  em_tensor dst = em_tensor_1d(out.data(), EM_BF16, n);
  CHECK_OK(em_convert(be.b, &src, &dst));
  for (int64_t i = 0; i < n; ++i) {
    // bf16 nearest-even: the two truncation candidates around v.
    const uint16_t lo = bits_bf16(v[i]);
    const double dlo = std::fabs(ref_bf16(lo) - v[i]), dhi = std::fabs(ref_bf16(static_cast<uint16_t>(lo + 1)) - v[i]);
    const uint16_t want = (dhi < dlo || (dhi == dlo && (lo & 1))) ? static_cast<uint16_t>(lo + 1) : lo;
    CHECK(out[i] == want, "bf16(%g) = %04x want %04x", v[i], out[i], want);
  }
  dst.dtype = EM_F16;
  CHECK_OK(em_convert(be.b, &src, &dst));
  for (int64_t i = 0; i < std::min<int64_t>(n, 300); ++i) {
    const double a = std::fabs(static_cast<double>(v[i]));
    uint16_t want;
    if (a >= 65520.0) {
      want = static_cast<uint16_t>((v[i] < 0 ? 0x8000 : 0) | 0x7c00);
    } else {
      want = nearest(v[i], ref_f16, 0x7bff);
    }
    CHECK(out[i] == want, "f16(%g) = %04x want %04x", v[i], out[i], want);
  }
}

void test_fp8(Backend& be, Rng& rng) {
  // Every byte pattern, one scale.
  std::vector<uint8_t> bytes(256);
  for (int i = 0; i < 256; ++i) bytes[i] = static_cast<uint8_t>(i);
  const float one = 1.0f;
  std::vector<float> out(256);
  em_tensor src = em_tensor_fp8(bytes.data(), &one, 1, 256);
  float scales2[2] = {1.0f, 1.0f};
  src.scale = scales2;
  em_tensor dst = em_tensor_2d(out.data(), EM_F32, 1, 256);
  CHECK_OK(em_convert(be.b, &src, &dst));
  for (int i = 0; i < 256; ++i) {
    const double want = ref_fp8(static_cast<uint8_t>(i));
    if (std::isnan(want)) {
      CHECK(std::isnan(out[i]), "fp8 %02x should be NaN", i);
    } else {
      CHECK(out[i] == want, "fp8 %02x got %g want %g", i, out[i], want);
    }
  }
  // Block scales over a [300, 200] weight, to f32 and to bf16.
  TestWeight w = make_weight(rng, EM_F8_E4M3, 300, 200);
  em_tensor ws = w.view();
  std::vector<float> f(300 * 200);
  em_tensor ft = em_tensor_2d(f.data(), EM_F32, 300, 200);
  CHECK_OK(em_convert(be.b, &ws, &ft));
  std::vector<uint16_t> b(300 * 200);
  em_tensor btt = em_tensor_2d(b.data(), EM_BF16, 300, 200);
  CHECK_OK(em_convert(be.b, &ws, &btt));
  for (int64_t r = 0; r < 300; ++r)
    for (int64_t c = 0; c < 200; ++c) {
      const double want = w.at(r, c);
      CHECK(f[r * 200 + c] == static_cast<float>(want), "fp8 dequant (%lld, %lld)", static_cast<long long>(r),
            static_cast<long long>(c));
      CHECK(std::fabs(ref_bf16(b[r * 200 + c]) - want) <= std::fabs(want) * (1.0 / 256), "fp8 -> bf16");
    }
  // Errors: fp8 without scales, i32 target.
  em_tensor noscale = em_tensor_2d(bytes.data(), EM_F8_E4M3, 1, 256);
  CHECK(em_convert(be.b, &noscale, &dst) == EM_ERR_ARG, "fp8 without scales");
  em_tensor i32 = em_tensor_2d(out.data(), EM_I32, 1, 256);
  CHECK(em_convert(be.b, &src, &i32) == EM_ERR_DTYPE, "i32 target");
}

// Quantizing a whole weight to fp8 with 128x128 block scales (serving a bf16 checkpoint in
// fp8): each block's scale is max|x| / 448 in f32 (1 for a block of zeros) and each code
// the e4m3 value nearest x / scale (ties to even), found by search over the decoder, with
// the 448 saturation: an independent reference, not f32_to_e4m3.
void test_fp8_quantize(Backend& be, Rng& rng) {
  const int64_t rows = 300, cols = 200;  // partial blocks on both edges
  for (em_dtype from : {EM_F32, EM_BF16}) {
    TestWeight w = make_weight(rng, from, rows, cols, 3.0f);
    // One block all zeros (rows 128..255, cols 0..127), one element far larger than the rest.
    std::vector<float> fx(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) fx[r * cols + c] = static_cast<float>(w.at(r, c));
    for (int64_t r = 128; r < 256; ++r)
      for (int64_t c = 0; c < 128; ++c) fx[r * cols + c] = 0.0f;
    fx[5 * cols + 170] = 1000.0f;
    std::vector<uint16_t> bx(fx.size());
    for (size_t i = 0; i < fx.size(); ++i) bx[i] = bits_bf16(fx[i]);  // truncation: some bf16 near x
    em_tensor src = from == EM_F32 ? em_tensor_2d(fx.data(), EM_F32, rows, cols) : em_tensor_2d(bx.data(), EM_BF16, rows, cols);
    std::vector<double> v(fx.size());
    for (size_t i = 0; i < fx.size(); ++i) v[i] = from == EM_F32 ? fx[i] : ref_bf16(bx[i]);
    std::vector<uint8_t> codes(fx.size(), 0xaa);
    std::vector<float> scales(3 * 2, -1.0f);
    em_tensor dst = em_tensor_fp8(codes.data(), scales.data(), rows, cols);
    CHECK_OK(em_convert(be.b, &src, &dst));
    for (int64_t br = 0; br < 3; ++br)
      for (int64_t bc = 0; bc < 2; ++bc) {
        double amax = 0;
        for (int64_t r = br * 128; r < std::min(rows, br * 128 + 128); ++r)
          for (int64_t c = bc * 128; c < std::min(cols, bc * 128 + 128); ++c) amax = std::max(amax, std::fabs(v[r * cols + c]));
        const float want = amax > 0 ? static_cast<float>(amax / 448.0) : 1.0f;
        CHECK(scales[br * 2 + bc] == want, "%s -> fp8 scale of block (%lld, %lld): %g, want %g", em_dtype_name(from),
              static_cast<long long>(br), static_cast<long long>(bc), scales[br * 2 + bc], want);
      }
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const double q = v[r * cols + c] / scales[(r / 128) * 2 + c / 128];
        uint8_t want = 0;
        double best = INFINITY;
        for (int code = 0; code < 256; ++code) {
          const double d = ref_fp8(static_cast<uint8_t>(code));
          if (std::isnan(d) || std::signbit(d) != std::signbit(q)) continue;
          const double err = std::fabs(d - q);
          if (err < best || (err == best && (code & 1) == 0)) {
            best = err;
            want = static_cast<uint8_t>(code);
          }
        }
        if (codes[r * cols + c] != want && bad++ < 5)
          CHECK(false, "%s -> fp8 (%lld, %lld): x / scale = %.9g: code 0x%02x, want 0x%02x", em_dtype_name(from),
                static_cast<long long>(r), static_cast<long long>(c), q, codes[r * cols + c], want);
      }
    CHECK(bad == 0, "%s -> fp8: %lld codes differ", em_dtype_name(from), static_cast<long long>(bad));
    // The element that set its block's scale is exactly +-448 x scale.
    CHECK(codes[5 * cols + 170] == 0x7e, "the block maximum is code 0x7e (448), got 0x%02x", codes[5 * cols + 170]);
  }
  // Refused: fp8 to fp8, no scales to write, more than 2 dims.
  std::vector<uint8_t> codes(4);
  std::vector<float> f(4, 1.0f), scales(1);
  em_tensor src = em_tensor_2d(f.data(), EM_F32, 2, 2);
  em_tensor fp8 = em_tensor_fp8(codes.data(), scales.data(), 2, 2);
  CHECK(em_convert(be.b, &fp8, &fp8) == EM_ERR_DTYPE, "fp8 to fp8");
  em_tensor noscale = em_tensor_2d(codes.data(), EM_F8_E4M3, 2, 2);
  CHECK(em_convert(be.b, &src, &noscale) == EM_ERR_ARG, "fp8 dst without scales");
}

}  // namespace

// The fp8 quantizer and abs-max kernels of every ISA this CPU runs (the paged cache's fp8
// rows) against the portable loops of kv_pages.h, byte for byte: every rounding region of
// e4m3 (subnormal multiples of 2^-9 and their ties, normal ties to even, the 448 / 464
// saturation edge, infinities, NaN, signed zeros) and random values over many scales.
void test_fp8_quantize_kernels() {
  std::vector<float> x;
  for (int e = -12; e <= 9; ++e)
    for (int m = 0; m < 64; ++m) {
      const float base = std::ldexp(1.0f + m / 64.0f, e);
      for (float v : {base, std::nextafter(base, 0.0f), std::nextafter(base, INFINITY)}) {
        x.push_back(v);
        x.push_back(-v);
      }
    }
  for (int k = 0; k <= 16; ++k) x.push_back(k * 0x1p-10f);  // subnormal ties (odd k: halfway)
  for (float v : {0.0f, -0.0f, 448.0f, 464.0f, std::nextafter(464.0f, 0.0f), 465.0f, 1e30f, INFINITY, -INFINITY, NAN, -NAN,
                  0x1p-6f, std::nextafter(0x1p-6f, 0.0f), 1e-40f, -1e-45f})
    x.push_back(v);
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  for (int i = 0; i < 20000; ++i) x.push_back(uni(gen) * std::ldexp(1.0f, static_cast<int>(gen() % 40) - 20));
  for (int s = 0; s < 5; ++s) x.push_back(0.0f);  // a tail shorter than a vector
  std::vector<uint8_t> want(x.size()), got(x.size());
  for (double inv : {1.0, 448.0 / 3.7, 1.0 / 0.013, 3.0e7}) {
    em::fp8_quantize_portable(x.data(), static_cast<int64_t>(x.size()), inv, want.data());
    for (int isa = EM_ISA_SCALAR; isa <= em_cpu_best_isa(); ++isa) {
      const em::cpu::Kernels& k = em::cpu::kernels_for(static_cast<em_cpu_isa>(isa));
      std::fill(got.begin(), got.end(), 0xaa);
      k.f32_to_fp8(x.data(), static_cast<int64_t>(x.size()), inv, got.data());
      size_t diff = 0, first = 0;
      for (size_t i = 0; i < x.size(); ++i)
        if (got[i] != want[i] && diff++ == 0) first = i;
      CHECK(diff == 0, "%s f32_to_fp8 (inv %g): %zu codes differ, first at x = %a: 0x%02x, want 0x%02x",
            em_cpu_isa_name(static_cast<em_cpu_isa>(isa)), inv, diff, static_cast<double>(x[first]), got[first],
            want[first]);
      for (size_t len : {size_t{0}, size_t{5}, size_t{128}, x.size()}) {
        const float a = k.abs_max(x.data() + x.size() - len, static_cast<int64_t>(len));
        const float b = em::abs_max_portable(x.data() + x.size() - len, static_cast<int64_t>(len));
        CHECK(std::memcmp(&a, &b, 4) == 0, "%s abs_max over %zu values: %g, want %g",
              em_cpu_isa_name(static_cast<em_cpu_isa>(isa)), len, a, b);
      }
    }
  }
}

int main() {
  Rng rng(8);
  for (em_cpu_isa isa : available_isas()) {
    Backend be(isa, 2);
    test_decode_all(be);
    test_round(be, rng);
    test_fp8(be, rng);
    test_fp8_quantize(be, rng);
  }
  test_fp8_quantize_kernels();
  return finish("convert");
}
