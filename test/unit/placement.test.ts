import { describe, expect, it } from "vitest";
import type { ExpertLayout } from "../../src/api/presets.ts";
import {
  checkPlanFitsModel,
  type PlacementInput,
  type PlacementPlan,
  packReplicas,
  planImbalance,
  planPlacement,
  shardsForExperts,
} from "../../src/moe/placement.ts";
import { parsePlan, serializePlan } from "../../src/moe/plan-json.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

/** numLayers 4, one dense layer: MoE layers 1..3. */
const layout = (routedExperts: number): ExpertLayout => ({
  numLayers: 4,
  firstDenseLayers: 1,
  routedExperts,
  expertsPerToken: Math.min(4, routedExperts),
});

function expectCode(fn: () => unknown, code: string, message?: RegExp) {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ExpertMeshError);
    expect((err as ExpertMeshError).code).toBe(code);
    if (message) expect((err as Error).message).toMatch(message);
    return;
  }
  expect.fail(`expected ${code}`);
}

/** Zipf (s = 1) over 64 experts; rank r is expert (r * 37) % 64 so hot ids are scattered. */
const zipf64 = (() => {
  const load = new Array<number>(64).fill(0);
  for (let r = 0; r < 64; r++) load[(r * 37) % 64] = Math.round(10000 / (r + 1));
  return load;
})();

describe("without redundant experts: contiguous ranges", () => {
  it.each([
    // experts, shards, expected experts per shard (as [first, last])
    [
      16,
      4,
      [
        [0, 3],
        [4, 7],
        [8, 11],
        [12, 15],
      ],
    ],
    [16, 1, [[0, 15]]],
    [16, 16, Array.from({ length: 16 }, (_, i) => [i, i])],
    [
      10,
      4,
      [
        [0, 2],
        [3, 5],
        [6, 7],
        [8, 9],
      ],
    ],
    [
      7,
      3,
      [
        [0, 2],
        [3, 4],
        [5, 6],
      ],
    ],
    [
      64,
      6,
      [
        [0, 10],
        [11, 21],
        [22, 32],
        [33, 43],
        [44, 53],
        [54, 63],
      ],
    ],
  ])("%i experts on %i shards", (experts, shards, ranges) => {
    const plan = planPlacement({ architecture: layout(experts), numShards: shards });
    expect(plan.moeLayers).toEqual([1, 2, 3]);
    expect(plan.slotsPerShard).toBe(Math.ceil(experts / shards));
    for (const l of plan.layers) {
      expect(l.shardExperts.map((e) => [e[0], e.at(-1)])).toEqual(ranges);
      expect(l.replicas).toEqual(plan.layers[0]!.replicas); // identical for every layer
      // every expert exactly once
      expect(l.replicas.every((r) => r.length === 1)).toBe(true);
      expect(l.shardExperts.flat()).toEqual(Array.from({ length: experts }, (_, i) => i));
    }
  });

  it("ignores load for placement but reports its balance", () => {
    const plan = planPlacement({ architecture: layout(64), numShards: 8, expertLoad: zipf64 });
    expect(plan.layers[0]!.shardExperts[0]).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    expect(plan.layers[0]!.balance.maxOverMean).toBeCloseTo(2.2183, 4);
  });
});

