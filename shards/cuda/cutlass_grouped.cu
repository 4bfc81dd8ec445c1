// moe_ffn's grouped GEMM on Hopper with CUTLASS 3 (EM_CUDA_MOE_GEMM=cutlass; built for
// sm_90a only, when scripts/cutlass.sh provides the headers: EM_CUDA_CUTLASS).
//
// One launch for all experts of a phase: CUTLASS's pointer-array grouped GEMM with TMA loads,
// warp-specialized warpgroup MMA (cooperative: two consumer warpgroups per 128 x 128 tile) and
// a persistent tile scheduler over every group's tiles (example 57 of CUTLASS; the design of
// the MoE GEMMs in DeepGEMM, SGLang and vLLM). Each group g computes, in moe_ffn's terms,
//   y_g [n_g tokens, m_g outputs] (row-major, ld ldc) = x_g [n_g, k_g] (ld ldb) w_g [m_g, k_g]^T (ld lda)
// as CUTLASS's D = A B with the operands swapped (A = w_g, M = m_g: the weight rows fill the
// 128-row side of a tile even when an expert has a handful of tokens; B = x_g column-major,
// N = n_g; D column-major (m_g, n_g) = y_g row-major). bf16 in and out, fp32 accumulation.
#include "common.cuh"

#if defined(EM_CUDA_CUTLASS)

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

namespace em::cuda {
namespace {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using Element = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;     // w [m, k]
using LayoutB = cutlass::layout::ColumnMajor;  // x [n, k], k contiguous
using LayoutD = cutlass::layout::ColumnMajor;  // y [n, m] row-major
constexpr int kAlign = 8;                      // elements: 16 bytes (TMA)
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutD*, kAlign, Element, LayoutD*, kAlign,
    EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, float,
    TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
using StrideA = typename Gemm::GemmKernel::InternalStrideA;
using StrideB = typename Gemm::GemmKernel::InternalStrideB;
using StrideC = typename Gemm::GemmKernel::InternalStrideC;
using StrideD = typename Gemm::GemmKernel::InternalStrideD;

const char* status_name(cutlass::Status s) { return cutlass::cutlassGetStatusString(s); }

}  // namespace

bool cutlass_grouped_built() { return true; }

bool cutlass_grouped_run(Op& op, int groups, const int* m, const int* n, const int* k, const void* const* a,
                         const int* lda, const void* const* b, const int* ldb, void* const* c, const int* ldc,
                         std::string& why) {
  if (groups == 0) return true;
  if (op.ctx.cc_major != 9 || op.ctx.cc_minor != 0) {
    why = "the CUTLASS grouped GEMM is built for sm_90a; this device is " + op.ctx.arch;
    return false;
  }
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  std::vector<Shape3> sizes;
  std::vector<StrideA> sa;
  std::vector<StrideB> sb;
  std::vector<StrideC> sc;
  std::vector<StrideD> sd;
  sizes.reserve(static_cast<size_t>(groups));
  for (int g = 0; g < groups; ++g) {
    // TMA: 16-byte aligned bases and leading dimensions.
    if (lda[g] % kAlign || ldb[g] % kAlign || ldc[g] % kAlign ||
        (reinterpret_cast<uintptr_t>(a[g]) | reinterpret_cast<uintptr_t>(b[g]) | reinterpret_cast<uintptr_t>(c[g])) % 16) {
      why = "an operand is not 16-byte aligned (group " + std::to_string(g) + ")";
      return false;
    }
    sizes.push_back(Shape3{m[g], n[g], k[g]});
    sa.push_back(make_stride(static_cast<int64_t>(lda[g]), Int<1>{}, Int<0>{}));
    sb.push_back(make_stride(static_cast<int64_t>(ldb[g]), Int<1>{}, Int<0>{}));
    sc.push_back(make_stride(Int<1>{}, static_cast<int64_t>(ldc[g]), Int<0>{}));
    sd.push_back(make_stride(Int<1>{}, static_cast<int64_t>(ldc[g]), Int<0>{}));
  }
  const size_t G = static_cast<size_t>(groups);
  auto* d_sizes = static_cast<Shape3*>(op.alloc(sizeof(Shape3) * G));
  EMC_CUDA(cudaMemcpyAsync(d_sizes, sizes.data(), sizeof(Shape3) * G, cudaMemcpyHostToDevice, op.stream()));
  auto copy = [&](const void* host, size_t bytes) {
    void* d = op.alloc(bytes);
    EMC_CUDA(cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, op.stream()));
    return d;
  };
  auto* d_a = static_cast<const Element**>(copy(a, sizeof(void*) * G));
  auto* d_b = static_cast<const Element**>(copy(b, sizeof(void*) * G));
  auto* d_c = static_cast<Element**>(copy(c, sizeof(void*) * G));
  auto* d_sa = static_cast<StrideA*>(copy(sa.data(), sizeof(StrideA) * G));
  auto* d_sb = static_cast<StrideB*>(copy(sb.data(), sizeof(StrideB) * G));
  auto* d_sc = static_cast<StrideC*>(copy(sc.data(), sizeof(StrideC) * G));
  auto* d_sd = static_cast<StrideD*>(copy(sd.data(), sizeof(StrideD) * G));

  cutlass::KernelHardwareInfo hw;
  hw.device_id = op.ctx.device;
  hw.sm_count = op.ctx.sm_count;
  typename Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;  // C is not read (its pointers are D's)
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {_0{}, _0{}, 0};
  fusion.dBeta = {_0{}, _0{}, 0};
  args = typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {groups, d_sizes, sizes.data()},
                                  {d_a, d_sa, d_b, d_sb},
                                  {fusion, const_cast<const Element**>(d_c), d_sc, d_c, d_sd},
                                  hw};
  Gemm gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) {
    why = std::string("CUTLASS can_implement: ") + status_name(s);
    return false;
  }
  void* workspace = op.alloc(Gemm::get_workspace_size(args));
  s = gemm.initialize(args, workspace, op.stream());
  if (s != cutlass::Status::kSuccess) throw Error(EM_ERR_INTERNAL, std::string("CUTLASS initialize: ") + status_name(s));
  s = gemm.run(op.stream());
  if (s != cutlass::Status::kSuccess) throw Error(EM_ERR_INTERNAL, std::string("CUTLASS run: ") + status_name(s));
  EMC_LAUNCHED();
  return true;
}

}  // namespace em::cuda

#else  // a build without CUTLASS (or without sm_90a): moe_ffn runs cuBLAS

namespace em::cuda {

bool cutlass_grouped_built() { return false; }

bool cutlass_grouped_run(Op&, int, const int*, const int*, const int*, const void* const*, const int*,
                         const void* const*, const int*, void* const*, const int*, std::string& why) {
  why = "built without the CUTLASS grouped GEMM (sm_90a with scripts/cutlass.sh's headers)";
  return false;
}

}  // namespace em::cuda

#endif
