// The one dispatcher: tensor helpers, status/error reporting, argument validation shared
// by every backend, and the op entry points that forward to a backend's op table.
//
// Validation lives here, once, so a backend (CPU now, CUDA later) can trust its inputs
// and every backend rejects the same inputs with the same message.
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>

#include <algorithm>
#include <vector>

#include "expertmesh/ops.h"
#include "internal.h"
#include "kv_pages.h"

namespace {

thread_local std::string tls_last_error;

// Tensor checks --------------------------------------------------------------

bool is_weight_dtype(em_dtype d) { return d == EM_F32 || d == EM_BF16 || d == EM_F16 || d == EM_F8_E4M3; }

int64_t numel(const em_tensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
  return n;
}

// Checks the structural invariants of a view: rank, non-negative shape, contiguous
// innermost dimension, data present.
em_status check_view(const em_tensor* t, const char* name) {
  if (t == nullptr) return em::fail(EM_ERR_ARG, "%s: tensor is NULL", name);
  if (t->ndim < 1 || t->ndim > EM_MAX_DIMS) return em::fail(EM_ERR_SHAPE, "%s: ndim %d not in [1, 4]", name, t->ndim);
  if (static_cast<int>(t->dtype) < 0 || t->dtype >= EM_DTYPE_COUNT)
    return em::fail(EM_ERR_DTYPE, "%s: unknown dtype %d", name, static_cast<int>(t->dtype));
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] < 0) return em::fail(EM_ERR_SHAPE, "%s: negative shape[%d]", name, i);
    if (t->stride[i] < 0) return em::fail(EM_ERR_SHAPE, "%s: negative stride[%d]", name, i);
  }
  if (t->stride[t->ndim - 1] != 1 && t->shape[t->ndim - 1] > 1)
    return em::fail(EM_ERR_SHAPE, "%s: innermost dimension must be contiguous (stride 1)", name);
  for (int i = 0; i + 1 < t->ndim; ++i) {
    if (t->shape[i] > 1 && t->stride[i] < t->shape[i + 1] * t->stride[i + 1] && t->shape[i + 1] > 0)
      return em::fail(EM_ERR_SHAPE, "%s: stride[%d] = %lld overlaps the next dimension", name, i,
                      static_cast<long long>(t->stride[i]));
  }
  if (t->data == nullptr && numel(*t) > 0) return em::fail(EM_ERR_ARG, "%s: data is NULL", name);
  return EM_OK;
}

em_status check_rank_dtype(const em_tensor* t, const char* name, int ndim, em_dtype dtype) {
  em_status s = check_view(t, name);
  if (s != EM_OK) return s;
  if (t->ndim != ndim) return em::fail(EM_ERR_SHAPE, "%s: expected %d dims, got %d", name, ndim, t->ndim);
  if (t->dtype != dtype)
    return em::fail(EM_ERR_DTYPE, "%s: expected %s, got %s", name, em_dtype_name(dtype), em_dtype_name(t->dtype));
  return EM_OK;
}

// A 2-D weight [rows, cols] (or, for 1-D norm weights, [cols]) in a weight dtype, with
// fp8 block scales present and wide enough.
em_status check_weight(const em_tensor* t, const char* name, int ndim) {
  em_status s = check_view(t, name);
  if (s != EM_OK) return s;
  if (t->ndim != ndim) return em::fail(EM_ERR_SHAPE, "%s: expected %d dims, got %d", name, ndim, t->ndim);
  if (!is_weight_dtype(t->dtype))
    return em::fail(EM_ERR_DTYPE, "%s: %s is not a weight dtype (f32, bf16, f16, fp8)", name, em_dtype_name(t->dtype));
  if (t->dtype == EM_F8_E4M3) {
    const int64_t cols = t->shape[t->ndim - 1];
    if (t->scale == nullptr) return em::fail(EM_ERR_ARG, "%s: fp8 weight without weight_scale_inv", name);
    if (t->scale_stride < (cols + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK)
      return em::fail(EM_ERR_SHAPE, "%s: scale_stride %lld < ceil(%lld / 128)", name,
                      static_cast<long long>(t->scale_stride), static_cast<long long>(cols));
  }
  return EM_OK;
}

em_status check_shape2(const em_tensor* t, const char* name, int64_t d0, int64_t d1) {
  if (t->shape[0] != d0 || t->shape[1] != d1)
    return em::fail(EM_ERR_SHAPE, "%s: expected [%lld, %lld], got [%lld, %lld]", name, static_cast<long long>(d0),
                    static_cast<long long>(d1), static_cast<long long>(t->shape[0]),
                    static_cast<long long>(t->shape[1]));
  return EM_OK;
}

em_status check_backend(const em_backend* b) {
  if (b == nullptr || b->iface == nullptr) return em::fail(EM_ERR_ARG, "backend is NULL");
  return EM_OK;
}

em_status check_supported(const em_backend* b, em_op op, em_dtype dtype) {
  if (!b->iface->supports_op(b->ctx, op, dtype))
    return em::fail(EM_ERR_UNSUPPORTED, "backend '%s' does not support %s with %s", b->iface->name, em_op_name(op),
                    em_dtype_name(dtype));
  return EM_OK;
}

// Offsets [n + 1] starting at 0, non-decreasing, ending at `total`.
em_status check_offsets(const int32_t* offsets, int64_t n, int64_t total, const char* name) {
  if (offsets == nullptr) return em::fail(EM_ERR_ARG, "%s is NULL", name);
  if (offsets[0] != 0) return em::fail(EM_ERR_ARG, "%s[0] must be 0", name);
  for (int64_t i = 0; i < n; ++i) {
    if (offsets[i + 1] < offsets[i]) return em::fail(EM_ERR_ARG, "%s must be non-decreasing (at %lld)", name, static_cast<long long>(i));
  }
  if (offsets[n] != total)
    return em::fail(EM_ERR_SHAPE, "%s ends at %d, expected %lld rows", name, offsets[n], static_cast<long long>(total));
  return EM_OK;
}

#define EM_TRY(expr)                 \
  do {                               \
    const em_status s_ = (expr);     \
    if (s_ != EM_OK) return s_;      \
  } while (0)

}  // namespace

