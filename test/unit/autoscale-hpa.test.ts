// HPA's algorithm for one role (src/operator/autoscale/hpa.ts), table-driven.
import { describe, expect, it } from "vitest";
import {
  type DecisionReason,
  decide,
  emptyHistory,
  type RoleHistory,
  type ScalePolicy,
  startingHistory,
} from "../../src/operator/autoscale/hpa.ts";

const policy: ScalePolicy = {
  min: 1,
  max: 10,
  target: 10,
  tolerance: 0.1,
  scaleUpStabilizationMs: 0,
  scaleDownStabilizationMs: 60_000,
  periodMs: 15_000,
  scaleUpMaxPods: 4,
  scaleUpMaxPercent: 100,
  scaleDownMaxPercent: 100,
};
const known = (reporters: number, perReplica: number) => ({
  reporters,
  total: reporters * perReplica,
});

describe("decide: one decision from an empty history", () => {
  const cases: [
    string,
    Partial<ScalePolicy>,
    number,
    number,
    ReturnType<typeof known>,
    number,
    DecisionReason,
  ][] = [
    // name, policy changes, current, ready, observation, desired, reason
    ["at target: no change", {}, 2, 2, known(2, 10), 2, "WithinTolerance"],
    ["within tolerance above", {}, 2, 2, known(2, 10.9), 2, "WithinTolerance"],
    ["within tolerance below", {}, 2, 2, known(2, 9.1), 2, "WithinTolerance"],
    ["2x the target doubles", {}, 2, 2, known(2, 20), 4, "AboveTarget"],
    ["ceil: 1.5x of 3 is 4.5 -> 5", {}, 3, 3, known(3, 15), 5, "AboveTarget"],
    ["1 -> 5 capped at +4 pods (max(100%, 4))", {}, 1, 1, known(1, 100), 5, "ScaleUpLimited"],
    ["6 -> 12 by 100% but max 10", {}, 6, 6, known(6, 20), 10, "AtMaximum"],
    [
      "scale-down held by the window's own recommendation? no: first is itself",
      { scaleDownStabilizationMs: 0 },
      4,
      4,
      known(4, 5),
      2,
      "BelowTarget",
    ],
    ["idle scales down to min", { scaleDownStabilizationMs: 0 }, 4, 4, known(4, 0), 1, "AtMinimum"],
    [
      "50% down limit: 8 -> 4 not 1",
      { scaleDownStabilizationMs: 0, scaleDownMaxPercent: 50 },
      8,
      8,
      known(8, 0),
      4,
      "ScaleDownLimited",
    ],
    [
      "below min is raised to min even when unknown",
      { min: 3 },
      1,
      1,
      { reporters: 0, total: 0 },
      3,
      "MetricUnknown",
    ],
    ["unknown keeps replicas", {}, 4, 4, { reporters: 0, total: 0 }, 4, "MetricUnknown"],
    // Missing replicas: 1 of 4 reports 40 (4x target); counted as 0 for scale-up -> 40/4 = 10.
    ["missing count as 0 when scaling up", {}, 4, 4, known(1, 40), 4, "WithinTolerance"],
    // 1 of 4 reports 0; the 3 silent count as at target -> 30/4 = 7.5 -> ceil(0.75*4) = 3.
    [
      "missing count as target when scaling down",
      { scaleDownStabilizationMs: 0 },
      4,
      4,
      known(1, 0),
      3,
      "BelowTarget",
    ],
    ["more reporters than ready pods count them all", {}, 1, 0, known(3, 20), 5, "ScaleUpLimited"],
  ];
  it.each(cases)("%s", (_name, change, current, ready, obs, desired, reason) => {
    const d = decide({ ...policy, ...change }, emptyHistory(), current, ready, obs, 1_000_000);
    expect([d.desired, d.reason]).toEqual([desired, reason]);
    expect(d.message.length).toBeGreaterThan(0);
    if (d.desired !== current) expect(d.history.changes.at(-1)?.delta).toBe(desired - current);
  });
});

/**
 * Runs decisions every `everyMs` under a total queue depth per step, shared by the replicas
 * (more replicas, less each); returns the replicas after each decision.
 */
