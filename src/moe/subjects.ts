// NATS subjects of one model (ARCHITECTURE.md): requests to shard k go to
// em.<ns>.<model>.shard.<k>.w<weights digest> (ADR 0035), where the shard's replicas share queue group shard-<k>;
// load reports go to em.<ns>.<model>.stats.<role>.<id>; plan changes to
// em.<ns>.<model>.control.plan; prefill jobs (ADR 0029) to em.<ns>.<model>.prefill.w<digest>; and
// replies to the model's own inboxes, em.<ns>.<model>._INBOX.*: everything a model's processes
// say is under em.<ns>.<model>.>, so one NATS permission keeps models apart (ADR 0032).

export interface ModelRef {
  namespace: string;
  model: string;
  /**
   * The weights' digest (Checkpoint.weightsDigest, ADR 0035): shard subjects end with it, so
   * that a gateway reaches only shards of its own weights (during a rollout from one model
   * to another of the same shape, each generation keeps to its own). Absent: no suffix.
   */
  weights?: string;
}

export const subjects = {
  shard: (m: ModelRef, k: number) =>
    `em.${m.namespace}.${m.model}.shard.${k}${m.weights ? `.w${m.weights}` : ""}`,
  shardQueue: (k: number) => `shard-${k}`,
  stats: (m: ModelRef, role: "shard" | "gateway" | "prefill", id: string) =>
    `em.${m.namespace}.${m.model}.stats.${role}.${id}`,
  allStats: (m: ModelRef) => `em.${m.namespace}.${m.model}.stats.>`,
  /**
   * Disaggregated prefill jobs (gateway/prefill.ts); prefill gateways share a queue group.
   * With `weights`, only gateways of the same weights meet there.
   */
  prefill: (m: ModelRef) =>
    `em.${m.namespace}.${m.model}.prefill${m.weights ? `.w${m.weights}` : ""}`,
  /** Live plan changes from the operator (plan-control.ts). */
  planControl: (m: ModelRef) => `em.${m.namespace}.${m.model}.control.plan`,
  /** The inbox prefix of the model's processes (replies, JetStream deliveries). */
  inboxPrefix: (m: ModelRef) => `em.${m.namespace}.${m.model}._INBOX`,
  /** Everything of one model, for NATS permissions. */
  all: (m: ModelRef) => `em.${m.namespace}.${m.model}.>`,
};

/**
 * Set to "1" by the operator in the pods of a blue/green copy of a shard on the previous
 * weights (src/operator/weights-rollout.ts): the shard's load reports say
 * `previousWeights: true`, whatever its pod's name, and the autoscaler leaves it out of the
 * Deployment's replicas.
 */
export const PREVIOUS_WEIGHTS_ENV = "EM_SHARD_PREVIOUS_WEIGHTS";
