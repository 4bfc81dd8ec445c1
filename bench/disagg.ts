// The disagg suite (`npm run bench -- --suite disagg`): what disaggregated prefill (ADR 0029,
// `--disaggregation-mode decode|prefill`) buys the streams a gateway is decoding while long
// prompts arrive: their inter-token latency (ITL) should not rise, since the long prompts'
// prefill runs on a prefill gateway. The peer, in the same run: one gateway doing both (no
// disaggregation flags, no tier: today's default deployment).
//
// Three single-process gateways on the mini V3 checkpoint, the same flags
// (--max-batch-tokens=2048, --max-model-len=4096, prefix caching on) but for these:
//   (a) colocated: one gateway, alone;
//   (b) disaggregated: a decode gateway and a prefill gateway of the same namespace and model
//       name, on the same JetStream bucket (--prefix-cache-remote, a nats-server on loopback).
// The two setups take turns, one round at a time (colocated first in even rounds, disaggregated
// first in odd ones), never loaded at the same time; an uncounted warm-up round of each first.
// A round on a setup:
//   1. K=4 clients each stream chat completions of STREAM_TOKENS tokens (short prompts,
//      temperature 0, ignore_eos), one after another, until step 3 ends (so that the streams
//      cover every long prompt to its last token, on the decode gateway too);
//   2. once all K stream, and BASELINE_MS more, M=3 long prompts (~2,400 tokens of the tiny
//      tokenizer each, a system message whose first words name the setup, round and prompt, so
//      that no block is shared with any other) are sent LONG_SPACING_MS apart, max_tokens 8;
//   3. the window: from the first long prompt sent to the last one's end.
// Recorded client-side: the arrival of each token of the K streams (ITL = the gaps within a
// stream; a gap counts in the window when it overlaps it), each long prompt's time to first
// token and end, and the CPU time of the gateways over the window (/proc). Every request asks
// for logprobs, so that each token makes a chunk: the mini model's random weights sample many
// tokens that are a character's first bytes, whose text is held back until the next one, and
// without logprobs such a step makes no chunk (a gap would then span two steps, or more).
// The decode gateway's expertmesh_gateway_prefill_remote_total{outcome="done"} (and the prefill
// gateway's prefill_jobs_total{outcome="done"}) must grow by exactly M each round: a run whose
// offload fell back to computing in place measures nothing, and fails.
//
// On a machine of 2 cores (this suite's usual one) the prefill gateway competes with the decode
// gateway for the same 2 cores: the isolation that a prefill gateway on another node gives is
// only partly visible here, and the disaggregated streams' ITL still rises while the prefill
// gateway computes. The numbers are what they are.
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { startNats } from "../test/env/nats.ts";
import { binaries } from "../test/env/paths.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import {
  chat,
  ensureMiniModel,
  localGateway,
  PROMPTS,
  percentile,
  procCpuSeconds,
  SERVE_MODEL,
  stop,
} from "./serve.ts";
import { promptText } from "./tokenize.ts";

/** Concurrent streams, and the long prompts sent through them per round. */
const STREAMS = 4;
const LONG_PROMPTS = 3;
const LONG_SPACING_MS = 300;
/** Completion tokens of each long prompt. */
const LONG_TOKENS = 8;
/** How long the K streams run alone before the first long prompt. */
const BASELINE_MS = 500;
const CONTEXT = 4096;
const MAX_BATCH_TOKENS = 2048;
const NAMESPACE = "bench";
const BUCKET = "bench-disagg";

const SETUPS = ["colocated", "disaggregated"] as const;
type Setup = (typeof SETUPS)[number];

/** Percentiles of gaps, ms. */
export interface Itl {
  p50: number;
  p99: number;
  max: number;
  /** Gaps counted. */
  n: number;
}

