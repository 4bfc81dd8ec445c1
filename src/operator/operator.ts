// The operator process: leader election, informers that turn changes into work-queue keys,
// workers that reconcile, and the metrics/health endpoint. Reconcile logic: reconciler.ts.

import type { Server } from "node:http";
import type { KubeConfig, V1Deployment, V1Pod } from "@kubernetes/client-node";
import { type DeepSeekModel, GROUP, PLURAL, VERSION } from "../api/schema.ts";
import { formatError } from "../util/errors.ts";
import type { LogFields } from "../util/log.ts";
import { settlesWithin } from "../util/settle.ts";
import { Autoscaler } from "./autoscale/autoscaler.ts";
import { Informer } from "./informer.ts";
import { KubeClient } from "./kube.ts";
import { LABEL_MODEL, MANAGED_BY } from "./labels.ts";
import { LeaderElector } from "./leader.ts";
import { OperatorMetrics, serveMetrics } from "./metrics.ts";
import { Reconciler, RetryLater } from "./reconciler.ts";
import { WorkQueue } from "./workqueue.ts";

export interface OperatorOptions {
  /** Namespaces to watch; empty watches all. */
  namespaces: string[];
  leaderElect: boolean;
  leaseNamespace: string;
  leaseName: string;
  identity: string;
  leaseDurationSeconds: number;
  metricsPort: number;
  metricsHost?: string;
  workers: number;
  /**
   * How long stop() waits for reconciles in flight before it hands back the lease anyway
   * (default 15 s: the chart's grace period is 30 s, and a lease left to expire costs the
   * successor its whole duration).
   */
  stopTimeoutMs?: number;
  /** How often models whose spec.env reads Secrets or ConfigMaps are read again (ReconcilerOptions). */
  envResyncMs?: number;
  log: (msg: string, fields?: LogFields) => void;
}

