// A tiny test harness for the native engine tests: checks, seeded random data, weights
// in every dtype with their exact f32 values, and one backend per (ISA, thread count).
//
// Reference implementations live in each test as plain loops with double accumulation;
// the dtype decoders here are written independently of the engine's own.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "expertmesh/ops.h"

namespace test {

inline int& failures() {
  static int n = 0;
  return n;
}
inline long& checks() {
  static long n = 0;
  return n;
}

#define CHECK(cond, ...)                                            \
  do {                                                              \
    ++test::checks();                                               \
    if (!(cond)) {                                                  \
      ++test::failures();                                           \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                            \
      std::fprintf(stderr, "\n");                                   \
    }                                                               \
  } while (0)

#define CHECK_OK(expr)                                                                         \
  do {                                                                                         \
    const em_status s_ = (expr);                                                               \
    CHECK(s_ == EM_OK, "%s -> %s: %s", #expr, em_status_name(s_), em_last_error());            \
  } while (0)

inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("%s: ok (%ld checks; CPU kernels up to %s)\n", name, checks(), em_cpu_isa_name(em_cpu_best_isa()));
    return 0;
  }
  std::printf("%s: %d failure(s)\n", name, failures());
  return 1;
}

// ------------------------------------------------------------------ random data

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); }
  std::vector<float> vec(size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
  }
};

// ------------------------------------------------------------------ dtype decoders

inline float ref_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline double ref_f16(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return sign * m * std::pow(2.0, -24);
  if (e == 31) return m ? NAN : sign * INFINITY;
  return sign * (1.0 + m / 1024.0) * std::pow(2.0, e - 15);
}

inline double ref_fp8(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  const double sign = (b & 0x80) ? -1.0 : 1.0;
  if (e == 15 && m == 7) return NAN;
  if (e == 0) return sign * m * std::pow(2.0, -9);
  return sign * (1.0 + m / 8.0) * std::pow(2.0, e - 7);
}

// ------------------------------------------------------------------ weights

inline const std::vector<em_dtype>& weight_dtypes() {
  static const std::vector<em_dtype> v = {EM_F32, EM_BF16, EM_F16, EM_F8_E4M3};
  return v;
}

// n values uniform in (-1, 1) stored as an MLA latent cache in `dtype` (f32, or bf16 by
// truncation); `ref`, if given, gets the exact value of every element as stored.
inline std::vector<uint8_t> random_cache(Rng& rng, em_dtype dtype, size_t n, std::vector<double>* ref = nullptr) {
  std::vector<uint8_t> bytes(n * em_dtype_size(dtype));
  if (ref != nullptr) ref->resize(n);
  for (size_t i = 0; i < n; ++i) {
    const float v = rng.uniform(-1.0f, 1.0f);
    double stored = v;
    if (dtype == EM_F32) {
      reinterpret_cast<float*>(bytes.data())[i] = v;
    } else {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      reinterpret_cast<uint16_t*>(bytes.data())[i] = static_cast<uint16_t>(u >> 16);
      stored = ref_bf16(static_cast<uint16_t>(u >> 16));
    }
    if (ref != nullptr) (*ref)[i] = stored;
  }
  return bytes;
}

// A random weight [rows, cols] stored in `dtype`, plus `ref`: the exact value of every
// element as stored (after rounding / fp8 scaling), for the references. Values lie in
// about [-range, range] (f16: always (-1, 1)).
struct TestWeight {
  em_dtype dtype;
  int64_t rows, cols;
  std::vector<uint8_t> bytes;
  std::vector<float> scale;  // fp8 weight_scale_inv
  std::vector<double> ref;   // [rows, cols]
  em_tensor view() {
    if (dtype == EM_F8_E4M3) return em_tensor_fp8(bytes.data(), scale.data(), rows, cols);
    return em_tensor_2d(bytes.data(), dtype, rows, cols);
  }
  double at(int64_t r, int64_t c) const { return ref[static_cast<size_t>(r * cols + c)]; }
};

