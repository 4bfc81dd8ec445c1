// The autoscale suite: a simulation that drives the operator's own decision code
// (src/operator/autoscale/hpa.ts + load.ts, the same functions the operator runs each
// second) with load reports from a queueing model of one shard role, and the planner's
// rebalancing on skewed expert loads of real model shapes. No cluster: the point is the
// control behaviour (reaction time, flapping, imbalance), which depends on the algorithm and
// the spec's defaults, not on this machine's speed.
//
// Queue model (per shard replica, fluid + M/M/1): each replica computes `mu` routed tokens/s
// in batches of `batch` tokens; at utilization rho < 1 it holds batch * rho / (1 - rho)
// pending tokens (M/M/1 mean queue, in batches); above capacity a backlog grows at
// lambda - ready * mu, shared by the ready replicas, up to the tokens the gateways have in
// flight (the loop is closed: beyond that, requests wait at the gateways). New replicas are ready
// `startupS` seconds after the decision (pod start + weight loading).

import { resolveArchitecture } from "../src/api/presets.ts";
import { Prng } from "../src/model/prng.ts";
import { planPlacement, planStepImbalance } from "../src/moe/placement.ts";
import {
  decide,
  emptyHistory,
  type RoleHistory,
  type ScalePolicy,
} from "../src/operator/autoscale/hpa.ts";
import { LoadTracker } from "../src/operator/autoscale/load.ts";

export interface SimConfig {
  /** Routed tokens per second one replica computes. */
  mu: number;
  /** Tokens per batch (the M/M/1 job size). */
  batch: number;
  startupS: number;
  /**
   * Tokens in flight over all gateways (their running batches): a shard can never hold more
   * pending tokens than this, because a gateway sends a layer's tokens only after the previous
   * layer came back. Above capacity, requests wait at the gateways instead.
   */
  inflightCap: number;
  /** Arrival rate (tokens/s) at time t (s). */
  lambda: (t: number) => number;
  durationS: number;
  policy: ScalePolicy;
  intervalS: number;
  windowS: number;
  staleS: number;
}

export interface SimPoint {
  t: number;
  lambda: number;
  desired: number;
  ready: number;
  /** Pending tokens per ready replica (true value). */
  queue: number;
  /** What the autoscaler saw: window mean per replica. */
  observed: number | null;
}

export interface SimDecision {
  t: number;
  from: number;
  to: number;
  reason: string;
}

export function simulate(
  c: SimConfig,
  start = 1,
): { points: SimPoint[]; decisions: SimDecision[] } {
  const tracker = new LoadTracker({
    windowMs: c.windowS * 1000,
    staleMs: c.staleS * 1000,
    expertWindowMs: 1000,
  });
  let history: RoleHistory = emptyHistory();
  let desired = start;
  /** Ready times of the replicas (s); index = replica. */
  let readyAt: number[] = Array.from({ length: start }, () => 0);
  let backlog = 0;
  const points: SimPoint[] = [];
  const decisions: SimDecision[] = [];
  for (let t = 0; t <= c.durationS; t++) {
    const ready = readyAt.filter((r) => r <= t).length;
    const lambda = c.lambda(t);
    const capacity = ready * c.mu;
    backlog = Math.min(c.inflightCap, Math.max(0, backlog + lambda - capacity));
    const rho = capacity > 0 ? Math.min(lambda / capacity, 0.98) : 0.98;
    const queue = Math.min(
      c.inflightCap / Math.max(ready, 1),
      (ready > 0 ? backlog / ready : backlog) + (c.batch * rho) / (1 - rho),
    );
    for (let r = 0; r < ready; r++)
      tracker.add(
        {
          role: "shard",
          shard: 0,
          id: `r${r}`,
          planVersion: 1,
          pendingTokens: queue,
          meanPendingTokens: queue,
        },
        t * 1000,
      );
    const obs = tracker.observe("shard-0", t * 1000);
    if (t > 0 && t % c.intervalS === 0) {
      const d = decide(c.policy, history, desired, ready, obs, t * 1000);
      history = d.history;
      if (d.desired !== desired) {
        decisions.push({ t, from: desired, to: d.desired, reason: d.reason });
        if (d.desired > desired)
          readyAt = [
            ...readyAt,
            ...Array.from({ length: d.desired - desired }, () => t + c.startupS),
          ];
        else readyAt = readyAt.slice(0, d.desired); // the newest go first
        desired = d.desired;
      }
    }
    points.push({
      t,
      lambda,
      desired,
      ready,
      queue,
      observed: obs.reporters ? obs.total / obs.reporters : null,
    });
  }
  return { points, decisions };
}

