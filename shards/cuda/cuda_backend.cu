// The CUDA backend: its op table (em_backend_iface), constructor, memory entry points, and
// the per-op staging of host tensors (see expertmesh/cuda.h for the memory contract).
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "../cuda_ops.h"
#include "common.cuh"

namespace em::cuda {

void throw_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  // A failed call (cudaMalloc's out of memory, say) is also the thread's last error: left
  // there, the next op's launch check would report it again, failing the op that a caller's
  // fallback (weights staged per op instead of resident) was meant to run. Sticky errors
  // stay in the context whatever this clears.
  (void)cudaGetLastError();
  const em_status s = e == cudaErrorMemoryAllocation ? EM_ERR_NOMEM : EM_ERR_INTERNAL;
  throw Error(s, std::string("cuda: ") + cudaGetErrorString(e) + " (" + expr + " at " + file + ":" +
                     std::to_string(line) + ")");
}

void throw_cublas(cublasStatus_t s, const char* expr, const char* file, int line) {
  const em_status st = s == CUBLAS_STATUS_ALLOC_FAILED ? EM_ERR_NOMEM
                       : s == CUBLAS_STATUS_NOT_SUPPORTED ? EM_ERR_UNSUPPORTED
                                                          : EM_ERR_INTERNAL;
  throw Error(st, std::string("cublas: ") + cublasGetStatusString(s) + " (" + expr + " at " + file + ":" +
                      std::to_string(line) + ")");
}

// --------------------------------------------------------------------- staging

Op::Op(Context& c) : ctx(c) { EMC_CUDA(cudaSetDevice(ctx.device)); }

Op::~Op() {
  for (void* p : scratch_) cudaFreeAsync(p, ctx.stream);
  // On the error path finish() never ran: wait so that no copy still reads freed scratch.
  cudaStreamSynchronize(ctx.stream);
}

void* Op::alloc(size_t bytes) {
  void* p = nullptr;
  EMC_CUDA(cudaMallocAsync(&p, bytes > 0 ? bytes : 1, ctx.stream));
  scratch_.push_back(p);
  return p;
}

// This device's memory (or pinned/managed memory it can reach) is used in place; pageable
// host memory and another GPU's memory (peer access is not assumed) are copied into scratch.
const void* Op::stage(const void* p, size_t bytes) {
  if (p == nullptr || bytes == 0) return p;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // clear: older drivers report host pointers as errors
    attr.type = cudaMemoryTypeUnregistered;
  }
  if ((attr.type == cudaMemoryTypeDevice && attr.device == ctx.device) || attr.type == cudaMemoryTypeManaged) return p;
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr) return attr.devicePointer;
  void* d = alloc(bytes);
  EMC_CUDA(cudaMemcpyAsync(d, p, bytes, cudaMemcpyDefault, ctx.stream));
  return d;
}

size_t span_bytes(const em_tensor& t) {
  int64_t last = 0;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return 0;
    last += (t.shape[i] - 1) * t.stride[i];
  }
  return static_cast<size_t>(last + 1) * em_dtype_size(t.dtype);
}

