// Autoscaling in local mode (`expertmesh up` of a manifest with spec.autoscaling.enabled):
// the operator's own autoscaler (src/operator/autoscale/autoscaler.ts: the same load reports
// on NATS, HPA's algorithm, the same windows and limits) decides each shard's replicas, and
// `up` starts or stops shard processes where the operator would scale Deployments. What is
// told to the operator's reconciler (replicas per role, ready per role) comes from the
// processes here.
//
// Only shards scale: a gateway's HTTP and gRPC ports are one process's here (Kubernetes puts a
// Service in front of the gateway pods), so the gateway role is never shown to the autoscaler.
import { Registry } from "prom-client";
import type { DeepSeekModel } from "../api/schema.ts";
import type { PlacementPlan } from "../moe/placement.ts";
import { Autoscaler, type WorkloadView } from "../operator/autoscale/autoscaler.ts";
import type { RoleKey } from "../operator/autoscale/load.ts";

/** The shard processes, as the autoscaler sees and changes them. */
export interface LocalShards {
  /** Replicas of shard k that run or are starting (not those told to stop). */
  replicas(k: number): number;
  /** ... of which serve. */
  ready(k: number): number;
  /** Starts or stops replicas of shard k until `n` run. */
  scale(k: number, n: number): void;
}

export interface LocalAutoscalerOptions {
  model: DeepSeekModel;
  plan: PlacementPlan;
  /** The nats-server `up` started (the manifest's spec.nats.url is the cluster's). */
  natsUrl: string;
  shards: LocalShards;
  say: (message: string) => void;
  /** How often the processes are shown to the autoscaler (ms; default 1000). */
  observeEveryMs?: number;
}

/** Why `up` does not autoscale this manifest (null: it does). */
export function localAutoscalingOff(m: DeepSeekModel, singleProcess: boolean): string | null {
  const a = m.spec.autoscaling;
  if (!a.enabled) return null;
  if (singleProcess)
    return "spec.autoscaling: --single-process runs no shards, so nothing is scaled";
  if (a.mode !== "operator")
    return `spec.autoscaling.mode is ${a.mode}: replicas are left to an HPA or KEDA, which local mode has not; shards stay at replicas.min`;
  return null;
}

const shardKey = /^shard-(\d+)$/;

export class LocalAutoscaler {
  readonly #o: LocalAutoscalerOptions;
  readonly #key: string;
  readonly #model: DeepSeekModel;
  readonly #autoscaler: Autoscaler;
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;

  constructor(o: LocalAutoscalerOptions) {
    this.#o = o;
    const ns = o.model.metadata.namespace ?? "default";
    this.#key = `${ns}/${o.model.metadata.name}`;
    // The local nats-server; rebalancing is not run here (a new plan would have to reach the
    // plan file of every process `up` starts later).
    this.#model = {
      ...o.model,
      metadata: { ...o.model.metadata, namespace: ns },
      spec: {
        ...o.model.spec,
        nats: { ...o.model.spec.nats, url: o.natsUrl },
        experts: {
          ...o.model.spec.experts,
          rebalance: { ...o.model.spec.experts.rebalance, enabled: false },
        },
      },
    };
    this.#autoscaler = new Autoscaler({
      registry: new Registry(),
      requeue: () => this.#reconcile(),
      // (its log has every decision, as the Event's text)
      event: () => {},
      log: (message) => o.say(message),
    });
  }

  start(): void {
    const a = this.#model.spec.autoscaling;
    this.#o.say(
      `autoscaling: each shard between ${this.#model.spec.experts.replicas.min} and ${this.#model.spec.experts.replicas.max} replicas, ` +
        `target ${a.shardTargetQueueDepth} pending tokens per replica, decided every ${a.intervalSeconds} s ` +
        "(the operator's autoscaler; the gateway stays one process here)",
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

  /** What the reconciler does: shows the autoscaler the processes, then applies its replicas. */
  #reconcile(): void {
    if (this.#stopped) return;
    this.#autoscaler.observe(this.#key, this.#model, this.#view());
    for (const [role, n] of this.#autoscaler.replicasFor(this.#key) ?? []) {
      const k = Number(shardKey.exec(role)?.[1] ?? -1);
      if (k >= 0 && k < this.#o.plan.numShards && this.#o.shards.replicas(k) !== n)
        this.#o.shards.scale(k, n);
    }
  }

  #view(): WorkloadView {
    const replicas = new Map<RoleKey, number>();
    const ready = new Map<RoleKey, number>();
    for (let k = 0; k < this.#o.plan.numShards; k++) {
      replicas.set(`shard-${k}`, this.#o.shards.replicas(k));
      ready.set(`shard-${k}`, this.#o.shards.ready(k));
    }
    return { plan: this.#o.plan, replicas, ready };
  }
}