/** The spec's defaults (src/api/schema.ts) for a shard role, with max 16 replicas. */
export const defaultPolicy: ScalePolicy = {
  min: 1,
  max: 16,
  target: 64,
  tolerance: 0.1,
  scaleUpStabilizationMs: 0,
  scaleDownStabilizationMs: 300_000,
  periodMs: 15_000,
  scaleUpMaxPods: 4,
  scaleUpMaxPercent: 100,
  scaleDownMaxPercent: 10,
};

export interface StepResult {
  name: string;
  /** Load step time and the first scale-up decision after it (s). */
  stepAt: number;
  firstScaleUpAfterS: number | null;
  /** From the step until the queue per replica is back within target * (1 + tolerance) and stays there for 30 s. */
  settledAfterS: number | null;
  peakQueue: number;
  dropAt: number;
  firstScaleDownAfterS: number | null;
  replicaChanges: number;
  points: SimPoint[];
  decisions: SimDecision[];
}

/** Stepped profile: base load, a 5x step, then a drop to 2/3 of the base. */
export function steppedRun(
  startupS = 30,
  policy: ScalePolicy = defaultPolicy,
  label = "defaults",
): StepResult {
  const mu = 2000;
  const stepAt = 120;
  const dropAt = 720;
  const config: SimConfig = {
    mu,
    batch: 64,
    startupS,
    inflightCap: 1024,
    lambda: (t) => (t < stepAt ? 1200 : t < dropAt ? 6000 : 800),
    durationS: 1500,
    policy,
    intervalS: 15,
    windowS: 30,
    staleS: 10,
  };
  const { points, decisions } = simulate(config, 1);
  const up = decisions.find((d) => d.t >= stepAt && d.to > d.from);
  const down = decisions.find((d) => d.t >= dropAt && d.to < d.from);
  const limit = defaultPolicy.target * (1 + defaultPolicy.tolerance);
  let settled: number | null = null;
  for (const p of points.filter((p) => p.t > stepAt && p.t < dropAt)) {
    const calm = points.filter((q) => q.t >= p.t && q.t < p.t + 30).every((q) => q.queue <= limit);
    if (calm) {
      settled = p.t - stepAt;
      break;
    }
  }
  return {
    name: `${label}, pods ready ${startupS} s after the decision`,
    stepAt,
    firstScaleUpAfterS: up ? up.t - stepAt : null,
    settledAfterS: settled,
    peakQueue: Math.max(...points.filter((p) => p.t >= stepAt && p.t < dropAt).map((p) => p.queue)),
    dropAt,
    firstScaleDownAfterS: down ? down.t - dropAt : null,
    replicaChanges: decisions.length,
    points,
    decisions,
  };
}

/** Square-wave load (period `periodS`) around capacity: counts replica changes (flaps). */
export function oscillatingRun(periodS = 60): {
  changes: number;
  downs: number;
  replicas: number[];
} {
  const { decisions, points } = simulate(
    {
      mu: 2000,
      batch: 64,
      startupS: 30,
      inflightCap: 1024,
      lambda: (t) => (Math.floor(t / (periodS / 2)) % 2 ? 1500 : 7000),
      durationS: 1800,
      policy: defaultPolicy,
      intervalS: 15,
      windowS: 30,
      staleS: 10,
    },
    1,
  );
  return {
    changes: decisions.length,
    downs: decisions.filter((d) => d.to < d.from).length,
    replicas: [...new Set(points.map((p) => p.desired))],
  };
}

