// What the operator learns of a model's NATS server before it applies anything: whether it
// takes spec.nats's credentials (pods it refuses would crash-loop on EM_NATS_CONNECT; ADR
// 0032), and whether it has JetStream on, which the prefix cache's NATS tier
// (spec.gateway.kvCache.remoteBytes, ADR 0028) and so disaggregated prefill (ADR 0029) need
// (a gateway without it exits at start, over and over), and whether a TLS handshake with it
// fails for certain (a CA that did not sign its certificate, a server without TLS; ADR
// 0031). The reconciler asks, so that the model says why (Degraded) instead. One short connection per server and credentials, its
// answer kept for a while.
import { connect } from "@nats-io/transport-node";
import {
  handshakeFailure,
  type NatsAuth,
  natsAuthKey,
  natsConnectOptions,
} from "../moe/nats-connection.ts";

/** How long an answer is kept (ms): a server restarted with JetStream is seen after this. */
const ANSWER_TTL_MS = 30_000;
/** A server that does not answer within this long is not judged. */
const CONNECT_TIMEOUT_MS = 2_000;

/**
 * What the server said: its INFO's `jetstream` once connected, why it refused the credentials
 * (the server's words), or why the TLS handshake failed (handshakeFailure's words); null: no
 * answer (unreachable, a timeout from a server that does not verify clients), not judged.
 */
export type NatsAnswer = { jetStream: boolean } | { refused: string } | { tls: string } | null;

export class NatsProbe {
  readonly #answers = new Map<string, { at: number; answer: Promise<NatsAnswer> }>();
  readonly #now: () => number;

  constructor(o: { now?: () => number } = {}) {
    this.#now = o.now ?? Date.now;
  }

  /** What the server at `url` answers a connection with `auth`, as last asked. */
  ask(url: string, auth?: NatsAuth): Promise<NatsAnswer> {
    const key = natsAuthKey(url, auth);
    const now = this.#now();
    const known = this.#answers.get(key);
    if (known && now - known.at < ANSWER_TTL_MS) return known.answer;
    const answer = ask(url, auth);
    this.#answers.set(key, { at: now, answer });
    return answer;
  }
}

async function ask(url: string, auth?: NatsAuth): Promise<NatsAnswer> {
  const options = natsConnectOptions(url, auth);
  try {
    const nc = await connect({
      servers: url,
      name: "expertmesh-operator-probe",
      timeout: CONNECT_TIMEOUT_MS,
      reconnect: false,
      ...options,
    });
    const jetStream = nc.info?.jetstream === true;
    await nc.close();
    return { jetStream };
  } catch (err) {
    if (err instanceof Error && err.name === "AuthorizationError") return { refused: err.message };
    const tls = await handshakeFailure(url, options, err);
    return tls === null ? null : { tls };
  }
}
