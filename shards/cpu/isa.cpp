// Run-time ISA detection (cpuid + xgetbv) and the kernel table of each ISA.
#include <cstdlib>
#include <cstring>

#include "cpu.h"
#include "simd.h"

#if EM_X86
#include <cpuid.h>
#endif
#if EM_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace em::cpu {

namespace {

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA + F16C with YMM state enabled by the OS
  bool avx512 = false;      // AVX-512 F + BW + VL with ZMM state enabled
  bool avx512_bf16 = false;
  bool amx = false;         // AMX-TILE + AMX-BF16 with the tile state enabled by the OS (XCR0)
};

#if EM_X86
// Linux enables the 8 KiB tile state per process, on request (arch_prctl ARCH_REQ_XCOMP_PERM
// for XTILEDATA, feature 18); until then a tile instruction faults. Granted for the process and
// every thread in it. Other systems: not asked, so AMX stays off. Asked only when AMX is about
// to be used (tile_state_granted): once granted, Linux refuses a later sigaltstack smaller than
// the bigger signal frame, so a process that never selects AMX never asks.
bool request_tile_state() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if EM_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u;
  const bool zmm_state = (xcr0_lo & 0xe6u) == 0xe6u;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512bw && avx512vl;
  const bool amx_tile = d & (1u << 24), amx_bf16 = d & (1u << 22);
  const bool tile_state = (xcr0_lo & 0x60000u) == 0x60000u;  // XTILECFG + XTILEDATA
  if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
  f.amx = f.avx512_bf16 && amx_tile && amx_bf16 && tile_state;
#if defined(EM_EMULATE_AVX512)
  // Test build: the AVX-512 kernels run on SIMDe over AVX2 (avx512_emulation.h), the AMX
  // kernels' tile instructions in C++ (amx_emulation.h).
  f.avx512 = f.avx512_bf16 = f.amx = f.avx2;
#endif
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

// The tile state for this process: asked for once, on first use.
bool tile_state_granted() {
#if EM_X86 && defined(EM_EMULATE_AVX512)
  return true;  // emulated tiles need no OS state
#elif EM_X86
  static const bool granted = features().amx && request_tile_state();
  return granted;
#else
  return false;
#endif
}

const Kernels kScalar = {EM_ISA_SCALAR,       scalar::gemm_nt,   scalar::gemm_nn,   scalar::silu_mul,
                         scalar::sum_squares, scalar::scale_mul, scalar::exp_sum,
                         scalar::fp8_to_f32,  scalar::f32_to_fp8, scalar::abs_max};
#if EM_X86
const Kernels kAvx2 = {EM_ISA_AVX2,       avx2::gemm_nt,   avx2::gemm_nn,   avx2::silu_mul,
                       avx2::sum_squares, avx2::scale_mul, avx2::exp_sum, avx2::fp8_to_f32, avx2::f32_to_fp8, avx2::abs_max};
// AVX-512 machines run the AVX2 kernels except the nt GEMM, where width matters most, and
// the f32 nn GEMM (attention over the latent cache).
const Kernels kAvx512 = {EM_ISA_AVX512,     avx512::gemm_nt, avx512::gemm_nn,   avx2::silu_mul,
                         avx2::sum_squares, avx2::scale_mul, avx2::exp_sum, avx2::fp8_to_f32, avx2::f32_to_fp8, avx2::abs_max};
const Kernels kAvx512Bf16 = {EM_ISA_AVX512_BF16, avx512::gemm_nt_bf16dot, avx512::gemm_nn,   avx2::silu_mul,
                             avx2::sum_squares,  avx2::scale_mul,         avx2::exp_sum, avx2::fp8_to_f32, avx2::f32_to_fp8, avx2::abs_max};
// Batch-invariant: the same with the invariant nt GEMMs.
const Kernels kAvx2Invariant = {EM_ISA_AVX2,       avx2::gemm_nt_invariant, avx2::gemm_nn,    avx2::silu_mul,
                                avx2::sum_squares, avx2::scale_mul,         avx2::exp_sum,    avx2::fp8_to_f32,
                                avx2::f32_to_fp8,  avx2::abs_max};
