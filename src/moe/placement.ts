// The placement planner: which shard holds which (MoE layer, routed expert). Pure: no I/O,
// same input -> same plan, ties always broken by the lower index.
//
// Without redundant slots every MoE layer gets the same contiguous expert ranges. With
// `redundantExperts > 0` it follows DeepSeek's EPLB (global policy): the hottest experts get
// extra copies, each copy carrying load / copies, and the copies are packed heaviest first
// onto the least-loaded shard that has a free slot and does not hold that expert yet.
import { checkExpertLayout, type ExpertLayout } from "../api/presets.ts";
import { ExpertMeshError } from "../util/errors.ts";

/**
 * Observed routed-token counts per expert (tokens over any window; only ratios matter):
 * one array of `routedExperts` counts for every MoE layer, or one such array per MoE layer
 * in `moeLayers` order.
 */
export type ExpertLoad = readonly number[] | readonly (readonly number[])[];

export interface PlacementInput {
  /** Expert layout of the model; a full ModelArchitecture fits. */
  architecture: ExpertLayout;
  /** Expert shards (NATS subjects `...shard.<k>`), k = 0..numShards-1. */
  numShards: number;
  /** Extra expert slots in total over all shards, per layer (default 0). */
  redundantExperts?: number;
  /** Per-expert token counts; uniform when absent. */
  expertLoad?: ExpertLoad;
  /** Plan version, a positive integer carried in every frame (default 1). */
  version?: number;
  /**
   * Multi-token-prediction layers to place after the blocks (default 0): layers numLayers..
   * numLayers + mtpLayers - 1 are MoE layers too (DeepSeek-V3's layer 61, for MTP drafts).
   */
  mtpLayers?: number;
}

/** Expected per-shard load of one layer under a given expert load. */
export interface LayerBalance {
  /** Expected tokens per shard, [numShards], in the units of the load; an expert's load is split evenly over its copies. */
  shardLoad: number[];
  /** max(shardLoad) / mean(shardLoad): 1 is perfect balance; 1 when the load is all zero. */
  maxOverMean: number;
}

/** Where the experts of one MoE layer live. */
export interface LayerPlacement {
  /** Transformer block index (0-based, counting dense layers). */
  layer: number;
  /** Per expert, [routedExperts][copies]: shard indices holding it, the first is its primary. */
  replicas: number[][];
  /** Per shard, [numShards][<= slotsPerShard]: the expert ids it holds, ascending. */
  shardExperts: number[][];
  /** Expected balance under the load the plan was made for (uniform if none). */
  balance: LayerBalance;
}

/** A versioned placement of every (MoE layer, routed expert) onto shards. */
export interface PlacementPlan {
  /** Plan version (positive integer); shards refuse frames of a plan they have not loaded. */
  version: number;
  numShards: number;
  routedExperts: number;
  /** Extra expert copies per layer beyond one per expert. */
  redundantExperts: number;
  /** Expert slots per shard and layer: each shard holds at most this many experts (exactly this many when redundantExperts > 0). */
  slotsPerShard: number;
  /** Indices of the MoE layers, ascending (layers >= firstDenseLayers). */
  moeLayers: number[];
  /** One entry per MoE layer, in `moeLayers` order. */
  layers: LayerPlacement[];
}

/**
 * Throws EM_PLAN_MISMATCH unless `plan` places this model's experts: the same routed experts
 * per layer and the same MoE layers (a plan for another model would start and then fail
 * every request, or leave a shard holding nothing).
 */
