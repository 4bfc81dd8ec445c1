// The Horizontal Pod Autoscaler's algorithm for one role, as a pure function (ADR 0003).
// It follows kube-controller-manager's replica calculator and `stabilizeRecommendation-
// WithBehaviors` / `convertDesiredReplicasWithBehaviorRate`:
//   1. ratio = observed / target per replica; within 1 +- tolerance: no change.
//      Replicas without a fresh report (starting, or silent) count as 0 when scaling up and
//      as exactly at target when scaling down, so they damp a change instead of driving it.
//   2. recommendation = ceil(ratio * replicas counted).
//   3. Stabilization: scale up to the lowest recommendation of the scale-up window, down to
//      the highest of the scale-down window.
//   4. Rate: per period at most +max(pods, percent) up and -percent down.
//   5. Clamp to [min, max].
// No fresh report at all means unknown: the role keeps its replicas (only min/max apply).

export interface ScalePolicy {
  min: number;
  max: number;
  /** Target queue depth per replica. */
  target: number;
  tolerance: number;
  scaleUpStabilizationMs: number;
  scaleDownStabilizationMs: number;
  periodMs: number;
  scaleUpMaxPods: number;
  scaleUpMaxPercent: number;
  scaleDownMaxPercent: number;
}

export interface Observation {
  /** Replicas with a fresh load report. 0 means the metric is unknown. */
  reporters: number;
  /** Sum over the reporters of each one's mean queue depth over the window. */
  total: number;
  /** Why the metric is unknown, for status (when reporters is 0). */
  unknownReason?: string;
}

/** What one role remembers between decisions. */
export interface RoleHistory {
  /** Recommendations with their time (ms), newest last. */
  recommendations: { at: number; replicas: number }[];
  /** Replica changes made (ms, signed delta), newest last. */
  changes: { at: number; delta: number }[];
}

export type DecisionReason =
  | "AboveTarget"
  | "BelowTarget"
  | "WithinTolerance"
  | "MetricUnknown"
  | "ScaleUpStabilized"
  | "ScaleDownStabilized"
  | "ScaleUpLimited"
  | "ScaleDownLimited"
  | "AtMaximum"
  | "AtMinimum";

export interface Decision {
  desired: number;
  /** The raw recommendation of step 2 (before stabilization, rate and bounds). */
  recommendation: number;
  /** Observed queue depth per counted replica (missing replicas filled in), if known. */
  observed?: number;
  reason: DecisionReason;
  message: string;
  history: RoleHistory;
}

export const emptyHistory = (): RoleHistory => ({ recommendations: [], changes: [] });

/**
 * A role's history when the autoscaler first sees it (it started, or another operator replica
 * took the lead): its current replicas as a recommendation made just before `now`, as HPA
 * seeds it. A scale-down then waits for a whole window from the start, instead of following
 * the first low recommendation at once; a scale-up window of 0 does not hold it (HPA keeps a
 * recommendation in that window only if made after now - window).
 */
export const startingHistory = (current: number, now: number): RoleHistory => ({
  recommendations: [{ at: now - 1, replicas: current }],
  changes: [],
});

/**
 * Decides the replicas of one role. `current` is the Deployment's replicas, `ready` how many
 * of its pods are ready (replicas that should report). Pure: the caller stores `history`.
 */
