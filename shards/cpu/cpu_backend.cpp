// The CPU backend: its op table (em_backend_iface) and constructor.
#include <cstdlib>
#include <memory>
#include <new>

#include "cpu.h"

namespace em::cpu {
namespace {

Context* ctx_of(void* p) { return static_cast<Context*>(p); }

bool is_weight_dtype(em_dtype d) { return d == EM_F32 || d == EM_BF16 || d == EM_F16 || d == EM_F8_E4M3; }

int supports_op(void*, em_op op, em_dtype dtype) {
  switch (op) {
    case EM_OP_MATMUL:
    case EM_OP_MOE_FFN:
    case EM_OP_MLA_ATTENTION:
    case EM_OP_GATE:
    case EM_OP_CONVERT: return is_weight_dtype(dtype);
    case EM_OP_RMSNORM: return dtype == EM_F32 || dtype == EM_BF16 || dtype == EM_F16;
    case EM_OP_SILU_MUL:
    case EM_OP_ROPE:
    case EM_OP_SAMPLE:
    case EM_OP_LOGPROBS:
    case EM_OP_WIRE_PACK:
    case EM_OP_WIRE_UNPACK: return dtype == EM_F32;
    default: return 0;
  }
}

void info(void* p, em_backend_info* out) {
  out->name = "cpu";
  out->isa = em_cpu_isa_name(ctx_of(p)->isa);
  out->num_threads = ctx_of(p)->pool.num_threads();
  out->batch_invariant = ctx_of(p)->invariant ? 1 : 0;
}

void destroy(void* p) { delete ctx_of(p); }

int reads_pages(void*, const em_kv_pages*) { return 1; }  // host memory: every pool

constexpr em_backend_iface kCpuIface = backend_iface<Context>("cpu", destroy, info, supports_op, reads_pages);

// ISA for EM_ISA_AUTO: $EM_CPU_ISA if it names one this CPU supports, else the best one with
// fp32 products. avx512bf16 and amx round x to bf16 in bf16 GEMMs (faster prefill, ~1e-3
// relative error, other greedy tokens than the fp32 goldens now and then), so they are opt-in:
// every machine then computes the same numbers up to summation order.
em_cpu_isa auto_isa() {
  if (const char* env = std::getenv("EM_CPU_ISA")) {
    const int parsed = em_cpu_isa_parse(env);
    if (parsed > EM_ISA_AUTO && isa_supported(static_cast<em_cpu_isa>(parsed))) return static_cast<em_cpu_isa>(parsed);
  }
  const em_cpu_isa best = em_cpu_best_isa();
  return best >= EM_ISA_AVX512_BF16 ? EM_ISA_AVX512 : best;
}

}  // namespace
}  // namespace em::cpu

extern "C" em_status em_backend_create_cpu(const em_cpu_config* cfg, em_backend** out) {
  using namespace em::cpu;
  if (out == nullptr) return em::fail(EM_ERR_ARG, "em_backend_create_cpu: out is NULL");
  *out = nullptr;
  em_cpu_isa isa = cfg ? cfg->isa : EM_ISA_AUTO;
  if (isa == EM_ISA_AUTO) isa = auto_isa();
  if (isa < EM_ISA_SCALAR || isa > EM_ISA_AMX) return em::fail(EM_ERR_ARG, "unknown ISA %d", static_cast<int>(isa));
  if (isa == EM_ISA_AMX && em_cpu_best_isa() == EM_ISA_AMX && !isa_supported(isa))
    return em::fail(EM_ERR_UNSUPPORTED,
                    "this CPU has AMX but the OS refused this process the tile state (arch_prctl "
                    "ARCH_REQ_XCOMP_PERM); use 'avx512bf16'");
  if (!isa_supported(isa))
    return em::fail(EM_ERR_UNSUPPORTED, "this CPU does not support ISA '%s' (best: '%s')", em_cpu_isa_name(isa),
                    em_cpu_isa_name(em_cpu_best_isa()));
  const int threads = cfg && cfg->num_threads > 0 ? cfg->num_threads : default_num_threads();
  const bool invariant = cfg != nullptr && cfg->batch_invariant != 0;
  try {
    auto ctx = std::make_unique<Context>(isa, threads, invariant);
    *out = new em_backend{&kCpuIface, ctx.get()};
    ctx.release();
  } catch (const std::exception& e) {
    return em::fail(EM_ERR_NOMEM, "em_backend_create_cpu: %s", e.what());
  }
  return EM_OK;
}
