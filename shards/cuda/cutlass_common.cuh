// What the CUTLASS grouped GEMMs (cutlass_grouped.cu: bf16, cutlass_grouped_fp8.cu: fp8
// blockwise-scaled) share: CUTLASS's headers, the grouped problem shape, and running one
// grouped GEMM on an op's stream. Two translation units so that a build compiles the two
// kernels in parallel (each takes about a minute). Included only with EM_CUDA_CUTLASS.
#pragma once

#include "common.cuh"

#include <cstring>
#include <string>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/detail/blockwise_scale_layout.hpp"

namespace em::cuda::cutlass_detail {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group

inline const char* status_name(cutlass::Status s) { return cutlass::cutlassGetStatusString(s); }

// The small host arrays a grouped GEMM reads on the device (problem sizes, pointers,
// strides, scale layouts: 8 to 11 of them), gathered into one buffer and copied in one
// transfer: each pageable copy stages synchronously, which a decode step would pay 8-11
// times. add() before upload(), at() after.
class Upload {
 public:
  template <typename T>
  struct Slot {
    size_t at;
  };

  template <typename T>
  Slot<T> add(const T* host, size_t n) {
    const size_t at = (bytes_.size() + 15) & ~static_cast<size_t>(15);  // 16-byte aligned
    bytes_.resize(at + sizeof(T) * n);
    std::memcpy(bytes_.data() + at, host, sizeof(T) * n);
    return {at};
  }

  // One scratch allocation of the op, one copy on its stream.
  void upload(Op& op) {
    base_ = static_cast<char*>(op.alloc(bytes_.size()));
    EMC_CUDA(cudaMemcpyAsync(base_, bytes_.data(), bytes_.size(), cudaMemcpyHostToDevice, op.stream()));
  }

  template <typename T>
  T* at(Slot<T> s) const {
    return reinterpret_cast<T*>(base_ + s.at);
  }

 private:
  std::vector<char> bytes_;
  char* base_ = nullptr;
};

// Runs an initialized-argument grouped GEMM: false with `why` when CUTLASS refuses it.
template <typename G>
inline bool run_gemm(Op& op, typename G::Arguments& args, std::string& why) {
  G gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) {
    why = std::string("CUTLASS can_implement: ") + status_name(s);
    return false;
  }
  void* workspace = op.alloc(G::get_workspace_size(args));
  s = gemm.initialize(args, workspace, op.stream());
  // Nothing has been launched yet: the caller can still fall back.
  if (s != cutlass::Status::kSuccess) {
    why = std::string("CUTLASS initialize: ") + status_name(s);
    (void)cudaGetLastError();  // a failed CUDA call in there must not fail the fallback's launch check
    return false;
  }
  s = gemm.run(op.stream());
  if (s != cutlass::Status::kSuccess) throw Error(EM_ERR_INTERNAL, std::string("CUTLASS run: ") + status_name(s));
  EMC_LAUNCHED();
  return true;
}

// The epilogue's alpha = 1, beta = 0 (C is not read), one value for every group.
template <typename Fusion>
inline void plain_output(Fusion& fusion) {
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {_0{}, _0{}, 0};
  fusion.dBeta = {_0{}, _0{}, 0};
}

inline bool on_sm90(const Op& op, std::string& why) {
  if (op.ctx.cc_major == 9 && op.ctx.cc_minor == 0) return true;
  why = "the CUTLASS grouped GEMM is built for sm_90a; this device is " + op.ctx.arch;
  return false;
}

}  // namespace em::cuda::cutlass_detail