// Errors ----------------------------------------------------------------------

em_status em::fail(em_status status, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  tls_last_error = buf;
  return status;
}

extern "C" const char* em_last_error(void) { return tls_last_error.c_str(); }

extern "C" const char* em_status_name(em_status status) {
  switch (status) {
    case EM_OK: return "EM_OK";
    case EM_ERR_SHAPE: return "EM_ERR_SHAPE";
    case EM_ERR_DTYPE: return "EM_ERR_DTYPE";
    case EM_ERR_ARG: return "EM_ERR_ARG";
    case EM_ERR_UNSUPPORTED: return "EM_ERR_UNSUPPORTED";
    case EM_ERR_NOMEM: return "EM_ERR_NOMEM";
    case EM_ERR_INTERNAL: return "EM_ERR_INTERNAL";
  }
  return "EM_ERR_UNKNOWN";
}

extern "C" const char* em_op_name(em_op op) {
  static const char* const names[EM_OP_COUNT] = {"matmul", "rmsnorm", "silu_mul", "moe_ffn", "rope",
                                                 "mla_attention", "gate", "convert", "sample", "wire_pack",
                                                 "wire_unpack", "logprobs"};
  return op >= 0 && op < EM_OP_COUNT ? names[op] : "unknown";
}

// Tensors ----------------------------------------------------------------------

extern "C" size_t em_dtype_size(em_dtype dtype) {
  switch (dtype) {
    case EM_F32: case EM_I32: return 4;
    case EM_BF16: case EM_F16: return 2;
    case EM_F8_E4M3: return 1;
    default: return 0;
  }
}

extern "C" const char* em_dtype_name(em_dtype dtype) {
  switch (dtype) {
    case EM_F32: return "f32";
    case EM_BF16: return "bf16";
    case EM_F16: return "f16";
    case EM_F8_E4M3: return "fp8";
    case EM_I32: return "i32";
    default: return "unknown";
  }
}

extern "C" em_tensor em_tensor_1d(void* data, em_dtype dtype, int64_t n) {
  em_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.ndim = 1;
  t.shape[0] = n;
  t.stride[0] = 1;
  return t;
}

extern "C" em_tensor em_tensor_2d(void* data, em_dtype dtype, int64_t rows, int64_t cols) {
  em_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.ndim = 2;
  t.shape[0] = rows;
  t.shape[1] = cols;
  t.stride[0] = cols;
  t.stride[1] = 1;
  return t;
}

extern "C" em_tensor em_tensor_3d(void* data, em_dtype dtype, int64_t d0, int64_t d1, int64_t d2) {
  em_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.ndim = 3;
  t.shape[0] = d0;
  t.shape[1] = d1;
  t.shape[2] = d2;
  t.stride[0] = d1 * d2;
  t.stride[1] = d2;
  t.stride[2] = 1;
  return t;
}