export function checkPlanFitsModel(
  plan: PlacementPlan,
  architecture: ExpertLayout,
  source: string,
  /** MTP layers the model has: a plan may place them too (PlacementInput.mtpLayers). */
  mtpLayers = 0,
): void {
  const layout = checkExpertLayout(architecture);
  const moeLayers = range(layout.firstDenseLayers, layout.numLayers);
  /** The MoE layers with `n` MTP layers after them, as a plan lists them. */
  const withMtp = (n: number) => range(layout.firstDenseLayers, layout.numLayers + n).join();
  const span = (l: number[]) => (l.length === 0 ? "none" : `${l[0]}..${l[l.length - 1]}`);
  const layers = plan.moeLayers.join();
  const extra = plan.moeLayers.filter((l) => l >= layout.numLayers);
  if (mtpLayers === 0 && extra.length > 0 && layers === withMtp(extra.length))
    throw new ExpertMeshError(
      "EM_PLAN_MISMATCH",
      `${source} places the experts of an MTP layer (layer ${extra.join(", ")}), but the model has none ` +
        "(num_nextn_predict_layers is 0): plan without --mtp, and drop spec.gateway.speculative.method mtp",
    );
  if (
    plan.routedExperts !== layout.routedExperts ||
    (layers !== withMtp(0) && layers !== withMtp(mtpLayers))
  )
    throw new ExpertMeshError(
      "EM_PLAN_MISMATCH",
      `${source} places ${plan.routedExperts} experts per layer in MoE layers ${span(plan.moeLayers)}, ` +
        `but the model has ${layout.routedExperts} in layers ${span(moeLayers)}: plan for this model ` +
        "(expertmesh plan --model DIR, or its preset)",
    );
}

/** Plans expert placement. Throws EM_ARCH_INVALID, EM_PLAN_INVALID or EM_PLAN_LOAD_INVALID. */
export function planPlacement(input: PlacementInput): PlacementPlan {
  const layout = checkExpertLayout(input.architecture);
  const numExperts = layout.routedExperts;
  const numShards = input.numShards;
  const redundant = input.redundantExperts ?? 0;
  const version = input.version ?? 1;
  const mtp = input.mtpLayers ?? 0;
  checkPlanShape(numExperts, numShards, redundant, version);
  if (!Number.isInteger(mtp) || mtp < 0 || mtp > 4)
    throw new ExpertMeshError(
      "EM_PLAN_INVALID",
      `mtpLayers must be an integer in 0..4, got ${mtp}`,
    );

  const moeLayers = range(layout.firstDenseLayers, layout.numLayers + mtp);
  const loads = loadPerLayer(input.expertLoad, moeLayers.length, numExperts);
  const slotsPerShard = Math.ceil((numExperts + redundant) / numShards);
  const layers = moeLayers.map((layer, i) => {
    const load = loads[i]!;
    const replicas =
      redundant === 0
        ? contiguousReplicas(numExperts, numShards)
        : packReplicas(load, replicaCounts(load, numShards, redundant), numShards, slotsPerShard);
    const shardExperts = expertsByShard(replicas, numShards);
    return { layer, replicas, shardExperts, balance: layerBalance(replicas, numShards, load) };
  });
  return {
    version,
    numShards,
    routedExperts: numExperts,
    redundantExperts: redundant,
    slotsPerShard,
    moeLayers,
    layers,
  };
}

/**
 * The shard to send each of a token's routed experts to in `layer`, [expertIds.length].
 * An expert with copies uses copy `tokenIndex % copies`: pass the token's index in its batch
 * (a non-negative integer) to spread tokens evenly over copies (what the balance figures
 * assume); 0 means primaries.
 * Throws EM_PLAN_LOOKUP for a dense or unknown layer or an expert id out of range.
 */
export function shardsForExperts(
  plan: PlacementPlan,
  layer: number,
  expertIds: readonly number[],
  tokenIndex = 0,
): number[] {
  const placement = layerOf(plan, layer);
  return expertIds.map((expert) => {
    const copies = placement.replicas[expert];
    if (!copies) {
      throw new ExpertMeshError(
        "EM_PLAN_LOOKUP",
        `expert ${expert} is out of range 0..${plan.routedExperts - 1} (layer ${layer})`,
      );
    }
    return copies[tokenIndex % copies.length]!;
  });
}

/** The placement of one MoE layer. Throws EM_PLAN_LOOKUP for a dense or unknown layer. */
export function layerOf(plan: PlacementPlan, layer: number): LayerPlacement {
  const placement = plan.layers[layer - (plan.moeLayers[0] ?? 0)];
  if (!placement || placement.layer !== layer) {
    throw new ExpertMeshError(
      "EM_PLAN_LOOKUP",
      `layer ${layer} is not a MoE layer of this plan (MoE layers: ${plan.moeLayers[0]}..${plan.moeLayers.at(-1)})`,
    );
  }
  return placement;
}

/**
 * Worst expected imbalance, max over MoE layers of max(shard load) / mean(shard load),
 * for a plan under a (possibly different) observed load. 1 is perfect.
 * Throws EM_PLAN_LOAD_INVALID for a load of the wrong shape.
 */
