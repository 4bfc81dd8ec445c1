// Backend selection by device string ("cpu", "cuda", "cuda:N"): the one place that knows
// every backend, so the addon and tools select one without knowing how each is built.
#include <cstdlib>
#include <cstring>

#include "expertmesh/cuda.h"
#include "expertmesh/ops.h"
#include "internal.h"

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
  return em::fail(EM_ERR_ARG, "unknown device '%s' (expected cpu, cuda or cuda:N)", device);
}
