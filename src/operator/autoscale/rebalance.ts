// Load-driven expert rebalancing (ADR 0003), pure parts:
//  - propose: from per-expert token counts, is the current plan imbalanced enough, and does a
//    re-plan with the redundant slots (EPLB, src/moe/placement.ts) improve it enough?
//  - step: the rollout state machine. Shards first: every shard replica must report the new
//    plan loaded before gateways are told to route with it; done when every gateway and
//    shard reports it active. Messages are re-sent until then (idempotent).
import type { ExpertLayout } from "../../api/presets.ts";
import { type PlacementPlan, planPlacement, planStepImbalance } from "../../moe/placement.ts";
import type { GatewayReport, ShardReport } from "./load.ts";

export interface RebalanceSettings {
  threshold: number;
  minImprovement: number;
  minTokens: number;
}

export type Proposal =
  | { action: "none"; reason: string; imbalance?: number }
  | { action: "rollout"; plan: PlacementPlan; before: number; after: number; reason: string };

export function propose(
  current: PlacementPlan,
  architecture: ExpertLayout,
  load: number[][],
  totalTokens: number,
  s: RebalanceSettings,
): Proposal {
  if (current.redundantExperts === 0)
    return { action: "none", reason: "spec.experts.redundantExperts is 0: no slot to move" };
  if (totalTokens < s.minTokens)
    return {
      action: "none",
      reason: `${totalTokens} routed tokens in the window, fewer than minTokens ${s.minTokens}`,
    };
  const before = planStepImbalance(current, load);
  if (before <= s.threshold)
    return {
      action: "none",
      imbalance: before,
      reason: `per-shard load max/mean ${before.toFixed(3)} is within the threshold ${s.threshold}`,
    };
  const plan = planPlacement({
    architecture,
    numShards: current.numShards,
    redundantExperts: current.redundantExperts,
    expertLoad: load,
    version: current.version + 1,
    // The MTP layer stays placed when the current plan places it.
    mtpLayers: current.moeLayers.filter((l) => l >= architecture.numLayers).length,
  });
  const after = planStepImbalance(plan, load);
  if (after > before * (1 - s.minImprovement))
    return {
      action: "none",
      imbalance: before,
      reason: `max/mean ${before.toFixed(3)} is over the threshold ${s.threshold}, but a new plan would reach only ${after.toFixed(3)}`,
    };
  return {
    action: "rollout",
    plan,
    before,
    after,
    reason: `max/mean ${before.toFixed(3)} over the threshold ${s.threshold}; plan v${plan.version} gives ${after.toFixed(3)} under the same load`,
  };
}

export interface Rollout {
  phase: "Preparing" | "Activating";
  plan: PlacementPlan;
  before: number;
  after: number;
  startedAt: number;
  /** When the phase's control message was last sent (ms). */
  sentAt: number;
}

export type RolloutStep =
  | { next: "send"; op: "prepare" | "activate"; rollout: Rollout }
  | { next: "wait"; rollout: Rollout; message: string }
  | { next: "activated"; rollout: Rollout }
  | { next: "done"; rollout: Rollout }
  | { next: "failed"; message: string };

export interface RolloutTiming {
  resendMs: number;
  /** Longest wait for every shard to load the plan before giving up. */
  prepareTimeoutMs: number;
}

/**
 * One step of a rollout given the latest fresh reports. `shards[k]` are shard k's fresh
 * reporters; `gateways` the fresh gateway reporters; `named` the plan version the plan
 * ConfigMap names (the status's planVersion): the rollout is done only when it names the
 * new plan too, so that a finished rebalance never shows beside the old version.
 */
export function step(
  r: Rollout,
  shards: ShardReport[][],
  gateways: GatewayReport[],
  now: number,
  t: RolloutTiming,
  named: number,
): RolloutStep {
  const v = r.plan.version;
  if (r.phase === "Preparing") {
    const failed = shards.flat().find((s) => s.planError?.startsWith(`plan v${v}:`));
    if (failed)
      return { next: "failed", message: `shard ${failed.shard}/${failed.id}: ${failed.planError}` };
    const waiting = shards.flatMap((reps, k) =>
      reps.length === 0
        ? [`shard ${k} (no fresh report)`]
        : reps.filter((s) => !s.plans?.includes(v)).map((s) => `shard ${k}/${s.id}`),
    );
    if (waiting.length === 0)
      return { next: "activated", rollout: { ...r, phase: "Activating", sentAt: 0 } };
    if (now - r.startedAt > t.prepareTimeoutMs)
      return {
        next: "failed",
        message: `plan v${v} not loaded within ${t.prepareTimeoutMs / 1000} s by ${waiting.join(", ")}`,
      };
    if (now - r.sentAt >= t.resendMs)
      return { next: "send", op: "prepare", rollout: { ...r, sentAt: now } };
    return {
      next: "wait",
      rollout: r,
      message: `waiting for ${waiting.join(", ")} to load plan v${v}`,
    };
  }
  const behind = [
    ...gateways.filter((g) => (g.planVersion ?? 0) < v).map((g) => `gateway ${g.id}`),
    ...shards
      .flat()
      .filter((s) => s.planVersion < v)
      .map((s) => `shard ${s.shard}/${s.id}`),
  ];
  if (behind.length === 0 && named >= v) return { next: "done", rollout: r };
  if (behind.length === 0)
    return {
      next: "wait",
      rollout: r,
      message: `plan v${v} active on every gateway and shard; waiting for the plan ConfigMap to name it`,
    };
  if (now - r.sentAt >= t.resendMs)
    return { next: "send", op: "activate", rollout: { ...r, sentAt: now } };
  return {
    next: "wait",
    rollout: r,
    message: `waiting for ${behind.join(", ")} to switch to plan v${v}`,
  };
}