extern "C" em_tensor em_tensor_fp8(void* data, const float* scale_inv, int64_t rows, int64_t cols) {
  em_tensor t = em_tensor_2d(data, EM_F8_E4M3, rows, cols);
  t.scale = scale_inv;
  t.scale_stride = (cols + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK;
  return t;
}

// Backends ----------------------------------------------------------------------

extern "C" void em_backend_free(em_backend* backend) {
  if (backend == nullptr) return;
  backend->iface->destroy(backend->ctx);
  delete backend;
}

extern "C" void em_backend_get_info(const em_backend* backend, em_backend_info* out) {
  *out = em_backend_info{"none", "none", 0, 0};
  if (backend != nullptr) backend->iface->info(backend->ctx, out);
}

extern "C" int em_supports_op(const em_backend* backend, em_op op, em_dtype dtype) {
  if (backend == nullptr || op < 0 || op >= EM_OP_COUNT) return 0;
  return backend->iface->supports_op(backend->ctx, op, dtype);
}

// Ops ----------------------------------------------------------------------------

extern "C" em_status em_matmul(em_backend* b, const em_tensor* x, const em_tensor* w, em_tensor* y) {
  EM_TRY(check_backend(b));
  EM_TRY(check_rank_dtype(x, "matmul x", 2, EM_F32));
  EM_TRY(check_weight(w, "matmul w", 2));
  EM_TRY(check_rank_dtype(y, "matmul y", 2, EM_F32));
  if (x->shape[1] != w->shape[1])
    return em::fail(EM_ERR_SHAPE, "matmul: x has %lld columns but w has %lld (w is [out, in])",
                    static_cast<long long>(x->shape[1]), static_cast<long long>(w->shape[1]));
  EM_TRY(check_shape2(y, "matmul y", x->shape[0], w->shape[0]));
  EM_TRY(check_supported(b, EM_OP_MATMUL, w->dtype));
  return b->iface->matmul(b->ctx, x, w, y);
}

extern "C" em_status em_rmsnorm(em_backend* b, const em_tensor* x, const em_tensor* weight, float eps, em_tensor* y) {
  EM_TRY(check_backend(b));
  EM_TRY(check_rank_dtype(x, "rmsnorm x", 2, EM_F32));
  EM_TRY(check_weight(weight, "rmsnorm weight", 1));
  EM_TRY(check_rank_dtype(y, "rmsnorm y", 2, EM_F32));
  if (weight->dtype == EM_F8_E4M3) return em::fail(EM_ERR_DTYPE, "rmsnorm weight: fp8 is not a norm weight dtype");
  if (weight->shape[0] != x->shape[1])
    return em::fail(EM_ERR_SHAPE, "rmsnorm: weight has %lld values, x rows have %lld",
                    static_cast<long long>(weight->shape[0]), static_cast<long long>(x->shape[1]));
  EM_TRY(check_shape2(y, "rmsnorm y", x->shape[0], x->shape[1]));
  if (!(eps >= 0.0f) || !std::isfinite(eps)) return em::fail(EM_ERR_ARG, "rmsnorm: eps must be finite and >= 0");
  EM_TRY(check_supported(b, EM_OP_RMSNORM, weight->dtype));
  return b->iface->rmsnorm(b->ctx, x, weight, eps, y);
}

extern "C" em_status em_silu_mul(em_backend* b, const em_tensor* gate, const em_tensor* up, em_tensor* y) {
  EM_TRY(check_backend(b));
  EM_TRY(check_rank_dtype(gate, "silu_mul gate", 2, EM_F32));
  EM_TRY(check_rank_dtype(up, "silu_mul up", 2, EM_F32));
  EM_TRY(check_rank_dtype(y, "silu_mul y", 2, EM_F32));
  EM_TRY(check_shape2(up, "silu_mul up", gate->shape[0], gate->shape[1]));
  EM_TRY(check_shape2(y, "silu_mul y", gate->shape[0], gate->shape[1]));
  EM_TRY(check_supported(b, EM_OP_SILU_MUL, EM_F32));
  return b->iface->silu_mul(b->ctx, gate, up, y);
}

extern "C" em_status em_moe_ffn(em_backend* b, const em_moe_args* a) {
  EM_TRY(check_backend(b));
  if (a == nullptr) return em::fail(EM_ERR_ARG, "moe_ffn: args is NULL");
  EM_TRY(check_rank_dtype(a->x, "moe_ffn x", 2, EM_F32));
  EM_TRY(check_rank_dtype(a->y, "moe_ffn y", 2, EM_F32));
  const int64_t dim = a->x->shape[1];
  if (a->num_experts < 0) return em::fail(EM_ERR_ARG, "moe_ffn: num_experts < 0");
  // With a gather index the grouped rows are the index's, wherever they sit in x.
  int64_t rows = a->x->shape[0];
  if (a->x_index != nullptr) {
    if (a->num_experts > 0 && a->expert_offsets == nullptr)
      return em::fail(EM_ERR_ARG, "moe_ffn expert_offsets is NULL");
    rows = a->num_experts > 0 ? a->expert_offsets[a->num_experts] : 0;
    if (rows < 0) return em::fail(EM_ERR_ARG, "moe_ffn: expert_offsets end below 0");
    for (int64_t i = 0; i < rows; ++i) {
      if (a->x_index[i] < 0 || a->x_index[i] >= a->x->shape[0])
        return em::fail(EM_ERR_ARG, "moe_ffn: x_index[%lld] = %d outside x's %lld rows", static_cast<long long>(i),
                        a->x_index[i], static_cast<long long>(a->x->shape[0]));
    }
  }
  if (a->y->shape[1] != dim)
    return em::fail(EM_ERR_SHAPE, "moe_ffn y: %lld columns, x has %lld", static_cast<long long>(a->y->shape[1]),
                    static_cast<long long>(dim));
  if (a->num_experts == 0) {
    if (rows != 0) return em::fail(EM_ERR_SHAPE, "moe_ffn: %lld rows but no experts", static_cast<long long>(rows));
  } else {
    EM_TRY(check_offsets(a->expert_offsets, a->num_experts, rows, "moe_ffn expert_offsets"));
    if (a->w1 == nullptr || a->w2 == nullptr || a->w3 == nullptr)
      return em::fail(EM_ERR_ARG, "moe_ffn: w1, w2 and w3 arrays are required");
  }
  for (int32_t e = 0; e < a->num_experts; ++e) {
    char n1[48], n2[48], n3[48];
    std::snprintf(n1, sizeof n1, "moe_ffn w1[%d]", e);
    std::snprintf(n2, sizeof n2, "moe_ffn w2[%d]", e);
    std::snprintf(n3, sizeof n3, "moe_ffn w3[%d]", e);
    EM_TRY(check_weight(&a->w1[e], n1, 2));
    EM_TRY(check_weight(&a->w2[e], n2, 2));
    EM_TRY(check_weight(&a->w3[e], n3, 2));
    const int64_t inter = a->w1[e].shape[0];
    EM_TRY(check_shape2(&a->w1[e], n1, inter, dim));
    EM_TRY(check_shape2(&a->w3[e], n3, inter, dim));
    EM_TRY(check_shape2(&a->w2[e], n2, dim, inter));
    EM_TRY(check_supported(b, EM_OP_MOE_FFN, a->w1[e].dtype));
    EM_TRY(check_supported(b, EM_OP_MOE_FFN, a->w2[e].dtype));
    EM_TRY(check_supported(b, EM_OP_MOE_FFN, a->w3[e].dtype));
  }
  if (a->out_index != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      if (a->out_index[i] < 0 || a->out_index[i] >= a->y->shape[0])
        return em::fail(EM_ERR_ARG, "moe_ffn: out_index[%lld] = %d outside y's %lld rows", static_cast<long long>(i),
                        a->out_index[i], static_cast<long long>(a->y->shape[0]));
    }
  } else if (a->y->shape[0] != rows) {
    return em::fail(EM_ERR_SHAPE, "moe_ffn y: %lld rows, x has %lld (or pass out_index)",
                    static_cast<long long>(a->y->shape[0]), static_cast<long long>(rows));
  }
  return b->iface->moe_ffn(b->ctx, a);
}

