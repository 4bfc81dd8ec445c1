// moe_ffn's fp8 experts in the CUTLASS mode (see cutlass_grouped.cu and moe.cu): one
// blockwise-scaled fp8 x fp8 grouped GEMM per phase, DeepSeek-V3's inference numerics. Built
// for sm_90a only, with EM_CUDA_CUTLASS (CMake compiles this file only then).
#include "cutlass_common.cuh"

namespace em::cuda {
namespace {

using namespace cutlass_detail;

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

}  // namespace

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
  Upload up;
  const auto u_sizes = up.add(sizes.data(), G);
  const auto u_a = up.add(reinterpret_cast<const f8::ElementAB* const*>(a), G);
  const auto u_sa = up.add(sa.data(), G);
  const auto u_b = up.add(reinterpret_cast<const f8::ElementAB* const*>(b), G);
  const auto u_sb = up.add(sb.data(), G);
  const auto u_sfa = up.add(sfa, G);
  const auto u_lsfa = up.add(lsfa.data(), G);
  const auto u_sfb = up.add(sfb, G);
  const auto u_lsfb = up.add(lsfb.data(), G);
  const auto u_d = up.add(reinterpret_cast<f8::ElementD* const*>(d), G);
  const auto u_sd = up.add(sd.data(), G);
  up.upload(op);
  f8::ElementD** d_d = up.at(u_d);
  auto* d_sd = up.at(u_sd);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = op.ctx.device;
  hw.sm_count = op.ctx.sm_count;
  typename f8::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, up.at(u_sizes), sizes.data()},
      {up.at(u_a), up.at(u_sa), up.at(u_b), up.at(u_sb), up.at(u_sfa), up.at(u_lsfa), up.at(u_sfb),
       up.at(u_lsfb)},
      {{}, const_cast<const f8::ElementD**>(d_d), d_sd, d_d, d_sd},
      hw};
  plain_output(args.epilogue.thread);
  return run_gemm<f8::Gemm>(op, args, why);
}

}  // namespace em::cuda