em_tensor Op::in(const em_tensor& t) {
  em_tensor d = t;
  d.data = const_cast<void*>(stage(t.data, span_bytes(t)));
  if (t.dtype == EM_F8_E4M3 && t.scale != nullptr && t.ndim >= 1) {
    const int64_t rows = t.ndim == 2 ? t.shape[0] : 1, cols = t.shape[t.ndim - 1];
    const int64_t n = ((rows + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK - 1) * t.scale_stride + (cols + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK;
    d.scale = static_cast<const float*>(stage(t.scale, rows > 0 && cols > 0 ? sizeof(float) * static_cast<size_t>(n) : 0));
  }
  return d;
}

em_tensor Op::out(const em_tensor& t) {
  em_tensor d = in(t);
  if (d.data != t.data) copy_back_.push_back({t.data, d.data, span_bytes(t)});
  return d;
}

void Op::finish() {
  for (const CopyBack& c : copy_back_)
    EMC_CUDA(cudaMemcpyAsync(c.host, c.dev, c.bytes, cudaMemcpyDefault, ctx.stream));
  EMC_CUDA(cudaStreamSynchronize(ctx.stream));
  EMC_CUDA(cudaGetLastError());
}

cudaDataType_t cuda_type(em_dtype d) {
  switch (d) {
    case EM_BF16: return CUDA_R_16BF;
    case EM_F16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

// Ops this backend does not implement (supports_op says 0 for them): the op table needs a
// function per op, found next to the others in em::cuda.
em_status sample(Context&, const em_sample_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'cuda' does not implement sample yet");
}
em_status logprobs(Context&, const em_logprobs_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'cuda' does not implement logprobs yet");
}
em_status wire_pack(Context&, const em_wire_pack_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'cuda' does not implement wire_pack yet");
}
em_status wire_unpack(Context&, const em_wire_unpack_args*) {
  return fail(EM_ERR_UNSUPPORTED, "backend 'cuda' does not implement wire_unpack yet");
}

namespace {

Context* ctx_of(void* p) { return static_cast<Context*>(p); }

// The table lives in cuda_ops.h, shared with the sim device (which falls back where this does).
int supports_op(void*, em_op op, em_dtype dtype) { return cuda_supports_op(op, dtype); }

void info(void* p, em_backend_info* out) {
  out->name = "cuda";
  out->isa = ctx_of(p)->arch.c_str();
  out->num_threads = ctx_of(p)->sm_count;
}

void destroy(void* p) {
  Context* c = ctx_of(p);
  cudaSetDevice(c->device);
  fp8_lt_destroy(*c);
  lanes_destroy(*c);
  if (c->pinned) cudaFreeHost(c->pinned);
  if (c->blas) cublasDestroy(c->blas);
  if (c->stream) cudaStreamDestroy(c->stream);
  delete c;
}


// Pages whose pool lies in this device's memory (the addon's mirror of a KV pool) are read
// here (attention.cu gathers their rows on the device); the dispatcher gathers any other
// pool on the host and passes contiguous caches.
int reads_pages(void* p, const em_kv_pages* pages) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, pages->pool) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return attr.type == cudaMemoryTypeDevice && attr.device == ctx_of(p)->device ? 1 : 0;
}

constexpr em_backend_iface kCudaIface = backend_iface<Context>("cuda", destroy, info, supports_op, reads_pages);

thread_local std::string tls_status;

Context* cuda_ctx(em_backend* b) {
  if (b == nullptr || b->iface != &kCudaIface) return nullptr;
  return ctx_of(b->ctx);
}

em_cuda_moe_gemm moe_gemm_from_env() {
  const char* env = std::getenv("EM_CUDA_MOE_GEMM");
  if (env != nullptr && std::strcmp(env, "grouped") == 0) return EM_CUDA_MOE_GROUPED;
  if (env != nullptr && std::strcmp(env, "loop") == 0) return EM_CUDA_MOE_LOOP;
  if (env != nullptr && std::strcmp(env, "cutlass") == 0) return EM_CUDA_MOE_CUTLASS;
  return EM_CUDA_MOE_AUTO;  // chosen per call by rows per expert (moe.cu)
}

int moe_streams_from_env() {
  const char* env = std::getenv("EM_CUDA_MOE_STREAMS");
  return env != nullptr && *env != '\0' ? std::atoi(env) : EM_CUDA_MOE_STREAMS_DEFAULT;
}

bool moe_fuse_from_env() {
  const char* env = std::getenv("EM_CUDA_MOE_FUSE");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

em_cuda_fp8_gemm fp8_gemm_from_env() {
  const char* env = std::getenv("EM_CUDA_FP8_GEMM");
  return env != nullptr && std::strcmp(env, "lt") == 0 ? EM_CUDA_FP8_LT : EM_CUDA_FP8_DEFAULT;
}

}  // namespace

void set_last_status(const std::string& s) { tls_status = s; }
std::string last_status() { return tls_status; }

void lanes_create(Context& ctx, int n) {
  if (n <= 1) return;
  EMC_CUDA(cudaEventCreateWithFlags(&ctx.lane_fork, cudaEventDisableTiming));
  for (int i = 1; i < n; ++i) {
    cudaStream_t s = nullptr;
    EMC_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    ctx.lanes.push_back(s);
    cublasHandle_t h = nullptr;
    EMC_CUBLAS(cublasCreate(&h));
    ctx.lane_blas.push_back(h);
    EMC_CUBLAS(cublasSetStream(h, s));
    cudaEvent_t ev = nullptr;
    EMC_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    ctx.lane_done.push_back(ev);
  }
}

void lanes_destroy(Context& ctx) {
  for (cublasHandle_t h : ctx.lane_blas) cublasDestroy(h);
  for (cudaStream_t s : ctx.lanes) cudaStreamDestroy(s);
  for (cudaEvent_t e : ctx.lane_done) cudaEventDestroy(e);
  if (ctx.lane_fork) cudaEventDestroy(ctx.lane_fork);
  ctx.lane_blas.clear();
  ctx.lanes.clear();
  ctx.lane_done.clear();
  ctx.lane_fork = nullptr;
}

}  // namespace em::cuda

using namespace em::cuda;
using em::guarded;

extern "C" int em_cuda_compiled(void) { return 1; }

extern "C" int em_cuda_device_count(void) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    tls_status = std::string("no usable CUDA device: ") + cudaGetErrorString(e);
    return 0;
  }
  tls_status = n > 0 ? std::to_string(n) + " CUDA device(s)" : "no CUDA device";
  return n;
}

