// The diskread suite (`npm run bench -- --suite diskread`): what reading the prefix cache's
// disk tier ahead (ADR 0019) saves the streams already running when a prompt's prefix comes
// back from disk.
//
// Two single-process gateways on the mini V3 checkpoint with `--prefix-cache-disk` under a
// pool of one ~3,300-token sequence, up at once: one reads the files ahead, off the step (the
// default), the peer reads them in the step (EXPERTMESH_PREFIX_DISK_READ_AHEAD=0, what the
// tier did before). Per round and gateway, one at a time:
//   1. an untimed prompt as long as the pool takes every block of it, so the ~3,000-token
//      shared prefix's blocks are on disk only;
//   2. the page cache is dropped (root only; else the files are read from the page cache,
//      and the results say so);
//   3. a streaming request with a short prompt decodes DECODE_TOKENS tokens; once it has
//      streamed for a while, a request with the long prefix and a short question arrives
//      (1 token generated), and its prefix is read back from disk.
// Measured: the stream's largest gap between two tokens (the step that admitted the prefix,
// and so the read when it is in the step), its median gap (a plain decode step), and the
// prefix request's time to first token.
import { type ChildProcess, execSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { bytesPerBlock } from "../src/engine/kv-blocks.ts";
import { readModelConfig } from "../src/model/config.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import { chat, ensureMiniModel, localGateway, stop } from "./serve.ts";
import { promptText } from "./tokenize.ts";

/** Bytes of the shared prefix: ~3,000 tokens of the tiny tokenizer. */
const PREFIX_BYTES = 4200;
/** The pool (and context) of each gateway: the prefix, the question, and the stream. */
const CONTEXT = 3328;
/** Bytes of the evicting prompt: about the whole pool. */
const EVICT_BYTES = 4500;
const DECODE_TOKENS = 160;
/** How long the stream runs before the prefix request arrives (it runs ~2 s more). */
const ARRIVE_AFTER_MS = 500;

export interface DiskReadSide {
  /** The prefix request's time to first token. */
  ttftMs: Stats;
  /** The running stream's largest and median gap between tokens, one value per round. */
  maxGapMs: Stats;
  medianGapMs: Stats;
  /** From /metrics, the prefix requests of the counted rounds. */
  diskHitTokens: number;
  readAheadBlocks: number;
}

export interface DiskReadResults {
  runs: number;
  /** Prompt tokens of the prefix request read back from disk, and their files' bytes, per round. */
  prefixTokens: number;
  readBytes: number;
  /** Whether the page cache was dropped before each read (the files came from the disk). */
  coldCache: boolean;
  readAhead: DiskReadSide;
  inStep: DiskReadSide;
}

async function metricValue(base: string, name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  return Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1] ?? Number.NaN);
}

/** Drops the page cache (needs root); false when not allowed. */
function dropPageCache(): boolean {
  try {
    writeFileSync("/proc/sys/vm/drop_caches", "1");
    return true;
  } catch {
    return false;
  }
}

