// Backend selection by device string ("cpu", "cuda", "cuda:N", "sim", "sim:BYTES"): the one
// place that knows every backend, so the addon and tools select one without knowing how each
// is built; and the device memory entry points, which route a sim backend's calls to sim/.
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "expertmesh/cuda.h"
#include "expertmesh/ops.h"
#include "internal.h"
#include "sim/sim.h"

extern "C" em_status em_backend_create_device(const char* device, em_backend** out) {
  if (out == nullptr) return em::fail(EM_ERR_ARG, "em_backend_create_device: out is NULL");
  *out = nullptr;
  if (device == nullptr || std::strcmp(device, "cpu") == 0) return em_backend_create_cpu(nullptr, out);
  if (std::strncmp(device, "cuda", 4) == 0) {
    em_cuda_config cfg{0, EM_CUDA_MOE_AUTO, EM_CUDA_FP8_AUTO, 0, 0};
    if (device[4] == ':') {
      char* end = nullptr;
      const long n = std::strtol(device + 5, &end, 10);
      if (end == device + 5 || *end != '\0' || n < 0 || n > 1023)
        return em::fail(EM_ERR_ARG, "device '%s': expected cuda:N with N a device number", device);
      cfg.device = static_cast<int32_t>(n);
    } else if (device[4] != '\0') {
      return em::fail(EM_ERR_ARG, "unknown device '%s' (expected cpu, cuda or cuda:N)", device);
    }
    return em_backend_create_cuda(&cfg, out);
  }
  if (std::strncmp(device, "sim", 3) == 0) {
    size_t capacity = 0;
    if (device[3] == ':') {
      char* end = nullptr;
      errno = 0;
      const unsigned long long n = std::strtoull(device + 4, &end, 10);
      if (end == device + 4 || *end != '\0' || errno != 0 || n == 0 || device[4] == '-')
        return em::fail(EM_ERR_ARG, "device '%s': expected sim:BYTES with BYTES a positive number", device);
      capacity = static_cast<size_t>(n);
    } else if (device[3] != '\0') {
      return em::fail(EM_ERR_ARG, "unknown device '%s' (expected cpu, cuda or cuda:N)", device);
    }
    return em::sim::create(capacity, out);
  }
  return em::fail(EM_ERR_ARG, "unknown device '%s' (expected cpu, cuda or cuda:N)", device);
}

extern "C" em_status em_cuda_malloc(em_backend* b, size_t bytes, void** out) {
  if (em::sim::Context* c = em::sim::sim_ctx(b)) {
    if (out == nullptr) return em::fail(EM_ERR_ARG, "em_cuda_malloc: out is NULL");
    return em::sim::alloc(*c, bytes, out);
  }
  return em_cuda_backend_malloc(b, bytes, out);
}

extern "C" em_status em_cuda_free(em_backend* b, void* ptr) {
  if (em::sim::Context* c = em::sim::sim_ctx(b)) return em::sim::release(*c, ptr);
  return em_cuda_backend_free(b, ptr);
}

extern "C" em_status em_cuda_copy(em_backend* b, void* dst, const void* src, size_t bytes) {
  if (em::sim::Context* c = em::sim::sim_ctx(b)) return em::sim::copy(*c, dst, src, bytes);
  return em_cuda_backend_copy(b, dst, src, bytes);
}

extern "C" em_status em_cuda_copy_ranges(em_backend* b, void* dst, const void* src, const size_t* offsets,
                                         const size_t* lengths, size_t n) {
  if (n > 0 && (dst == nullptr || src == nullptr || offsets == nullptr || lengths == nullptr))
    return em::fail(EM_ERR_ARG, "em_cuda_copy_ranges: dst, src, offsets and lengths must be set");
  if (em::sim::Context* c = em::sim::sim_ctx(b)) return em::sim::copy_ranges(*c, dst, src, offsets, lengths, n);
  return em_cuda_backend_copy_ranges(b, dst, src, offsets, lengths, n);
}

extern "C" em_status em_cuda_synchronize(em_backend* b) {
  if (em::sim::sim_ctx(b) != nullptr) return EM_OK;  // its ops are synchronous
  return em_cuda_backend_synchronize(b);
}
