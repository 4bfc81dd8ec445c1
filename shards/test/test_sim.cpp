// The "sim" device (expertmesh/sim.h): its device memory is what makes the addon's device
// paths testable without a GPU, so its rules are checked here: memory starts as NaN bytes,
// copies stay inside their allocation, frees must name an allocation, a capacity runs out,
// range copies land where they say, and attention reads a pool in its memory in place.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "expertmesh/cuda.h"
#include "expertmesh/sim.h"
#include "test/harness.h"

namespace {

em_backend* make(const char* device) {
  em_backend* b = nullptr;
  CHECK_OK(em_backend_create_device(device, &b));
  return b;
}

void test_device_strings() {
  em_backend* b = nullptr;
  for (const char* bad : {"sim:", "sim:0", "sim:-5", "sim:12x", "simulator"}) {
    CHECK(em_backend_create_device(bad, &b) == EM_ERR_ARG && b == nullptr, "'%s' is refused", bad);
  }
  b = make("sim");
  em_backend_info info;
  em_backend_get_info(b, &info);
  CHECK(std::strcmp(info.name, "sim") == 0, "name %s", info.name);
  // The CUDA backend's table: what it lacks falls back to the CPU for the sim too.
  CHECK(em_supports_op(b, EM_OP_MATMUL, EM_F8_E4M3) && em_supports_op(b, EM_OP_MLA_ATTENTION, EM_BF16), "GEMM ops");
  CHECK(!em_supports_op(b, EM_OP_SAMPLE, EM_F32) && !em_supports_op(b, EM_OP_WIRE_PACK, EM_F32) &&
            !em_supports_op(b, EM_OP_LOGPROBS, EM_F32),
        "sampling and the wire codec are the CPU's");
  CHECK(!em_supports_op(b, EM_OP_RMSNORM, EM_F8_E4M3) && !em_supports_op(b, EM_OP_ROPE, EM_BF16), "dtypes as CUDA");
  em_backend_free(b);
  em_backend* cpu = make("cpu");
  em_sim_stats st;
  CHECK(em_sim_get_stats(cpu, &st) == EM_ERR_ARG, "the CPU backend has no sim counters");
  void* p = nullptr;
  CHECK(em_cuda_malloc(cpu, 16, &p) != EM_OK && p == nullptr, "no device memory on the CPU backend");
  em_backend_free(cpu);
}

void test_memory() {
  em_backend* b = make("sim:4096");
  void* p = nullptr;
  CHECK_OK(em_cuda_malloc(b, 1024, &p));
  float f;
  std::memcpy(&f, p, sizeof f);
  CHECK(std::isnan(f), "fresh device memory reads as NaN (got %g)", f);
  std::vector<uint8_t> host(1024, 7);
  CHECK_OK(em_cuda_copy(b, p, host.data(), host.size()));
  CHECK(static_cast<uint8_t*>(p)[1023] == 7, "copied in");
  CHECK(em_cuda_copy(b, static_cast<char*>(p) + 1, host.data(), host.size()) == EM_ERR_ARG,
        "a copy running past the end of its allocation fails");
  std::vector<uint8_t> back(2048);
  CHECK(em_cuda_copy(b, back.data(), p, 2048) == EM_ERR_ARG, "so does a read past it");
  CHECK_OK(em_cuda_copy(b, back.data(), p, 1024));
  CHECK(back[0] == 7 && back[1023] == 7, "copied out");

  // range copies: each range at its offset, the rest untouched
  std::vector<uint8_t> src(1024);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 31 + 1);
  const size_t at[] = {0, 100, 1000}, len[] = {4, 50, 24};
  CHECK_OK(em_cuda_copy_ranges(b, p, src.data(), at, len, 3));
  const uint8_t* d = static_cast<const uint8_t*>(p);
  CHECK(d[3] == src[3] && d[4] == 7 && d[99] == 7 && d[100] == src[100] && d[149] == src[149] && d[150] == 7 &&
            d[1023] == src[1023],
        "ranges land at their offsets");
  const size_t past[] = {1000}, past_len[] = {25};
  CHECK(em_cuda_copy_ranges(b, p, src.data(), past, past_len, 1) == EM_ERR_ARG, "a range past the end fails");
  CHECK(em_cuda_copy_ranges(b, host.data(), src.data(), at, len, 3) == EM_ERR_ARG,
        "a range copy into host memory fails");

