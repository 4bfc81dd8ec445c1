// expertmesh.node: the Node-API bindings of the native engine (see expertmesh.d.ts).
//
// Every function takes TypedArrays (activations Float32Array; weights as Weight objects
// { dtype, shape, data, scale? } over any ArrayBufferView, so safetensors slices pass
// without copies) plus shape numbers, checks lengths, runs the op synchronously on the
// calling thread (the op itself fans out to the engine's thread pool), and returns
// Float32Arrays. Failures throw an Error whose `code` is EM_NATIVE_<WHAT>.
#include <napi.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "expertmesh/cuda.h"
#include "expertmesh/ops.h"
#include "expertmesh/sim.h"
#include "../cpu/cpu.h"
#include "../kv_dirty.h"
#include "../kv_pages.h"
#include "crash_report.h"

namespace {

// ------------------------------------------------------------------ errors

[[noreturn]] void throw_code(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  throw error;
}

const char* code_of(em_status s) {
  switch (s) {
    case EM_ERR_SHAPE: return "EM_NATIVE_SHAPE";
    case EM_ERR_DTYPE: return "EM_NATIVE_DTYPE";
    case EM_ERR_ARG: return "EM_NATIVE_ARG";
    case EM_ERR_UNSUPPORTED: return "EM_NATIVE_UNSUPPORTED";
    case EM_ERR_NOMEM: return "EM_NATIVE_NOMEM";
    default: return "EM_NATIVE_INTERNAL";
  }
}

void check(Napi::Env env, em_status s, const char* op) {
  if (s != EM_OK) throw_code(env, code_of(s), std::string(op) + ": " + em_last_error());
}

[[noreturn]] void arg_error(Napi::Env env, const std::string& message) { throw_code(env, "EM_NATIVE_ARG", message); }
[[noreturn]] void shape_error(Napi::Env env, const std::string& message) {
  throw_code(env, "EM_NATIVE_SHAPE", message);
}

// ------------------------------------------------------------------ backend state

// Per Node environment (main thread or worker), freed with it: the CPU backend, always, and
// the device backend of configure({ device }) when that is not "cpu". Each op runs on the
// device backend when em_supports_op() says it has the op for the weight dtype, else on
// the CPU backend (the CUDA backend has no sampler or wire codec, for instance). Both take
// host memory, so the same TypedArrays go to either.
//
// Resident weights (the default; EM_ADDON_RESIDENT=0 or configure({ resident: false }) turns
// it off): weights on a device stay there: the first op that reads a Weight object on the
// device backend copies its data (and fp8 scales) into device memory and ties that copy to
// the object (napi_wrap, freed when the object is collected); later ops read it in place.
// The engine keeps one Weight view per weight (src/engine/native.ts), so a model's weights
// are copied once; a device without room for more stages the rest per op. Activations,
// caches and indices are still copied per op. Checked on an H200 on 2026-12-04 (the GPU
// check's forward); before that the default staged every op's weights.
struct KvMirrors;

struct AddonState {
  em_backend* cpu = nullptr;
  em_backend* device = nullptr;
  // Owns `device`; device copies of weights hold it too, so it outlives them (and no new
  // backend can take its address while a copy made on it is alive).
  std::shared_ptr<em_backend> device_owner;
  bool resident = false;
  bool resident_full = false;  // the device ran out of room for resident weights: no more tries until configure()
  // Device mirrors of paged KV pools (see KvMirror; off with EM_ADDON_KV_MIRROR=0); shared with the
  // pools' finalizers, which may outlive this state.
  std::shared_ptr<KvMirrors> kv_mirrors;
  std::string device_name = "cpu";
  // Property names the argument parsers read on every call, as JS strings made once and kept
  // in an array (a reference cannot hold a string), by the address of their literal:
  // napi_get_named_property internalizes its C string on every call.
  Napi::Reference<Napi::Array> key_strings;
  std::unordered_map<const char*, uint32_t> key_index;
  ~AddonState() { em_backend_free(cpu); }
};

AddonState* state_of(Napi::Env env) { return env.GetInstanceData<AddonState>(); }

// o[key] for a key kept by its address (see AddonState::key_strings): only prop() below calls it.
Napi::Value prop_by_address(Napi::Env env, const Napi::Object& o, const char* key) {
  AddonState* st = state_of(env);
  if (st->key_strings.IsEmpty()) st->key_strings = Napi::Persistent(Napi::Array::New(env));
  const Napi::Array strings = st->key_strings.Value();
  auto it = st->key_index.find(key);
  if (it == st->key_index.end()) {
    const uint32_t i = static_cast<uint32_t>(st->key_index.size());
    strings.Set(i, Napi::String::New(env, key));
    it = st->key_index.emplace(key, i).first;
  }
  return o.Get(strings.Get(it->second));
}

// o[key] for a string literal: the key is an array reference, so a pointer into a temporary
// (a std::string's c_str(), which could come back at the same address with other text)
// does not compile. The helpers that pass a key on take it the same way.
template <size_t N>
Napi::Value prop(Napi::Env env, const Napi::Object& o, const char (&key)[N]) {
  return prop_by_address(env, o, key);
}

// Device memory of a backend, freed with its last holder.
struct DeviceBuffer {
  std::shared_ptr<em_backend> backend;
  void* ptr = nullptr;
  ~DeviceBuffer() {
    if (ptr) em_cuda_free(backend.get(), ptr);
  }
};

// Ranges noted before a mirror is dropped and made whole again (a pool written but not read
// on the device for a long time).
constexpr size_t kMirrorMaxDirty = size_t{1} << 16;

// The KV mirror (ADR 0010; the default since the H200 run of 2026-12-04, EM_ADDON_KV_MIRROR=0
// or configure({ kvMirror: false }) turns it off): a paged KV pool that
// mlaAttention reads on the device backend gets a device copy, made whole on that first
// read. kvEncode keeps writing the host pool (still the source of truth) and notes the byte
// ranges it wrote; the next device mlaAttention over the pool copies those ranges across in
// one packed transfer (em_cuda_copy_ranges) and passes the mirror as the pool, which the CUDA
// backend reads in place. Rows never written through kvEncode since the mirror was made are
// never read (a block is read only after its rows were written), so a pool needs no other
// invalidation. Keyed by the pool's host address; the pool object's finalizer drops its
// mirror, and configure() drops them all (another device).
struct KvMirror {
  std::shared_ptr<DeviceBuffer> buf;  // null: a pool the device had no room for (stays on the host)
  size_t bytes = 0;
  em::DirtyRanges dirty{kMirrorMaxDirty};  // written on the host since the last flush
  bool whole = false;                      // more ranges than dirty holds: copy it all at the next read
  uint64_t generation = 0;                 // which pool object at this address (its finalizer's)
};
struct KvMirrors {
  std::unordered_map<const void*, KvMirror> by_pool;
  uint64_t next_generation = 1;
};

// A Weight object's data (and fp8 scale) in device memory, wrapped into the object. An
// expert's gate and up weights share one buffer, up right after gate (see on_device_pair).
struct DeviceWeight {
  std::shared_ptr<em_backend> backend;  // the backend it was made on
  const void* host = nullptr;
  const float* host_scale = nullptr;
  size_t bytes = 0, scale_bytes = 0;
  std::shared_ptr<DeviceBuffer> data_buf, scale_buf;
  void* data = nullptr;   // in data_buf
  void* scale = nullptr;  // in scale_buf
};

void finalize_device_weight(napi_env, void* data, void*) { delete static_cast<DeviceWeight*>(data); }

em_backend* cpu_backend(Napi::Env env) {
  AddonState* st = state_of(env);
  if (st->cpu == nullptr) {
    em_cpu_config cfg{EM_ISA_AUTO, 0, 0};
    check(env, em_backend_create_cpu(&cfg, &st->cpu), "backend");
  }
  return st->cpu;
}

// The backend that runs `op` with weights of `dtype`.
em_backend* backend_for(Napi::Env env, em_op op, em_dtype dtype) {
  AddonState* st = state_of(env);
  if (st->device != nullptr && em_supports_op(st->device, op, dtype)) return st->device;
  return cpu_backend(env);
}

// ------------------------------------------------------------------ arguments

Napi::Value arg(const Napi::CallbackInfo& info, size_t i) {
  return i < info.Length() ? info[i] : info.Env().Undefined();
}

bool present(const Napi::Value& v) { return !v.IsUndefined() && !v.IsNull(); }

Napi::Object object_arg(Napi::Env env, const Napi::Value& v, const char* name) {
  if (!v.IsObject()) arg_error(env, std::string(name) + " must be an object");
  return v.As<Napi::Object>();
}

double number(Napi::Env env, const Napi::Value& v, const char* name) {
  if (!v.IsNumber()) arg_error(env, std::string(name) + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) arg_error(env, std::string(name) + " must be finite");
  return d;
}

int64_t integer(Napi::Env env, const Napi::Value& v, const char* name, int64_t min) {
  const double d = number(env, v, name);
  if (std::floor(d) != d || d < static_cast<double>(min) || d > 9007199254740991.0)
    arg_error(env, std::string(name) + " must be an integer >= " + std::to_string(min));
  return static_cast<int64_t>(d);
}

template <size_t N>
double number_or(Napi::Env env, const Napi::Object& o, const char (&key)[N], double fallback) {
  const Napi::Value v = prop(env, o, key);
  return present(v) ? number(env, v, key) : fallback;
}

template <size_t N>
int64_t integer_or(Napi::Env env, const Napi::Object& o, const char (&key)[N], int64_t fallback, int64_t min) {
  const Napi::Value v = prop(env, o, key);
  return present(v) ? integer(env, v, key, min) : fallback;
}

struct Bytes {
  void* data;
  size_t size;
};

// Any ArrayBufferView (TypedArray, Buffer, DataView).
Bytes bytes_of(Napi::Env env, const Napi::Value& v, const char* name) {
  if (v.IsTypedArray()) {
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    return {static_cast<uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset(), t.ByteLength()};
  }
  if (v.IsDataView()) {
    Napi::DataView d = v.As<Napi::DataView>();
    return {static_cast<uint8_t*>(d.ArrayBuffer().Data()) + d.ByteOffset(), d.ByteLength()};
  }
  arg_error(env, std::string(name) + " must be a TypedArray, Buffer or DataView");
}

template <typename T, napi_typedarray_type kType>
T* typed(Napi::Env env, const Napi::Value& v, const char* name, const char* type_name, int64_t expected) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != kType)
    arg_error(env, std::string(name) + " must be a " + type_name);
  Napi::TypedArray t = v.As<Napi::TypedArray>();
  if (expected >= 0 && static_cast<int64_t>(t.ElementLength()) != expected)
    shape_error(env, std::string(name) + " has " + std::to_string(t.ElementLength()) + " elements, expected " +
                         std::to_string(expected));
  return reinterpret_cast<T*>(static_cast<uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset());
}

