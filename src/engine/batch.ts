// One forward step over several sequences at once, as a continuous-batching engine runs
// it: prefill chunks and decode tokens mixed in one batch. Dense ops (norms, projections,
// shared experts, LM head) run once over all the batch's tokens; MLA attention runs per
// sequence over its own latent cache; the routed experts of a layer go out in ONE
// ExpertRunner.run call for the whole batch (one NATS round trip per shard per layer).
import type { ModelConfig } from "../model/config.ts";
import { bf16ArrayToFloat32 } from "../model/floats.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { Backend, GateConfig, KvPages, RopeConfig } from "./backend.ts";
import type { ExpertRunner } from "./experts.ts";
import type { AttentionWeights, LayerWeights, MlpWeights, ModelWeights } from "./loader.ts";
import { gateConfigOf, ropeConfigOf, softmaxScaleOf } from "./model.ts";
import { weightToF32 } from "./reference.ts";
import type { SampleRows } from "./sampling.ts";
import { Scratch } from "./scratch.ts";

/**
 * The latent KV cache of one sequence as the forward pass sees it: per layer, rows of
 * [kvLoraRank + qkRopeHeadDim] values (stored as kv-format.ts says) in blocks of a pool.
 * SequenceCache (model.ts) and the block cache (kv-blocks.ts) both fit.
 */
export interface LatentCache {
  /** Positions filled. */
  readonly length: number;
  /** Writes float32 rows for positions [start, start + rows.length / rowWidth) of `layer`. */
  write(layer: number, start: number, rows: Float32Array): void;
  /** `layer`'s rows: a pool, shared by the sequences of one block cache. */
  pages(layer: number): KvPages;
  /** This sequence's blocks in every layer's pool, in position order (fixed while a step runs). */
  table(): ArrayLike<number>;
  /** Marks positions up to `n` as filled (after every layer wrote them). */
  setLength(n: number): void;
}

/** Which logits a sequence of the batch wants back. */
export type LogitsWanted = "none" | "last" | "all";

/** One sequence's part of a batch: its next tokens, appended at cache.length. */
export interface BatchItem {
  readonly tokens: ArrayLike<number>;
  readonly cache: LatentCache;
  readonly logits: LogitsWanted;
  /**
   * Called with the final hidden states of all its tokens, [tokens, hidden] after the final
   * norm (what the LM head reads, and what an MTP layer takes: mtpStep).
   */
  readonly onHidden?: (rows: Float32Array) => void;
}

/**
 * One sequence's part of an MTP step (ADR 0012): the MTP layer's rows for positions
 * [start, start + n) from the main model's final hidden states there and the tokens that
 * follow each (t[start + 1 .. start + n]). Written to the cache's MTP layer (index
 * num_hidden_layers); the sequence's length is not changed.
 */
export interface MtpItem {
  readonly start: number;
  /** The token after each position: n tokens. */
  readonly tokens: ArrayLike<number>;
  /** [n, hidden]: the main model's final (normed) hidden states at the n positions. */
  readonly hidden: Float32Array;
  readonly cache: LatentCache;
  /** "last": the logits of the last row (they predict the token two after it). */
  readonly logits: "none" | "last";
}

/** What an MTP step gives per item (empty arrays for items that asked for no logits). */
export interface MtpResult {
  /** [vocab]: the last row's logits. */
  readonly logits: Float32Array[];
  /**
   * [hidden]: the last row's output before the head's norm: the hidden state a chained MTP
   * step takes for the next position (as vLLM chains its MTP layer).
   */
  readonly hidden: Float32Array[];
}

/** What the layers read of a batch's sequences. */
interface LayerItem {
  readonly tokens: ArrayLike<number>;
  readonly cache: LatentCache;
}

/** Runs batches of sequences through the model. */
export class BatchForward {
  readonly config: ModelConfig;
  readonly #w: ModelWeights;
  readonly #b: Backend;
  readonly #experts: ExpertRunner;
  readonly #rope: RopeConfig;
  readonly #scale: number;
  readonly #gate: GateConfig;
  readonly #embed: (row: number) => Float32Array;
  readonly #mtpEmbed: ((row: number) => Float32Array) | null;
  /** Scratch arrays of steps not running (one per step in flight: micro-batches overlap). */
  readonly #scratch: Scratch[] = [];

