/*
 * expertmesh native engine: the CUDA backend's extra entry points (ops.h has the ops).
 *
 * Build: configure shards/ with -DEM_CUDA=ON (or AUTO, the default, when CMake finds nvcc;
 * scripts/cuda-toolkit.sh provisions one from PyPI wheels). Without CUDA these functions
 * still exist: em_cuda_compiled() returns 0 and em_backend_create_cuda() answers
 * EM_ERR_UNSUPPORTED, so callers need no #ifdef.
 *
 * Memory contract of the CUDA backend (stricter than "device memory only", so the same
 * caller code and the parity tests work unchanged):
 * - Tensor data (em_tensor.data and an fp8 tensor's scale) may be device memory
 *   (em_cuda_malloc, cudaMalloc, managed) or host memory. Host memory is staged: copied to
 *   the device for the op and, for outputs, back. That is correct but slow; production
 *   callers keep weights and activations on the device.
 * - The small index arrays of an op's arguments (expert_offsets, x_index, out_index,
 *   row_weight, positions) are host memory, as for the CPU backend: the dispatcher
 *   validates them on the host, and the CUDA backend plans its launches from them.
 * - Ops are synchronous: they return when their results are in place.
 *
 * What it runs: em_supports_op() answers per op and weight dtype. Today: matmul, moe_ffn,
 * gate (f32, bf16, f16 and fp8 e4m3 block-scaled weights), rmsnorm, silu_mul, rope, convert
 * (every source dtype), mla_attention (f32, bf16, f16, fp8 wkv_b; f32 or bf16 caches).
 * Not yet: sample, the wire codec.
 *
 * Precision of the GEMMs against the CPU backend (which computes in fp32 on the exact weight
 * values): f32 weights run fp32 GEMMs; bf16/f16 weights round the activations to their dtype
 * for tensor cores. fp8 weights (128x128 weight_scale_inv blocks): GEMMs of up to 8 rows
 * (decode) read the fp8 bytes directly and compute in fp32 on the exact weight values (matmul:
 * fp32 activations; moe_ffn: bf16 activations); more rows dequantize the weight to bf16 and
 * run bf16 tensor-core GEMMs. The gate converts any weight to f32 and runs an fp32 GEMM.
 * Opt-in, sm_90+: EM_CUDA_FP8_LT ($EM_CUDA_FP8_GEMM=lt) quantizes the activations to fp8 too
 * and runs cuBLASLt's block-scaled fp8 GEMM (see em_cuda_fp8_gemm).
 *
 * mla_attention (cuda/attention.cu): the two absorption GEMMs follow the rule above (fp8
 * wkv_b is dequantized to bf16 first, as DeepSeek's reference does). Attention over a bf16
 * cache with kv_lora_rank 512 and rope dims 64 (DeepSeek V2/V3) runs on tensor cores, with
 * q_lat and the softmax weights rounded to bf16 (as FlashMLA); other dims and f32 caches run
 * in fp32. $EM_CUDA_MLA=simt forces the fp32 kernel for every cache; =wgmma (opt-in, compute
 * capability 9.0 with an sm_90a build) runs the bf16 caches on a wgmma kernel instead of the
 * mma.sync one: written, compile-checked and in the parity suite, not yet run on a GPU.
 */
#ifndef EXPERTMESH_CUDA_H
#define EXPERTMESH_CUDA_H

#include "expertmesh/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum em_cuda_moe_gemm {
  EM_CUDA_MOE_AUTO = 0,    /* $EM_CUDA_MOE_GEMM ("loop" | "grouped" | "cutlass"), else per call: grouped for
                              bf16/f16 experts of under 64 rows each on average, else the loop; fp8
                              experts as EM_CUDA_MOE_CUTLASS where its blockwise fp8 kernel can run
                              (sm_90a build with CUTLASS, compute capability 9.0, whole 128 x 128
                              blocks; not with EM_CUDA_FP8_LT), else the loop */
  EM_CUDA_MOE_LOOP = 1,    /* one cublasGemmEx per expert, fp32 outputs, over moe_streams streams */
  EM_CUDA_MOE_GROUPED = 2, /* one cublasGemmGroupedBatchedEx per phase (cuBLAS >= 12.5; bf16/f16
                              intermediates, as PyTorch's grouped_mm); f32 weights use the loop */
  EM_CUDA_MOE_CUTLASS = 3  /* the grouped mode with one CUTLASS Hopper kernel per phase: TMA,
                              warpgroup MMA, a persistent scheduler over all experts' tiles. bf16
                              experts; fp8 experts as fp8 x fp8 with their 128 x 128 block scales
                              and activations quantized per token per 128 columns (DeepSeek-V3's
                              act_quant, as EM_CUDA_FP8_LT; whole 128 blocks only, else
                              dequantized to bf16). sm_90a builds with scripts/cutlass.sh's
                              headers, on compute capability 9.0; elsewhere, or for f16, cuBLAS's
                              grouped GEMM runs (em_cuda_last_status says which ran, and why) */
} em_cuda_moe_gemm;