export interface ImbalanceRow {
  model: string;
  shards: number;
  redundant: number;
  skew: string;
  /** Per-shard load max/mean summed over layers (planStepImbalance). */
  uniformPlan: number;
  /** Re-planned on the window's counts, evaluated on the same counts. */
  rebalancedInSample: number;
  /** Re-planned on one window, evaluated on the next (sampling noise). */
  rebalancedNextWindow: number;
}

/** Zipf(s) expert popularity per layer, each layer a different permutation; N tokens sampled. */
function zipfCounts(
  prng: Prng,
  layers: number,
  experts: number,
  s: number,
  tokens: number,
  topK: number,
  perms: number[][],
): number[][] {
  return Array.from({ length: layers }, (_, l) => {
    const weights = Array.from({ length: experts }, (_, r) => 1 / (r + 1) ** s);
    const total = weights.reduce((a, b) => a + b, 0);
    const cdf: number[] = [];
    let acc = 0;
    for (const w of weights) {
      acc += w / total;
      cdf.push(acc);
    }
    const counts = new Array<number>(experts).fill(0);
    for (let i = 0; i < tokens * topK; i++) {
      const u = prng.uniform();
      let lo = 0;
      let hi = experts - 1;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (cdf[mid]! < u) lo = mid + 1;
        else hi = mid;
      }
      counts[perms[l]![lo]!]!++;
    }
    return counts;
  });
}

export function imbalanceRows(): ImbalanceRow[] {
  const cases: [string, number, number, number][] = [
    // preset, shards, redundant, zipf s
    ["deepseek-v2-lite", 8, 8, 0.6],
    ["deepseek-v2-lite", 8, 8, 1.0],
    ["deepseek-v3", 32, 32, 0.6],
    ["deepseek-v3", 32, 32, 1.0],
  ];
  return cases.map(([preset, shards, redundant, s]) => {
    const arch = resolveArchitecture(preset);
    const layers = arch.numLayers - arch.firstDenseLayers;
    const prng = new Prng(7, `${preset}-${s}`);
    const perms = Array.from({ length: layers }, () => {
      const p = Array.from({ length: arch.routedExperts }, (_, i) => i);
      for (let i = p.length - 1; i > 0; i--) {
        const j = Math.floor(prng.uniform() * (i + 1));
        [p[i], p[j]] = [p[j]!, p[i]!];
      }
      return p;
    });
    const tokens = 4096;
    const windowA = zipfCounts(
      prng,
      layers,
      arch.routedExperts,
      s,
      tokens,
      arch.expertsPerToken,
      perms,
    );
    const windowB = zipfCounts(
      prng,
      layers,
      arch.routedExperts,
      s,
      tokens,
      arch.expertsPerToken,
      perms,
    );
    const uniform = planPlacement({
      architecture: arch,
      numShards: shards,
      redundantExperts: redundant,
    });
    const rebalanced = planPlacement({
      architecture: arch,
      numShards: shards,
      redundantExperts: redundant,
      expertLoad: windowA,
      version: 2,
    });
    return {
      model: preset,
      shards,
      redundant,
      skew: `Zipf s=${s}, ${tokens} tokens/window`,
      uniformPlan: planStepImbalance(uniform, windowB),
      rebalancedInSample: planStepImbalance(rebalanced, windowA),
      rebalancedNextWindow: planStepImbalance(rebalanced, windowB),
    };
  });
}

export interface AutoscaleResults {
  steps: StepResult[];
  oscillating: ReturnType<typeof oscillatingRun>;
  imbalance: ImbalanceRow[];
}

export function runAutoscale(log: (s: string) => void = console.error): AutoscaleResults {
  log("autoscale: stepped load, startup 30 s and 120 s");
  const steps = [
    steppedRun(30),
    steppedRun(120),
    steppedRun(
      30,
      { ...defaultPolicy, scaleDownMaxPercent: 100 },
      "HPA's stock scale-down (100 %)",
    ),
  ].map((s) => ({ ...s, points: s.points.filter((p) => p.t % 5 === 0) })); // 5 s is plenty to plot
  log("autoscale: oscillating load");
  const oscillating = oscillatingRun(60);
  log("autoscale: rebalancing on skewed expert loads");
  const imbalance = imbalanceRows();
  return { steps, oscillating, imbalance };
}
