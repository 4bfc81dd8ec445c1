// up's front for several gateways (src/local/front.ts), against real sockets: loopback
// servers stand in for the gateways, each answering a connection with its own name.
import { createServer, type Server, Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { GatewayFront } from "../../src/local/front.ts";

const servers: Server[] = [];
let front: GatewayFront | undefined;
afterEach(() => {
  front?.close(true);
  for (const s of servers.splice(0)) s.close();
});

/** A server that writes `name` to each connection and keeps it open. */
async function named(name: string): Promise<number> {
  const s = createServer((c) => c.write(name));
  servers.push(s);
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  return (s.address() as { port: number }).port;
}

/** A port nothing listens on. */
async function closedPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** Opens a connection to `port`; resolves with what arrives first, or "closed". */
function first(port: number, keep: Socket[]): Promise<string> {
  return new Promise((resolve) => {
    const c = new Socket();
    keep.push(c);
    c.once("data", (d) => resolve(d.toString()));
    c.once("close", () => resolve("closed"));
    c.once("error", () => {});
    c.connect(port, "127.0.0.1");
  });
}

describe("GatewayFront", () => {
  it("hands each connection to the gateway with the fewest open, http and grpc apart; none serving: closed", async () => {
    front = new GatewayFront();
    const ports = await front.listen("127.0.0.1", 0, 0);
    const open: Socket[] = [];
    expect(await first(ports.http, open)).toBe("closed");
    front.add("a", { http: await named("a-http"), grpc: await named("a-grpc") });
    front.add("b", { http: await named("b-http"), grpc: await named("b-grpc") });
    const seen = [];
    for (let i = 0; i < 6; i++) seen.push(await first(ports.http, open));
    expect(seen.sort()).toEqual(["a-http", "a-http", "a-http", "b-http", "b-http", "b-http"]);
    expect(await first(ports.grpc, open)).toMatch(/^[ab]-grpc$/);
    // Closed connections count no more: with a's all closed, the next go to a.
    for (const c of open) c.destroy();
    await new Promise((r) => setTimeout(r, 50));
    const more: Socket[] = [];
    front.remove("b");
    expect(front.size).toBe(1);
    for (let i = 0; i < 3; i++) expect(await first(ports.http, more)).toBe("a-http");
    for (const c of more) c.destroy();
  });

  it("skips a gateway that refuses the connection (it has just exited) for the next", async () => {
    front = new GatewayFront();
    const ports = await front.listen("127.0.0.1", 0, 0);
    front.add("gone", { http: await closedPort(), grpc: await closedPort() });
    front.add("live", { http: await named("live"), grpc: await named("live") });
    const open: Socket[] = [];
    for (let i = 0; i < 4; i++) expect(await first(ports.http, open)).toBe("live");
    for (const c of open) c.destroy();
    // Only refusing ones: the client's connection is closed, not left hanging.
    front.remove("live");
    expect(await first(ports.http, open)).toBe("closed");
  });
});