float* f32(Napi::Env env, const Napi::Value& v, const char* name, int64_t expected = -1) {
  return typed<float, napi_float32_array>(env, v, name, "Float32Array", expected);
}

int32_t* i32(Napi::Env env, const Napi::Value& v, const char* name, int64_t expected = -1) {
  return typed<int32_t, napi_int32_array>(env, v, name, "Int32Array", expected);
}

// An Int32Array of row indices; never NULL, even when empty (NULL means "no index" to the engine).
const int32_t* index_arg(Napi::Env env, const Napi::Value& v, const char* name, int64_t expected = -1) {
  static const int32_t kEmpty = 0;
  const int32_t* p = i32(env, v, name, expected);
  return p != nullptr ? p : &kEmpty;
}

int64_t length_of(const Napi::Value& v) { return static_cast<int64_t>(v.As<Napi::TypedArray>().ElementLength()); }

// A Float32Array of n elements: the caller's `out` if given (length checked), else new.
Napi::Float32Array output(Napi::Env env, const Napi::Value& out, size_t n) {
  if (!present(out)) return Napi::Float32Array::New(env, n);
  f32(env, out, "out", static_cast<int64_t>(n));
  return out.As<Napi::Float32Array>();
}

float* data_of(Napi::Float32Array a) { return a.Data(); }

// Rows of a flat array whose row length is `cols`.
int64_t rows_of(Napi::Env env, int64_t length, int64_t cols, const char* name) {
  if (cols <= 0 || length % cols != 0)
    shape_error(env, std::string(name) + " length " + std::to_string(length) + " is not a multiple of " +
                         std::to_string(cols));
  return length / cols;
}

// `name` + `suffix` names the value in errors (built only then).
em_dtype parse_dtype(Napi::Env env, const Napi::Value& v, const char* name, const char* suffix = "") {
  if (!v.IsString()) arg_error(env, std::string(name) + suffix + " must be 'f32', 'bf16', 'f16' or 'fp8'");
  // Into a stack buffer: this runs for every weight of every call.
  char s[16];
  size_t len = 0;
  if (napi_get_value_string_latin1(env, v, s, sizeof s, &len) != napi_ok) len = sizeof s - 1;
  const std::string_view sv(s, len);
  if (sv == "f32") return EM_F32;
  if (sv == "bf16") return EM_BF16;
  if (sv == "f16") return EM_F16;
  if (sv == "fp8" || sv == "f8_e4m3") return EM_F8_E4M3;
  throw_code(env, "EM_NATIVE_DTYPE",
             std::string(name) + suffix + ": unknown dtype '" + v.As<Napi::String>().Utf8Value() + "'");
}

// A Weight object { dtype, shape: [rows, cols] | [n], data, scale? } as a tensor view. The
// names in errors ("w.shape[0]") are built only when one is thrown: this runs for every
// weight of every call.
em_tensor weight_arg(Napi::Env env, const Napi::Value& v, const char* name) {
  const Napi::Object o = object_arg(env, v, name);
  auto field = [&](const char* suffix) { return std::string(name) + suffix; };
  const em_dtype dtype = parse_dtype(env, prop(env, o, "dtype"), name, ".dtype");
  const Napi::Value shape_v = prop(env, o, "shape");
  if (!shape_v.IsArray()) arg_error(env, field(".shape must be [rows, cols] or [n]"));
  const Napi::Array shape = shape_v.As<Napi::Array>();
  const uint32_t ndim = shape.Length();
  if (ndim != 1 && ndim != 2) arg_error(env, field(".shape must be [rows, cols] or [n]"));
  auto dim = [&](uint32_t i, const char* suffix) {
    const Napi::Value d = shape.Get(i);
    if (d.IsNumber()) {
      const double x = d.As<Napi::Number>().DoubleValue();
      if (x >= 0 && x <= 9007199254740991.0 && std::floor(x) == x) return static_cast<int64_t>(x);
    }
    return integer(env, d, field(suffix).c_str(), 0);  // throws
  };
  const int64_t rows = ndim == 2 ? dim(0, ".shape[0]") : 1;
  const int64_t cols = dim(ndim - 1, ".shape[-1]");
  const Napi::Value data_v = prop(env, o, "data");
  const Bytes b = data_v.IsTypedArray() ? bytes_of(env, data_v, name) : bytes_of(env, data_v, field(".data").c_str());
  const size_t esize = em_dtype_size(dtype);
  if (b.size != static_cast<size_t>(rows * cols) * esize)
    shape_error(env, field(".data has ") + std::to_string(b.size) + " bytes, shape needs " +
                         std::to_string(static_cast<size_t>(rows * cols) * esize));
  if (reinterpret_cast<uintptr_t>(b.data) % esize != 0)
    arg_error(env, field(".data is not aligned to its ") + std::to_string(esize) + "-byte elements; copy it first");
  em_tensor t = ndim == 2 ? em_tensor_2d(b.data, dtype, rows, cols) : em_tensor_1d(b.data, dtype, cols);
  if (dtype == EM_F8_E4M3) {
    const int64_t blocks = ((rows + 127) / 128) * ((cols + 127) / 128);
    t.scale = f32(env, prop(env, o, "scale"), field(".scale").c_str(), blocks);
    t.scale_stride = (cols + 127) / 128;
  }
  return t;
}

// A 1-D f32 weight given as a Float32Array, or any Weight object.
em_tensor vector_weight_arg(Napi::Env env, const Napi::Value& v, const char* name) {
  if (v.IsTypedArray()) {
    float* d = f32(env, v, name);
    return em_tensor_1d(d, EM_F32, length_of(v));
  }
  em_tensor t = weight_arg(env, v, name);
  if (t.ndim == 2 && t.shape[0] == 1) t = em_tensor_1d(t.data, t.dtype, t.shape[1]);
  return t;
}

std::vector<em_tensor> weight_list(Napi::Env env, const Napi::Value& v, const char* name, size_t expected) {
  if (!v.IsArray()) arg_error(env, std::string(name) + " must be an array of weights");
  const Napi::Array a = v.As<Napi::Array>();
  if (a.Length() != expected)
    shape_error(env, std::string(name) + " has " + std::to_string(a.Length()) + " weights, expected " +
                         std::to_string(expected));
  std::vector<em_tensor> out;
  for (uint32_t i = 0; i < a.Length(); ++i)
    out.push_back(weight_arg(env, a.Get(i), (std::string(name) + "[" + std::to_string(i) + "]").c_str()));
  return out;
}

// Whether weights read by `be` are kept on its device.
bool keeps_weights(Napi::Env env, em_backend* be) {
  const AddonState* st = state_of(env);
  return be != nullptr && be == st->device && st->resident;
}

// Bytes of a weight view's data and of its fp8 scales as copied to the device.
size_t weight_bytes(const em_tensor& t) {
  const size_t n = static_cast<size_t>(t.ndim == 2 ? t.shape[0] * t.shape[1] : t.shape[0]);
  return n * em_dtype_size(t.dtype);
}
size_t scale_bytes_of(const em_tensor& t) {
  return t.dtype == EM_F8_E4M3 && t.ndim == 2 ? static_cast<size_t>((t.shape[0] + 127) / 128 * t.scale_stride) * 4 : 0;
}

// The device copy wrapped into `obj` when it was made on `be` for the data `t` views now;
// a stale one (another device, or the object views other data) is removed.
DeviceWeight* wrapped_copy(Napi::Env env, napi_value obj, em_backend* be, const em_tensor& t) {
  void* raw = nullptr;
  if (napi_unwrap(env, obj, &raw) != napi_ok) {  // not wrapped: leave no pending exception behind
    bool pending = false;
    napi_value ignored;
    if (napi_is_exception_pending(env, &pending) == napi_ok && pending) napi_get_and_clear_last_exception(env, &ignored);
    return nullptr;
  }
  auto* dw = static_cast<DeviceWeight*>(raw);
  if (dw->backend.get() == be && dw->host == t.data && dw->bytes == weight_bytes(t) && dw->host_scale == t.scale &&
      dw->scale_bytes == scale_bytes_of(t))
    return dw;
  napi_remove_wrap(env, obj, &raw);
  delete dw;
  return nullptr;
}

