// Parts of `expertmesh gateway` (gateway.ts) with narrow inputs: its tracing from the flags,
// its HTTP(S) server, the queue statistics it publishes for the autoscaler, and the order in
// which it stops.
import { createServer, type Server as HttpServer, type RequestListener } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { NatsConnection } from "@nats-io/transport-node";
import type { ServingEngine } from "../../gateway/engine.ts";
import type { ServingTls } from "../../gateway/serving-tls.ts";
import { otlpProtocol, Tracing, tracesUrl, tracingFromEnv } from "../../gateway/tracing.ts";
import { subjects } from "../../moe/subjects.ts";
import { ExpertMeshError, formatError } from "../../util/errors.ts";
import type { Log } from "../../util/log.ts";
import { packageVersion } from "../../util/version.ts";
import { numberFlag } from "../options.ts";

/** The model a gateway serves, as its subjects and traces name it. */
interface ModelRef {
  namespace: string;
  model: string;
}

/**
 * OpenTelemetry tracing from --otlp-traces-endpoint, -sample-ratio and -protocol (or the
 * OTEL_EXPORTER_OTLP_* variables); undefined when neither names an endpoint. A ratio or
 * protocol without an endpoint is a usage error.
 */
export function gatewayTracing(o: {
  endpoint: string | undefined;
  sampleRatio: string | undefined;
  protocol: string | undefined;
  id: string;
  ref: ModelRef;
  prefill: boolean;
  log: Log;
}): Tracing | undefined {
  const fromEnv = tracingFromEnv();
  const ratio = numberFlag(o.sampleRatio, "--otlp-traces-sample-ratio", 1);
  for (const [flag, v] of [
    ["--otlp-traces-sample-ratio", o.sampleRatio],
    ["--otlp-traces-protocol", o.protocol],
  ] as const)
    if (v !== undefined && !o.endpoint && !fromEnv)
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `${flag} needs --otlp-traces-endpoint URL (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)`,
      );
  const protocol = otlpProtocol(o.protocol);
  if (o.endpoint === undefined && !fromEnv) return undefined;
  const tracing = new Tracing({
    ...(o.endpoint !== undefined ? { url: tracesUrl(o.endpoint, protocol) } : {}),
    protocol,
    sampleRatio: ratio,
    serviceName: o.prefill ? "expertmesh-prefill" : "expertmesh-gateway",
    resource: {
      "service.version": packageVersion(),
      "service.instance.id": o.id,
      "expertmesh.model": `${o.ref.namespace}/${o.ref.model}`,
      "expertmesh.role": o.prefill ? "prefill" : "gateway",
    },
    log: o.log,
  });
  o.log(
    `OpenTelemetry traces to ${tracing.url ?? "the OTEL_EXPORTER_OTLP_* endpoint"} (OTLP/${protocol === "grpc" ? "gRPC" : "HTTP"})` +
      (ratio < 1 ? ` (${ratio} of the requests that start a trace)` : ""),
  );
  return tracing;
}

/**
 * The gateway's HTTP server, HTTPS with `tls`: with a client CA, a client without a
 * certificate it signed is refused at the handshake. Requests go to `handler()` as it is
 * when they come (the starting handler, then the app).
 */
export function gatewayServer(
  tls: ServingTls | undefined,
  handler: () => RequestListener,
): HttpServer {
  const listener: RequestListener = (req, res) => handler()(req, res);
  return tls
    ? (createHttpsServer(
        {
          cert: tls.cert,
          key: tls.key,
          ...(tls.clientCa
            ? { ca: tls.clientCa, requestCert: true, rejectUnauthorized: true }
            : {}),
        },
        listener,
      ) as unknown as HttpServer)
    : createServer(listener);
}

/**
 * Publishes the gateway's queue on NATS once a second, for the operator's autoscaler (a
 * prefill gateway's queue is its own role's: the autoscaler's gateway role is the gateways
 * that serve clients). Stop it with clearInterval.
 */
