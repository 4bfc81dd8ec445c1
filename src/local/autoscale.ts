// Autoscaling and expert rebalancing in local mode (`expertmesh up` of a manifest with
// spec.autoscaling.enabled or spec.experts.rebalance.enabled): the operator's own autoscaler
// (src/operator/autoscale/autoscaler.ts: the same load reports on NATS, HPA's algorithm, the
// same windows and limits, the same live plan rollout) runs here, and `up` does what the
// operator's reconciler would: it starts or stops shard processes where the operator scales
// Deployments, and writes a rebalanced plan to the plan file the processes start from, where
// the operator writes the plan ConfigMap. What the reconciler shows the autoscaler (replicas
// and ready replicas per role) comes from the processes here.
//
// Gateways scale too when `up` runs its front (src/local/front.ts, the gateways' Service here:
// localGateways says when); otherwise the gateway role is never shown to the autoscaler.
import { Registry } from "prom-client";
import type { DeepSeekModel } from "../api/schema.ts";
import type { PlacementPlan } from "../moe/placement.ts";
import { serializePlan } from "../moe/plan-json.ts";
import { Autoscaler, type WorkloadView } from "../operator/autoscale/autoscaler.ts";
import type { RoleKey } from "../operator/autoscale/load.ts";
import { writeFileAtomic } from "../util/fs.ts";

/**
 * The processes of each role ("gateway", "prefill", "shard-<k>"), as the autoscaler sees and
 * changes them.
 */
export interface LocalRoles {
  /** The roles it may scale. */
  roles: readonly RoleKey[];
  /** Replicas of a role that run or are starting (not those told to stop). */
  replicas(role: RoleKey): number;
  /** ... of which serve. */
  ready(role: RoleKey): number;
  /** Starts or stops replicas of a role until `n` run. */
  scale(role: RoleKey, n: number): void;
}

export interface LocalAutoscalerOptions {
  model: DeepSeekModel;
  /** The plan the processes started on, and its file (a rebalanced plan replaces it). */
  plan: PlacementPlan;
  planPath: string;
  /** The nats-server `up` started (the manifest's spec.nats.url is the cluster's). */
  natsUrl: string;
  processes: LocalRoles;
  say: (message: string) => void;
  /** How often the processes are shown to the autoscaler (ms; default 1000). */
  observeEveryMs?: number;
}

/**
 * How many gateway processes `up` starts (the operator's count: spec.gateway.replicas within
 * minReplicas and maxReplicas, at least one), and whether it needs its front: more than one
 * gateway, now or once the autoscaler scales them (operator mode), or under `up --watch`
 * (`watched`), where a roll starts a new gateway before the old one stops (ADR 0041).
 * --single-process runs one, and no front.
 */
export function localGateways(
  m: DeepSeekModel,
  singleProcess: boolean,
  watched = false,
): { initial: number; front: boolean; note?: string } {
  const g = m.spec.gateway;
  const a = m.spec.autoscaling;
  const initial = Math.max(1, Math.min(Math.max(g.replicas, g.minReplicas), g.maxReplicas));
  if (singleProcess)
    return {
      initial: 1,
      front: false,
      ...(initial > 1
        ? { note: `spec.gateway asks for ${initial} gateways: --single-process runs one` }
        : {}),
    };
  return {
    initial,
    front: watched || initial > 1 || (a.enabled && a.mode === "operator" && g.maxReplicas > 1),
  };
}

/**
 * How many prefill gateway processes `up` starts (spec.gateway.disaggregation's replicas
 * within its minReplicas and maxReplicas, as the operator's Deployment; 0 without).
 */
export function localPrefills(m: DeepSeekModel): number {
  const d = m.spec.gateway.disaggregation;
  return d ? Math.min(Math.max(d.replicas, d.minReplicas), d.maxReplicas) : 0;
}

/**
 * Whether `up` runs the autoscaler for this manifest (autoscaling or rebalancing on, and
 * shards to act on), and what it says about the parts local mode leaves out.
 */
