// Types of the native addon expertmesh.node (shards/addon/addon.cpp).
//
// All ops run synchronously on the calling thread and fan out to the engine's own thread
// pool. Activations are Float32Array; shapes are given as flat arrays plus the sizes
// named below ([a, b] means a * b elements, row-major). Errors are thrown as Error with
// `code`: EM_NATIVE_SHAPE (lengths/shapes disagree), EM_NATIVE_DTYPE (dtype not accepted),
// EM_NATIVE_ARG (invalid argument), EM_NATIVE_UNSUPPORTED (op/dtype/ISA not available),
// EM_NATIVE_NOMEM (scratch allocation failed), EM_NATIVE_INTERNAL (a bug).

/** Weight storage types: bf16/f16 as 16-bit patterns, fp8 = float8_e4m3fn bytes. */
export type WeightDtype = "f32" | "bf16" | "f16" | "fp8";

/**
 * A weight tensor in checkpoint layout: [out_features, in_features] (torch Linear), or [n]
 * for vectors. `data` is any ArrayBufferView (e.g. a Buffer slice of a safetensors file)
 * holding exactly rows * cols elements, aligned to the element size. fp8 weights need
 * `scale` = weight_scale_inv, [ceil(rows / 128) * ceil(cols / 128)] fp32.
 */
export interface Weight {
  dtype: WeightDtype;
  shape: [number, number] | [number];
  data: ArrayBufferView;
  scale?: Float32Array;
}

export type Isa = "scalar" | "avx2" | "avx512" | "avx512bf16" | "amx";

/** Exported op functions (the keys of BackendInfo.ops). */
export type OpFunction =
  | "matmul"
  | "rmsnorm"
  | "siluMul"
  | "moeFfn"
  | "rope"
  | "mlaAttention"
  | "gate"
  | "convert"
  | "sample"
  | "wirePack"
  | "wireUnpack"
  | "logprobs";

/** Where ops run: the CPU backend, or a CUDA device by ordinal ("cuda" = "cuda:0"); "sim"
 *  ("sim:BYTES": that much device memory) is a stand-in for a GPU, for tests: the CPU's
 *  kernels, behind the device paths (expertmesh/sim.h). */
export type Device = "cpu" | "cuda" | `cuda:${number}` | "sim" | `sim:${number}`;

export interface BackendInfo {
  /** The backend of `device`: "cpu", or "cuda" when a CUDA device was configured ("sim" for
   *  the stand-in). */
  backend: "cpu" | "cuda" | "sim";
  /** The device string configure() was given ("cpu" by default). */
  device: string;
  /** The CPU ISA, or the GPU architecture ("sm_90") for cuda (sim: the CPU ISA it runs). */
  isa: Isa | `sm_${number}`;
  /** CPU threads, or the GPU's multiprocessors for cuda. */
  threads: number;
  abiVersion: number;
  /** CPU ISAs this machine can run. */
  availableIsas: Isa[];
  /** The CPU backend, which also runs every op the device lacks; batchInvariant: configured
   *  so (every row's result the same bits whatever else shares its call; ADR 0027). */
  cpu: { isa: Isa; threads: number; batchInvariant: boolean };
  /** Whether this build contains the CUDA backend. */
  cudaCompiled: boolean;
  /** Exported op function -> weight dtypes it accepts (on the device or the CPU). */
  ops: Record<OpFunction, WeightDtype[]>;
  /** With a device: op function -> weight dtypes the device lacks, run on the CPU backend
   *  instead (e.g. sample, wirePack). Empty for "cpu". */
  fallback: Partial<Record<OpFunction, WeightDtype[]>>;
}

export function backendInfo(): BackendInfo;

/** Replaces the backends and returns the new backendInfo(). `device`: "cpu", "cuda",
 *  "cuda:N" or "sim" (default: keep the current one); each op then runs on the device when it has
 *  the op for the weight dtype, else on the CPU backend. A device that is not there throws
 *  EM_NATIVE_UNSUPPORTED (no CUDA in this build, no CUDA device) or EM_NATIVE_ARG (not a
 *  device string, ordinal out of range) and leaves the backends as they were. `isa` (the
 *  CPU backend's): 'auto' (default; $EM_CPU_ISA honoured) or a specific one; threads
 *  0 = $EM_NUM_THREADS or all CPUs. */
export function configure(options?: {
  device?: Device;
  isa?: Isa | "auto";
  threads?: number;
  /** Keep weights in device memory after their first use (default: $EM_ADDON_RESIDENT=1 at
   *  load, else false). */
  resident?: boolean;
  /** Mirror paged KV pools in device memory (ADR 0010; default: $EM_ADDON_KV_MIRROR=1 at
   *  load, else false). */
  kvMirror?: boolean;
  /** Batch-invariant CPU kernels (default false; ADR 0027): slower, and every row's result
   *  the same bits whatever shares its call. Needs device "cpu" (EM_NATIVE_ARG otherwise). */
  batchInvariant?: boolean;
}): BackendInfo;

/** The "sim" device's counters (device memory it holds, copies made), or null on another
 *  device. */
