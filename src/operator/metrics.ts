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

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: "expertmesh_operator_" });
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
