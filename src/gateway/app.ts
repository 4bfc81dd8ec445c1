// The gateway's HTTP server (fastify): the OpenAI routes and KServe's v2 REST routes
// (kserve-rest.ts: their own error format) behind optional bearer API keys, /health (the
// process is up), /ready (every expert shard answers), /metrics, and one error format for
// everything else, OpenAI's {error: {message, type, param, code}}.
import { randomBytes, randomUUID, timingSafeEqual } from "node:crypto";
import { type RequestListener, type Server, STATUS_CODES } from "node:http";
import type { Socket } from "node:net";
import { join } from "node:path";
import type { Span } from "@opentelemetry/api";
import Fastify, {
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
  type FastifyServerFactory,
} from "fastify";
import type { LogFields } from "../util/log.ts";
import { ApiKeys } from "./api-keys.ts";
import { BATCH_PRIORITY, Batches, batchesRoutes, type RunLine } from "./batches.ts";
import { Conversations, conversationsRoutes, FolderLogs, MemoryLogs } from "./conversations.ts";
import { ApiError, errorBody, errorBodyFor, refusalHeaders, toApiError } from "./errors.ts";
import { FileStore, FolderQuota, filesRoutes, ownerOf } from "./files.ts";
import { logServerError, REQUEST_ID, type ServeContext } from "./jobs.ts";
import { KSERVE_OPEN_ROUTES, kserveRestRoutes } from "./kserve-rest.ts";
import { messageBatchesRoutes } from "./message-batches.ts";
import { messagesRoutes } from "./messages.ts";
import { exposition } from "./metrics.ts";
import { jobOf, openaiRoutes } from "./openai.ts";
import { ResponseFiles } from "./response-files.ts";
import { ResponseStore, responsesRoutes } from "./responses.ts";
import { socketClientIdentity } from "./serving-tls.ts";
import {
  FolderCompletions,
  MemoryCompletions,
  storedCompletionsRoutes,
} from "./stored-completions.ts";
import {
  operationOfRoute,
  type RequestTrace,
  refusalSpan,
  requestTraces,
  sampledTraceId,
  type Tracing,
  traceResponse,
} from "./tracing.ts";
import { Uploads, uploadsRoutes } from "./uploads.ts";

export interface GatewayAppOptions {
  readonly ctx: ServeContext;
  /** Bearer keys accepted on every route but /health, /ready and /metrics; empty: none. */
  readonly apiKeys?: readonly string[] | ApiKeys;
  /** Largest request body (bytes). */
  readonly maxRequestBytes?: number;
  /** Whether the model can serve now (every shard answers); local mode: always. */
  readonly ready?: () => Promise<boolean>;
  /** Whether the gateway is shutting down (/ready then says "draining"). */
  readonly draining?: () => boolean;
  /** Why the last `ready()` was false, for /ready's body (the shards that did not answer). */
  readonly notReadyDetail?: () => Record<string, unknown> | undefined;
  readonly logger?: boolean;
  /** Responses kept for previous_response_id and GET /v1/responses/{id} (default 1000; 0: none). */
  readonly responsesStore?: number;
  /**
   * A server already listening (the gateway's port opens before its weights load): the app
   * takes requests from it once ready (fastify's serverFactory). Without it, app.listen.
   */
  readonly server?: Server;
  /** With `server`: receives the app's request handler, to install when the app is ready. */
  readonly onHandler?: (handler: RequestListener) => void;
  /** Where a line per finished request goes (--log-requests); default: none. */
  readonly logRequest?: (line: string, fields?: LogFields) => void;
  /**
   * The Files and Batch APIs (files.ts, batches.ts; ADR 0049): the folder they keep their
   * files and batches in (--files-dir), the largest upload, how much the folder may hold
   * (0: no bound), and the batches' lines in flight at once. Without it those routes refuse
   * (EM_GATEWAY_FILES_OFF).
   */
  readonly files?: {
    dir: string;
    maxBytes: number;
    maxTotalBytes?: number;
    batchConcurrency: number;
  };
}

