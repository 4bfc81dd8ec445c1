// The operator's autoscaler and rebalancer (ADR 0003). For every DeepSeekModel with
// autoscaling or rebalancing enabled it subscribes to the model's load reports on NATS
// (em.<ns>.<model>.stats.>), and once a second:
//  - exports queue depth, reporters, current/desired replicas per role as Prometheus metrics
//    (what an HPA or KEDA uses in external mode);
//  - in operator mode, every intervalSeconds, decides each role's replicas with HPA's
//    algorithm (hpa.ts) and, on a change, records the decision, emits an Event and asks the
//    reconciler (the only writer of Deployments and status) to apply it;
//  - with rebalancing on, proposes a better placement from the per-expert token counts and
//    rolls it out shards first (rebalance.ts), publishing on em.<ns>.<model>.control.plan.

import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { Counter, Gauge, type Registry } from "prom-client";
import { architectureOf } from "../../api/manifest.ts";
import type { DeepSeekModel, DeepSeekModelStatus } from "../../api/schema.ts";
import { connectNats, type NatsAuth, natsAuthKey } from "../../moe/nats-connection.ts";
import type { PlacementPlan } from "../../moe/placement.ts";
import { encodePlanControl } from "../../moe/plan-control.ts";
import { type ModelRef, subjects } from "../../moe/subjects.ts";
import { formatError } from "../../util/errors.ts";
import type { LogFields } from "../../util/log.ts";
import { settlesWithin } from "../../util/settle.ts";
import { names } from "../labels.ts";
import { reportOfPreviousCopy } from "../weights-rollout.ts";
import {
  type DecisionReason,
  decide,
  type RoleHistory,
  type ScalePolicy,
  startingHistory,
} from "./hpa.ts";
import {
  type GatewayReport,
  LoadTracker,
  parseReport,
  type RoleKey,
  type ShardReport,
  shardRole,
} from "./load.ts";
import { propose, type Rollout, step } from "./rebalance.ts";

type AutoscalingStatus = NonNullable<DeepSeekModelStatus["autoscaling"]>;
type RoleStatus = AutoscalingStatus["roles"][number];
type DecisionRecord = AutoscalingStatus["decisions"][number];
type RebalanceStatus = NonNullable<DeepSeekModelStatus["rebalance"]>;

/** What the reconciler saw of a model's workloads. */
export interface WorkloadView {
  /** The plan in the <name>-plan ConfigMap. */
  plan: PlacementPlan | undefined;
  /** Deployment spec.replicas per role (undefined: no Deployment yet). */
  replicas: Map<RoleKey, number>;
  /** Ready pods per role. */
  ready: Map<RoleKey, number>;
  /** NATS credentials and TLS from spec.nats's Secrets. */
  natsAuth?: NatsAuth;
}

export interface AutoscalerOptions {
  registry: Registry;
  /** Ask for a reconcile of `namespace/name` (to apply replicas, a plan, or refresh status). */
  requeue: (key: string) => void;
  event: (
    model: DeepSeekModel,
    type: "Normal" | "Warning",
    reason: string,
    message: string,
  ) => void;
  /** A line, with the model it is about as a field (a JSON log's key). */
  log: (msg: string, fields?: LogFields) => void;
  /** Log each scaling decision as well as its Event (default true). */
  logDecisions?: boolean;
  /** Connects to a model's NATS (tests may pass their own). */
  connect?: (url: string, auth?: NatsAuth) => Promise<NatsConnection>;
  /** Rollout timing (ms). */
  rolloutResendMs?: number;
  prepareTimeoutMs?: number;
  now?: () => number;
}

interface ModelState {
  key: string;
  model: DeepSeekModel;
  view: WorkloadView;
  natsKey: string;
  sub?: Subscription;
  tracker: LoadTracker;
  history: Map<RoleKey, RoleHistory>;
  desired: Map<RoleKey, number>;
  roles: RoleStatus[];
  decisions: DecisionRecord[];
  lastDecideAt: number;
  lastStatusAt: number;
  rollout?: Rollout;
  rebalance?: RebalanceStatus;
  lastRebalanceEvalAt: number;
  lastRebalanceAt: number;
  planOverride?: PlacementPlan;
  lastCatchUpAt?: number;
}

const round = (n: number) => Math.round(n * 100) / 100;
const TIMER_SLACK_MS = 100;
const rfc3339 = (ms: number) => new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");