export interface DisaggSide {
  /** The K streams' gaps that overlap a window (long prompts in flight), over every round. */
  itlWindow: Itl;
  /** Every gap of the K streams, over every round. */
  itlAll: Itl;
  /** Per round: the window's ITL p99 and max (ms). */
  roundP99: Stats;
  roundMax: Stats;
  /** Long prompts: time to first token and to the end (ms), over every round. */
  longTtftMs: Stats;
  longTotalMs: Stats;
  /** The window (first long prompt sent to the last one's end), ms, per round. */
  windowMs: Stats;
  /** Completion tokens the K streams got per round (median). */
  streamTokens: number;
  /** The K streams' tokens per second in the window, per round: what decoding kept doing. */
  windowTokPerS: Stats;
  /** Cores busy over the window (CPU seconds / window seconds), median over rounds. */
  cores: { serving: number; prefill: number | null };
}

export interface DisaggResults {
  runs: number;
  streams: number;
  streamTokens: number;
  longPrompts: number;
  longSpacingMs: number;
  longTokens: number;
  /** Prompt tokens of each long prompt (the prefill gateway's count). */
  longPromptTokens: number;
  maxBatchTokens: number;
  natsVersion: string;
  colocated: DisaggSide;
  disaggregated: DisaggSide & {
    /** Long prompts sent to the decode gateway, and its prefill_remote_total{outcome="done"}. */
    longSent: number;
    offloadDone: number;
  };
}

/** A labelled series of a gateway's /metrics (`name{outcome="..."}`), 0 when absent. */
async function outcomeCount(base: string, name: string, outcome: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const m = new RegExp(`^${name}\\{[^}]*outcome="${outcome}"[^}]*\\} (\\S+)$`, "m").exec(text);
  return m ? Number(m[1]) : 0;
}

/** An unlabelled series of a gateway's /metrics, or NaN. */
async function gauge(base: string, name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  return Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1] ?? Number.NaN);
}

interface RoundResult {
  windowGaps: number[];
  allGaps: number[];
  ttft: number[];
  total: number[];
  windowMs: number;
  streamTokens: number;
  windowTokPerS: number;
  cores: { serving: number; prefill: number | null };
}

/** One round on a setup: the K streams, and the long prompts through them. */
async function round(o: {
  base: string;
  servingPid: number | undefined;
  prefillPid: number | undefined;
  streamTokens: number;
  longSystem: string[];
}): Promise<RoundResult> {
  let longDone = false;
  const gaps: { start: number; end: number }[] = [];
  /** Every token of the K streams, as it arrived. */
  const arrivals: number[] = [];
  let streamTokens = 0;
  const first: Promise<void>[] = [];
  const clients = Array.from({ length: STREAMS }, (_, c) => {
    let streaming = () => {};
    first.push(new Promise<void>((r) => (streaming = r)));
    return (async () => {
      for (let i = 0; i === 0 || !longDone; i++) {
        let last = Number.NaN;
        const r = await chat(
          o.base,
          PROMPTS[(c + i) % PROMPTS.length]!,
          o.streamTokens,
          undefined,
          { logprobs: true },
          (now) => {
            if (!Number.isNaN(last)) gaps.push({ start: last, end: now });
            arrivals.push(now);
            last = now;
            streaming();
          },
        );
        if (!r.ok || r.tokens !== o.streamTokens)
          throw new Error(`disagg: a stream failed: ${r.error ?? `${r.tokens} tokens`}`);
        streamTokens += r.tokens;
      }
    })();
  });
  // A stream that fails before its first chunk ends the round (else it would wait forever).
  const all = Promise.all(clients);
  await Promise.race([Promise.all(first), all]);
  await sleep(BASELINE_MS);
  const cpu0 = [procCpuSeconds(o.servingPid), procCpuSeconds(o.prefillPid)];
  const windowStart = performance.now();
  let longs: { ttftMs: number; totalMs: number }[];
  try {
    longs = await Promise.all(
      o.longSystem.map(async (system, i) => {
        await sleep(i * LONG_SPACING_MS);
        const r = await chat(o.base, "Summarize the text above in one line.", LONG_TOKENS, system, {
          logprobs: true,
        });
        if (!r.ok || r.tokens !== LONG_TOKENS)
          throw new Error(`disagg: a long prompt failed: ${r.error ?? `${r.tokens} tokens`}`);
        return r;
      }),
    );
  } finally {
    longDone = true;
  }
  const windowEnd = performance.now();
  const cpu1 = [procCpuSeconds(o.servingPid), procCpuSeconds(o.prefillPid)];
  await all;
  const windowS = (windowEnd - windowStart) / 1000;
  return {
    windowGaps: gaps.filter((g) => g.end > windowStart && g.start < windowEnd).map(gapMs),
    allGaps: gaps.map(gapMs),
    ttft: longs.map((r) => r.ttftMs),
    total: longs.map((r) => r.totalMs),
    windowMs: windowEnd - windowStart,
    streamTokens,
    windowTokPerS: arrivals.filter((t) => t >= windowStart && t <= windowEnd).length / windowS,
    cores: {
      serving: (cpu1[0]! - cpu0[0]!) / windowS,
      prefill: o.prefillPid === undefined ? null : (cpu1[1]! - cpu0[1]!) / windowS,
    },
  };
}