extern "C" const char* em_cuda_last_status(void) { return tls_status.c_str(); }

extern "C" em_status em_backend_create_cuda(const em_cuda_config* cfg, em_backend** out) {
  if (out == nullptr) return em::fail(EM_ERR_ARG, "em_backend_create_cuda: out is NULL");
  *out = nullptr;
  const int device = cfg ? cfg->device : 0;
  const int count = em_cuda_device_count();
  if (count == 0) return em::fail(EM_ERR_UNSUPPORTED, "em_backend_create_cuda: %s", em_cuda_last_status());
  if (device < 0 || device >= count)
    return em::fail(EM_ERR_ARG, "em_backend_create_cuda: device %d not in [0, %d)", device, count);
  auto ctx = std::make_unique<Context>();
  ctx->device = device;
  ctx->moe_gemm = cfg && cfg->moe_gemm != EM_CUDA_MOE_AUTO ? cfg->moe_gemm : moe_gemm_from_env();
  ctx->fp8_gemm = cfg && cfg->fp8_gemm != EM_CUDA_FP8_AUTO ? cfg->fp8_gemm : fp8_gemm_from_env();
  if (ctx->fp8_gemm != EM_CUDA_FP8_DEFAULT && ctx->fp8_gemm != EM_CUDA_FP8_LT)
    return em::fail(EM_ERR_ARG, "em_backend_create_cuda: unknown fp8_gemm mode %d", static_cast<int>(ctx->fp8_gemm));
  ctx->moe_fuse = cfg && cfg->moe_fuse_gate_up != 0 ? cfg->moe_fuse_gate_up > 0 : moe_fuse_from_env();
  const int streams = cfg && cfg->moe_streams != 0 ? cfg->moe_streams : moe_streams_from_env();
  if (streams < 1 || streams > 32)
    return em::fail(EM_ERR_ARG, "em_backend_create_cuda: moe_streams %d not in [1, 32]", streams);
  try {
    EMC_CUDA(cudaSetDevice(device));
    cudaDeviceProp prop{};
    EMC_CUDA(cudaGetDeviceProperties(&prop, device));
    ctx->sm_count = prop.multiProcessorCount;
    ctx->arch = "sm_" + std::to_string(prop.major) + std::to_string(prop.minor);
    ctx->cc_major = prop.major;
    ctx->cc_minor = prop.minor;
    EMC_CUDA(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
    EMC_CUBLAS(cublasCreate(&ctx->blas));
    EMC_CUBLAS(cublasSetStream(ctx->blas, ctx->stream));
    // Scratch comes from the stream-ordered pool: keep freed blocks cached between ops.
    cudaMemPool_t pool;
    EMC_CUDA(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t keep = UINT64_MAX;
    EMC_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    if (ctx->fp8_gemm == EM_CUDA_FP8_LT) fp8_lt_init(*ctx);
    lanes_create(*ctx, streams);
  } catch (const Error& e) {
    fp8_lt_destroy(*ctx);
    lanes_destroy(*ctx);
    if (ctx->blas) cublasDestroy(ctx->blas);
    if (ctx->stream) cudaStreamDestroy(ctx->stream);
    return em::fail(e.status, "em_backend_create_cuda: %s", e.what());
  }
  *out = new em_backend{&kCudaIface, ctx.release()};
  return EM_OK;
}

extern "C" em_status em_cuda_backend_malloc(em_backend* b, size_t bytes, void** out) {
  Context* c = cuda_ctx(b);
  if (c == nullptr || out == nullptr) return em::fail(EM_ERR_ARG, "em_cuda_malloc: not a CUDA backend, or out is NULL");
  *out = nullptr;
  return guarded("em_cuda_malloc", [&] {
    EMC_CUDA(cudaSetDevice(c->device));
    cudaError_t e = cudaMalloc(out, bytes > 0 ? bytes : 1);
    if (e == cudaErrorMemoryAllocation) {
      // The stream-ordered pool keeps freed scratch (release threshold: everything), which
      // cudaMalloc cannot use: give it back to the device and try once more.
      (void)cudaGetLastError();
      EMC_CUDA(cudaStreamSynchronize(c->stream));
      cudaMemPool_t pool;
      EMC_CUDA(cudaDeviceGetDefaultMemPool(&pool, c->device));
      EMC_CUDA(cudaMemPoolTrimTo(pool, 0));
      e = cudaMalloc(out, bytes > 0 ? bytes : 1);
    }
    EMC_CUDA(e);
    return EM_OK;
  });
}

extern "C" em_status em_cuda_backend_free(em_backend* b, void* ptr) {
  Context* c = cuda_ctx(b);
  if (c == nullptr) return em::fail(EM_ERR_ARG, "em_cuda_free: not a CUDA backend");
  return guarded("em_cuda_free", [&] {
    EMC_CUDA(cudaSetDevice(c->device));
    EMC_CUDA(cudaFree(ptr));
    return EM_OK;
  });
}

extern "C" em_status em_cuda_backend_copy(em_backend* b, void* dst, const void* src, size_t bytes) {
  Context* c = cuda_ctx(b);
  if (c == nullptr) return em::fail(EM_ERR_ARG, "em_cuda_copy: not a CUDA backend");
  return guarded("em_cuda_copy", [&] {
    EMC_CUDA(cudaSetDevice(c->device));
    EMC_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->stream));
    EMC_CUDA(cudaStreamSynchronize(c->stream));
    return EM_OK;
  });
}

