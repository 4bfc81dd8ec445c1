// OpenTelemetry traces of the gateway's requests (ADR 0030), exported over OTLP (HTTP with
// protobuf, or gRPC) to a collector: one span per generation job, a child of the caller's span when
// the request carries W3C trace context (`traceparent`), named and described by OpenTelemetry's
// GenAI semantic conventions ("chat <model>", gen_ai.usage.*), with vLLM's latency
// attributes (gen_ai.latency.*). A prompt a prefill gateway computes (ADR 0029) carries the
// context in its job's NATS headers, and the prefill gateway's span joins the same trace.
//
// The API request being handled is found through an AsyncLocalStorage (requestTraces): the
// HTTP routes and gRPC handlers enter it, startJob (jobs.ts) makes the span from it, and the
// prefill client (prefill.ts), called synchronously from startJob through the engine, reads
// the span to name it as the job's parent.
import { AsyncLocalStorage } from "node:async_hooks";
import {
  type Attributes,
  type Context,
  defaultTextMapGetter,
  defaultTextMapSetter,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  TraceFlags,
  type Tracer,
  trace,
} from "@opentelemetry/api";
import { setGlobalErrorHandler, W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter as GrpcTraceExporter } from "@opentelemetry/exporter-trace-otlp-grpc";
import { OTLPTraceExporter as HttpTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { detectResources, envDetector, resourceFromAttributes } from "@opentelemetry/resources";
import {
  BatchSpanProcessor,
  ParentBasedSampler,
  TraceIdRatioBasedSampler,
  TracerProvider,
} from "@opentelemetry/sdk-trace";
import { ExpertMeshError } from "../util/errors.ts";

/** GenAI semantic conventions' operation names of the gateway's APIs. */
export type GenAiOperation = "chat" | "text_completion";

/** The operation of an HTTP route that runs generation jobs; null for the others. */
export function operationOfRoute(route: string): GenAiOperation | null {
  if (route === "/v1/chat/completions" || route === "/v1/messages" || route === "/v1/responses")
    return "chat";
  if (
    route === "/v1/completions" ||
    route === "/v2/models/:name/infer" ||
    route === "/v2/models/:name/versions/:version/infer" ||
    route === "/v2/models/:name/generate" ||
    route === "/v2/models/:name/generate_stream"
  )
    return "text_completion";
  return null;
}

/**
 * The operation of the jobs a gRPC method runs (ModelStreamInfer: one per message of its
 * stream, each its own span); null for the methods that run none.
 */
export function operationOfMethod(path: string): GenAiOperation | null {
  if (path === "/expertmesh.v1.Generation/ChatStream") return "chat";
  if (
    path === "/inference.GRPCInferenceService/ModelInfer" ||
    path === "/inference.GRPCInferenceService/ModelStreamInfer" ||
    path === "/expertmesh.v1.Generation/GenerateStream"
  )
    return "text_completion";
  return null;
}

/** OTLP's transports the gateway exports over (OTEL_EXPORTER_OTLP_PROTOCOL's names). */
export type OtlpProtocol = "http/protobuf" | "grpc";

/**
 * The transport: --otlp-traces-protocol's, else OTEL_EXPORTER_OTLP_TRACES_PROTOCOL's, else
 * OTEL_EXPORTER_OTLP_PROTOCOL's, else http/protobuf (the OpenTelemetry SDKs' default; vLLM's
 * is grpc). http/json is not offered. Throws EM_CLI_USAGE naming where a bad value came from.
 */
export function otlpProtocol(
  flag: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): OtlpProtocol {
  const [value, from] =
    flag !== undefined
      ? [flag, "--otlp-traces-protocol"]
      : env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
        ? [env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"], "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
        : env["OTEL_EXPORTER_OTLP_PROTOCOL"]
          ? [env["OTEL_EXPORTER_OTLP_PROTOCOL"], "OTEL_EXPORTER_OTLP_PROTOCOL"]
          : ["http/protobuf", ""];
  if (value === "http/protobuf" || value === "grpc") return value;
  throw new ExpertMeshError(
    "EM_CLI_USAGE",
    `${from} must be grpc or http/protobuf, got '${value}'${value === "http/json" ? " (OTLP's JSON encoding is not offered)" : ""}`,
  );
}

/**
 * The traces URL of --otlp-traces-endpoint. Over HTTP a collector's base URL gets OTLP's
 * path (/v1/traces), as OTEL_EXPORTER_OTLP_ENDPOINT does, and a URL with a path is taken as
 * is, as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is; over gRPC the URL is the server's (its
 * scheme says plain text or TLS) and has no path. Throws EM_CLI_USAGE for anything else.
 */
export function tracesUrl(endpoint: string, protocol: OtlpProtocol = "http/protobuf"): string {
  const example =
    protocol === "grpc"
      ? "an OTLP/gRPC collector, e.g. http://otel-collector:4317"
      : "an OTLP/HTTP collector, e.g. http://otel-collector:4318";
  let u: URL;
  try {
    u = new URL(endpoint);
  } catch {
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--otlp-traces-endpoint must be an http(s) URL (${example}), got '${endpoint}'`,
    );
  }
  if (u.protocol !== "http:" && u.protocol !== "https:")
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--otlp-traces-endpoint must be an http:// or https:// URL (${example}; with gRPC, https means TLS), got '${endpoint}'`,
    );
  if (protocol === "grpc") {
    if (u.pathname !== "/" && u.pathname !== "")
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--otlp-traces-endpoint over gRPC is a server's address without a path (${example}), got '${endpoint}'`,
      );
    return u.origin;
  }
  if (u.pathname === "/" || u.pathname === "") u.pathname = "/v1/traces";
  return u.toString();
}

export interface TracingOptions {
  /** The traces URL (tracesUrl's); undefined: the exporter's environment (OTEL_EXPORTER_OTLP_*). */
  readonly url?: string;
  /** OTLP's transport (default http/protobuf). */
  readonly protocol?: OtlpProtocol;
  /** Of the traces that start here (no sampled parent), the share recorded (default 1). */
  readonly sampleRatio?: number;
  /** service.name unless OTEL_SERVICE_NAME says otherwise. */
  readonly serviceName: string;
  /** More resource attributes (service.instance.id, the model, the role). */
  readonly resource?: Attributes;
  /** How long spans wait to be sent in a batch (ms, default 1000). */
  readonly exportDelayMs?: number;
  /** Where failed exports are told (the first, then at most once a minute). */
  readonly log?: (message: string) => void;
}

/** Failed exports are logged at most this often (a collector down fails every batch). */
const EXPORT_ERROR_LOG_MS = 60_000;

/** Whether the environment asks for traces without a flag (OpenTelemetry's variables). */
export function tracingFromEnv(env: NodeJS.ProcessEnv = process.env): boolean {
  if (env["OTEL_SDK_DISABLED"] === "true" || env["OTEL_TRACES_EXPORTER"] === "none") return false;
  return Boolean(env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] || env["OTEL_EXPORTER_OTLP_ENDPOINT"]);
}