const gapMs = (g: { start: number; end: number }) => g.end - g.start;

function itl(gaps: number[]): Itl {
  return {
    p50: percentile(gaps, 50),
    p99: percentile(gaps, 99),
    max: gaps.length ? Math.max(...gaps) : Number.NaN,
    n: gaps.length,
  };
}

function side(rounds: RoundResult[]): DisaggSide {
  const serving = stats(rounds.map((r) => r.cores.serving)).median;
  const prefill = rounds.every((r) => r.cores.prefill !== null)
    ? stats(rounds.map((r) => r.cores.prefill!)).median
    : null;
  return {
    itlWindow: itl(rounds.flatMap((r) => r.windowGaps)),
    itlAll: itl(rounds.flatMap((r) => r.allGaps)),
    roundP99: stats(rounds.map((r) => percentile(r.windowGaps, 99))),
    roundMax: stats(rounds.map((r) => Math.max(...r.windowGaps))),
    longTtftMs: stats(rounds.flatMap((r) => r.ttft)),
    longTotalMs: stats(rounds.flatMap((r) => r.total)),
    windowMs: stats(rounds.map((r) => r.windowMs)),
    streamTokens: stats(rounds.map((r) => r.streamTokens)).median,
    windowTokPerS: stats(rounds.map((r) => r.windowTokPerS)),
    cores: { serving, prefill },
  };
}