function run(p: ScalePolicy, start: number, totals: number[], everyMs = 15_000): number[] {
  let h: RoleHistory = emptyHistory();
  let current = start;
  return totals.map((total, i) => {
    const d = decide(p, h, current, current, { reporters: current, total }, i * everyMs);
    h = d.history;
    current = d.desired;
    return current;
  });
}

describe("decide over time", () => {
  it("scale-down waits for the stabilization window (highest recommendation of 60 s)", () => {
    // t=0: 40 queued over 2 replicas (20 each, target 10): up to 4. Then idle: each later
    // recommendation is 1, but the 4 from t=0 stays in the 60 s window until t=75 s.
    expect(run(policy, 2, [40, 0, 0, 0, 0, 0, 0])).toEqual([4, 4, 4, 4, 4, 1, 1]);
  });

  it("scale-up stabilization takes the lowest recommendation of its window", () => {
    const p = { ...policy, scaleUpStabilizationMs: 30_000 };
    // A one-sample spike does not scale up; a sustained one does once it fills the 30 s window.
    expect(run(p, 2, [20, 80, 20, 20])).toEqual([2, 2, 2, 2]);
    expect(run(p, 2, [20, 80, 80, 80, 80])).toEqual([2, 2, 2, 6, 8]);
  });

  it("oscillating load does not flap (scale-down window)", () => {
    // Total queue alternates 50 / 4 every 5 s: up once to 5, then held by the scale-down window.
    const replicas = run(
      policy,
      2,
      Array.from({ length: 40 }, (_, i) => (i % 2 ? 4 : 50)),
      5_000,
    );
    const changes = replicas.filter((r, i) => i > 0 && r !== replicas[i - 1]).length;
    expect(replicas[0]).toBe(5);
    expect(changes).toBe(0);
  });

  it("limits scale-up per period relative to the replicas at the period's start", () => {
    // 1 replica under a huge load, decisions every 5 s, period 15 s: +4 (to 5); within the
    // period the start is still 1, so max(2x1, 1+4) = 5 holds; after 15 s: 5 -> 10 (max).
    expect(run(policy, 1, [1000, 1000, 1000, 1000, 1000], 5_000)).toEqual([5, 5, 5, 10, 10]);
  });

  it("idle at min stays at min, and every decision says the min held it", () => {
    const p = { ...policy, min: 2, scaleDownStabilizationMs: 30_000 };
    let h = emptyHistory();
    let current = 2;
    const decisions = [];
    for (let t = 0; t < 120_000; t += 15_000) {
      const d = decide(p, h, current, current, known(current, 0), t);
      h = d.history;
      current = d.desired;
      decisions.push(d);
    }
    // The recommendation is 0 each time (no load): only the bound keeps 2.
    expect(decisions.map((d) => [d.recommendation, d.desired, d.reason])).toEqual(
      decisions.map(() => [0, 2, "AtMinimum"]),
    );
    expect(decisions.at(-1)!.message).toMatch(/recommend 0; kept at min 2$/);
  });

  it("from the start (HPA's seed): idle replicas go down only after a whole window; a load goes up at once", () => {
    const from = (h: RoleHistory, start: number, totals: number[]) => {
      let current = start;
      return totals.map((total, i) => {
        const d = decide(policy, h, current, current, { reporters: current, total }, i * 15_000);
        h = d.history;
        current = d.desired;
        return current;
      });
    };
    // 4 replicas idle: the seed (4, just before t=0) holds them through the 60 s window.
    expect(from(startingHistory(4, 0), 4, [0, 0, 0, 0, 0, 0])).toEqual([4, 4, 4, 4, 1, 1]);
    // Without it the first low recommendation is followed at once.
    expect(from(emptyHistory(), 4, [0, 0])).toEqual([1, 1]);
    // The seed does not hold a scale-up (the scale-up window is 0 here).
    expect(from(startingHistory(2, 0), 2, [40, 40])).toEqual([4, 4]);
  });

  it("unknown metrics never scale down, even after the window", () => {
    let h = emptyHistory();
    let current = 6;
    for (let t = 0; t < 600_000; t += 15_000) {
      const d = decide(policy, h, current, current, { reporters: 0, total: 0 }, t);
      h = d.history;
      current = d.desired;
    }
    expect(current).toBe(6);
  });
});
