// Host-side planning of the CUDA moe_ffn (cuda/moe.cu), free of CUDA so that the CPU build
// tests it (test/test_device_plan.cpp): which experts' gate and up weights run as one GEMM,
// which fp8 experts the CUTLASS blockwise path can take, and which stream runs each expert.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "expertmesh/ops.h"

namespace em::cuda {

// Whether expert weights w1 (gate) and w3 (up) can be read as one [2 * inter, dim] weight:
// same dtype, shape and row stride, rows contiguous, w3 starting where w1 ends (fp8: the
// scale rows too, so inter must be a whole number of 128-row blocks), inter = max_inter (the
// up half of the output lands at column max_inter).
inline bool gate_up_adjacent(const em_tensor& w1, const em_tensor& w3, int64_t max_inter) {
  if (w1.ndim != 2 || w3.ndim != 2 || w1.dtype != w3.dtype || w1.shape[0] != max_inter || max_inter == 0) return false;
  if (w3.shape[0] != w1.shape[0] || w3.shape[1] != w1.shape[1] || w3.stride[0] != w1.stride[0] || w1.stride[1] != 1 ||
      w3.stride[1] != 1 || w1.shape[1] == 0)
    return false;
  const size_t esz = em_dtype_size(w1.dtype);
  if (static_cast<const char*>(w1.data) + static_cast<size_t>(w1.shape[0] * w1.stride[0]) * esz != w3.data) return false;
  if (w1.dtype == EM_F8_E4M3) {
    if (w1.shape[0] % EM_FP8_BLOCK != 0 || w1.scale == nullptr || w3.scale == nullptr ||
        w1.scale_stride != w3.scale_stride)
      return false;
    if (w1.scale + (w1.shape[0] / EM_FP8_BLOCK) * w1.scale_stride != w3.scale) return false;
  }
  return true;
}

// The [2 * inter, dim] view of an adjacent gate/up pair.
inline em_tensor gate_up_view(const em_tensor& w1) {
  em_tensor w = w1;
  w.shape[0] *= 2;
  return w;
}

// Needs every active expert's weights in whole 128 blocks on both sides, contiguous rows,
// scales of the whole tensor (scale_stride = K / 128) and one intermediate width; else false
// with `why` (what moe_ffn's status then says ran instead).
inline bool fp8_blockwise_ready(const std::vector<em_tensor>& w1, const std::vector<em_tensor>& w3,
                                const std::vector<em_tensor>& w2, const int32_t* offsets, int32_t E, int64_t dim,
                                int64_t max_inter, std::string& why) {
  // TMA loads need 16-byte aligned rows: the data's address too, not only its row stride (an
  // expert refused here falls back as a whole; refused later by CUTLASS, its down GEMM would
  // fail after gate/up ran).
  auto whole = [](const em_tensor& w) {
    return w.ndim == 2 && w.stride[1] == 1 && w.scale != nullptr && w.shape[0] % EM_FP8_BLOCK == 0 &&
           w.shape[1] % EM_FP8_BLOCK == 0 && w.scale_stride == w.shape[1] / EM_FP8_BLOCK && w.stride[0] % 16 == 0 &&
           reinterpret_cast<uintptr_t>(w.data) % 16 == 0;
  };
  if (dim % EM_FP8_BLOCK != 0 || max_inter % EM_FP8_BLOCK != 0) {
    why = "dequantized to bf16 (cutlass fp8: hidden or intermediate width not a multiple of 128)";
    return false;
  }
  for (int32_t e = 0; e < E; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    if (!whole(w1[e]) || !whole(w3[e]) || !whole(w2[e]) || w1[e].shape[0] != max_inter) {
      why = "dequantized to bf16 (cutlass fp8: expert " + std::to_string(e) +
            "'s weights are not whole 128 x 128 blocks of one intermediate width)";
      return false;
    }
  }
  return true;
}

// Each expert's stream among n: the least loaded (by rows) when the expert comes, in expert
// order; experts without rows stay on stream 0 (they run nothing).
inline std::vector<int> lanes_assign(const int32_t* offsets, int32_t E, int n) {
  std::vector<int> lane(static_cast<size_t>(E), 0);
  std::vector<int64_t> load(static_cast<size_t>(n), 0);
  for (int32_t e = 0; e < E; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    const int i = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    lane[static_cast<size_t>(e)] = i;
    load[static_cast<size_t>(i)] += rows;
  }
  return lane;
}

}  // namespace em::cuda