export function localScaling(
  m: DeepSeekModel,
  singleProcess: boolean,
): { run: boolean; notes: string[] } {
  const scaling = m.spec.autoscaling.enabled;
  const rebalancing = m.spec.experts.rebalance.enabled;
  if (!scaling && !rebalancing) return { run: false, notes: [] };
  const what = [scaling && "spec.autoscaling", rebalancing && "spec.experts.rebalance"]
    .filter(Boolean)
    .join(" and ");
  if (singleProcess)
    return { run: false, notes: [`${what}: --single-process runs no shards, so neither runs`] };
  const notes =
    scaling && m.spec.autoscaling.mode !== "operator"
      ? [
          `spec.autoscaling.mode is ${m.spec.autoscaling.mode}: replicas are left to an HPA or KEDA, which local mode has not; shards stay at replicas.min`,
        ]
      : [];
  return { run: true, notes };
}

export class LocalAutoscaler {
  readonly #o: LocalAutoscalerOptions;
  readonly #key: string;
  readonly #model: DeepSeekModel;
  readonly #autoscaler: Autoscaler;
  #plan: PlacementPlan;
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;

  constructor(o: LocalAutoscalerOptions) {
    this.#o = o;
    this.#plan = o.plan;
    const ns = o.model.metadata.namespace ?? "default";
    this.#key = `${ns}/${o.model.metadata.name}`;
    this.#model = {
      ...o.model,
      metadata: { ...o.model.metadata, namespace: ns },
      spec: { ...o.model.spec, nats: { ...o.model.spec.nats, url: o.natsUrl } },
    };
    this.#autoscaler = new Autoscaler({
      registry: new Registry(),
      requeue: () => this.#reconcile(),
      // What the operator makes Events of (decisions, rebalances), as lines.
      event: (_model, type, reason, message) =>
        o.say(`${type === "Warning" ? "warning: " : ""}${reason}: ${message}`),
      logDecisions: false,
      log: (message) => o.say(message),
    });
  }

  start(): void {
    const { autoscaling: a, experts, gateway } = this.#model.spec;
    if (a.enabled && a.mode === "operator")
      this.#o.say(
        `autoscaling: each shard between ${experts.replicas.min} and ${experts.replicas.max} replicas, ` +
          `target ${a.shardTargetQueueDepth} pending tokens per replica; ` +
          (this.#o.processes.roles.includes("gateway")
            ? `gateways between ${gateway.minReplicas} and ${gateway.maxReplicas}, target ${a.gatewayTargetQueueDepth} waiting requests per gateway; `
            : "the gateway stays one process; ") +
          (gateway.disaggregation && this.#o.processes.roles.includes("prefill")
            ? `prefill gateways between ${gateway.disaggregation.minReplicas} and ${gateway.disaggregation.maxReplicas}, target ${a.prefillTargetQueueDepth} waiting prompts each; `
            : "") +
          `decided every ${a.intervalSeconds} s (the operator's autoscaler)`,
      );
    if (experts.rebalance.enabled)
      this.#o.say(
        `rebalancing: the placement of the ${experts.redundantExperts} redundant expert slot(s) follows the load ` +
          `(over ${experts.rebalance.threshold} max/mean per shard, every ${experts.rebalance.cooldownSeconds} s at most); ` +
          `a new plan is rolled out live and written to ${this.#o.planPath}`,
      );
    this.#reconcile();
    this.#autoscaler.start();
    this.#timer = setInterval(() => this.#reconcile(), this.#o.observeEveryMs ?? 1000);
    this.#timer.unref();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#timer);
    await this.#autoscaler.stop();
  }

  /**
   * What the reconciler does: shows the autoscaler the processes, applies its replicas, and
   * writes a plan every shard has activated where processes started later read it.
   */
  #reconcile(): void {
    if (this.#stopped) return;
    const next = this.#autoscaler.planFor(this.#key);
    if (next && next.version > this.#plan.version) {
      writeFileAtomic(this.#o.planPath, serializePlan(next));
      this.#plan = next;
      this.#o.say(
        `plan v${next.version} written to ${this.#o.planPath}: processes started from now on load it`,
      );
    }
    this.#autoscaler.observe(this.#key, this.#model, this.#view());
    const p = this.#o.processes;
    for (const [role, n] of this.#autoscaler.replicasFor(this.#key) ?? [])
      if (p.roles.includes(role) && p.replicas(role) !== n) p.scale(role, n);
  }

  #view(): WorkloadView {
    const p = this.#o.processes;
    const replicas = new Map<RoleKey, number>();
    const ready = new Map<RoleKey, number>();
    for (const role of p.roles) {
      replicas.set(role, p.replicas(role));
      ready.set(role, p.ready(role));
    }
    return { plan: this.#plan, replicas, ready };
  }
}