export class Operator {
  readonly #kc: KubeConfig;
  readonly #o: OperatorOptions;
  readonly #kube: KubeClient;
  readonly #queue = new WorkQueue({ baseDelayMs: 500, maxDelayMs: 30_000 });
  readonly #metrics = new OperatorMetrics();
  readonly #informers: Informer<{
    metadata?: { name?: string; namespace?: string; labels?: Record<string, string> };
  }>[] = [];
  #elector: LeaderElector | undefined;
  #server: Server | undefined;
  #workers: Promise<void> | undefined;
  #autoscaler: Autoscaler | undefined;
  #started = false;

  constructor(kc: KubeConfig, opts: OperatorOptions) {
    this.#kc = kc;
    this.#o = opts;
    this.#kube = new KubeClient(kc, opts.identity, opts.log);
  }

  get metricsPort(): number {
    const addr = this.#server?.address();
    return typeof addr === "object" && addr ? addr.port : this.#o.metricsPort;
  }

  /** Starts serving health, waits for leadership (if enabled), then reconciles until stop(). */
  async start(): Promise<void> {
    const log = this.#o.log;
    this.#server = await serveMetrics(
      this.#metrics,
      this.#o.metricsPort,
      () => this.#ready(),
      this.#o.metricsHost,
    );
    log(`metrics and health on :${this.metricsPort}`);
    if (this.#o.leaderElect) {
      this.#elector = new LeaderElector(this.#kc, {
        namespace: this.#o.leaseNamespace,
        name: this.#o.leaseName,
        identity: this.#o.identity,
        leaseDurationSeconds: this.#o.leaseDurationSeconds,
        renewDeadlineMs: Math.max(1000, this.#o.leaseDurationSeconds * 1000 * (2 / 3)),
        retryPeriodMs: Math.max(200, (this.#o.leaseDurationSeconds * 1000) / 7.5),
        log,
      });
      log(`waiting for the leader lease ${this.#o.leaseNamespace}/${this.#o.leaseName}`);
      await this.#elector.acquire(() => {
        log("leadership lost: exiting so that a fresh process can compete again");
        process.exit(1);
      });
      this.#metrics.isLeader.set(1);
    }
    await this.#startInformers();
    this.#autoscaler = new Autoscaler({
      registry: this.#metrics.registry,
      requeue: (key) => this.#queue.add(key),
      event: (model, type, reason, message) =>
        void this.#kube
          .event(model, type, reason, message)
          .catch((err) => log(`event ${reason}: ${formatError(err)}`)),
      log,
    });
    this.#autoscaler.start();
    const reconciler = new Reconciler(this.#kube, {
      log,
      autoscaler: this.#autoscaler,
      conditionMetrics: this.#metrics.models,
      ...(this.#o.envResyncMs !== undefined ? { envResyncMs: this.#o.envResyncMs } : {}),
    });
    this.#workers = this.#queue.run(
      async (key) => {
        const end = this.#metrics.reconcileSeconds.startTimer();
        try {
          const result = await reconciler.reconcile(key);
          this.#metrics.reconciles.inc({ result: result ? "requeue" : "success" });
          return result;
        } catch (err) {
          this.#metrics.reconciles.inc({ result: "error" });
          throw err;
        } finally {
          end();
          this.#metrics.queueDepth.set(this.#queue.depth);
        }
      },
      this.#o.workers,
      (key, err) =>
        log(
          `reconcile ${key}: ${err instanceof RetryLater ? "waiting: " : "error: "}${formatError(err)} (retry ${this.#queue.failures(key)})`,
        ),
    );
    this.#started = true;
    log(
      `reconciling DeepSeekModels in ${this.#o.namespaces.length ? this.#o.namespaces.join(", ") : "all namespaces"}`,
    );
  }

  #ready(): boolean {
    // A standby replica is healthy and ready; a leader once its informers have synced.
    return !this.#elector?.isLeader || (this.#started && this.#informers.every((i) => i.hasSynced));
  }

  async #startInformers(): Promise<void> {
    const scopes = this.#o.namespaces.length ? this.#o.namespaces : [undefined];
    const enqueue = (ns: string | undefined, name: string | undefined) => {
      if (ns && name) {
        this.#queue.add(`${ns}/${name}`);
        this.#metrics.queueDepth.set(this.#queue.depth);
      }
    };
    const owned = `app.kubernetes.io/managed-by=${MANAGED_BY}`;
    for (const ns of scopes) {
      const nsPath = (prefix: string, plural: string) =>
        ns ? `${prefix}/namespaces/${ns}/${plural}` : `${prefix}/${plural}`;
      const models = new Informer<DeepSeekModel>(this.#kc, {
        name: `deepseekmodels${ns ? `@${ns}` : ""}`,
        list: async () => {
          const list = (await (ns
            ? this.#kube.custom.listNamespacedCustomObject({
                group: GROUP,
                version: VERSION,
                namespace: ns,
                plural: PLURAL,
              })
            : this.#kube.custom.listClusterCustomObject({
                group: GROUP,
                version: VERSION,
                plural: PLURAL,
              }))) as { items: DeepSeekModel[]; metadata: { resourceVersion: string } };
          this.#metrics.relists.inc({ informer: "deepseekmodels" });
          return { items: list.items, resourceVersion: list.metadata.resourceVersion };
        },
        watchPath: nsPath(`/apis/${GROUP}/${VERSION}`, PLURAL),
        onChange: (m) => enqueue(m.metadata.namespace, m.metadata.name),
        log: this.#o.log,
      });
      const deployments = new Informer<V1Deployment>(this.#kc, {
        name: "deployments",
        list: async () => {
          const list = ns
            ? await this.#kube.apps.listNamespacedDeployment({
                namespace: ns,
                labelSelector: owned,
              })
            : await this.#kube.apps.listDeploymentForAllNamespaces({ labelSelector: owned });
          this.#metrics.relists.inc({ informer: "deployments" });
          return { items: list.items, resourceVersion: list.metadata?.resourceVersion ?? "" };
        },
        watchPath: nsPath("/apis/apps/v1", "deployments"),
        watchQuery: { labelSelector: owned },
        onChange: (d) => enqueue(d.metadata?.namespace, d.metadata?.labels?.[LABEL_MODEL]),
        log: this.#o.log,
      });
      const pods = new Informer<V1Pod>(this.#kc, {
        name: "pods",
        list: async () => {
          const list = ns
            ? await this.#kube.core.listNamespacedPod({ namespace: ns, labelSelector: owned })
            : await this.#kube.core.listPodForAllNamespaces({ labelSelector: owned });
          this.#metrics.relists.inc({ informer: "pods" });
          return { items: list.items, resourceVersion: list.metadata?.resourceVersion ?? "" };
        },
        watchPath: nsPath("/api/v1", "pods"),
        watchQuery: { labelSelector: owned },
        onChange: (p) => enqueue(p.metadata?.namespace, p.metadata?.labels?.[LABEL_MODEL]),
        log: this.#o.log,
      });
      for (const inf of [models, deployments, pods]) {
        await inf.start();
        this.#informers.push(inf as never);
      }
    }
  }

  /**
   * Graceful shutdown: stop watching, finish in-flight reconciles (for at most
   * stopTimeoutMs: a Kubernetes call can hang with no timeout of its own), hand back the
   * lease. The process exits after this, which ends whatever reconcile was left; its
   * writes are server-side applies of the same desired state the successor computes.
   */
  async stop(): Promise<void> {
    for (const inf of this.#informers) inf.stop();
    this.#queue.shutdown();
    const waitMs = this.#o.stopTimeoutMs ?? 15_000;
    if (this.#workers && !(await settlesWithin(this.#workers, waitMs))) {
      this.#o.log(
        `stop: reconcile of ${this.#queue.inFlight.join(", ")} still running after ${waitMs / 1000} s: handing back the lease without it`,
      );
    }
    await this.#autoscaler?.stop();
    // A hung API server would hold the release too: the lease then expires on its own.
    if (this.#elector && !(await settlesWithin(this.#elector.release(), 5000)))
      this.#o.log("stop: the lease release got no answer in 5 s: it expires on its own");
    this.#metrics.isLeader.set(0);
    // The metrics server's connections are closed with it: a scraper's keep-alive one (5 s),
    // or one that never sent a byte (60 s and more), would otherwise hold the stop.
    await new Promise<void>((resolve) => {
      if (!this.#server) return resolve();
      this.#server.close(() => resolve());
      this.#server.closeAllConnections();
    });
  }
}