namespace em::cuda {
namespace {

// Range i: bytes [src_at[i], src_at[i] + len) of the packed staging copy go to dst + dst_at[i].
__global__ void scatter_ranges_kernel(const uint8_t* packed, const size_t* src_at, const size_t* dst_at,
                                      const size_t* lengths, uint8_t* dst) {
  const size_t i = blockIdx.x, n = lengths[i];
  const uint8_t* s = packed + src_at[i];
  uint8_t* d = dst + dst_at[i];
  if (((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) | n) & 15) == 0) {
    for (size_t k = threadIdx.x; k < n / 16; k += blockDim.x)
      reinterpret_cast<uint4*>(d)[k] = reinterpret_cast<const uint4*>(s)[k];
  } else {
    for (size_t k = threadIdx.x; k < n; k += blockDim.x) d[k] = s[k];
  }
}

void copy_ranges(Context& c, void* dst, const void* src, const size_t* offsets, const size_t* lengths, size_t n) {
  if (n <= 2) {  // not worth a kernel
    for (size_t i = 0; i < n; ++i)
      if (lengths[i] > 0)
        EMC_CUDA(cudaMemcpyAsync(static_cast<char*>(dst) + offsets[i], static_cast<const char*>(src) + offsets[i],
                                 lengths[i], cudaMemcpyHostToDevice, c.stream));
    EMC_CUDA(cudaStreamSynchronize(c.stream));
    return;
  }
  if (n > 0x7fffffffu) throw Error(EM_ERR_ARG, "em_cuda_copy_ranges: too many ranges");
  // Packed bytes (each range from a 16-byte boundary), then the three index arrays.
  std::vector<size_t> src_at(n);
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    src_at[i] = total;
    total += (lengths[i] + 15) & ~size_t{15};
  }
  const size_t index_bytes = 3 * n * sizeof(size_t), need = total + index_bytes;
  if (c.pinned_bytes < need) {
    if (c.pinned) EMC_CUDA(cudaFreeHost(c.pinned));
    c.pinned = nullptr;
    c.pinned_bytes = 0;
    EMC_CUDA(cudaMallocHost(&c.pinned, need));
    c.pinned_bytes = need;
  }
  uint8_t* staged = static_cast<uint8_t*>(c.pinned);
  for (size_t i = 0; i < n; ++i) std::memcpy(staged + src_at[i], static_cast<const uint8_t*>(src) + offsets[i], lengths[i]);
  size_t* idx = reinterpret_cast<size_t*>(staged + total);
  std::memcpy(idx, src_at.data(), n * sizeof(size_t));
  std::memcpy(idx + n, offsets, n * sizeof(size_t));
  std::memcpy(idx + 2 * n, lengths, n * sizeof(size_t));
  Op op(c);
  uint8_t* d = static_cast<uint8_t*>(op.alloc(need));
  EMC_CUDA(cudaMemcpyAsync(d, staged, need, cudaMemcpyHostToDevice, c.stream));
  const size_t* di = reinterpret_cast<const size_t*>(d + total);
  scatter_ranges_kernel<<<static_cast<unsigned>(n), 256, 0, c.stream>>>(d, di, di + n, di + 2 * n,
                                                                          static_cast<uint8_t*>(dst));
  EMC_LAUNCHED();
  op.finish();
}

}  // namespace
}  // namespace em::cuda

extern "C" em_status em_cuda_backend_copy_ranges(em_backend* b, void* dst, const void* src, const size_t* offsets,
                                         const size_t* lengths, size_t n) {
  Context* c = cuda_ctx(b);
  if (c == nullptr) return em::fail(EM_ERR_ARG, "em_cuda_copy_ranges: not a CUDA backend");
  if (n > 0 && (dst == nullptr || src == nullptr || offsets == nullptr || lengths == nullptr))
    return em::fail(EM_ERR_ARG, "em_cuda_copy_ranges: dst, src, offsets and lengths must be set");
  return guarded("em_cuda_copy_ranges", [&] {
    EMC_CUDA(cudaSetDevice(c->device));
    copy_ranges(*c, dst, src, offsets, lengths, n);
    return EM_OK;
  });
}

extern "C" em_status em_cuda_backend_synchronize(em_backend* b) {
  Context* c = cuda_ctx(b);
  if (c == nullptr) return em::fail(EM_ERR_ARG, "em_cuda_synchronize: not a CUDA backend");
  return guarded("em_cuda_synchronize", [&] {
    EMC_CUDA(cudaSetDevice(c->device));
    EMC_CUDA(cudaStreamSynchronize(c->stream));
    return EM_OK;
  });
}
