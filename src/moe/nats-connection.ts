// How every expertmesh process connects to NATS: reconnect forever once connected (a
// restarting server or a network blip must not end a gateway, shard or operator), optional
// .creds credentials, and a first connection that may wait for a server still starting
// (pods and their NATS come up together) before it fails with EM_NATS_CONNECT.
import { setTimeout as sleep } from "node:timers/promises";
import { connect, credsAuthenticator, type NatsConnection } from "@nats-io/transport-node";
import { ExpertMeshError } from "../util/errors.ts";

export async function connectNats(o: {
  url: string;
  /** Client name shown by the server (e.g. expertmesh-shard-0-<id>). */
  name: string;
  /** Contents of a NATS .creds file. */
  creds?: Uint8Array | undefined;
  reconnectWaitMs?: number;
  /**
   * How long the first connection may keep trying while the server cannot be reached
   * (refused, timed out, name not resolved); default 0: one try. Credentials refused and
   * bad URLs fail at once.
   */
  waitMs?: number;
  /** Told once when the first try failed and it goes on trying. */
  log?: (message: string) => void;
}): Promise<NatsConnection> {
  const waitMs = o.waitMs ?? 0;
  const deadline = Date.now() + waitMs;
  let authenticator: ReturnType<typeof credsAuthenticator> | undefined;
  try {
    authenticator = o.creds ? credsAuthenticator(o.creds) : undefined;
  } catch (err) {
    throw connectError(o.url, "the credentials are not a NATS .creds file", err);
  }
  for (let attempt = 0; ; attempt++) {
    try {
      return await connect({
        servers: o.url,
        name: o.name,
        maxReconnectAttempts: -1,
        reconnectTimeWait: o.reconnectWaitMs ?? 250,
        ...(authenticator ? { authenticator } : {}),
      });
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      if (err instanceof TypeError && /url/i.test(why))
        throw connectError(o.url, "not a NATS URL (nats://host:port)", err);
      if (!unreachable(err)) throw connectError(o.url, why, err);
      if (Date.now() >= deadline)
        throw connectError(
          o.url,
          waitMs > 0 ? `${why} (tried for ${Math.round(waitMs / 1000)} s)` : why,
          err,
        );
      if (attempt === 0)
        o.log?.(
          `NATS at ${o.url} not reachable (${why}): trying for up to ${Math.round(waitMs / 1000)} s`,
        );
      await sleep(Math.min(250 * 2 ** attempt, 2000, Math.max(0, deadline - Date.now())));
    }
  }
}

/** A server that is not there (yet): refused, timed out, or a name not resolved. */
function unreachable(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  if (err.name === "ConnectionError" || err.name === "TimeoutError") return true;
  const code = (err as { code?: unknown }).code;
  return code === "ENOTFOUND" || code === "EAI_AGAIN" || code === "ECONNRESET";
}

function connectError(url: string, why: string, cause: unknown): ExpertMeshError {
  return new ExpertMeshError("EM_NATS_CONNECT", `cannot connect to NATS at ${url}: ${why}`, {
    cause,
  });
}
