// A real OpenTelemetry Collector (built by test/env/provision.sh) for the tracing tests: the
// gateways export to its OTLP/HTTP receiver, and it forwards what it accepted, as OTLP JSON,
// to an HTTP endpoint of the test, which keeps the spans for the test to read. The collector
// decodes and re-encodes every span: what arrives is what a tracing backend would see.
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { otelcolConfig } from "../env/otelcol-config.ts";
import { freePort, ManagedProcess } from "../env/process.ts";
import { testEnv, waitFor } from "./env.ts";

/** An attribute value as OTLP JSON carries it. */
type AnyValue =
  | { stringValue: string }
  | { intValue: string | number }
  | { doubleValue: number }
  | { boolValue: boolean }
  | { arrayValue: { values?: AnyValue[] } };

interface KeyValue {
  key: string;
  value: AnyValue;
}

/** A span as the collector forwarded it, its attributes (and its resource's) made plain. */
export interface ReceivedSpan {
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  /** OTLP's SpanKind: 2 is SERVER. */
  kind: number;
  startNs: bigint;
  endNs: bigint;
  attributes: Record<string, unknown>;
  resource: Record<string, unknown>;
  events: { name: string; attributes: Record<string, unknown> }[];
  /** OTLP's status code: 0 unset, 1 ok, 2 error. */
  status: { code: number; message?: string };
}

function plain(v: AnyValue): unknown {
  if ("stringValue" in v) return v.stringValue;
  if ("intValue" in v) return Number(v.intValue);
  if ("doubleValue" in v) return v.doubleValue;
  if ("boolValue" in v) return v.boolValue;
  return (v.arrayValue.values ?? []).map(plain);
}

function attrs(list: KeyValue[] | undefined): Record<string, unknown> {
  return Object.fromEntries((list ?? []).map((kv) => [kv.key, plain(kv.value)]));
}

export interface Collector {
  /** Its OTLP/HTTP receiver, for --otlp-traces-endpoint. */
  readonly endpoint: string;
  /** Its OTLP/gRPC receiver, for --otlp-traces-endpoint with --otlp-traces-protocol grpc. */
  readonly grpcEndpoint: string;
  /** Every span forwarded so far. */
  readonly spans: ReceivedSpan[];
  /** Waits for the spans `pick` accepts (it returns them, or undefined to wait on). */
  waitFor<T>(what: string, pick: (spans: ReceivedSpan[]) => T | undefined): Promise<T>;
  close(): Promise<void>;
}

export async function startCollector(name: string): Promise<Collector> {
  const spans: ReceivedSpan[] = [];
  const sink = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = JSON.parse(Buffer.concat(chunks).toString()) as {
        resourceSpans?: {
          resource?: { attributes?: KeyValue[] };
          scopeSpans?: {
            spans?: {
              traceId: string;
              spanId: string;
              parentSpanId?: string;
              name: string;
              kind: number;
              startTimeUnixNano: string;
              endTimeUnixNano: string;
              attributes?: KeyValue[];
              events?: { name: string; attributes?: KeyValue[] }[];
              status?: { code?: number; message?: string };
            }[];
          }[];
        }[];
      };
      for (const rs of body.resourceSpans ?? []) {
        const resource = attrs(rs.resource?.attributes);
        for (const ss of rs.scopeSpans ?? [])
          for (const s of ss.spans ?? [])
            spans.push({
              traceId: s.traceId,
              spanId: s.spanId,
              parentSpanId: s.parentSpanId ?? "",
              name: s.name,
              kind: s.kind,
              startNs: BigInt(s.startTimeUnixNano),
              endNs: BigInt(s.endTimeUnixNano),
              attributes: attrs(s.attributes),
              resource,
              events: (s.events ?? []).map((e) => ({
                name: e.name,
                attributes: attrs(e.attributes),
              })),
              status: {
                code: s.status?.code ?? 0,
                ...(s.status?.message ? { message: s.status.message } : {}),
              },
            });
      }
      res.writeHead(200, { "content-type": "application/json" }).end("{}");
    });
  });
  await new Promise<void>((r) => sink.listen(0, "127.0.0.1", r));
  const sinkPort = (sink.address() as AddressInfo).port;
  const port = await freePort();
  const grpcPort = await freePort();
  const dir = mkdtempSync(join(testEnv().runDir, `${name}-`));
  const config = join(dir, "otelcol.yaml");
  writeFileSync(
    config,
    otelcolConfig(
      port,
      {
        name: "otlphttp",
        settings: `endpoint: http://127.0.0.1:${sinkPort}
encoding: json
compression: none
retry_on_failure:
  enabled: false`,
      },
      grpcPort,
    ),
  );
  const proc = new ManagedProcess(
    name,
    testEnv().binaries.otelcol,
    ["--config", `file:${config}`],
    join(testEnv().runDir, "logs"),
  );
  // The receiver answers a POST without a body with 400: it is listening.
  await proc.waitUntil("receiving OTLP", async () => {
    const r = await fetch(`http://127.0.0.1:${port}/v1/traces`, { method: "POST" });
    return r.status < 500;
  });
  return {
    endpoint: `http://127.0.0.1:${port}`,
    grpcEndpoint: `http://127.0.0.1:${grpcPort}`,
    spans,
    waitFor: (what, pick) => waitFor(what, async () => pick(spans), 30_000),
    close: async () => {
      await proc.stop();
      await new Promise<void>((r) => sink.close(() => r()));
    },
  };
}
