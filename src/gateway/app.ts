// The gateway's HTTP server (fastify): the OpenAI routes behind optional bearer API keys,
// /health (the process is up), /ready (every expert shard answers), /metrics, and one
// error format for everything, OpenAI's {error: {message, type, param, code}}.
import { timingSafeEqual } from "node:crypto";
import Fastify, { type FastifyInstance } from "fastify";
import { ApiError, errorBody, toApiError } from "./errors.ts";
import type { ServeContext } from "./jobs.ts";
import { openaiRoutes } from "./openai.ts";

export interface GatewayAppOptions {
  readonly ctx: ServeContext;
  /** Bearer keys accepted on /v1/*; empty: no authentication. */
  readonly apiKeys?: readonly string[];
  /** Largest request body (bytes). */
  readonly maxRequestBytes?: number;
  /** Whether the model can serve now (every shard answers); local mode: always. */
  readonly ready?: () => Promise<boolean>;
  readonly logger?: boolean;
}

/** Builds the fastify app (not listening yet). */
export function buildGatewayApp(o: GatewayAppOptions): FastifyInstance {
  const app = Fastify({
    logger: o.logger ?? false,
    bodyLimit: o.maxRequestBytes ?? 1 << 20,
    // Validate bodies as they are: no coercion ("1" is not a number), unknown fields kept.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: false } },
  });
  const keys = (o.apiKeys ?? []).map((k) => Buffer.from(k));

  app.setErrorHandler((err, _req, reply) => {
    const e = toApiError(err);
    if (e.retryAfter !== undefined) reply.header("retry-after", String(e.retryAfter));
    reply.status(e.status).send(errorBody(e));
  });
  app.setNotFoundHandler((req, reply) => {
    const e = new ApiError("EM_GATEWAY_NOT_FOUND", `no route ${req.method} ${req.url}`);
    reply.status(e.status).send(errorBody(e));
  });

  app.addHook("onRequest", async (req) => {
    if (keys.length === 0 || !req.url.startsWith("/v1/")) return;
    const m = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? "");
    const given = Buffer.from(m?.[1]?.trim() ?? "");
    if (!keys.some((k) => k.length === given.length && timingSafeEqual(k, given)))
      throw new ApiError(
        "EM_GATEWAY_UNAUTHORIZED",
        "missing or invalid API key: send 'Authorization: Bearer <key>'",
      );
  });

  app.get("/health", async () => ({ status: "ok" }));
  app.get("/ready", async (_req, reply) => {
    const ok = o.ready ? await o.ready() : true;
    reply.status(ok ? 200 : 503);
    return { status: ok ? "ready" : "not ready" };
  });
  app.get("/metrics", async (_req, reply) => {
    const r = o.ctx.metrics.registry;
    reply.header("content-type", r.contentType);
    return r.metrics();
  });
  app.register(openaiRoutes(o.ctx));
  return app;
}