extern "C" em_status em_rope(em_backend* b, em_tensor* x, const int32_t* positions, const em_rope_config* cfg) {
  EM_TRY(check_backend(b));
  EM_TRY(check_view(x, "rope x"));
  if (x->dtype != EM_F32) return em::fail(EM_ERR_DTYPE, "rope x: expected f32");
  if (x->ndim != 2 && x->ndim != 3) return em::fail(EM_ERR_SHAPE, "rope x: expected [T, dim] or [T, heads, dim]");
  if (cfg == nullptr) return em::fail(EM_ERR_ARG, "rope: config is NULL");
  if (cfg->rope_dim <= 0 || cfg->rope_dim % 2 != 0) return em::fail(EM_ERR_ARG, "rope: rope_dim must be even and > 0");
  if (x->shape[x->ndim - 1] != cfg->rope_dim)
    return em::fail(EM_ERR_SHAPE, "rope x: last dim %lld != rope_dim %d", static_cast<long long>(x->shape[x->ndim - 1]),
                    cfg->rope_dim);
  if (!(cfg->theta > 0.0)) return em::fail(EM_ERR_ARG, "rope: theta must be > 0");
  if (cfg->factor > 1.0 && (cfg->original_max_position <= 0 || !(cfg->beta_fast > 0.0) || !(cfg->beta_slow > 0.0)))
    return em::fail(EM_ERR_ARG, "rope: YaRN (factor > 1) needs original_max_position, beta_fast, beta_slow > 0");
  const int64_t tokens = x->shape[0];
  if (tokens > 0 && positions == nullptr) return em::fail(EM_ERR_ARG, "rope: positions is NULL");
  for (int64_t t = 0; t < tokens; ++t) {
    if (positions[t] < 0) return em::fail(EM_ERR_ARG, "rope: positions[%lld] < 0", static_cast<long long>(t));
  }
  EM_TRY(check_supported(b, EM_OP_ROPE, EM_F32));
  return b->iface->rope(b->ctx, x, positions, cfg);
}

extern "C" size_t em_kv_row_bytes(em_dtype dtype, int32_t kv_lora_rank, int32_t rope_dim) {
  return em::kv_row_bytes(dtype, kv_lora_rank, rope_dim);
}

namespace em {
namespace {

// Paged rows for a backend that reads contiguous caches only: each sequence's visible rows
// gathered into a cache of its own (bf16 stays bf16, fp8 becomes f32), then the same call.
em_status mla_gather_pages(em_backend* b, const em_mla_args* a) {
  const em_kv_pages& p = *a->pages;
  const int64_t C = a->kv_lora_rank, dr = a->qk_rope_head_dim, W = C + dr, T = a->q->shape[0];
  const size_t rb = kv_row_bytes(p.dtype, C, dr);
  const em_dtype out_dtype = p.dtype == EM_BF16 ? EM_BF16 : EM_F32;
  std::vector<std::vector<uint8_t>> buffers(static_cast<size_t>(a->num_seqs));
  std::vector<em_tensor> caches;
  for (int32_t s = 0; s < a->num_seqs; ++s) {
    const int64_t t0 = a->q_offsets ? a->q_offsets[s] : 0, t1 = a->q_offsets ? a->q_offsets[s + 1] : T;
    int64_t rows = 1;
    for (int64_t t = t0; t < t1; ++t) rows = std::max<int64_t>(rows, a->positions[t] + 1);
    std::vector<uint8_t>& buf = buffers[static_cast<size_t>(s)];
    buf.assign(static_cast<size_t>(rows * W) * em_dtype_size(out_dtype), 0);
    for (int64_t r = 0; r < rows && t1 > t0; ++r) {
      const uint8_t* row = kv_row(p, s, r, rb);
      uint8_t* dst = buf.data() + static_cast<size_t>(r * W) * em_dtype_size(out_dtype);
      if (p.dtype == EM_F8_E4M3)
        kv_fp8_rows_to_f32(row, 1, C, dr, reinterpret_cast<float*>(dst));
      else
        std::memcpy(dst, row, rb);
    }
    caches.push_back(em_tensor_2d(buf.data(), out_dtype, rows, W));
  }
  em_mla_args c = *a;
  c.caches = caches.data();
  c.pages = nullptr;
  return b->iface->mla_attention(b->ctx, &c);
}

}  // namespace
}  // namespace em

