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
// prefix request's time to first token. Then again with the gateways' reads throttled to
// 128 MiB/s by a cgroup (root only): a network volume's speed, where a read in the step
// stalls every stream for longer.
import { type ChildProcess, execSync } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  realpathSync,
  rmdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { bytesPerBlock } from "../src/engine/kv-blocks.ts";
import { readModelConfig } from "../src/model/config.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import { chat, ensureMiniModel, localGateway, metricValue, stop } from "./serve.ts";
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

/** One disk: this machine's, or its reads throttled (a slower volume). */
export interface DiskReadConfig {
  /** The gateways' read limit in bytes/s (a blkio/io cgroup), or null: the disk's own speed. */
  readBps: number | null;
  /** Whether the page cache was dropped before each read (the files came from the disk). */
  coldCache: boolean;
  readAhead: DiskReadSide;
  inStep: DiskReadSide;
}

export interface DiskReadResults {
  runs: number;
  /** Prompt tokens of the prefix request read back from disk, and their files' bytes, per round. */
  prefixTokens: number;
  readBytes: number;
  disks: DiskReadConfig[];
}

/** The throttled disk's read speed: a network volume's baseline (EBS gp3: 125 MB/s). */
const THROTTLED_BPS = 128 * 2 ** 20;

/** The whole block device ("major:minor") holding `path` (a partition's disk). */
function blockDevice(path: string): string {
  const dev = statSync(path).dev;
  // Linux's encoding of dev_t.
  const major = (dev >> 8) & 0xfff;
  const minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
  const sys = `/sys/dev/block/${major}:${minor}`;
  if (existsSync(join(sys, "partition")))
    return readFileSync(join(realpathSync(sys), "..", "dev"), "utf8").trim();
  return `${major}:${minor}`;
}

/**
 * Limits the reads of processes `pids` from the disk holding `dir` to `bps` bytes/s, with a
 * cgroup (v1 blkio, or v2 io); resolves a function that lifts it, or null where that is
 * not possible (not root, no such controller).
 */
function throttleReads(pids: number[], dir: string, bps: number): (() => void) | null {
  let dev: string;
  try {
    dev = blockDevice(dir);
  } catch {
    return null;
  }
  const v1 = "/sys/fs/cgroup/blkio";
  const v2 = "/sys/fs/cgroup";
  const name = `em-bench-diskread-${process.pid}`;
  const setups: { root: string; limit: () => void }[] = [
    {
      root: v1,
      limit: () => writeFileSync(join(v1, name, "blkio.throttle.read_bps_device"), `${dev} ${bps}`),
    },
    {
      root: v2,
      limit: () => {
        writeFileSync(join(v2, "cgroup.subtree_control"), "+io");
        writeFileSync(join(v2, name, "io.max"), `${dev} rbps=${bps}`);
      },
    },
  ];
  for (const { root, limit } of setups) {
    const group = join(root, name);
    try {
      if (!existsSync(join(root, "cgroup.procs"))) continue;
      mkdirSync(group);
      limit();
      for (const pid of pids) writeFileSync(join(group, "cgroup.procs"), String(pid));
      return () => {
        for (const pid of pids) {
          try {
            writeFileSync(join(root, "cgroup.procs"), String(pid));
          } catch {
            // gone
          }
        }
        try {
          rmdirSync(group);
        } catch {
          // left for the system to clear
        }
      };
    } catch {
      try {
        rmdirSync(group);
      } catch {
        // never made
      }
    }
  }
  return null;
}

