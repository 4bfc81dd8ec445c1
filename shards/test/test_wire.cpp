// wire_pack / wire_unpack / em_crc32: the frame codec of docs/wire-format.md against
// references written here from the format's definition (bitwise CRC-32, bf16 and e4m3
// rounding by searching the nearest representable value), on every ISA, with gathers,
// scatter-adds, odd widths (SIMD tails, partial 128-groups), special values, unaligned
// buffers, and the CRC folded in by pack.
#include "test/harness.h"

using namespace test;

namespace {

uint32_t ref_crc32(uint32_t crc, const uint8_t* p, size_t n) {
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
  }
  return ~c;
}

// bf16 bits nearest to f (ties to even); NaN -> quiet NaN with the same sign and top bits.
uint16_t ref_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);  // truncated: toward zero
  const uint16_t hi = static_cast<uint16_t>(lo + 1);  // next away from zero (may be inf)
  const double a = std::fabs(static_cast<double>(ref_bf16(lo)));
  // Past the largest finite bf16 the next step is 2^128 (infinity), as IEEE rounding sees it.
  const double b = (hi & 0x7fff) == 0x7f80 ? std::ldexp(1.0, 128) : std::fabs(static_cast<double>(ref_bf16(hi)));
  const double v = std::fabs(static_cast<double>(f));
  if ((u & 0xffff) == 0) return lo;
  if (v - a < b - v) return lo;
  if (v - a > b - v) return hi;
  return (lo & 1) ? hi : lo;
}

// e4m3 code nearest to f (ties to even code), saturating at 448, NaN -> 0x7f.
uint8_t ref_to_e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  const double v = std::fabs(static_cast<double>(f));
  if (v >= 448.0) return sign | 0x7e;
  uint8_t best = 0;
  double best_err = INFINITY;
  for (uint8_t m = 0; m <= 0x7e; ++m) {
    const double err = std::fabs(ref_fp8(m) - v);
    if (err < best_err || (err == best_err && (m & 1) == 0)) {
      best = m;
      best_err = err;
    }
  }
  return sign | best;
}

int64_t groups_of(int64_t dim) { return (dim + 127) / 128; }

// The reference bytes of rows (row_index or identity) of x [*, dim].
std::vector<uint8_t> ref_pack(const std::vector<float>& x, int64_t dim, const std::vector<int32_t>& rows,
                              em_wire_dtype dt) {
  const int64_t n = static_cast<int64_t>(rows.size());
  std::vector<uint8_t> out(static_cast<size_t>(em_wire_bytes(dt, n, dim)));
  for (int64_t r = 0; r < n; ++r) {
    const float* src = x.data() + rows[r] * dim;
    if (dt == EM_WIRE_BF16) {
      for (int64_t c = 0; c < dim; ++c) {
        const uint16_t h = ref_to_bf16(src[c]);
        std::memcpy(&out[static_cast<size_t>(2 * (r * dim + c))], &h, 2);
      }
    } else if (dt == EM_WIRE_F32) {
      std::memcpy(&out[static_cast<size_t>(4 * r * dim)], src, static_cast<size_t>(4 * dim));
    } else {
      for (int64_t g = 0; g < groups_of(dim); ++g) {
        float amax = 0;
        for (int64_t c = g * 128; c < std::min(dim, g * 128 + 128); ++c)
          if (std::fabs(src[c]) > amax) amax = std::fabs(src[c]);
        // docs/wire-format.md: scale = f32(amax / 448), 1 when zero or subnormal; codes of f32(x * f32(1 / scale)).
        float s = amax / 448.0f;
        if (!(s >= std::ldexp(1.0f, -126))) s = 1.0f;
        const float inv = 1.0f / s;
        std::memcpy(&out[static_cast<size_t>(n * dim + 4 * (r * groups_of(dim) + g))], &s, 4);
        for (int64_t c = g * 128; c < std::min(dim, g * 128 + 128); ++c)
          out[static_cast<size_t>(r * dim + c)] = ref_to_e4m3(src[c] * inv);
      }
    }
  }
  return out;
}