const Kernels kAvx512Invariant = {EM_ISA_AVX512,     avx512::gemm_nt_invariant, avx512::gemm_nn,  avx2::silu_mul,
                                  avx2::sum_squares, avx2::scale_mul,           avx2::exp_sum,    avx2::fp8_to_f32,
                                  avx2::f32_to_fp8,  avx2::abs_max};
const Kernels kAvx512Bf16Invariant = {EM_ISA_AVX512_BF16, avx512::gemm_nt_bf16dot_invariant,
                                      avx512::gemm_nn,    avx2::silu_mul,
                                      avx2::sum_squares,  avx2::scale_mul,
                                      avx2::exp_sum,      avx2::fp8_to_f32,
                                      avx2::f32_to_fp8,   avx2::abs_max};
// AMX: the AVX512_BF16 table with the tile unit for nt GEMMs over bf16 weights.
const Kernels kAmx = {EM_ISA_AMX,        amx::gemm_nt,    avx512::gemm_nn, avx2::silu_mul, avx2::sum_squares,
                      avx2::scale_mul,   avx2::exp_sum,   avx2::fp8_to_f32, avx2::f32_to_fp8, avx2::abs_max};
// Batch-invariant AMX: the tile unit from one x row and one weight row up.
const Kernels kAmxInvariant = {EM_ISA_AMX,        amx::gemm_nt_invariant, avx512::gemm_nn,  avx2::silu_mul,
                               avx2::sum_squares, avx2::scale_mul,        avx2::exp_sum,    avx2::fp8_to_f32,
                               avx2::f32_to_fp8,  avx2::abs_max};
#endif

}  // namespace

bool isa_supported(em_cpu_isa isa) {
  switch (isa) {
    case EM_ISA_SCALAR: return true;
    case EM_ISA_AVX2: return features().avx2;
    case EM_ISA_AVX512: return features().avx512;
    case EM_ISA_AVX512_BF16: return features().avx512_bf16;
    case EM_ISA_AMX: return features().amx && tile_state_granted();
    default: return false;
  }
}

const Kernels& kernels_for(em_cpu_isa isa, bool invariant) {
#if EM_X86
  if (invariant) {
    switch (isa) {
      case EM_ISA_AVX2: return kAvx2Invariant;
      case EM_ISA_AVX512: return kAvx512Invariant;
      case EM_ISA_AVX512_BF16: return kAvx512Bf16Invariant;
      case EM_ISA_AMX: return kAmxInvariant;
      default: break;
    }
  }
  switch (isa) {
    case EM_ISA_AVX2: return kAvx2;
    case EM_ISA_AVX512: return kAvx512;
    case EM_ISA_AVX512_BF16: return kAvx512Bf16;
    case EM_ISA_AMX: return kAmx;
    default: break;
  }
#endif
  (void)isa;
  (void)invariant;
  return kScalar;  // scalar::gemm_nt's order is the same for every row already
}

}  // namespace em::cpu

// The hardware's best, without asking Linux for the tile state (em_backend_create_cpu asks when
// it is given amx, and fails if Linux refuses).
extern "C" em_cpu_isa em_cpu_best_isa(void) {
  using namespace em::cpu;
  if (features().amx) return EM_ISA_AMX;
  if (isa_supported(EM_ISA_AVX512_BF16)) return EM_ISA_AVX512_BF16;
  if (isa_supported(EM_ISA_AVX512)) return EM_ISA_AVX512;
  if (isa_supported(EM_ISA_AVX2)) return EM_ISA_AVX2;
  return EM_ISA_SCALAR;
}

extern "C" const char* em_cpu_isa_name(em_cpu_isa isa) {
  switch (isa) {
    case EM_ISA_AUTO: return "auto";
    case EM_ISA_SCALAR: return "scalar";
    case EM_ISA_AVX2: return "avx2";
    case EM_ISA_AVX512: return "avx512";
    case EM_ISA_AVX512_BF16: return "avx512bf16";
    case EM_ISA_AMX: return "amx";
  }
  return "unknown";
}

extern "C" int em_cpu_isa_parse(const char* name) {
  if (name == nullptr) return -1;
  for (int i = EM_ISA_AUTO; i <= EM_ISA_AMX; ++i) {
    if (std::strcmp(name, em_cpu_isa_name(static_cast<em_cpu_isa>(i))) == 0) return i;
  }
  return -1;
}