// A device buffer of `bytes` holding `parts` (host pointer, bytes) one after another.
// Null when the device has no room, or had none before: the weight is then staged per op,
// as with EM_ADDON_RESIDENT=0 (said once per configure()).
std::shared_ptr<DeviceBuffer> device_buffer(Napi::Env env, em_backend* be, size_t bytes,
                                            std::initializer_list<std::pair<const void*, size_t>> parts) {
  AddonState* st = state_of(env);
  // Full once: no more tries until the next configure(). A failed em_cuda_malloc trims the
  // ops' scratch pool to make room, so trying again for every op would cost each op a sync
  // and a trim, and a try that succeeded would take the scratch the next op needs.
  if (st->resident_full) return nullptr;
  auto buf = std::make_shared<DeviceBuffer>();
  buf->backend = st->device_owner;
  if (em_cuda_malloc(be, bytes, &buf->ptr) != EM_OK) {
    std::fprintf(stderr, "expertmesh addon: no device memory for more weights (%s): the rest are copied per op\n",
                 em_last_error());
    st->resident_full = true;
    return nullptr;
  }
  size_t at = 0;
  for (const auto& [host, n] : parts) {
    check(env, em_cuda_copy(be, static_cast<char*>(buf->ptr) + at, host, n), "weight to device");
    at += n;
  }
  return buf;
}

// A fresh device copy's record for `t`, its data at `data_off` of `data_buf` (and scale at
// `scale_off` of `scale_buf`).
std::unique_ptr<DeviceWeight> device_weight(Napi::Env env, const em_tensor& t, std::shared_ptr<DeviceBuffer> data_buf,
                                            size_t data_off, std::shared_ptr<DeviceBuffer> scale_buf, size_t scale_off) {
  auto dw = std::make_unique<DeviceWeight>();
  dw->backend = state_of(env)->device_owner;
  dw->host = t.data;
  dw->host_scale = t.scale;
  dw->bytes = weight_bytes(t);
  dw->scale_bytes = scale_bytes_of(t);
  dw->data = static_cast<char*>(data_buf->ptr) + data_off;
  dw->data_buf = std::move(data_buf);
  if (scale_buf) {
    dw->scale = static_cast<char*>(scale_buf->ptr) + scale_off;
    dw->scale_buf = std::move(scale_buf);
  }
  return dw;
}

// Ties `dw` to `obj` and returns `t` reading it; `t` as it is (staged per op) when the object
// is already wrapped by someone else.
em_tensor attach(Napi::Env env, napi_value obj, std::unique_ptr<DeviceWeight> dw, em_tensor t) {
  if (napi_wrap(env, obj, dw.get(), finalize_device_weight, nullptr, nullptr) != napi_ok) {
    napi_value ignored;
    napi_get_and_clear_last_exception(env, &ignored);
    return t;
  }
  DeviceWeight* kept = dw.release();
  t.data = kept->data;
  if (kept->scale != nullptr) t.scale = static_cast<const float*>(kept->scale);
  return t;
}

em_tensor reading(const DeviceWeight* dw, em_tensor t) {
  t.data = dw->data;
  if (dw->scale != nullptr) t.scale = static_cast<const float*>(dw->scale);
  return t;
}

// The tensor of Weight object `v` as backend `be` reads it: on the device backend, its data
// (and fp8 scale) in device memory, copied on first use and kept with the object (see
// AddonState); elsewhere, or when the object cannot hold the copy, `t` as it is (staged).
em_tensor on_device(Napi::Env env, em_backend* be, const Napi::Value& v, em_tensor t) {
  if (!keeps_weights(env, be) || !v.IsObject() || v.IsTypedArray()) return t;
  const size_t bytes = weight_bytes(t), scale_bytes = scale_bytes_of(t);
  if (bytes == 0) return t;
  if (const DeviceWeight* dw = wrapped_copy(env, v, be, t)) return reading(dw, t);
  auto data = device_buffer(env, be, bytes, {{t.data, bytes}});
  auto scale = scale_bytes > 0 ? device_buffer(env, be, scale_bytes, {{t.scale, scale_bytes}}) : nullptr;
  if (!data || (scale_bytes > 0 && !scale)) return t;
  return attach(env, v, device_weight(env, t, std::move(data), 0, std::move(scale), 0), t);
}

// An expert's gate (w1) and up (w3) weights on the device, up right after gate in one buffer
// (fp8 scales likewise) when both are copied now and have one contiguous shape: the CUDA
// moe_ffn then runs one GEMM of twice the width for both (cuda.h, moe_fuse_gate_up).
void on_device_pair(Napi::Env env, em_backend* be, const Napi::Value& v1, em_tensor& t1, const Napi::Value& v3,
                    em_tensor& t3) {
  if (!keeps_weights(env, be)) return;  // staged per op
  const bool objects = v1.IsObject() && !v1.IsTypedArray() && v3.IsObject() && !v3.IsTypedArray();
  const DeviceWeight* d1 = objects ? wrapped_copy(env, v1, be, t1) : nullptr;
  const DeviceWeight* d3 = objects ? wrapped_copy(env, v3, be, t3) : nullptr;
  const bool same_shape = t1.ndim == 2 && t3.ndim == 2 && t1.dtype == t3.dtype && t1.shape[0] == t3.shape[0] &&
                          t1.shape[1] == t3.shape[1] && t1.stride[0] == t1.shape[1] && t3.stride[0] == t3.shape[1] &&
                          t1.stride[1] == 1 && t3.stride[1] == 1 && weight_bytes(t1) > 0 &&
                          (t1.dtype != EM_F8_E4M3 || (t1.shape[0] % 128 == 0 && t1.scale != nullptr &&
                                                      t3.scale != nullptr && t1.scale_stride == t3.scale_stride));
  if (!objects || d1 != nullptr || d3 != nullptr || !same_shape ||
      v1.StrictEquals(v3)) {
    t1 = d1 ? reading(d1, t1) : on_device(env, be, v1, t1);
    t3 = d3 ? reading(d3, t3) : on_device(env, be, v3, t3);
    return;
  }
  const size_t bytes = weight_bytes(t1), sb = scale_bytes_of(t1);
  auto data = device_buffer(env, be, 2 * bytes, {{t1.data, bytes}, {t3.data, bytes}});
  auto scale = sb > 0 ? device_buffer(env, be, 2 * sb, {{t1.scale, sb}, {t3.scale, sb}}) : nullptr;
  if (!data || (sb > 0 && !scale)) return;  // staged per op
  t1 = attach(env, v1, device_weight(env, t1, data, 0, scale, 0), t1);
  t3 = attach(env, v3, device_weight(env, t3, data, bytes, scale, sb), t3);
}

// ------------------------------------------------------------------ info

const char* const kDtypeNames[] = {"f32", "bf16", "f16", "fp8"};
const em_dtype kDtypes[] = {EM_F32, EM_BF16, EM_F16, EM_F8_E4M3};
// The exported function that runs each em_op, indexed by em_op.
const char* const kOpFunctions[EM_OP_COUNT] = {"matmul", "rmsnorm", "siluMul", "moeFfn", "rope",
                                               "mlaAttention", "gate", "convert", "sample", "wirePack",
                                               "wireUnpack", "logprobs"};

// The dtypes `b` accepts for `op` and `except` (when given) does not.
Napi::Array op_dtypes(Napi::Env env, em_backend* b, em_op op, em_backend* except) {
  Napi::Array dts = Napi::Array::New(env);
  uint32_t k = 0;
  for (size_t d = 0; d < 4; ++d) {
    if (em_supports_op(b, op, kDtypes[d]) && (except == nullptr || !em_supports_op(except, op, kDtypes[d])))
      dts.Set(k++, kDtypeNames[d]);
  }
  return dts;
}

Napi::Value BackendInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState* st = state_of(env);
  em_backend* cpu = cpu_backend(env);
  em_backend* main = st->device != nullptr ? st->device : cpu;
  em_backend_info bi, ci;
  em_backend_get_info(main, &bi);
  em_backend_get_info(cpu, &ci);
  Napi::Object o = Napi::Object::New(env);
  o.Set("backend", bi.name);
  o.Set("device", st->device_name);
  o.Set("isa", bi.isa);
  o.Set("threads", bi.num_threads);
  o.Set("abiVersion", EM_ABI_VERSION);
  Napi::Array isas = Napi::Array::New(env);
  uint32_t n = 0;
  for (int i = EM_ISA_SCALAR; i <= em_cpu_best_isa(); ++i) isas.Set(n++, em_cpu_isa_name(static_cast<em_cpu_isa>(i)));
  o.Set("availableIsas", isas);
  Napi::Object cpu_info = Napi::Object::New(env);
  cpu_info.Set("isa", ci.isa);
  cpu_info.Set("threads", ci.num_threads);
  cpu_info.Set("batchInvariant", Napi::Boolean::New(env, ci.batch_invariant != 0));
  o.Set("cpu", cpu_info);
  o.Set("cudaCompiled", Napi::Boolean::New(env, em_cuda_compiled() != 0));
  // ops: what each function accepts (on the device or by falling back to the CPU);
  // fallback: the functions and dtypes the device lacks, which run on the CPU backend.
  Napi::Object ops = Napi::Object::New(env), fallback = Napi::Object::New(env);
  for (int op = 0; op < EM_OP_COUNT; ++op) {
    const em_op o_ = static_cast<em_op>(op);
    Napi::Array all = Napi::Array::New(env);
    uint32_t k = 0;
    for (size_t d = 0; d < 4; ++d) {
      if (em_supports_op(main, o_, kDtypes[d]) || em_supports_op(cpu, o_, kDtypes[d])) all.Set(k++, kDtypeNames[d]);
    }
    ops.Set(kOpFunctions[op], all);
    if (st->device != nullptr) {
      Napi::Array fb = op_dtypes(env, cpu, o_, st->device);
      if (fb.Length() > 0) fallback.Set(kOpFunctions[op], fb);
    }
  }
  o.Set("ops", ops);
  o.Set("fallback", fallback);
  return o;
}