const propagator = new W3CTraceContextPropagator();

/** A gateway's tracer and its export pipeline. */
export class Tracing {
  readonly tracer: Tracer;
  readonly url: string | undefined;
  readonly #provider: TracerProvider;

  constructor(o: TracingOptions) {
    const ratio = o.sampleRatio ?? 1;
    if (!(ratio >= 0 && ratio <= 1))
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--otlp-traces-sample-ratio must be between 0 and 1, got ${ratio}`,
      );
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over ours, as in any OpenTelemetry SDK.
    const resource = resourceFromAttributes({
      "service.name": o.serviceName,
      ...o.resource,
    }).merge(detectResources({ detectors: [envDetector] }));
    this.url = o.url;
    this.#provider = new TracerProvider({
      resource,
      sampler: new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(ratio) }),
      spanProcessors: [
        new BatchSpanProcessor({
          exporter:
            o.protocol === "grpc"
              ? new GrpcTraceExporter(o.url === undefined ? {} : { url: o.url })
              : new HttpTraceExporter(o.url === undefined ? {} : { url: o.url }),
          scheduledDelayMillis: o.exportDelayMs ?? 1000,
        }),
      ],
    });
    this.tracer = this.#provider.getTracer("expertmesh");
    // The SDK reports failed exports to its process-wide handler (silent by default).
    const log = o.log;
    if (log) {
      let lastAt = Number.NEGATIVE_INFINITY;
      let failed = 0;
      setGlobalErrorHandler((e) => {
        failed++;
        const now = performance.now();
        if (now - lastAt < EXPORT_ERROR_LOG_MS) return;
        lastAt = now;
        const message = e instanceof Error ? e.message : String(e);
        log(
          `traces not sent to ${o.url ?? "the OTEL_EXPORTER_OTLP_* endpoint"} (${failed} failure${failed === 1 ? "" : "s"} since the last line): ${message}; requests are served regardless`,
        );
        failed = 0;
      });
    }
  }

  /** The caller's context named by W3C trace context in `carrier` (HTTP headers, NATS headers). */
  extract(carrier: Record<string, string | string[] | undefined>): Context {
    return propagator.extract(ROOT_CONTEXT, carrier, defaultTextMapGetter);
  }

  /**
   * Sends the spans still waiting (at a stop), for at most `timeoutMs`: a collector that is
   * down must not hold a pod's stop. Never throws.
   */
  async shutdown(timeoutMs = 5000): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.#provider.shutdown().catch(() => {}),
      new Promise<void>((r) => {
        timer = setTimeout(r, timeoutMs);
      }),
    ]);
    clearTimeout(timer);
  }

  /** Sends the spans waiting now (tests, before reading the collector). */
  async flush(): Promise<void> {
    await this.#provider.forceFlush();
  }
}

/** W3C trace context naming `span` as the parent (traceparent, tracestate), for a carrier. */
export function traceHeaders(span: Span): Record<string, string> {
  const carrier: Record<string, string> = {};
  propagator.inject(trace.setSpan(ROOT_CONTEXT, span), carrier, defaultTextMapSetter);
  return carrier;
}

/** The API request being handled: what startJob needs to make its span. */
export interface RequestTrace {
  readonly tracing: Tracing;
  /** The caller's context (ROOT_CONTEXT without one). */
  readonly parent: Context;
  readonly operation: GenAiOperation;
  /** When the request arrived (epoch ms): the span starts then, before the prompt's encoding. */
  readonly startTime: number;
  /** x-request-id of the exchange. */
  readonly requestId?: string;
  /** Attributes of the transport (http.route, rpc.method). */
  readonly attributes?: Attributes;
  /** The span of the job running now (set by startJob; the prefill client names it). */
  span: Span | null;
  /** Told each job's span as it is made (the transport answers its traceresponse). */
  readonly onSpan?: (span: Span) => void;
}

/** The request each route and gRPC call handles (see the top of this file). */
export const requestTraces = new AsyncLocalStorage<RequestTrace>();

/**
 * Starts a job's span for the request being handled (startJob); null without tracing.
 * `attributes` is called only then: untraced requests pay nothing for them.
 */
export function startJobSpan(model: string, attributes: () => Attributes): Span | null {
  const request = requestTraces.getStore();
  if (!request) return null;
  const span = request.tracing.tracer.startSpan(
    `${request.operation} ${model}`,
    {
      kind: SpanKind.SERVER,
      startTime: request.startTime,
      attributes: {
        "gen_ai.operation.name": request.operation,
        "gen_ai.request.model": model,
        ...request.attributes,
        ...(request.requestId ? { "gen_ai.request.id": request.requestId } : {}),
        ...attributes(),
      },
    },
    request.parent,
  );
  request.span = span;
  request.onSpan?.(span);
  return span;
}

/**
 * The span of a generation request refused before a job ran (a body that is no request, a
 * model not served, a missing key, a body too large): it starts when the request came and
 * ends now, a child of the caller's span, named as startJob would name it (the operation
 * alone when the model is not known), with `error.type` the error's code and status ERROR.
 * Without it a trace shows nothing of a request its caller saw fail. Already ended.
 */
export function refusalSpan(
  tracing: Tracing,
  o: {
    operation: GenAiOperation;
    model?: string | undefined;
    parent: Context;
    startTime: number;
    requestId?: string | undefined;
    attributes: Attributes;
    code: string;
    message: string;
  },
): Span {
  const span = tracing.tracer.startSpan(
    o.model ? `${o.operation} ${o.model}` : o.operation,
    {
      kind: SpanKind.SERVER,
      startTime: o.startTime,
      attributes: {
        "gen_ai.operation.name": o.operation,
        ...(o.model ? { "gen_ai.request.model": o.model } : {}),
        ...o.attributes,
        ...(o.requestId ? { "gen_ai.request.id": o.requestId } : {}),
        "error.type": o.code,
      },
    },
    o.parent,
  );
  span.setStatus({ code: SpanStatusCode.ERROR, message: o.message });
  span.end();
  return span;
}

/**
 * W3C Trace Context's `traceresponse` (Level 2) for a span that is recorded (sampled):
 * `00-<trace id>-<span id>-01`, which the gateway answers in a header (HTTP) or metadata
 * (gRPC), so a client learns the trace of its request even when it sent none. Null for a
 * span that is not sampled (its trace is nowhere to be found).
 */
export function traceResponse(span: Span): string | null {
  const traceId = sampledTraceId(span);
  return traceId ? `00-${traceId}-${span.spanContext().spanId}-01` : null;
}

/**
 * The span's trace id when it is sampled (exported: a collector has it), for log lines,
 * exemplars and traceresponse; undefined without a span or for one not sampled.
 */
export function sampledTraceId(span: Span | null | undefined): string | undefined {
  const c = span?.spanContext();
  return c && (c.traceFlags & TraceFlags.SAMPLED) !== 0 ? c.traceId : undefined;
}
