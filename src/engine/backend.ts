// The operations the model needs, as one interface with two implementations: the native
// addon (shards/, C++ with SIMD and threads; CUDA later) and a straightforward TypeScript
// reference used to check it. Shapes are row-major; "x [T, D]" is a Float32Array of T*D.
import type { KvDtype } from "./kv-format.ts";
import type { SampleRows } from "./sampling.ts";

/** A weight matrix [rows, cols] (torch Linear layout: out_features x in_features) or vector. */
export interface Weight {
  readonly dtype: "f32" | "bf16" | "f16" | "fp8";
  /** Raw elements: Float32Array (f32), Uint16Array bits (bf16/f16), Uint8Array codes (fp8). */
  readonly data: Float32Array | Uint16Array | Uint8Array;
  readonly rows: number;
  readonly cols: number;
  /** fp8 only: weight_scale_inv [ceil(rows/128), ceil(cols/128)]. */
  readonly scaleInv?: Float32Array;
}

/** Rotary embedding with YaRN (DeepSeek's precompute_freqs_cis), on interleaved pairs. */
export interface RopeConfig {
  readonly ropeDim: number;
  readonly theta: number;
  /** 1 disables YaRN. */
  readonly factor: number;
  readonly originalMaxPosition: number;
  readonly betaFast: number;
  readonly betaSlow: number;
}

export interface GateConfig {
  readonly scoring: "softmax" | "sigmoid";
  readonly method: "greedy" | "group_limited_greedy" | "noaux_tc";
  readonly topK: number;
  readonly nGroup: number;
  readonly topkGroup: number;
  readonly normTopkProb: boolean;
  readonly routedScalingFactor: number;
}

/** Grouped expert FFN over rows sorted by expert. */
export interface MoeArgs {
  /**
   * [rows, dim]; rows of expert e are offsets[e] .. offsets[e+1]-1. With `xIndex`, any
   * table of rows: grouped row r is x row xIndex[r].
   */
  readonly x: Float32Array;
  /** [rows] the row of x each grouped row reads (a gather, so callers need not copy rows). */
  readonly xIndex?: Int32Array;
  readonly dim: number;
  /** [E + 1] */
  readonly offsets: Int32Array;
  /** Per expert: gate_proj [inter, dim], up_proj [inter, dim], down_proj [dim, inter]. */
  readonly w1: readonly Weight[];
  readonly w3: readonly Weight[];
  readonly w2: readonly Weight[];
  /** [rows] routing weight of each row. */
  readonly rowWeight: Float32Array;
  /** [rows] output row each row's result is added to. */
  readonly outIndex: Int32Array;
  /** Output rows; the result is [numOut, dim], zero where no row lands. */
  readonly numOut: number;
  /** Where to write the result ([numOut * dim], any contents; returned). */
  readonly out?: Float32Array;
}

/** A paged latent cache's rows of one layer: [numBlocks, blockSize] rows (kv-format.ts). */
export interface KvPages {
  readonly dtype: KvDtype;
  /** The rows' bytes; starts on a 4-byte boundary. */
  readonly pool: Uint8Array;
  /** Rows per block. */
  readonly blockSize: number;
}

/**
 * MLA attention, absorbed form, over the paged latent caches of a batch of sequences: the
 * query tokens of sequence s are qOffsets[s] .. qOffsets[s+1]-1; its rows are in the
 * blocks table[tableOffsets[s] .. tableOffsets[s+1]) of `pages`, in position order.
 */
export interface MlaArgs {
  readonly heads: number;
  readonly nopeDim: number;
  readonly ropeDim: number;
  readonly vDim: number;
  readonly kvLoraRank: number;
  readonly softmaxScale: number;
  /** [T, heads, nopeDim + ropeDim], rope part already rotated. */
  readonly q: Float32Array;
  /** [T] cache row of each query token; it attends to rows 0..pos of its sequence. */
  readonly positions: Int32Array;
  /** [numSeqs + 1] */
  readonly qOffsets: Int32Array;
  /** Rows: normalized latent | rotated k_pe, already holding this step's tokens. */
  readonly pages: KvPages;
  readonly table: Int32Array;
  /** [numSeqs + 1] */
  readonly tableOffsets: Int32Array;
  /** kv_b_proj [heads * (nopeDim + vDim), kvLoraRank]. */
  readonly wkvB: Weight;
  /** Where to write the result ([T * heads * vDim], any contents; returned). */
  readonly out?: Float32Array;
}

/**
 * The ops. Those that make a float32 result take an optional `out` of the result's length
 * (any contents, not aliasing an input) and then write it there and return it: the forward
 * pass hands them scratch arrays (scratch.ts) instead of a fresh array per call.
 */
export interface Backend {
  readonly name: string;
  /** x [m, w.cols] -> [m, w.rows] = x W^T, fp32 accumulation. */
  matmul(x: Float32Array, m: number, w: Weight, out?: Float32Array): Float32Array;
  /** x [m, d] -> x * rsqrt(mean(x^2) + eps) * weight. */
  rmsnorm(
    x: Float32Array,
    m: number,
    weight: Weight,
    eps: number,
    out?: Float32Array,
  ): Float32Array;
  /** silu(gate) * up, elementwise. */
  siluMul(gate: Float32Array, up: Float32Array, out?: Float32Array): Float32Array;
  /** Rotates, in place, the ropeDim elements at `offset` of each of the t*heads rows of width `stride`. */
  rope(
    x: Float32Array,
    t: number,
    heads: number,
    stride: number,
    offset: number,
    positions: Int32Array,
    cfg: RopeConfig,
  ): void;
  /** Router: top-k expert ids and their weights per token. */
  gate(
    x: Float32Array,
    t: number,
    weight: Weight,
    bias: Float32Array | null,
    cfg: GateConfig,
  ): { ids: Int32Array; weights: Float32Array };
  moe(args: MoeArgs): Float32Array;
  /** [T, heads * vDim] */
  mla(args: MlaArgs): Float32Array;
  /** One token per row of logits [rows, vocab], by the rule of sampling.ts. */
  sample(logits: Float32Array, vocab: number, rows: SampleRows): Int32Array;
  /**
   * Per row of logits [rows, vocab]: the logprob of ids[row] and the k most likely tokens
   * (highest first, lower id on ties; topIds/topLogprobs [rows, k]); sampling.ts's
   * tokenLogprob is the reference.
   */
  logprobs(
    logits: Float32Array,
    vocab: number,
    ids: Int32Array,
    k: number,
  ): { logprob: Float64Array; topIds: Int32Array; topLogprobs: Float64Array };
  /**
   * The bytes of scratch memory the backend keeps between calls (the native CPU backend's
   * per-thread caches, ADR 0025); absent for a backend that keeps none.
   */
  scratchBytes?(): number;
  /** Frees that memory; returns the bytes freed (scratch-trim.ts calls it when idle). */
  trimScratch?(): number;
}
