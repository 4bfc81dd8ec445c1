// Request-reply for the dispatcher's hot path: one wildcard inbox subscription per
// connection user, a token per request, a plain timer per attempt. The same protocol as the
// NATS client's own `request()` (PUB with a reply subject; replies, and the server's 503
// "no responders" status, arrive on the inbox), without its per-request bookkeeping: the
// client builds up to three Error objects with stack traces for every request (one for the
// async trace, one for the timeout, one to cancel the settled request), which cost a
// quarter of the gateway's CPU in the dispatch benchmark. Errors here are built only when
// something fails. ADR 0004.
import {
  createInbox,
  type Msg,
  type NatsConnection,
  type Subscription,
} from "@nats-io/transport-node";
import { inboxPrefixOf } from "./nats-connection.ts";

/** A failed attempt the dispatcher may retry (another replica, or after a reconnect). */
export class TransportError extends Error {
  readonly reason: "timeout" | "no-responders" | "closed";
  constructor(reason: TransportError["reason"], message: string) {
    super(message);
    this.name = "TransportError";
    this.reason = reason;
  }
}

interface Pending {
  resolve: (m: Msg) => void;
  reject: (e: unknown) => void;
  timer: ReturnType<typeof setTimeout>;
  subject: string;
}

export class Requester {
  readonly #nc: NatsConnection;
  #sub: Subscription | undefined;
  #prefix = "";
  #next = 0;
  readonly #pending = new Map<string, Pending>();

  constructor(nc: NatsConnection) {
    this.#nc = nc;
  }

  /** Requests in flight (for tests). */
  get inFlight(): number {
    return this.#pending.size;
  }

  /**
   * Publishes `data` to `subject` with a reply subject on this requester's inbox; resolves
   * the first reply, rejects with a TransportError on timeout, no responders, or close.
   */
  request(subject: string, data: Uint8Array, timeoutMs: number): Promise<Msg> {
    if (!this.#sub || this.#sub.isClosed()) this.#subscribe();
    const token = (this.#next++).toString(36);
    return new Promise<Msg>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.#pending.delete(token))
          reject(new TransportError("timeout", `no reply from ${subject} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(token, { resolve, reject, timer, subject });
      try {
        this.#nc.publish(subject, data, { reply: this.#prefix + token });
      } catch (err) {
        this.#pending.delete(token);
        clearTimeout(timer);
        reject(err);
      }
    });
  }

  /** Unsubscribes the inbox; requests in flight fail with TransportError("closed"). */
  close(): void {
    const sub = this.#sub;
    this.#sub = undefined;
    if (sub && !sub.isClosed()) sub.unsubscribe();
    this.#failAll("requester closed");
  }

  #subscribe(): void {
    this.#failAll("inbox subscription closed"); // requests of a previous subscription
    const inbox = createInbox(inboxPrefixOf(this.#nc));
    this.#prefix = `${inbox}.`;
    const prefixLength = this.#prefix.length;
    this.#sub = this.#nc.subscribe(`${inbox}.*`, {
      callback: (err, msg) => {
        if (err) {
          this.#failAll(`inbox subscription failed: ${err.message}`);
          return;
        }
        const token = msg.subject.slice(prefixLength);
        const p = this.#pending.get(token);
        if (!p) return; // a late reply to an attempt that timed out
        this.#pending.delete(token);
        clearTimeout(p.timer);
        // The server answers a request nobody is subscribed to with an empty 503 status.
        if (msg.data.length === 0 && msg.headers?.code === 503)
          p.reject(new TransportError("no-responders", `no responders on ${p.subject}`));
        else p.resolve(msg);
      },
    });
  }

  #failAll(why: string): void {
    for (const [token, p] of this.#pending) {
      this.#pending.delete(token);
      clearTimeout(p.timer);
      p.reject(new TransportError("closed", `${p.subject}: ${why}`));
    }
  }
}
