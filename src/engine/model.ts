// The DeepSeek-V2/V3 forward pass (embeddings, MLA attention over the latent cache, dense
// MLP or MoE, final norm, LM head), following DeepSeek-V3 inference/model.py. The ops run
// on a Backend; the routed experts on an ExpertRunner (in process, or over NATS).
import { isMoeLayer, type ModelConfig, qkHeadDim } from "../model/config.ts";
import { bf16ArrayToFloat32 } from "../model/floats.ts";
import type { Backend, GateConfig, RopeConfig, Weight } from "./backend.ts";
import type { ExpertRunner } from "./experts.ts";
import type { AttentionWeights, MlpWeights, ModelWeights } from "./loader.ts";
import { weightToF32 } from "./reference.ts";

/** The latent KV cache of one sequence: per layer, rows [kvLoraRank + ropeDim]. */
export class SequenceCache {
  readonly rowWidth: number;
  #layers: Float32Array[];
  #length = 0;

  constructor(config: ModelConfig, capacity = 64) {
    this.rowWidth = config.kvLoraRank + config.qkRopeHeadDim;
    this.#layers = Array.from(
      { length: config.numHiddenLayers },
      () => new Float32Array(capacity * this.rowWidth),
    );
  }

  /** Positions filled. */
  get length(): number {
    return this.#length;
  }

  /** Writes rows for positions [start, start + n) of `layer`, growing as needed. */
  write(layer: number, start: number, rows: Float32Array): void {
    const need = (start + rows.length / this.rowWidth) * this.rowWidth;
    let buf = this.#layers[layer]!;
    if (need > buf.length) {
      const grown = new Float32Array(Math.max(need, buf.length * 2));
      grown.set(buf);
      buf = grown;
      this.#layers[layer] = buf;
    }
    buf.set(rows, start * this.rowWidth);
  }

  /** Rows [0, upTo) of `layer`. */
  rows(layer: number, upTo: number): Float32Array {
    return this.#layers[layer]!.subarray(0, upTo * this.rowWidth);
  }

  /** Marks positions up to `n` as filled (after every layer wrote them). */
  setLength(n: number): void {
    this.#length = n;
  }
}

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

function add(a: Float32Array, b: Float32Array): void {
  for (let i = 0; i < a.length; i++) a[i]! += b[i]!;
}

export class DeepSeekForward {
  readonly config: ModelConfig;
  readonly #w: ModelWeights;
  readonly #b: Backend;
  readonly #experts: ExpertRunner;
  readonly #rope: RopeConfig;
  readonly #scale: number;
  readonly #gate: GateConfig;

  constructor(weights: ModelWeights, backend: Backend, experts: ExpertRunner) {
    this.config = weights.config;
    this.#w = weights;
    this.#b = backend;
    this.#experts = experts;
    this.#rope = ropeConfigOf(this.config);
    this.#scale = softmaxScaleOf(this.config);
    this.#gate = gateConfigOf(this.config);
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
    const c = this.config;
    const T = tokens.length;
    const D = c.hiddenSize;
    const start = cache.length;
    const positions = Int32Array.from({ length: T }, (_, i) => start + i);
    const embed = weightToF32Rows(this.#w.embed);
    const h = new Float32Array(T * D);
    for (let t = 0; t < T; t++) h.set(embed(tokens[t]!), t * D);
    for (const layer of this.#w.layers) {
      const a = this.#b.rmsnorm(h, T, layer.inputNorm, c.rmsNormEps);
      add(h, this.#attention(layer.index, layer.attention, a, positions, cache));
      const m = this.#b.rmsnorm(h, T, layer.postNorm, c.rmsNormEps);
      if (!isMoeLayer(c, layer.index)) {
        add(h, this.#mlp(layer.mlp!, m, T));
      } else {
        const moe = layer.moe!;
        const { ids, weights } = this.#b.gate(m, T, moe.router, moe.bias, this.#gate);
        // Shared experts run here while the routed ones run (possibly remotely).
        const routed = this.#experts.run(layer.index, m, T, D, ids, weights, this.#gate.topK);
        const shared = moe.shared ? this.#mlp(moe.shared, m, T) : null;
        add(h, await routed);
        if (shared) add(h, shared);
      }
    }
    cache.setLength(start + T);
    const rows = lastOnly ? 1 : T;
    const last = h.subarray((T - rows) * D);
    const normed = this.#b.rmsnorm(last, rows, this.#w.norm, c.rmsNormEps);
    return this.#b.matmul(normed, rows, this.#w.lmHead);
  }

  #mlp(w: MlpWeights, x: Float32Array, t: number): Float32Array {
    const b = this.#b;
    return b.matmul(b.siluMul(b.matmul(x, t, w.gate), b.matmul(x, t, w.up)), t, w.down);
  }

  /** MLA: q (optionally through q LoRA), latent kv + decoupled rope key, absorbed attention. */
  #attention(
    layer: number,
    w: AttentionWeights,
    x: Float32Array,
    positions: Int32Array,
    cache: SequenceCache,
  ): Float32Array {
    const c = this.config;
    const b = this.#b;
    const T = positions.length;
    const H = c.numAttentionHeads;
    const dn = c.qkNopeHeadDim;
    const dr = c.qkRopeHeadDim;
    const C = c.kvLoraRank;
    const q = w.qProj
      ? b.matmul(x, T, w.qProj)
      : b.matmul(b.rmsnorm(b.matmul(x, T, w.qA!), T, w.qANorm!, c.rmsNormEps), T, w.qB!);
    b.rope(q, T, H, dn + dr, dn, positions, this.#rope);
    const kv = b.matmul(x, T, w.kvA); // [T, C + dr]
    const latent = new Float32Array(T * C);
    for (let t = 0; t < T; t++) latent.set(kv.subarray(t * (C + dr), t * (C + dr) + C), t * C);
    const normed = b.rmsnorm(latent, T, w.kvANorm, c.rmsNormEps);
    b.rope(kv, T, 1, C + dr, C, positions, this.#rope);
    const rows = new Float32Array(T * (C + dr));
    for (let t = 0; t < T; t++) {
      rows.set(normed.subarray(t * C, (t + 1) * C), t * (C + dr));
      rows.set(kv.subarray(t * (C + dr) + C, (t + 1) * (C + dr)), t * (C + dr) + C);
    }
    const start = positions[0]!;
    cache.write(layer, start, rows);
    const out = b.mla({
      heads: H,
      nopeDim: dn,
      ropeDim: dr,
      vDim: c.vHeadDim,
      kvLoraRank: C,
      softmaxScale: this.#scale,
      q,
      positions,
      cache: cache.rows(layer, start + T),
      wkvB: w.kvB,
    });
    return b.matmul(out, T, w.o);
  }
}

/** Row lookup in an embedding table (float32 copy of one row). */
function weightToF32Rows(w: Weight): (row: number) => Float32Array {
  if (w.dtype === "f32")
    return (r) => (w.data as Float32Array).subarray(r * w.cols, (r + 1) * w.cols);
  if (w.dtype === "bf16")
    return (r) =>
      bf16ArrayToFloat32((w.data as Uint16Array).subarray(r * w.cols, (r + 1) * w.cols));
  const all = weightToF32(w);
  return (r) => all.subarray(r * w.cols, (r + 1) * w.cols);
}