// simStats() -> the sim device's counters (expertmesh/sim.h), or null on another device.
Napi::Value SimStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  em_sim_stats s{};
  if (em_sim_get_stats(state_of(env)->device, &s) != EM_OK) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("allocations", static_cast<double>(s.allocations));
  o.Set("bytes", static_cast<double>(s.bytes));
  o.Set("allocatedTotal", static_cast<double>(s.allocated_total));
  o.Set("copies", static_cast<double>(s.copies));
  o.Set("rangeCopies", static_cast<double>(s.range_copies));
  o.Set("ranges", static_cast<double>(s.ranges));
  o.Set("copiedBytes", static_cast<double>(s.copied_bytes));
  return o;
}

// scratchBytes(): what the CPU backend's per-thread scratch caches hold (ADR 0025);
// trimScratch(): frees it all, returns the bytes freed.
Napi::Value ScratchBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(em_scratch_cached_bytes()));
}
Napi::Value TrimScratch(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(em_scratch_trim()));
}

// cudaStatus() -> { compiled, devices, status }: asks the CUDA driver (initializes the CUDA
// runtime on a CUDA build, so backendInfo() leaves it out).
Napi::Value CudaStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int devices = em_cuda_device_count();
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", Napi::Boolean::New(env, em_cuda_compiled() != 0));
  o.Set("devices", devices);
  o.Set("status", em_cuda_last_status());
  return o;
}

// v as a boolean; `fallback` when it is absent.
bool optional_bool(Napi::Env env, const Napi::Value& v, const char* name, bool fallback) {
  if (!present(v)) return fallback;
  if (!v.IsBoolean()) arg_error(env, std::string(name) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// configure({ device?, isa?, threads?, batchInvariant?, resident?, kvMirror? }): replaces the
// backends; returns backendInfo(). isa, threads and batchInvariant (default false) configure
// the CPU backend (which also runs the ops a device lacks); device is "cpu", "cuda",
// "cuda:N", or the stand-in "sim" / "sim:BYTES" (expertmesh/sim.h) (default: keep the current
// one); batchInvariant needs "cpu" (a device's kernels promise no such thing). resident and
// kvMirror switch what EM_ADDON_RESIDENT and EM_ADDON_KV_MIRROR set at load (both on unless "0"; default: keep them).
Napi::Value Configure(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState* st = state_of(env);
  em_cpu_config cfg{EM_ISA_AUTO, 0, 0};
  std::string device = st->device_name;
  bool resident = st->resident, kv_mirror = st->kv_mirrors != nullptr;
  if (present(arg(info, 0))) {
    const Napi::Object o = object_arg(env, arg(info, 0), "options");
    const Napi::Value isa = prop(env, o, "isa");
    if (present(isa)) {
      const int parsed = isa.IsString() ? em_cpu_isa_parse(isa.As<Napi::String>().Utf8Value().c_str()) : -1;
      if (parsed < 0) arg_error(env, "isa must be 'auto', 'scalar', 'avx2', 'avx512', 'avx512bf16' or 'amx'");
      cfg.isa = static_cast<em_cpu_isa>(parsed);
    }
    cfg.num_threads = static_cast<int32_t>(integer_or(env, o, "threads", 0, 0));
    const Napi::Value dev = prop(env, o, "device");
    if (present(dev)) {
      if (!dev.IsString()) arg_error(env, "device must be 'cpu', 'cuda' or 'cuda:N'");
      device = dev.As<Napi::String>().Utf8Value();
    }
    resident = optional_bool(env, prop(env, o, "resident"), "resident", resident);
    kv_mirror = optional_bool(env, prop(env, o, "kvMirror"), "kvMirror", kv_mirror);
    cfg.batch_invariant = optional_bool(env, prop(env, o, "batchInvariant"), "batchInvariant", false) ? 1 : 0;
  }
  if (cfg.batch_invariant != 0 && device != "cpu")
    arg_error(env, "batchInvariant needs device 'cpu', not '" + device + "': only the CPU backend has batch-invariant kernels");
  // The device first: a device that is not there leaves the current backends as they were.
  em_backend* created_device = nullptr;
  if (device != "cpu") {
    const em_status s = em_backend_create_device(device.c_str(), &created_device);
    if (s != EM_OK) {
      const std::string detail = em_last_error(), named = "'" + device + "'";
      throw_code(env, code_of(s), detail.find(named) != std::string::npos ? detail : "device " + named + ": " + detail);
    }
  }
  em_backend* created_cpu = nullptr;
  const em_status s = em_backend_create_cpu(&cfg, &created_cpu);
  if (s != EM_OK) {
    em_backend_free(created_device);
    check(env, s, "configure");
  }
  em_backend_free(st->cpu);
  if (st->kv_mirrors) st->kv_mirrors->by_pool.clear();  // made on the old device
  st->resident_full = false;
  st->resident = resident;
  if (!kv_mirror) st->kv_mirrors.reset();  // the pools' finalizers hold it weakly
  else if (!st->kv_mirrors) st->kv_mirrors = std::make_shared<KvMirrors>();
  st->device_owner.reset(created_device, [](em_backend* b) { em_backend_free(b); });
  st->device = created_device;
  st->cpu = created_cpu;
  st->device_name = device;
  em::addon::crash_report_device(device.c_str());
  return BackendInfo(info);
}

// ------------------------------------------------------------------ ops

// matmul(x: Float32Array [rows * K], rows, w: Weight [N, K], out?) -> Float32Array [rows * N]
Napi::Value Matmul(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t rows = integer(env, arg(info, 1), "rows", 0);
  em_tensor w = weight_arg(env, arg(info, 2), "w");
  if (w.ndim != 2) shape_error(env, "w must be 2-D [out, in]");
  float* x = f32(env, arg(info, 0), "x", rows * w.shape[1]);
  Napi::Float32Array out = output(env, arg(info, 3), static_cast<size_t>(rows * w.shape[0]));
  em_tensor xt = em_tensor_2d(x, EM_F32, rows, w.shape[1]);
  em_tensor yt = em_tensor_2d(data_of(out), EM_F32, rows, w.shape[0]);
  em_backend* be = backend_for(env, EM_OP_MATMUL, w.dtype);
  w = on_device(env, be, arg(info, 2), w);
  check(env, em_matmul(be, &xt, &w, &yt), "matmul");
  return out;
}

// rmsnorm(x: Float32Array [rows * dim], weight: Float32Array | Weight [dim], eps, out?)
Napi::Value Rmsnorm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  em_tensor w = vector_weight_arg(env, arg(info, 1), "weight");
  if (w.ndim != 1) shape_error(env, "weight must be 1-D [dim]");
  const int64_t dim = w.shape[0];
  float* x = f32(env, arg(info, 0), "x");
  const int64_t rows = rows_of(env, length_of(arg(info, 0)), dim, "x");
  const float eps = static_cast<float>(number(env, arg(info, 2), "eps"));
  Napi::Float32Array out = output(env, arg(info, 3), static_cast<size_t>(rows * dim));
  em_tensor xt = em_tensor_2d(x, EM_F32, rows, dim), yt = em_tensor_2d(data_of(out), EM_F32, rows, dim);
  em_backend* be = backend_for(env, EM_OP_RMSNORM, w.dtype);
  w = on_device(env, be, arg(info, 1), w);
  check(env, em_rmsnorm(be, &xt, &w, eps, &yt), "rmsnorm");
  return out;
}

// siluMul(gate: Float32Array, up: Float32Array, out?) -> silu(gate) * up
Napi::Value SiluMul(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  float* g = f32(env, arg(info, 0), "gate");
  const int64_t n = length_of(arg(info, 0));
  float* u = f32(env, arg(info, 1), "up", n);
  Napi::Float32Array out = output(env, arg(info, 2), static_cast<size_t>(n));
  // Elementwise: view as rows of 4096 (parallel) plus one short row.
  constexpr int64_t kCols = 4096;
  const int64_t full = n / kCols, rest = n % kCols;
  em_backend* b = backend_for(env, EM_OP_SILU_MUL, EM_F32);
  if (full > 0) {
    em_tensor gt = em_tensor_2d(g, EM_F32, full, kCols), ut = em_tensor_2d(u, EM_F32, full, kCols);
    em_tensor yt = em_tensor_2d(data_of(out), EM_F32, full, kCols);
    check(env, em_silu_mul(b, &gt, &ut, &yt), "siluMul");
  }
  if (rest > 0) {
    const int64_t off = full * kCols;
    em_tensor gt = em_tensor_2d(g + off, EM_F32, 1, rest), ut = em_tensor_2d(u + off, EM_F32, 1, rest);
    em_tensor yt = em_tensor_2d(data_of(out) + off, EM_F32, 1, rest);
    check(env, em_silu_mul(b, &gt, &ut, &yt), "siluMul");
  }
  return out;
}

// The backend of a moe_ffn call: the device's when it takes every expert weight's dtype.
em_backend* moe_backend(Napi::Env env, const std::vector<em_tensor>& w1, const std::vector<em_tensor>& w2,
                        const std::vector<em_tensor>& w3) {
  AddonState* st = state_of(env);
  if (st->device == nullptr) return cpu_backend(env);
  for (const std::vector<em_tensor>* ws : {&w1, &w2, &w3}) {
    for (const em_tensor& w : *ws) {
      if (!em_supports_op(st->device, EM_OP_MOE_FFN, w.dtype)) return cpu_backend(env);
    }
  }
  return st->device;
}

// moeFfn({ x, dim, expertOffsets, w1[], w2[], w3[], rowWeights?, outIndex?, outRows?,
//          accumulate?, out?, xIndex? }) -> Float32Array [(outRows | rows) * dim]
Napi::Value MoeFfn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Napi::Object o = object_arg(env, arg(info, 0), "moeFfn arguments");
  const int64_t dim = integer(env, prop(env, o, "dim"), "dim", 1);
  float* x = f32(env, prop(env, o, "x"), "x");
  const int64_t x_rows = rows_of(env, length_of(prop(env, o, "x")), dim, "x");
  // xIndex: grouped row r reads x row xIndex[r] (a gather); rows = its length.
  const int32_t* x_index = present(prop(env, o, "xIndex")) ? index_arg(env, prop(env, o, "xIndex"), "xIndex") : nullptr;
  const int64_t rows = x_index ? length_of(prop(env, o, "xIndex")) : x_rows;
  int32_t* offsets = i32(env, prop(env, o, "expertOffsets"), "expertOffsets");
  const int64_t num_experts = length_of(prop(env, o, "expertOffsets")) - 1;
  if (num_experts < 0) shape_error(env, "expertOffsets must hold numExperts + 1 values");
  std::vector<em_tensor> w1 = weight_list(env, o.Get("w1"), "w1", static_cast<size_t>(num_experts));
  std::vector<em_tensor> w2 = weight_list(env, o.Get("w2"), "w2", static_cast<size_t>(num_experts));
  std::vector<em_tensor> w3 = weight_list(env, o.Get("w3"), "w3", static_cast<size_t>(num_experts));
  const float* row_weight = present(prop(env, o, "rowWeights")) ? f32(env, prop(env, o, "rowWeights"), "rowWeights", rows) : nullptr;
  const int32_t* out_index = present(prop(env, o, "outIndex")) ? i32(env, prop(env, o, "outIndex"), "outIndex", rows) : nullptr;
  const int64_t out_rows = out_index ? integer(env, prop(env, o, "outRows"), "outRows", 0) : rows;
  const bool accumulate = prop(env, o, "accumulate").ToBoolean().Value();
  if (accumulate && !present(prop(env, o, "out"))) arg_error(env, "accumulate needs an out array to add into");
  Napi::Float32Array out = output(env, prop(env, o, "out"), static_cast<size_t>(out_rows * dim));
  if (x_index && (num_experts > 0 ? offsets[num_experts] : 0) != rows)
    shape_error(env, "expertOffsets must end at xIndex.length (" + std::to_string(rows) + ")");
  em_tensor xt = em_tensor_2d(x, EM_F32, x_rows, dim), yt = em_tensor_2d(data_of(out), EM_F32, out_rows, dim);
  em_backend* be = moe_backend(env, w1, w2, w3);
  // The experts with rows to its weights on the device (the others are not read).
  if (keeps_weights(env, be)) {
    const Napi::Array a1 = o.Get("w1").As<Napi::Array>(), a2 = o.Get("w2").As<Napi::Array>(),
                      a3 = o.Get("w3").As<Napi::Array>();
    for (int64_t e = 0; e < num_experts; ++e) {
      if (offsets[e + 1] == offsets[e]) continue;
      const uint32_t i = static_cast<uint32_t>(e);
      on_device_pair(env, be, a1.Get(i), w1[i], a3.Get(i), w3[i]);
      w2[i] = on_device(env, be, a2.Get(i), w2[i]);
    }
  }
  em_moe_args a{&xt, static_cast<int32_t>(num_experts), offsets, w1.data(), w3.data(), w2.data(), row_weight,
                out_index, accumulate ? 1 : 0, &yt, x_index};
  check(env, em_moe_ffn(be, &a), "moeFfn");
  return out;
}

