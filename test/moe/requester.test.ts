// The dispatcher's request-reply (src/moe/requester.ts) against the real nats-server:
// replies reach the request that asked (tokens, many in flight), a silent responder times
// out and its late reply is dropped, nobody subscribed is "no responders" at once (the
// server's 503 status), close() fails what is in flight; and the dispatcher's retry on
// TransportError still ends in EM_DISPATCH_UNAVAILABLE within the deadline.
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RemoteExperts } from "../../src/moe/dispatcher.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { Requester, TransportError } from "../../src/moe/requester.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { testEnv } from "../support/env.ts";

describe("Requester (real nats-server)", () => {
  let nc: NatsConnection;
  let responder: NatsConnection;

  beforeAll(async () => {
    nc = await connect({ servers: testEnv().nats.url });
    responder = await connect({ servers: testEnv().nats.url });
    // Echo with the first byte + 1; "slow.*" answers after 300 ms.
    responder.subscribe("rq.echo", {
      callback: (_e, m) => {
        const out = Uint8Array.from(m.data);
        out[0] = (out[0]! + 1) & 255;
        m.respond(out);
      },
    });
    responder.subscribe("rq.slow", {
      callback: (_e, m) => {
        setTimeout(() => m.respond(new Uint8Array([9])), 300);
      },
    });
    await responder.flush();
  });

  afterAll(async () => {
    await nc?.close();
    await responder?.close();
  });

  it("hands each reply to the request that asked, with many in flight", async () => {
    const rq = new Requester(nc);
    const sent = Array.from({ length: 200 }, (_, i) => new Uint8Array([i & 255, i >> 8, 7]));
    const replies = await Promise.all(sent.map((d) => rq.request("rq.echo", d, 5_000)));
    replies.forEach((m, i) => {
      expect([...m.data]).toEqual([(i + 1) & 255, i >> 8, 7]);
    });
    expect(rq.inFlight).toBe(0);
    rq.close();
  });

  it("times out a silent responder, drops its late reply, and keeps working", async () => {
    const rq = new Requester(nc);
    const err = await rq.request("rq.slow", new Uint8Array([1]), 100).catch((e) => e);
    expect(err).toBeInstanceOf(TransportError);
    // A timeout, not the reply (which comes 300 ms after the request).
    expect((err as TransportError).reason).toBe("timeout");
    await new Promise((r) => setTimeout(r, 400)); // the late reply arrives and is dropped
    expect(rq.inFlight).toBe(0);
    const ok = await rq.request("rq.echo", new Uint8Array([41]), 5_000);
    expect(ok.data[0]).toBe(42);
    rq.close();
  });

  it("says 'no responders' at once when nobody subscribes", async () => {
    const rq = new Requester(nc);
    const err = await rq.request("rq.nobody", new Uint8Array([1]), 60_000).catch((e) => e);
    expect(err).toBeInstanceOf(TransportError);
    // The server's status, not the timer (the test would time out first).
    expect((err as TransportError).reason).toBe("no-responders");
    rq.close();
  });

  it("fails the requests in flight on close, and subscribes again when used after it", async () => {
    const rq = new Requester(nc);
    const pending = rq.request("rq.slow", new Uint8Array([1]), 5_000);
    rq.close();
    const err = await pending.catch((e) => e);
    expect((err as TransportError).reason).toBe("closed");
    const ok = await rq.request("rq.echo", new Uint8Array([1]), 5_000);
    expect(ok.data[0]).toBe(2);
    rq.close();
  });

  it("the dispatcher retries no-responders until its deadline, then fails with EM_DISPATCH_UNAVAILABLE", async () => {
    const plan = planPlacement({
      architecture: { numLayers: 2, firstDenseLayers: 1, routedExperts: 8, expertsPerToken: 2 },
      numShards: 2,
    });
    const remote = new RemoteExperts({
      nc,
      model: { namespace: "rq", model: "nobody" },
      plan,
      deadlineMs: 600,
      attemptTimeoutMs: 200,
    });
    const t0 = Date.now();
    const err = await remote
      .run(1, new Float32Array(16), 1, 16, new Int32Array([0, 5]), new Float32Array([0.5, 0.5]), 2)
      .catch((e) => e);
    expect(err).toBeInstanceOf(ExpertMeshError);
    expect((err as ExpertMeshError).code).toBe("EM_DISPATCH_UNAVAILABLE");
    expect((err as ExpertMeshError).message).toMatch(/no responders/);
    // The 600 ms deadline plus at most one backoff step: no hang.
    expect(Date.now() - t0).toBeLessThan(3_000);
    remote.close();
  });
});
