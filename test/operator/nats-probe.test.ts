// The operator's NATS probe (src/operator/nats-probe.ts) against real nats-servers: the test
// environment's (JetStream on), a plain one, one that requires a user, ones with TLS and
// mutual TLS, and a port where none listens.
import { mkdtempSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { handshakeFailure, natsConnectOptions } from "../../src/moe/nats-connection.ts";
import { NatsProbe } from "../../src/operator/nats-probe.ts";
import { type NatsServerOptions, startNats } from "../env/nats.ts";
import { makeNatsPki } from "../env/pki.ts";
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

  it("says why a TLS handshake fails for certain (a CA that did not sign the server's certificate, another host's certificate, no TLS offered, a client certificate missing or from another CA)", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "nats-probe-tls-"));
    const pki = makeNatsPki(dir);
    const read = (p: string) => readFileSync(p, "utf8");
    const start = (name: string, tls?: NatsServerOptions["tls"]) =>
      startNats(testEnv().binaries.natsServer, join(dir, name), join(testEnv().runDir, "logs"), {
        name,
        jetStream: false,
        ...(tls ? { tls } : {}),
      });
    const servers = [
      await start("nats-probe-tls", pki.server),
      await start("nats-probe-elsewhere", pki.elsewhere),
      await start("nats-probe-mtls", { ...pki.server, verifyClientsCa: pki.ca }),
      await start("nats-probe-plain"),
    ];
    const [tls, elsewhere, mutual, plain] = servers.map((s) => s!.info.url) as [
      string,
      string,
      string,
      string,
    ];
    const probe = new NatsProbe();
    const withCa = (ca: string, client?: { cert: string; key: string }) => ({
      tls: {
        ca: read(ca),
        ...(client ? { cert: read(client.cert), key: read(client.key) } : {}),
      },
    });
    try {
      expect(await probe.ask(tls, withCa(pki.ca))).toEqual({ jetStream: false });
      expect(await probe.ask(tls, withCa(pki.otherCa))).toEqual({
        tls: expect.stringMatching(
          /^the server's TLS certificate is not trusted \(.+\): give the CA/,
        ),
      });
      expect(await probe.ask(elsewhere, withCa(pki.ca))).toEqual({
        tls: expect.stringMatching(/^the server's TLS certificate is not for this host/),
      });
      expect(await probe.ask(plain, withCa(pki.ca))).toEqual({
        tls: "the server does not offer TLS, which this connection requires (TLS files given, or a tls:// URL)",
      });
      expect(await probe.ask(mutual, withCa(pki.ca, pki.client))).toEqual({ jetStream: false });
      // A reset at the handshake (what a busy client often reads before the server's alert)
      // means the same from a server whose INFO says it verifies clients, and nothing from
      // one that does not.
      const reset = Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" });
      const options = (ca: string, client?: { cert: string; key: string }) =>
        natsConnectOptions(mutual, withCa(ca, client));
      expect(await handshakeFailure(mutual, options(pki.ca), reset)).toMatch(
        /^the server requires a client certificate \(mutual TLS\)/,
      );
      expect(await handshakeFailure(mutual, options(pki.ca, pki.otherClient), reset)).toMatch(
        /^the server does not accept this connection's client certificate \(the server verifies client certificates and dropped the connection at the handshake\)/,
      );
      expect(
        await handshakeFailure(tls, natsConnectOptions(tls, withCa(pki.ca)), reset),
      ).toBeNull();
      expect(
        await handshakeFailure(mutual, natsConnectOptions(mutual, undefined), reset),
      ).toBeNull();
      // The server's TLS alerts (or resets): no client certificate, or one another CA signed.
      expect(await probe.ask(mutual, withCa(pki.ca))).toEqual({
        tls: expect.stringMatching(/^the server requires a client certificate \(mutual TLS\)/),
      });
      expect(await probe.ask(mutual, withCa(pki.ca, pki.otherClient))).toEqual({
        tls: expect.stringMatching(
          /^the server does not accept this connection's client certificate \((?:tlsv1 alert unknown ca|the server verifies client certificates and dropped the connection at the handshake)\): give one signed by the CA it verifies clients with/,
        ),
      });
    } finally {
      for (const s of servers) await s.process.stop();
    }
  });
});
