/*
 * expertmesh native engine: the one C interface every backend implements.
 *
 * Callers build tensor *views* (em_tensor) over memory they own, create a backend
 * (CPU today, CUDA later), ask `em_supports_op`, and call the op functions below. The
 * dispatcher (backend.cpp) validates shapes and dtypes once for all backends, then calls
 * the backend's op table (em_backend_iface). Every op returns an em_status; on failure
 * `em_last_error()` holds a one-line explanation for the calling thread.
 *
 * Conventions (they follow DeepSeek's reference `inference/model.py`):
 * - Linear weights are stored [out_features, in_features] (torch.nn.Linear); y = x W^T.
 * - Activations are fp32; weights may be bf16, fp16, fp32 or fp8 e4m3 (with 128x128
 *   `weight_scale_inv` blocks); all accumulation is fp32.
 * - Shapes are listed outermost first, e.g. [tokens, dim].
 */
#ifndef EXPERTMESH_OPS_H
#define EXPERTMESH_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EM_ABI_VERSION 4
#define EM_MAX_DIMS 4
/* fp8 checkpoints quantize weights in 128x128 blocks (DeepSeek-V3 `block_size`). */
#define EM_FP8_BLOCK 128

/* ---------------------------------------------------------------- tensors */

typedef enum em_dtype {
  EM_F32 = 0,
  EM_BF16 = 1,
  EM_F16 = 2,
  EM_F8_E4M3 = 3, /* float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits */
  EM_I32 = 4,
  EM_DTYPE_COUNT = 5
} em_dtype;

/*
 * A strided view of memory the caller owns. The innermost dimension is contiguous
 * (stride[ndim-1] == 1); outer strides are in elements and may be larger than the
 * shape implies (views into a wider row, e.g. q_pe inside q). For an fp8 weight
 * [rows, cols], `scale` points at the weight_scale_inv block of element (0, 0) of the
 * view, and element (r, c) is fp8(r, c) * scale[(r / 128) * scale_stride + c / 128];
 * a view must therefore start on a 128-block boundary of its parent tensor.
 * Memory must be reachable by the backend the tensor is passed to (host memory for CPU,
 * device memory for CUDA).
 */
typedef struct em_tensor {
  void* data;
  em_dtype dtype;
  int32_t ndim;
  int64_t shape[EM_MAX_DIMS];
  int64_t stride[EM_MAX_DIMS];
  const float* scale;   /* fp8 only: weight_scale_inv, [ceil(rows/128), ceil(cols/128)] */
  int64_t scale_stride; /* fp8 only: blocks per scale row (ceil(parent cols / 128)) */
} em_tensor;

/* A contiguous 1-D/2-D/3-D view (strides derived from the shape). */
em_tensor em_tensor_1d(void* data, em_dtype dtype, int64_t n);
em_tensor em_tensor_2d(void* data, em_dtype dtype, int64_t rows, int64_t cols);
em_tensor em_tensor_3d(void* data, em_dtype dtype, int64_t d0, int64_t d1, int64_t d2);
/* A contiguous fp8 weight [rows, cols] with its weight_scale_inv [ceil(rows/128), ceil(cols/128)]. */
em_tensor em_tensor_fp8(void* data, const float* scale_inv, int64_t rows, int64_t cols);
/* Bytes per element (fp8: 1). */
size_t em_dtype_size(em_dtype dtype);
const char* em_dtype_name(em_dtype dtype);

/* ----------------------------------------------------------------- status */

typedef enum em_status {
  EM_OK = 0,
  EM_ERR_SHAPE = 1,       /* shapes, strides or lengths disagree */
  EM_ERR_DTYPE = 2,       /* a dtype this operand does not accept */
  EM_ERR_ARG = 3,         /* an invalid scalar argument (eps <= 0, top_k > experts, ...) */
  EM_ERR_UNSUPPORTED = 4, /* the backend does not implement this op/dtype (see em_supports_op) */
  EM_ERR_NOMEM = 5,       /* scratch allocation failed */
  EM_ERR_INTERNAL = 6     /* a bug: please report with em_last_error() */
} em_status;