  constructor(weights: ModelWeights, backend: Backend, experts: ExpertRunner) {
    this.config = weights.config;
    this.#w = weights;
    this.#b = backend;
    this.#experts = experts;
    this.#rope = ropeConfigOf(this.config);
    this.#scale = softmaxScaleOf(this.config);
    this.#gate = gateConfigOf(this.config);
    this.#embed = embeddingRows(weights.embed);
    const mtp = weights.mtp;
    this.#mtpEmbed =
      mtp === undefined
        ? null
        : mtp.embed === weights.embed
          ? this.#embed
          : embeddingRows(mtp.embed);
  }

  /** Whether the weights hold an MTP layer (mtpStep runs). */
  get hasMtp(): boolean {
    return this.#w.mtp !== undefined;
  }

  /** One token per row of logits [rows, vocab] (sampling.ts), on the model's backend. */
  sample(logits: Float32Array, rows: SampleRows): Int32Array {
    return this.#b.sample(logits, this.config.vocabSize, rows);
  }

  /** Backend.logprobs on the model's backend. */
  logprobs(logits: Float32Array, ids: Int32Array, k: number) {
    return this.#b.logprobs(logits, this.config.vocabSize, ids, k);
  }

  /**
   * One step: runs every item's tokens at positions [cache.length, cache.length + n) of its
   * sequence, appending to its cache. Resolves, per item, logits [rows, vocab] (rows = 0,
   * 1 or n by `logits`). Sequences must be distinct; an item may have no tokens only when
   * it wants no logits.
   */
  async step(items: readonly BatchItem[]): Promise<Float32Array[]> {
    const c = this.config;
    const D = c.hiddenSize;
    // Token ranges of the sequences in the flat batch: [offsets[i], offsets[i + 1]).
    const offsets = new Int32Array(items.length + 1);
    items.forEach((it, i) => {
      offsets[i + 1] = offsets[i]! + it.tokens.length;
    });
    const T = offsets[items.length]!;
    if (T === 0) return items.map(() => new Float32Array(0));
    return this.#withScratch(async (s) => {
      const positions = new Int32Array(T);
      const h = s.take(T * D);
      items.forEach((it, i) => {
        const start = it.cache.length;
        for (let j = 0; j < it.tokens.length; j++) {
          const t = offsets[i]! + j;
          positions[t] = start + j;
          h.set(this.#embed(it.tokens[j]!), t * D);
        }
      });
      const groups = attentionGroups(items, offsets);
      for (const layer of this.#w.layers)
        await this.#layer(layer, h, positions, items, offsets, groups, s);
      for (const it of items) it.cache.setLength(it.cache.length + it.tokens.length);
      return this.#lmHead(h, items, offsets, s);
    });
  }

