// The diskshared suite (`npm run bench -- --suite diskshared`): what a disk tier shared by
// gateways (--prefix-cache-disk-shared, ADR 0019's addendum) saves a gateway that gets a
// prompt another gateway computed, and what writing every computed block costs the one that
// computes it.
//
// Three single-process gateways on the mini V3 checkpoint: two share one disk tier folder
// (`writer` and `reader`), the peer has none. Each round takes a new long prompt (a system
// message of ~2,400 tokens whose first words name the round, so that no block is shared
// with an earlier round), one gateway at a time:
//   1. the writer answers it (1 token): it computes the prompt and writes its blocks as it
//      computes them (write-through);
//   2. once those writes have ended, the page cache is dropped (root only; else the reader
//      reads the page cache, and the results say so): a network volume's other client;
//   3. the reader answers it: its blocks come from the writer's files;
//   4. the peer answers it: it computes the prompt, as the reader would without the tier.
// Measured: each answer's time to first token (all three alone on the machine).
import { type ChildProcess, execSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { dropPageCache } from "./disk-read.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import { chat, ensureMiniModel, localGateway, metricValue, stop } from "./serve.ts";
import { promptText } from "./tokenize.ts";

/** Bytes of each round's prompt: ~2,400 tokens of the tiny tokenizer. */
const PROMPT_BYTES = 4200;
const CONTEXT = 4096;

export interface DiskSharedResults {
  runs: number;
  /** Prompt tokens the reader took from the writer's files, per round. */
  sharedTokens: number;
  /** Whether the page cache was dropped before each of the reader's reads. */
  coldCache: boolean;
  /** Times to first token (ms) of the writer, the reader and the peer. */
  writerTtftMs: Stats;
  readerTtftMs: Stats;
  peerTtftMs: Stats;
}

export async function runDiskShared(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<DiskSharedResults> {
  const modelDir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  const folder = mkdtempSync(join(tmpdir(), "em-bench-diskshared-"));
  try {
    const common = ["--prefix-caching", "--max-batch-tokens=2048", `--max-model-len=${CONTEXT}`];
    const shared = [`--prefix-cache-disk=${folder}`, "--prefix-cache-disk-shared"];
    o.log("[diskshared] starting three gateways on mini-v3: two sharing a disk tier, a peer");
    const writer = await localGateway("gateway-writer", modelDir, [...common, ...shared], children);
    const reader = await localGateway("gateway-reader", modelDir, [...common, ...shared], children);
    const peer = await localGateway("gateway-peer", modelDir, common, children);
    const written = () => metricValue(writer, "expertmesh_gateway_prefix_cache_disk_written");
    const hits = () => metricValue(reader, "expertmesh_gateway_prefix_cache_disk_hits");
    const rounds = o.quick ? 2 : o.runs;
    const ttft = { writer: [] as number[], reader: [] as number[], peer: [] as number[] };
    let sharedTokens = 0;
    let cold = true;
    // One uncounted round first: each gateway's first request pays for warming up.
    for (let run = -1; run < rounds; run++) {
      const system = `Round ${run + 2} of the shared cache bench. ${promptText(PROMPT_BYTES)}`;
      const ask = async (base: string, who: string) => {
        const r = await chat(base, "Go on.", 1, system);
        if (!r.ok) throw new Error(`diskshared: the ${who}'s request failed: ${r.error}`);
        return r.ttftMs;
      };
      const w = await ask(writer, "writer");
      // The writes end in the background: until the count stops growing.
      let seen = -1;
      for (let n = await written(); n !== seen; n = await written()) {
        seen = n;
        await sleep(300);
      }
      execSync("sync");
      cold = dropPageCache() && cold;
      const before = await hits();
      const r = await ask(reader, "reader");
      const got = (await hits()) - before;
      const p = await ask(peer, "peer");
      if (got === 0) throw new Error("diskshared: the reader found none of the writer's blocks");
      if (run >= 0) {
        ttft.writer.push(w);
        ttft.reader.push(r);
        ttft.peer.push(p);
        sharedTokens += got;
      }
      o.log(`[diskshared] round ${run >= 0 ? `${run + 1}/${rounds}` : "warm-up"} done`);
    }
    return {
      runs: rounds,
      sharedTokens: sharedTokens / rounds,
      coldCache: cold,
      writerTtftMs: stats(ttft.writer),
      readerTtftMs: stats(ttft.reader),
      peerTtftMs: stats(ttft.peer),
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
    rmSync(folder, { recursive: true, force: true });
  }
}

const ms = (s: Stats) => medianRange(s, 1);

/** The suite's table for BENCHMARKS.md. */
export function diskSharedTables(
  r: DiskSharedResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const p = r.peerTtftMs.median;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process gateways, ${r.runs} rounds, a new ~2,400-token prompt each; from \`${source}\`. The reader took ~${Math.round(r.sharedTokens)} prompt tokens a round from the writer's files, ${r.coldCache ? "the page cache dropped before its read (cold reads)" : "**from the page cache** (it could not be dropped: not root)"}. Time to first token in milliseconds, median (min-max) over the rounds.

| gateway | what it does with the prompt | time to first token | / peer |
|---|---|---:|---:|
| writer | computes it, writing each block to the shared folder as it is computed | ${ms(r.writerTtftMs)} | ${(r.writerTtftMs.median / p).toFixed(3)}x |
| reader | reads its blocks from the writer's files | ${ms(r.readerTtftMs)} | ${(r.readerTtftMs.median / p).toFixed(3)}x |
| peer (no disk tier) | computes it | ${ms(r.peerTtftMs)} | 1.000x |`;
}
