// The "sim" device: a stand-in for a GPU where there is none (CI, a laptop), so that what the
// addon does for a device — weights kept resident, KV pools mirrored, ops split between the
// device and the CPU — runs and is tested without one. It is no model of a GPU's speed.
//
// - Its ops are the CPU backend's, on an inner CPU backend of its own; it claims the ops the
//   CUDA backend claims (supports_op), so the same ones fall back to the CPU.
// - Its "device memory" (em_cuda_malloc on it) is host memory the backend tracks: filled with
//   0xFF bytes when allocated (NaN in f32, bf16 and e4m3), so a read of bytes never copied
//   there shows in the results; copies into or out of it are checked against the bounds of
//   their allocation, and a free of memory it did not give fails. A capacity ("sim:BYTES")
//   makes it run out as a full GPU does. The index arrays the CUDA backend reads on the host
//   are refused in it.
// - reads_pages answers as the CUDA backend's: 1 for a pool in its memory (the addon's
//   mirror), else the dispatcher gathers the rows on the host.
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "../cuda_ops.h"
#include "../internal.h"
#include "expertmesh/sim.h"
#include "sim.h"

namespace em::sim {

struct Context {
  em_backend* cpu = nullptr;
  size_t capacity = 0;  // 0: no limit
  std::mutex mu;
  std::map<uintptr_t, size_t> allocations;  // start -> bytes
  em_sim_stats stats{};
  std::string isa;
};

namespace {

Context* ctx_of(void* p) { return static_cast<Context*>(p); }
const em_backend_iface& inner(Context& c) { return *c.cpu->iface; }

// The allocation holding [p, p + bytes), or end() when p is in none; throws when p is in one
// and the range runs past its end.
std::map<uintptr_t, size_t>::const_iterator holding(const Context& c, const void* p, size_t bytes, const char* what) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p);
  auto it = c.allocations.upper_bound(at);
  if (it == c.allocations.begin()) return c.allocations.end();
  --it;
  if (at >= it->first + it->second) return c.allocations.end();
  if (bytes > it->first + it->second - at)
    throw StatusError(EM_ERR_ARG, std::string(what) + ": " + std::to_string(bytes) + " bytes at offset " +
                                      std::to_string(at - it->first) + " run past the end of a " +
                                      std::to_string(it->second) + "-byte device allocation");
  return it;
}

bool in_device_memory(Context& c, const void* p) {
  std::lock_guard<std::mutex> lock(c.mu);
  return holding(c, p, 1, "a pointer") != c.allocations.end();
}

// The CUDA backend plans its launches from the small index arrays on the host (cuda.h, the
// memory contract): the sim refuses them in its memory, as a GPU's would fail.
void host_only(Context& c, const void* p, const char* what) {
  if (p != nullptr && in_device_memory(c, p))
    throw StatusError(EM_ERR_ARG, std::string(what) + " must be host memory (the CUDA backend reads it there)");
}
}  // namespace

// The ops: the inner CPU backend's (the dispatcher validated the arguments already).
em_status matmul(Context& c, const em_tensor* x, const em_tensor* w, em_tensor* y) {
  return inner(c).matmul(c.cpu->ctx, x, w, y);
}
em_status rmsnorm(Context& c, const em_tensor* x, const em_tensor* w, float eps, em_tensor* y) {
  return inner(c).rmsnorm(c.cpu->ctx, x, w, eps, y);
}
em_status silu_mul(Context& c, const em_tensor* g, const em_tensor* u, em_tensor* y) {
  return inner(c).silu_mul(c.cpu->ctx, g, u, y);
}
em_status moe_ffn(Context& c, const em_moe_args* a) {
  host_only(c, a->expert_offsets, "moe_ffn expert_offsets");
  host_only(c, a->x_index, "moe_ffn x_index");
  host_only(c, a->out_index, "moe_ffn out_index");
  host_only(c, a->row_weight, "moe_ffn row_weight");
  return inner(c).moe_ffn(c.cpu->ctx, a);
}
em_status rope(Context& c, em_tensor* x, const int32_t* pos, const em_rope_config* cfg) {
  return inner(c).rope(c.cpu->ctx, x, pos, cfg);
}
em_status mla_attention(Context& c, const em_mla_args* a) {
  host_only(c, a->positions, "mla_attention positions");
  host_only(c, a->q_offsets, "mla_attention q_offsets");
  if (a->pages != nullptr) {
    host_only(c, a->pages->block_table, "mla_attention pages.block_table");
    host_only(c, a->pages->table_offsets, "mla_attention pages.table_offsets");
  }
  return inner(c).mla_attention(c.cpu->ctx, a);
}
em_status gate(Context& c, const em_tensor* x, const em_tensor* w, const em_tensor* bias, const em_gate_config* cfg,
               em_tensor* idx, em_tensor* wt) {
  return inner(c).gate(c.cpu->ctx, x, w, bias, cfg, idx, wt);
}
em_status convert(Context& c, const em_tensor* src, em_tensor* dst) { return inner(c).convert(c.cpu->ctx, src, dst); }
// What the CUDA backend lacks, the sim lacks too (supports_op says 0; the table needs them).
em_status sample(Context&, const em_sample_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'sim' does not implement sample (as 'cuda')");
}
em_status logprobs(Context&, const em_logprobs_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'sim' does not implement logprobs (as 'cuda')");
}
em_status wire_pack(Context&, const em_wire_pack_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'sim' does not implement wire_pack (as 'cuda')");
}
em_status wire_unpack(Context&, const em_wire_unpack_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'sim' does not implement wire_unpack (as 'cuda')");
}

