// Load reports -> observations (src/operator/autoscale/load.ts) and the rebalancer's pure
// parts (rebalance.ts): proposals and the shards-first rollout state machine.
import { describe, expect, it } from "vitest";
import { planPlacement, planStepImbalance } from "../../src/moe/placement.ts";
import {
  type GatewayReport,
  LoadTracker,
  parseReport,
  type ShardReport,
} from "../../src/operator/autoscale/load.ts";
import { propose, type Rollout, step } from "../../src/operator/autoscale/rebalance.ts";

const opts = { windowMs: 10_000, staleMs: 5_000, expertWindowMs: 60_000 };
const gw = (id: string, waiting: number, planVersion = 1): GatewayReport => ({
  role: "gateway",
  id,
  waiting,
  planVersion,
});
const shard = (
  k: number,
  id: string,
  pending: number,
  extra: Partial<ShardReport> = {},
): ShardReport => ({
  role: "shard",
  shard: k,
  id,
  planVersion: 1,
  plans: [1],
  pendingTokens: pending,
  meanPendingTokens: pending,
  ...extra,
});

describe("parseReport", () => {
  it.each([
    ["gateway", JSON.stringify(gw("a", 3)), true],
    ["prefill gateway", JSON.stringify({ ...gw("a", 3), role: "prefill" }), true],
    ["prefill gateway without a depth", JSON.stringify({ role: "prefill", id: "a" }), false],
    ["shard", JSON.stringify(shard(0, "a", 5)), true],
    ["not JSON", "{", false],
    ["no id", JSON.stringify({ role: "gateway", waiting: 1 }), false],
    ["negative depth", JSON.stringify({ ...gw("a", 1), waiting: -1 }), false],
    ["NaN-ish depth", '{"role":"gateway","id":"a","waiting":"3"}', false],
    ["fractional shard", JSON.stringify({ ...shard(0, "a", 1), shard: 0.5 }), false],
    ["unknown role", JSON.stringify({ role: "x", id: "a" }), false],
  ])("%s", (_n, text, ok) => {
    expect(parseReport(new TextEncoder().encode(text)) !== undefined).toBe(ok);
  });
});

describe("LoadTracker.observe", () => {
  it("averages each reporter over the window, sums the reporters", () => {
    const t = new LoadTracker(opts);
    t.add(gw("a", 2), 0);
    t.add(gw("a", 4), 1000);
    t.add(gw("b", 10), 1000);
    expect(t.observe("gateway", 1000)).toEqual({ reporters: 2, total: 3 + 10 });
    // Samples older than the window drop out.
    t.add(gw("a", 8), 10_500);
    t.add(gw("b", 10), 10_500);
    expect(t.observe("gateway", 10_500)).toEqual({ reporters: 2, total: 6 + 10 });
  });

  it("keeps prefill gateways' reports apart from the gateways'", () => {
    const t = new LoadTracker(opts);
    t.add(gw("a", 2), 0);
    t.add({ ...gw("p", 6), role: "prefill" }, 0);
    expect(t.observe("gateway", 0)).toEqual({ reporters: 1, total: 2 });
    expect(t.observe("prefill", 0)).toEqual({ reporters: 1, total: 6 });
  });

  it("a reporter silent for longer than staleMs is absent; all silent is unknown", () => {
    const t = new LoadTracker(opts);
    t.add(shard(0, "a", 100), 0);
    t.add(shard(0, "b", 50), 3000);
    expect(t.observe("shard-0", 5500)).toEqual({ reporters: 1, total: 50 });
    const o = t.observe("shard-0", 9000);
    expect(o.reporters).toBe(0);
    expect(o.unknownReason).toMatch(/older than 5 s/);
    expect(t.observe("shard-1", 0).unknownReason).toBe("no load report received");
  });

  it("leaves copies on the previous weights out of observe, not out of fresh or expertLoad", () => {
    const t = new LoadTracker(opts);
    t.add(shard(0, "m-shard-0-7d9f5b6c4-abcde-7", 10), 0);
    t.add(shard(0, "m-shard-0-7d9f5b6c4-fghij-7", 30), 0);
    t.add(
      shard(0, "m-shard-0-prev-5c8d7f9b6-klmno-7", 400, { expertTokens: { 1: { 2: 9 } } }),
      0,
      true,
    );
    // HPA sees the Deployment's two replicas only...
    expect(t.observe("shard-0", 0)).toEqual({ reporters: 2, total: 40 });
    // ...but a plan change waits for the copy too (it serves the old gateways),
    expect(t.fresh("shard-0", 0).map((r) => r.id)).toHaveLength(3);
    // and its routed tokens are the model's traffic.
    expect(t.expertLoad([1], 4, 0).total).toBe(9);
    // A copy alone is no observation of the role.
    const only = new LoadTracker(opts);
    only.add(shard(1, "m-shard-1-prev-5c8d7f9b6-klmno-7", 5), 0, true);
    expect(only.observe("shard-1", 0)).toMatchObject({
      reporters: 0,
      unknownReason: "no load report received",
    });
  });

  it("sums per-expert tokens over the window and all shard replicas", () => {
    const t = new LoadTracker(opts);
    t.add(shard(0, "a", 0, { expertTokens: { 1: { 0: 5, 3: 1 } } }), 0);
    t.add(shard(1, "a", 0, { expertTokens: { 1: { 3: 2 }, 2: { 1: 7 }, 9: { 0: 100 } } }), 1000);
    const { load, total } = t.expertLoad([1, 2], 4, 1000);
    expect(load).toEqual([
      [5, 0, 0, 3],
      [0, 7, 0, 0],
    ]);
    expect(total).toBe(15); // layer 9 is not an MoE layer of this plan
    expect(t.expertLoad([1, 2], 4, 70_000).total).toBe(0);
  });
});