/** Drops the page cache (needs root); false when not allowed. */
export function dropPageCache(): boolean {
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
    const counters = async (base: string) => ({
      fromDisk: await metricValue(base, "expertmesh_gateway_prefix_cache_disk_hits"),
      ahead: await metricValue(base, "expertmesh_gateway_prefix_cache_disk_read_ahead"),
    });
    const rounds = o.quick ? 2 : o.runs;
    /** `rounds` counted rounds per side (after `warmUp` uncounted ones), alternating. */
    const measure = async (label: string, warmUp: number) => {
      const ttft: Record<Side, number[]> = { readAhead: [], inStep: [] };
      const maxGap: Record<Side, number[]> = { readAhead: [], inStep: [] };
      const medGap: Record<Side, number[]> = { readAhead: [], inStep: [] };
      /** Of the prefix requests alone (the evicting ones read from disk too). */
      const fromDisk: Record<Side, number> = { readAhead: 0, inStep: 0 };
      const ahead: Record<Side, number> = { readAhead: 0, inStep: 0 };
      let cold = true;
      for (let run = -warmUp; run < rounds; run++) {
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
          if (!hit.ok || !s.ok || s.tokens !== DECODE_TOKENS)
            throw new Error(
              `${side}: request failed: ${hit.error ?? s.error ?? `${s.tokens} tokens`}`,
            );
          if (run < 0) continue;
          fromDisk[side] += after.fromDisk - at.fromDisk;
          ahead[side] += after.ahead - at.ahead;
          ttft[side].push(hit.ttftMs);
          maxGap[side].push(Math.max(...s.gapsMs));
          medGap[side].push(stats(s.gapsMs).median);
        }
        o.log(
          `[diskread] ${label}: round ${run + 1 > 0 ? `${run + 1}/${rounds}` : "warm-up"} done`,
        );
      }
      // Read ahead only happens next to a running stream: a stream that ended first would
      // make both sides read in the step. (A block whose write was still running is read
      // from its copy in memory, not read ahead: a few.)
      if (ahead.readAhead * 16 < 0.9 * fromDisk.readAhead || fromDisk.readAhead === 0)
        throw new Error(
          `diskread: ${ahead.readAhead} blocks read ahead of ${fromDisk.readAhead / 16} read back: the stream was not running`,
        );
      const side = (s: Side): DiskReadSide => ({
        ttftMs: stats(ttft[s]),
        maxGapMs: stats(maxGap[s]),
        medianGapMs: stats(medGap[s]),
        diskHitTokens: fromDisk[s],
        readAheadBlocks: ahead[s],
      });
      return {
        coldCache: cold,
        readAhead: side("readAhead"),
        inStep: side("inStep"),
        tokensPerRound: fromDisk.readAhead / rounds,
      };
    };
    // The first warm-up round computes the prefix (written to disk when evicted).
    const local = await measure("this machine's disk", 1);
    const disks: DiskReadConfig[] = [
      {
        readBps: null,
        coldCache: local.coldCache,
        readAhead: local.readAhead,
        inStep: local.inStep,
      },
    ];
    const pids = children.map((c) => c.pid!);
    const release = throttleReads(pids, dirs[0]!, THROTTLED_BPS);
    if (release) {
      try {
        const slow = await measure(`reads throttled to ${THROTTLED_BPS / 2 ** 20} MiB/s`, 0);
        disks.push({
          readBps: THROTTLED_BPS,
          coldCache: slow.coldCache,
          readAhead: slow.readAhead,
          inStep: slow.inStep,
        });
      } finally {
        release();
      }
    } else o.log("[diskread] no throttled reads here (needs root and a blkio or io cgroup)");
    return {
      runs: rounds,
      prefixTokens: local.tokensPerRound,
      readBytes: (local.tokensPerRound / 16) * (blockBytes + 48),
      disks,
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
  const row = (name: string, s: DiskReadSide) =>
    `| ${name} | ${ms(s.ttftMs)} | ${ms(s.maxGapMs)} | ${ms(s.medianGapMs)} | ${s.diskHitTokens} tokens, ${s.readAheadBlocks} blocks read ahead |`;
  const table = (d: DiskReadConfig) => {
    const a = d.readAhead;
    const p = d.inStep;
    const disk =
      d.readBps === null
        ? "This machine's disk"
        : `Reads throttled to ${(d.readBps / 2 ** 20).toFixed(0)} MiB/s (a cgroup read limit on the gateways: a network volume's speed)`;
    return `${disk}, ${d.coldCache ? "the page cache dropped before each read (cold reads)" : "**from the page cache** (it could not be dropped: not root)"}:

| gateway | prefix request: time to first token | stream: largest gap | stream: median gap | from disk (counted rounds) |
|---|---:|---:|---:|---:|
${row("files read in the step (peer)", p)}
${row("files read ahead (the default)", a)}
| read ahead / peer | ${(a.ttftMs.median / p.ttftMs.median).toFixed(3)}x | ${(a.maxGapMs.median / p.maxGapMs.median).toFixed(3)}x | ${(a.medianGapMs.median / p.medianGapMs.median).toFixed(3)}x | |`;
  };
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process, ${r.runs} rounds per gateway and disk, the two gateways alternating; from \`${source}\`. Each round: ~${Math.round(r.prefixTokens)} prefix tokens (${(r.readBytes / 2 ** 20).toFixed(1)} MiB of block files) read back from disk while a stream decodes ${DECODE_TOKENS} tokens. Milliseconds, median (min-max) over the rounds.

${r.disks.map(table).join("\n\n")}`;
}
