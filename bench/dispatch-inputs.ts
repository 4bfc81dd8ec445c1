// What the dispatch benchmarks send: the two model shapes, their placement over 4 shards,
// one layer's seeded random routing, and the raw floor's requests (the same bytes per shard
// as the dispatcher's frames). Shared by the suite (dispatch.ts), its shard processes
// (dispatch-shards.ts) and the quick tools (dispatch-quick.ts, dispatch-inproc.ts), so that
// they all measure the same layers.
import { type PlacementPlan, planPlacement } from "../src/moe/placement.ts";
import { dispatchFrameBytes, HEADER_BYTES, type WireDtypeName } from "../src/moe/wire.ts";

export interface DispatchShape {
  hidden: number;
  topK: number;
  experts: number;
  /** The experts' intermediate size (passed on to the shard processes). */
  moe: number;
}

/** V2-Lite-like and V3-like. */
export const DISPATCH_SHAPES: readonly DispatchShape[] = [
  { hidden: 2048, topK: 6, experts: 64, moe: 1408 },
  { hidden: 7168, topK: 8, experts: 256, moe: 2048 },
];

export const DISPATCH_SHARDS = 4;

/** The shape of width `hidden` (2048 or 7168). */
export function shapeFor(hidden: number): DispatchShape {
  const shape = DISPATCH_SHAPES.find((s) => s.hidden === hidden);
  if (!shape)
    throw new Error(
      `hidden ${hidden}: the dispatch benchmarks have ${DISPATCH_SHAPES.map((s) => s.hidden).join(" and ")}`,
    );
  return shape;
}

/** The placement of a two-layer model (one dense, one MoE) over DISPATCH_SHARDS shards. */
export function benchPlan(shape: Pick<DispatchShape, "topK" | "experts">): PlacementPlan {
  return planPlacement({
    architecture: {
      numLayers: 2,
      firstDenseLayers: 1,
      routedExperts: shape.experts,
      expertsPerToken: shape.topK,
    },
    numShards: DISPATCH_SHARDS,
  });
}

/** A deterministic random number generator (mulberry32) for activations and routing. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One layer of T tokens: activations in [-1, 1), topK distinct random experts each, equal weights. */
export function layerInputs(
  shape: DispatchShape,
  T: number,
): { x: Float32Array; ids: Int32Array; weights: Float32Array } {
  const r = rng(T * 7919 + shape.hidden);
  const x = Float32Array.from({ length: T * shape.hidden }, () => r() * 2 - 1);
  const ids = new Int32Array(T * shape.topK);
  const weights = new Float32Array(T * shape.topK).fill(1 / shape.topK);
  for (let t = 0; t < T; t++) {
    const chosen = new Set<number>();
    while (chosen.size < shape.topK) chosen.add(Math.floor(r() * shape.experts));
    ids.set([...chosen], t * shape.topK);
  }
  return { x, ids, weights };
}

/**
 * The raw floor's request per shard for one layer: as many bytes as the dispatcher's frame
 * for that shard (one frame each), whose first u32 is the size of the combine reply the
 * responder answers with (dispatch-shards.ts). Shard k's subject is `subjectOf(k)`.
 */
export function floorRequests(
  plan: PlacementPlan,
  shape: DispatchShape,
  ids: Int32Array,
  dtype: WireDtypeName,
  subjectOf: (shard: number) => string,
): { raw: { subject: string; req: Uint8Array }[]; requestBytes: number; replyBytes: number } {
  const layer = plan.layers[0]!;
  const perShard = new Map<number, { tokens: Set<number>; assigns: number }>();
  for (let i = 0; i < ids.length; i++) {
    const shard = layer.replicas[ids[i]!]![0]!;
    const s = perShard.get(shard) ?? { tokens: new Set(), assigns: 0 };
    s.tokens.add(Math.floor(i / shape.topK));
    s.assigns++;
    perShard.set(shard, s);
  }
  const replyOf = (s: { tokens: Set<number> }) => HEADER_BYTES + 2 * s.tokens.size * shape.hidden;
  const raw = [...perShard.entries()].map(([k, s]) => {
    const req = new Uint8Array(dispatchFrameBytes(dtype, s.tokens.size, shape.hidden, s.assigns));
    new DataView(req.buffer).setUint32(0, replyOf(s), true);
    return { subject: subjectOf(k), req };
  });
  return {
    raw,
    requestBytes: raw.reduce((n, q) => n + q.req.length, 0),
    replyBytes: [...perShard.values()].reduce((n, s) => n + replyOf(s), 0),
  };
}