std::vector<float> special_values() {
  return {0.0f, -0.0f, 1.0f, -1.0f, 1.00390625f, 1.01171875f, 3.0e38f, -3.4e38f, INFINITY, -INFINITY, NAN, -NAN,
          1e-40f, -1e-45f, 448.0f, 464.0f, 0.015625f, 0.0146484375f, 0.001953125f, 0.0029296875f};
}

void test_crc(Rng& rng) {
  const char* nine = "123456789";
  CHECK(em_crc32(0, nine, 9) == 0xcbf43926u, "crc32('123456789') = %08x", em_crc32(0, nine, 9));
  CHECK(em_crc32(0, nullptr, 0) == 0, "empty");
  std::vector<uint8_t> buf(20000);
  for (auto& b : buf) b = static_cast<uint8_t>(rng.integer(0, 255));
  for (int i = 0; i < 300; ++i) {
    const size_t off = static_cast<size_t>(rng.integer(0, 15));
    const size_t n = static_cast<size_t>(i < 200 ? i : rng.integer(0, 19000));
    const uint32_t want = ref_crc32(0, buf.data() + off, n);
    CHECK(em_crc32(0, buf.data() + off, n) == want, "crc32 of %zu bytes at +%zu", n, off);
    const size_t cut = n ? static_cast<size_t>(rng.integer(0, static_cast<int>(n))) : 0;
    CHECK(em_crc32(em_crc32(0, buf.data() + off, cut), buf.data() + off + cut, n - cut) == want,
          "crc32 continued at %zu of %zu", cut, n);
  }
}

