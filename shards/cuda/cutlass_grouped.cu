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
#include "cutlass/detail/blockwise_scale_layout.hpp"

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

// The fp8 variant (CUTLASS example 68, DeepSeek-V3's scaling): A = activations e4m3 [M tokens,
// K] row-major with one scale per token per 128 columns, B = weights e4m3 [N, K] (column-major
// K x N) with one scale per 128 x 128 block, both scale arrays K-major (a token's, a block
// row's scales together: the checkpoints' weight_scale_inv layout), D bf16 row-major. The
// scales are applied to the fp32 accumulators every 128 of K (FP8Blockwise schedule).
namespace f8 {
using ElementAB = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignAB = 16, kAlignD = 8;
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _1, _1>;
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, LayoutD*, kAlignD, ElementD, LayoutD*,
    kAlignD, EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
    ElementAB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
using StrideA = typename Gemm::GemmKernel::InternalStrideA;
using StrideB = typename Gemm::GemmKernel::InternalStrideB;
using StrideC = typename Gemm::GemmKernel::InternalStrideC;
using StrideD = typename Gemm::GemmKernel::InternalStrideD;
}  // namespace f8

// Copies a host array into fresh scratch of the op.
template <typename T>
T* to_device(Op& op, const T* host, size_t n) {
  T* d = static_cast<T*>(op.alloc(sizeof(T) * n));
  EMC_CUDA(cudaMemcpyAsync(d, host, sizeof(T) * n, cudaMemcpyHostToDevice, op.stream()));
  return d;
}

// Runs an initialized-argument grouped GEMM: false with `why` when CUTLASS refuses it.
template <typename G>
bool run_gemm(Op& op, typename G::Arguments& args, std::string& why) {
  G gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) {
    why = std::string("CUTLASS can_implement: ") + status_name(s);
    return false;
  }
  void* workspace = op.alloc(G::get_workspace_size(args));
  s = gemm.initialize(args, workspace, op.stream());
  if (s != cutlass::Status::kSuccess) throw Error(EM_ERR_INTERNAL, std::string("CUTLASS initialize: ") + status_name(s));
  s = gemm.run(op.stream());
  if (s != cutlass::Status::kSuccess) throw Error(EM_ERR_INTERNAL, std::string("CUTLASS run: ") + status_name(s));
  EMC_LAUNCHED();
  return true;
}

// The epilogue's alpha = 1, beta = 0 (C is not read), one value for every group.
template <typename Fusion>
void plain_output(Fusion& fusion) {
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {_0{}, _0{}, 0};
  fusion.dBeta = {_0{}, _0{}, 0};
}

bool on_sm90(const Op& op, std::string& why) {
  if (op.ctx.cc_major == 9 && op.ctx.cc_minor == 0) return true;
  why = "the CUTLASS grouped GEMM is built for sm_90a; this device is " + op.ctx.arch;
  return false;
}

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
  auto* d_c = to_device(op, reinterpret_cast<Element* const*>(c), G);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = op.ctx.device;
  hw.sm_count = op.ctx.sm_count;
  typename Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion;
  plain_output(fusion);  // C is not read (its pointers are D's)
  args = typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {groups, to_device(op, sizes.data(), G), sizes.data()},
                                  {to_device(op, reinterpret_cast<const Element* const*>(a), G),
                                   to_device(op, sa.data(), G), to_device(op, reinterpret_cast<const Element* const*>(b), G),
                                   to_device(op, sb.data(), G)},
                                  {fusion, const_cast<const Element**>(d_c), to_device(op, sc.data(), G), d_c,
                                   to_device(op, sd.data(), G)},
                                  hw};
  return run_gemm<Gemm>(op, args, why);
}

bool cutlass_grouped_fp8_run(Op& op, int groups, const int* m, const int* n, const int* k, const void* const* a,
                             const int* lda, const float* const* sfa, const void* const* b, const int* ldb,
                             const float* const* sfb, void* const* d, const int* ldd, std::string& why) {
  if (groups == 0) return true;
  if (!on_sm90(op, why)) return false;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  std::vector<Shape3> sizes;
  std::vector<f8::StrideA> sa;
  std::vector<f8::StrideB> sb;
  std::vector<f8::StrideD> sd;
  std::vector<f8::LayoutSFA> lsfa;
  std::vector<f8::LayoutSFB> lsfb;
  for (int g = 0; g < groups; ++g) {
    if (k[g] % 128 || lda[g] % f8::kAlignAB || ldb[g] % f8::kAlignAB || ldd[g] % f8::kAlignD ||
        (reinterpret_cast<uintptr_t>(a[g]) | reinterpret_cast<uintptr_t>(b[g]) | reinterpret_cast<uintptr_t>(d[g])) % 16) {
      why = "K not a multiple of 128, or an operand not 16-byte aligned (group " + std::to_string(g) + ")";
      return false;
    }
    sizes.push_back(Shape3{m[g], n[g], k[g]});
    sa.push_back(make_stride(static_cast<int64_t>(lda[g]), Int<1>{}, Int<0>{}));
    sb.push_back(make_stride(static_cast<int64_t>(ldb[g]), Int<1>{}, Int<0>{}));
    sd.push_back(make_stride(static_cast<int64_t>(ldd[g]), Int<1>{}, Int<0>{}));
    lsfa.push_back(f8::ScaleConfig::tile_atom_to_shape_SFA(make_shape(m[g], n[g], k[g], 1)));
    lsfb.push_back(f8::ScaleConfig::tile_atom_to_shape_SFB(make_shape(m[g], n[g], k[g], 1)));
  }
  const size_t G = static_cast<size_t>(groups);
  auto* d_d = to_device(op, reinterpret_cast<f8::ElementD* const*>(d), G);
  auto* d_sd = to_device(op, sd.data(), G);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = op.ctx.device;
  hw.sm_count = op.ctx.sm_count;
  typename f8::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, to_device(op, sizes.data(), G), sizes.data()},
      {to_device(op, reinterpret_cast<const f8::ElementAB* const*>(a), G), to_device(op, sa.data(), G),
       to_device(op, reinterpret_cast<const f8::ElementAB* const*>(b), G), to_device(op, sb.data(), G),
       to_device(op, sfa, G), to_device(op, lsfa.data(), G), to_device(op, sfb, G), to_device(op, lsfb.data(), G)},
      {{}, const_cast<const f8::ElementD**>(d_d), d_sd, d_d, d_sd},
      hw};
  plain_output(args.epilogue.thread);
  return run_gemm<f8::Gemm>(op, args, why);
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