describe("with redundant experts (EPLB)", () => {
  it.each([
    [16, 4, 4],
    [16, 4, 16],
    [16, 4, 48], // every expert on every shard
    [64, 8, 8],
    [64, 8, 16],
    [10, 5, 5],
    [256, 32, 32],
  ])("%i experts, %i shards, %i redundant: full, distinct slots", (experts, shards, redundant) => {
    for (const expertLoad of [
      undefined,
      Array.from({ length: experts }, (_, i) => (i * 7919) % 101),
    ]) {
      const plan = planPlacement({
        architecture: layout(experts),
        numShards: shards,
        redundantExperts: redundant,
        expertLoad,
      });
      expect(plan.slotsPerShard).toBe((experts + redundant) / shards);
      for (const l of plan.layers) {
        for (const held of l.shardExperts) {
          expect(held).toHaveLength(plan.slotsPerShard);
          expect(new Set(held).size).toBe(held.length);
          expect([...held].sort((a, b) => a - b)).toEqual(held);
        }
        expect(l.replicas.every((r) => r.length >= 1 && new Set(r).size === r.length)).toBe(true);
        expect(l.replicas.flat()).toHaveLength(experts + redundant);
      }
    }
  });

  it("gives the hottest experts the extra copies", () => {
    const plan = planPlacement({
      architecture: layout(64),
      numShards: 8,
      redundantExperts: 8,
      expertLoad: zipf64,
    });
    const copies = Object.fromEntries(
      plan.layers[0]!.replicas.flatMap((r, e) => (r.length > 1 ? [[e, r.length]] : [])),
    );
    // ranks 0, 1, 2, 3 of the Zipf load are experts 0, 37, 10, 47
    expect(copies).toEqual({ 0: 5, 37: 3, 10: 2, 47: 2 });
  });

  it("without load replicates the lowest expert ids", () => {
    const plan = planPlacement({ architecture: layout(16), numShards: 4, redundantExperts: 4 });
    const replicated = plan.layers[0]!.replicas.flatMap((r, e) => (r.length > 1 ? [e] : []));
    expect(replicated).toEqual([0, 1, 2, 3]);
    expect(plan.layers[0]!.balance.maxOverMean).toBe(1);
  });

  it("plans each layer for its own load", () => {
    const hotFirst = Array.from({ length: 16 }, (_, i) => (i === 0 ? 100 : 1));
    const hotLast = Array.from({ length: 16 }, (_, i) => (i === 15 ? 100 : 1));
    const plan = planPlacement({
      architecture: layout(16),
      numShards: 4,
      redundantExperts: 4,
      expertLoad: [hotFirst, hotLast, hotFirst],
    });
    // 100 -> 4 copies (capped at one per shard); the 4th slot then goes to the lowest id of load 1
    expect(plan.layers.map((l) => l.replicas[0]!.length)).toEqual([4, 2, 4]);
    expect(plan.layers.map((l) => l.replicas[15]!.length)).toEqual([1, 4, 1]);
  });

  it("repairs a dead end by moving the lightest movable expert", () => {
    // 2 shards x 3 slots; expert 3 has 2 copies of weight 5. Greedy puts 0 (100) on shard 0
    // and fills shard 1 with 1, 2, 4; both copies of 3 would then need shard 0.
    const replicas = packReplicas([100, 10, 10, 10, 9], [1, 1, 1, 2, 1], 2, 3);
    expect(replicas).toEqual([[0], [1], [1], [0, 1], [0]]);
  });
});

describe("load balance under a Zipf load, 64 experts on 8 shards", () => {
  const total = zipf64.reduce((a, b) => a + b, 0);
  const meanPerShard = total / 8;
  // No placement can beat the heaviest single copy: 10000 tokens / 5929.75 mean = 1.686.
  const hottestOverMean = 10000 / meanPerShard;

  it.each([
    // redundant, expected max/mean (4 decimals), bound it must stay below
    [0, 2.2183, 2.3],
    [8, 1.001, 1.01],
    [16, 1.0002, 1.001],
  ])("%i redundant: max/mean %f < %f", (redundant, expected, bound) => {
    const plan = planPlacement({
      architecture: layout(64),
      numShards: 8,
      redundantExperts: redundant,
      expertLoad: zipf64,
    });
    const imbalance = planImbalance(plan, zipf64);
    expect(imbalance).toBeCloseTo(expected, 4);
    expect(imbalance).toBeLessThan(bound);
    expect(plan.layers.every((l) => l.balance.maxOverMean === imbalance)).toBe(true);
    if (redundant === 0) expect(imbalance).toBeGreaterThan(hottestOverMean);
    if (redundant > 0) {
      // Greedy list scheduling: max <= mean + heaviest copy (here 2000 tokens).
      const l = plan.layers[0]!;
      const heaviestCopy = Math.max(...l.replicas.map((r, e) => zipf64[e]! / r.length));
      expect(imbalance).toBeLessThanOrEqual(1 + heaviestCopy / meanPerShard);
    }
  });

  it("planImbalance scores a plan under a different load", () => {
    const uniform = planPlacement({ architecture: layout(64), numShards: 8 });
    expect(planImbalance(uniform, new Array(64).fill(5))).toBe(1);
    expect(planImbalance(uniform, zipf64)).toBeCloseTo(2.2183, 4);
    expect(planImbalance(uniform, new Array(64).fill(0))).toBe(1);
  });
});

