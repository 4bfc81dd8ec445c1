// The prefix suite (`npm run bench -- --suite prefix`): what prefix caching saves when
// requests share a long system prompt, the usual shape of chat and agent traffic.
//
// Two single-process gateways (`gateway --local`) on the mini V3 checkpoint (4096-token
// context), one with `--prefix-caching` (the default) and one with `--no-prefix-caching`
// (the peer), up at once and asked
// in turn, one request at a time: a streaming chat completion whose system message is the
// same ~1,200-token text every time, then one of the serve suite's questions (marked with
// the pass, so that no whole prompt repeats: only the system prompt is shared), 8
// tokens generated (ignore_eos). Per request: the time to the first token (the prefill) and
// the whole request. Two warm-up passes over the questions first (the cached gateway
// computes the system prompt there, once); then `runs` passes, the two gateways alternating
// request by request. The gateways' /metrics give the prompt tokens looked up and found.
import type { ChildProcess } from "node:child_process";
import { medianRange, type Stats, stats } from "./lib.ts";
import { chat, ensureMiniModel, localGateway, PROMPTS, stop } from "./serve.ts";
import { promptText } from "./tokenize.ts";

/** Bytes of the shared system prompt: ~1,500 tokens of the tiny tokenizer. */
const SYSTEM_BYTES = 2048;
const MAX_TOKENS = 8;

export interface PrefixSide {
  ttftMs: Stats;
  totalMs: Stats;
  /** Prompt tokens looked up in the prefix cache and found there (counted runs only). */
  queryTokens: number;
  hitTokens: number;
}

export interface PrefixResults {
  runs: number;
  systemBytes: number;
  /** Prompt tokens per request (mean over the counted ones). */
  promptTokens: number;
  cached: PrefixSide;
  uncached: PrefixSide;
}

async function metricValue(base: string, name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  return Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1] ?? Number.NaN);
}

export async function runPrefix(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<PrefixResults> {
  const modelDir = await ensureMiniModel(o.log);
  const system = promptText(SYSTEM_BYTES);
  const children: ChildProcess[] = [];
  try {
    const start = (name: string, extra: string[]) =>
      localGateway(name, modelDir, ["--max-batch-tokens=2048", ...extra], children);
    o.log("[prefix] starting two gateways on mini-v3 (with and without --prefix-caching)");
    const [cached, uncached] = await Promise.all([
      start("gateway-cached", ["--prefix-caching"]),
      start("gateway-uncached", ["--no-prefix-caching"]),
    ]);
    const questions = o.quick ? PROMPTS.slice(0, 2) : PROMPTS;
    const sides = { cached, uncached };
    const ttft = { cached: [] as number[], uncached: [] as number[] };
    const total = { cached: [] as number[], uncached: [] as number[] };
    const before = {
      queries: await metricValue(cached, "expertmesh_gateway_prefix_cache_queries"),
      hits: 0,
    };
    for (let run = -2; run < o.runs; run++) {
      if (run === 0) {
        before.queries = await metricValue(cached, "expertmesh_gateway_prefix_cache_queries");
        before.hits = await metricValue(cached, "expertmesh_gateway_prefix_cache_hits");
      }
      for (const [i, q] of questions.entries()) {
        const order =
          (run + i) % 2 ? (["cached", "uncached"] as const) : (["uncached", "cached"] as const);
        for (const side of order) {
          // Another question every pass: only the system prompt is shared, not a whole prompt
          // seen in an earlier pass.
          const r = await chat(sides[side], `Pass ${run + 3}: ${q}`, MAX_TOKENS, system);
          if (!r.ok || r.tokens !== MAX_TOKENS)
            throw new Error(`${side}: request failed: ${r.error ?? `${r.tokens} tokens`}`);
          if (run < 0) continue;
          ttft[side].push(r.ttftMs);
          total[side].push(r.totalMs);
        }
      }
      o.log(`[prefix] pass ${run + 1 > 0 ? `${run + 1}/${o.runs}` : "warm-up"} done`);
    }
    const queries =
      (await metricValue(cached, "expertmesh_gateway_prefix_cache_queries")) - before.queries;
    const hits = (await metricValue(cached, "expertmesh_gateway_prefix_cache_hits")) - before.hits;
    const uncachedQueries = await metricValue(uncached, "expertmesh_gateway_prefix_cache_queries");
    const requests = o.runs * questions.length;
    return {
      runs: o.runs,
      systemBytes: SYSTEM_BYTES,
      promptTokens: Math.round(queries / requests),
      cached: {
        ttftMs: stats(ttft.cached),
        totalMs: stats(total.cached),
        queryTokens: queries,
        hitTokens: hits,
      },
      uncached: {
        ttftMs: stats(ttft.uncached),
        totalMs: stats(total.uncached),
        queryTokens: uncachedQueries,
        hitTokens: 0,
      },
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
  }
}

const ms = (s: Stats) => medianRange(s, 1);

/** The suite's table for BENCHMARKS.md. */
export function prefixTables(
  r: PrefixResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const c = r.cached;
  const u = r.uncached;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process, one request at a time, ${r.runs} passes over the questions after 2 warm-up passes, the two gateways alternating; from \`${source}\`. Requests: a ${r.systemBytes}-byte system prompt shared by all, a short question, ${MAX_TOKENS} tokens generated; ~${r.promptTokens} prompt tokens each. Milliseconds, median (min-max) over the requests.

| gateway | time to first token | whole request | prompt tokens found in the cache |
|---|---:|---:|---:|
| \`--no-prefix-caching\` (peer) | ${ms(u.ttftMs)} | ${ms(u.totalMs)} | - |
| \`--prefix-caching\` (the default) | ${ms(c.ttftMs)} | ${ms(c.totalMs)} | ${c.hitTokens} of ${c.queryTokens} (${((100 * c.hitTokens) / c.queryTokens).toFixed(1)} %) |
| cached / peer | ${(c.ttftMs.median / u.ttftMs.median).toFixed(3)}x | ${(c.totalMs.median / u.totalMs.median).toFixed(3)}x | |`;
}