export function planImbalance(plan: PlacementPlan, expertLoad: ExpertLoad): number {
  const loads = loadPerLayer(expertLoad, plan.layers.length, plan.routedExperts);
  let worst = 1;
  plan.layers.forEach((placement, i) => {
    const { maxOverMean } = layerBalance(placement.replicas, plan.numShards, loads[i]!);
    worst = Math.max(worst, maxOverMean);
  });
  return worst;
}

/**
 * Expected imbalance of a whole step: sum over MoE layers of the busiest shard's load over
 * the sum of the mean shard load. Every layer waits for its slowest shard, so this is how
 * much longer a step takes than with perfect balance. 1 is perfect.
 */
export function planStepImbalance(plan: PlacementPlan, expertLoad: ExpertLoad): number {
  const loads = loadPerLayer(expertLoad, plan.layers.length, plan.routedExperts);
  let busiest = 0;
  let mean = 0;
  plan.layers.forEach((placement, i) => {
    const { shardLoad } = layerBalance(placement.replicas, plan.numShards, loads[i]!);
    busiest += Math.max(...shardLoad);
    mean += shardLoad.reduce((a, b) => a + b, 0) / plan.numShards;
  });
  return mean > 0 ? busiest / mean : 1;
}

/** Expected per-shard load of one layer; each expert's load split evenly over its copies. */
export function layerBalance(
  replicas: readonly (readonly number[])[],
  numShards: number,
  load: readonly number[],
): LayerBalance {
  const shardLoad = new Array<number>(numShards).fill(0);
  replicas.forEach((shards, expert) => {
    for (const shard of shards) shardLoad[shard]! += load[expert]! / shards.length;
  });
  const mean = shardLoad.reduce((a, b) => a + b, 0) / numShards;
  const maxOverMean = mean > 0 ? Math.max(...shardLoad) / mean : 1;
  return { shardLoad, maxOverMean };
}

function checkPlanShape(numExperts: number, numShards: number, redundant: number, version: number) {
  const fail = (msg: string) => {
    throw new ExpertMeshError("EM_PLAN_INVALID", msg);
  };
  if (!Number.isSafeInteger(numShards) || numShards < 1) {
    fail(`shards must be a positive integer, got ${numShards}`);
  }
  if (numShards > numExperts) {
    fail(`${numShards} shards for ${numExperts} routed experts: a shard would hold no expert`);
  }
  if (!Number.isSafeInteger(redundant) || redundant < 0) {
    fail(`redundantExperts must be a non-negative integer, got ${redundant}`);
  }
  const maxRedundant = numExperts * (numShards - 1);
  if (redundant > maxRedundant) {
    fail(
      `redundantExperts ${redundant} exceeds ${maxRedundant} = routedExperts * (shards - 1): no shard may hold two copies of an expert`,
    );
  }
  if (redundant > 0 && (numExperts + redundant) % numShards !== 0) {
    fail(
      `routedExperts + redundantExperts = ${numExperts + redundant} must be a multiple of ${numShards} shards so every shard has the same slots`,
    );
  }
  if (!Number.isSafeInteger(version) || version < 1) {
    fail(`plan version must be a positive integer, got ${version}`);
  }
}

/** The load of every MoE layer, [numLayers][numExperts]; uniform ones when absent. */
function loadPerLayer(load: ExpertLoad | undefined, numLayers: number, numExperts: number) {
  const fail = (msg: string): never => {
    throw new ExpertMeshError("EM_PLAN_LOAD_INVALID", msg);
  };
  if (load === undefined) return new Array(numLayers).fill(new Array(numExperts).fill(1));
  if (!Array.isArray(load)) return fail("expert load must be an array");
  const perLayer = Array.isArray(load[0]);
  const rows = (perLayer ? load : new Array(numLayers).fill(load)) as unknown[];
  if (rows.length !== numLayers) {
    fail(`expert load has ${rows.length} per-layer rows; the model has ${numLayers} MoE layers`);
  }
  rows.forEach((row, i) => {
    const where = perLayer ? `expert load row ${i}` : "expert load";
    if (!Array.isArray(row) || row.length !== numExperts) {
      fail(`${where} must hold ${numExperts} counts (one per routed expert)`);
    }
    for (const [expert, v] of (row as unknown[]).entries()) {
      if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
        fail(`${where}: expert ${expert} has ${v}; counts must be finite and >= 0`);
      }
    }
  });
  return rows as number[][];
}