extern "C" em_status em_mla_attention(em_backend* b, const em_mla_args* a) {
  EM_TRY(check_backend(b));
  if (a == nullptr) return em::fail(EM_ERR_ARG, "mla_attention: args is NULL");
  const int64_t H = a->num_heads, dn = a->qk_nope_head_dim, dr = a->qk_rope_head_dim, dv = a->v_head_dim,
                C = a->kv_lora_rank;
  if (H <= 0 || dn <= 0 || dr <= 0 || dv <= 0 || C <= 0)
    return em::fail(EM_ERR_ARG, "mla_attention: num_heads and head dims must be > 0");
  if (!(a->softmax_scale > 0.0f) || !std::isfinite(a->softmax_scale))
    return em::fail(EM_ERR_ARG, "mla_attention: softmax_scale must be finite and > 0");
  EM_TRY(check_rank_dtype(a->q, "mla_attention q", 3, EM_F32));
  const int64_t T = a->q->shape[0];
  if (a->q->shape[1] != H || a->q->shape[2] != dn + dr)
    return em::fail(EM_ERR_SHAPE, "mla_attention q: expected [T, %lld, %lld]", static_cast<long long>(H),
                    static_cast<long long>(dn + dr));
  EM_TRY(check_rank_dtype(a->out, "mla_attention out", 3, EM_F32));
  if (a->out->shape[0] != T || a->out->shape[1] != H || a->out->shape[2] != dv)
    return em::fail(EM_ERR_SHAPE, "mla_attention out: expected [%lld, %lld, %lld]", static_cast<long long>(T),
                    static_cast<long long>(H), static_cast<long long>(dv));
  EM_TRY(check_weight(a->wkv_b, "mla_attention wkv_b", 2));
  EM_TRY(check_shape2(a->wkv_b, "mla_attention wkv_b", H * (dn + dv), C));
  EM_TRY(check_supported(b, EM_OP_MLA_ATTENTION, a->wkv_b->dtype));
  if (a->num_seqs < 1) return em::fail(EM_ERR_ARG, "mla_attention: num_seqs must be >= 1");
  if (a->q_offsets != nullptr) {
    EM_TRY(check_offsets(a->q_offsets, a->num_seqs, T, "mla_attention q_offsets"));
  } else if (a->num_seqs != 1) {
    return em::fail(EM_ERR_ARG, "mla_attention: q_offsets is required for more than one sequence");
  }
  if (T > 0 && a->positions == nullptr) return em::fail(EM_ERR_ARG, "mla_attention: positions is NULL");
  auto check_positions = [&](int32_t s, int64_t rows, const char* what) -> em_status {
    const int64_t t0 = a->q_offsets ? a->q_offsets[s] : 0, t1 = a->q_offsets ? a->q_offsets[s + 1] : T;
    for (int64_t t = t0; t < t1; ++t) {
      if (a->positions[t] < 0 || a->positions[t] >= rows)
        return em::fail(EM_ERR_ARG, "mla_attention: positions[%lld] = %d outside %s %d's %lld rows",
                        static_cast<long long>(t), a->positions[t], what, s, static_cast<long long>(rows));
    }
    return EM_OK;
  };
  if (a->pages != nullptr) {
    if (a->caches != nullptr) return em::fail(EM_ERR_ARG, "mla_attention: give caches or pages, not both");
    const em_kv_pages& p = *a->pages;
    if (p.dtype != EM_F32 && p.dtype != EM_BF16 && p.dtype != EM_F8_E4M3)
      return em::fail(EM_ERR_DTYPE, "mla_attention pages: expected f32, bf16 or fp8 rows");
    if (p.pool == nullptr || p.block_table == nullptr || p.table_offsets == nullptr)
      return em::fail(EM_ERR_ARG, "mla_attention pages: pool, block_table and table_offsets must be set");
    if (p.block_size < 1 || p.num_blocks < 1)
      return em::fail(EM_ERR_ARG, "mla_attention pages: block_size and num_blocks must be >= 1");
    if (p.table_offsets[0] != 0) return em::fail(EM_ERR_ARG, "mla_attention pages: table_offsets[0] must be 0");
    for (int32_t s = 0; s < a->num_seqs; ++s) {
      const int32_t b0 = p.table_offsets[s], b1 = p.table_offsets[s + 1];
      if (b1 < b0) return em::fail(EM_ERR_ARG, "mla_attention pages: table_offsets must not decrease");
      for (int32_t i = b0; i < b1; ++i) {
        if (p.block_table[i] < 0 || p.block_table[i] >= p.num_blocks)
          return em::fail(EM_ERR_ARG, "mla_attention pages: block_table[%d] = %d outside the %lld blocks", i,
                          p.block_table[i], static_cast<long long>(p.num_blocks));
      }
      EM_TRY(check_positions(s, static_cast<int64_t>(b1 - b0) * p.block_size, "paged sequence"));
    }
    if (b->iface->reads_pages == nullptr || !b->iface->reads_pages(b->ctx, &p)) return em::mla_gather_pages(b, a);
    return b->iface->mla_attention(b->ctx, a);
  }
  if (a->caches == nullptr) return em::fail(EM_ERR_ARG, "mla_attention: caches is NULL");
  for (int32_t s = 0; s < a->num_seqs; ++s) {
    const em_tensor* c = &a->caches[s];
    EM_TRY(check_view(c, "mla_attention cache"));
    if (c->ndim != 2 || c->shape[1] != C + dr)
      return em::fail(EM_ERR_SHAPE, "mla_attention caches[%d]: expected [S, %lld] (kv_lora_rank + rope dims)", s,
                      static_cast<long long>(C + dr));
    if (c->dtype != EM_F32 && c->dtype != EM_BF16)
      return em::fail(EM_ERR_DTYPE, "mla_attention caches[%d]: expected f32 or bf16", s);
    EM_TRY(check_positions(s, c->shape[0], "cache"));
  }
  return b->iface->mla_attention(b->ctx, a);
}