/** How long stop() waits for connections to NATS still being made (ms). */
const STOP_WAIT_MS = 1000;

export class Autoscaler {
  readonly #o: AutoscalerOptions;
  readonly #models = new Map<string, ModelState>();
  readonly #conns = new Map<string, Promise<NatsConnection>>();
  #timer: NodeJS.Timeout | undefined;
  readonly #now: () => number;
  readonly #m;

  constructor(o: AutoscalerOptions) {
    this.#o = o;
    this.#now = o.now ?? Date.now;
    const labelNames = ["namespace", "model", "role"] as const;
    const registers = [o.registry];
    this.#m = {
      queueDepth: new Gauge({
        name: "expertmesh_queue_depth",
        help: "Queue depth per replica of a role, averaged over the metric window (gateway: waiting requests; shard-<k>: pending tokens). Absent while unknown.",
        labelNames,
        registers,
      }),
      queueDepthTotal: new Gauge({
        name: "expertmesh_queue_depth_total",
        help: "Queue depth summed over a role's reporting replicas (for an HPA External metric with an AverageValue target).",
        labelNames,
        registers,
      }),
      reporters: new Gauge({
        name: "expertmesh_autoscaler_reporters",
        help: "Replicas of a role with a fresh load report.",
        labelNames,
        registers,
      }),
      target: new Gauge({
        name: "expertmesh_autoscaler_target_queue_depth",
        help: "Target queue depth per replica.",
        labelNames,
        registers,
      }),
      current: new Gauge({
        name: "expertmesh_autoscaler_current_replicas",
        help: "Replicas of the role's Deployment.",
        labelNames,
        registers,
      }),
      desired: new Gauge({
        name: "expertmesh_autoscaler_desired_replicas",
        help: "Replicas the autoscaler wants (operator mode).",
        labelNames,
        registers,
      }),
      decisions: new Counter({
        name: "expertmesh_autoscaler_decisions_total",
        help: "Replica changes by direction (up, down).",
        labelNames: [...labelNames, "direction"],
        registers,
      }),
      imbalance: new Gauge({
        name: "expertmesh_expert_load_imbalance",
        help: "Observed per-shard routed-token load max/mean under the current plan (1 is perfect).",
        labelNames: ["namespace", "model"],
        registers,
      }),
      rebalances: new Gauge({
        name: "expertmesh_rebalance_plan_version",
        help: "Plan version the rebalancer last rolled out.",
        labelNames: ["namespace", "model"],
        registers,
      }),
      rebalanceResults: new Counter({
        name: "expertmesh_rebalances_total",
        help: "Rebalance rollouts by result (done, failed).",
        labelNames: ["namespace", "model", "result"],
        registers,
      }),
    };
  }

  start(): void {
    this.#timer = setInterval(() => this.tick(), 1000);
    this.#timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.#timer);
    for (const s of this.#models.values()) s.sub?.unsubscribe();
    this.#models.clear();
    const conns = [...this.#conns.values()];
    this.#conns.clear();
    // Each connection is closed once it is made. A connect still under way (a NATS server
    // that does not answer: up to its 20 s timeout) is not waited for past a second, since
    // the operator releases its lease after this, within the pod's grace period.
    const closed = Promise.all(
      conns.map((c) =>
        c.then(
          (nc) => nc.close(),
          () => {},
        ),
      ),
    );
    await settlesWithin(closed, STOP_WAIT_MS);
  }

  /** Called by every reconcile: the model and what the cluster has. */
  observe(key: string, model: DeepSeekModel, view: WorkloadView): void {
    const { autoscaling, experts } = model.spec;
    if (!autoscaling.enabled && !experts.rebalance.enabled) {
      this.forget(key);
      return;
    }
    const natsKey = natsAuthKey(model.spec.nats.url, view.natsAuth);
    let s = this.#models.get(key);
    if (s && s.natsKey !== natsKey) {
      this.forget(key);
      s = undefined;
    }
    const windows = {
      windowMs: autoscaling.metricWindowSeconds * 1000,
      staleMs: autoscaling.staleAfterSeconds * 1000,
      expertWindowMs: experts.rebalance.windowSeconds * 1000,
    };
    if (!s) {
      s = {
        key,
        model,
        view,
        natsKey,
        tracker: new LoadTracker(windows),
        history: new Map(),
        desired: new Map(),
        roles: [],
        decisions: model.status?.autoscaling?.decisions ?? [],
        lastDecideAt: 0,
        lastStatusAt: 0,
        lastRebalanceEvalAt: 0,
        lastRebalanceAt: model.status?.rebalance?.lastTime
          ? Date.parse(model.status.rebalance.lastTime)
          : 0,
        ...(model.status?.rebalance ? { rebalance: model.status.rebalance } : {}),
      };
      this.#models.set(key, s);
      void this.#subscribe(s, model.spec.nats.url, view.natsAuth);
    } else {
      s.tracker.setOptions(windows);
    }
    s.model = model;
    s.view = view;
  }

  forget(key: string): void {
    const s = this.#models.get(key);
    if (!s) return;
    s.sub?.unsubscribe();
    this.#models.delete(key);
    const ref = this.#ref(s);
    const m = this.#m;
    for (const role of this.#rolesOf(s)) {
      for (const g of [
        m.queueDepth,
        m.queueDepthTotal,
        m.reporters,
        m.target,
        m.current,
        m.desired,
      ])
        g.remove({ ...ref, role });
    }
    m.imbalance.remove(ref);
    m.rebalances.remove(ref);
    this.#release(s.natsKey);
  }

  /**
   * Closes the connection of `natsKey` once no model uses it: a model deleted, its
   * spec.nats changed, or its Secrets rotated (new credentials or certificates make a new
   * connection) would otherwise leave the old one open for the operator's life.
   */
  #release(natsKey: string): void {
    for (const other of this.#models.values()) if (other.natsKey === natsKey) return;
    const c = this.#conns.get(natsKey);
    if (!c) return;
    this.#conns.delete(natsKey);
    void c.then(
      (nc) => nc.close(),
      () => {},
    );
  }

  async #subscribe(s: ModelState, url: string, auth?: NatsAuth): Promise<void> {
    try {
      const nc = await this.#conn(url, auth);
      if (this.#models.get(s.key) !== s) return;
      s.sub = nc.subscribe(subjects.allStats(this.#ref(s)), {
        callback: (err, msg) => {
          if (err) return;
          const r = parseReport(msg.data);
          if (!r) return;
          const name = s.model.metadata.name;
          const previous =
            r.role === "shard" && reportOfPreviousCopy(names.shard(name, r.shard), r);
          s.tracker.add(r, this.#now(), previous);
        },
      });
      this.#o.log(`autoscaler: watching load reports of ${s.key} on ${url}`, { model: s.key });
    } catch (err) {
      this.#o.log(`autoscaler: cannot reach NATS ${url} for ${s.key}: ${formatError(err)}`, {
        model: s.key,
      });
      // Try again on the next observe.
      if (this.#models.get(s.key) === s) this.#models.delete(s.key);
    }
  }

  #conn(url: string, auth?: NatsAuth): Promise<NatsConnection> {
    const key = natsAuthKey(url, auth);
    let c = this.#conns.get(key);
    if (!c) {
      c = this.#o.connect
        ? this.#o.connect(url, auth)
        : connectNats({
            url,
            name: "expertmesh-operator",
            auth,
            reconnectWaitMs: 500,
            log: (m) => this.#o.log(`autoscaler: ${m}`),
          });
      c.catch(() => this.#conns.delete(key));
      this.#conns.set(key, c);
    }
    return c;
  }

  #ref(s: ModelState): ModelRef {
    return { namespace: s.model.metadata.namespace!, model: s.model.metadata.name };
  }

  /** Replicas the autoscaler decided per role (operator mode), for the reconciler. */
  replicasFor(key: string): Map<RoleKey, number> | undefined {
    return this.#models.get(key)?.desired;
  }

  /** A rebalanced plan the reconciler should write (newer than the ConfigMap's). */
  planFor(key: string): PlacementPlan | undefined {
    return this.#models.get(key)?.planOverride;
  }

  /** Mean queue depth per role family for status.queueDepth. */
  queueDepth(key: string): { gateway?: number; shard?: number } | undefined {
    const s = this.#models.get(key);
    if (!s) return undefined;
    const now = this.#now();
    const g = s.tracker.observe("gateway", now);
    const shards = Array.from({ length: s.view.plan?.numShards ?? 0 }, (_, k) =>
      s.tracker.observe(shardRole(k), now),
    ).filter((o) => o.reporters > 0);
    return {
      ...(g.reporters ? { gateway: round(g.total / g.reporters) } : {}),
      ...(shards.length
        ? {
            shard: round(
              shards.reduce((n, o) => n + o.total, 0) / shards.reduce((n, o) => n + o.reporters, 0),
            ),
          }
        : {}),
    };
  }

  /** The autoscaling and rebalance parts of the status. */
  statusFor(key: string): Pick<DeepSeekModelStatus, "autoscaling" | "rebalance"> | undefined {
    const s = this.#models.get(key);
    if (!s) return undefined;
    const { autoscaling } = s.model.spec;
    // The roles were judged at the last tick; their replicas are the Deployments' as the
    // reconcile that calls this has just observed them (a decision applied by this very
    // reconcile shows at once, not one status refresh later).
    const roles = s.roles.map((r) => ({
      ...r,
      replicas: s.view.replicas.get(r.role) ?? r.replicas,
    }));
    return {
      ...(autoscaling.enabled
        ? { autoscaling: { mode: autoscaling.mode, roles, decisions: s.decisions } }
        : {}),
      ...(s.rebalance ? { rebalance: s.rebalance } : {}),
    };
  }

  /** One round over every model (the timer calls it each second; tests may call it). */
  tick(): void {
    const now = this.#now();
    for (const s of this.#models.values()) {
      try {
        if (s.model.spec.autoscaling.enabled) this.#scale(s, now);
        if (s.model.spec.experts.rebalance.enabled) this.#rebalance(s, now);
      } catch (err) {
        this.#o.log(`autoscaler: ${s.key}: ${formatError(err)}`, { model: s.key });
      }
    }
  }

  #rolesOf(s: ModelState): RoleKey[] {
    return [
      "gateway",
      ...(s.model.spec.gateway.disaggregation ? ["prefill"] : []),
      ...Array.from({ length: s.view.plan?.numShards ?? 0 }, (_, k) => shardRole(k)),
    ];
  }

  #policy(s: ModelState, role: RoleKey): ScalePolicy {
    const { autoscaling: a, gateway, experts } = s.model.spec;
    const prefill = gateway.disaggregation;
    const [min, max, target] =
      role === "gateway"
        ? [gateway.minReplicas, gateway.maxReplicas, a.gatewayTargetQueueDepth]
        : role === "prefill" && prefill
          ? [prefill.minReplicas, prefill.maxReplicas, a.prefillTargetQueueDepth]
          : [experts.replicas.min, experts.replicas.max, a.shardTargetQueueDepth];
    return {
      min,
      max,
      target,
      tolerance: a.tolerance,
      scaleUpStabilizationMs: a.scaleUpStabilizationSeconds * 1000,
      scaleDownStabilizationMs: a.scaleDownStabilizationSeconds * 1000,
      periodMs: a.policyPeriodSeconds * 1000,
      scaleUpMaxPods: a.scaleUpMaxPods,
      scaleUpMaxPercent: a.scaleUpMaxPercent,
      scaleDownMaxPercent: a.scaleDownMaxPercent,
    };
  }

  #scale(s: ModelState, now: number): void {
    const a = s.model.spec.autoscaling;
    const ref = this.#ref(s);
    const operatorMode = a.mode === "operator";
    // The 1 s timer drifts by a few ms either way: without the slack a tick 999 ms after the
    // last decision would wait for the next one, leaving 2 s between decisions.
    const due = operatorMode && now - s.lastDecideAt >= a.intervalSeconds * 1000 - TIMER_SLACK_MS;
    if (due) s.lastDecideAt = now;
    const roles: RoleStatus[] = [];
    let changed = false;
    for (const role of this.#rolesOf(s)) {
      const labels = { ...ref, role };
      const policy = this.#policy(s, role);
      const obs = s.tracker.observe(role, now);
      const current = s.desired.get(role) ?? s.view.replicas.get(role);
      this.#m.reporters.set(labels, obs.reporters);
      this.#m.target.set(labels, policy.target);
      if (obs.reporters > 0) {
        this.#m.queueDepth.set(labels, obs.total / obs.reporters);
        this.#m.queueDepthTotal.set(labels, obs.total);
      } else {
        this.#m.queueDepth.remove(labels);
        this.#m.queueDepthTotal.remove(labels);
      }
      if (current === undefined) continue; // no Deployment yet
      this.#m.current.set(labels, s.view.replicas.get(role) ?? current);
      const previous = s.roles.find((r) => r.role === role);
      let status: RoleStatus = {
        role,
        replicas: s.view.replicas.get(role) ?? current,
        desiredReplicas: current,
        metric: obs.reporters > 0 ? "Known" : "Unknown",
        ...(obs.reporters > 0 ? { queueDepth: round(obs.total / obs.reporters) } : {}),
        target: policy.target,
        reporters: obs.reporters,
        message:
          obs.reporters > 0
            ? (previous?.message ?? "waiting for the first decision")
            : `queue depth unknown (${obs.unknownReason}): not scaling`,
      };
      if (!operatorMode) {
        status.message = "external mode: replicas are left to an HPA or KEDA";
      } else if (due) {
        const ready = s.view.ready.get(role) ?? 0;
        const history = s.history.get(role) ?? startingHistory(current, now);
        const d = decide(policy, history, current, ready, obs, now);
        s.history.set(role, d.history);
        status = { ...status, desiredReplicas: d.desired, message: `${d.reason}: ${d.message}` };
        if (d.desired !== current) {
          s.desired.set(role, d.desired);
          changed = true;
          this.#record(
            s,
            role,
            current,
            d.desired,
            d.observed ?? 0,
            policy.target,
            d.reason,
            d.message,
            now,
          );
        }
      }
      this.#m.desired.set(labels, status.desiredReplicas);
      roles.push(status);
    }
    s.roles = roles;
    // Apply a change now; refresh the status once per interval otherwise.
    if (changed || (due && now - s.lastStatusAt >= a.intervalSeconds * 1000)) {
      s.lastStatusAt = now;
      this.#o.requeue(s.key);
    }
  }

  #record(
    s: ModelState,
    role: RoleKey,
    from: number,
    to: number,
    observed: number,
    target: number,
    reason: DecisionReason,
    message: string,
    now: number,
  ): void {
    const direction = to > from ? "up" : "down";
    this.#m.decisions.inc({ ...this.#ref(s), role, direction });
    s.decisions = [
      ...s.decisions,
      { time: rfc3339(now), role, from, to, queueDepth: round(observed), target, reason },
    ].slice(-10);
    const text = `${role}: ${from} -> ${to} replicas (${reason}): ${message}`;
    if (this.#o.logDecisions !== false)
      this.#o.log(`autoscaler: ${s.key}: ${text}`, { model: s.key, role });
    this.#o.event(s.model, "Normal", direction === "up" ? "ScaledUp" : "ScaledDown", text);
  }

  #rebalance(s: ModelState, now: number): void {
    const plan = s.view.plan;
    if (!plan) return;
    const rb = s.model.spec.experts.rebalance;
    const ref = this.#ref(s);
    if (s.rollout) {
      this.#advance(s, now);
      return;
    }
    this.#catchUp(s, plan, now);
    const evalEveryMs = Math.max(1000, Math.min(5000, (rb.windowSeconds * 1000) / 2));
    if (now - s.lastRebalanceEvalAt < evalEveryMs) return;
    s.lastRebalanceEvalAt = now;
    const { load, total } = s.tracker.expertLoad(plan.moeLayers, plan.routedExperts, now);
    const p = propose(plan, architectureOf(s.model), load, total, rb);
    const observed = p.action === "rollout" ? p.before : p.imbalance;
    if (observed !== undefined) this.#m.imbalance.set(ref, observed);
    const base = { ...s.rebalance };
    delete base.imbalance;
    if (p.action === "none" || now - s.lastRebalanceAt < rb.cooldownSeconds * 1000) {
      s.rebalance = {
        ...base,
        phase: "Idle",
        ...(observed !== undefined ? { imbalance: round(observed) } : {}),
        message:
          p.action === "none"
            ? p.reason
            : `${p.reason}; waiting for the ${rb.cooldownSeconds} s cooldown since the last rebalance`,
      };
      return;
    }
    this.#m.imbalance.set(ref, p.before);
    s.rollout = {
      phase: "Preparing",
      plan: p.plan,
      before: p.before,
      after: p.after,
      startedAt: now,
      sentAt: Number.NEGATIVE_INFINITY,
    };
    s.rebalance = { ...base, phase: "Preparing", imbalance: round(p.before), message: p.reason };
    this.#o.event(s.model, "Normal", "RebalanceStarted", `${p.reason}: loading it on every shard`);
    this.#o.requeue(s.key);
    this.#advance(s, now);
  }

  /**
   * Level-based: any gateway or shard that reports an older plan than the ConfigMap's (it
   * missed the activation, e.g. across an operator restart, or started from a stale mount)
   * is told to activate it again, at most every resend period.
   */
  #catchUp(s: ModelState, plan: PlacementPlan, now: number): void {
    const resend = this.#o.rolloutResendMs ?? 2000;
    if (now - (s.lastCatchUpAt ?? 0) < resend) return;
    const roles = [
      "gateway",
      "prefill",
      ...plan.layers[0]!.shardExperts.map((_, k) => shardRole(k)),
    ];
    const behind = roles.some((role) =>
      s.tracker
        .fresh(role, now)
        .some((r) => r.planVersion !== undefined && r.planVersion < plan.version),
    );
    if (!behind) return;
    s.lastCatchUpAt = now;
    const ref = this.#ref(s);
    void this.#conn(s.model.spec.nats.url, s.view.natsAuth)
      .then((nc) => nc.publish(subjects.planControl(ref), encodePlanControl("activate", plan)))
      .catch((err) =>
        this.#o.log(`autoscaler: ${s.key}: publish activate: ${formatError(err)}`, {
          model: s.key,
        }),
      );
  }

  #advance(s: ModelState, now: number): void {
    const r = s.rollout!;
    const plan = s.view.plan!;
    const shards = Array.from({ length: plan.numShards }, (_, k) =>
      s.tracker.fresh(shardRole(k), now),
    ) as ShardReport[][];
    const gateways = s.tracker.fresh("gateway", now) as GatewayReport[];
    const res = step(
      r,
      shards,
      gateways,
      now,
      {
        resendMs: this.#o.rolloutResendMs ?? 2000,
        prepareTimeoutMs: this.#o.prepareTimeoutMs ?? 120_000,
      },
      plan.version,
    );
    const ref = this.#ref(s);
    const publish = (op: "prepare" | "activate") =>
      void this.#conn(s.model.spec.nats.url, s.view.natsAuth)
        .then((nc) => nc.publish(subjects.planControl(ref), encodePlanControl(op, r.plan)))
        .catch((err) =>
          this.#o.log(`autoscaler: ${s.key}: publish ${op}: ${formatError(err)}`, { model: s.key }),
        );
    const v = r.plan.version;
    switch (res.next) {
      case "send":
        s.rollout = res.rollout;
        publish(res.op);
        return;
      case "wait":
        s.rollout = res.rollout;
        s.rebalance = { ...s.rebalance!, message: res.message };
        return;
      case "activated":
        // Every shard serves v: the ConfigMap may name it (new pods start on it), gateways switch.
        s.rollout = { ...res.rollout, sentAt: now };
        s.planOverride = r.plan;
        s.rebalance = {
          ...s.rebalance!,
          phase: "Activating",
          message: `every shard loaded plan v${v}; switching gateways`,
        };
        publish("activate");
        this.#o.requeue(s.key);
        return;
      case "done": {
        s.rollout = undefined;
        s.lastRebalanceAt = now;
        this.#m.rebalances.set(ref, v);
        this.#m.rebalanceResults.inc({ ...ref, result: "done" });
        const text = `plan v${v} active on every gateway and shard: expected per-shard load max/mean ${r.before.toFixed(3)} -> ${r.after.toFixed(3)}`;
        s.rebalance = {
          phase: "Idle",
          message: text,
          lastTime: rfc3339(now),
          lastBefore: round(r.before),
          lastAfter: round(r.after),
        };
        this.#o.event(s.model, "Normal", "Rebalanced", text);
        this.#o.requeue(s.key);
        return;
      }
      case "failed":
        s.rollout = undefined;
        s.lastRebalanceAt = now;
        this.#m.rebalanceResults.inc({ ...ref, result: "failed" });
        s.rebalance = {
          ...s.rebalance!,
          phase: "Idle",
          message: `rebalance to plan v${v} failed: ${res.message}`,
        };
        this.#o.event(s.model, "Warning", "RebalanceFailed", res.message);
        this.#o.requeue(s.key);
        return;
    }
  }
}
