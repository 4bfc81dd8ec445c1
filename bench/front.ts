// The front suite: what `expertmesh up`'s front for several gateways (src/local/front.ts, the
// gateways' Service in local mode) costs a request, against the peer that sets the bar: the
// same gateway process reached directly, in the same rounds, the two alternating (AB, BA).
//
// One single-process gateway (`gateway --local`) on the mini V3 model; the front runs in this
// process, as it runs in `up`'s, beside the load generator. Streaming chat completions of 32
// tokens (ignore_eos) at 1 and 16 concurrent clients, each request on a connection of its own
// (fetch's pool reuses them: the front hands over connections, not requests).
import type { ChildProcess } from "node:child_process";
import { GatewayFront } from "../src/local/front.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import {
  chat,
  ensureMiniModel,
  localGateway,
  PROMPTS,
  percentile,
  SERVE_MODEL,
  stop,
} from "./serve.ts";

const PATHS = ["direct", "front"] as const;
type Path = (typeof PATHS)[number];
const LEVELS = [1, 16] as const;
const NEW_TOKENS = 32;

export interface FrontRow {
  concurrency: number;
  path: Path;
  /** Output tokens per second of a level's requests over its wall time. */
  tps: Stats;
  /** Per round, front / direct tokens/s (1 for the direct rows). */
  ratio: Stats;
  ttftP50Ms: number;
  itlP50Ms: number;
  errors: number;
}

export interface FrontResults {
  runs: number;
  model: string;
  requestsPerClient: number;
  rows: FrontRow[];
}

export async function runFront(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<FrontResults> {
  const runs = o.quick ? 1 : o.runs;
  const perClient = o.quick ? 1 : 3;
  const dir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  const front = new GatewayFront();
  try {
    const direct = await localGateway("gateway", dir, [], children);
    const port = Number(new URL(direct).port);
    const ports = await front.listen("127.0.0.1", 0, 0);
    front.add("gateway", { http: port, grpc: port });
    const base: Record<Path, string> = { direct, front: `http://127.0.0.1:${ports.http}` };
    // Warm-up: the first requests pay for page faults and JIT.
    for (const path of PATHS) await chat(base[path], PROMPTS[0]!, 8);

    const key = (c: number, p: Path) => `${c}/${p}`;
    const tps = new Map<string, number[]>();
    const ttft = new Map<string, number[]>();
    const itl = new Map<string, number[]>();
    const errors = new Map<string, number>();
    for (let round = 0; round < runs; round++) {
      for (const c of LEVELS) {
        for (const path of round % 2 === 0 ? PATHS : [...PATHS].reverse()) {
          const k = key(c, path);
          const t0 = performance.now();
          const results = (
            await Promise.all(
              Array.from({ length: c }, async (_, i) => {
                const out = [];
                for (let r = 0; r < perClient; r++)
                  out.push(await chat(base[path], PROMPTS[(i + r) % PROMPTS.length]!, NEW_TOKENS));
                return out;
              }),
            )
          ).flat();
          const wallS = (performance.now() - t0) / 1000;
          const tokens = results.reduce((n, r) => n + r.tokens, 0);
          tps.set(k, [...(tps.get(k) ?? []), tokens / wallS]);
          ttft.set(k, [
            ...(ttft.get(k) ?? []),
            ...results.filter((r) => r.ok).map((r) => r.ttftMs),
          ]);
          itl.set(k, [...(itl.get(k) ?? []), ...results.flatMap((r) => r.gapsMs)]);
          errors.set(k, (errors.get(k) ?? 0) + results.filter((r) => !r.ok).length);
          o.log(
            `[bench] front round ${round + 1}/${runs} ${path} x${c}: ${(tokens / wallS).toFixed(1)} tok/s`,
          );
        }
      }
    }
    const rows = LEVELS.flatMap((c) =>
      PATHS.map((path): FrontRow => {
        const v = tps.get(key(c, path))!;
        const peer = tps.get(key(c, "direct"))!;
        return {
          concurrency: c,
          path,
          tps: stats(v),
          ratio: stats(v.map((x, i) => x / peer[i]!)),
          ttftP50Ms: percentile(ttft.get(key(c, path))!, 50),
          itlP50Ms: percentile(itl.get(key(c, path))!, 50),
          errors: errors.get(key(c, path))!,
        };
      }),
    );
    return { runs, model: SERVE_MODEL, requestsPerClient: perClient, rows };
  } finally {
    front.close(true);
    for (const c of children) await stop(c);
  }
}

export function frontTables(
  r: FrontResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const rows = r.rows
    .map(
      (x) =>
        `| ${x.concurrency} | ${x.path} | ${medianRange(x.tps)} | ${x.path === "direct" ? "1.00x (the peer)" : `**${x.ratio.median.toFixed(2)}x** (${x.ratio.min.toFixed(2)}-${x.ratio.max.toFixed(2)})`} | ${x.ttftP50Ms.toFixed(1)} | ${x.itlP50Ms.toFixed(1)} | ${x.errors} |`,
    )
    .join("\n");
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} rounds, the two paths alternating (AB, BA); from \`${source}\`. One \`gateway --local\` on ${r.model}; streaming chat completions of ${NEW_TOKENS} tokens, ${r.requestsPerClient} per client, one after another. Output tok/s: median (min-max) over rounds; the ratio is per round against the direct path of the same round, then the median; TTFT and ITL: p50 over every request of every round (ms).

| clients | path | output tok/s | front / direct | TTFT p50 | ITL p50 | errors |
|---:|---|---:|---:|---:|---:|---:|
${rows}`;
}