  /**
   * Runs `f` with a Scratch no other step in flight uses, and takes back all of its arrays
   * when `f` settles.
   */
  async #withScratch<R>(f: (s: Scratch) => Promise<R>): Promise<R> {
    const s = this.#scratch.pop() ?? new Scratch();
    try {
      return await f(s);
    } finally {
      s.release(0);
      this.#scratch.push(s);
    }
  }

  /**
   * One step of the MTP layer (ADR 0012, as vLLM's DeepSeekMTP): per row, the main model's
   * hidden state h at position p and the embedding e of token p + 1 (zero at position 0)
   * give x = eh_proj([enorm(e); hnorm(h)]), which runs through the MTP block (its attention
   * over the MTP layer's own cache rows); the head reads norm(x). Resolves, per item, the
   * logits of its last row and that row's x, or none.
   */
  async mtpStep(items: readonly MtpItem[]): Promise<MtpResult> {
    if (!this.#w.mtp || !this.#mtpEmbed)
      throw new ExpertMeshError("EM_GATEWAY_INTERNAL", "the weights hold no MTP layer");
    const offsets = new Int32Array(items.length + 1);
    items.forEach((it, i) => {
      offsets[i + 1] = offsets[i]! + it.tokens.length;
    });
    const T = offsets[items.length]!;
    const none = () => ({
      logits: items.map(() => new Float32Array(0)),
      hidden: items.map(() => new Float32Array(0)),
    });
    if (T === 0) return none();
    return this.#withScratch((s) => this.#mtpStep(items, offsets, T, none, s));
  }

  /** mtpStep for T > 0 tokens, its arrays from `s`. */
  async #mtpStep(
    items: readonly MtpItem[],
    offsets: Int32Array,
    T: number,
    none: () => MtpResult,
    s: Scratch,
  ): Promise<MtpResult> {
    const m = this.#w.mtp!;
    const D = this.config.hiddenSize;
    const eps = this.config.rmsNormEps;
    const b = this.#b;
    const positions = new Int32Array(T);
    // Zero: rows at position 0 keep no embedding.
    const e = s.take(T * D).fill(0);
    const prev = s.take(T * D);
    items.forEach((it, i) => {
      prev.set(it.hidden.subarray(0, it.tokens.length * D), offsets[i]! * D);
      for (let j = 0; j < it.tokens.length; j++) {
        const t = offsets[i]! + j;
        positions[t] = it.start + j;
        // vLLM masks the embedding at position 0 ("not needed by MTP").
        if (positions[t] !== 0) e.set(this.#mtpEmbed!(it.tokens[j]!), t * D);
      }
    });
    const en = b.rmsnorm(e, T, m.enorm, eps, s.take(T * D));
    const hn = b.rmsnorm(prev, T, m.hnorm, eps, s.take(T * D));
    const x = s.take(T * 2 * D);
    for (let t = 0; t < T; t++) {
      x.set(en.subarray(t * D, (t + 1) * D), t * 2 * D);
      x.set(hn.subarray(t * D, (t + 1) * D), t * 2 * D + D);
    }
    const h = b.matmul(x, T, m.ehProj, s.take(T * D));
    await this.#layer(m.layer, h, positions, items, offsets, attentionGroups(items, offsets), s);
    const last = items.flatMap((it, i) =>
      it.logits === "last" && it.tokens.length > 0 ? [i] : [],
    );
    if (last.length === 0) return none();
    const rows = s.take(last.length * D);
    last.forEach((i, r) => {
      rows.set(h.subarray((offsets[i + 1]! - 1) * D, offsets[i + 1]! * D), r * D);
    });
    const V = m.head.rows;
    const normed = b.rmsnorm(rows, last.length, m.headNorm, eps, s.take(last.length * D));
    const logits = b.matmul(normed, last.length, m.head, s.take(last.length * V));
    const out = none();
    last.forEach((i, r) => {
      out.logits[i] = logits.slice(r * V, (r + 1) * V);
      out.hidden[i] = rows.slice(r * D, (r + 1) * D);
    });
    return out;
  }

  /**
   * One decoder block over the batch's hidden states `h` (updated in place). Its own
   * arrays come from `s` and go back to it at the end.
   */
  async #layer(
    layer: LayerWeights,
    h: Float32Array,
    positions: Int32Array,
    items: readonly LayerItem[],
    offsets: Int32Array,
    groups: readonly AttentionGroup[],
    s: Scratch,
  ): Promise<void> {
    const c = this.config;
    const D = c.hiddenSize;
    const T = positions.length;
    const mark = s.mark();
    const a = this.#b.rmsnorm(h, T, layer.inputNorm, c.rmsNormEps, s.take(T * D));
    add(h, this.#attention(layer.index, layer.attention, a, positions, items, offsets, groups, s));
    const m = this.#b.rmsnorm(h, T, layer.postNorm, c.rmsNormEps, s.take(T * D));
    if (layer.mlp) {
      add(h, this.#mlp(layer.mlp, m, T, s));
    } else {
      const moe = layer.moe!;
      const { ids, weights } = this.#b.gate(m, T, moe.router, moe.bias, this.#gate);
      // One call for the whole batch; shared experts run while it is in flight.
      const routed = this.#experts.run(layer.index, m, T, D, ids, weights, this.#gate.topK);
      const shared = moe.shared ? this.#mlp(moe.shared, m, T, s) : null;
      const sums = await routed;
      add(h, sums);
      this.#experts.release?.(sums);
      if (shared) add(h, shared);
    }
    s.release(mark);
  }

  /**
   * Final norm + LM head over only the rows some item wants, then split per item. Items
   * asking for their hidden states get the normed rows of all their tokens.
   */
  #lmHead(
    h: Float32Array,
    items: readonly BatchItem[],
    offsets: Int32Array,
    s: Scratch,
  ): Float32Array[] {
    const c = this.config;
    const D = c.hiddenSize;
    const V = this.#w.lmHead.rows;
    const rowsOf = (i: number): [number, number] => {
      const n = offsets[i + 1]! - offsets[i]!;
      const want = items[i]!.logits;
      const k = want === "all" ? n : want === "last" ? Math.min(1, n) : 0;
      return [offsets[i + 1]! - k, k];
    };
    const picks = items.map((_, i) => rowsOf(i));
    const R = picks.reduce((s, [, k]) => s + k, 0);
    // With hidden states asked for, every row is normed once and the LM head reads its picks.
    // (A fresh array: the callbacks may keep their rows.)
    const all = items.some((it) => it.onHidden)
      ? this.#b.rmsnorm(h, offsets[items.length]!, this.#w.norm, c.rmsNormEps)
      : null;
    if (all)
      items.forEach((it, i) => {
        it.onHidden?.(all.subarray(offsets[i]! * D, offsets[i + 1]! * D));
      });
    if (R === 0) return items.map(() => new Float32Array(0));
    const x = s.take(R * D);
    let r = 0;
    for (const [from, k] of picks) {
      x.set((all ?? h).subarray(from * D, (from + k) * D), r * D);
      r += k;
    }
    const normed = all ? x : this.#b.rmsnorm(x, R, this.#w.norm, c.rmsNormEps, s.take(R * D));
    // Sliced (copied) per item below: the items own their logits.
    const logits = this.#b.matmul(normed, R, this.#w.lmHead, s.take(R * V));
    r = 0;
    return picks.map(([, k]) => {
      const out = logits.slice(r * V, (r + k) * V);
      r += k;
      return out;
    });
  }

  #mlp(w: MlpWeights, x: Float32Array, t: number, s: Scratch): Float32Array {
    const b = this.#b;
    const gate = b.matmul(x, t, w.gate, s.take(t * w.gate.rows));
    const up = b.matmul(x, t, w.up, s.take(t * w.up.rows));
    const act = b.siluMul(gate, up, s.take(gate.length));
    return b.matmul(act, t, w.down, s.take(t * w.down.rows));
  }

  /**
   * MLA over the batch: projections and rope for all T tokens at once, cache writes and
   * absorbed attention per sequence (each attends to its own latent rows), wo for all.
   */
  #attention(
    layer: number,
    w: AttentionWeights,
    x: Float32Array,
    positions: Int32Array,
    items: readonly LayerItem[],
    offsets: Int32Array,
    groups: readonly AttentionGroup[],
    s: Scratch,
  ): Float32Array {
    const c = this.config;
    const b = this.#b;
    const T = positions.length;
    const H = c.numAttentionHeads;
    const dn = c.qkNopeHeadDim;
    const dr = c.qkRopeHeadDim;
    const C = c.kvLoraRank;
    const qw = H * (dn + dr);
    let q: Float32Array;
    if (w.qProj) q = b.matmul(x, T, w.qProj, s.take(T * qw));
    else {
      const qa = b.matmul(x, T, w.qA!, s.take(T * w.qA!.rows));
      const qn = b.rmsnorm(qa, T, w.qANorm!, c.rmsNormEps, s.take(qa.length));
      q = b.matmul(qn, T, w.qB!, s.take(T * qw));
    }
    b.rope(q, T, H, dn + dr, dn, positions, this.#rope);
    const kv = b.matmul(x, T, w.kvA, s.take(T * (C + dr))); // [T, C + dr]
    const latent = s.take(T * C);
    for (let t = 0; t < T; t++) latent.set(kv.subarray(t * (C + dr), t * (C + dr) + C), t * C);
    const normed = b.rmsnorm(latent, T, w.kvANorm, c.rmsNormEps, s.take(T * C));
    b.rope(kv, T, 1, C + dr, C, positions, this.#rope);
    const rows = s.take(T * (C + dr));
    for (let t = 0; t < T; t++) {
      rows.set(normed.subarray(t * C, (t + 1) * C), t * (C + dr));
      rows.set(kv.subarray(t * (C + dr) + C, (t + 1) * (C + dr)), t * (C + dr) + C);
    }
    items.forEach((it, i) => {
      const from = offsets[i]!;
      const to = offsets[i + 1]!;
      if (to > from)
        it.cache.write(layer, positions[from]!, rows.subarray(from * (C + dr), to * (C + dr)));
    });
    const dv = c.vHeadDim;
    const out = s.take(T * H * dv);
    for (const g of groups) {
      b.mla({
        heads: H,
        nopeDim: dn,
        ropeDim: dr,
        vDim: c.vHeadDim,
        kvLoraRank: C,
        softmaxScale: this.#scale,
        q: q.subarray(g.from * qw, g.to * qw),
        positions: positions.subarray(g.from, g.to),
        qOffsets: g.qOffsets,
        // Read after the writes: a SequenceCache may have grown into a new pool.
        pages: g.cache.pages(layer),
        table: g.table,
        tableOffsets: g.tableOffsets,
        wkvB: w.kvB,
        out: out.subarray(g.from * H * dv, g.to * H * dv),
      });
    }
    return b.matmul(out, T, w.o, s.take(T * w.o.rows));
  }
}

/**
 * The sequences of one attention call: query tokens [from, to) of the batch, each
 * sequence's share of them and its blocks (the same in every layer), and a cache to read
 * the layer's pool from.
 */
interface AttentionGroup {
  readonly from: number;
  readonly to: number;
  readonly qOffsets: Int32Array;
  readonly table: Int32Array;
  readonly tableOffsets: Int32Array;
  readonly cache: LatentCache;
}

/**
 * A step's attention calls, built once for all its layers: one for the batch when its
 * sequences share a pool (the block cache), else one per sequence (each SequenceCache has
 * its own).
 */
function attentionGroups(items: readonly LayerItem[], offsets: Int32Array): AttentionGroup[] {
  const live = items.flatMap((it, i) => (it.tokens.length > 0 ? [{ it, from: offsets[i]! }] : []));
  const group = (members: typeof live): AttentionGroup => {
    const tables = members.map((m) => m.it.cache.table());
    const qOffsets = new Int32Array(members.length + 1);
    const tableOffsets = new Int32Array(members.length + 1);
    members.forEach((m, i) => {
      qOffsets[i + 1] = qOffsets[i]! + m.it.tokens.length;
      tableOffsets[i + 1] = tableOffsets[i]! + tables[i]!.length;
    });
    const table = new Int32Array(tableOffsets[members.length]!);
    tables.forEach((t, i) => {
      table.set(t, tableOffsets[i]!);
    });
    const from = members[0]!.from;
    return {
      from,
      to: from + qOffsets[members.length]!,
      qOffsets,
      table,
      tableOffsets,
      cache: members[0]!.it.cache,
    };
  };
  const pool = live[0]?.it.cache.pages(0).pool;
  if (live.every((m) => m.it.cache.pages(0).pool === pool)) return live.length ? [group(live)] : [];
  return live.map((m) => group([m]));
}

function add(a: Float32Array, b: Float32Array): void {
  for (let i = 0; i < a.length; i++) a[i]! += b[i]!;
}

/** Row lookup in an embedding table, as float32. */
function embeddingRows(e: ModelWeights["embed"]): (row: number) => Float32Array {
  if (e.dtype === "f32")
    return (r) => (e.data as Float32Array).subarray(r * e.cols, (r + 1) * e.cols);
  if (e.dtype === "bf16")
    return (r) =>
      bf16ArrayToFloat32((e.data as Uint16Array).subarray(r * e.cols, (r + 1) * e.cols));
  const all = weightToF32(e);
  return (r) => all.subarray(r * e.cols, (r + 1) * e.cols);
}