namespace {

// The CUDA backend's answers, so the same ops fall back.
int supports_op(void*, em_op op, em_dtype dtype) { return cuda_supports_op(op, dtype); }

int reads_pages(void* p, const em_kv_pages* pages) { return in_device_memory(*ctx_of(p), pages->pool) ? 1 : 0; }

void info(void* p, em_backend_info* out) {
  out->name = "sim";
  out->isa = ctx_of(p)->isa.c_str();
  em_backend_info ci;
  em_backend_get_info(ctx_of(p)->cpu, &ci);
  out->num_threads = ci.num_threads;
}

void destroy(void* p) {
  Context* c = ctx_of(p);
  {
    std::lock_guard<std::mutex> lock(c->mu);
    for (const auto& [at, bytes] : c->allocations) std::free(reinterpret_cast<void*>(at));
  }
  em_backend_free(c->cpu);
  delete c;
}

constexpr em_backend_iface kSimIface = backend_iface<Context>("sim", destroy, info, supports_op, reads_pages);

}  // namespace

Context* sim_ctx(em_backend* b) { return b != nullptr && b->iface == &kSimIface ? ctx_of(b->ctx) : nullptr; }

em_status create(size_t capacity, em_backend** out) {
  *out = nullptr;
  auto ctx = std::make_unique<Context>();
  ctx->capacity = capacity;
  const em_cpu_config cfg{EM_ISA_AUTO, 0, 0};
  if (const em_status s = em_backend_create_cpu(&cfg, &ctx->cpu); s != EM_OK) return s;
  em_backend_info ci;
  em_backend_get_info(ctx->cpu, &ci);
  ctx->isa = ci.isa;  // the kernels it runs
  *out = new em_backend{&kSimIface, ctx.release()};
  return EM_OK;
}

em_status alloc(Context& c, size_t bytes, void** out) {
  *out = nullptr;
  std::lock_guard<std::mutex> lock(c.mu);
  const size_t n = bytes > 0 ? bytes : 1;
  if (c.capacity > 0 && n > c.capacity - c.stats.bytes)
    return fail(EM_ERR_NOMEM, "em_cuda_malloc: the sim device's %zu bytes hold %zu already, no room for %zu more",
                c.capacity, c.stats.bytes, n);
  void* p = std::malloc(n);
  if (p == nullptr) return fail(EM_ERR_NOMEM, "em_cuda_malloc: out of host memory for %zu sim device bytes", n);
  std::memset(p, 0xFF, n);  // never-copied bytes read as NaN
  c.allocations.emplace(reinterpret_cast<uintptr_t>(p), n);
  c.stats.allocations += 1;
  c.stats.bytes += n;
  c.stats.allocated_total += 1;
  *out = p;
  return EM_OK;
}

em_status release(Context& c, void* ptr) {
  if (ptr == nullptr) return EM_OK;
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == c.allocations.end()) return fail(EM_ERR_ARG, "em_cuda_free: %p is no allocation of the sim device", ptr);
  c.stats.allocations -= 1;
  c.stats.bytes -= it->second;
  c.allocations.erase(it);
  std::free(ptr);
  return EM_OK;
}

em_status copy(Context& c, void* dst, const void* src, size_t bytes) {
  return guarded("em_cuda_copy", [&] {
    std::lock_guard<std::mutex> lock(c.mu);
    holding(c, dst, bytes, "em_cuda_copy destination");
    holding(c, src, bytes, "em_cuda_copy source");
    if (bytes > 0) std::memmove(dst, src, bytes);
    c.stats.copies += 1;
    c.stats.copied_bytes += bytes;
    return EM_OK;
  });
}

em_status copy_ranges(Context& c, void* dst, const void* src, const size_t* offsets, const size_t* lengths,
                      size_t n) {
  return guarded("em_cuda_copy_ranges", [&] {
    std::lock_guard<std::mutex> lock(c.mu);
    auto to = holding(c, dst, 1, "em_cuda_copy_ranges destination");
    if (to == c.allocations.end())
      throw StatusError(EM_ERR_ARG, "em_cuda_copy_ranges: the destination is no sim device memory");
    for (size_t i = 0; i < n; ++i) {
      holding(c, static_cast<char*>(dst) + offsets[i], lengths[i], "em_cuda_copy_ranges range");
      std::memcpy(static_cast<char*>(dst) + offsets[i], static_cast<const char*>(src) + offsets[i], lengths[i]);
      c.stats.copied_bytes += lengths[i];
    }
    c.stats.range_copies += 1;
    c.stats.ranges += n;
    return EM_OK;
  });
}

}  // namespace em::sim

extern "C" em_status em_sim_get_stats(em_backend* b, em_sim_stats* out) {
  em::sim::Context* c = em::sim::sim_ctx(b);
  if (c == nullptr || out == nullptr) return em::fail(EM_ERR_ARG, "em_sim_get_stats: not a sim backend, or out is NULL");
  std::lock_guard<std::mutex> lock(c->mu);
  *out = c->stats;
  return EM_OK;
}
