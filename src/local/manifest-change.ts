// What an edit of the manifest under `expertmesh up --watch` changes, and so what must start
// again (ADR 0041). The operator rolls only the Deployments whose pods a change reaches: an
// edit of the gateways' serving flags rolls the gateways and leaves the shards (minutes of
// weight loading on a real model) alone. `up --watch` does the same: a change that reaches the
// gateway processes alone rolls them, anything else starts everything again.

import type { DeepSeekModel } from "../api/schema.ts";

/** What a manifest's edit asks of `up`'s processes. */
export type ManifestChange =
  /** Nothing it says is different (a comment, the order of keys). */
  | { kind: "same" }
  /** Only the gateways' (and prefill gateways') flags: they roll, the rest runs on. */
  | { kind: "gateways"; fields: string[] }
  /** Everything stops and starts again; `why` says which field asks for that, and why. */
  | { kind: "all"; fields: string[]; why: string };

/**
 * The fields under spec.gateway that change more than the gateways' flags: how many gateway
 * processes there are and where they listen (the front), which devices they run on, whether
 * prefill gateways exist, whether the nats-server keeps JetStream (the NATS tier).
 */
const GATEWAY_STRUCTURE = [
  "spec.gateway.ports",
  "spec.gateway.replicas",
  "spec.gateway.minReplicas",
  "spec.gateway.maxReplicas",
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
  const reason = (field: string): string | null => {
    if (singleProcess) return "with --single-process the gateway is every process";
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
  return { kind: "gateways", fields };
}

/** The changed fields for a message: the first few, then how many more. */
export function fieldList(fields: string[], most = 3): string {
  return fields.length <= most
    ? fields.join(", ")
    : `${fields.slice(0, most).join(", ")} and ${fields.length - most} more`;
}
