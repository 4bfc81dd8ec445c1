// The batches suite (`npm run bench -- --suite batches`): what running requests as an OpenAI
// batch (/v1/files + /v1/batches, ADR 0049) costs against sending the same requests from a
// client at the same concurrency.
//
// One single-process gateway (`gateway --local`) on the mini V3 checkpoint with
// `--files-dir` and `--batch-concurrency=CONCURRENCY`. The peer: a client sends LINES chats
// (TOKENS tokens each, ignore_eos, greedy) CONCURRENCY at a time and waits for the last. The
// batch: the same chats as a JSONL file, uploaded, run as a batch (polled every POLL_MS), its
// output file downloaded; timed from the upload to the download's end. Sides alternate (peer
// first), --runs rounds (default 3; --quick: 1). Per side: output tokens per second over the
// whole (wall clock), and, for the batch, the seconds from the upload until the batch is
// in_progress (upload, validation) and from its last answer to completed (finalizing).
//
// A third side: the same batch on two gateways that share a folder (another pair of
// processes, `--batch-concurrency=CONCURRENCY/2` each, so the lines in flight are as many),
// made through the first: the second joins by taking parts (ADR 0049). On one machine the
// two compete for its cores, so this side measures what sharing a batch costs, not the
// speed-up of more machines; the share of lines the second ran says that it did join.
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { medianRange, type Stats, stats } from "./lib.ts";
import {
  chat,
  ensureMiniModel,
  localGateway,
  metricValue,
  PROMPTS,
  SERVE_MODEL,
  stop,
} from "./serve.ts";

const LINES = 32;
const TOKENS = 32;
const CONCURRENCY = 8;
const POLL_MS = 50;

export interface BatchesResults {
  runs: number;
  /** Output tokens per second, per round. */
  peerTokPerS: Stats;
  batchTokPerS: Stats;
  /** Seconds from the upload's start to in_progress, per round. */
  startS: Stats;
  /** Seconds from the create to the poll that saw it completed, per round. */
  runS: Stats;
  /** Output tokens per second of the batch on two gateways sharing a folder, per round. */
  pairTokPerS?: Stats;
  /** Share of the pair's lines the second gateway ran (0-1), per round. */
  pairShare?: Stats;
}

const body = (i: number) => ({
  model: SERVE_MODEL,
  messages: [{ role: "user", content: PROMPTS[i % PROMPTS.length] }],
  max_tokens: TOKENS,
  ignore_eos: true,
  temperature: 0,
});

/** The peer: LINES chats from a client, CONCURRENCY at a time; output tokens per second. */
async function peer(base: string): Promise<number> {
  const t0 = performance.now();
  let next = 0;
  let tokens = 0;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < LINES) {
        const i = next++;
        const r = await chat(base, PROMPTS[i % PROMPTS.length]!, TOKENS, undefined, {
          ignore_eos: true,
          temperature: 0,
        });
        if (!r.ok) throw new Error(`peer request failed: ${r.error}`);
        tokens += r.tokens;
      }
    }),
  );
  return tokens / ((performance.now() - t0) / 1000);
}

/** The batch: the same chats as a batch, from the upload to the output's download. */
async function batch(base: string): Promise<{ tokPerS: number; startS: number; runS: number }> {
  const lines = Array.from({ length: LINES }, (_, i) =>
    JSON.stringify({
      custom_id: `r${i}`,
      method: "POST",
      url: "/v1/chat/completions",
      body: body(i),
    }),
  );
  const t0 = performance.now();
  const form = new FormData();
  form.append("purpose", "batch");
  form.append("file", new Blob([`${lines.join("\n")}\n`]), "bench.jsonl");
  const file = (await (await fetch(`${base}/v1/files`, { method: "POST", body: form })).json()) as {
    id: string;
  };
  const created = await fetch(`${base}/v1/batches`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      input_file_id: file.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
    }),
  });
  const tCreated = performance.now();
  const { id } = (await created.json()) as { id: string };
  let started = Number.NaN;
  for (;;) {
    const b = (await (await fetch(`${base}/v1/batches/${id}`)).json()) as {
      status: string;
      output_file_id: string | null;
      request_counts: { completed: number; failed: number };
    };
    if (b.status === "in_progress" && Number.isNaN(started)) started = performance.now();
    if (b.status === "completed") {
      if (b.request_counts.completed !== LINES)
        throw new Error(`batch ${id}: ${JSON.stringify(b.request_counts)}`);
      const tDone = performance.now();
      const text = await (await fetch(`${base}/v1/files/${b.output_file_id}/content`)).text();
      let tokens = 0;
      for (const l of text.trim().split("\n"))
        tokens += (
          JSON.parse(l) as { response: { body: { usage: { completion_tokens: number } } } }
        ).response.body.usage.completion_tokens;
      const t1 = performance.now();
      return {
        tokPerS: tokens / ((t1 - t0) / 1000),
        startS: ((Number.isNaN(started) ? tDone : started) - t0) / 1000,
        runS: (tDone - tCreated) / 1000,
      };
    }
    if (b.status === "failed" || b.status === "cancelled" || b.status === "expired")
      throw new Error(`batch ${id} ${b.status}`);
    await sleep(POLL_MS);
  }
}

