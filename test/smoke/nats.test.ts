// Proves the NATS side of the test environment is a real nats-server with JetStream.
import { AckPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testEnv, uniqueName } from "../support/env.ts";

describe("nats-server", () => {
  let nc: NatsConnection;
  beforeAll(async () => {
    nc = await connect({ servers: testEnv().nats.url, name: "smoke" });
  });
  afterAll(async () => {
    await nc?.close();
  });

  it("is the real server on loopback, reporting its version", async () => {
    expect(testEnv().nats.url).toMatch(/^nats:\/\/127\.0\.0\.1:\d+$/);
    const varz = (await (await fetch(`${testEnv().nats.monitorUrl}/varz`)).json()) as {
      version: string;
      jetstream?: { config?: unknown };
      max_payload: number;
    };
    expect(varz.version).toMatch(/^2\.\d+\.\d+/);
    expect(varz.max_payload).toBe(8 * 1024 * 1024);
    expect(nc.info?.jetstream).toBe(true);
  });

  it("does request-reply", async () => {
    const subject = `smoke.${uniqueName("rr")}`;
    const sub = nc.subscribe(subject, {
      callback: (_err, msg) => {
        msg.respond(new TextEncoder().encode(`echo:${msg.string()}`));
      },
    });
    await nc.flush();
    const reply = await nc.request(subject, "hello", { timeout: 5000 });
    expect(reply.string()).toBe("echo:hello");
    sub.unsubscribe();
  });

  it("fails a request with no responder instead of hanging", async () => {
    await expect(
      nc.request(`smoke.${uniqueName("none")}`, "x", { timeout: 2000 }),
    ).rejects.toThrow();
  });

  it("publishes to a JetStream stream and consumes with acks", async () => {
    const jsm = await jetstreamManager(nc);
    const stream = uniqueName("SMOKE").replace(/-/g, "_").toUpperCase();
    const subject = `${stream.toLowerCase()}.events`;
    await jsm.streams.add({ name: stream, subjects: [subject] });
    const js = jetstream(nc);
    for (let i = 0; i < 3; i++) {
      const ack = await js.publish(subject, JSON.stringify({ i }));
      expect(ack.stream).toBe(stream);
      expect(ack.seq).toBe(i + 1);
    }
    await jsm.consumers.add(stream, { durable_name: "reader", ack_policy: AckPolicy.Explicit });
    const consumer = await js.consumers.get(stream, "reader");
    const seen: number[] = [];
    for (let i = 0; i < 3; i++) {
      const m = await consumer.next({ expires: 5000 });
      expect(m).not.toBeNull();
      seen.push((m!.json() as { i: number }).i);
      m!.ack();
    }
    expect(seen).toEqual([0, 1, 2]);
    const info = await jsm.streams.info(stream);
    expect(info.state.messages).toBe(3);
    await jsm.streams.delete(stream);
  });
});