const char* em_status_name(em_status status); /* "EM_ERR_SHAPE", ... */
/* Detail of the last failure on the calling thread ("" if none). */
const char* em_last_error(void);

/* -------------------------------------------------------------------- ops */

typedef enum em_op {
  EM_OP_MATMUL = 0,
  EM_OP_RMSNORM,
  EM_OP_SILU_MUL,
  EM_OP_MOE_FFN,
  EM_OP_ROPE,
  EM_OP_MLA_ATTENTION,
  EM_OP_GATE,
  EM_OP_CONVERT,
  EM_OP_SAMPLE,
  EM_OP_WIRE_PACK,
  EM_OP_WIRE_UNPACK,
  EM_OP_LOGPROBS,
  EM_OP_COUNT
} em_op;

const char* em_op_name(em_op op); /* "matmul", "rmsnorm", ... */

/* YaRN rotary embedding (DeepSeek `precompute_freqs_cis`), applied to interleaved pairs
 * (x[2i], x[2i+1]). factor <= 1 disables YaRN: plain RoPE with `theta`. The reference
 * enables YaRN only when max_seq_len > original_max_position; callers decide and pass 1. */
typedef struct em_rope_config {
  int32_t rope_dim;              /* qk_rope_head_dim; even */
  double theta;                  /* rope_theta */
  double factor;                 /* rope_scaling.factor */
  int64_t original_max_position; /* rope_scaling.original_max_position_embeddings */
  double beta_fast;              /* rope_scaling.beta_fast (32) */
  double beta_slow;              /* rope_scaling.beta_slow (1) */
} em_rope_config;

typedef enum em_score_func { EM_SCORE_SOFTMAX = 0, EM_SCORE_SIGMOID = 1 } em_score_func;

typedef enum em_topk_method {
  EM_TOPK_GREEDY = 0,               /* top-k over all experts (groups ignored) */
  EM_TOPK_GROUP_LIMITED_GREEDY = 1, /* keep topk_group groups by max score, then top-k */
  EM_TOPK_NOAUX_TC = 2              /* needs a bias; groups scored by sum of top-2 biased scores */
} em_topk_method;

typedef struct em_gate_config {
  em_score_func score_func;
  em_topk_method topk_method;
  int32_t top_k;                /* num_experts_per_tok */
  int32_t n_group;              /* 1 = no grouping */
  int32_t topk_group;
  int32_t norm_topk_prob;       /* 1: divide the k weights by their sum */
  float routed_scaling_factor;  /* applied last, always */
} em_gate_config;

/* Grouped expert FFN: y = w2(silu(w1 x) * w3 x) for rows grouped by expert. */
typedef struct em_moe_args {
  const em_tensor* x;            /* [rows, dim] f32; rows of expert e are [offsets[e], offsets[e+1]) */
  int32_t num_experts;           /* E: experts in this call */
  const int32_t* expert_offsets; /* [E + 1], non-decreasing, offsets[E] == rows */
  const em_tensor* w1;           /* E views [inter, dim]  (gate_proj) */
  const em_tensor* w3;           /* E views [inter, dim]  (up_proj) */
  const em_tensor* w2;           /* E views [dim, inter]  (down_proj) */
  const float* row_weight;       /* [rows] routing weight per row, or NULL for 1 */
  const int32_t* out_index;      /* [rows] output row each row is added to, or NULL: row i -> i */
  int32_t accumulate;            /* 1: y += result; 0: y = result (rows never hit become 0) */
  em_tensor* y;                  /* [rows or num_out, dim] f32 */
  const int32_t* x_index;        /* [rows] row of x each grouped row reads (a gather, so callers need not
                                    copy rows into expert order), or NULL: grouped row i is x row i. With
                                    x_index, rows = expert_offsets[E] and x may hold any number of rows. */
} em_moe_args;

/* A paged latent cache (vLLM's blocks): the rows of every sequence of a batch in
 * fixed-size blocks of one pool, each sequence reading its blocks through its block table.
 * Row layout by dtype (em_kv_row_bytes gives the size):
 * - EM_F32, EM_BF16: the C + dr elements of the contiguous cache row;
 * - EM_F8_E4M3 (DeepSeek FlashMLA's fp8 layout): C e4m3 codes of the latent, then
 *   ceil(C / 128) f32 scales (latent element c = fp8(c) * scale[c / 128]), then the dr
 *   elements of the rotated k_pe in bf16. */