export async function runBatches(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<BatchesResults> {
  const modelDir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  const dir = mkdtempSync(join(tmpdir(), "expertmesh-bench-batches-"));
  const rounds = o.quick ? 1 : o.runs;
  try {
    o.log("[batches] starting a gateway on mini-v3 with --files-dir, and a pair on another");
    const base = await localGateway(
      "gateway-batches",
      modelDir,
      [`--files-dir=${join(dir, "one")}`, `--batch-concurrency=${CONCURRENCY}`],
      children,
    );
    const half = [`--files-dir=${join(dir, "pair")}`, `--batch-concurrency=${CONCURRENCY / 2}`];
    const pairA = await localGateway("gateway-batches-a", modelDir, half, children);
    const pairB = await localGateway("gateway-batches-b", modelDir, half, children);
    // (no series before its first line)
    const ranByB = async () =>
      (await metricValue(pairB, 'expertmesh_gateway_batch_lines_total\\{outcome="completed"\\}')) ||
      0;
    // A warm-up of each side (the first requests compile and fill caches; both of the pair).
    await peer(base);
    await batch(base);
    await peer(pairB);
    await batch(pairA);
    const acc = {
      peer: [] as number[],
      batch: [] as number[],
      start: [] as number[],
      run: [] as number[],
      pair: [] as number[],
      share: [] as number[],
    };
    for (let round = 0; round < rounds; round++) {
      const p = await peer(base);
      const b = await batch(base);
      const before = await ranByB();
      const two = await batch(pairA);
      const share = ((await ranByB()) - before) / LINES;
      acc.peer.push(p);
      acc.batch.push(b.tokPerS);
      acc.start.push(b.startS);
      acc.run.push(b.runS);
      acc.pair.push(two.tokPerS);
      acc.share.push(share);
      o.log(
        `[batches] round ${round + 1}/${rounds}: peer ${p.toFixed(1)} tok/s, batch ${b.tokPerS.toFixed(1)} tok/s (${(b.tokPerS / p).toFixed(3)}x; in_progress after ${b.startS.toFixed(2)} s), on two gateways ${two.tokPerS.toFixed(1)} tok/s (${(share * 100).toFixed(0)}% of the lines on the second)`,
      );
    }
    return {
      runs: rounds,
      peerTokPerS: stats(acc.peer),
      batchTokPerS: stats(acc.batch),
      startS: stats(acc.start),
      runS: stats(acc.run),
      pairTokPerS: stats(acc.pair),
      pairShare: stats(acc.share),
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The suite's table for BENCHMARKS.md. */
export function batchesTables(
  r: BatchesResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process gateway with \`--files-dir\` and \`--batch-concurrency=${CONCURRENCY}\`, ${r.runs} rounds (peer first), after a warm-up of each; from \`${source}\`. ${LINES} chats of ${TOKENS} output tokens (ignore_eos, greedy): the peer sends them from a client ${CONCURRENCY} at a time; the batch uploads them as a JSONL file, runs them as a batch (polled every ${POLL_MS} ms) and downloads its output. Medians (min-max).

| side | output tok/s (upload to download) | against the peer | seconds to in_progress | seconds from create to completed |
|---|---:|---:|---:|---:|
| client, ${CONCURRENCY} at a time (peer) | ${medianRange(r.peerTokPerS, 1)} | 1.00x | | |
| batch | ${medianRange(r.batchTokPerS, 1)} | **${(r.batchTokPerS.median / r.peerTokPerS.median).toFixed(3)}x** | ${medianRange(r.startS, 3)} | ${medianRange(r.runS, 2)} |${
    r.pairTokPerS && r.pairShare
      ? `

The batch on two gateways sharing a folder (\`--batch-concurrency=${CONCURRENCY / 2}\` each, made through one; the other joins by parts), against the batch on one, in the same rounds: on one machine the two share its cores, so this is what splitting a batch costs, not what more machines gain.

| side | output tok/s (upload to download) | against one gateway | lines run by the second gateway |
|---|---:|---:|---:|
| batch, one gateway | ${medianRange(r.batchTokPerS, 1)} | 1.00x | |
| batch, two gateways | ${medianRange(r.pairTokPerS, 1)} | **${(r.pairTokPerS.median / r.batchTokPerS.median).toFixed(3)}x** | ${(r.pairShare.median * 100).toFixed(0)}% (${(r.pairShare.min * 100).toFixed(0)}-${(r.pairShare.max * 100).toFixed(0)}%) |`
      : ""
  }`;
}
