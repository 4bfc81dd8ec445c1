import { hostname } from "node:os";
import { parseArgs } from "node:util";
import { KubeConfig } from "@kubernetes/client-node";
import { Operator } from "../../operator/operator.ts";
import { type LogFields, logFormat, processLog } from "../../util/log.ts";
import { boolFlag as bool, intFlag as int, numberFlag } from "../options.ts";
import type { Command } from "../registry.ts";

const USAGE = `expertmesh operator [options]
  --kubeconfig PATH          kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster)
  --namespace NS             watch only NS (repeatable; default: all namespaces)
  --leader-elect=BOOL        compete for a Lease before reconciling (default true)
  --lease-namespace NS       namespace of the Lease (default: $POD_NAMESPACE or default)
  --lease-name NAME          Lease name (default expertmesh-operator)
  --lease-duration SECONDS   lease validity without renewal (default 15)
  --identity NAME            this replica's identity (default: $POD_NAME or hostname-pid)
  --metrics-port PORT        /metrics, /healthz, /readyz (default 8080; 0 picks a free port)
  --workers N                concurrent reconciles (default 2)
  --shutdown-timeout SECONDS at SIGTERM, wait this long for reconciles in flight, then hand
                             back the lease anyway and exit (default 15; the chart's grace
                             period is 30 s)
  --env-resync SECONDS       read again the Secrets and ConfigMaps a model's spec.env reads
                             this often, and roll its pods when a value changed (default 30)
  --log-format text|json     log lines as text (default) or one JSON object per line
                             ({time, level, component, instance, msg}); default
                             $EXPERTMESH_LOG_FORMAT, else text`;

export const operatorCommand: Command = {
  name: "operator",
  summary: "run the Kubernetes operator that reconciles DeepSeekModel objects",
  usage: USAGE,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        kubeconfig: { type: "string" },
        namespace: { type: "string", multiple: true },
        "leader-elect": { type: "string" },
        "lease-namespace": { type: "string" },
        "lease-name": { type: "string" },
        "lease-duration": { type: "string" },
        identity: { type: "string" },
        "metrics-port": { type: "string" },
        "metrics-host": { type: "string" },
        workers: { type: "string" },
        "shutdown-timeout": { type: "string" },
        "log-format": { type: "string" },
        "env-resync": { type: "string" },
      },
    });
    const kc = new KubeConfig();
    if (values.kubeconfig) kc.loadFromFile(values.kubeconfig);
    else kc.loadFromDefault();
    const level = process.env["EXPERTMESH_LOG_LEVEL"] ?? "info";
    const identity = values.identity ?? process.env["POD_NAME"] ?? `${hostname()}-${process.pid}`;
    const write = processLog({
      format: logFormat(values["log-format"]),
      component: "operator",
      instance: identity,
      who: "operator",
    });
    const log = (msg: string, fields?: LogFields) => {
      if (level !== "error") write(msg, fields);
    };
    const op = new Operator(kc, {
      namespaces: values.namespace ?? [],
      leaderElect: bool(values["leader-elect"], "--leader-elect", true),
      leaseNamespace: values["lease-namespace"] ?? process.env["POD_NAMESPACE"] ?? "default",
      leaseName: values["lease-name"] ?? "expertmesh-operator",
      leaseDurationSeconds: int(values["lease-duration"], "--lease-duration", 15, 1),
      identity,
      metricsPort: int(values["metrics-port"], "--metrics-port", 8080, 0),
      ...(values["metrics-host"] ? { metricsHost: values["metrics-host"] } : {}),
      workers: int(values.workers, "--workers", 2, 1),
      stopTimeoutMs: numberFlag(values["shutdown-timeout"], "--shutdown-timeout", 15) * 1000,
      envResyncMs: numberFlag(values["env-resync"], "--env-resync", 30, 1) * 1000,
      log,
    });
    let stopping = false;
    const stop = async (sig: string) => {
      if (stopping) return;
      stopping = true;
      log(`${sig}: shutting down`);
      await op.stop();
      log("stopped");
      process.exit(0);
    };
    process.on("SIGTERM", () => void stop("SIGTERM"));
    process.on("SIGINT", () => void stop("SIGINT"));
    try {
      await op.start();
    } catch (err) {
      if (stopping) return 0;
      await op.stop().catch(() => {});
      throw err;
    }
    await new Promise(() => {}); // runs until a signal
    return 0;
  },
};