describe("validation", () => {
  const base: PlacementInput = { architecture: layout(16), numShards: 4 };
  it.each<[string, Partial<PlacementInput>, string, RegExp]>([
    ["zero shards", { numShards: 0 }, "EM_PLAN_INVALID", /positive integer/],
    ["negative shards", { numShards: -2 }, "EM_PLAN_INVALID", /positive integer/],
    ["fractional shards", { numShards: 1.5 }, "EM_PLAN_INVALID", /positive integer/],
    ["more shards than experts", { numShards: 17 }, "EM_PLAN_INVALID", /hold no expert/],
    ["negative redundant", { redundantExperts: -1 }, "EM_PLAN_INVALID", /non-negative/],
    ["two copies on a shard", { redundantExperts: 52 }, "EM_PLAN_INVALID", /exceeds 48/],
    ["uneven slots", { redundantExperts: 1 }, "EM_PLAN_INVALID", /multiple of 4/],
    ["plan version 0", { version: 0 }, "EM_PLAN_INVALID", /version/],
    ["negative MTP layers", { mtpLayers: -1 }, "EM_PLAN_INVALID", /mtpLayers/],
    ["fractional MTP layers", { mtpLayers: 0.5 }, "EM_PLAN_INVALID", /mtpLayers/],
    ["short load", { expertLoad: new Array(15).fill(1) }, "EM_PLAN_LOAD_INVALID", /16 counts/],
    [
      "negative load",
      { expertLoad: [-1, ...new Array(15).fill(1)] },
      "EM_PLAN_LOAD_INVALID",
      /expert 0/,
    ],
    [
      "NaN load",
      { expertLoad: [...new Array(15).fill(1), Number.NaN] },
      "EM_PLAN_LOAD_INVALID",
      /expert 15/,
    ],
    [
      "infinite load",
      { expertLoad: [Infinity, ...new Array(15).fill(1)] },
      "EM_PLAN_LOAD_INVALID",
      /finite/,
    ],
    ["empty load", { expertLoad: [] }, "EM_PLAN_LOAD_INVALID", /16 counts/],
    [
      "2 rows for 3 layers",
      { expertLoad: [new Array(16).fill(1), new Array(16).fill(1)] },
      "EM_PLAN_LOAD_INVALID",
      /3 MoE layers/,
    ],
    [
      "dense >= layers",
      { architecture: { ...layout(16), firstDenseLayers: 4 } },
      "EM_ARCH_INVALID",
      /at least one MoE layer/,
    ],
    [
      "top-k > experts",
      { architecture: { ...layout(16), expertsPerToken: 17 } },
      "EM_ARCH_INVALID",
      /expertsPerToken/,
    ],
  ])("%s", (_name, patch, code, message) => {
    expectCode(() => planPlacement({ ...base, ...patch }), code, message);
  });
});

describe("MTP layers (plan --mtp)", () => {
  // layout(16): 4 layers, the first dense.
  it("places the MTP layer after the blocks like any MoE layer", () => {
    const plan = planPlacement({ architecture: layout(16), numShards: 4, mtpLayers: 1 });
    expect(plan.moeLayers).toEqual([1, 2, 3, 4]);
    expect(plan.layers[3]!.shardExperts).toEqual(plan.layers[0]!.shardExperts);
  });

  it.each<[string, number, number, string | null]>([
    ["a plan without it, model with one", 0, 1, null],
    ["a plan with it, model with one", 1, 1, null],
    ["a plan without it, model without", 0, 0, null],
    ["a plan with it, model without", 1, 0, "an MTP layer (layer 4), but the model has none"],
    ["a plan with two, model with one", 2, 1, "MoE layers 1..5"],
  ])("checkPlanFitsModel: %s", (_name, planned, modelHas, error) => {
    const plan = planPlacement({ architecture: layout(16), numShards: 4, mtpLayers: planned });
    const check = () => checkPlanFitsModel(plan, layout(16), "plan.json", modelHas);
    if (error === null) expect(check).not.toThrow();
    else expectCode(check, "EM_PLAN_MISMATCH", new RegExp(error.replace(/[().]/g, "\\$&")));
  });
});