inline TestWeight make_weight(Rng& rng, em_dtype dtype, int64_t rows, int64_t cols, float range = 1.0f) {
  TestWeight w{dtype, rows, cols, {}, {}, {}};
  const size_t n = static_cast<size_t>(rows * cols);
  w.ref.resize(n);
  if (dtype == EM_F32) {
    w.bytes.resize(n * 4);
    float* p = reinterpret_cast<float*>(w.bytes.data());
    for (size_t i = 0; i < n; ++i) w.ref[i] = p[i] = rng.uniform(-range, range);
  } else if (dtype == EM_BF16) {
    w.bytes.resize(n * 2);
    uint16_t* p = reinterpret_cast<uint16_t*>(w.bytes.data());
    for (size_t i = 0; i < n; ++i) {
      const float f = rng.uniform(-range, range);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      p[i] = static_cast<uint16_t>(u >> 16);  // truncation is fine: ref holds the stored value
      w.ref[i] = ref_bf16(p[i]);
    }
  } else if (dtype == EM_F16) {
    // Random finite halves with exponent 0..14: values in (-1, 1), subnormals included.
    w.bytes.resize(n * 2);
    uint16_t* p = reinterpret_cast<uint16_t*>(w.bytes.data());
    for (size_t i = 0; i < n; ++i) {
      const int e = rng.integer(0, 14), m = rng.integer(0, 1023), s = rng.integer(0, 1);
      p[i] = static_cast<uint16_t>((s << 15) | (e << 10) | m);
      w.ref[i] = ref_f16(p[i]);
    }
  } else {
    w.bytes.resize(n);
    const int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
    w.scale.resize(static_cast<size_t>(sr * sc));
    for (auto& s : w.scale) s = rng.uniform(0.25f, 2.0f) * range / 448.0f;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        uint8_t b;
        do b = static_cast<uint8_t>(rng.integer(0, 255));
        while ((b & 0x7f) == 0x7f);  // no NaN
        w.bytes[static_cast<size_t>(r * cols + c)] = b;
        w.ref[static_cast<size_t>(r * cols + c)] =
            ref_fp8(b) * static_cast<double>(w.scale[static_cast<size_t>((r / 128) * sc + c / 128)]);
      }
    }
  }
  return w;
}

// ------------------------------------------------------------------ backends

struct Backend {
  em_backend* b = nullptr;
  em_cpu_isa isa;
  int threads;
  std::string label;
  Backend(em_cpu_isa isa_, int threads_, bool invariant = false) : isa(isa_), threads(threads_) {
    em_cpu_config cfg{isa_, threads_, invariant ? 1 : 0};
    const em_status s = em_backend_create_cpu(&cfg, &b);
    if (s != EM_OK) std::fprintf(stderr, "backend %s: %s\n", em_cpu_isa_name(isa_), em_last_error());
    label = std::string(em_cpu_isa_name(isa_)) + "/t" + std::to_string(threads_) + (invariant ? "/invariant" : "");
  }
  ~Backend() { em_backend_free(b); }
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;
};

// Every ISA this machine runs, scalar first.
inline std::vector<em_cpu_isa> available_isas() {
  std::vector<em_cpu_isa> v = {EM_ISA_SCALAR};
  const em_cpu_isa best = em_cpu_best_isa();
  for (int i = EM_ISA_AVX2; i <= best; ++i) v.push_back(static_cast<em_cpu_isa>(i));
  return v;
}

// Relative error allowance for fp32 accumulation (bf16 dot products round x; AMX also
// rounds fp8 weights x scale to bf16).
inline double accumulation_tolerance(em_cpu_isa isa, em_dtype wdtype) {
  const bool rounds = (isa >= EM_ISA_AVX512_BF16 && wdtype == EM_BF16) || (isa == EM_ISA_AMX && wdtype == EM_F8_E4M3);
  return rounds ? 1e-2 : 2e-5;
}

}  // namespace test
