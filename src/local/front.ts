// The gateways' Service in local mode: when `expertmesh up` runs more than one gateway process
// (spec.gateway.replicas, or the autoscaler's gateway role), it listens on the manifest's HTTP
// and gRPC ports itself and hands each connection to a serving gateway, as kube-proxy does for
// a Service (layer 4: HTTP/1.1, HTTP/2 and gRPC pass through untouched). A connection goes to
// the gateway with the fewest open ones; a gateway leaves the rotation when `up` stops it or
// it exits (its open connections run on until it closes them), and joins once it serves.
import { connect, createServer, type Server, type Socket } from "node:net";

/** A serving gateway's own ports (it listens on loopback). */
export interface FrontTarget {
  http: number;
  grpc: number;
}

type Kind = keyof FrontTarget;

interface Target extends FrontTarget {
  name: string;
  /** Connections open through the front. */
  open: number;
}

export class GatewayFront {
  readonly #targets = new Map<string, Target>();
  readonly #servers: Server[] = [];
  readonly #sockets = new Set<Socket>();

  /** Listens on the public ports (0: any free one); resolves with the ports it has. */
  async listen(host: string, httpPort: number, grpcPort: number): Promise<FrontTarget> {
    const open = (kind: Kind, port: number) =>
      new Promise<number>((resolve, reject) => {
        const server = createServer((c) => this.#pass(kind, c, new Set()));
        server.once("error", reject);
        server.listen({ host, port }, () => {
          server.off("error", reject);
          resolve((server.address() as { port: number }).port);
        });
        this.#servers.push(server);
      });
    const http = await open("http", httpPort);
    return { http, grpc: await open("grpc", grpcPort) };
  }

  /** Puts a serving gateway in the rotation. */
  add(name: string, t: FrontTarget): void {
    this.#targets.set(name, { name, ...t, open: this.#targets.get(name)?.open ?? 0 });
  }

  /** Takes a gateway out of the rotation: no new connections reach it. */
  remove(name: string): void {
    this.#targets.delete(name);
  }

  /** Gateways in the rotation. */
  get size(): number {
    return this.#targets.size;
  }

  /** Stops listening; open connections run on (close(true): cut them too). */
  close(cut = false): void {
    for (const s of this.#servers) s.close();
    if (cut) for (const s of this.#sockets) s.destroy();
  }

  /**
   * Hands `client` to the gateway with the fewest open connections; one that refuses it (it
   * has just exited) is skipped for the next. With none serving, the connection is closed.
   */
  #pass(kind: Kind, client: Socket, tried: Set<string>): void {
    let pick: Target | undefined;
    for (const t of this.#targets.values())
      if (!tried.has(t.name) && (!pick || t.open < pick.open)) pick = t;
    if (!pick) {
      client.destroy();
      return;
    }
    const target = pick;
    target.open++;
    this.#sockets.add(client);
    const upstream = connect({ host: "127.0.0.1", port: target[kind] });
    this.#sockets.add(upstream);
    let connected = false;
    let done = false;
    // Ends this attempt: both sockets closed, or (handOn) only the gateway's, the client's
    // connection going to the next gateway.
    const finish = (handOn = false) => {
      if (done) return;
      done = true;
      target.open--;
      this.#sockets.delete(upstream);
      upstream.destroy();
      client.off("error", onClient).off("close", onClient);
      if (handOn) return this.#pass(kind, client, tried.add(target.name));
      this.#sockets.delete(client);
      client.destroy();
    };
    const onClient = () => finish();
    upstream.once("connect", () => {
      connected = true;
      client.pipe(upstream);
      upstream.pipe(client);
    });
    // Refused before a byte passed (the gateway has just exited): the next one, if any.
    upstream.on("error", () => finish(!connected && !client.destroyed));
    upstream.on("close", () => {
      if (connected) finish();
    });
    client.on("error", onClient).on("close", onClient);
  }
}