export async function runDisagg(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<DisaggResults> {
  const modelDir = await ensureMiniModel(o.log);
  const rounds = o.quick ? 1 : o.runs;
  /** Completion tokens per stream, and bytes of each long prompt (~2,400 tokens; quick ~1,200). */
  const streamTokens = o.quick ? 48 : 96;
  const longBytes = o.quick ? 2100 : 4200;
  const children: ChildProcess[] = [];
  const folder = mkdtempSync(join(tmpdir(), "em-bench-disagg-"));
  const natsBin = binaries().natsServer;
  const nats = await startNats(natsBin, join(folder, "nats"), folder);
  try {
    const common = [
      `--namespace=${NAMESPACE}`,
      `--model-name=${SERVE_MODEL}`,
      `--max-batch-tokens=${MAX_BATCH_TOKENS}`,
      `--max-model-len=${CONTEXT}`,
    ];
    const tier = [`--nats=${nats.info.url}`, `--prefix-cache-remote=${BUCKET}`];
    o.log(
      "[disagg] starting three gateways on mini-v3: a colocated one, and a decode and a prefill gateway on one NATS bucket",
    );
    const start = async (name: string, extra: string[]) => {
      const base = await localGateway(name, modelDir, [...common, ...extra], children);
      return { base, pid: children.at(-1)?.pid };
    };
    const colocated = await start("gateway-colocated", []);
    const prefill = await start("gateway-prefill", [...tier, "--disaggregation-mode=prefill"]);
    const decode = await start("gateway-decode", [...tier, "--disaggregation-mode=decode"]);
    const remote = (outcome: string) =>
      outcomeCount(decode.base, "expertmesh_gateway_prefill_remote_total", outcome);
    const jobs = (outcome: string) =>
      outcomeCount(prefill.base, "expertmesh_gateway_prefill_jobs_total", outcome);
    const jobTokens = () => gauge(prefill.base, "expertmesh_gateway_prefill_job_tokens");
    const counts = async () => ({
      done: await remote("done"),
      noWorkers: await remote("no_workers"),
      timeout: await remote("timeout"),
      failed: await remote("failed"),
      jobsDone: await jobs("done"),
      jobsFailed: await jobs("failed"),
      jobTokens: await jobTokens(),
    });

    const results: Record<Setup, RoundResult[]> = { colocated: [], disaggregated: [] };
    let longSent = 0;
    let offloadDone = 0;
    let longPromptTokens = Number.NaN;
    // One uncounted round of each setup first: each gateway's first requests pay for warming up.
    for (let run = -1; run < rounds; run++) {
      const order = run % 2 === 0 ? SETUPS : ([...SETUPS].reverse() as Setup[]);
      for (const setup of order) {
        const longSystem = Array.from(
          { length: LONG_PROMPTS },
          (_, i) =>
            `Setup ${setup}, round ${run + 2}, long prompt ${i + 1} of the disaggregation bench. ${promptText(longBytes)}`,
        );
        const disagg = setup === "disaggregated";
        const before = disagg ? await counts() : null;
        const r = await round({
          base: disagg ? decode.base : colocated.base,
          servingPid: disagg ? decode.pid : colocated.pid,
          prefillPid: disagg ? prefill.pid : undefined,
          streamTokens,
          longSystem,
        });
        if (before) {
          const after = await counts();
          const d = {
            done: after.done - before.done,
            noWorkers: after.noWorkers - before.noWorkers,
            timeout: after.timeout - before.timeout,
            failed: after.failed - before.failed,
            jobsDone: after.jobsDone - before.jobsDone,
            jobsFailed: after.jobsFailed - before.jobsFailed,
          };
          // Only the long prompts lack --disaggregation-min-tokens (512) tokens: exactly they go.
          if (
            d.done !== LONG_PROMPTS ||
            d.jobsDone !== LONG_PROMPTS ||
            d.noWorkers + d.timeout + d.failed + d.jobsFailed !== 0
          )
            throw new Error(
              `disagg: the decode gateway got ${LONG_PROMPTS} long prompts but its prefill_remote_total grew by ${JSON.stringify(d)}: the disaggregated setup did not offload them all, and would measure a gateway computing its own prompts`,
            );
          longPromptTokens = (after.jobTokens - before.jobTokens) / d.jobsDone;
          if (run >= 0) {
            longSent += LONG_PROMPTS;
            offloadDone += d.done;
          }
        }
        if (run >= 0) results[setup].push(r);
        o.log(
          `[disagg] ${run >= 0 ? `round ${run + 1}/${rounds}` : "warm-up"} ${setup}: window ${(r.windowMs / 1000).toFixed(1)} s, ITL in it p50 ${percentile(r.windowGaps, 50).toFixed(1)} p99 ${percentile(r.windowGaps, 99).toFixed(1)} max ${Math.max(...r.windowGaps).toFixed(1)} ms (${r.windowGaps.length} gaps), long TTFT ${r.ttft.map((t) => t.toFixed(0)).join("/")} ms, streams ${r.windowTokPerS.toFixed(1)} tok/s in it, cores serving ${r.cores.serving.toFixed(2)}${r.cores.prefill === null ? "" : ` prefill ${r.cores.prefill.toFixed(2)}`}`,
        );
      }
    }
    return {
      runs: rounds,
      streams: STREAMS,
      streamTokens,
      longPrompts: LONG_PROMPTS,
      longSpacingMs: LONG_SPACING_MS,
      longTokens: LONG_TOKENS,
      longPromptTokens,
      maxBatchTokens: MAX_BATCH_TOKENS,
      natsVersion: /nats-server-(v[\d.]+)/.exec(natsBin)?.[1] ?? "",
      colocated: side(results.colocated),
      disaggregated: { ...side(results.disaggregated), longSent, offloadDone },
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
    await nats.process.stop();
    rmSync(folder, { recursive: true, force: true });
  }
}

const f1 = (v: number) => v.toFixed(1);
const itlCell = (x: Itl) => `${f1(x.p50)} / ${f1(x.p99)} / ${f1(x.max)}`;
const ratio = (a: number, b: number) => `${(a / b).toFixed(2)}x`;

/** The suite's table for BENCHMARKS.md. */
export function disaggTables(
  r: DisaggResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const c = r.colocated;
  const d = r.disaggregated;
  const cores = (s: DisaggSide) =>
    s.cores.prefill === null
      ? s.cores.serving.toFixed(2)
      : `${s.cores.serving.toFixed(2)} + ${s.cores.prefill.toFixed(2)}`;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process gateways (\`--max-batch-tokens=${r.maxBatchTokens}\`), ${r.runs} rounds per setup, the setups taking turns; from \`${source}\`. Each round: ${r.streams} clients stream chats of ${r.streamTokens} tokens back to back while ${r.longPrompts} new long prompts (~${Math.round(r.longPromptTokens)} tokens each, ${r.longTokens} tokens out) arrive ${r.longSpacingMs} ms apart. ITL: gaps between a stream's tokens (ms; every request asks for logprobs, so each token makes a chunk), p50 / p99 / max over every round's gaps, in the window from the first long prompt sent to the last one's end, and over the whole round. The decode gateway handed ${d.offloadDone} of its ${d.longSent} long prompts to the prefill gateway (\`prefill_remote_total{outcome="done"}\`; nats-server ${r.natsVersion || "?"} on loopback). On ${r.machine.cores} cores the prefill gateway takes the decode gateway's cores: a prefill gateway on its own node would isolate the streams more.

| setup | ITL while long prompts ran | window ITL p99, per round | ITL over the round | long prompts: time to first token | long prompts: whole request | window (s) | streams' tok/s in the window | cores busy in the window |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| colocated: one gateway (the peer) | ${itlCell(c.itlWindow)} | ${medianRange(c.roundP99, 1)} | ${itlCell(c.itlAll)} | ${medianRange(c.longTtftMs, 0)} | ${medianRange(c.longTotalMs, 0)} | ${f1(c.windowMs.median / 1000)} | ${medianRange(c.windowTokPerS, 1)} | ${cores(c)} |
| disaggregated: decode + prefill gateway | ${itlCell(d.itlWindow)} | ${medianRange(d.roundP99, 1)} | ${itlCell(d.itlAll)} | ${medianRange(d.longTtftMs, 0)} | ${medianRange(d.longTotalMs, 0)} | ${f1(d.windowMs.median / 1000)} | ${medianRange(d.windowTokPerS, 1)} | ${cores(d)} (decode + prefill) |
| disaggregated / colocated | p99 **${ratio(d.itlWindow.p99, c.itlWindow.p99)}**, max **${ratio(d.itlWindow.max, c.itlWindow.max)}** | ${ratio(d.roundP99.median, c.roundP99.median)} | p99 ${ratio(d.itlAll.p99, c.itlAll.p99)} | **${ratio(d.longTtftMs.median, c.longTtftMs.median)}** | ${ratio(d.longTotalMs.median, c.longTotalMs.median)} | ${ratio(d.windowMs.median, c.windowMs.median)} | ${ratio(d.windowTokPerS.median, c.windowTokPerS.median)} | |`;
}