export function publishQueueStats(o: {
  nc: () => NatsConnection | null;
  ref: ModelRef;
  id: string;
  role: "gateway" | "prefill";
  engine: ServingEngine;
  /** Whether prompts go to prefill gateways (the stats then say how many wait for them). */
  offloadsPrefill: boolean;
  planVersion: () => number | undefined;
}): NodeJS.Timeout {
  const timer = setInterval(() => {
    const nc = o.nc();
    if (!nc || nc.isClosed()) return;
    const s = o.engine.stats;
    const planVersion = o.planVersion();
    nc.publish(
      subjects.stats(o.ref, o.role, o.id),
      JSON.stringify({
        role: o.role,
        id: o.id,
        waiting: s.numWaiting,
        ...(o.offloadsPrefill ? { prefilling: s.numPrefilling } : {}),
        running: s.numRunning,
        kvUsage: s.kvUsage,
        ...(planVersion !== undefined ? { planVersion } : {}),
        timestamp: Date.now(),
      }),
    );
  }, 1000);
  timer.unref();
  return timer;
}

/** What a gateway closes when it stops, in the order `stopGateway` closes them. */
export interface GatewayParts {
  log: Log;
  /** --shutdown-delay and --shutdown-timeout, in seconds. */
  delayS: number;
  timeoutS: number;
  /** Called at the start of the delay: /ready answers not ready from then on. */
  drain: () => void;
  server: HttpServer;
  /** Stop watching files and publishing (TLS, keys, stats). */
  stopWatching: () => void;
  /** The app, the gRPC server, prefill jobs taken: each finishes what it has. */
  closeServing: () => Promise<unknown>;
  /** After the requests: the prefill client, traces, tokenizer workers. */
  closeAfter: () => Promise<void>;
  /** The prefix cache's tiers (null: none), written for the next start. */
  prefixTiers: { name: string; persist: () => Promise<number>; close: () => Promise<void> } | null;
  metricsServer: HttpServer;
  nc: () => NatsConnection | null;
}

/**
 * The gateway's stop, for stopSignals' first signal (a second one during --shutdown-delay
 * ends the delay): with a delay, still serving but not ready for that long (Kubernetes
 * removes the pod from its Service's endpoints while it stops, not before); then no new
 * connections, requests in flight finished (cut after --shutdown-timeout, before the pod's
 * grace ends in SIGKILL, which would also skip the prefix cache's writes and the NATS
 * drain), the prefix cache written, NATS drained, and the process exits.
 */
export function stopGateway(p: GatewayParts): (sig: string) => Promise<void> {
  let stopping = false;
  let endDelay = () => {};
  return async (sig) => {
    if (stopping) {
      endDelay();
      return;
    }
    stopping = true;
    if (p.delayS > 0) {
      p.drain();
      p.log(`${sig}: not ready; still serving for ${p.delayS} s, then stopping`);
      await new Promise<void>((res) => {
        const t = setTimeout(res, p.delayS * 1000);
        endDelay = () => {
          clearTimeout(t);
          res();
        };
      });
    }
    p.log(`${sig}: stopping (finishing requests in flight)`);
    p.stopWatching();
    // (gRPC calls still running get a clean CANCELLED, HTTP connections are closed; the app
    // does not close a server it was given: closing it waits for open requests)
    const closed = new Promise<void>((res) => p.server.close(() => res()));
    p.server.closeIdleConnections();
    const cut = setTimeout(() => {
      p.log(`requests still running after ${p.timeoutS} s: cut`);
      p.server.closeAllConnections();
    }, p.timeoutS * 1000);
    await Promise.all([p.closeServing(), closed]);
    await p.closeAfter();
    clearTimeout(cut);
    if (p.prefixTiers) {
      try {
        const n = await p.prefixTiers.persist();
        p.log(`prefix cache: ${n} blocks written to ${p.prefixTiers.name} for the next start`);
      } catch (e) {
        // Not a reason to skip the rest of the stop.
        p.log(`prefix cache: not written (${formatError(e)})`);
      }
      await p.prefixTiers.close();
    }
    p.metricsServer.close();
    try {
      await p.nc()?.drain();
    } catch (e) {
      // NATS went away first (stopped with us): nothing is left to flush.
      p.log(`NATS connection lost while stopping (${formatError(e)})`);
    }
    p.log("stopped");
    process.exit(); // 0, or 1 after signals.fail
  };
}
