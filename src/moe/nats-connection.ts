// How every expertmesh process connects to NATS: reconnect forever (a restarting server or
// a network blip must not end a gateway, shard or operator), optional .creds credentials.
import { connect, credsAuthenticator, type NatsConnection } from "@nats-io/transport-node";

export async function connectNats(o: {
  url: string;
  /** Client name shown by the server (e.g. expertmesh-shard-0-<id>). */
  name: string;
  /** Contents of a NATS .creds file. */
  creds?: Uint8Array | undefined;
  reconnectWaitMs?: number;
}): Promise<NatsConnection> {
  return connect({
    servers: o.url,
    name: o.name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: o.reconnectWaitMs ?? 250,
    ...(o.creds ? { authenticator: credsAuthenticator(o.creds) } : {}),
  });
}