export function decide(
  p: ScalePolicy,
  history: RoleHistory,
  current: number,
  ready: number,
  obs: Observation,
  now: number,
): Decision {
  const keep = Math.max(p.scaleUpStabilizationMs, p.scaleDownStabilizationMs, p.periodMs);
  const h: RoleHistory = {
    recommendations: history.recommendations.filter((r) => now - r.at <= keep),
    changes: history.changes.filter((c) => now - c.at < p.periodMs),
  };
  const bounded = (n: number) => Math.min(Math.max(n, p.min), p.max);

  if (obs.reporters <= 0) {
    const desired = bounded(current);
    const msg = `queue depth unknown (${obs.unknownReason ?? "no fresh load report"}): not scaling`;
    return finish(desired, current, undefined, "MetricUnknown", msg);
  }

  // 1-2. Ratio with missing replicas filled in, then the recommendation.
  // Every pod counts (as HPA does), ready or still starting: a starting pod has no report
  // yet, so it counts as 0 when scaling up (no piling up pods while new ones load weights)
  // and as at target when scaling down.
  const counted = Math.max(current, ready, obs.reporters);
  const missing = counted - obs.reporters;
  const rawRatio = obs.total / obs.reporters / p.target;
  let observed: number;
  let recommendation: number;
  let reason: DecisionReason;
  if (Math.abs(rawRatio - 1) <= p.tolerance) {
    observed = obs.total / obs.reporters;
    recommendation = current;
    reason = "WithinTolerance";
  } else {
    const fill = rawRatio > 1 ? 0 : p.target;
    observed = (obs.total + missing * fill) / counted;
    const ratio = observed / p.target;
    if (Math.abs(ratio - 1) <= p.tolerance || ratio > 1 !== rawRatio > 1) {
      recommendation = current;
      reason = "WithinTolerance";
    } else {
      recommendation = Math.ceil(ratio * counted);
      reason = ratio > 1 ? "AboveTarget" : "BelowTarget";
    }
  }
  if (current === 0) recommendation = Math.max(recommendation, 0);
  h.recommendations.push({ at: now, replicas: recommendation });

  // 3. Stabilization windows.
  let up = recommendation;
  let down = recommendation;
  for (const r of h.recommendations) {
    if (now - r.at <= p.scaleUpStabilizationMs) up = Math.min(up, r.replicas);
    if (now - r.at <= p.scaleDownStabilizationMs) down = Math.max(down, r.replicas);
  }
  let desired = current;
  if (desired < up) desired = up;
  if (desired > down) desired = down;
  const describe = `queue depth ${fmt(observed)} per replica vs target ${fmt(p.target)} over ${counted} replica(s)${missing ? ` (${missing} without a report counted as ${rawRatio > 1 ? "0" : "at target"})` : ""}`;
  let message = `${describe}: recommend ${recommendation}`;
  if (recommendation > current && desired < recommendation) {
    reason = "ScaleUpStabilized";
    message += `; lowest recommendation in the ${p.scaleUpStabilizationMs / 1000} s scale-up window is ${desired}`;
  } else if (recommendation < current && desired > recommendation) {
    reason = "ScaleDownStabilized";
    message += `; highest recommendation in the ${p.scaleDownStabilizationMs / 1000} s scale-down window is ${desired}`;
  }

  // 4. Rate limits relative to the replicas at the start of the period.
  if (desired > current) {
    const added = h.changes.reduce((n, c) => n + Math.max(0, c.delta), 0);
    const start = current - added;
    const limit = Math.max(
      Math.ceil(start * (1 + p.scaleUpMaxPercent / 100)),
      start + p.scaleUpMaxPods,
    );
    if (desired > limit) {
      desired = Math.max(current, limit);
      reason = "ScaleUpLimited";
      message += `; at most ${limit} within ${p.periodMs / 1000} s (from ${start})`;
    }
  } else if (desired < current) {
    const removed = h.changes.reduce((n, c) => n + Math.max(0, -c.delta), 0);
    const start = current + removed;
    const limit = Math.floor(start * (1 - p.scaleDownMaxPercent / 100));
    if (desired < limit) {
      desired = Math.min(current, limit);
      reason = "ScaleDownLimited";
      message += `; at least ${limit} within ${p.periodMs / 1000} s (from ${start})`;
    }
  }

  // 5. Bounds.
  if (desired > p.max) {
    desired = p.max;
    reason = "AtMaximum";
    message += `; capped at max ${p.max}`;
  } else if (desired < p.min) {
    desired = p.min;
    reason = "AtMinimum";
    message += `; kept at min ${p.min}`;
  }
  return finish(desired, recommendation, observed, reason, message);

  function finish(
    desired: number,
    recommendation: number,
    observed: number | undefined,
    reason: DecisionReason,
    message: string,
  ): Decision {
    if (desired !== current) h.changes.push({ at: now, delta: desired - current });
    return {
      desired,
      recommendation,
      ...(observed !== undefined ? { observed } : {}),
      reason,
      message,
      history: h,
    };
  }
}

const fmt = (n: number) => (Number.isInteger(n) ? String(n) : n.toFixed(2));
