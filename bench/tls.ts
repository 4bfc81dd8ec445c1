// The tls suite: what TLS on the gateway's APIs (--tls-cert/--tls-key, and mutual TLS with
// --tls-client-ca; ADR 0034) costs, against the peer that sets the bar: the same gateway in
// plain HTTP, in the same rounds, the four taking turns (ABCD, DCBA).
//
// Four single-process gateways (`gateway --local`) on the mini V3 model: plain; TLS with a
// certificate of the kind cert-manager issues by default (RSA 2048); TLS with an ECDSA P-256
// one (cert-manager's `privateKey.algorithm: ECDSA`); mutual TLS (RSA 2048 on both sides).
// The certificates are made for the run by the test PKI's openssl calls. Two measures:
// - streaming chat completions of 32 tokens (ignore_eos) at 1 and 16 concurrent clients, over
//   kept-alive connections (as the openai SDKs hold them): the cost of encrypting the stream;
// - new connections, one after another, each a GET /health and closed: the cost of a full
//   handshake (TLS 1.3, no session resumption) as a client sees it (its time, its own
//   handshake work included) and as the gateway pays it (its CPU time per connection, from
//   /proc).
// Every client, plain ones too, is undici's, so the three paths differ by TLS alone.
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent } from "undici";
import { makeNatsPki } from "../test/env/pki.ts";
import { type AbRow, abRounds, abTable } from "./ab.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import {
  type Endpoint,
  ensureMiniModel,
  localGateway,
  percentile,
  procCpuSeconds,
  SERVE_MODEL,
  stop,
} from "./serve.ts";

const PATHS = ["plain", "tls", "ecdsa", "mtls"] as const;
type Path = (typeof PATHS)[number];
const LEVELS = [1, 16] as const;
const NEW_TOKENS = 32;

export type TlsRow = AbRow<Path>;

export interface HandshakeRow {
  path: Path;
  /** Connections per second, one after another, over rounds. */
  connectionsPerS: Stats;
  /** A connection's time (connect, handshake, GET /health, answer), p50 and p99 in ms. */
  p50Ms: number;
  p99Ms: number;
  /** The gateway's CPU time per connection (ms), over rounds. */
  serverCpuMs: Stats;
  errors: number;
}

export interface TlsResults {
  runs: number;
  model: string;
  requestsPerClient: number;
  connectionsPerRound: number;
  key: string;
  rows: TlsRow[];
  handshakes: HandshakeRow[];
}

interface Client {
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
}

/** A GET /health on a connection of its own, closed after: its time in ms. */
function freshGet(url: string, client: Client): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const options = { agent: false as const, headers: { connection: "close" }, ...client };
    const req = (url.startsWith("https:") ? httpsRequest : httpRequest)(
      `${url}/health`,
      options,
      (res) => {
        res.resume();
        res.on("end", () =>
          res.statusCode === 200
            ? resolve(performance.now() - t0)
            : reject(new Error(`HTTP ${res.statusCode}`)),
        );
      },
    );
    req.on("error", reject);
    req.end();
  });
}

