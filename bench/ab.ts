// Setups of a gateway measured in the same rounds, taking turns (AB, BA): the front suite (a
// gateway through `up`'s front against the same gateway reached directly), the tracing suite
// (a gateway exporting spans against one that does not) and the tls suite (plain, TLS and
// mutual TLS gateways). Streaming chat completions of `newTokens` tokens (ignore_eos) at each
// concurrency level, `perClient` requests per client one after another; the first path is the
// peer every ratio is taken against.
import { medianRange, type Stats, stats } from "./lib.ts";
import { chat, type Endpoint, PROMPTS, percentile } from "./serve.ts";

export interface AbRow<P extends string> {
  concurrency: number;
  path: P;
  /** Output tokens per second of a level's requests over its wall time. */
  tps: Stats;
  /** Per round, this path's tokens/s over the peer's (1 for the peer's rows). */
  ratio: Stats;
  ttftP50Ms: number;
  itlP50Ms: number;
  errors: number;
}

export async function abRounds<P extends string>(o: {
  suite: string;
  /** The peer first. */
  paths: readonly [P, ...P[]];
  base: Record<P, Endpoint>;
  levels: readonly number[];
  perClient: number;
  newTokens: number;
  runs: number;
  log: (s: string) => void;
}): Promise<AbRow<P>[]> {
  const peer = o.paths[0];
  // Warm-up: the first requests pay for page faults and JIT.
  for (const path of o.paths) await chat(o.base[path], PROMPTS[0]!, 8);
  const key = (c: number, p: P) => `${c}/${p}`;
  const tps = new Map<string, number[]>();
  const ttft = new Map<string, number[]>();
  const itl = new Map<string, number[]>();
  const errors = new Map<string, number>();
  for (let round = 0; round < o.runs; round++) {
    for (const c of o.levels) {
      for (const path of round % 2 === 0 ? o.paths : [...o.paths].reverse()) {
        const k = key(c, path);
        const t0 = performance.now();
        const results = (
          await Promise.all(
            Array.from({ length: c }, async (_, i) => {
              const out = [];
              for (let r = 0; r < o.perClient; r++)
                out.push(await chat(o.base[path], PROMPTS[(i + r) % PROMPTS.length]!, o.newTokens));
              return out;
            }),
          )
        ).flat();
        const wallS = (performance.now() - t0) / 1000;
        const tokens = results.reduce((n, r) => n + r.tokens, 0);
        tps.set(k, [...(tps.get(k) ?? []), tokens / wallS]);
        ttft.set(k, [...(ttft.get(k) ?? []), ...results.filter((r) => r.ok).map((r) => r.ttftMs)]);
        itl.set(k, [...(itl.get(k) ?? []), ...results.flatMap((r) => r.gapsMs)]);
        errors.set(k, (errors.get(k) ?? 0) + results.filter((r) => !r.ok).length);
        o.log(
          `[bench] ${o.suite} round ${round + 1}/${o.runs} ${path} x${c}: ${(tokens / wallS).toFixed(1)} tok/s`,
        );
      }
    }
  }
  return o.levels.flatMap((c) =>
    o.paths.map((path): AbRow<P> => {
      const v = tps.get(key(c, path))!;
      const base = tps.get(key(c, peer))!;
      return {
        concurrency: c,
        path,
        tps: stats(v),
        ratio: stats(v.map((x, i) => x / base[i]!)),
        ttftP50Ms: percentile(ttft.get(key(c, path))!, 50),
        itlP50Ms: percentile(itl.get(key(c, path))!, 50),
        errors: errors.get(key(c, path))!,
      };
    }),
  );
}

/**
 * The rows as a Markdown table: `pathHeader` names the second column, `ratioHeader` the
 * ratio's; the peer's rows say so instead of a ratio.
 */
export function abTable<P extends string>(
  rows: readonly AbRow<P>[],
  peer: P,
  pathHeader: string,
  ratioHeader: string,
): string {
  const body = rows
    .map(
      (x) =>
        `| ${x.concurrency} | ${x.path} | ${medianRange(x.tps)} | ${x.path === peer ? "1.00x (the peer)" : `**${x.ratio.median.toFixed(2)}x** (${x.ratio.min.toFixed(2)}-${x.ratio.max.toFixed(2)})`} | ${x.ttftP50Ms.toFixed(1)} | ${x.itlP50Ms.toFixed(1)} | ${x.errors} |`,
    )
    .join("\n");
  return `| clients | ${pathHeader} | output tok/s | ${ratioHeader} | TTFT p50 | ITL p50 | errors |
|---:|---|---:|---:|---:|---:|---:|
${body}`;
}