/** Contiguous ranges, [numExperts][1]: the first numExperts % numShards shards hold one more. */
function contiguousReplicas(numExperts: number, numShards: number): number[][] {
  const base = Math.floor(numExperts / numShards);
  const extra = numExperts % numShards;
  const replicas: number[][] = [];
  for (let shard = 0; shard < numShards; shard++) {
    const count = base + (shard < extra ? 1 : 0);
    for (let i = 0; i < count; i++) replicas.push([shard]);
  }
  return replicas;
}

/** Copies per expert, [numExperts]: each redundant slot goes to the highest load/copies. */
function replicaCounts(load: readonly number[], numShards: number, redundant: number): number[] {
  const counts = load.map(() => 1);
  for (let r = 0; r < redundant; r++) {
    let best = -1;
    for (let e = 0; e < load.length; e++) {
      if (counts[e]! >= numShards) continue; // at most one copy per shard
      // load[e]/counts[e] > load[best]/counts[best], without rounding; ties keep the lower id.
      if (best < 0 || load[e]! * counts[best]! > load[best]! * counts[e]!) best = e;
    }
    counts[best]!++;
  }
  return counts;
}

/**
 * Packs `counts[e]` copies of every expert e (each weighing load[e] / counts[e] tokens) onto
 * shards of `slotsPerShard` slots, heaviest first into the least-loaded shard with a free
 * slot that does not hold the expert yet. Returns per expert its shards, [numExperts][copies].
 * Needs sum(counts) = numShards * slotsPerShard and counts[e] <= numShards. Exported for
 * tests; planPlacement is the entry point.
 */
export function packReplicas(
  load: readonly number[],
  counts: readonly number[],
  numShards: number,
  slotsPerShard: number,
): number[][] {
  const items: { expert: number; weight: number }[] = [];
  counts.forEach((n, expert) => {
    for (let i = 0; i < n; i++) items.push({ expert, weight: load[expert]! / n });
  });
  items.sort((a, b) => b.weight - a.weight || a.expert - b.expert);

  const weight = (expert: number) => load[expert]! / counts[expert]!;
  const replicas: number[][] = counts.map(() => []);
  const held = Array.from({ length: numShards }, () => new Set<number>());
  const shardLoad = new Array<number>(numShards).fill(0);
  const lightest = (ok: (shard: number) => boolean) => {
    let best = -1;
    for (let s = 0; s < numShards; s++) {
      if (ok(s) && (best < 0 || shardLoad[s]! < shardLoad[best]!)) best = s;
    }
    return best;
  };
  const put = (expert: number, shard: number) => {
    held[shard]!.add(expert);
    shardLoad[shard]! += weight(expert);
  };

  for (const { expert } of items) {
    const hasRoom = (s: number) => held[s]!.size < slotsPerShard;
    let shard = lightest((s) => hasRoom(s) && !held[s]!.has(expert));
    if (shard < 0) {
      // Every shard with room already holds this expert. Some full shard t lacks it, and t
      // holds an expert y the roomy shard s lacks (s has fewer experts than t and one of
      // them is this one): move y from t to s, and put this copy on t.
      const s = lightest(hasRoom);
      shard = lightest((t) => !held[t]!.has(expert));
      const movable = [...held[shard]!].filter((y) => !held[s]!.has(y));
      const y = movable.reduce((a, b) => (weight(b) < weight(a) ? b : a));
      held[shard]!.delete(y);
      shardLoad[shard]! -= weight(y);
      put(y, s);
      replicas[y]![replicas[y]!.indexOf(shard)] = s;
    }
    put(expert, shard);
    replicas[expert]!.push(shard);
  }
  return replicas;
}

/** Inverts replicas: per shard the expert ids it holds, ascending. */
function expertsByShard(replicas: readonly (readonly number[])[], numShards: number): number[][] {
  const byShard = Array.from({ length: numShards }, () => [] as number[]);
  replicas.forEach((shards, expert) => {
    for (const shard of shards) byShard[shard]!.push(expert);
  });
  return byShard;
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from }, (_, i) => from + i);
}
