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
//
// A third gateway has the disk tier (`--prefix-cache-disk`, ADR 0019) under a pool that
// holds one sequence of 1,536 tokens: before each of its timed requests, two other long
// prompts (untimed) take every block of the pool, so the system prompt's blocks come back
// from disk rather than from the pool. Its /metrics say how many did.
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bytesPerBlock } from "../src/engine/kv-blocks.ts";
import { readModelConfig } from "../src/model/config.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import { chat, ensureMiniModel, localGateway, metricValue, PROMPTS, stop } from "./serve.ts";
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
  /** Of hitTokens, those read back from the disk tier (the disk side only). */
  diskHitTokens?: number;
}

/** The disk side's context (and pool: one sequence of it). */
const DISK_CONTEXT = 1536;
/** Bytes of each evicting prompt: ~1,340 tokens, so two of them take the whole pool. */
const EVICT_BYTES = 2200;

export interface PrefixResults {
  runs: number;
  systemBytes: number;
  /** Prompt tokens per request (mean over the counted ones). */
  promptTokens: number;
  cached: PrefixSide;
  uncached: PrefixSide;
  /** The disk tier under a pool that forgets between requests (absent in older results). */
  disk?: PrefixSide;
}

export async function runPrefix(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<PrefixResults> {
  const modelDir = await ensureMiniModel(o.log);
  const system = promptText(SYSTEM_BYTES);
  const children: ChildProcess[] = [];
  const diskDir = mkdtempSync(join(tmpdir(), "em-bench-prefix-disk-"));
  try {
    const start = (name: string, extra: string[]) =>
      localGateway(name, modelDir, ["--max-batch-tokens=2048", ...extra], children);
    const config = readModelConfig(modelDir);
    const poolBytes = (DISK_CONTEXT / 16) * bytesPerBlock(config, 16);
    o.log(
      "[prefix] starting three gateways on mini-v3 (without and with --prefix-caching, and with its disk tier)",
    );
    const [cached, uncached, disk] = await Promise.all([
      start("gateway-cached", ["--prefix-caching"]),
      start("gateway-uncached", ["--no-prefix-caching"]),
      start("gateway-disk", [
        "--prefix-caching",
        `--max-model-len=${DISK_CONTEXT}`,
        `--kv-cache-bytes=${poolBytes}`,
        `--prefix-cache-disk=${diskDir}`,
      ]),
    ]);
    const evicting = [1, 2].map((k) => `Story ${k}. ${promptText(EVICT_BYTES + k * 7)}`);
    const questions = o.quick ? PROMPTS.slice(0, 2) : PROMPTS;
    const sides = { cached, uncached, disk };
    type Side = keyof typeof sides;
    const ttft: Record<Side, number[]> = { cached: [], uncached: [], disk: [] };
    const total: Record<Side, number[]> = { cached: [], uncached: [], disk: [] };
    const counters = async () => ({
      queries: await metricValue(cached, "expertmesh_gateway_prefix_cache_queries"),
      hits: await metricValue(cached, "expertmesh_gateway_prefix_cache_hits"),
      diskQueries: await metricValue(disk, "expertmesh_gateway_prefix_cache_queries"),
      diskHits: await metricValue(disk, "expertmesh_gateway_prefix_cache_hits"),
      diskFromDisk: await metricValue(disk, "expertmesh_gateway_prefix_cache_disk_hits"),
    });
    let before = await counters();
    /** The disk side's untimed requests and their prompt tokens (left out of its counts). */
    const evicted = { queries: 0, hits: 0, fromDisk: 0 };
    for (let run = -2; run < o.runs; run++) {
      if (run === 0) before = await counters();
      for (const [i, q] of questions.entries()) {
        const sides3: Side[] = ["uncached", "cached", "disk"];
        const order = [0, 1, 2].map((k) => sides3[(run + i + k + 3) % 3]!);
        for (const side of order) {
          if (side === "disk") {
            // Take the pool's blocks: the system prompt's go to disk.
            const at = await counters();
            for (const e of evicting) {
              const r = await chat(disk, "Go on.", 1, e);
              if (!r.ok) throw new Error(`disk: evicting request failed: ${r.error}`);
            }
            const after = await counters();
            if (run >= 0) {
              evicted.queries += after.diskQueries - at.diskQueries;
              evicted.hits += after.diskHits - at.diskHits;
              evicted.fromDisk += after.diskFromDisk - at.diskFromDisk;
            }
          }
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
    const end = await counters();
    const queries = end.queries - before.queries;
    const hits = end.hits - before.hits;
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
      disk: {
        ttftMs: stats(ttft.disk),
        totalMs: stats(total.disk),
        queryTokens: end.diskQueries - before.diskQueries - evicted.queries,
        hitTokens: end.diskHits - before.diskHits - evicted.hits,
        diskHitTokens: end.diskFromDisk - before.diskFromDisk - evicted.fromDisk,
      },
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
    rmSync(diskDir, { recursive: true, force: true });
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
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process, one request at a time, ${r.runs} passes over the questions after 2 warm-up passes, the ${r.disk ? "three" : "two"} gateways alternating; from \`${source}\`. Requests: a ${r.systemBytes}-byte system prompt shared by all, a short question, ${MAX_TOKENS} tokens generated; ~${r.promptTokens} prompt tokens each. Milliseconds, median (min-max) over the requests.

| gateway | time to first token | whole request | prompt tokens found in the cache |
|---|---:|---:|---:|
| \`--no-prefix-caching\` (peer) | ${ms(u.ttftMs)} | ${ms(u.totalMs)} | - |
| \`--prefix-caching\` (the default) | ${ms(c.ttftMs)} | ${ms(c.totalMs)} | ${c.hitTokens} of ${c.queryTokens} (${((100 * c.hitTokens) / c.queryTokens).toFixed(1)} %) |
| cached / peer | ${(c.ttftMs.median / u.ttftMs.median).toFixed(3)}x | ${(c.totalMs.median / u.totalMs.median).toFixed(3)}x | |${diskRows(r)}`;
}

/** The disk tier's rows, when the results have its side. */
function diskRows(r: PrefixResults): string {
  const d = r.disk;
  if (!d) return "";
  const u = r.uncached;
  const c = r.cached;
  return `
| \`--prefix-cache-disk\`, pool emptied before each request | ${ms(d.ttftMs)} | ${ms(d.totalMs)} | ${d.hitTokens} of ${d.queryTokens} (${((100 * d.hitTokens) / d.queryTokens).toFixed(1)} %), ${d.diskHitTokens} of them from disk |
| disk / peer | ${(d.ttftMs.median / u.ttftMs.median).toFixed(3)}x | ${(d.totalMs.median / u.totalMs.median).toFixed(3)}x | |
| disk / cached | ${(d.ttftMs.median / c.ttftMs.median).toFixed(3)}x | ${(d.totalMs.median / c.totalMs.median).toFixed(3)}x | |`;
}
