// Live plan changes (ADR 0003). The operator publishes on em.<ns>.<model>.control.plan:
//   prepare  <plan>  shards load the experts the plan gives them, keeping the old ones, and
//                    list the version in their load reports (`plans`);
//   activate <plan>  gateways route new frames with it; shards make it their active plan and
//                    drop experts no loaded plan needs once the older plans have been idle
//                    for a grace period.
// Messages are idempotent and re-sent until every reporter shows the new state, so a
// replica that missed one (restart, reconnect) catches up from the next.
import { ExpertMeshError } from "../util/errors.ts";
import type { PlacementPlan } from "./placement.ts";
import { serializePlan, validatePlan } from "./plan-json.ts";

export type PlanOp = "prepare" | "activate";

export interface PlanControl {
  op: PlanOp;
  plan: PlacementPlan;
}

export function encodePlanControl(op: PlanOp, plan: PlacementPlan): string {
  return `{"op":${JSON.stringify(op)},"plan":${serializePlan(plan)}}`;
}

/** Parses a control message. Throws EM_PLAN_CORRUPT. */
export function decodePlanControl(data: Uint8Array | string): PlanControl {
  let value: unknown;
  try {
    value = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
  } catch (err) {
    throw new ExpertMeshError("EM_PLAN_CORRUPT", `plan control message is not JSON: ${err}`);
  }
  const v = value as { op?: unknown; plan?: unknown };
  if (v.op !== "prepare" && v.op !== "activate")
    throw new ExpertMeshError(
      "EM_PLAN_CORRUPT",
      `plan control op must be prepare or activate, got ${JSON.stringify(v.op)}`,
    );
  return { op: v.op, plan: validatePlan(v.plan) };
}

/** Can a process that runs `current` switch to `next` without a restart? */
export function checkSwitchable(current: PlacementPlan, next: PlacementPlan): void {
  const same =
    current.numShards === next.numShards &&
    current.routedExperts === next.routedExperts &&
    current.moeLayers.join() === next.moeLayers.join();
  if (!same)
    throw new ExpertMeshError(
      "EM_PLAN_INVALID",
      `plan v${next.version} (${next.numShards} shards, ${next.routedExperts} experts, layers ${next.moeLayers[0]}..${next.moeLayers.at(-1)}) cannot replace v${current.version} (${current.numShards} shards, ${current.routedExperts} experts) live: the pods must restart`,
    );
}
