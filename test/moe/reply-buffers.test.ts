// A shard's reply buffers (src/moe/reply-buffers.ts) against the real nats-server: with the
// pinned client they are reused (a client upgrade that hides its outbound queue fails here
// instead of quietly allocating every reply afresh); a published buffer comes back once
// the client has copied it out, small and large alike; one published while the connection
// is down stays lent until the client drops it, and the bytes that reach the subscriber are
// the ones published, never a later reply's.
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ReplyBuffers } from "../../src/moe/reply-buffers.ts";
import { startNats } from "../env/nats.ts";
import { testEnv, waitFor } from "../support/env.ts";

const tick = () => new Promise((r) => setImmediate(r));

/** Publishes `n` bytes of `fill` to `subject` from a buffer of `replies`. */
function publishFrom(
  nc: NatsConnection,
  replies: ReplyBuffers,
  subject: string,
  n: number,
  fill: number,
): Uint8Array {
  const b = replies.take(n);
  b.fill(fill);
  nc.publish(subject, b);
  return b;
}

describe("ReplyBuffers (real nats-server)", () => {
  let nc: NatsConnection;
  let sub: NatsConnection;

  beforeAll(async () => {
    nc = await connect({ servers: testEnv().nats.url });
    sub = await connect({ servers: testEnv().nats.url });
  });
  afterAll(async () => {
    await nc?.close();
    await sub?.close();
  });

  it("reuses a buffer once the client has copied it out, small and large", async () => {
    const replies = new ReplyBuffers(nc);
    expect(replies.reusing).toBe(true);
    const got: number[][] = [];
    const s = sub.subscribe("rb.ok", {
      callback: (_e, m) => {
        got.push([m.data.length, m.data[0]!, m.data[m.data.length - 1]!]);
      },
    });
    await sub.flush();
    for (const n of [1000, 100_000]) {
      const first = publishFrom(nc, replies, "rb.ok", n, 1);
      // The first publish of a turn is copied out in a microtask after it: still queued.
      replies.reclaim();
      expect(replies.lent).toBe(1);
      await tick();
      replies.reclaim();
      expect(replies.lent).toBe(0);
      const second = publishFrom(nc, replies, "rb.ok", n, 2);
      expect(second.buffer).toBe(first.buffer);
      await tick();
      replies.reclaim();
    }
    await waitFor("4 messages delivered", async () => (got.length === 4 ? true : undefined));
    // Each message carries the bytes it was published with, not the next reply's.
    expect(got).toEqual([
      [1000, 1, 1],
      [1000, 2, 2],
      [100_000, 1, 1],
      [100_000, 2, 2],
    ]);
    s.unsubscribe();
  });

  it("keeps a buffer published while disconnected until the client drops it", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "reply-buffers-"));
    const logs = join(testEnv().runDir, "logs");
    let nats = await startNats(testEnv().binaries.natsServer, dir, logs);
    const port = nats.info.port;
    const own = await connect({
      servers: nats.info.url,
      // No reconnect attempt (each one drops what the client queued) between the publish
      // and the check below.
      reconnectTimeWait: 1000,
      maxReconnectAttempts: -1,
    });
    try {
      const replies = new ReplyBuffers(own);
      const down = (async () => {
        for await (const st of own.status()) if (st.type === "disconnect") return;
      })();
      await nats.process.stop();
      await down;
      const held = publishFrom(own, replies, "rb.down", 100_000, 3);
      await tick();
      replies.reclaim();
      expect(replies.lent).toBe(1); // still queued in the client: not handed out again
      const other = publishFrom(own, replies, "rb.down", 100_000, 4);
      expect(other.buffer).not.toBe(held.buffer);
      // Back up: the client drops what it queued while down (a new connection starts
      // clean), after which both buffers are free.
      const up = (async () => {
        for await (const st of own.status()) if (st.type === "reconnect") return;
      })();
      nats = await startNats(testEnv().binaries.natsServer, dir, logs, { port });
      await up;
      replies.reclaim();
      expect(replies.lent).toBe(0);
    } finally {
      await own.close();
      await nats.process.stop();
    }
  });
});
