// Whether a model's NATS server has JetStream on: the prefix cache's NATS tier
// (spec.gateway.kvCache.remoteBytes, ADR 0028) and so disaggregated prefill (ADR 0029) need
// it, and a gateway without it exits at start (EM_PREFIX_REMOTE), over and over. The
// reconciler asks before applying, so that the model says why (Degraded) instead. One short
// connection per server and credentials, its answer kept for a while.
import { connect } from "@nats-io/transport-node";
import { type NatsAuth, natsAuthKey, natsConnectOptions } from "../moe/nats-connection.ts";

/** How long an answer is kept (ms): a server restarted with JetStream is seen after this. */
const ANSWER_TTL_MS = 30_000;
/** A server that does not answer within this long is not judged. */
const CONNECT_TIMEOUT_MS = 2_000;

/** true or false: the server's INFO says; null: no answer (unreachable, refused credentials or TLS). */
export type JetStreamAnswer = boolean | null;

export class JetStreamProbe {
  readonly #answers = new Map<string, { at: number; answer: Promise<JetStreamAnswer> }>();
  readonly #now: () => number;

  constructor(o: { now?: () => number } = {}) {
    this.#now = o.now ?? Date.now;
  }

  /** Whether the server at `url` has JetStream (its INFO's `jetstream`), as last asked. */
  jetStream(url: string, auth?: NatsAuth): Promise<JetStreamAnswer> {
    const key = natsAuthKey(url, auth);
    const now = this.#now();
    const known = this.#answers.get(key);
    if (known && now - known.at < ANSWER_TTL_MS) return known.answer;
    const answer = ask(url, auth);
    this.#answers.set(key, { at: now, answer });
    return answer;
  }
}

async function ask(url: string, auth?: NatsAuth): Promise<JetStreamAnswer> {
  try {
    const nc = await connect({
      servers: url,
      name: "expertmesh-operator-probe",
      timeout: CONNECT_TIMEOUT_MS,
      reconnect: false,
      ...natsConnectOptions(url, auth),
    });
    const js = nc.info?.jetstream === true;
    await nc.close();
    return js;
  } catch {
    return null;
  }
}