/* GEMMs with fp8 e4m3 block-scaled weights (matmul, and moe_ffn's experts). */
typedef enum em_cuda_fp8_gemm {
  EM_CUDA_FP8_AUTO = 0,     /* $EM_CUDA_FP8_GEMM ("lt" | "default"), else default */
  EM_CUDA_FP8_DEFAULT = 1,  /* f32/bf16 activations: the skinny fp8 kernel up to 8 rows, else
                               weights dequantized to bf16 for cuBLAS (see the precision notes) */
  EM_CUDA_FP8_LT = 2        /* DeepSeek-V3 inference's fp8 GEMM: activations quantized per token
                               per 128 columns to e4m3 (scale = amax / 448, as DeepSeek's act_quant),
                               then cuBLASLt's block-scaled fp8 x fp8 tensor-core GEMM (1x128
                               activation scales, the weights' 128x128 weight_scale_inv), fp32
                               accumulation. sm_90+ with cuBLASLt >= 12.9 only, K a multiple of 128,
                               weight rows 16-byte aligned; otherwise, or when cuBLASLt has no
                               algorithm, that GEMM runs the default path. moe_ffn runs its experts
                               in a loop (the grouped mode does too). em_cuda_last_status() says
                               after each such GEMM which path ran ("fp8 lt: cublasLt ..." or
                               "fp8 lt: fallback ...: why"); each distinct reason for a fallback is
                               also printed once to stderr. Against the CPU backend this costs the
                               activations' e4m3 rounding (a few % of the largest output). */
} em_cuda_fp8_gemm;

typedef struct em_cuda_config {
  int32_t device;           /* CUDA device ordinal */
  em_cuda_moe_gemm moe_gemm;
  em_cuda_fp8_gemm fp8_gemm;  /* 0 (AUTO): $EM_CUDA_FP8_GEMM */
  int32_t moe_streams;        /* streams moe_ffn's loop spreads its experts' GEMMs over (bf16,
                                 f16, f32 weights; fp8 stays on one): 0 = $EM_CUDA_MOE_STREAMS,
                                 else EM_CUDA_MOE_STREAMS_DEFAULT; 1 = one stream; at most 32 */
  int32_t moe_fuse_gate_up;   /* an expert whose up weight (w3) directly follows its gate weight
                                 (w1) in device memory, same shape and layout (fp8: scales too,
                                 inter a multiple of 128), gets one GEMM of twice the width for
                                 both: 0 = $EM_CUDA_MOE_FUSE ("0" turns it off), else on;
                                 1 = on; -1 = off. The addon's resident weights are laid out so. */
} em_cuda_config;

#define EM_CUDA_MOE_STREAMS_DEFAULT 4

/* 1 if this build contains the CUDA backend. */
int em_cuda_compiled(void);
/* CUDA devices the driver reports: 0 without a driver, a device, or the CUDA build. On 0,
 * em_cuda_last_status() says why ("no CUDA device", "driver too old", ...). */
int em_cuda_device_count(void);
const char* em_cuda_last_status(void);

/* Creates a CUDA backend on cfg->device (NULL: device 0). EM_ERR_UNSUPPORTED without the
 * CUDA build or without a usable device. Backend info: name "cuda", isa "sm_XY", and
 * num_threads the device's multiprocessor count. */
em_status em_backend_create_cuda(const em_cuda_config* cfg, em_backend** out);

/* Creates a backend from a device string: "cpu", "cuda" (device 0) or "cuda:N". */
em_status em_backend_create_device(const char* device, em_backend** out);

/* Device memory of a CUDA backend's device (em_cuda_free releases it). */
em_status em_cuda_malloc(em_backend* b, size_t bytes, void** out);
em_status em_cuda_free(em_backend* b, void* ptr);
/* Copies bytes between any two of host and device memory (unified addressing). */
em_status em_cuda_copy(em_backend* b, void* dst, const void* src, size_t bytes);
/* Copies n byte ranges of host memory src into device memory dst at the same offsets:
 * dst[offsets[i] .. offsets[i] + lengths[i]) = src[the same] for each i (ranges may overlap:
 * they carry the same bytes). Several ranges travel as one packed copy through pinned memory
 * and a scatter kernel: the addon's KV pool mirror flushes a step's new rows with it. */
em_status em_cuda_copy_ranges(em_backend* b, void* dst, const void* src, const size_t* offsets, const size_t* lengths,
                              size_t n);
/* Waits for all work queued by the backend. */
em_status em_cuda_synchronize(em_backend* b);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* EXPERTMESH_CUDA_H */
