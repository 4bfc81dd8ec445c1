// Internal helpers shared by the dispatcher and the backends (not part of the C API).
#pragma once

#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "expertmesh/ops.h"

namespace em {

// Records a printf-style detail for em_last_error() on this thread; returns `status`.
em_status fail(em_status status, const char* fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// An error a backend throws inside an op with the status it should return.
struct StatusError : std::runtime_error {
  em_status status;
  StatusError(em_status s, const std::string& what) : std::runtime_error(what), status(s) {}
};

// Runs an op, turning C++ exceptions into status codes: nothing may unwind through the C
// interface.
template <typename Fn>
em_status guarded(const char* op, Fn&& fn) {
  try {
    return fn();
  } catch (const StatusError& e) {
    return fail(e.status, "%s: %s", op, e.what());
  } catch (const std::bad_alloc&) {
    return fail(EM_ERR_NOMEM, "%s: out of host memory", op);
  } catch (const std::exception& e) {
    return fail(EM_ERR_INTERNAL, "%s: %s", op, e.what());
  } catch (...) {
    return fail(EM_ERR_INTERNAL, "%s: unknown exception", op);
  }
}

// The op table of a backend whose context is a Ctx and whose ops are functions
// `em_status op(Ctx&, ...)` in Ctx's namespace (found by argument-dependent lookup), each
// run through guarded(). One table for every backend: an op added to the interface is
// added here once, and a backend that lacks it fails to compile.
template <typename Ctx>
constexpr em_backend_iface backend_iface(const char* name, void (*destroy)(void*),
                                         void (*info)(void*, em_backend_info*),
                                         int (*supports_op)(void*, em_op, em_dtype),
                                         int (*reads_pages)(void*, const em_kv_pages*) = nullptr) {
  return {
      name,
      destroy,
      info,
      supports_op,
      [](void* p, const em_tensor* x, const em_tensor* w, em_tensor* y) {
        return guarded("matmul", [&] { return matmul(*static_cast<Ctx*>(p), x, w, y); });
      },
      [](void* p, const em_tensor* x, const em_tensor* w, float eps, em_tensor* y) {
        return guarded("rmsnorm", [&] { return rmsnorm(*static_cast<Ctx*>(p), x, w, eps, y); });
      },
      [](void* p, const em_tensor* g, const em_tensor* u, em_tensor* y) {
        return guarded("silu_mul", [&] { return silu_mul(*static_cast<Ctx*>(p), g, u, y); });
      },
      [](void* p, const em_moe_args* a) {
        return guarded("moe_ffn", [&] { return moe_ffn(*static_cast<Ctx*>(p), a); });
      },
      [](void* p, em_tensor* x, const int32_t* pos, const em_rope_config* cfg) {
        return guarded("rope", [&] { return rope(*static_cast<Ctx*>(p), x, pos, cfg); });
      },
      [](void* p, const em_mla_args* a) {
        return guarded("mla_attention", [&] { return mla_attention(*static_cast<Ctx*>(p), a); });
      },
      [](void* p, const em_tensor* x, const em_tensor* w, const em_tensor* bias, const em_gate_config* cfg,
         em_tensor* idx, em_tensor* wt) {
        return guarded("gate", [&] { return gate(*static_cast<Ctx*>(p), x, w, bias, cfg, idx, wt); });
      },
      [](void* p, const em_tensor* src, em_tensor* dst) {
        return guarded("convert", [&] { return convert(*static_cast<Ctx*>(p), src, dst); });
      },
      [](void* p, const em_sample_args* a) {
        return guarded("sample", [&] { return sample(*static_cast<Ctx*>(p), a); });
      },
      [](void* p, const em_wire_pack_args* a) {
        return guarded("wire_pack", [&] { return wire_pack(*static_cast<Ctx*>(p), a); });
      },
      [](void* p, const em_wire_unpack_args* a) {
        return guarded("wire_unpack", [&] { return wire_unpack(*static_cast<Ctx*>(p), a); });
      },
      [](void* p, const em_logprobs_args* a) {
        return guarded("logprobs", [&] { return logprobs(*static_cast<Ctx*>(p), a); });
      },
      reads_pages,
  };
}

}  // namespace em

// The CUDA backend's device memory (cuda/cuda_backend.cu; cuda/stub.cpp without CUDA).
// The public em_cuda_malloc & co. (device.cpp) call these, or the sim device's for a sim
// backend (sim/sim.h).
extern "C" {
em_status em_cuda_backend_malloc(em_backend* b, size_t bytes, void** out);
em_status em_cuda_backend_free(em_backend* b, void* ptr);
em_status em_cuda_backend_copy(em_backend* b, void* dst, const void* src, size_t bytes);
em_status em_cuda_backend_copy_ranges(em_backend* b, void* dst, const void* src, const size_t* offsets,
                                      const size_t* lengths, size_t n);
em_status em_cuda_backend_synchronize(em_backend* b);
}