void test_pack_unpack(Rng& rng, int64_t dim, int64_t x_rows, bool gather) {
  std::vector<float> x = rng.vec(static_cast<size_t>(x_rows * dim), -3.0f, 3.0f);
  // Scale some rows far up and down, zero a row, sprinkle special values.
  for (int64_t r = 0; r < x_rows; ++r) {
    const float f = r % 4 == 1 ? 1e-3f : r % 4 == 2 ? 1e4f : r % 4 == 3 && r == x_rows - 1 ? 0.0f : 1.0f;
    for (int64_t c = 0; c < dim; ++c) x[r * dim + c] *= f;
  }
  const std::vector<float> sp = special_values();
  for (size_t i = 0; i < sp.size() && i < x.size(); ++i) x[static_cast<size_t>(rng.integer(0, static_cast<int>(x.size() - 1)))] = sp[i];
  std::vector<int32_t> rows;
  if (gather) {
    for (int i = 0; i < static_cast<int>(x_rows) + 2; ++i) rows.push_back(rng.integer(0, static_cast<int>(x_rows - 1)));
  } else {
    for (int64_t r = 0; r < x_rows; ++r) rows.push_back(static_cast<int32_t>(r));
  }
  const int64_t n = static_cast<int64_t>(rows.size());
  em_tensor xt = em_tensor_2d(x.data(), EM_F32, x_rows, dim);
  for (em_wire_dtype dt : {EM_WIRE_BF16, EM_WIRE_FP8, EM_WIRE_F32}) {
    const std::vector<uint8_t> want = ref_pack(x, dim, rows, dt);
    for (em_cpu_isa isa : available_isas()) {
      Backend be(isa, 1);
      // Unaligned output inside a larger buffer, with a CRC seed for bytes before it.
      std::vector<uint8_t> frame(want.size() + 5, 0xee);
      uint32_t crc = em_crc32(0, "head", 4);
      em_wire_pack_args a{&xt, gather ? rows.data() : nullptr, n, dt, frame.data() + 3,
                          static_cast<int64_t>(want.size()), &crc};
      CHECK_OK(em_wire_pack(be.b, &a));
      const bool same = std::memcmp(frame.data() + 3, want.data(), want.size()) == 0;
      CHECK(same, "%s pack dtype %d dim %lld rows %lld", be.label.c_str(), dt, static_cast<long long>(dim),
            static_cast<long long>(n));
      if (!same) {
        for (size_t i = 0; i < want.size(); ++i)
          if (frame[i + 3] != want[i]) {
            std::fprintf(stderr, "  first difference at byte %zu: %02x want %02x\n", i, frame[i + 3], want[i]);
            break;
          }
      }
      CHECK(frame[2] == 0xee && frame[want.size() + 3] == 0xee, "pack wrote outside out");
      CHECK(crc == ref_crc32(em_crc32(0, "head", 4), want.data(), want.size()), "%s pack crc dtype %d",
            be.label.c_str(), dt);

      // Unpack, scattered (reverse order) and accumulated onto 1, from an unaligned copy.
      std::vector<uint8_t> in(want.size() + 1);
      std::memcpy(in.data() + 1, want.data(), want.size());
      std::vector<int32_t> out_index(static_cast<size_t>(n));
      for (int64_t r = 0; r < n; ++r) out_index[r] = static_cast<int32_t>(n - 1 - r);
      std::vector<float> y(static_cast<size_t>(n * dim), 1.0f), y0(static_cast<size_t>(n * dim), 7.0f);
      em_tensor yt = em_tensor_2d(y.data(), EM_F32, n, dim), y0t = em_tensor_2d(y0.data(), EM_F32, n, dim);
      // The accumulating unpack also folds in the CRC of what it read (seeded as in pack).
      uint32_t ucrc = em_crc32(0, "head", 4);
      em_wire_unpack_args u{in.data() + 1, static_cast<int64_t>(want.size()), dt, n, &yt, out_index.data(), 1, &ucrc};
      CHECK_OK(em_wire_unpack(be.b, &u));
      CHECK(ucrc == ref_crc32(em_crc32(0, "head", 4), want.data(), want.size()), "%s unpack crc dtype %d",
            be.label.c_str(), dt);
      em_wire_unpack_args u0{in.data() + 1, static_cast<int64_t>(want.size()), dt, n, &y0t, nullptr, 0, nullptr};
      CHECK_OK(em_wire_unpack(be.b, &u0));
      int bad = 0;
      for (int64_t r = 0; r < n && bad < 3; ++r) {
        for (int64_t c = 0; c < dim && bad < 3; ++c) {
          float v;
          if (dt == EM_WIRE_BF16) {
            uint16_t h;
            std::memcpy(&h, &want[static_cast<size_t>(2 * (r * dim + c))], 2);
            v = ref_bf16(h);
          } else if (dt == EM_WIRE_F32) {
            std::memcpy(&v, &want[static_cast<size_t>(4 * (r * dim + c))], 4);
          } else {
            float s;
            std::memcpy(&s, &want[static_cast<size_t>(n * dim + 4 * (r * groups_of(dim) + c / 128))], 4);
            v = static_cast<float>(ref_fp8(want[static_cast<size_t>(r * dim + c)])) * s;
          }
          const float got0 = y0[static_cast<size_t>(r * dim + c)];
          const float got = y[static_cast<size_t>((n - 1 - r) * dim + c)];
          const float want_acc = 1.0f + v;
          const bool ok0 = std::isnan(v) ? std::isnan(got0) : std::memcmp(&got0, &v, 4) == 0;
          const bool ok = std::isnan(want_acc) ? std::isnan(got) : got == want_acc;
          if (!ok0 || !ok) {
            ++bad;
            CHECK(false, "%s unpack dtype %d row %lld col %lld: got %g / %g want %g", be.label.c_str(), dt,
                  static_cast<long long>(r), static_cast<long long>(c), got0, got, v);
          }
        }
      }
    }
  }
}