export async function runDiskRead(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<DiskReadResults> {
  const modelDir = await ensureMiniModel(o.log);
  const config = readModelConfig(modelDir);
  const blockBytes = bytesPerBlock(config, 16);
  const prefix = promptText(PREFIX_BYTES);
  const evict = `Story. ${promptText(EVICT_BYTES + 11)}`;
  const children: ChildProcess[] = [];
  const dirs = [0, 1].map(() => mkdtempSync(join(tmpdir(), "em-bench-diskread-")));
  try {
    const args = (dir: string) => [
      "--prefix-caching",
      "--max-batch-tokens=2048",
      `--max-model-len=${CONTEXT}`,
      `--kv-cache-bytes=${(CONTEXT / 16) * blockBytes}`,
      `--prefix-cache-disk=${dir}`,
    ];
    o.log("[diskread] starting two gateways on mini-v3 with the disk tier (read ahead, in step)");
    const readAhead = await localGateway("gateway-read-ahead", modelDir, args(dirs[0]!), children);
    // The peer: the same flags, the files read in the step.
    process.env["EXPERTMESH_PREFIX_DISK_READ_AHEAD"] = "0";
    let inStep: string;
    try {
      inStep = await localGateway("gateway-in-step", modelDir, args(dirs[1]!), children);
    } finally {
      delete process.env["EXPERTMESH_PREFIX_DISK_READ_AHEAD"];
    }
    const sides = { readAhead, inStep };
    type Side = keyof typeof sides;
    const ttft: Record<Side, number[]> = { readAhead: [], inStep: [] };
    const maxGap: Record<Side, number[]> = { readAhead: [], inStep: [] };
    const medGap: Record<Side, number[]> = { readAhead: [], inStep: [] };
    const counters = async (base: string) => ({
      fromDisk: await metricValue(base, "expertmesh_gateway_prefix_cache_disk_hits"),
      ahead: await metricValue(base, "expertmesh_gateway_prefix_cache_disk_read_ahead"),
    });
    /** Of the prefix requests alone (the evicting ones read from disk too). */
    const fromDisk: Record<Side, number> = { readAhead: 0, inStep: 0 };
    const ahead: Record<Side, number> = { readAhead: 0, inStep: 0 };
    let cold = true;
    const rounds = o.quick ? 2 : o.runs;
    // Round -1 computes the prefix once (and writes it to disk when evicted); not counted.
    for (let run = -1; run < rounds; run++) {
      const order: Side[] = run % 2 === 0 ? ["readAhead", "inStep"] : ["inStep", "readAhead"];
      for (const side of order) {
        const base = sides[side];
        const e = await chat(base, "Go on.", 1, evict);
        if (!e.ok) throw new Error(`${side}: evicting request failed: ${e.error}`);
        // The evicted blocks' writes end in the background: let them, then flush and drop.
        await sleep(500);
        execSync("sync");
        cold = dropPageCache() && cold;
        const stream = chat(base, `Round ${run + 2}: count to a hundred.`, DECODE_TOKENS);
        await sleep(ARRIVE_AFTER_MS);
        const at = await counters(base);
        const hit = await chat(base, `Round ${run + 2}: and then?`, 1, prefix);
        const s = await stream;
        const after = await counters(base);
        if (run >= 0) {
          fromDisk[side] += after.fromDisk - at.fromDisk;
          ahead[side] += after.ahead - at.ahead;
        }
        if (!hit.ok || !s.ok || s.tokens !== DECODE_TOKENS)
          throw new Error(
            `${side}: request failed: ${hit.error ?? s.error ?? `${s.tokens} tokens`}`,
          );
        if (run < 0) continue;
        ttft[side].push(hit.ttftMs);
        maxGap[side].push(Math.max(...s.gapsMs));
        medGap[side].push(stats(s.gapsMs).median);
      }
      o.log(`[diskread] round ${run + 1 > 0 ? `${run + 1}/${rounds}` : "warm-up"} done`);
    }
    const side = (s: Side): DiskReadSide => ({
      ttftMs: stats(ttft[s]),
      maxGapMs: stats(maxGap[s]),
      medianGapMs: stats(medGap[s]),
      diskHitTokens: fromDisk[s],
      readAheadBlocks: ahead[s],
    });
    // Read ahead only happens next to a running stream: a stream that ended first would make
    // both sides read in the step. (A block whose write was still running is read from its
    // copy in memory, not read ahead: a few.)
    if (ahead.readAhead * 16 < 0.9 * fromDisk.readAhead || fromDisk.readAhead === 0)
      throw new Error(
        `diskread: ${ahead.readAhead} blocks read ahead of ${fromDisk.readAhead / 16} read back: the stream was not running`,
      );
    const perRound = fromDisk.readAhead / rounds;
    return {
      runs: rounds,
      prefixTokens: perRound,
      readBytes: (perRound / 16) * (blockBytes + 48),
      coldCache: cold,
      readAhead: side("readAhead"),
      inStep: side("inStep"),
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
}

const ms = (s: Stats) => medianRange(s, 1);

/** The suite's table for BENCHMARKS.md. */
export function diskReadTables(
  r: DiskReadResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const a = r.readAhead;
  const p = r.inStep;
  const row = (name: string, s: DiskReadSide) =>
    `| ${name} | ${ms(s.ttftMs)} | ${ms(s.maxGapMs)} | ${ms(s.medianGapMs)} | ${s.diskHitTokens} tokens, ${s.readAheadBlocks} blocks read ahead |`;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process, ${r.runs} rounds per gateway, the two alternating; from \`${source}\`. Each round: ~${Math.round(r.prefixTokens)} prefix tokens (${(r.readBytes / 2 ** 20).toFixed(1)} MiB of block files) read back from disk ${r.coldCache ? "with the page cache dropped first (cold reads)" : "**from the page cache** (it could not be dropped: not root)"} while a stream decodes ${DECODE_TOKENS} tokens. Milliseconds, median (min-max) over the rounds.

| gateway | prefix request: time to first token | stream: largest gap | stream: median gap | from disk (counted rounds) |
|---|---:|---:|---:|---:|
${row("files read in the step (peer)", p)}
${row("files read ahead (the default)", a)}
| read ahead / peer | ${(a.ttftMs.median / p.ttftMs.median).toFixed(3)}x | ${(a.maxGapMs.median / p.maxGapMs.median).toFixed(3)}x | ${(a.medianGapMs.median / p.medianGapMs.median).toFixed(3)}x | |`;
}