export function simStats(): {
  allocations: number;
  bytes: number;
  allocatedTotal: number;
  copies: number;
  rangeCopies: number;
  ranges: number;
  copiedBytes: number;
} | null;

/** What the CUDA driver reports (initializes the CUDA runtime on a CUDA build). */
export function cudaStatus(): { compiled: boolean; devices: number; status: string };

/** Bytes the CPU backend's scratch caches hold: arrays of 1 MiB or more kept, per thread, for
 *  the next calls (ADR 0025), at the largest call's peak until trimmed. */
export function scratchBytes(): number;
/** Frees every thread's cached scratch arrays; returns the bytes freed. Safe while ops run. */
export function trimScratch(): number;

/** y [rows, N] = x [rows, K] W^T for w [N, K]. */
export function matmul(x: Float32Array, rows: number, w: Weight, out?: Float32Array): Float32Array;

/** RMSNorm over rows of x [rows, dim]: x * rsqrt(mean(x^2) + eps) * weight[dim]. */
export function rmsnorm(
  x: Float32Array,
  weight: Float32Array | Weight,
  eps: number,
  out?: Float32Array,
): Float32Array;

/** silu(gate) * up, elementwise (same lengths). */
export function siluMul(gate: Float32Array, up: Float32Array, out?: Float32Array): Float32Array;

export interface MoeFfnArgs {
  /** [rows, dim], rows grouped by expert. */
  x: Float32Array;
  dim: number;
  /** [numExperts + 1]: rows of expert e are [expertOffsets[e], expertOffsets[e + 1]). */
  expertOffsets: Int32Array;
  /** Per expert: w1 = gate_proj [inter, dim], w3 = up_proj [inter, dim], w2 = down_proj [dim, inter]. */
  w1: Weight[];
  w2: Weight[];
  w3: Weight[];
  /** [rows] routing weight per row (default 1). */
  rowWeights?: Float32Array;
  /** [rows] output row each row is added to (default: row i -> i); needs outRows. */
  outIndex?: Int32Array;
  outRows?: number;
  /** Add into `out` instead of overwriting it. */
  accumulate?: boolean;
  out?: Float32Array;
  /** [rows] x row each grouped row reads (a gather; x is then any table of rows). */
  xIndex?: Int32Array;
}

/** Grouped expert FFN w2(silu(w1 x) * w3 x) for many experts in one call -> [outRows | rows, dim]. */
export function moeFfn(args: MoeFfnArgs): Float32Array;

export interface RopeOptions {
  /** qk_rope_head_dim (even). */
  ropeDim: number;
  theta: number;
  /** rope_scaling.factor; <= 1 (default) disables YaRN. */
  factor?: number;
  originalMaxPosition?: number;
  betaFast?: number;
  betaSlow?: number;
}

/** Rotates interleaved pairs of x [T, H, headDim] at [offset, offset + ropeDim) of every
 *  head, in place (returns x). T = positions.length. */
export function rope(
  x: Float32Array,
  positions: Int32Array,
  options: RopeOptions & { headDim?: number; offset?: number },
): Float32Array;

/** The (YaRN-corrected) rotary frequencies, [ropeDim / 2]. */
export function ropeInvFreq(options: RopeOptions): Float32Array;

/** qkHeadDim^-0.5 * mscale^2, mscale = 0.1 * mscaleAllDim * ln(factor) + 1 when factor > 1. */
export function mlaSoftmaxScale(qkHeadDim: number, factor: number, mscaleAllDim: number): number;

/** A paged latent cache (ops.h em_kv_pages). */
export interface KvPagesArg {
  /** [numBlocks, blockSize] rows of kvRowBytes(dtype, ...) bytes each. */
  pool: ArrayBufferView;
  /** fp8: C e4m3 codes | ceil(C / 128) f32 scales | dr bf16 per row. */
  dtype: "f32" | "bf16" | "fp8";
  blockSize: number;
  /** Every sequence's blocks, in position order. */
  table: Int32Array;
  /** [numSeqs + 1]: sequence s holds table[tableOffsets[s] .. tableOffsets[s + 1]). */
  tableOffsets: Int32Array;
}

/** Writes float32 rows [n, kvLoraRank + ropeDim] as `dtype` rows into out from byteOffset. */
export function kvEncode(
  dtype: "f32" | "bf16" | "fp8",
  kvLoraRank: number,
  ropeDim: number,
  rows: Float32Array,
  out: ArrayBufferView,
  byteOffset: number,
): void;

/**
 * Copies encoded rows (kvEncode's bytes, e.g. read back from the prefix cache's disk tier)
 * into out from byteOffset; a device mirror of out learns of them as of kvEncode's.
 */
export function kvWrite(src: ArrayBufferView, out: ArrayBufferView, byteOffset: number): void;

/** Bytes of one paged cache row of `dtype`. */
export function kvRowBytes(
  dtype: "f32" | "bf16" | "fp8",
  kvLoraRank: number,
  ropeDim: number,
): number;