em_rope_config rope_config(Napi::Env env, const Napi::Object& o) {
  em_rope_config c{};
  c.rope_dim = static_cast<int32_t>(integer(env, prop(env, o, "ropeDim"), "ropeDim", 2));
  c.theta = number(env, prop(env, o, "theta"), "theta");
  c.factor = number_or(env, o, "factor", 1.0);
  c.original_max_position = integer_or(env, o, "originalMaxPosition", 0, 0);
  c.beta_fast = number_or(env, o, "betaFast", 32.0);
  c.beta_slow = number_or(env, o, "betaSlow", 1.0);
  return c;
}

// rope(x: Float32Array [T * H * headDim], positions: Int32Array [T], { ropeDim, theta,
//      factor?, originalMaxPosition?, betaFast?, betaSlow?, headDim? = ropeDim, offset? = 0 })
// rotates x[t, h, offset : offset + ropeDim] in place and returns x.
Napi::Value Rope(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Napi::Object o = object_arg(env, arg(info, 2), "rope options");
  const em_rope_config c = rope_config(env, o);
  const int64_t head_dim = integer_or(env, o, "headDim", c.rope_dim, 1);
  const int64_t offset = integer_or(env, o, "offset", 0, 0);
  if (offset + c.rope_dim > head_dim) shape_error(env, "offset + ropeDim exceeds headDim");
  int32_t* pos = i32(env, arg(info, 1), "positions");
  const int64_t tokens = length_of(arg(info, 1));
  float* x = f32(env, arg(info, 0), "x");
  const int64_t heads = tokens == 0 ? 0 : rows_of(env, length_of(arg(info, 0)), tokens * head_dim, "x");
  em_tensor xt = em_tensor_3d(x + offset, EM_F32, tokens, heads, c.rope_dim);
  xt.stride[0] = heads * head_dim;
  xt.stride[1] = head_dim;
  check(env, em_rope(backend_for(env, EM_OP_ROPE, EM_F32), &xt, pos, &c), "rope");
  return arg(info, 0);
}

// ropeInvFreq({ ropeDim, theta, factor?, ... }) -> Float32Array [ropeDim / 2]
Napi::Value RopeInvFreq(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const em_rope_config c = rope_config(env, object_arg(env, arg(info, 0), "rope options"));
  Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(c.rope_dim / 2));
  em_rope_inv_freq(&c, out.Data());
  return out;
}

// mlaSoftmaxScale(qkHeadDim, factor, mscaleAllDim) -> number
Napi::Value MlaSoftmaxScale(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Napi::Number::New(env, em_mla_softmax_scale(static_cast<int32_t>(integer(env, arg(info, 0), "qkHeadDim", 1)),
                                                     number(env, arg(info, 1), "factor"),
                                                     number(env, arg(info, 2), "mscaleAllDim")));
}

// kvEncode(dtype, kvLoraRank, ropeDim, rows: Float32Array [n, C + dr], out, byteOffset)
// writes the rows as `dtype` rows (em_kv_pages' layouts) into out from byteOffset.
// kvEncode wrote bytes [at, at + len) of the pool at `pool`: noted for its mirror, if any.
void note_kv_write(AddonState* st, const void* pool, size_t at, size_t len) {
  if (!st->kv_mirrors || len == 0) return;
  auto it = st->kv_mirrors->by_pool.find(pool);
  if (it == st->kv_mirrors->by_pool.end()) return;
  KvMirror& m = it->second;
  if (m.buf && !m.whole && !m.dirty.note(at, len)) {
    m.whole = true;  // made whole again at its next device read
    m.dirty.clear();
  }
}

// The device mirror of the pool `pool_value` (bytes `pool`) for an mlaAttention on the device
// backend `be`, up to date: made whole on first use, else the ranges written since copied.
void* kv_mirror(Napi::Env env, em_backend* be, const Napi::Value& pool_value, const Bytes& pool) {
  AddonState* st = state_of(env);
  KvMirrors& mirrors = *st->kv_mirrors;
  auto it = mirrors.by_pool.find(pool.data);
  if (it != mirrors.by_pool.end() && it->second.bytes != pool.size) {
    mirrors.by_pool.erase(it);  // another pool at the same address
    it = mirrors.by_pool.end();
  }
  if (it == mirrors.by_pool.end()) {
    KvMirror m;
    m.bytes = pool.size;
    m.buf = std::make_shared<DeviceBuffer>();
    m.buf->backend = st->device_owner;
    if (em_cuda_malloc(be, pool.size, &m.buf->ptr) != EM_OK) {
      // No room on the device: this pool stays on the host (gathered per call, as without
      // the mirror), said once per pool; the entry keeps it from being tried again.
      std::fprintf(stderr, "expertmesh addon: no device memory for a %zu-byte KV pool mirror (%s): it stays on the host\n",
                   pool.size, em_last_error());
      m.buf.reset();
    } else {
      check(env, em_cuda_copy(be, m.buf->ptr, pool.data, pool.size), "KV pool to device");
    }
    // Drop the mirror with the pool object (the table may be gone by then: weak). Node may
    // run the finalizer after a new pool took the address: the generation tells them apart.
    struct Key {
      std::weak_ptr<KvMirrors> table;
      const void* pool;
      uint64_t generation;
    };
    m.generation = mirrors.next_generation++;
    auto* key = new Key{st->kv_mirrors, pool.data, m.generation};
    napi_status s = napi_add_finalizer(
        env, pool_value, key,
        [](napi_env, void* data, void*) {
          std::unique_ptr<Key> k(static_cast<Key*>(data));
          auto table = k->table.lock();
          if (!table) return;
          auto found = table->by_pool.find(k->pool);
          if (found != table->by_pool.end() && found->second.generation == k->generation) table->by_pool.erase(found);
        },
        nullptr, nullptr);
    if (s != napi_ok) {
      delete key;
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
      arg_error(env, "pages.pool: cannot hold a device mirror");
    }
    it = mirrors.by_pool.emplace(pool.data, std::move(m)).first;
    return it->second.buf ? it->second.buf->ptr : nullptr;
  }
  KvMirror& m = it->second;
  if (!m.buf) return nullptr;
  if (m.whole) {
    check(env, em_cuda_copy(be, m.buf->ptr, pool.data, pool.size), "KV pool to device");
    m.whole = false;
  } else if (!m.dirty.empty()) {
    check(env, em_cuda_copy_ranges(be, m.buf->ptr, pool.data, m.dirty.offsets(), m.dirty.lengths(), m.dirty.size()),
          "KV rows to device");
    m.dirty.clear();
  }
  return m.buf->ptr;
}