const arch = { numLayers: 3, firstDenseLayers: 1, routedExperts: 8, expertsPerToken: 2 };
// Hot experts the uniform plan did not copy (it copies experts 0 and 1).
const skewed = [
  [5, 5, 5, 5, 5, 5, 40, 80],
  [5, 5, 80, 40, 5, 5, 5, 5],
];

describe("propose", () => {
  const settings = { threshold: 1.2, minImprovement: 0.05, minTokens: 100 };
  const current = planPlacement({ architecture: arch, numShards: 2, redundantExperts: 2 });

  it("rolls out a plan that balances a skewed load better, one version up", () => {
    const p = propose(current, arch, skewed, 300, settings);
    expect(p.action).toBe("rollout");
    if (p.action !== "rollout") return;
    expect(p.plan.version).toBe(2);
    expect(p.before).toBeCloseTo(planStepImbalance(current, skewed), 9);
    expect(p.after).toBeLessThan(p.before * 0.95);
    expect(p.after).toBeCloseTo(planStepImbalance(p.plan, skewed), 9);
  });

  it.each([
    [
      "no redundant slots",
      planPlacement({ architecture: arch, numShards: 2 }),
      skewed,
      300,
      /redundantExperts is 0/,
    ],
    ["too few tokens", current, skewed, 99, /fewer than minTokens/],
    [
      "balanced enough",
      current,
      [Array(8).fill(10), Array(8).fill(10)],
      160,
      /within the threshold/,
    ],
  ])("none: %s", (_n, plan, load, total, reason) => {
    const p = propose(plan, arch, load, total, settings);
    expect(p.action).toBe("none");
    expect(p.reason).toMatch(reason);
  });
});

describe("rollout step: shards first, then gateways", () => {
  const plan = planPlacement({ architecture: arch, numShards: 2, redundantExperts: 2, version: 2 });
  const r: Rollout = {
    phase: "Preparing",
    plan,
    before: 1.5,
    after: 1.1,
    startedAt: 0,
    sentAt: Number.NEGATIVE_INFINITY,
  };
  const timing = { resendMs: 2000, prepareTimeoutMs: 30_000 };
  const loaded = (k: number, id: string, active = 1) =>
    shard(k, id, 0, { plans: active === 2 ? [2] : [1, 2], planVersion: active });

  it.each([
    ["sends prepare first", r, [[shard(0, "a", 0)], [shard(1, "a", 0)]], [], 100, "send"],
    [
      "waits while a replica lacks it",
      { ...r, sentAt: 100 },
      [[loaded(0, "a"), shard(0, "b", 0)], [loaded(1, "a")]],
      [],
      1000,
      "wait",
    ],
    [
      "re-sends after resendMs",
      { ...r, sentAt: 100 },
      [[shard(0, "a", 0)], [loaded(1, "a")]],
      [],
      2100,
      "send",
    ],
    [
      "a shard without any fresh report blocks",
      { ...r, sentAt: 100 },
      [[loaded(0, "a")], []],
      [],
      1000,
      "wait",
    ],
    [
      "all loaded -> activate",
      { ...r, sentAt: 100 },
      [[loaded(0, "a"), loaded(0, "b")], [loaded(1, "a")]],
      [],
      1000,
      "activated",
    ],
    [
      "times out",
      { ...r, sentAt: 100 },
      [[shard(0, "a", 0)], [loaded(1, "a")]],
      [],
      30_001,
      "failed",
    ],
    [
      "a load error fails at once",
      { ...r, sentAt: 100 },
      [[shard(0, "a", 0, { planError: "plan v2: no such file" })], [loaded(1, "a")]],
      [],
      1000,
      "failed",
    ],
    [
      "activating waits for gateways",
      { ...r, phase: "Activating", sentAt: 1000 },
      [[loaded(0, "a", 2)], [loaded(1, "a", 2)]],
      [gw("g", 0, 1)],
      1500,
      "wait",
    ],
    [
      "activating waits for shards",
      { ...r, phase: "Activating", sentAt: 1000 },
      [[loaded(0, "a", 1)], [loaded(1, "a", 2)]],
      [gw("g", 0, 2)],
      1500,
      "wait",
    ],
    [
      "done when all switched",
      { ...r, phase: "Activating", sentAt: 1000 },
      [[loaded(0, "a", 2)], [loaded(1, "a", 2)]],
      [gw("g", 0, 2)],
      1500,
      "done",
    ],
  ] as [string, Rollout, ShardReport[][], GatewayReport[], number, string][])(
    "%s",
    (_n, rollout, shards, gateways, now, next) => {
      const s = step(rollout, shards, gateways, now, timing, 2);
      expect(s.next).toBe(next);
      if (s.next === "send")
        expect(s.op).toBe(rollout.phase === "Preparing" ? "prepare" : "activate");
      if (s.next === "failed") expect(s.message).toMatch(/shard 0/);
    },
  );

  it("all switched, but the plan ConfigMap still names the old version: waits for it", () => {
    const all = [[loaded(0, "a", 2)], [loaded(1, "a", 2)]];
    const activating: Rollout = { ...r, phase: "Activating", sentAt: 1000 };
    const s = step(activating, all, [gw("g", 0, 2)], 1500, timing, 1);
    expect(s.next).toBe("wait");
    if (s.next === "wait") expect(s.message).toMatch(/ConfigMap/);
    expect(step(activating, all, [gw("g", 0, 2)], 1500, timing, 2).next).toBe("done");
  });
});