export interface MlaAttentionArgs {
  /** [T, H, qkNopeHeadDim + qkRopeHeadDim]; the rope part already rotated. */
  q: Float32Array;
  /** [T] cache row of each query token; it attends to rows [0, position]. */
  positions: Int32Array;
  /** Per sequence: [S, kvLoraRank + qkRopeHeadDim], Float32Array (f32) or Uint16Array (bf16),
   *  rows = kv_norm(latent) | rope(k_pe), already holding this step's tokens. Or `pages`. */
  caches?: Float32Array | Uint16Array | Array<Float32Array | Uint16Array>;
  /** The rows in a paged cache (em_kv_pages) instead of `caches`. */
  pages?: KvPagesArg;
  /** [numSeqs + 1] token ranges of the sequences in q (required for several sequences). */
  qOffsets?: Int32Array;
  numHeads: number;
  qkNopeHeadDim: number;
  qkRopeHeadDim: number;
  vHeadDim: number;
  kvLoraRank: number;
  /** wkv_b [numHeads * (qkNopeHeadDim + vHeadDim), kvLoraRank]. */
  wkvB: Weight;
  softmaxScale: number;
  out?: Float32Array;
}

/** MLA attention in the absorbed form -> [T, H, vHeadDim] (before wo). */
export function mlaAttention(args: MlaAttentionArgs): Float32Array;

export interface GateArgs {
  /** [T, dim] */
  x: Float32Array;
  /** [numExperts, dim] */
  weight: Weight;
  /** e_score_correction_bias [numExperts]: added for selection only. */
  bias?: Float32Array;
  scoreFunc: "softmax" | "sigmoid";
  topkMethod: "greedy" | "group_limited_greedy" | "noaux_tc";
  topK: number;
  nGroup?: number;
  topkGroup?: number;
  normTopkProb?: boolean;
  routedScalingFactor?: number;
}

/** Router: top-k experts per token, highest selection score first -> [T * topK] each. */
export function gate(args: GateArgs): { indices: Int32Array; weights: Float32Array };

/**
 * Converts a weight (fp8 dequantized with its block scales) -> same shape in `to`; "fp8"
 * quantizes a f32/bf16/f16 weight per 128x128 block on the CPU backend (scale = max|x| / 448,
 * as DeepSeek-V3's fp8 weights): its e4m3 codes and weight_scale_inv.
 */
export function convert(w: Weight, to: "f32"): Float32Array;
export function convert(w: Weight, to: "bf16" | "f16"): Uint16Array;
export function convert(w: Weight, to: "fp8"): { data: Uint8Array; scaleInv: Float32Array };

export interface SampleOptions {
  /** <= 0: greedy (argmax). A number for all rows or one per row. */
  temperature?: number | Float32Array;
  /** <= 0: no top-k cut. */
  topK?: number | Int32Array;
  /** >= 1: no top-p cut. */
  topP?: number | Float32Array;
  /** Uniform numbers in [0, 1) driving the pick; required when any temperature > 0. */
  uniform?: number | Float32Array;
}

/** One token per row of logits [T, vocab] -> Int32Array [T]; -1 for a row with nothing to
 *  pick (a NaN or +Infinity among its logits, or every one -Infinity). */
export function sample(logits: Float32Array, vocab: number, options?: SampleOptions): Int32Array;

/** Per row of logits [T, vocab]: the logprob of ids[t] and the k most likely tokens (highest
 *  first, lower id on ties), from the log-softmax with sums in double. */
export function logprobs(
  logits: Float32Array,
  vocab: number,
  ids: Int32Array,
  k: number,
): { logprob: Float64Array; topIds: Int32Array; topLogprobs: Float64Array };

/** zlib's CRC-32 of `bytes`, continuing from `crc` (default 0). */
export function crc32(bytes: ArrayBufferView, crc?: number): number;

/** Wire dtype codes of docs/wire-format.md: 1 bf16, 2 fp8 e4m3 + per-128 scales, 3 f32. */
export type WireDtypeCode = 1 | 2 | 3;

/**
 * Writes rows of x [*, dim] (row r = x row rowIndex[r], or r) as wire bytes into `out`
 * (exactly their size, any alignment); returns the CRC-32 of `out` continued from `crc`,
 * or 0 without computing one when `crc` is null or omitted. The same bytes as
 * src/moe/codec.ts's TypeScript reference.
 */
export function wirePack(
  x: Float32Array,
  dim: number,
  rowIndex: Int32Array | null,
  dtype: WireDtypeCode,
  out: Uint8Array,
  crc?: number | null,
): number;

/**
 * Wire bytes of `rows` rows into y [*, dim]: row r to y row outIndex[r] (or r), set or
 * added; with `crc`, returns the CRC-32 of `bytes` continued from it, computed in the same
 * pass.
 */
export function wireUnpack(
  bytes: Uint8Array,
  dtype: WireDtypeCode,
  rows: number,
  y: Float32Array,
  dim: number,
  outIndex: Int32Array | null,
  accumulate: boolean,
): void;
export function wireUnpack(
  bytes: Uint8Array,
  dtype: WireDtypeCode,
  rows: number,
  y: Float32Array,
  dim: number,
  outIndex: Int32Array | null,
  accumulate: boolean,
  crc: number,
): number;
