// The model's settings derived from config.json (rope, softmax scale, gate), the latent KV
// cache of one sequence, and DeepSeekForward, the one-sequence front of the forward pass.
// The forward pass itself (following DeepSeek-V3 inference/model.py) is batch.ts.
import { type ModelConfig, qkHeadDim } from "../model/config.ts";
import type { Backend, GateConfig, KvPages, RopeConfig } from "./backend.ts";
import { BatchForward, type LatentCache } from "./batch.ts";
import type { ExpertRunner } from "./experts.ts";
import { encodeKvRows, type KvDtype, kvRowBytes, writeKvBytes } from "./kv-format.ts";
import type { ModelWeights } from "./loader.ts";
import type { SampleRows } from "./sampling.ts";

/**
 * The latent KV cache of one sequence: per layer, rows [kvLoraRank + ropeDim] in one
 * growing block (a pool of its own), stored as `dtype` (kv-format.ts; f32 by default).
 */
export class SequenceCache implements LatentCache {
  readonly dtype: KvDtype;
  readonly #C: number;
  readonly #dr: number;
  readonly #rowBytes: number;
  #pools: Uint8Array[];
  #capacity: number;
  #length = 0;

  constructor(config: ModelConfig, capacity = 64, dtype: KvDtype = "f32") {
    this.dtype = dtype;
    this.#C = config.kvLoraRank;
    this.#dr = config.qkRopeHeadDim;
    this.#rowBytes = kvRowBytes(dtype, this.#C, this.#dr);
    this.#capacity = Math.max(1, capacity);
    this.#pools = Array.from(
      { length: config.numHiddenLayers },
      () => new Uint8Array(this.#capacity * this.#rowBytes),
    );
  }

  /** Positions filled. */
  get length(): number {
    return this.#length;
  }

  /** Writes rows for positions [start, start + n) of `layer`, growing as needed. */
  write(layer: number, start: number, rows: Float32Array): void {
    const end = start + rows.length / (this.#C + this.#dr);
    if (end > this.#capacity) {
      // Every layer grows together: the pool is one block of `capacity` rows.
      const capacity = Math.max(end, this.#capacity * 2);
      this.#pools = this.#pools.map((old) => {
        const grown = new Uint8Array(capacity * this.#rowBytes);
        // Through the addon, which tells a device mirror of a pool at this address (a freed
        // pool's address can come back) that these rows changed.
        writeKvBytes(old, grown, 0);
        return grown;
      });
      this.#capacity = capacity;
    }
    encodeKvRows(this.dtype, this.#C, this.#dr, rows, this.#pools[layer]!, start * this.#rowBytes);
  }

  pages(layer: number): KvPages {
    return { dtype: this.dtype, pool: this.#pools[layer]!, blockSize: this.#capacity };
  }

  table(): ArrayLike<number> {
    return ONE_BLOCK;
  }

  /** Marks positions up to `n` as filled (after every layer wrote them). */
  setLength(n: number): void {
    this.#length = n;
  }
}

const ONE_BLOCK = Object.freeze([0]);

/** The rope settings of a config (YaRN when rope_scaling is yarn and the context is extended). */
export function ropeConfigOf(c: ModelConfig): RopeConfig {
  const y = c.ropeScaling;
  const yarn = y !== null && c.maxPositionEmbeddings > y.originalMaxPositionEmbeddings;
  return {
    ropeDim: c.qkRopeHeadDim,
    theta: c.ropeTheta,
    factor: yarn ? y.factor : 1,
    originalMaxPosition: y?.originalMaxPositionEmbeddings ?? c.maxPositionEmbeddings,
    betaFast: y?.betaFast ?? 32,
    betaSlow: y?.betaSlow ?? 1,
  };
}

/** Attention softmax scale: qk_head_dim^-0.5, times mscale^2 under YaRN (the reference). */
export function softmaxScaleOf(c: ModelConfig): number {
  let scale = qkHeadDim(c) ** -0.5;
  const y = c.ropeScaling;
  if (y && y.factor > 1 && y.mscaleAllDim) {
    const m = 0.1 * y.mscaleAllDim * Math.log(y.factor) + 1;
    scale *= m * m;
  }
  return scale;
}

export function gateConfigOf(c: ModelConfig): GateConfig {
  return {
    scoring: c.scoringFunc,
    method: c.topkMethod,
    topK: c.numExpertsPerTok,
    nGroup: c.nGroup,
    topkGroup: c.topkGroup,
    normTopkProb: c.normTopkProb,
    routedScalingFactor: c.routedScalingFactor,
  };
}

/**
 * One sequence at a time (generate, the fidelity tests): a batch of one through
 * BatchForward, so single-sequence and batched serving run the same code.
 */
export class DeepSeekForward {
  readonly config: ModelConfig;
  readonly #batch: BatchForward;

  constructor(weights: ModelWeights, backend: Backend, experts: ExpertRunner) {
    this.config = weights.config;
    this.#batch = new BatchForward(weights, backend, experts);
  }

  /** One token per row of logits [rows, vocab] (sampling.ts), on the model's backend. */
  sample(logits: Float32Array, rows: SampleRows): Int32Array {
    return this.#batch.sample(logits, rows);
  }

  /**
   * Runs tokens at positions [cache.length, cache.length + T) of one sequence, appending
   * to its cache. Resolves logits [T, vocab] (only the last row when `lastOnly`).
   */
  async forward(
    tokens: ArrayLike<number>,
    cache: SequenceCache,
    lastOnly = false,
  ): Promise<Float32Array> {
    const [logits] = await this.#batch.step([{ tokens, cache, logits: lastOnly ? "last" : "all" }]);
    return logits!;
  }
}
