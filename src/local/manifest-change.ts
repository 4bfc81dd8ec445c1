// What an edit of the manifest under `expertmesh up --watch` changes, and so what must start
// again (ADR 0041). The operator rolls only the Deployments whose pods a change reaches: an
// edit of the gateways' serving flags rolls the gateways and leaves the shards (minutes of
// weight loading on a real model) alone, and an edit of a replica count scales a Deployment,
// restarting nothing. `up --watch` does the same: a change that reaches the gateway processes
// alone rolls them, one of the replica counts starts or stops processes, anything else starts
// everything again.

import type { DeepSeekModel } from "../api/schema.ts";
import { localGateways } from "./autoscale.ts";

/** What a manifest's edit asks of `up`'s processes. */
export type ManifestChange =
  /** Nothing it says is different (a comment, the order of keys). */
  | { kind: "same" }
  /**
   * Done to the running processes: the gateways (and prefill gateways) roll onto the new
   * flags when `roll`; `gateways` and `shardReplicas`, when set, are the new counts of gateway
   * processes and of each shard's replicas (started or stopped, nothing restarted).
   */
  | {
      kind: "live";
      fields: string[];
      roll: boolean;
      gateways?: number;
      shardReplicas?: number;
    }
  /** Everything stops and starts again; `why` says which field asks for that, and why. */
  | { kind: "all"; fields: string[]; why: string };

/**
 * The fields only a cluster uses (images, scheduling, resources, Kubernetes' own rollout
 * settings, monitoring objects, the cluster's NATS): `up` runs nothing differently for them.
 */
const CLUSTER_ONLY = [
  "spec.image",
  "spec.imagePullPolicy",
  "spec.imagePullSecrets",
  "spec.scheduling",
  "spec.monitoring",
  "spec.networkPolicy",
  "spec.podMetadata",
  "spec.nats",
  "spec.gateway.gpuResource",
  "spec.gateway.resources",
  "spec.gateway.rollingUpdate",
  "spec.gateway.sessionAffinity",
  "spec.experts.gpuResource",
  "spec.experts.resources",
  "spec.experts.rollingUpdate",
  "spec.experts.weightsRollout",
  "spec.experts.blueGreenWaitSeconds",
];

/** The gateway replica counts (scaled live: under --watch, up's front holds the ports). */
const GATEWAY_COUNTS = [
  "spec.gateway.replicas",
  "spec.gateway.minReplicas",
  "spec.gateway.maxReplicas",
];

/** The shards' replica counts (replicas.min is what runs without autoscaling). */
const SHARD_COUNTS = ["spec.experts.replicas"];

/**
 * The fields under spec.gateway that change more than the gateways' flags: where they listen,
 * which devices they run on, whether prefill gateways exist, whether the nats-server keeps
 * JetStream (the NATS tier).
 */
const GATEWAY_STRUCTURE = [
  "spec.gateway.ports",
  "spec.gateway.gpus",
  "spec.gateway.disaggregation",
  "spec.gateway.kvCache.remoteBytes",
];

/**
 * The fields, as dotted paths, whose values differ between `a` and `b` (objects compared key
 * by key, anything else, arrays included, as a whole), sorted.
 */
export function changedFields(a: unknown, b: unknown, at = ""): string[] {
  const isObject = (v: unknown): v is Record<string, unknown> =>
    typeof v === "object" && v !== null && !Array.isArray(v);
  if (isObject(a) && isObject(b)) {
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
    return keys.flatMap((k) => changedFields(a[k], b[k], at ? `${at}.${k}` : k));
  }
  return JSON.stringify(a) === JSON.stringify(b) ? [] : [at];
}

const under = (field: string, prefix: string) => field === prefix || field.startsWith(`${prefix}.`);

/**
 * What going from `before` to `after` asks of the processes of `up` (with --single-process
 * the gateway is every process, so any change starts it again).
 */
export function manifestChange(
  before: DeepSeekModel,
  after: DeepSeekModel,
  singleProcess = false,
): ManifestChange {
  const fields = changedFields(before, after);
  if (fields.length === 0) return { kind: "same" };
  const autoscaled = before.spec.autoscaling.enabled || after.spec.autoscaling.enabled;
  let roll = false;
  let scaleGateways = false;
  let scaleShards = false;
  const reason = (field: string): string | null => {
    if (CLUSTER_ONLY.some((p) => under(field, p))) return null;
    if (singleProcess) return "with --single-process the gateway is every process";
    if (GATEWAY_COUNTS.some((p) => under(field, p))) {
      if (autoscaled) return `${field}: the autoscaler's bounds change (spec.autoscaling is on)`;
      scaleGateways = true;
      return null;
    }
    if (SHARD_COUNTS.some((p) => under(field, p))) {
      if (autoscaled) return `${field}: the autoscaler's bounds change (spec.autoscaling is on)`;
      scaleShards = true;
      return null;
    }
    roll = true;
    // The served name reaches the gateways alone (the shards' subjects use metadata.name).
    if (field === "spec.servedModelName") return null;
    if (!under(field, "spec.gateway")) return `${field} reaches more than the gateways`;
    if (GATEWAY_STRUCTURE.some((p) => under(field, p)))
      return `${field} changes which processes run, or where`;
    // MTP drafting places the MTP layer's experts on the shards (the plan changes).
    if (
      under(field, "spec.gateway.speculative") &&
      (before.spec.gateway.speculative?.method === "mtp" ||
        after.spec.gateway.speculative?.method === "mtp")
    )
      return `${field}: MTP drafting puts the MTP layer's experts on the shards`;
    return null;
  };
  for (const field of fields) {
    const why = reason(field);
    if (why !== null) return { kind: "all", fields, why };
  }
  const gateways = localGateways(after, singleProcess).initial;
  const shardReplicas = after.spec.experts.replicas.min;
  return {
    kind: "live",
    fields,
    roll,
    ...(scaleGateways && gateways !== localGateways(before, singleProcess).initial
      ? { gateways }
      : {}),
    ...(scaleShards && shardReplicas !== before.spec.experts.replicas.min ? { shardReplicas } : {}),
  };
}

/** What `up` does with a live change, for its messages: "rolling the gateways onto it", ... */
export function liveChangeSummary(c: Extract<ManifestChange, { kind: "live" }>): string {
  const parts = [
    c.roll && "rolling the gateways onto it",
    c.gateways !== undefined && `scaling to ${c.gateways} gateways`,
    c.shardReplicas !== undefined && `scaling to ${c.shardReplicas} replica(s) of each shard`,
  ].filter((p): p is string => typeof p === "string");
  if (parts.length === 0) return "nothing up runs changes";
  return `${parts.join(", ")}; ${c.roll ? "nats-server and the shards run on" : "nothing restarts"}`;
}

/** The changed fields for a message: the first few, then how many more. */
export function fieldList(fields: string[], most = 3): string {
  return fields.length <= most
    ? fields.join(", ")
    : `${fields.slice(0, most).join(", ")} and ${fields.length - most} more`;
}
