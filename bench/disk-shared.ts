// The diskshared suite (`npm run bench -- --suite diskshared`): what a tier shared by
// gateways saves a gateway that gets a prompt another gateway computed, and what writing
// every computed block costs the one that computes it: a disk tier on a shared folder
// (--prefix-cache-disk-shared, ADR 0019's addendum) and the NATS tier (--prefix-cache-remote,
// a JetStream bucket on a nats-server on loopback, ADR 0028).
//
// Five single-process gateways on the mini V3 checkpoint: two share one disk tier folder
// (`writer` and `reader`), two share one bucket (`nats writer` and `nats reader`), the peer
// has neither. Each round takes a new long prompt (a system message of ~2,400 tokens whose
// first words name the round, so that no block is shared with an earlier round), one gateway
// at a time:
//   1. the writer answers it (1 token): it computes the prompt and writes its blocks as it
//      computes them (write-through);
//   2. once those writes have ended, the page cache is dropped (root only; else the reader
//      reads the page cache, and the results say so): a network volume's other client;
//   3. the reader answers it: its blocks come from the writer's files;
//   4. the NATS writer and then the NATS reader answer it, as 1 and 3 (the reader once its
//      watch has seen the writer's blocks);
//   5. the peer answers it: it computes the prompt, as the readers would without a tier.
// Measured: each answer's time to first token (each alone on the machine).
import { type ChildProcess, execSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { startNats } from "../test/env/nats.ts";
import { binaries } from "../test/env/paths.ts";
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
  /** The NATS tier's pair (absent from runs before it). */
  nats?: { sharedTokens: number; writerTtftMs: Stats; readerTtftMs: Stats };
}

export async function runDiskShared(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<DiskSharedResults> {
  const modelDir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  const folder = mkdtempSync(join(tmpdir(), "em-bench-diskshared-"));
  const nats = await startNats(binaries().natsServer, join(folder, "nats"), folder);
  try {
    const common = ["--prefix-caching", "--max-batch-tokens=2048", `--max-model-len=${CONTEXT}`];
    const shared = [`--prefix-cache-disk=${folder}/disk`, "--prefix-cache-disk-shared"];
    const bucket = [`--nats=${nats.info.url}`, "--prefix-cache-remote=bench"];
    o.log(
      "[diskshared] starting five gateways on mini-v3: two sharing a disk tier, two a NATS bucket, a peer",
    );
    const writer = await localGateway("gateway-writer", modelDir, [...common, ...shared], children);
    const reader = await localGateway("gateway-reader", modelDir, [...common, ...shared], children);
    const natsWriter = await localGateway(
      "gateway-nats-writer",
      modelDir,
      [...common, ...bucket],
      children,
    );
    const natsReader = await localGateway(
      "gateway-nats-reader",
      modelDir,
      [...common, ...bucket],
      children,
    );
    const peer = await localGateway("gateway-peer", modelDir, common, children);
    const metric = (g: string, name: string) => () =>
      metricValue(g, `expertmesh_gateway_prefix_cache_${name}`);
    const written = metric(writer, "disk_written");
    const hits = metric(reader, "disk_hits");
    const natsWritten = metric(natsWriter, "remote_written");
    const natsSeen = metric(natsReader, "remote_blocks");
    const natsHits = metric(natsReader, "remote_hits");
    /** Waits until `count` stops growing (writes that end in the background). */
    const settled = async (count: () => Promise<number>) => {
      let seen = -1;
      for (let n = await count(); n !== seen; n = await count()) {
        seen = n;
        await sleep(300);
      }
      return seen;
    };
    const rounds = o.quick ? 2 : o.runs;
    const ttft = {
      writer: [] as number[],
      reader: [] as number[],
      natsWriter: [] as number[],
      natsReader: [] as number[],
      peer: [] as number[],
    };
    let sharedTokens = 0;
    let natsTokens = 0;
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
      await settled(written);
      execSync("sync");
      cold = dropPageCache() && cold;
      const before = await hits();
      const r = await ask(reader, "reader");
      const got = (await hits()) - before;
      if (got === 0) throw new Error("diskshared: the reader found none of the writer's blocks");
      const nw = await ask(natsWriter, "NATS writer");
      const blocks = await settled(natsWritten);
      // The reader's watch has seen them all (it knows every block of the rounds so far).
      while ((await natsSeen()) < blocks) await sleep(50);
      const natsBefore = await natsHits();
      const nr = await ask(natsReader, "NATS reader");
      const natsGot = (await natsHits()) - natsBefore;
      if (natsGot === 0)
        throw new Error("diskshared: the NATS reader found none of the NATS writer's blocks");
      const p = await ask(peer, "peer");
      if (run >= 0) {
        ttft.writer.push(w);
        ttft.reader.push(r);
        ttft.natsWriter.push(nw);
        ttft.natsReader.push(nr);
        ttft.peer.push(p);
        sharedTokens += got;
        natsTokens += natsGot;
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
      nats: {
        sharedTokens: natsTokens / rounds,
        writerTtftMs: stats(ttft.natsWriter),
        readerTtftMs: stats(ttft.natsReader),
      },
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
    await nats.process.stop();
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
${
  r.nats
    ? `| NATS writer | computes it, writing each block to a JetStream bucket (nats-server on loopback) as it is computed | ${ms(r.nats.writerTtftMs)} | ${(r.nats.writerTtftMs.median / p).toFixed(3)}x |
| NATS reader | reads its blocks (~${Math.round(r.nats.sharedTokens)} tokens) from the bucket | ${ms(r.nats.readerTtftMs)} | ${(r.nats.readerTtftMs.median / p).toFixed(3)}x |
`
    : ""
}| peer (no second tier) | computes it | ${ms(r.peerTtftMs)} | 1.000x |`;
}
