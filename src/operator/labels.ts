// Names and labels of the objects the operator makes for a DeepSeekModel `m`.
import type { DeepSeekModel } from "../api/schema.ts";

export const FIELD_MANAGER = "expertmesh-operator";
export const MANAGED_BY = "expertmesh-operator";
export const LABEL_MODEL = "expertmesh.io/model";
export const LABEL_COMPONENT = "app.kubernetes.io/component";
export const LABEL_SHARD = "expertmesh.io/shard";
/**
 * On pod templates: the plan's shape. Pods restart when it changes (another shard count);
 * a rebalanced plan of the same shape switches live, without a restart (ADR 0003).
 */
export const ANNOTATION_PLAN_SHAPE = "expertmesh.io/plan-shape";
/** On the gateway's pod template: a hash of spec.gateway.chatTemplate (a new one rolls it). */
export const ANNOTATION_CHAT_TEMPLATE = "expertmesh.io/chat-template";
/**
 * On pod templates: a hash of the values spec.env reads from Secrets and ConfigMaps, so that
 * a changed value rolls the pods (the kubelet reads them only when a container starts).
 */
export const ANNOTATION_ENV_SOURCES = "expertmesh.io/env-sources";

export type Component = "gateway" | "prefill" | "shard" | "plan" | "monitoring" | "storage";

export const names = {
  plan: (m: string) => `${m}-plan`,
  gateway: (m: string) => `${m}-gateway`,
  /** Prefill gateways (spec.gateway.disaggregation, ADR 0029). */
  prefill: (m: string) => `${m}-prefill`,
  service: (m: string) => m,
  shard: (m: string, k: number) => `${m}-shard-${k}`,
  /**
   * The claims the operator makes of a StorageClass (spec.model.source.huggingFace,
   * spec.gateway.kvCache, spec.gateway.batch).
   */
  weightsClaim: (m: string) => `${m}-weights`,
  prefixCacheClaim: (m: string) => `${m}-prefix-cache`,
  batchClaim: (m: string) => `${m}-batch`,
};

/** Labels of every object of model `model` (its pods' selector uses a subset). */
export function labelsFor(
  model: DeepSeekModel,
  component: Component,
  shard?: number,
): Record<string, string> {
  return {
    "app.kubernetes.io/name": "expertmesh",
    "app.kubernetes.io/instance": model.metadata.name,
    "app.kubernetes.io/managed-by": MANAGED_BY,
    [LABEL_COMPONENT]: component,
    [LABEL_MODEL]: model.metadata.name,
    ...(shard === undefined ? {} : { [LABEL_SHARD]: String(shard) }),
  };
}

/** The label selector that finds every object the operator made for `name`. */
export function ownedSelector(name: string): string {
  return `${LABEL_MODEL}=${name},app.kubernetes.io/managed-by=${MANAGED_BY}`;
}