describe("determinism and lookups", () => {
  it("same input, same plan", () => {
    const input = {
      architecture: layout(64),
      numShards: 8,
      redundantExperts: 16,
      expertLoad: zipf64,
    };
    expect(serializePlan(planPlacement(input))).toBe(
      serializePlan(planPlacement(structuredClone(input))),
    );
  });

  it("shardsForExperts maps a token's experts to shards, spreading over copies", () => {
    const plan = planPlacement({ architecture: layout(16), numShards: 4, redundantExperts: 4 });
    const copies0 = plan.layers[1]!.replicas[0]!;
    expect(copies0).toHaveLength(2);
    expect(shardsForExperts(plan, 2, [0, 5, 15])).toEqual([
      copies0[0],
      ...shardsForExperts(plan, 2, [5, 15]),
    ]);
    expect(shardsForExperts(plan, 2, [0], 1)).toEqual([copies0[1]]);
    expect(shardsForExperts(plan, 2, [0], 2)).toEqual([copies0[0]]);
    const contiguous = planPlacement({ architecture: layout(16), numShards: 4 });
    expect(shardsForExperts(contiguous, 3, [0, 3, 4, 15])).toEqual([0, 0, 1, 3]);
  });

  it.each([
    ["dense layer", 0, [0]],
    ["past the last layer", 4, [0]],
    ["expert out of range", 1, [16]],
  ])("shardsForExperts rejects %s", (_name, layer, experts) => {
    const plan = planPlacement({ architecture: layout(16), numShards: 4 });
    expectCode(() => shardsForExperts(plan, layer, experts), "EM_PLAN_LOOKUP");
  });
});

describe("serializePlan / parsePlan", () => {
  const plans: [string, PlacementPlan][] = [
    ["contiguous", planPlacement({ architecture: layout(10), numShards: 4 })],
    [
      "redundant",
      planPlacement({
        architecture: layout(64),
        numShards: 8,
        redundantExperts: 16,
        expertLoad: zipf64,
        version: 7,
      }),
    ],
  ];
  it.each(plans)("round trips a %s plan", (_name, plan) => {
    const text = serializePlan(plan);
    expect(JSON.parse(text).kind).toBe("expertmesh.io/PlacementPlan");
    expect(parsePlan(text)).toEqual(plan);
  });

  const plan = plans[0]![1]; // 10 experts on 4 shards: 3, 3, 2, 2 (slots 3)
  type Mutable = Partial<Omit<PlacementPlan, "layers">> & {
    kind?: string;
    layers: { replicas: number[][]; shardExperts: number[][]; balance: { maxOverMean: unknown } }[];
  };
  it.each<[string, (p: Mutable) => void, RegExp]>([
    [
      "wrong kind",
      (p) => {
        p.kind = "Other";
      },
      /kind/,
    ],
    [
      "missing version",
      (p) => {
        delete p.version;
      },
      /version/,
    ],
    [
      "expert on no shard",
      (p) => {
        p.layers[0]!.replicas[3] = [];
      },
      /expert 3 is on no shard/,
    ],
    [
      "shard out of range",
      (p) => {
        p.layers[0]!.replicas[0] = [4];
      },
      /shard 4 out of range/,
    ],
    [
      "shard listed twice",
      (p) => {
        p.layers[0]!.replicas[0] = [0, 0];
        p.redundantExperts = 1;
        p.slotsPerShard = 4;
      },
      /listed twice/,
    ],
    [
      "shard over its slots",
      (p) => {
        p.layers[0]!.replicas[3] = [0];
        p.layers[0]!.shardExperts[0] = [0, 1, 2, 3];
        p.layers[0]!.shardExperts[1] = [4, 5];
      },
      /over its 3 slots/,
    ],
    [
      "shardExperts not the inverse",
      (p) => {
        p.layers[1]!.shardExperts[2] = [6];
      },
      /shardExperts\[2\]/,
    ],
    [
      "missing layer",
      (p) => {
        p.layers.pop();
      },
      /2 entries for 3 MoE layers/,
    ],
    [
      "layer order",
      (p) => {
        p.layers.reverse();
      },
      /layers\[0\]\.layer/,
    ],
    [
      "non-finite balance",
      (p) => {
        p.layers[0]!.balance.maxOverMean = null;
      },
      /maxOverMean/,
    ],
  ])("rejects %s", (_name, mutate, message) => {
    const corrupt = structuredClone(plan) as unknown as Mutable;
    corrupt.kind = "expertmesh.io/PlacementPlan";
    mutate(corrupt);
    expectCode(() => parsePlan(JSON.stringify(corrupt)), "EM_PLAN_CORRUPT", message);
  });

  it("rejects text that is not JSON", () => {
    expectCode(
      () => parsePlan(serializePlan(plan).slice(0, 40)),
      "EM_PLAN_CORRUPT",
      /not valid JSON/,
    );
  });
});