typedef struct em_kv_pages {
  const void* pool;              /* [num_blocks, block_size] rows */
  em_dtype dtype;                /* EM_F32, EM_BF16 or EM_F8_E4M3 */
  int64_t num_blocks;
  int32_t block_size;            /* rows per block (>= 1) */
  const int32_t* block_table;    /* every sequence's blocks, each sequence's in position order */
  const int32_t* table_offsets;  /* [num_seqs + 1]: sequence s holds block_table[off[s] .. off[s+1]) */
} em_kv_pages;

/* Bytes of one latent cache row of `dtype` in a paged cache (see em_kv_pages). */
size_t em_kv_row_bytes(em_dtype dtype, int32_t kv_lora_rank, int32_t rope_dim);

/* MLA attention in DeepSeek's absorbed form over the compressed latent cache.
 * For query token t of head h: q_lat = q_nope W_uk[h] (W_uk[h] = wkv_b rows of head h's
 * k part, [dn, C]); score(s) = (q_lat . latent[s] + q_pe . pe[s]) * softmax_scale for
 * cache rows s <= positions[t]; o_lat = softmax(score) @ latent; out = W_uv[h] o_lat. */
typedef struct em_mla_args {
  int32_t num_heads;        /* H */
  int32_t qk_nope_head_dim; /* dn */
  int32_t qk_rope_head_dim; /* dr */
  int32_t v_head_dim;       /* dv */
  int32_t kv_lora_rank;     /* C */
  float softmax_scale;      /* see em_mla_softmax_scale */
  const em_tensor* q;       /* [T, H, dn + dr] f32; the dr part already rotated */
  const int32_t* positions; /* [T] cache row of each query token; it sees rows [0, pos], which
                               must already hold this step's tokens (write the cache first) */
  int32_t num_seqs;         /* sequences in the batch (>= 1) */
  const int32_t* q_offsets; /* [num_seqs + 1] token ranges per sequence; NULL if num_seqs == 1 */
  const em_tensor* caches;  /* num_seqs views [S_s, C + dr] f32 or bf16: kv_norm(latent) | rope(k_pe);
                               NULL when `pages` holds the rows */
  const em_tensor* wkv_b;   /* [H * (dn + dv), C] weight, any weight dtype */
  em_tensor* out;           /* [T, H, dv] f32 */
  const em_kv_pages* pages; /* the rows in a paged cache instead of `caches` (NULL: caches). A
                               backend that does not read these pages itself
                               (em_backend_iface.reads_pages) gets them gathered into
                               contiguous caches by the dispatcher. */
} em_mla_args;

/* Sampling per row of logits: temperature <= 0 is greedy (argmax, lowest index on ties);
 * otherwise softmax(logits / temperature), keep the tokens at least min_p times as likely
 * as the most likely one (min_p <= 0: all; vLLM's min_p), of those the top_k most likely
 * (top_k <= 0: all), then the smallest most-likely prefix whose mass reaches top_p
 * (top_p >= 1: all), renormalize, and pick by inverse CDF with the caller's uniform number
 * u: the kept tokens are walked from most to least likely (ties: lower id first) when
 * top_k or top_p cut, else in vocabulary order (same distribution, no full sort).
 * Deterministic for a given u. A row with nothing to pick gets -1: a NaN or +inf among its
 * logits (numbers that overflowed upstream), or every logit -inf. */
typedef struct em_sample_args {
  const em_tensor* logits;  /* [T, V] f32 */
  const float* temperature; /* [T] */
  const int32_t* top_k;     /* [T] or NULL (all) */
  const float* top_p;       /* [T] or NULL (1) */
  const float* uniform;     /* [T] in [0, 1); may be NULL when every temperature <= 0 */
  int32_t* out_tokens;      /* [T] */
  const float* min_p;       /* [T] in [0, 1], or NULL (0) */
} em_sample_args;