/** The header of a batch's line run through the routes (app.inject), with this app's token. */
const BATCH_HEADER = "x-expertmesh-batch-line";
/** With BATCH_HEADER: whose batch the line is of (ownerOf), trusted only with the token. */
const BATCH_OWNER_HEADER = "x-expertmesh-batch-owner";

/** Builds the fastify app (not listening yet). */
export function buildGatewayApp(o: GatewayAppOptions): FastifyInstance {
  const bodyLimit = o.maxRequestBytes ?? 1 << 20;
  const app = Fastify({
    logger: o.logger ?? false,
    ...(o.server ? { serverFactory: adoptServer(o.server, o.onHandler) } : {}),
    bodyLimit,
    // Validate bodies as they are: no coercion ("1" is not a number), unknown fields kept.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: false } },
    // Errors before routing (a bad percent-escape in the path) in our format too.
    frameworkErrors: (err, req, reply) => {
      const e = new ApiError("EM_GATEWAY_BAD_REQUEST", err.message);
      (reply as FastifyReply).status(e.status).send(errorBodyFor(req.headers, e));
    },
    // Requests Node cannot parse (an unknown method, a bad Content-Length, headers too
    // large): there is no request to reply to, so the answer goes to the socket.
    clientErrorHandler: (err: NodeJS.ErrnoException, socket) => {
      if (err.code === "ECONNRESET" || socket.destroyed) return;
      const [status, message] =
        err.code === "HPE_HEADER_OVERFLOW"
          ? [431, "the request headers are too large"]
          : err.code === "ERR_HTTP_REQUEST_TIMEOUT"
            ? [408, "the request did not arrive in time"]
            : [400, `the request is not valid HTTP (${err.code ?? err.message})`];
      const body = JSON.stringify(
        errorBody(new ApiError("EM_GATEWAY_BAD_REQUEST", message, { status })),
      );
      if (socket.writable)
        socket.write(
          `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
            `Content-Type: application/json\r\nConnection: close\r\n\r\n${body}`,
        );
      socket.destroy(err);
    },
  });
  const keys = ApiKeys.from(o.apiKeys);
  // A batch's lines run through the routes with a token only this process knows, in place
  // of the key (which may have been rotated out since the batch was made).
  const lineToken = Buffer.from(randomBytes(32).toString("hex"));
  const isBatchLine = (req: FastifyRequest) => {
    const given = req.headers[BATCH_HEADER];
    return (
      typeof given === "string" &&
      given.length === lineToken.length &&
      timingSafeEqual(Buffer.from(given), lineToken)
    );
  };

  // Closing waits for the requests in flight; the keep-alive connections they leave idle
  // (72 s keepAliveTimeout) would hold the close, and a pod's stop, until SIGKILL. So from
  // close on, answers end their connection, and idle connections are closed as they occur.
  // So are connections that never sent a byte (a client's preconnect, or one it opened for
  // a request it then gave up): Node counts them neither idle nor active, and the close
  // waited for its headers timeout, 60 s and more (found by test/gateway/fuzz.test.ts).
  const sockets = new Set<Socket>();
  app.server.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  });
  const closeIdle = (server: typeof app.server) => {
    server.closeIdleConnections();
    for (const socket of sockets)
      if (socket.bytesRead === 0 && !(socket as { _httpMessage?: unknown })._httpMessage)
        socket.destroy();
  };
  let closing = false;
  let idleTimer: NodeJS.Timeout | undefined;
  app.addHook("preClose", async () => {
    closing = true;
    const server = app.server;
    closeIdle(server);
    idleTimer = setInterval(() => closeIdle(server), 100);
    idleTimer.unref();
    server.once("close", () => clearInterval(idleTimer));
  });
  app.addHook("onClose", async () => clearInterval(idleTimer));
  // While draining (SIGTERM's --shutdown-delay) too: a keep-alive client takes its next
  // request elsewhere (a connection through the Service, or up's front, goes to another
  // gateway) rather than sending it on a connection that the stop closes under it.
  app.addHook("onSend", async (_req, reply) => {
    if ((closing || o.draining?.()) && !reply.raw.headersSent) reply.header("connection", "close");
  });

  /** Each exchange's trace (with tracing on), for its log line's trace id. */
  const traces = new WeakMap<object, RequestTrace>();
  /** The spans of requests refused before a job (traceRefusal). */
  const refusals = new WeakMap<object, Span>();
  const traceOf = (raw: object) => sampledTraceId(traces.get(raw)?.span ?? refusals.get(raw));

  // Every answer carries an x-request-id: the client's (vLLM's and most proxies' header),
  // or a new one. With logRequest, a line when the exchange ends (streams included).
  app.addHook("onRequest", async (req, reply) => {
    const given = req.headers["x-request-id"];
    const id = typeof given === "string" && REQUEST_ID.test(given) ? given : randomUUID();
    reply.header("x-request-id", id);
    if (!o.logRequest) return;
    const t0 = performance.now();
    const log = o.logRequest;
    reply.raw.once("close", () => {
      const job = jobOf(reply.raw);
      const ms = Math.round(performance.now() - t0);
      const finished = job?.choices.map((c) => c.finishReason ?? "abort");
      const path = req.url.split("?")[0];
      const gone = !reply.raw.writableFinished;
      const traceId = traceOf(reply.raw);
      const client = socketClientIdentity(req.raw.socket);
      log(
        `request ${id} ${req.method} ${path} ${reply.raw.statusCode}` +
          `${gone ? " (client gone)" : ""} in ${ms} ms` +
          (job
            ? ` prompt=${job.promptTokens} cached=${job.cachedTokens} completion=${job.completionTokens} finish=${finished!.join(",")}`
            : "") +
          (traceId ? ` trace=${traceId}` : "") +
          (client ? ` client=${JSON.stringify(client)}` : ""),
        {
          request_id: id,
          method: req.method,
          path,
          status: reply.raw.statusCode,
          duration_ms: ms,
          ...(gone ? { client_gone: true } : {}),
          ...(job
            ? {
                prompt_tokens: job.promptTokens,
                cached_tokens: job.cachedTokens,
                completion_tokens: job.completionTokens,
                finish_reasons: finished,
              }
            : {}),
          ...(traceId ? { trace_id: traceId } : {}),
          ...(client ? { client_cert: client } : {}),
        },
      );
    });
  });

  // Tracing (tracing.ts): the routes that run generation jobs handle their request inside
  // its trace, from which startJob makes the span. Entered before the handler (after the body
  // is read: the body's stream events would run outside it).
  const tracing = o.ctx.tracing;
  /**
   * A generation request's part of its span (its route's operation, the caller's context,
   * when it came, its id); null for routes that run no generation.
   */
  const generationOf = (tracing: Tracing, req: FastifyRequest, reply: FastifyReply) => {
    const route = req.routeOptions.url ?? "";
    // (GET /v1/chat/completions lists stored completions: no generation)
    const operation = req.method === "POST" ? operationOfRoute(route) : null;
    if (!operation) return null;
    const id = reply.getHeader("x-request-id");
    return {
      operation,
      parent: tracing.extract(req.headers),
      startTime: Date.now() - reply.elapsedTime,
      ...(typeof id === "string" ? { requestId: id } : {}),
      attributes: { "http.route": route, "http.request.method": req.method },
    };
  };
  if (tracing)
    app.addHook("preHandler", (req, reply, done) => {
      const generation = generationOf(tracing, req, reply);
      if (!generation) return done();
      const trace: RequestTrace = {
        tracing,
        ...generation,
        span: null,
        // Before the answer's headers go (a stream sends them after startJob, from these).
        onSpan: (span) => {
          const value = traceResponse(span);
          if (value && !reply.raw.headersSent) reply.header("traceresponse", value);
        },
      };
      traces.set(reply.raw, trace);
      requestTraces.run(trace, done);
    });

  app.setErrorHandler((err, req, reply) => {
    const e = toApiError(err);
    logServerError(o.ctx, `${req.method} ${req.url}`, err);
    reply.headers(refusalHeaders(e));
    if (tracing) traceRefusal(tracing, req, reply, e);
    reply.status(e.status).send(errorBodyFor(req.headers, e));
  });

  /**
   * A generation request that failed before its job's span was made (its body, its model, its
   * key, its size) gets a span of its own (refusalSpan), and its answer the traceresponse.
   */
  const traceRefusal = (
    tracing: Tracing,
    req: FastifyRequest,
    reply: FastifyReply,
    e: ApiError,
  ): void => {
    const generation = generationOf(tracing, req, reply);
    if (!generation || traces.get(reply.raw)?.span) return;
    const body = req.body as { model?: unknown } | undefined;
    const params = req.params as { name?: unknown } | undefined;
    const model = typeof body?.model === "string" ? body.model : params?.name;
    const span = refusalSpan(tracing, {
      ...generation,
      model: typeof model === "string" && model.length <= 256 ? model : undefined,
      attributes: { ...generation.attributes, "http.response.status_code": e.status },
      code: e.code,
      message: e.message,
    });
    refusals.set(reply.raw, span);
    const value = traceResponse(span);
    if (value) reply.header("traceresponse", value);
  };
  app.setNotFoundHandler((req, reply) => {
    const e = new ApiError("EM_GATEWAY_NOT_FOUND", `no route ${req.method} ${req.url}`);
    reply.status(e.status).send(errorBodyFor(req.headers, e));
  });

  // Every route needs a key except the probes and metrics. Decided by the route fastify
  // matched, never by the raw URL: '/%76%31/models' is routed as '/v1/models'.
  const open = new Set(["/health", "/ready", "/metrics", ...KSERVE_OPEN_ROUTES]);
  const keyOf = (req: FastifyRequest) => {
    const m = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? "");
    // Anthropic's clients send x-api-key instead.
    const xKey = req.headers["x-api-key"];
    return m?.[1]?.trim() ?? (typeof xKey === "string" ? xKey.trim() : "");
  };
  app.addHook("onRequest", async (req) => {
    if (!keys.required || open.has(req.routeOptions.url ?? "") || isBatchLine(req)) return;
    // Node gives header bytes as latin1 characters; the keys are compared as UTF-8 bytes.
    const given = Buffer.from(keyOf(req), "latin1");
    if (!keys.accepts(given))
      throw new ApiError(
        "EM_GATEWAY_UNAUTHORIZED",
        "missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
      );
  });

  app.get("/health", async () => ({ status: "ok" }));
  app.get("/ready", async (_req, reply) => {
    const ok = o.ready ? await o.ready() : true;
    reply.status(ok ? 200 : 503);
    if (ok) return { status: "ready" };
    if (o.draining?.()) return { status: "draining" };
    return { status: "not ready", ...o.notReadyDetail?.() };
  });
  app.get("/metrics", async (req, reply) => {
    const { contentType, body } = await exposition(o.ctx.metrics.registry, req.headers.accept);
    reply.header("content-type", contentType);
    return body;
  });
  app.register(kserveRestRoutes({ ctx: o.ctx, bodyLimit, ...(o.ready ? { ready: o.ready } : {}) }));

  // Files, batches and responses: each key sees its own (a hash of it), everyone the same
  // without keys. A batch's line is its batch owner's.
  const owner = (req: FastifyRequest) => {
    if (isBatchLine(req)) return String(req.headers[BATCH_OWNER_HEADER] ?? "");
    return keys.required ? ownerOf(keyOf(req)) : "";
  };
  const fileStore = o.files
    ? new FileStore(
        join(o.files.dir, "files"),
        o.files.maxBytes,
        o.files.maxTotalBytes ? new FolderQuota(o.files.dir, o.files.maxTotalBytes) : null,
      )
    : null;
  const quota = fileStore?.quota;
  if (quota) app.addHook("onReady", () => quota.ready); // (no upload before the folder is counted)
  // Responses: in the files folder when there is one (every gateway on it answers for every
  // response, and they outlive a restart), else in this gateway's memory.
  const responses =
    o.files && o.responsesStore !== 0
      ? new ResponseFiles(o.files.dir, quota ?? null)
      : new ResponseStore(o.responsesStore ?? 1000);
  if (responses instanceof ResponseFiles) app.addHook("onClose", async () => responses.close());
  // Conversations where the responses are: the shared folder, or memory (as many).
  const conversations = new Conversations(
    responses instanceof ResponseFiles
      ? new FolderLogs(o.files!.dir, quota ?? null)
      : new MemoryLogs(o.responsesStore ?? 1000),
  );
  app.register(responsesRoutes(o.ctx, responses, owner, conversations, fileStore));
  // Chat completions made with store: true, where the responses are too.
  const completions =
    responses instanceof ResponseFiles
      ? new FolderCompletions(o.files!.dir, quota ?? null)
      : new MemoryCompletions(o.responsesStore ?? 1000);
  app.addHook("onClose", async () => completions.close());
  app.register(openaiRoutes(o.ctx, { store: completions, owner }));
  app.register(storedCompletionsRoutes(completions, owner));
  app.register(conversationsRoutes(conversations, owner, { ctx: o.ctx, store: fileStore }));
  const run: RunLine = async (url, body, lineOwner) => {
    // Behind the interactive requests on a gateway that schedules by priority.
    const payload =
      o.ctx.engine.schedulingPolicy === "priority" && body["priority"] === undefined
        ? { ...body, priority: BATCH_PRIORITY }
        : body;
    const r = await app.inject({
      method: "POST",
      url,
      payload,
      headers: { [BATCH_HEADER]: lineToken.toString(), [BATCH_OWNER_HEADER]: lineOwner },
    });
    let answer: unknown;
    try {
      answer = r.json();
    } catch {
      answer = r.body;
    }
    return {
      status: r.statusCode,
      requestId: String(r.headers["x-request-id"] ?? ""),
      body: answer,
    };
  };
  const batches =
    fileStore && o.files
      ? new Batches({
          dir: o.files.dir,
          files: fileStore,
          run,
          concurrency: o.files.batchConcurrency,
          ...(o.ctx.log ? { log: o.ctx.log } : {}),
        })
      : null;
  if (batches)
    o.ctx.metrics.addBatches(() => ({
      running: batches.inflight,
      parts: batches.parts,
      lines: batches.answered,
      folderBytes: fileStore?.quota?.used() ?? null,
      folderMaxBytes: fileStore?.quota?.maxBytes ?? null,
    }));
  // Files sent in parts (uploads.ts), in the files folder beside the files they become.
  const uploads =
    fileStore && o.files ? new Uploads(join(o.files.dir, "uploads"), fileStore) : null;
  app.addHook("preClose", async () => {
    batches?.close();
    fileStore?.close();
    uploads?.close();
  });
  app.register(filesRoutes(fileStore, owner));
  app.register(uploadsRoutes(uploads, owner));
  app.register(batchesRoutes(batches, owner));
  app.register(
    messagesRoutes(o.ctx, messageBatchesRoutes(batches, fileStore, owner), {
      store: fileStore,
      owner,
    }),
  );
  return app;
}

/**
 * fastify's serverFactory for a server that is already listening: fastify gets `server`
 * (with the timeouts it would give its own) and its handler goes to `onHandler`.
 */
function adoptServer(
  server: Server,
  onHandler: ((handler: RequestListener) => void) | undefined,
): FastifyServerFactory {
  return (handler, opts) => {
    const t = opts as {
      keepAliveTimeout?: number;
      requestTimeout?: number;
      connectionTimeout?: number;
    };
    server.keepAliveTimeout = t.keepAliveTimeout ?? 72_000;
    server.requestTimeout = t.requestTimeout ?? 0;
    server.setTimeout(t.connectionTimeout ?? 0);
    onHandler?.(handler as RequestListener);
    return server;
  };
}