  // capacity
  void* q = nullptr;
  CHECK(em_cuda_malloc(b, 3073, &q) == EM_ERR_NOMEM && q == nullptr, "past the capacity: out of memory");
  CHECK_OK(em_cuda_malloc(b, 3072, &q));
  em_sim_stats st;
  CHECK_OK(em_sim_get_stats(b, &st));
  CHECK(st.allocations == 2 && st.bytes == 4096 && st.allocated_total == 2 && st.range_copies == 1 && st.ranges == 3,
        "counters: %zu allocations, %zu bytes, %zu range copies of %zu ranges", st.allocations, st.bytes,
        st.range_copies, st.ranges);
  CHECK_OK(em_cuda_free(b, q));
  CHECK(em_cuda_free(b, q) == EM_ERR_ARG, "a second free fails");
  CHECK(em_cuda_free(b, host.data()) == EM_ERR_ARG, "a free of host memory fails");
  CHECK_OK(em_cuda_synchronize(b));
  em_backend_free(b);  // frees p with it
}

// Attention over a paged pool: read in place when the pool is in the sim's memory, gathered
// on the host otherwise: the CPU backend's answer, exactly in place, within rounding gathered.
void test_pages() {
  const int32_t C = 16, dr = 8, H = 2, dn = 8, dv = 8, B = 4, nb = 2;
  std::vector<float> rows(static_cast<size_t>(nb * B * (C + dr))), q(static_cast<size_t>(H * (dn + dr))),
      w(static_cast<size_t>(H * (dn + dv) * C));
  uint32_t seed = 1;
  auto next = [&] {
    seed = seed * 1664525u + 1013904223u;
    return static_cast<float>(seed >> 8) / 16777216.0f - 0.5f;
  };
  for (auto* v : {&rows, &q, &w})
    for (float& x : *v) x = next();
  const size_t pool_bytes = rows.size() * sizeof(float);
  const int32_t table[] = {1, 0}, offsets[] = {0, 2}, pos[] = {nb * B - 1};
  em_tensor qt = em_tensor_3d(q.data(), EM_F32, 1, H, dn + dr);
  em_tensor wt = em_tensor_2d(w.data(), EM_F32, H * (dn + dv), C);
  auto attend = [&](em_backend* b, const void* pool) {
    std::vector<float> out(static_cast<size_t>(H * dv));
    em_tensor ot = em_tensor_3d(out.data(), EM_F32, 1, H, dv);
    em_kv_pages pages{pool, EM_F32, nb, B, table, offsets};
    em_mla_args a{H, dn, dr, dv, C, 0.25f, &qt, pos, 1, nullptr, nullptr, &wt, &ot, &pages};
    CHECK_OK(em_mla_attention(b, &a));
    return out;
  };
  em_backend* cpu = make("cpu");
  em_backend* sim = make("sim");
  const std::vector<float> want = attend(cpu, rows.data());
  // gathered into one run of rows, its products are summed in other groups than a block's
  const std::vector<float> gathered = attend(sim, rows.data());
  float worst = 0, top = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::fabs(gathered[i] - want[i]));
    top = std::max(top, std::fabs(want[i]));
  }
  CHECK(worst <= 1e-5f * top, "a host pool, gathered: the CPU's answer (off by %g of %g)", worst, top);
  void* dev = nullptr;
  CHECK_OK(em_cuda_malloc(sim, pool_bytes, &dev));
  CHECK_OK(em_cuda_copy(sim, dev, rows.data(), pool_bytes));
  CHECK(attend(sim, dev) == want, "a pool in device memory, read in place: the CPU's answer");
  // The block table is the host's (the CUDA backend plans from it): refused in device memory.
  void* dev_table = nullptr;
  CHECK_OK(em_cuda_malloc(sim, sizeof table, &dev_table));
  CHECK_OK(em_cuda_copy(sim, dev_table, table, sizeof table));
  {
    std::vector<float> out(static_cast<size_t>(H * dv));
    em_tensor ot = em_tensor_3d(out.data(), EM_F32, 1, H, dv);
    em_kv_pages pages{dev, EM_F32, nb, B, static_cast<const int32_t*>(dev_table), offsets};
    em_mla_args a{H, dn, dr, dv, C, 0.25f, &qt, pos, 1, nullptr, nullptr, &wt, &ot, &pages};
    CHECK(em_mla_attention(sim, &a) == EM_ERR_ARG, "a block table in device memory is refused");
  }
  CHECK_OK(em_cuda_free(sim, dev_table));
  CHECK_OK(em_cuda_free(sim, dev));
  em_backend_free(sim);
  em_backend_free(cpu);
}

}  // namespace

int main() {
  test_device_strings();
  test_memory();
  test_pages();
  return test::finish("sim");
}
