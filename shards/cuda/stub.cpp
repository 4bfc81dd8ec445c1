// The CUDA entry points of a build without CUDA (EM_CUDA=OFF): they exist so callers need
// no #ifdef, and say how to get the real ones.
#include "expertmesh/cuda.h"
#include "../internal.h"

extern "C" int em_cuda_compiled(void) { return 0; }
extern "C" int em_cuda_device_count(void) { return 0; }
extern "C" const char* em_cuda_last_status(void) {
  return "built without CUDA (configure shards/ with -DEM_CUDA=ON; scripts/cuda-toolkit.sh provides a toolkit)";
}

extern "C" em_status em_backend_create_cuda(const em_cuda_config*, em_backend** out) {
  if (out != nullptr) *out = nullptr;
  return em::fail(EM_ERR_UNSUPPORTED, "%s", em_cuda_last_status());
}

extern "C" em_status em_cuda_backend_malloc(em_backend*, size_t, void** out) {
  if (out != nullptr) *out = nullptr;
  return em::fail(EM_ERR_UNSUPPORTED, "%s", em_cuda_last_status());
}
extern "C" em_status em_cuda_backend_free(em_backend*, void*) { return em::fail(EM_ERR_UNSUPPORTED, "%s", em_cuda_last_status()); }
extern "C" em_status em_cuda_backend_copy(em_backend*, void*, const void*, size_t) {
  return em::fail(EM_ERR_UNSUPPORTED, "%s", em_cuda_last_status());
}
extern "C" em_status em_cuda_backend_copy_ranges(em_backend*, void*, const void*, const size_t*, const size_t*, size_t) {
  return em::fail(EM_ERR_UNSUPPORTED, "%s", em_cuda_last_status());
}
extern "C" em_status em_cuda_backend_synchronize(em_backend*) { return em::fail(EM_ERR_UNSUPPORTED, "%s", em_cuda_last_status()); }
