// A real nats-server with JetStream, on a random loopback port; over TLS, or requiring
// credentials, when asked.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { freePort, ManagedProcess } from "./process.ts";

export interface NatsInfo {
  /** nats://127.0.0.1:PORT */
  url: string;
  port: number;
  /** http://127.0.0.1:PORT of the monitoring endpoint (/healthz, /varz, /connz). */
  monitorUrl: string;
  pid: number;
  /** The config file the server was started with (a restarted server reuses it). */
  configPath: string;
}

/** TLS for the client port: the server's certificate, and the CA it verifies clients by. */
export interface NatsServerTls {
  cert: string;
  key: string;
  /** With it, clients must present a certificate this CA signed (mutual TLS). */
  verifyClientsCa?: string;
}

export interface NatsServerOptions {
  /** The client port (default: a free one). */
  port?: number;
  /** Largest payload (default NATS_MAX_PAYLOAD). */
  maxPayload?: number;
  /** The process's name, and its log's (logs/<name>.log): a test's own server keeps its log. */
  name?: string;
  /** JetStream on (default); off: a plain server, as some clusters run. */
  jetStream?: boolean;
  /** TLS on the client port (required of every client). */
  tls?: NatsServerTls;
  /** More config lines: `authorization { ... }`, operator mode (test/env/nats-jwt.ts). */
  config?: string[];
}

export interface NatsServer {
  info: NatsInfo;
  process: ManagedProcess;
}

/** Largest frame payload the server accepts; frames above it are split by the codec. */
export const NATS_MAX_PAYLOAD = 8 * 1024 * 1024;

/**
 * Starts nats-server (JetStream on, store under `dir`) bound to 127.0.0.1 only.
 * Resolves when /healthz reports JetStream ready.
 */
export async function startNats(
  binary: string,
  dir: string,
  logDir: string,
  o: NatsServerOptions = {},
): Promise<NatsServer> {
  const { maxPayload = NATS_MAX_PAYLOAD, name = "nats-server", jetStream = true, tls } = o;
  mkdirSync(join(dir, "jetstream"), { recursive: true });
  const clientPort = o.port ?? (await freePort());
  const monitorPort = await freePort();
  const configPath = join(dir, "nats.conf");
  writeFileSync(
    configPath,
    [
      `listen: "127.0.0.1:${clientPort}"`,
      `http: "127.0.0.1:${monitorPort}"`,
      `max_payload: ${maxPayload}`,
      ...(jetStream ? [`jetstream { store_dir: "${join(dir, "jetstream")}" }`] : []),
      ...(tls
        ? [
            `tls { cert_file: "${tls.cert}", key_file: "${tls.key}", timeout: 2${
              tls.verifyClientsCa ? `, ca_file: "${tls.verifyClientsCa}", verify: true` : ""
            } }`,
          ]
        : []),
      ...(o.config ?? []),
      "",
    ].join("\n"),
  );
  const proc = new ManagedProcess(name, binary, ["-c", configPath], logDir);
  const monitorUrl = `http://127.0.0.1:${monitorPort}`;
  await proc.waitUntil("healthy", async () => {
    const res = await fetch(`${monitorUrl}/healthz${jetStream ? "?js-enabled-only=true" : ""}`);
    return res.ok;
  });
  return {
    process: proc,
    info: {
      url: `nats://127.0.0.1:${clientPort}`,
      port: clientPort,
      monitorUrl,
      pid: proc.pid!,
      configPath,
    },
  };
}

/**
 * `n` nats-servers routed into one cluster, JetStream clustered (each with its store under
 * `dir`/s<i>), all on loopback; resolves once every one is healthy, its JetStream in contact
 * with the meta leader the servers elected.
 */
export async function startNatsCluster(
  binary: string,
  dir: string,
  logDir: string,
  n: number,
  name = "nats-cluster",
): Promise<NatsServer[]> {
  const routePorts = await Promise.all(Array.from({ length: n }, () => freePort()));
  const routes = routePorts.map((p) => `nats://127.0.0.1:${p}`).join(", ");
  const servers = await Promise.all(
    routePorts.map((port, i) =>
      startNats(binary, join(dir, `s${i}`), logDir, {
        name: `${name}-${i}`,
        config: [
          `server_name: ${name}-${i}`,
          `cluster { name: ${name}, listen: "127.0.0.1:${port}", routes: [${routes}] }`,
        ],
      }),
    ),
  );
  // The full health check: JetStream in contact with its meta leader (an API request before
  // that times out).
  for (const s of servers)
    await s.process.waitUntil(
      "in contact with the JetStream meta leader",
      async () => (await fetch(`${s.info.monitorUrl}/healthz`)).ok,
      60_000,
    );
  return servers;
}
