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

#include "cutlass_common.cuh"

namespace em::cuda {
namespace {

using namespace cutlass_detail;

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

}  // namespace

bool cutlass_grouped_built() { return true; }

bool cutlass_grouped_run(Op& op, int groups, const int* m, const int* n, const int* k, const void* const* a,
                         const int* lda, const void* const* b, const int* ldb, void* const* c, const int* ldc,
                         std::string& why) {
  if (groups == 0) return true;
  if (!on_sm90(op, why)) return false;
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
  Upload up;
  const auto u_sizes = up.add(sizes.data(), G);
  const auto u_a = up.add(reinterpret_cast<const Element* const*>(a), G);
  const auto u_sa = up.add(sa.data(), G);
  const auto u_b = up.add(reinterpret_cast<const Element* const*>(b), G);
  const auto u_sb = up.add(sb.data(), G);
  // C and D share pointers (C is not read).
  const auto u_c = up.add(reinterpret_cast<Element* const*>(c), G);
  const auto u_sc = up.add(sc.data(), G);
  const auto u_sd = up.add(sd.data(), G);
  up.upload(op);
  Element** d_c = up.at(u_c);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = op.ctx.device;
  hw.sm_count = op.ctx.sm_count;
  typename Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion;
  plain_output(fusion);  // C is not read (its pointers are D's)
  args = typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {groups, up.at(u_sizes), sizes.data()},
                                  {up.at(u_a), up.at(u_sa), up.at(u_b), up.at(u_sb)},
                                  {fusion, const_cast<const Element**>(d_c), up.at(u_sc), d_c, up.at(u_sd)},
                                  hw};
  return run_gemm<Gemm>(op, args, why);
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

bool cutlass_grouped_fp8_run(Op&, int, const int*, const int*, const int*, const void* const*, const int*,
                             const float* const*, const void* const*, const int*, const float* const*, void* const*,
                             const int*, std::string& why) {
  why = "built without the CUTLASS grouped GEMM (sm_90a with scripts/cutlass.sh's headers)";
  return false;
}

}  // namespace em::cuda

#endif
