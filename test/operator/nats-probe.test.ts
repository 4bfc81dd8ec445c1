// The operator's NATS probe (src/operator/nats-probe.ts) against real nats-servers: the test
// environment's (JetStream on), a plain one, one that requires a user, and a port where none
// listens.
import { createServer } from "node:net";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { NatsProbe } from "../../src/operator/nats-probe.ts";
import { startNats } from "../env/nats.ts";
import { startNatsWithoutJetStream, testEnv, uniqueName } from "../support/env.ts";

/** A loopback port nothing listens on (taken, then given back). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

describe("NatsProbe", () => {
  it("tells a server with JetStream from one without, and does not judge one that is not there", async () => {
    const plain = await startNatsWithoutJetStream("nats-server-probe");
    let now = 0;
    const probe = new NatsProbe({ now: () => now });
    try {
      expect(await probe.ask(testEnv().nats.url)).toEqual({ jetStream: true });
      expect(await probe.ask(plain.info.url)).toEqual({ jetStream: false });
      expect(await probe.ask(`nats://127.0.0.1:${await closedPort()}`)).toBeNull();
      // Kept for a while: the server is asked again only after 30 s.
      const url = plain.info.url;
      await plain.process.stop();
      expect(await probe.ask(url)).toEqual({ jetStream: false });
      now += 30_001;
      expect(await probe.ask(url)).toBeNull();
    } finally {
      await plain.process.stop();
    }
  });

  it("says when the server refuses the credentials, each asked apart", async () => {
    const server = await startNats(
      testEnv().binaries.natsServer,
      join(testEnv().runDir, uniqueName("nats-probe-users")),
      join(testEnv().runDir, "logs"),
      {
        name: "nats-probe-users",
        config: ['authorization { users = [ { user: op, password: "right" } ] }'],
      },
    );
    const probe = new NatsProbe();
    const as = (password: string) => ({
      identity: { kind: "user" as const, user: "op", password },
    });
    try {
      const url = server.info.url;
      expect(await probe.ask(url)).toEqual({ refused: "Authorization Violation" });
      expect(await probe.ask(url, as("wrong"))).toEqual({ refused: "Authorization Violation" });
      expect(await probe.ask(url, as("right"))).toEqual({ jetStream: true });
    } finally {
      await server.process.stop();
    }
  });
});