extern "C" em_status em_gate(em_backend* b, const em_tensor* x, const em_tensor* weight, const em_tensor* bias,
                             const em_gate_config* cfg, em_tensor* topk_idx, em_tensor* topk_weight) {
  EM_TRY(check_backend(b));
  EM_TRY(check_rank_dtype(x, "gate x", 2, EM_F32));
  EM_TRY(check_weight(weight, "gate weight", 2));
  if (cfg == nullptr) return em::fail(EM_ERR_ARG, "gate: config is NULL");
  const int64_t T = x->shape[0], E = weight->shape[0];
  if (weight->shape[1] != x->shape[1])
    return em::fail(EM_ERR_SHAPE, "gate weight: %lld columns, x has %lld", static_cast<long long>(weight->shape[1]),
                    static_cast<long long>(x->shape[1]));
  if (bias != nullptr) {
    EM_TRY(check_rank_dtype(bias, "gate bias", 1, EM_F32));
    if (bias->shape[0] != E) return em::fail(EM_ERR_SHAPE, "gate bias: expected %lld values", static_cast<long long>(E));
  }
  if (cfg->score_func != EM_SCORE_SOFTMAX && cfg->score_func != EM_SCORE_SIGMOID)
    return em::fail(EM_ERR_ARG, "gate: unknown score_func %d", static_cast<int>(cfg->score_func));
  if (cfg->topk_method != EM_TOPK_GREEDY && cfg->topk_method != EM_TOPK_GROUP_LIMITED_GREEDY &&
      cfg->topk_method != EM_TOPK_NOAUX_TC)
    return em::fail(EM_ERR_ARG, "gate: unknown topk_method %d", static_cast<int>(cfg->topk_method));
  if (cfg->top_k < 1 || cfg->top_k > E)
    return em::fail(EM_ERR_ARG, "gate: top_k %d not in [1, %lld]", cfg->top_k, static_cast<long long>(E));
  if (cfg->topk_method == EM_TOPK_NOAUX_TC && bias == nullptr)
    return em::fail(EM_ERR_ARG, "gate: noaux_tc needs e_score_correction_bias");
  if (cfg->topk_method != EM_TOPK_GREEDY && cfg->n_group > 1) {
    if (E % cfg->n_group != 0)
      return em::fail(EM_ERR_ARG, "gate: %lld experts not divisible by n_group %d", static_cast<long long>(E), cfg->n_group);
    if (cfg->topk_group < 1 || cfg->topk_group > cfg->n_group)
      return em::fail(EM_ERR_ARG, "gate: topk_group %d not in [1, n_group %d]", cfg->topk_group, cfg->n_group);
    if (cfg->top_k > cfg->topk_group * (E / cfg->n_group))
      return em::fail(EM_ERR_ARG, "gate: top_k %d exceeds the experts in topk_group groups", cfg->top_k);
  }
  if (cfg->n_group < 1) return em::fail(EM_ERR_ARG, "gate: n_group must be >= 1");
  if (!std::isfinite(cfg->routed_scaling_factor)) return em::fail(EM_ERR_ARG, "gate: routed_scaling_factor not finite");
  EM_TRY(check_rank_dtype(topk_idx, "gate topk_idx", 2, EM_I32));
  EM_TRY(check_rank_dtype(topk_weight, "gate topk_weight", 2, EM_F32));
  EM_TRY(check_shape2(topk_idx, "gate topk_idx", T, cfg->top_k));
  EM_TRY(check_shape2(topk_weight, "gate topk_weight", T, cfg->top_k));
  EM_TRY(check_supported(b, EM_OP_GATE, weight->dtype));
  return b->iface->gate(b->ctx, x, weight, bias, cfg, topk_idx, topk_weight);
}