/* Log-probabilities per row of logits [T, V] (log-softmax: exponentials in float, their sum
 * in double; within ~1e-6 of an all-double computation): the logprob of
 * token ids[t] and the k most likely tokens, highest first, lower id on ties. Rows whose
 * logits are all -inf give -inf. */
typedef struct em_logprobs_args {
  const em_tensor* logits; /* [T, V] f32 */
  const int32_t* ids;      /* [T], each in [0, V) */
  int32_t k;               /* 0 <= k <= V */
  double* logprob;         /* [T] */
  int32_t* top_ids;        /* [T, k]; may be NULL when k == 0 */
  double* top_logprobs;    /* [T, k]; may be NULL when k == 0 */
} em_logprobs_args;

/* Activations on the wire (docs/wire-format.md): the dtype codes of a frame header. */
typedef enum em_wire_dtype { EM_WIRE_BF16 = 1, EM_WIRE_FP8 = 2, EM_WIRE_F32 = 3 } em_wire_dtype;

/* Rows of f32 activations to their wire bytes (little-endian, any alignment):
 * - bf16: u16[rows * dim], round to nearest even (NaN stays a quiet NaN);
 * - fp8: u8[rows * dim] e4m3 codes, then f32[rows * ceil(dim / 128)] scales; per (row,
 *   128-block) scale = max|x| / 448 (1 when the block is all zeros; NaN ignored), computed
 *   in double and stored as f32, and code = e4m3(f32(x * (1 / scale))) with the product in
 *   double (round to nearest even, saturating at 448, NaN -> 0x7f), exactly as the
 *   TypeScript reference (src/moe/wire.ts) does;
 * - f32: the values as they are. */
typedef struct em_wire_pack_args {
  const em_tensor* x;       /* [x_rows, dim] f32 */
  const int32_t* row_index; /* [rows] row of x for each packed row (a gather), or NULL: rows = x_rows */
  int64_t rows;
  em_wire_dtype dtype;
  uint8_t* out;             /* em_wire_bytes(dtype, rows, dim) bytes */
  int64_t out_bytes;
  uint32_t* crc;            /* or NULL. In: CRC-32 of the frame bytes before `out`; out: through `out` */
} em_wire_pack_args;

/* Wire bytes back to f32 rows: y[out_index[r]] (+)= value of row r. fp8 values are
 * code value * scale in f32. With crc, the CRC-32 of `in` is folded in while its bytes
 * are in cache (so a receiver checks a frame in the same pass that converts it). */
typedef struct em_wire_unpack_args {
  const uint8_t* in; /* em_wire_bytes(dtype, rows, dim) bytes, any alignment */
  int64_t in_bytes;
  em_wire_dtype dtype;
  int64_t rows;
  em_tensor* y;              /* [y_rows, dim] f32 */
  const int32_t* out_index;  /* [rows] row of y for each row, or NULL: row r -> y row r */
  int32_t accumulate;        /* 1: y += value; 0: y = value (other rows of y untouched) */
  uint32_t* crc;             /* or NULL. In: CRC-32 of the frame bytes before `in`; out: through `in` */
} em_wire_unpack_args;

/* ---------------------------------------------------------------- backends */

typedef struct em_backend_info {
  const char* name;    /* "cpu", later "cuda" */
  const char* isa;     /* cpu: "scalar" | "avx2" | "avx512" | "avx512bf16" */
  int32_t num_threads; /* worker threads including the caller */
  int32_t batch_invariant; /* cpu: em_cpu_config::batch_invariant */
} em_backend_info;

/*
 * The op table a backend fills in (ggml-style). Inputs reaching these functions were
 * already validated by the dispatcher. `ctx` is the backend's private state.
 */
