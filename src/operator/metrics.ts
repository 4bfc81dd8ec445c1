// The operator's Prometheus metrics and its /metrics, /healthz, /readyz endpoint.
import { createServer, type Server } from "node:http";
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";

export class OperatorMetrics {
  readonly registry = new Registry();
  readonly reconciles = new Counter({
    name: "expertmesh_operator_reconcile_total",
    help: "Reconciles by result (success, requeue, error).",
    labelNames: ["result"],
    registers: [this.registry],
  });
  readonly reconcileSeconds = new Histogram({
    name: "expertmesh_operator_reconcile_duration_seconds",
    help: "Time of one reconcile.",
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  });
  readonly isLeader = new Gauge({
    name: "expertmesh_operator_is_leader",
    help: "1 while this replica holds the leader lease.",
    registers: [this.registry],
  });
  readonly queueDepth = new Gauge({
    name: "expertmesh_operator_workqueue_depth",
    help: "Objects waiting to be reconciled.",
    registers: [this.registry],
  });
  readonly relists = new Counter({
    name: "expertmesh_operator_informer_lists_total",
    help: "Lists done by the informers (first list and relists after 410 Gone).",
    labelNames: ["informer"],
    registers: [this.registry],
  });

  /** The models' conditions, as status has them (for alerts: a model not Ready for 15 min). */
  readonly models = new ModelConditionMetrics(this.registry);

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: "expertmesh_operator_" });
  }
}

/**
 * `expertmesh_model_condition{namespace, model, condition, status, reason} 1`: one series per
 * condition of each model the operator reconciles, its status and reason those the model's
 * status has now (a change replaces the series; a deleted model's go). What
 * kube-state-metrics is for Deployments, for a DeepSeekModel: an alert on
 * `expertmesh_model_condition{condition="Ready", status="False"} == 1` needs no custom
 * resource state configuration.
 */
export class ModelConditionMetrics {
  readonly #gauge: Gauge<"namespace" | "model" | "condition" | "status" | "reason">;
  readonly #series = new Map<string, Record<string, string>[]>();

  constructor(registry: Registry) {
    this.#gauge = new Gauge({
      name: "expertmesh_model_condition",
      help: "1 for each condition of a DeepSeekModel, with its current status and reason.",
      labelNames: ["namespace", "model", "condition", "status", "reason"],
      registers: [registry],
    });
  }

  set(
    namespace: string,
    model: string,
    conditions: readonly { type: string; status: string; reason: string }[],
  ): void {
    this.forget(namespace, model);
    const series = conditions.map((c) => ({
      namespace,
      model,
      condition: c.type,
      status: c.status,
      reason: c.reason,
    }));
    for (const labels of series) this.#gauge.set(labels, 1);
    this.#series.set(`${namespace}/${model}`, series);
  }

  forget(namespace: string, model: string): void {
    const key = `${namespace}/${model}`;
    for (const labels of this.#series.get(key) ?? []) this.#gauge.remove(labels);
    this.#series.delete(key);
  }
}

/** Serves /metrics, /healthz (alive) and /readyz (`ready()`); resolves once listening. */
export async function serveMetrics(
  metrics: OperatorMetrics,
  port: number,
  ready: () => boolean,
  host = "0.0.0.0",
): Promise<Server> {
  const server = createServer(async (req, res) => {
    const url = (req.url ?? "/").split("?")[0];
    if (url === "/healthz") {
      res.writeHead(200, { "content-type": "text/plain" }).end("ok\n");
    } else if (url === "/readyz") {
      const ok = ready();
      res
        .writeHead(ok ? 200 : 503, { "content-type": "text/plain" })
        .end(ok ? "ok\n" : "not ready\n");
    } else if (url === "/metrics") {
      res
        .writeHead(200, { "content-type": metrics.registry.contentType })
        .end(await metrics.registry.metrics());
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  return server;
}