extern "C" em_status em_convert(em_backend* b, const em_tensor* src, em_tensor* dst) {
  EM_TRY(check_backend(b));
  EM_TRY(check_view(src, "convert src"));
  EM_TRY(check_view(dst, "convert dst"));
  if (src->ndim != dst->ndim) return em::fail(EM_ERR_SHAPE, "convert: src and dst ranks differ");
  for (int i = 0; i < src->ndim; ++i) {
    if (src->shape[i] != dst->shape[i]) return em::fail(EM_ERR_SHAPE, "convert: src and dst shapes differ at dim %d", i);
  }
  if (!is_weight_dtype(src->dtype)) return em::fail(EM_ERR_DTYPE, "convert src: %s not convertible", em_dtype_name(src->dtype));
  if (dst->dtype != EM_F32 && dst->dtype != EM_BF16 && dst->dtype != EM_F16 && dst->dtype != EM_F8_E4M3)
    return em::fail(EM_ERR_DTYPE, "convert dst: expected f32, bf16, f16 or fp8, got %s", em_dtype_name(dst->dtype));
  if (dst->dtype == EM_F8_E4M3) {
    // Quantizing: one whole weight, its scales written to dst->scale.
    if (src->dtype == EM_F8_E4M3) return em::fail(EM_ERR_DTYPE, "convert: src is fp8 already");
    if (dst->ndim > 2) return em::fail(EM_ERR_SHAPE, "convert: fp8 dst must be 1-D or 2-D (one weight)");
    EM_TRY(check_weight(dst, "convert dst", dst->ndim));
    if (std::strcmp(b->iface->name, "cpu") != 0)
      return em::fail(EM_ERR_UNSUPPORTED, "convert: quantizing to fp8 runs on the cpu backend only, not %s", b->iface->name);
  }
  if (src->dtype == EM_F8_E4M3) {
    if (src->ndim > 2) return em::fail(EM_ERR_SHAPE, "convert: fp8 src must be 1-D or 2-D (one weight)");
    EM_TRY(check_weight(src, "convert src", src->ndim));
  }
  if (dst->ndim > 2 || src->ndim > 2) {
    // Higher ranks convert as [prod(outer), inner] and so must be contiguous.
    for (int i = 0; i + 1 < src->ndim; ++i) {
      if (src->stride[i] != src->shape[i + 1] * src->stride[i + 1] || dst->stride[i] != dst->shape[i + 1] * dst->stride[i + 1])
        return em::fail(EM_ERR_SHAPE, "convert: tensors of rank > 2 must be contiguous");
    }
  }
  EM_TRY(check_supported(b, EM_OP_CONVERT, src->dtype));
  return b->iface->convert(b->ctx, src, dst);
}

extern "C" em_status em_sample(em_backend* b, const em_sample_args* a) {
  EM_TRY(check_backend(b));
  if (a == nullptr) return em::fail(EM_ERR_ARG, "sample: args is NULL");
  EM_TRY(check_rank_dtype(a->logits, "sample logits", 2, EM_F32));
  const int64_t T = a->logits->shape[0];
  if (a->logits->shape[1] < 1) return em::fail(EM_ERR_SHAPE, "sample logits: vocabulary is empty");
  if (T > 0 && (a->temperature == nullptr || a->out_tokens == nullptr))
    return em::fail(EM_ERR_ARG, "sample: temperature and out_tokens are required");
  for (int64_t t = 0; t < T; ++t) {
    if (!std::isfinite(a->temperature[t])) return em::fail(EM_ERR_ARG, "sample: temperature[%lld] not finite", static_cast<long long>(t));
    if (a->temperature[t] <= 0.0f) continue;
    if (a->uniform == nullptr) return em::fail(EM_ERR_ARG, "sample: uniform is required when temperature > 0");
    if (!(a->uniform[t] >= 0.0f && a->uniform[t] < 1.0f))
      return em::fail(EM_ERR_ARG, "sample: uniform[%lld] not in [0, 1)", static_cast<long long>(t));
    if (a->top_p != nullptr && !(a->top_p[t] > 0.0f))
      return em::fail(EM_ERR_ARG, "sample: top_p[%lld] must be > 0", static_cast<long long>(t));
    if (a->min_p != nullptr && !(a->min_p[t] >= 0.0f && a->min_p[t] <= 1.0f))
      return em::fail(EM_ERR_ARG, "sample: min_p[%lld] not in [0, 1]", static_cast<long long>(t));
  }
  EM_TRY(check_supported(b, EM_OP_SAMPLE, EM_F32));
  return b->iface->sample(b->ctx, a);
}

extern "C" em_status em_logprobs(em_backend* b, const em_logprobs_args* a) {
  EM_TRY(check_backend(b));
  if (a == nullptr) return em::fail(EM_ERR_ARG, "logprobs: args is NULL");
  EM_TRY(check_rank_dtype(a->logits, "logprobs logits", 2, EM_F32));
  const int64_t T = a->logits->shape[0], V = a->logits->shape[1];
  if (V < 1) return em::fail(EM_ERR_SHAPE, "logprobs logits: vocabulary is empty");
  if (a->ids == nullptr || a->logprob == nullptr) return em::fail(EM_ERR_ARG, "logprobs: ids and logprob are required");
  if (a->k < 0 || a->k > V) return em::fail(EM_ERR_ARG, "logprobs: k = %d not in [0, %lld]", a->k, static_cast<long long>(V));
  if (a->k > 0 && (a->top_ids == nullptr || a->top_logprobs == nullptr))
    return em::fail(EM_ERR_ARG, "logprobs: top_ids and top_logprobs are required when k > 0");
  for (int64_t t = 0; t < T; ++t) {
    if (a->ids[t] < 0 || a->ids[t] >= V)
      return em::fail(EM_ERR_ARG, "logprobs: ids[%lld] = %d outside the vocabulary", static_cast<long long>(t), a->ids[t]);
  }
  EM_TRY(check_supported(b, EM_OP_LOGPROBS, EM_F32));
  return b->iface->logprobs(b->ctx, a);
}

