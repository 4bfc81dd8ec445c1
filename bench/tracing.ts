// The tracing suite: what OpenTelemetry traces (--otlp-traces-endpoint, ADR 0030) cost a
// request, against the peer that sets the bar: the same gateway without them, in the same
// rounds, the two taking turns (AB, BA).
//
// Two single-process gateways (`gateway --local`) on the mini V3 model, one exporting its
// spans to a real OpenTelemetry Collector (the one test/env/provision.sh builds; its debug
// exporter counts them), only one of the two loaded at a time. Streaming chat completions of
// 32 tokens (ignore_eos) at 1 and 16 concurrent clients. A run fails unless the collector
// received a span for every request the traced gateway served: a gateway that exported
// nothing would measure as free.
import type { ChildProcess } from "node:child_process";
import { writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { otelcolConfig } from "../test/env/otelcol-config.ts";
import { binaries } from "../test/env/paths.ts";
import { type AbRow, abRounds, abTable } from "./ab.ts";
import { child, ensureMiniModel, localGateway, SERVE_MODEL, stop } from "./serve.ts";

const PATHS = ["plain", "traced"] as const;
type Path = (typeof PATHS)[number];
const LEVELS = [1, 16] as const;
const NEW_TOKENS = 32;

export type TracingRow = AbRow<Path>;

export interface TracingResults {
  runs: number;
  model: string;
  requestsPerClient: number;
  otelcolVersion: string;
  /** Requests the traced gateway served (warm-up included), and spans the collector got. */
  tracedRequests: number;
  spansReceived: number;
  rows: TracingRow[];
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

export async function runTracing(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<TracingResults> {
  const runs = o.quick ? 1 : o.runs;
  const perClient = o.quick ? 1 : 3;
  const dir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  try {
    const port = await freePort();
    const config = join(tmpdir(), `em-bench-otelcol-${process.pid}.yaml`);
    writeFileSync(config, otelcolConfig(port, { name: "debug", settings: "verbosity: basic" }));
    const bin = binaries().otelcol;
    const col = child("otelcol", bin, ["--config", `file:${config}`], /Everything is ready/);
    children.push(col.proc);
    let spans = 0;
    const count = (d: Buffer) => {
      for (const m of d.toString().matchAll(/"spans": (\d+)/g)) spans += Number(m[1]);
    };
    col.proc.stdout!.on("data", count);
    col.proc.stderr!.on("data", count);
    await col.ready.catch((e: Error) => {
      throw new Error(
        `${e.message}\n(the collector is built by test/env/provision.sh otelcol, at ${bin})`,
      );
    });
    const [plain, traced] = await Promise.all([
      localGateway("plain", dir, [], children),
      localGateway("traced", dir, [`--otlp-traces-endpoint=http://127.0.0.1:${port}`], children),
    ]);
    const rows = await abRounds({
      suite: "tracing",
      paths: PATHS,
      base: { plain, traced },
      levels: LEVELS,
      perClient,
      newTokens: NEW_TOKENS,
      runs,
      log: o.log,
    });
    // The warm-up's request, and each level's requests in each round.
    const tracedRequests = 1 + runs * perClient * LEVELS.reduce((a, b) => a + b, 0);
    // Spans go out once a second; stopping the gateway sends the rest.
    await stop(children.at(-1)!);
    await new Promise((r) => setTimeout(r, 1500));
    if (spans < tracedRequests)
      throw new Error(
        `tracing: the collector received ${spans} spans for ${tracedRequests} traced requests: the traced gateway did not export them all, and the run would measure a gateway that traces nothing`,
      );
    const version = /otelcol-(v[\d.]+)/.exec(bin)?.[1] ?? "?";
    return {
      runs,
      model: SERVE_MODEL,
      requestsPerClient: perClient,
      otelcolVersion: version,
      tracedRequests,
      spansReceived: spans,
      rows,
    };
  } finally {
    for (const c of children) await stop(c);
  }
}

export function tracingTables(
  r: TracingResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} rounds, the two gateways taking turns (AB, BA); from \`${source}\`. Two \`gateway --local\` on ${r.model}, one with \`--otlp-traces-endpoint\` to an OpenTelemetry Collector ${r.otelcolVersion} on the same machine (its debug exporter; it received ${r.spansReceived} spans for the ${r.tracedRequests} traced requests); streaming chat completions of ${NEW_TOKENS} tokens, ${r.requestsPerClient} per client, one after another. Output tok/s: median (min-max) over rounds; the ratio is per round against the plain gateway of the same round, then the median; TTFT and ITL: p50 over every request of every round (ms).

${abTable(r.rows, "plain", "gateway", "traced / plain")}`;
}
