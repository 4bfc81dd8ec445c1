// The operator's JetStream probe (src/operator/nats-probe.ts) against real nats-servers: the
// test environment's (JetStream on), a plain one, and a port where none listens.
import { createServer } from "node:net";
import { describe, expect, it } from "vitest";
import { JetStreamProbe } from "../../src/operator/nats-probe.ts";
import { startNatsWithoutJetStream, testEnv } from "../support/env.ts";

/** A loopback port nothing listens on (taken, then given back). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

describe("JetStreamProbe", () => {
  it("tells a server with JetStream from one without, and does not judge one that is not there", async () => {
    const plain = await startNatsWithoutJetStream("nats-server-probe");
    let now = 0;
    const probe = new JetStreamProbe({ now: () => now });
    try {
      expect(await probe.jetStream(testEnv().nats.url)).toBe(true);
      expect(await probe.jetStream(plain.info.url)).toBe(false);
      expect(await probe.jetStream(`nats://127.0.0.1:${await closedPort()}`)).toBeNull();
      // Kept for a while: the server is asked again only after 30 s.
      const url = plain.info.url;
      await plain.process.stop();
      expect(await probe.jetStream(url)).toBe(false);
      now += 30_001;
      expect(await probe.jetStream(url)).toBeNull();
    } finally {
      await plain.process.stop();
    }
  });
});