Napi::Value KvEncode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const em_dtype dt = parse_dtype(env, arg(info, 0), "dtype");
  const int64_t C = integer(env, arg(info, 1), "kvLoraRank", 1), dr = integer(env, arg(info, 2), "ropeDim", 1);
  const size_t rb = em_kv_row_bytes(dt, static_cast<int32_t>(C), static_cast<int32_t>(dr));
  if (rb == 0) throw_code(env, "EM_NATIVE_DTYPE", "a paged cache holds 'f32', 'bf16' or 'fp8' rows");
  const float* rows = f32(env, arg(info, 3), "rows");
  const int64_t n = rows_of(env, length_of(arg(info, 3)), C + dr, "rows");
  const Bytes out = bytes_of(env, arg(info, 4), "out");
  const int64_t at = integer(env, arg(info, 5), "byteOffset", 0);
  if (static_cast<size_t>(at) + static_cast<size_t>(n) * rb > out.size)
    shape_error(env, "out holds " + std::to_string(out.size) + " bytes, the rows need " +
                         std::to_string(static_cast<size_t>(at) + static_cast<size_t>(n) * rb));
  // The best ISA's quantizer: its output is the portable encoder's, bit for bit (test_convert).
  const em::cpu::Kernels& k = em::cpu::kernels_for(em_cpu_best_isa());
  em::kv_encode_rows(dt, C, dr, rows, n, static_cast<uint8_t*>(out.data) + at, k.f32_to_fp8, k.abs_max);
  note_kv_write(state_of(env), out.data, static_cast<size_t>(at), static_cast<size_t>(n) * rb);
  return env.Undefined();
}

// kvWrite(src, out, byteOffset) copies encoded rows (a block the prefix cache's disk tier
// read back) into the pool `out` from byteOffset, noted for its device mirror as kvEncode's.
Napi::Value KvWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Bytes src = bytes_of(env, arg(info, 0), "src");
  const Bytes out = bytes_of(env, arg(info, 1), "out");
  const int64_t at = integer(env, arg(info, 2), "byteOffset", 0);
  if (static_cast<size_t>(at) + src.size > out.size)
    shape_error(env, "out holds " + std::to_string(out.size) + " bytes, the rows need " +
                         std::to_string(static_cast<size_t>(at) + src.size));
  std::memmove(static_cast<uint8_t*>(out.data) + at, src.data, src.size);
  note_kv_write(state_of(env), out.data, static_cast<size_t>(at), src.size);
  return env.Undefined();
}

// kvRowBytes(dtype, kvLoraRank, ropeDim) -> bytes of one paged latent cache row
Napi::Value KvRowBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const em_dtype dt = parse_dtype(env, arg(info, 0), "dtype");
  const size_t rb = em_kv_row_bytes(dt, static_cast<int32_t>(integer(env, arg(info, 1), "kvLoraRank", 1)),
                                    static_cast<int32_t>(integer(env, arg(info, 2), "ropeDim", 1)));
  if (rb == 0) throw_code(env, "EM_NATIVE_DTYPE", "a paged cache holds 'f32', 'bf16' or 'fp8' rows");
  return Napi::Number::New(env, static_cast<double>(rb));
}

// mlaAttention({ q, positions, caches | pages, qOffsets?, numHeads, qkNopeHeadDim,
//                qkRopeHeadDim, vHeadDim, kvLoraRank, wkvB, softmaxScale, out? })
//   -> Float32Array [T * H * dv]
// caches: one Float32Array (f32) or Uint16Array (bf16) [S * (kvLoraRank + qkRopeHeadDim)]
// per sequence (or a single array for one sequence); or
// pages: { pool (any typed array: [numBlocks, blockSize] rows of kvRowBytes bytes),
//          dtype: 'f32' | 'bf16' | 'fp8', blockSize, table: Int32Array (every sequence's
//          blocks), tableOffsets: Int32Array [numSeqs + 1] } (em_kv_pages).
Napi::Value MlaAttention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Napi::Object o = object_arg(env, arg(info, 0), "mlaAttention arguments");
  const int64_t H = integer(env, prop(env, o, "numHeads"), "numHeads", 1);
  const int64_t dn = integer(env, prop(env, o, "qkNopeHeadDim"), "qkNopeHeadDim", 1);
  const int64_t dr = integer(env, prop(env, o, "qkRopeHeadDim"), "qkRopeHeadDim", 1);
  const int64_t dv = integer(env, prop(env, o, "vHeadDim"), "vHeadDim", 1);
  const int64_t C = integer(env, prop(env, o, "kvLoraRank"), "kvLoraRank", 1);
  const float scale = static_cast<float>(number(env, prop(env, o, "softmaxScale"), "softmaxScale"));
  int32_t* pos = i32(env, prop(env, o, "positions"), "positions");
  const int64_t T = length_of(prop(env, o, "positions"));
  float* q = f32(env, prop(env, o, "q"), "q", T * H * (dn + dr));
  em_tensor wkv_b = weight_arg(env, prop(env, o, "wkvB"), "wkvB");

  std::vector<em_tensor> caches;
  em_kv_pages pages{};
  int32_t num_seqs = 0;
  if (present(prop(env, o, "pages"))) {
    const Napi::Object p = object_arg(env, prop(env, o, "pages"), "pages");
    pages.dtype = parse_dtype(env, prop(env, p, "dtype"), "pages.dtype");
    const size_t rb = em_kv_row_bytes(pages.dtype, static_cast<int32_t>(C), static_cast<int32_t>(dr));
    if (rb == 0) throw_code(env, "EM_NATIVE_DTYPE", "pages.dtype must be 'f32', 'bf16' or 'fp8'");
    pages.block_size = static_cast<int32_t>(integer(env, prop(env, p, "blockSize"), "pages.blockSize", 1));
    const Bytes pool = bytes_of(env, prop(env, p, "pool"), "pages.pool");
    pages.pool = pool.data;
    pages.num_blocks = static_cast<int64_t>(pool.size / (rb * static_cast<size_t>(pages.block_size)));
    if (pages.num_blocks < 1) shape_error(env, "pages.pool holds no whole block");
    pages.block_table = index_arg(env, prop(env, p, "table"), "pages.table");
    const Napi::Value offsets = prop(env, p, "tableOffsets");
    pages.table_offsets = i32(env, offsets, "pages.tableOffsets");
    num_seqs = static_cast<int32_t>(length_of(offsets)) - 1;
    if (num_seqs < 1) shape_error(env, "pages.tableOffsets needs numSeqs + 1 >= 2 entries");
    if (pages.table_offsets[num_seqs] > length_of(prop(env, p, "table")))
      shape_error(env, "pages.tableOffsets reaches past pages.table");
  } else {
    Napi::Value caches_v = prop(env, o, "caches");
    std::vector<Napi::Value> cache_values;
    if (caches_v.IsArray()) {
      const Napi::Array a = caches_v.As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); ++i) cache_values.push_back(a.Get(i));
    } else {
      cache_values.push_back(caches_v);
    }
    for (size_t i = 0; i < cache_values.size(); ++i) {
      const Napi::Value& c = cache_values[i];
      const std::string name = "caches[" + std::to_string(i) + "]";
      if (!c.IsTypedArray()) arg_error(env, name + " must be a Float32Array (f32) or Uint16Array (bf16)");
      const napi_typedarray_type type = c.As<Napi::TypedArray>().TypedArrayType();
      if (type != napi_float32_array && type != napi_uint16_array)
        throw_code(env, "EM_NATIVE_DTYPE", name + " must be a Float32Array (f32) or Uint16Array (bf16)");
      const em_dtype dt = type == napi_float32_array ? EM_F32 : EM_BF16;
      const Bytes b = bytes_of(env, c, name.c_str());
      const int64_t rows = rows_of(env, length_of(c), C + dr, name.c_str());
      caches.push_back(em_tensor_2d(b.data, dt, rows, C + dr));
    }
    num_seqs = static_cast<int32_t>(caches.size());
  }
  const int32_t* q_offsets =
      present(prop(env, o, "qOffsets")) ? i32(env, prop(env, o, "qOffsets"), "qOffsets", num_seqs + 1) : nullptr;
  Napi::Float32Array out = output(env, prop(env, o, "out"), static_cast<size_t>(T * H * dv));
  em_tensor qt = em_tensor_3d(q, EM_F32, T, H, dn + dr), ot = em_tensor_3d(data_of(out), EM_F32, T, H, dv);
  em_mla_args a{static_cast<int32_t>(H), static_cast<int32_t>(dn), static_cast<int32_t>(dr), static_cast<int32_t>(dv),
                static_cast<int32_t>(C),
                scale,
                &qt,
                pos,
                num_seqs,
                q_offsets,
                caches.empty() ? nullptr : caches.data(),
                &wkv_b,
                &ot,
                present(prop(env, o, "pages")) ? &pages : nullptr};
  em_backend* be = backend_for(env, EM_OP_MLA_ATTENTION, wkv_b.dtype);
  wkv_b = on_device(env, be, prop(env, o, "wkvB"), wkv_b);
  if (a.pages != nullptr && state_of(env)->kv_mirrors && be == state_of(env)->device) {
    const Napi::Value pool_value = prop(env, o, "pages").As<Napi::Object>().Get("pool");
    if (void* mirror = kv_mirror(env, be, pool_value, bytes_of(env, pool_value, "pages.pool"))) pages.pool = mirror;
  }
  check(env, em_mla_attention(be, &a), "mlaAttention");
  return out;
}

