// Routed experts of one MoE layer: grouping a batch's (token, expert) pairs by expert and
// running them in one grouped-FFN call. The single-process engine runs them in place; the
// shard server runs the same function on the experts it holds, so both sum the same way.
import { BufferPool } from "../util/buffer-pool.ts";
import type { Backend } from "./backend.ts";
import type { MlpWeights } from "./loader.ts";

/** Computes the weighted sum of routed experts for each token of a layer. */
export interface ExpertRunner {
  /**
   * x [T, dim]; ids/weights [T, topK] from the router. Resolves [T, dim] =
   * sum_k weight[t,k] * expert_{ids[t,k]}(x[t]).
   */
  run(
    layer: number,
    x: Float32Array,
    t: number,
    dim: number,
    ids: Int32Array,
    weights: Float32Array,
    topK: number,
  ): Promise<Float32Array>;
  /**
   * Hands back a result of run() the caller has finished with: the runner may reuse its
   * memory for a later result (a fresh multi-MiB array per layer costs page faults and
   * collector work). Optional both ways: a runner may lack it, a caller may not call it.
   */
  release?(result: Float32Array): void;
}

/** (token, expert, weight) triples grouped by expert: the grouped FFN's input layout. */
export interface GroupedRows {
  /** Distinct experts, ascending. */
  experts: number[];
  /** [experts.length + 1] row offsets. */
  offsets: Int32Array;
  /** The caller's activations [tokens, dim], unchanged: rows are read through xIndex (no copies). */
  x: Float32Array;
  /** [rows] the row of x each grouped row reads (its token). */
  xIndex: Int32Array;
  rowWeight: Float32Array;
  /** [rows] the token each row belongs to. */
  outIndex: Int32Array;
}

/**
 * Groups assignments by expert (stable: tokens ascending within an expert). Rows are not
 * copied: each grouped row names its token's row of x, and the FFN gathers.
 */
export function groupByExpert(
  x: Float32Array,
  _dim: number,
  token: ArrayLike<number>,
  expert: ArrayLike<number>,
  weight: ArrayLike<number>,
): GroupedRows {
  const n = token.length;
  // One buffer for the four arrays: a typed array of more than 64 bytes gets its own
  // off-heap allocation (about 1 µs each, and collector work), and this runs for every
  // layer of every step, on the gateway and on every shard.
  const buf = new ArrayBuffer(4 * (4 * n + 1));
  const order = sortByExpert(token, expert, new Uint32Array(buf, 0, n));
  const rowWeight = new Float32Array(buf, 4 * n, n);
  const outIndex = new Int32Array(buf, 8 * n, n);
  const offsets = new Int32Array(buf, 12 * n, n + 1);
  const experts: number[] = [];
  for (let r = 0; r < n; r++) {
    const i = order[r]!;
    if (experts.length === 0 || experts[experts.length - 1] !== expert[i]) {
      offsets[experts.length] = r;
      experts.push(expert[i]!);
    }
    rowWeight[r] = weight[i]!;
    outIndex[r] = token[i]!;
  }
  offsets[experts.length] = n;
  return {
    experts,
    offsets: offsets.subarray(0, experts.length + 1),
    x,
    xIndex: outIndex,
    rowWeight,
    outIndex,
  };
}

/** Widest span of expert keys sortByExpert counts in a dense table. */
const DENSE_KEYS = 65536;
const denseCounts = new Int32Array(DENSE_KEYS);

/**
 * Assignment indices ordered by (expert, token), ties in input order. When tokens come in
 * non-decreasing order (the router's layout, a shard's frames) a counting sort over the
 * distinct experts does it in linear time; otherwise a comparison sort.
 */
function sortByExpert(
  token: ArrayLike<number>,
  expert: ArrayLike<number>,
  order: Uint32Array,
): Uint32Array {
  const n = token.length;
  let sorted = true;
  for (let i = 1; i < n && sorted; i++) sorted = token[i]! >= token[i - 1]!;
  if (!sorted) {
    for (let i = 0; i < n; i++) order[i] = i;
    return order.sort((a, b) => expert[a]! - expert[b]! || token[a]! - token[b]! || a - b);
  }
  // Experts of one layer are small integers: count into a dense table (reused: this
  // function runs synchronously, for every layer of every step). Keys spread wider (a
  // shard's batch over several layers) are counted in a Map.
  let min = Number.POSITIVE_INFINITY;
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < n; i++) {
    const e = expert[i]!;
    if (e < min) min = e;
    if (e > max) max = e;
  }
  if (n > 0 && max - min < DENSE_KEYS && Number.isInteger(min) && Number.isInteger(max)) {
    const range = max - min + 1;
    const next = denseCounts.subarray(0, range).fill(0);
    for (let i = 0; i < n; i++) next[expert[i]! - min]!++;
    for (let k = 0, at = 0; k < range; k++) {
      const c = next[k]!;
      next[k] = at;
      at += c;
    }
    for (let i = 0; i < n; i++) order[next[expert[i]! - min]!++] = i;
    return order;
  }
  const counts = new Map<number, number>();
  for (let i = 0; i < n; i++) counts.set(expert[i]!, (counts.get(expert[i]!) ?? 0) + 1);
  const start = new Map<number, number>();
  let at = 0;
  for (const e of [...counts.keys()].sort((a, b) => a - b)) {
    start.set(e, at);
    at += counts.get(e)!;
  }
  for (let i = 0; i < n; i++) {
    const s = start.get(expert[i]!)!;
    order[s] = i;
    start.set(expert[i]!, s + 1);
  }
  return order;
}

/** Runs grouped rows through the given experts' weights: [numOut, dim] (in `out` if given). */
export function runGrouped(
  backend: Backend,
  g: GroupedRows,
  dim: number,
  numOut: number,
  weightsOf: (expert: number) => MlpWeights,
  out?: Float32Array,
): Float32Array {
  const w = g.experts.map(weightsOf);
  return backend.moe({
    x: g.x,
    xIndex: g.xIndex,
    dim,
    offsets: g.offsets,
    w1: w.map((e) => e.gate),
    w3: w.map((e) => e.up),
    w2: w.map((e) => e.down),
    rowWeight: g.rowWeight,
    outIndex: g.outIndex,
    numOut,
    out,
  });
}

/** Experts held in this process. */
export class LocalExperts implements ExpertRunner {
  readonly #backend: Backend;
  readonly #experts: (layer: number) => Map<number, MlpWeights>;
  /** Results handed back (release()), reused by later run()s. */
  readonly #results = new BufferPool(4);

  constructor(backend: Backend, experts: (layer: number) => Map<number, MlpWeights>) {
    this.#backend = backend;
    this.#experts = experts;
  }

  async run(
    layer: number,
    x: Float32Array,
    t: number,
    dim: number,
    ids: Int32Array,
    weights: Float32Array,
    topK: number,
  ): Promise<Float32Array> {
    const token = new Int32Array(t * topK);
    for (let i = 0; i < token.length; i++) token[i] = Math.floor(i / topK);
    const g = groupByExpert(x, dim, token, ids, weights);
    const held = this.#experts(layer);
    return runGrouped(
      this.#backend,
      g,
      dim,
      t,
      (e) => {
        const w = held.get(e);
        if (!w) throw new Error(`expert ${e} of layer ${layer} is not loaded here`);
        return w;
      },
      this.#results.f32(t * dim),
    );
  }

  release(result: Float32Array): void {
    this.#results.give(result);
  }
}
