// Buffers for a shard's reply frames, reused once the NATS client no longer holds them.
//
// publish() does not copy: the client queues the caller's buffer in its outbound queue and
// copies it out when it flushes (in a microtask, or at once when 32 KiB were already
// queued), or, while disconnected, keeps it until the next connect attempt drops the
// queue, or sends it after a reconnect handshake. A buffer overwritten while still queued would go out as another
// reply's bytes: a self-consistent frame, checksum included. So a reply buffer is reused
// only when the queue no longer references it. The queue is the client's own
// (`protocol.outbound.buffers` of nats-core's NatsConnectionImpl, the type its "internal"
// entry point exports to the sibling packages); where a client lacks it, every reply gets
// a fresh buffer, which is always safe (test/moe/reply-buffers.test.ts checks that the
// pinned client has it). Before, large replies were pooled behind a flush() per batch (a
// PING / PONG: one more wakeup of the shard per batch) and small ones allocated fresh
// (~10 µs each, on the hot path of every layer).
import type { NatsConnection } from "@nats-io/transport-node";
import { BufferPool } from "../util/buffer-pool.ts";

/** What this module reads of the client: its queue of buffers not yet copied out. */
interface ClientInternals {
  protocol?: { outbound?: { buffers?: unknown } };
}

export class ReplyBuffers {
  readonly #pool = new BufferPool(8);
  /** Handed out since the last reclaim() and not yet seen free. */
  #lent: Uint8Array[] = [];
  readonly #queued: (() => readonly unknown[]) | undefined;

  constructor(nc: NatsConnection) {
    const protocol = (nc as unknown as ClientInternals).protocol;
    if (Array.isArray(protocol?.outbound?.buffers))
      this.#queued = () => protocol!.outbound!.buffers as readonly unknown[];
  }

  /** Whether buffers are reused (the client's outbound queue can be read). */
  get reusing(): boolean {
    return this.#queued !== undefined;
  }

  /** Buffers handed out and not yet reclaimed (for tests). */
  get lent(): number {
    return this.#lent.length;
  }

  /**
   * n bytes for one reply frame (not zero-filled). Between two reclaim() calls every buffer
   * handed out must be published or dropped: reclaim() takes back whatever the client does
   * not hold.
   */
  take = (n: number): Uint8Array => {
    if (!this.#queued) return new Uint8Array(Buffer.allocUnsafeSlow(n).buffer, 0, n);
    const b = this.#pool.bytes(n);
    this.#lent.push(b);
    return b;
  };

  /** Takes back the buffers the client has copied out or dropped. Call between batches. */
  reclaim(): void {
    if (!this.#queued || this.#lent.length === 0) return;
    const queued = this.#queued();
    const still: Uint8Array[] = [];
    for (const b of this.#lent) {
      if (queued.includes(b)) still.push(b);
      else this.#pool.give(b);
    }
    this.#lent = still;
  }
}