// gate({ x, weight, bias?, scoreFunc, topkMethod, topK, nGroup?, topkGroup?, normTopkProb?,
//        routedScalingFactor? }) -> { indices: Int32Array [T * k], weights: Float32Array [T * k] }
Napi::Value Gate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Napi::Object o = object_arg(env, arg(info, 0), "gate arguments");
  em_tensor w = weight_arg(env, prop(env, o, "weight"), "weight");
  if (w.ndim != 2) shape_error(env, "weight must be 2-D [experts, dim]");
  float* x = f32(env, prop(env, o, "x"), "x");
  const int64_t T = rows_of(env, length_of(prop(env, o, "x")), w.shape[1], "x");
  em_gate_config c{};
  const std::string sf = prop(env, o, "scoreFunc").IsString() ? prop(env, o, "scoreFunc").As<Napi::String>().Utf8Value() : "";
  if (sf == "softmax") {
    c.score_func = EM_SCORE_SOFTMAX;
  } else if (sf == "sigmoid") {
    c.score_func = EM_SCORE_SIGMOID;
  } else {
    arg_error(env, "scoreFunc must be 'softmax' or 'sigmoid'");
  }
  const std::string tm = prop(env, o, "topkMethod").IsString() ? prop(env, o, "topkMethod").As<Napi::String>().Utf8Value() : "";
  if (tm == "greedy" || tm == "gready") {  // "gready": DeepSeek-V2's own spelling
    c.topk_method = EM_TOPK_GREEDY;
  } else if (tm == "group_limited_greedy") {
    c.topk_method = EM_TOPK_GROUP_LIMITED_GREEDY;
  } else if (tm == "noaux_tc") {
    c.topk_method = EM_TOPK_NOAUX_TC;
  } else {
    arg_error(env, "topkMethod must be 'greedy', 'group_limited_greedy' or 'noaux_tc'");
  }
  c.top_k = static_cast<int32_t>(integer(env, prop(env, o, "topK"), "topK", 1));
  c.n_group = static_cast<int32_t>(integer_or(env, o, "nGroup", 1, 1));
  c.topk_group = static_cast<int32_t>(integer_or(env, o, "topkGroup", 1, 1));
  c.norm_topk_prob = prop(env, o, "normTopkProb").ToBoolean().Value() ? 1 : 0;
  c.routed_scaling_factor = static_cast<float>(number_or(env, o, "routedScalingFactor", 1.0));
  em_tensor bias{};
  const bool has_bias = present(prop(env, o, "bias"));
  if (has_bias) bias = em_tensor_1d(f32(env, prop(env, o, "bias"), "bias", w.shape[0]), EM_F32, w.shape[0]);
  Napi::Int32Array indices = Napi::Int32Array::New(env, static_cast<size_t>(T * c.top_k));
  Napi::Float32Array weights = Napi::Float32Array::New(env, static_cast<size_t>(T * c.top_k));
  em_tensor xt = em_tensor_2d(x, EM_F32, T, w.shape[1]);
  em_tensor it = em_tensor_2d(indices.Data(), EM_I32, T, c.top_k);
  em_tensor wt = em_tensor_2d(weights.Data(), EM_F32, T, c.top_k);
  em_backend* be = backend_for(env, EM_OP_GATE, w.dtype);
  w = on_device(env, be, prop(env, o, "weight"), w);
  check(env, em_gate(be, &xt, &w, has_bias ? &bias : nullptr, &c, &it, &wt), "gate");
  Napi::Object result = Napi::Object::New(env);
  result.Set("indices", indices);
  result.Set("weights", weights);
  return result;
}