extern "C" int64_t em_wire_bytes(em_wire_dtype dtype, int64_t rows, int64_t dim) {
  const int64_t n = rows * dim;
  switch (dtype) {
    case EM_WIRE_BF16: return 2 * n;
    case EM_WIRE_F32: return 4 * n;
    case EM_WIRE_FP8: return n + 4 * rows * ((dim + EM_FP8_BLOCK - 1) / EM_FP8_BLOCK);
  }
  return -1;
}

namespace {
em_status check_wire_dtype(em_wire_dtype d, const char* op) {
  if (d != EM_WIRE_BF16 && d != EM_WIRE_FP8 && d != EM_WIRE_F32)
    return em::fail(EM_ERR_DTYPE, "%s: unknown wire dtype %d (1 bf16, 2 fp8, 3 f32)", op, static_cast<int>(d));
  return EM_OK;
}
}  // namespace

extern "C" em_status em_wire_pack(em_backend* b, const em_wire_pack_args* a) {
  EM_TRY(check_backend(b));
  if (a == nullptr) return em::fail(EM_ERR_ARG, "wire_pack: args is NULL");
  EM_TRY(check_rank_dtype(a->x, "wire_pack x", 2, EM_F32));
  EM_TRY(check_wire_dtype(a->dtype, "wire_pack"));
  const int64_t x_rows = a->x->shape[0], dim = a->x->shape[1];
  if (a->rows < 0) return em::fail(EM_ERR_ARG, "wire_pack: rows < 0");
  if (a->row_index == nullptr) {
    if (a->rows != x_rows)
      return em::fail(EM_ERR_SHAPE, "wire_pack: %lld rows but x has %lld (or pass row_index)",
                      static_cast<long long>(a->rows), static_cast<long long>(x_rows));
  } else {
    for (int64_t i = 0; i < a->rows; ++i) {
      if (a->row_index[i] < 0 || a->row_index[i] >= x_rows)
        return em::fail(EM_ERR_ARG, "wire_pack: row_index[%lld] = %d outside x's %lld rows", static_cast<long long>(i),
                        a->row_index[i], static_cast<long long>(x_rows));
    }
  }
  const int64_t want = em_wire_bytes(a->dtype, a->rows, dim);
  if (a->out_bytes != want)
    return em::fail(EM_ERR_SHAPE, "wire_pack: out has %lld bytes, %lld rows of %lld need %lld",
                    static_cast<long long>(a->out_bytes), static_cast<long long>(a->rows), static_cast<long long>(dim),
                    static_cast<long long>(want));
  if (a->out == nullptr && want > 0) return em::fail(EM_ERR_ARG, "wire_pack: out is NULL");
  EM_TRY(check_supported(b, EM_OP_WIRE_PACK, EM_F32));
  return b->iface->wire_pack(b->ctx, a);
}

extern "C" em_status em_wire_unpack(em_backend* b, const em_wire_unpack_args* a) {
  EM_TRY(check_backend(b));
  if (a == nullptr) return em::fail(EM_ERR_ARG, "wire_unpack: args is NULL");
  EM_TRY(check_rank_dtype(a->y, "wire_unpack y", 2, EM_F32));
  EM_TRY(check_wire_dtype(a->dtype, "wire_unpack"));
  const int64_t y_rows = a->y->shape[0], dim = a->y->shape[1];
  if (a->rows < 0) return em::fail(EM_ERR_ARG, "wire_unpack: rows < 0");
  if (a->out_index == nullptr) {
    if (a->rows > y_rows)
      return em::fail(EM_ERR_SHAPE, "wire_unpack: %lld rows but y has %lld (or pass out_index)",
                      static_cast<long long>(a->rows), static_cast<long long>(y_rows));
  } else {
    for (int64_t i = 0; i < a->rows; ++i) {
      if (a->out_index[i] < 0 || a->out_index[i] >= y_rows)
        return em::fail(EM_ERR_ARG, "wire_unpack: out_index[%lld] = %d outside y's %lld rows", static_cast<long long>(i),
                        a->out_index[i], static_cast<long long>(y_rows));
    }
  }
  const int64_t want = em_wire_bytes(a->dtype, a->rows, dim);
  if (a->in_bytes != want)
    return em::fail(EM_ERR_SHAPE, "wire_unpack: in has %lld bytes, %lld rows of %lld need %lld",
                    static_cast<long long>(a->in_bytes), static_cast<long long>(a->rows), static_cast<long long>(dim),
                    static_cast<long long>(want));
  if (a->in == nullptr && want > 0) return em::fail(EM_ERR_ARG, "wire_unpack: in is NULL");
  EM_TRY(check_supported(b, EM_OP_WIRE_UNPACK, EM_F32));
  return b->iface->wire_unpack(b->ctx, a);
}