typedef struct em_backend_iface {
  const char* name;
  void (*destroy)(void* ctx);
  void (*info)(void* ctx, em_backend_info* out);
  /* Whether `op` runs with weights (or, for convert, source) of dtype `dtype`. */
  int (*supports_op)(void* ctx, em_op op, em_dtype dtype);
  em_status (*matmul)(void* ctx, const em_tensor* x, const em_tensor* w, em_tensor* y);
  em_status (*rmsnorm)(void* ctx, const em_tensor* x, const em_tensor* weight, float eps, em_tensor* y);
  em_status (*silu_mul)(void* ctx, const em_tensor* gate, const em_tensor* up, em_tensor* y);
  em_status (*moe_ffn)(void* ctx, const em_moe_args* args);
  em_status (*rope)(void* ctx, em_tensor* x, const int32_t* positions, const em_rope_config* cfg);
  em_status (*mla_attention)(void* ctx, const em_mla_args* args);
  em_status (*gate)(void* ctx, const em_tensor* x, const em_tensor* weight, const em_tensor* bias,
                    const em_gate_config* cfg, em_tensor* topk_idx, em_tensor* topk_weight);
  em_status (*convert)(void* ctx, const em_tensor* src, em_tensor* dst);
  em_status (*sample)(void* ctx, const em_sample_args* args);
  em_status (*wire_pack)(void* ctx, const em_wire_pack_args* args);
  em_status (*wire_unpack)(void* ctx, const em_wire_unpack_args* args);
  em_status (*logprobs)(void* ctx, const em_logprobs_args* args);
  /* 1 if mla_attention reads these pages itself (else the dispatcher gathers them into
   * contiguous host caches first); NULL: never. The CPU backend reads every pool; the CUDA
   * backend one in its device's memory (the addon's device mirror of a KV pool). */
  int (*reads_pages)(void* ctx, const em_kv_pages* pages);
} em_backend_iface;

typedef struct em_backend {
  const em_backend_iface* iface;
  void* ctx;
} em_backend;

typedef enum em_cpu_isa {
  EM_ISA_AUTO = 0, /* $EM_CPU_ISA if set and supported, else the best the CPU supports short of
                      AVX512_BF16 and AMX (which round x: opt-in) */
  EM_ISA_SCALAR = 1,
  EM_ISA_AVX2 = 2,       /* AVX2 + FMA + F16C */
  EM_ISA_AVX512 = 3,     /* AVX-512 F/BW/VL */
  EM_ISA_AVX512_BF16 = 4, /* AVX-512 + AVX512_BF16 (bf16 dot products; x rounded to bf16) */
  EM_ISA_AMX = 5          /* AVX512_BF16 + AMX-BF16 tiles for bf16-weight GEMMs (x rounded to bf16) */
} em_cpu_isa;

typedef struct em_cpu_config {
  em_cpu_isa isa;      /* EM_ISA_AUTO normally; a specific ISA for tests and benchmarks */
  int32_t num_threads; /* 0: $EM_NUM_THREADS, else the hardware concurrency */
  /* 1: batch-invariant. Every op computes each row (attention: each query token of a sequence)
     in an order fixed by that row alone, so a row's result is the same bits whatever other
     rows or sequences share the call and however a sequence's tokens are split into calls:
     one nt GEMM kernel for every row count with fixed panels over k, no AMX, MLA attention
     always absorbed, split at fixed multiples of rows. Slower (docs/adr/0027). */
  int32_t batch_invariant;
} em_cpu_config;

/* Best ISA this CPU (and OS) supports. */
em_cpu_isa em_cpu_best_isa(void);
const char* em_cpu_isa_name(em_cpu_isa isa);
/* Parses "scalar" | "avx2" | "avx512" | "avx512bf16" | "amx" | "auto"; returns -1 if unknown. */
int em_cpu_isa_parse(const char* name);

/* The CPU backend's scratch arrays of 1 MiB or more are kept, when freed, in a cache of the
 * thread that freed them, for its next calls (ADR 0025): memory stays at the largest call's
 * peak. em_scratch_cached_bytes: what every thread's cache holds; em_scratch_trim frees it
 * all (from any thread, while calls run too) and returns the bytes freed. */
size_t em_scratch_cached_bytes(void);
size_t em_scratch_trim(void);

/* Creates a CPU backend; EM_ERR_UNSUPPORTED if the requested ISA is not available here. */
em_status em_backend_create_cpu(const em_cpu_config* cfg, em_backend** out);
void em_backend_free(em_backend* backend);
void em_backend_get_info(const em_backend* backend, em_backend_info* out);
int em_supports_op(const em_backend* backend, em_op op, em_dtype dtype);

