// The gateway's HTTP port while it starts (src/cli/startup.ts): the process listens
// before it loads its weights, so that a pod's liveness probe is answered. Until the
// fastify app takes over, /health says the process is up, /ready says which step
// startup is on (503), /metrics has the startup gauges, and every other request gets
// EM_GATEWAY_STARTING (503, Retry-After) in OpenAI's error format.
import type { IncomingMessage, RequestListener, ServerResponse } from "node:http";
import type { Registry } from "prom-client";
import type { Startup } from "../cli/startup.ts";
import { ApiError, errorBodyFor } from "./errors.ts";

/** Seconds a client is asked to wait before retrying a request sent while starting. */
export const STARTING_RETRY_AFTER = 5;

/** The handler of the HTTP port until the app is ready. */
export function startingHandler(startup: Startup, registry: Registry): RequestListener {
  const json = (res: ServerResponse, status: number, body: unknown, headers = {}) =>
    res
      .writeHead(status, { "content-type": "application/json; charset=utf-8", ...headers })
      .end(JSON.stringify(body));
  return async (req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? "").split("?")[0];
    if (req.method === "GET" && path === "/health")
      return json(res, 200, { status: "starting", phase: startup.phase });
    if (req.method === "GET" && path === "/ready")
      return json(res, 503, { status: "starting", phase: startup.phase });
    if (req.method === "GET" && path === "/metrics") {
      const text = await registry.metrics();
      return res.writeHead(200, { "content-type": registry.contentType }).end(text);
    }
    // The body is not read: close the connection after the answer instead.
    const e = new ApiError(
      "EM_GATEWAY_STARTING",
      `the gateway is starting (${startup.phase}); retry in a few seconds`,
      { retryAfter: STARTING_RETRY_AFTER },
    );
    json(res, e.status, errorBodyFor(req.headers, e), {
      "retry-after": String(STARTING_RETRY_AFTER),
      connection: "close",
    });
  };
}