// convert(w: Weight, to: 'f32' | 'bf16' | 'f16') -> Float32Array | Uint16Array (same shape)
Napi::Value Convert(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  em_tensor src = weight_arg(env, arg(info, 0), "w");
  const em_dtype to = parse_dtype(env, arg(info, 1), "to");
  const size_t n = static_cast<size_t>(src.ndim == 2 ? src.shape[0] * src.shape[1] : src.shape[0]);
  if (to == EM_F8_E4M3) {
    // Quantized on the CPU backend (the only one that does): codes and their block scales.
    if (src.dtype == EM_F8_E4M3) throw_code(env, "EM_NATIVE_DTYPE", "convert: the weight is fp8 already");
    const int64_t rows = src.ndim == 2 ? src.shape[0] : 1, cols = src.shape[src.ndim - 1];
    const int64_t block_cols = (cols + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK;
    Napi::Uint8Array codes = Napi::Uint8Array::New(env, n);
    Napi::Float32Array scales = Napi::Float32Array::New(env, static_cast<size_t>(((rows + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK) * block_cols));
    em_tensor dst = src;
    dst.data = codes.Data();
    dst.dtype = EM_F8_E4M3;
    dst.scale = scales.Data();
    dst.scale_stride = block_cols;
    check(env, em_convert(cpu_backend(env), &src, &dst), "convert");
    Napi::Object out = Napi::Object::New(env);
    out.Set("data", codes);
    out.Set("scaleInv", scales);
    return out;
  }
  Napi::TypedArray out;
  void* data;
  if (to == EM_F32) {
    Napi::Float32Array a = Napi::Float32Array::New(env, n);
    data = a.Data();
    out = a;
  } else {
    Napi::Uint16Array a = Napi::Uint16Array::New(env, n);
    data = a.Data();
    out = a;
  }
  em_tensor dst = src;
  dst.data = data;
  dst.dtype = to;
  dst.scale = nullptr;
  dst.scale_stride = 0;
  check(env, em_convert(backend_for(env, EM_OP_CONVERT, src.dtype), &src, &dst), "convert");
  return out;
}

// A per-row parameter: a number for every row, or a typed array of `rows` values.
template <typename T, size_t N>
std::vector<T> per_row(Napi::Env env, const Napi::Object& o, const char (&key)[N], int64_t rows, T fallback) {
  const Napi::Value v = prop(env, o, key);
  if (!present(v)) return std::vector<T>(static_cast<size_t>(rows), fallback);
  if (v.IsNumber()) return std::vector<T>(static_cast<size_t>(rows), static_cast<T>(number(env, v, key)));
  if constexpr (std::is_same_v<T, int32_t>) {
    const int32_t* p = i32(env, v, key, rows);
    return std::vector<T>(p, p + rows);
  } else {
    const float* p = f32(env, v, key, rows);
    return std::vector<T>(p, p + rows);
  }
}

// sample(logits: Float32Array [T * vocab], vocab, { temperature, minP?, topK?, topP?, uniform? })
// -> Int32Array [T]; each option is a number or one value per row.
Napi::Value Sample(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t vocab = integer(env, arg(info, 1), "vocab", 1);
  float* logits = f32(env, arg(info, 0), "logits");
  const int64_t T = rows_of(env, length_of(arg(info, 0)), vocab, "logits");
  const Napi::Object o = present(arg(info, 2)) ? object_arg(env, arg(info, 2), "sample options") : Napi::Object::New(env);
  std::vector<float> temperature = per_row<float>(env, o, "temperature", T, 0.0f);
  std::vector<int32_t> top_k = per_row<int32_t>(env, o, "topK", T, 0);
  std::vector<float> top_p = per_row<float>(env, o, "topP", T, 1.0f);
  std::vector<float> min_p = per_row<float>(env, o, "minP", T, 0.0f);
  const bool has_u = present(prop(env, o, "uniform"));
  std::vector<float> uniform = per_row<float>(env, o, "uniform", T, 0.0f);
  Napi::Int32Array out = Napi::Int32Array::New(env, static_cast<size_t>(T));
  em_tensor lt = em_tensor_2d(logits, EM_F32, T, vocab);
  em_sample_args a{&lt, temperature.data(), top_k.data(), top_p.data(), has_u ? uniform.data() : nullptr, out.Data(),
                   min_p.data()};
  check(env, em_sample(backend_for(env, EM_OP_SAMPLE, EM_F32), &a), "sample");
  return out;
}

// logprobs(logits: Float32Array [T * vocab], vocab, ids: Int32Array [T], k)
// -> { logprob: Float64Array [T], topIds: Int32Array [T * k], topLogprobs: Float64Array [T * k] }
Napi::Value Logprobs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t vocab = integer(env, arg(info, 1), "vocab", 1);
  float* logits = f32(env, arg(info, 0), "logits");
  const int64_t T = rows_of(env, length_of(arg(info, 0)), vocab, "logits");
  const int32_t* ids = i32(env, arg(info, 2), "ids", T);
  const int64_t k = integer(env, arg(info, 3), "k", 0);
  if (k > vocab) arg_error(env, "k must be at most vocab");
  Napi::Float64Array logprob = Napi::Float64Array::New(env, static_cast<size_t>(T));
  Napi::Int32Array top_ids = Napi::Int32Array::New(env, static_cast<size_t>(T * k));
  Napi::Float64Array top_lp = Napi::Float64Array::New(env, static_cast<size_t>(T * k));
  em_tensor lt = em_tensor_2d(logits, EM_F32, T, vocab);
  em_logprobs_args a{&lt, ids, static_cast<int32_t>(k), logprob.Data(), k ? top_ids.Data() : nullptr,
                     k ? top_lp.Data() : nullptr};
  check(env, em_logprobs(backend_for(env, EM_OP_LOGPROBS, EM_F32), &a), "logprobs");
  Napi::Object out = Napi::Object::New(env);
  out.Set("logprob", logprob);
  out.Set("topIds", top_ids);
  out.Set("topLogprobs", top_lp);
  return out;
}

// ------------------------------------------------------------------ wire codec

em_wire_dtype wire_dtype(Napi::Env env, const Napi::Value& v) {
  const int64_t d = integer(env, v, "dtype", 1);
  if (d != EM_WIRE_BF16 && d != EM_WIRE_FP8 && d != EM_WIRE_F32)
    throw_code(env, "EM_NATIVE_DTYPE", "dtype must be a wire dtype code: 1 bf16, 2 fp8, 3 f32");
  return static_cast<em_wire_dtype>(d);
}

// crc32(bytes: ArrayBufferView, crc? = 0) -> number: zlib's CRC-32, continuing from crc.
Napi::Value Crc32(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Bytes b = bytes_of(env, arg(info, 0), "bytes");
  const uint32_t crc = present(arg(info, 1)) ? static_cast<uint32_t>(integer(env, arg(info, 1), "crc", 0)) : 0;
  return Napi::Number::New(env, em_crc32(crc, b.data, b.size));
}

// wirePack(x: Float32Array [xRows * dim], dim, rowIndex: Int32Array | null, dtype (1|2|3),
//          out: Uint8Array, crc? ) -> number: writes the rows' wire bytes into out (exactly
// their size); returns the CRC-32 of out continuing from crc, or 0 without computing one
// when crc is omitted (or null).
Napi::Value WirePack(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t dim = integer(env, arg(info, 1), "dim", 1);
  float* x = f32(env, arg(info, 0), "x");
  const int64_t x_rows = rows_of(env, length_of(arg(info, 0)), dim, "x");
  const int32_t* row_index = present(arg(info, 2)) ? index_arg(env, arg(info, 2), "rowIndex") : nullptr;
  const int64_t rows = row_index ? length_of(arg(info, 2)) : x_rows;
  const em_wire_dtype dtype = wire_dtype(env, arg(info, 3));
  const Bytes out = bytes_of(env, arg(info, 4), "out");
  const bool want_crc = present(arg(info, 5));
  uint32_t crc = want_crc ? static_cast<uint32_t>(integer(env, arg(info, 5), "crc", 0)) : 0;
  em_tensor xt = em_tensor_2d(x, EM_F32, x_rows, dim);
  em_wire_pack_args a{&xt,     row_index, rows, dtype, static_cast<uint8_t*>(out.data), static_cast<int64_t>(out.size),
                      want_crc ? &crc : nullptr};
  check(env, em_wire_pack(backend_for(env, EM_OP_WIRE_PACK, EM_F32), &a), "wirePack");
  return Napi::Number::New(env, crc);
}

// wireUnpack(bytes: Uint8Array, dtype (1|2|3), rows, y: Float32Array [yRows * dim], dim,
//            outIndex: Int32Array | null, accumulate: boolean, crc?) -> undefined, or with
// crc given, the CRC-32 of bytes continuing from crc (computed in the same pass).
Napi::Value WireUnpack(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Bytes in = bytes_of(env, arg(info, 0), "bytes");
  const em_wire_dtype dtype = wire_dtype(env, arg(info, 1));
  const int64_t rows = integer(env, arg(info, 2), "rows", 0);
  const int64_t dim = integer(env, arg(info, 4), "dim", 1);
  float* y = f32(env, arg(info, 3), "y");
  const int64_t y_rows = rows_of(env, length_of(arg(info, 3)), dim, "y");
  const int32_t* out_index = present(arg(info, 5)) ? index_arg(env, arg(info, 5), "outIndex", rows) : nullptr;
  const bool accumulate = arg(info, 6).ToBoolean().Value();
  const bool want_crc = present(arg(info, 7));
  uint32_t crc = want_crc ? static_cast<uint32_t>(integer(env, arg(info, 7), "crc", 0)) : 0;
  em_tensor yt = em_tensor_2d(y, EM_F32, y_rows, dim);
  em_wire_unpack_args a{static_cast<const uint8_t*>(in.data), static_cast<int64_t>(in.size), dtype, rows, &yt,
                        out_index, accumulate ? 1 : 0, want_crc ? &crc : nullptr};
  check(env, em_wire_unpack(backend_for(env, EM_OP_WIRE_UNPACK, EM_F32), &a), "wireUnpack");
  return want_crc ? Napi::Value(Napi::Number::New(env, crc)) : env.Undefined();
}

// glibc's malloc, tuned for this process's large short-lived buffers (a prefill's activations,
// the MoE's gathered rows and hidden states: tens of MiB per op): below 32 MiB they come from
// the heap and go back to it, and up to 128 MiB of free heap top is kept, so the next op
// reuses the pages instead of mapping fresh ones and faulting them in. On mini-v3 a
// 1,202-token prompt took 10% less time and 105k fewer page faults, for ~20 MiB more peak
// memory (512 MiB kept was no faster; 128 MiB stays well inside the operator's
// POD_MEMORY_OVERHEAD). glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ win when set.
void tune_malloc() {
#if defined(__GLIBC__)
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr) mallopt(M_MMAP_THRESHOLD, 32 << 20);
  if (std::getenv("MALLOC_TRIM_THRESHOLD_") == nullptr) mallopt(M_TRIM_THRESHOLD, 128 << 20);
#endif
}

// Each export names itself as the op in flight while it runs: a fatal signal meanwhile says
// which op it was (crash_report.h).
template <Napi::Value (*F)(const Napi::CallbackInfo&)>
Napi::Value in_flight(const Napi::CallbackInfo& info) {
  struct Leave {
    ~Leave() { em::addon::crash_report_leave(); }
  } leave;
  em::addon::crash_report_enter(static_cast<const char*>(info.Data()));
  return F(info);
}

template <Napi::Value (*F)(const Napi::CallbackInfo&)>
void def(Napi::Env env, Napi::Object exports, const char* name) {
  exports.Set(name, Napi::Function::New(env, in_flight<F>, name, const_cast<char*>(name)));
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  tune_malloc();
  // In a pod (its termination-log file exists): a fatal signal leaves its reason there.
  em::addon::install_crash_report();
  AddonState* st = new AddonState();
  // Both on unless set to "0": the H200 run of 2026-12-04 passed the forward with them, as
  // fast as per-op staging at the tiny models' sizes (BENCHMARKS.md, "GPU").
  auto on_unless_zero = [](const char* name) {
    const char* v = std::getenv(name);
    return v == nullptr || std::strcmp(v, "0") != 0;
  };
  st->resident = on_unless_zero("EM_ADDON_RESIDENT");
  if (on_unless_zero("EM_ADDON_KV_MIRROR")) st->kv_mirrors = std::make_shared<KvMirrors>();
  env.SetInstanceData(st);
  def<BackendInfo>(env, exports, "backendInfo");
  def<Configure>(env, exports, "configure");
  def<CudaStatus>(env, exports, "cudaStatus");
  def<SimStats>(env, exports, "simStats");
  def<ScratchBytes>(env, exports, "scratchBytes");
  def<TrimScratch>(env, exports, "trimScratch");
  def<Matmul>(env, exports, "matmul");
  def<Rmsnorm>(env, exports, "rmsnorm");
  def<SiluMul>(env, exports, "siluMul");
  def<MoeFfn>(env, exports, "moeFfn");
  def<Rope>(env, exports, "rope");
  def<RopeInvFreq>(env, exports, "ropeInvFreq");
  def<MlaSoftmaxScale>(env, exports, "mlaSoftmaxScale");
  def<MlaAttention>(env, exports, "mlaAttention");
  def<KvRowBytes>(env, exports, "kvRowBytes");
  def<KvEncode>(env, exports, "kvEncode");
  def<KvWrite>(env, exports, "kvWrite");
  def<Gate>(env, exports, "gate");
  def<Convert>(env, exports, "convert");
  def<Sample>(env, exports, "sample");
  def<Logprobs>(env, exports, "logprobs");
  def<Crc32>(env, exports, "crc32");
  def<WirePack>(env, exports, "wirePack");
  def<WireUnpack>(env, exports, "wireUnpack");
  return exports;
}

}  // namespace

NODE_API_MODULE(expertmesh, Init)