export async function runTls(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<TlsResults> {
  const runs = o.quick ? 1 : o.runs;
  const perClient = o.quick ? 1 : 3;
  const connections = o.quick ? 20 : 200;
  const dir = await ensureMiniModel(o.log);
  const pkiDir = mkdtempSync(join(tmpdir(), "em-bench-tls-"));
  const children: ChildProcess[] = [];
  try {
    const pki = makeNatsPki(pkiDir);
    const ca = readFileSync(pki.ca);
    const tlsArgs = [`--tls-cert=${pki.server.cert}`, `--tls-key=${pki.server.key}`];
    const ecdsaArgs = [`--tls-cert=${pki.serverEcdsa.cert}`, `--tls-key=${pki.serverEcdsa.key}`];
    const gatewayArgs: Record<Path, string[]> = {
      plain: [],
      tls: tlsArgs,
      ecdsa: ecdsaArgs,
      mtls: [...tlsArgs, `--tls-client-ca=${pki.ca}`],
    };
    const urls = {} as Record<Path, string>;
    const pids = {} as Record<Path, number | undefined>;
    for (const path of PATHS) {
      urls[path] = await localGateway(path, dir, gatewayArgs[path], children);
      pids[path] = children.at(-1)!.pid;
    }
    const clients: Record<Path, Client> = {
      plain: {},
      tls: { ca },
      ecdsa: { ca },
      mtls: { ca, cert: readFileSync(pki.client.cert), key: readFileSync(pki.client.key) },
    };
    const agents = PATHS.map((p) => new Agent({ connect: clients[p] }));
    const endpoints = {} as Record<Path, Endpoint>;
    PATHS.forEach((p, i) => {
      endpoints[p] = { url: urls[p], dispatcher: agents[i]! };
    });
    const rows = await abRounds({
      suite: "tls",
      paths: PATHS,
      base: endpoints,
      levels: LEVELS,
      perClient,
      newTokens: NEW_TOKENS,
      runs,
      log: o.log,
    });
    await Promise.all(agents.map((a) => a.close()));

    // New connections, the paths taking turns as above.
    const times = new Map<Path, number[]>(PATHS.map((p) => [p, []]));
    const rates = new Map<Path, number[]>(PATHS.map((p) => [p, []]));
    const cpu = new Map<Path, number[]>(PATHS.map((p) => [p, []]));
    const errors = new Map<Path, number>(PATHS.map((p) => [p, 0]));
    for (const path of PATHS) await freshGet(urls[path], clients[path]); // warm-up
    for (let round = 0; round < runs; round++) {
      for (const path of round % 2 === 0 ? PATHS : [...PATHS].reverse()) {
        const cpu0 = procCpuSeconds(pids[path]);
        const t0 = performance.now();
        for (let i = 0; i < connections; i++) {
          try {
            times.get(path)!.push(await freshGet(urls[path], clients[path]));
          } catch {
            errors.set(path, errors.get(path)! + 1);
          }
        }
        const wallS = (performance.now() - t0) / 1000;
        rates.get(path)!.push(connections / wallS);
        cpu.get(path)!.push(((procCpuSeconds(pids[path]) - cpu0) * 1000) / connections);
        o.log(
          `[bench] tls round ${round + 1}/${runs} ${path} connections: ${(connections / wallS).toFixed(0)}/s`,
        );
      }
    }
    const handshakes = PATHS.map(
      (path): HandshakeRow => ({
        path,
        connectionsPerS: stats(rates.get(path)!),
        p50Ms: percentile(times.get(path)!, 50),
        p99Ms: percentile(times.get(path)!, 99),
        serverCpuMs: stats(cpu.get(path)!),
        errors: errors.get(path)!,
      }),
    );
    return {
      runs,
      model: SERVE_MODEL,
      requestsPerClient: perClient,
      connectionsPerRound: connections,
      key: "RSA 2048",
      rows,
      handshakes,
    };
  } finally {
    for (const c of children) await stop(c);
    rmSync(pkiDir, { recursive: true, force: true });
  }
}

export function tlsTables(
  r: TlsResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const plain = r.handshakes.find((h) => h.path === "plain")!;
  const handshakeRows = r.handshakes
    .map(
      (h) =>
        `| ${h.path} | ${medianRange(h.connectionsPerS, 0)} | ${h.path === "plain" ? "1.00x (the peer)" : `**${(h.connectionsPerS.median / plain.connectionsPerS.median).toFixed(2)}x**`} | ${h.p50Ms.toFixed(2)} | ${h.p99Ms.toFixed(2)} | ${medianRange(h.serverCpuMs, 2)} | ${h.errors} |`,
    )
    .join("\n");
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} rounds, the ${r.handshakes.length} gateways taking turns (ABCD, DCBA); from \`${source}\`. \`gateway --local\` on ${r.model}: plain; \`--tls-cert\`/\`--tls-key\` with an ${r.key} key (tls) or an ECDSA P-256 one (ecdsa); and mtls: ${r.key} with \`--tls-client-ca\` too, the client presenting an ${r.key} certificate. Every client is undici's.

Streaming chat completions of ${NEW_TOKENS} tokens over kept-alive connections, ${r.requestsPerClient} per client, one after another. Output tok/s: median (min-max) over rounds; the ratio is per round against the plain gateway of the same round, then the median; TTFT and ITL: p50 over every request of every round (ms).

${abTable(r.rows, "plain", "gateway", "against plain")}

New connections, ${r.connectionsPerRound} per round one after another, each a GET /health then closed (a full TLS 1.3 handshake, no resumption). Connections/s: median (min-max) over rounds, the ratio of the medians; a connection's time p50 and p99 over every connection (ms; the client's own handshake work, on the same cores, included); the gateway's CPU time per connection: median (min-max) over rounds (ms).

| gateway | connections/s | against plain | p50 ms | p99 ms | gateway CPU ms / connection | errors |
|---|---:|---:|---:|---:|---:|---:|
${handshakeRows}`;
}