/* ------------------------------------------------------ op entry points */

/* y[M, N] = x[M, K] w[N, K]^T. x f32; w f32 | bf16 | f16 | fp8; y f32. */
em_status em_matmul(em_backend* b, const em_tensor* x, const em_tensor* w, em_tensor* y);

/* y[M, D] = x * rsqrt(mean(x^2) + eps) * weight[D]. weight f32 | bf16 | f16; y may be x. */
em_status em_rmsnorm(em_backend* b, const em_tensor* x, const em_tensor* weight, float eps, em_tensor* y);

/* y[M, N] = silu(gate) * up, silu(g) = g / (1 + exp(-g)). y may alias gate or up. */
em_status em_silu_mul(em_backend* b, const em_tensor* gate, const em_tensor* up, em_tensor* y);

/* Grouped expert FFN for many experts in one call; see em_moe_args. */
em_status em_moe_ffn(em_backend* b, const em_moe_args* args);

/* Rotates x in place: x is [T, rope_dim] or [T, H, rope_dim] f32 (strided views allowed). */
em_status em_rope(em_backend* b, em_tensor* x, const int32_t* positions, const em_rope_config* cfg);

/* MLA attention (prefill and decode alike); see em_mla_args. */
em_status em_mla_attention(em_backend* b, const em_mla_args* args);

/* Router: logits = x[T, D] weight[E, D]^T in fp32, scores = softmax | sigmoid, selection
 * (+ bias for selection only), weights from the unbiased scores, optional renormalization,
 * times routed_scaling_factor. topk_idx [T, k] i32 and topk_weight [T, k] f32, ordered by
 * selection score, highest first. bias: [E] f32 or NULL. */
em_status em_gate(em_backend* b, const em_tensor* x, const em_tensor* weight, const em_tensor* bias,
                  const em_gate_config* cfg, em_tensor* topk_idx, em_tensor* topk_weight);

/* Copies src into dst (same shape) converting dtype: f32 <-> bf16 | f16 (round to nearest
 * even), bf16 | f16 | fp8 -> f32 | bf16 (fp8 dequantized with its block scales), and (cpu
 * backend only) f32 | bf16 | f16 -> fp8: one whole 1-D or 2-D weight quantized per 128x128
 * block as DeepSeek-V3's fp8 weights are stored, its weight_scale_inv written to dst->scale
 * (scale = max|x| / 448 of the block, 1 for zeros, NaN skipped; code = e4m3(x / scale)). */
em_status em_convert(em_backend* b, const em_tensor* src, em_tensor* dst);

/* Token sampling; see em_sample_args. */
em_status em_sample(em_backend* b, const em_sample_args* args);

/* Token log-probabilities; see em_logprobs_args. */
em_status em_logprobs(em_backend* b, const em_logprobs_args* args);

/* Wire codec: activations to and from frame bytes; see em_wire_pack_args. */
em_status em_wire_pack(em_backend* b, const em_wire_pack_args* args);
em_status em_wire_unpack(em_backend* b, const em_wire_unpack_args* args);
/* Bytes of `rows` rows of width `dim` on the wire; -1 for an unknown dtype. */
int64_t em_wire_bytes(em_wire_dtype dtype, int64_t rows, int64_t dim);
/* CRC-32 as zlib computes it (reflected 0xEDB88320), continuing from `crc` (0 to start):
 * em_crc32(em_crc32(0, a), b) == crc32 of a followed by b. PCLMULQDQ folding where the
 * CPU has it, else tables. */
uint32_t em_crc32(uint32_t crc, const void* data, size_t n);

/* ----------------------------------------------------------------- helpers */

/* YaRN attention scale: 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1. */
double em_yarn_mscale(double factor, double mscale);
/* MLA softmax scale: qk_head_dim^-0.5 * yarn_mscale(factor, mscale_all_dim)^2. */
double em_mla_softmax_scale(int32_t qk_head_dim, double factor, double mscale_all_dim);
/* Fills inv_freq[rope_dim / 2] with the (YaRN-corrected) rotary frequencies. */
void em_rope_inv_freq(const em_rope_config* cfg, float* inv_freq);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* EXPERTMESH_OPS_H */
