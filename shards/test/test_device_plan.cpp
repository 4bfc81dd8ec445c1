// The CUDA backend's host-side planning (cuda/moe_plan.h) and the addon's KV mirror
// bookkeeping (kv_dirty.h), on the CPU: pure logic that decides what the device runs, so a
// mistake here shows without a GPU. Table-driven.
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/moe_plan.h"
#include "kv_dirty.h"
#include "test/harness.h"

namespace {

using em::cuda::fp8_blockwise_ready;
using em::cuda::gate_up_adjacent;
using em::cuda::gate_up_view;
using em::cuda::lanes_assign;

// Gate and up of one expert as the cases place them in `mem` (bytes), fp8 scales in `sc`.
struct Pair {
  em_tensor w1, w3;
};

void test_gate_up_adjacent() {
  std::vector<uint8_t> mem(1 << 20);
  std::vector<float> sc(1024);
  const int64_t inter = 256, dim = 384;
  auto bf16 = [&](size_t at, int64_t rows, int64_t cols) { return em_tensor_2d(mem.data() + at, EM_BF16, rows, cols); };
  const size_t gate_bytes = static_cast<size_t>(inter * dim) * 2;
  struct Case {
    const char* what;
    Pair p;
    int64_t max_inter;
    bool want;
  };
  std::vector<Case> cases;
  cases.push_back({"side by side", {bf16(0, inter, dim), bf16(gate_bytes, inter, dim)}, inter, true});
  cases.push_back({"a gap between", {bf16(0, inter, dim), bf16(gate_bytes + 2, inter, dim)}, inter, false});
  cases.push_back({"up before gate", {bf16(gate_bytes, inter, dim), bf16(0, inter, dim)}, inter, false});
  cases.push_back({"narrower than the widest expert", {bf16(0, inter, dim), bf16(gate_bytes, inter, dim)}, 512, false});
  cases.push_back({"other widths", {bf16(0, inter, dim), bf16(gate_bytes, inter / 2, dim)}, inter, false});
  {
    Pair p{bf16(0, inter, dim), bf16(gate_bytes, inter, dim)};
    p.w3.dtype = EM_F16;
    cases.push_back({"other dtypes", p, inter, false});
  }
  {
    // Views of wider rows (stride 512): adjacent only if w3 starts after w1's last full row.
    Pair p{bf16(0, inter, dim), bf16(static_cast<size_t>(inter * 512) * 2, inter, dim)};
    p.w1.stride[0] = p.w3.stride[0] = 512;
    cases.push_back({"strided rows, side by side", p, inter, true});
    Pair q = p;
    q.w3.stride[0] = 384;
    cases.push_back({"strided rows, different strides", q, inter, false});
  }
  auto fp8 = [&](size_t at, size_t scale_at, int64_t rows, int64_t cols) {
    return em_tensor_fp8(mem.data() + at, sc.data() + scale_at, rows, cols);
  };
  const size_t fp8_gate = static_cast<size_t>(inter * dim), scale_rows = inter / 128, scale_cols = 3;
  cases.push_back({"fp8, scales side by side too",
                   {fp8(0, 0, inter, dim), fp8(fp8_gate, scale_rows * scale_cols, inter, dim)},
                   inter,
                   true});
  cases.push_back({"fp8, scales apart",
                   {fp8(0, 0, inter, dim), fp8(fp8_gate, scale_rows * scale_cols + 1, inter, dim)},
                   inter,
                   false});
  cases.push_back({"fp8, a partial 128-row block",
                   {fp8(0, 0, 200, dim), fp8(static_cast<size_t>(200 * dim), 2 * scale_cols, 200, dim)},
                   200,
                   false});
  for (const Case& c : cases) {
    const bool got = gate_up_adjacent(c.p.w1, c.p.w3, c.max_inter);
    CHECK(got == c.want, "gate_up_adjacent, %s: got %d", c.what, got);
  }
  const em_tensor v = gate_up_view(cases[0].p.w1);
  CHECK(v.shape[0] == 2 * inter && v.shape[1] == dim && v.data == cases[0].p.w1.data, "gate_up_view: [%lld, %lld]",
        static_cast<long long>(v.shape[0]), static_cast<long long>(v.shape[1]));
}

void test_fp8_blockwise_ready() {
  std::vector<uint8_t> mem(1 << 16);
  std::vector<float> sc(1024);
  auto w = [&](int64_t rows, int64_t cols) { return em_tensor_fp8(mem.data(), sc.data(), rows, cols); };
  const std::vector<int32_t> offsets = {0, 3, 3, 10};  // expert 1 has no rows
  struct Case {
    const char* what;
    int64_t dim, inter;
    std::vector<em_tensor> w1, w3, w2;
    bool want;
  };
  const em_tensor g = w(256, 384), d = w(384, 256);
  std::vector<Case> cases = {
      {"whole blocks", 384, 256, {g, g, g}, {g, g, g}, {d, d, d}, true},
      {"hidden not a multiple of 128", 300, 256, {g, g, g}, {g, g, g}, {d, d, d}, false},
      {"an idle expert's odd shape does not matter", 384, 256, {g, w(200, 384), g}, {g, g, g}, {d, d, d}, true},
      {"an active expert's partial block", 384, 256, {g, g, w(200, 384)}, {g, g, g}, {d, d, d}, false},
      {"narrower than the widest expert", 384, 512, {g, g, g}, {g, g, g}, {d, d, d}, false},
  };
  {
    Case c = cases[0];
    c.what = "a view of a wider tensor's scales (scale_stride 4, K / 128 = 3)";
    c.w2[2].scale_stride = 4;
    c.want = false;
    cases.push_back(c);
    Case n = cases[0];
    n.what = "no scales";
    n.w3[0].scale = nullptr;
    n.want = false;
    cases.push_back(n);
    Case a = cases[0];
    a.what = "an active expert's down weight not 16-byte aligned";
    a.w2[2] = em_tensor_fp8(mem.data() + 8, sc.data(), 384, 256);
    a.want = false;
    cases.push_back(a);
  }
  for (const Case& c : cases) {
    std::string why;
    const bool got = fp8_blockwise_ready(c.w1, c.w3, c.w2, offsets.data(), 3, c.dim, c.inter, why);
    CHECK(got == c.want, "fp8_blockwise_ready, %s: got %d (%s)", c.what, got, why.c_str());
    CHECK(got || why.find("dequantized to bf16") == 0, "fp8_blockwise_ready, %s: why '%s'", c.what, why.c_str());
  }
}

void test_lanes_assign() {
  struct Case {
    std::vector<int32_t> rows;
    int lanes;
    std::vector<int> want;
  };
  const std::vector<Case> cases = {
      {{5, 5, 5, 5}, 4, {0, 1, 2, 3}},
      {{10, 1, 1, 1, 1}, 2, {0, 1, 1, 1, 1}},       // the big one alone
      {{0, 7, 0, 3, 3}, 2, {0, 0, 0, 1, 1}},        // idle experts stay on 0
      {{4, 4, 4}, 1, {0, 0, 0}},
      {{1, 2, 3, 4, 5, 6}, 3, {0, 1, 2, 0, 1, 2}},  // 1+4, 2+5, 3+6
  };
  for (const Case& c : cases) {
    std::vector<int32_t> offsets(c.rows.size() + 1, 0);
    for (size_t e = 0; e < c.rows.size(); ++e) offsets[e + 1] = offsets[e] + c.rows[e];
    const std::vector<int> got = lanes_assign(offsets.data(), static_cast<int32_t>(c.rows.size()), c.lanes);
    std::string g, w;
    for (int x : got) g += std::to_string(x);
    for (int x : c.want) w += std::to_string(x);
    CHECK(got == c.want, "lanes_assign over %d lanes: got %s, want %s", c.lanes, g.c_str(), w.c_str());
  }
}

void test_dirty_ranges() {
  em::DirtyRanges d(3);
  CHECK(d.note(0, 100) && d.note(100, 50) && d.size() == 1 && d.lengths()[0] == 150, "a run continued is one range");
  CHECK(d.note(1000, 8) && d.note(500, 8) && d.size() == 3, "other places are ranges of their own");
  CHECK(d.note(508, 8) && d.size() == 3 && d.lengths()[2] == 16, "continuing the last range stays within the cap");
  CHECK(d.note(7, 0) && d.size() == 3, "an empty write notes nothing");
  CHECK(!d.note(2000, 8) && d.size() == 3, "past the cap: refused (the caller copies everything)");
  CHECK(d.offsets()[0] == 0 && d.offsets()[1] == 1000 && d.offsets()[2] == 500, "ranges in the order written");
  d.clear();
  CHECK(d.empty() && d.note(2000, 8) && d.size() == 1, "cleared after a flush");
}

}  // namespace

int main() {
  test_gate_up_adjacent();
  test_fp8_blockwise_ready();
  test_lanes_assign();
  test_dirty_ranges();
  return test::finish("device_plan");
}
