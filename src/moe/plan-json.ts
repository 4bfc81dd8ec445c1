// Placement plans as JSON, for ConfigMaps (`<model>-plan`) and files. Parsing checks every
// invariant a shard or gateway relies on, so a corrupt plan fails loudly before any frame.
import { ExpertMeshError } from "../util/errors.ts";
import type { LayerPlacement, PlacementPlan } from "./placement.ts";

export const PLAN_KIND = "expertmesh.io/PlacementPlan";

/** JSON text of a plan: top-level fields one per line, each layer on one line (compact). */
export function serializePlan(plan: PlacementPlan): string {
  const { layers, ...head } = plan;
  const fields = Object.entries({ kind: PLAN_KIND, ...head }).map(
    ([k, v]) => `  ${JSON.stringify(k)}: ${JSON.stringify(v)}`,
  );
  const body = layers.map((layer) => `    ${JSON.stringify(layer)}`).join(",\n");
  return `{\n${fields.join(",\n")},\n  "layers": [\n${body}\n  ]\n}\n`;
}

/** Parses and validates plan JSON (from serializePlan). Throws EM_PLAN_CORRUPT. */
export function parsePlan(text: string): PlacementPlan {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new ExpertMeshError("EM_PLAN_CORRUPT", `plan is not valid JSON: ${String(err)}`, {
      cause: err,
    });
  }
  return validatePlan(value);
}

/**
 * Checks a parsed plan: every expert of every MoE layer on at least one shard, shard indices
 * in range, no expert twice on a shard, no shard over its slots, shardExperts the inverse of
 * replicas. Returns it typed. Throws EM_PLAN_CORRUPT naming the first bad field.
 */
export function validatePlan(value: unknown): PlacementPlan {
  const p = record(value, "plan");
  if (p["kind"] !== PLAN_KIND) corrupt("kind", `must be '${PLAN_KIND}'`);
  const version = int(p["version"], "version", 1);
  const numShards = int(p["numShards"], "numShards", 1);
  const routedExperts = int(p["routedExperts"], "routedExperts", 1);
  const redundantExperts = int(p["redundantExperts"], "redundantExperts", 0);
  const slotsPerShard = int(p["slotsPerShard"], "slotsPerShard", 1);
  const numCopies = routedExperts + redundantExperts;
  if (slotsPerShard * numShards < numCopies) {
    corrupt(
      "slotsPerShard",
      `${numShards} x ${slotsPerShard} slots cannot hold ${numCopies} experts`,
    );
  }
  const moeLayers = array(p["moeLayers"], "moeLayers").map((l, i) => int(l, `moeLayers[${i}]`, 0));
  moeLayers.forEach((l, i) => {
    if (i > 0 && l !== moeLayers[i - 1]! + 1) corrupt(`moeLayers[${i}]`, "must be consecutive");
  });
  if (moeLayers.length === 0) corrupt("moeLayers", "must not be empty");
  const layers = array(p["layers"], "layers");
  if (layers.length !== moeLayers.length) {
    corrupt("layers", `has ${layers.length} entries for ${moeLayers.length} MoE layers`);
  }
  const shape = { numShards, routedExperts, slotsPerShard, numCopies };
  return {
    version,
    numShards,
    routedExperts,
    redundantExperts,
    slotsPerShard,
    moeLayers,
    layers: layers.map((l, i) => validateLayer(l, `layers[${i}]`, moeLayers[i]!, shape)),
  };
}

interface Shape {
  numShards: number;
  routedExperts: number;
  slotsPerShard: number;
  numCopies: number;
}

function validateLayer(value: unknown, at: string, layer: number, s: Shape): LayerPlacement {
  const l = record(value, at);
  if (l["layer"] !== layer) corrupt(`${at}.layer`, `must be ${layer} (moeLayers order)`);
  const replicas = array(l["replicas"], `${at}.replicas`);
  if (replicas.length !== s.routedExperts) {
    corrupt(`${at}.replicas`, `has ${replicas.length} entries for ${s.routedExperts} experts`);
  }
  const expected = Array.from({ length: s.numShards }, () => [] as number[]);
  let numCopies = 0;
  const checkedReplicas = replicas.map((r, expert) => {
    const where = `${at}.replicas[${expert}]`;
    const shards = array(r, where).map((x, k) => int(x, `${where}[${k}]`, 0));
    if (shards.length === 0) corrupt(where, `expert ${expert} is on no shard`);
    for (const shard of shards) {
      if (shard >= s.numShards) corrupt(where, `shard ${shard} out of range 0..${s.numShards - 1}`);
      if (expected[shard]!.at(-1) === expert) corrupt(where, `shard ${shard} listed twice`);
      expected[shard]!.push(expert);
    }
    numCopies += shards.length;
    return shards;
  });
  if (numCopies !== s.numCopies) {
    corrupt(`${at}.replicas`, `holds ${numCopies} expert copies, expected ${s.numCopies}`);
  }
  const shardExperts = array(l["shardExperts"], `${at}.shardExperts`);
  if (shardExperts.length !== s.numShards) {
    corrupt(`${at}.shardExperts`, `has ${shardExperts.length} entries for ${s.numShards} shards`);
  }
  const checkedShardExperts = expected.map((want, shard) => {
    const where = `${at}.shardExperts[${shard}]`;
    const got = array(shardExperts[shard], where);
    if (want.length > s.slotsPerShard) {
      corrupt(where, `shard holds ${want.length} experts, over its ${s.slotsPerShard} slots`);
    }
    if (got.length !== want.length || got.some((e, k) => e !== want[k])) {
      corrupt(where, `must list exactly the experts whose replicas name shard ${shard}, ascending`);
    }
    return want;
  });
  const b = record(l["balance"], `${at}.balance`);
  const shardLoad = array(b["shardLoad"], `${at}.balance.shardLoad`).map((x, k) =>
    finite(x, `${at}.balance.shardLoad[${k}]`),
  );
  if (shardLoad.length !== s.numShards) {
    corrupt(`${at}.balance.shardLoad`, `has ${shardLoad.length} entries for ${s.numShards} shards`);
  }
  const maxOverMean = finite(b["maxOverMean"], `${at}.balance.maxOverMean`);
  return {
    layer,
    replicas: checkedReplicas,
    shardExperts: checkedShardExperts,
    balance: { shardLoad, maxOverMean },
  };
}

function corrupt(field: string, msg: string): never {
  throw new ExpertMeshError("EM_PLAN_CORRUPT", `plan ${field}: ${msg}`);
}

function record(v: unknown, at: string): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) corrupt(at, "must be an object");
  return v as Record<string, unknown>;
}

function array(v: unknown, at: string): unknown[] {
  if (!Array.isArray(v)) corrupt(at, "must be an array");
  return v;
}

function int(v: unknown, at: string, min: number): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
    corrupt(at, `must be an integer >= ${min}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function finite(v: unknown, at: string): number {
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
    corrupt(at, `must be a finite number >= 0, got ${JSON.stringify(v)}`);
  }
  return v;
}
