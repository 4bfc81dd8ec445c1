// NATS subjects of one model (ARCHITECTURE.md): requests to shard k go to
// em.<ns>.<model>.shard.<k>, where the shard's replicas share queue group shard-<k>;
// load reports go to em.<ns>.<model>.stats.<role>.<id>; plan changes to
// em.<ns>.<model>.control.plan; prefill jobs (ADR 0029) to em.<ns>.<model>.prefill.

export interface ModelRef {
  namespace: string;
  model: string;
}

export const subjects = {
  shard: (m: ModelRef, k: number) => `em.${m.namespace}.${m.model}.shard.${k}`,
  shardQueue: (k: number) => `shard-${k}`,
  stats: (m: ModelRef, role: "shard" | "gateway" | "prefill", id: string) =>
    `em.${m.namespace}.${m.model}.stats.${role}.${id}`,
  allStats: (m: ModelRef) => `em.${m.namespace}.${m.model}.stats.>`,
  /** Disaggregated prefill jobs (gateway/prefill.ts); prefill gateways share a queue group. */
  prefill: (m: ModelRef) => `em.${m.namespace}.${m.model}.prefill`,
  /** Live plan changes from the operator (plan-control.ts). */
  planControl: (m: ModelRef) => `em.${m.namespace}.${m.model}.control.plan`,
};