// Every e4m3 code (NaN, subnormals, both zeros, the largest), unpacked by every ISA, equals
// its value times the group's scale, bit for bit (NaN codes: NaN).
void test_every_e4m3_code() {
  const int64_t dim = 256;
  std::vector<uint8_t> in(static_cast<size_t>(dim + 2 * 4));
  for (int c = 0; c < 256; ++c) in[static_cast<size_t>(c)] = static_cast<uint8_t>(c);
  const float scales[2] = {0.375f, 3.0f};
  std::memcpy(in.data() + dim, scales, sizeof scales);
  for (em_cpu_isa isa : available_isas()) {
    Backend be(isa, 1);
    for (int acc = 0; acc < 2; ++acc) {
      std::vector<float> y(static_cast<size_t>(dim), acc ? 1.0f : -7.0f);
      em_tensor yt = em_tensor_2d(y.data(), EM_F32, 1, dim);
      em_wire_unpack_args u{in.data(), static_cast<int64_t>(in.size()), EM_WIRE_FP8, 1, &yt, nullptr, acc, nullptr};
      CHECK_OK(em_wire_unpack(be.b, &u));
      for (int c = 0; c < 256; ++c) {
        const float v = static_cast<float>(ref_fp8(static_cast<uint8_t>(c))) * scales[c / 128];
        const float want = acc ? 1.0f + v : v;
        const float got = y[static_cast<size_t>(c)];
        if ((c & 0x7f) == 0x7f) {
          CHECK(std::isnan(got), "%s code 0x%02x: got %g, want NaN", be.label.c_str(), c, got);
          continue;
        }
        uint32_t gb, wb;
        std::memcpy(&gb, &got, 4);
        std::memcpy(&wb, &want, 4);
        CHECK(gb == wb, "%s acc %d code 0x%02x: got %a want %a", be.label.c_str(), acc, c, got, want);
      }
    }
  }
}

void test_errors() {
  Backend be(EM_ISA_SCALAR, 1);
  std::vector<float> x(8);
  std::vector<uint8_t> out(64);
  em_tensor xt = em_tensor_2d(x.data(), EM_F32, 2, 4);
  int32_t rows[2] = {0, 2};
  em_wire_pack_args a{&xt, rows, 2, EM_WIRE_BF16, out.data(), 16, nullptr};
  CHECK(em_wire_pack(be.b, &a) == EM_ERR_ARG, "row_index out of range");
  em_wire_pack_args b{&xt, nullptr, 2, EM_WIRE_BF16, out.data(), 15, nullptr};
  CHECK(em_wire_pack(be.b, &b) == EM_ERR_SHAPE, "out size");
  em_wire_pack_args c{&xt, nullptr, 2, static_cast<em_wire_dtype>(4), out.data(), 16, nullptr};
  CHECK(em_wire_pack(be.b, &c) == EM_ERR_DTYPE, "dtype");
  int32_t out_index[2] = {0, 3};
  em_wire_unpack_args d{out.data(), 16, EM_WIRE_BF16, 2, &xt, out_index, 0};
  CHECK(em_wire_unpack(be.b, &d) == EM_ERR_ARG, "out_index out of range");
  em_wire_unpack_args e{out.data(), 17, EM_WIRE_BF16, 2, &xt, nullptr, 0};
  CHECK(em_wire_unpack(be.b, &e) == EM_ERR_SHAPE, "in size");
  CHECK(em_wire_bytes(EM_WIRE_FP8, 3, 130) == 3 * 130 + 3 * 2 * 4, "fp8 bytes");
}

}  // namespace

int main() {
  Rng rng(11);
  test_crc(rng);
  for (int64_t dim : {1, 7, 16, 33, 128, 130, 300, 2048}) {
    test_pack_unpack(rng, dim, 5, false);
    test_pack_unpack(rng, dim, 4, true);
  }
  test_pack_unpack(rng, 7168, 3, true);
  test_every_e4m3_code();
  test_errors();
  return finish("wire");
}
