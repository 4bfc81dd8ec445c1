// The priority suite (`npm run bench -- --suite priority`): what `--scheduling-policy
// priority` buys an urgent request on a gateway kept full by batch work, and what it costs
// the batch work.
//
// Two single-process gateways (`gateway --local`) on the mini V3 checkpoint with
// `--max-running=4`: the peer schedules in arrival order (fcfs, the default), the other by
// priority. Phases alternate between them (fcfs first, then priority, --runs rounds, default 5;
// --quick: 1), one gateway loaded at a time. In a phase, 4 batch clients keep every running
// slot busy in a closed loop (streaming chats of BATCH_TOKENS tokens, ignore_eos; priority
// 10 on the priority gateway); after a second, an urgent client sends URGENT requests one
// after another, URGENT_GAP_MS apart (chats of URGENT_TOKENS tokens; priority 0). Per
// urgent request: the time to its first token and to its end. Per phase: the batch
// clients' output tokens per second while the urgent ones ran (the gateway's sampled
// tokens, the urgent ones' taken out) and the preemptions the gateway counted.
import type { ChildProcess } from "node:child_process";
import { setTimeout as sleep } from "node:timers/promises";
import { medianRange, type Stats, stats } from "./lib.ts";
import { chat, ensureMiniModel, localGateway, metricValue, PROMPTS, stop } from "./serve.ts";

const MAX_RUNNING = 4;
const BATCH_CLIENTS = 4;
const BATCH_TOKENS = 64;
const URGENT = 6;
const URGENT_TOKENS = 8;
const URGENT_GAP_MS = 500;

export interface PrioritySide {
  /** Urgent requests: time to the first token, and to the end. */
  ttftMs: Stats;
  totalMs: Stats;
  /** Batch clients' completion tokens per second, per phase. */
  batchTokPerS: Stats;
  /** Preemptions the gateway counted in all its phases. */
  preemptions: number;
}

export interface PriorityResults {
  runs: number;
  fcfs: PrioritySide;
  priority: PrioritySide;
}

/** One phase on `base`: the batch load, and the urgent requests through it. */
async function phase(
  base: string,
  priorities: { batch: number; urgent: number } | null,
): Promise<{ ttft: number[]; total: number[]; batchTokPerS: number; preemptions: number }> {
  const field = (p: number): Record<string, unknown> =>
    priorities === null ? {} : { priority: p };
  const preempted0 = await metricValue(base, "expertmesh_gateway_num_preemptions");
  const generated = () => metricValue(base, "expertmesh_gateway_generation_tokens_total");
  let running = true;
  // Counted from 1 s in: the slots are full by then.
  let generated0 = Number.NaN;
  let t0 = Number.NaN;
  const batch = Array.from({ length: BATCH_CLIENTS }, async (_, c) => {
    for (let i = 0; running; i++) {
      const r = await chat(
        base,
        PROMPTS[(c + i) % PROMPTS.length]!,
        BATCH_TOKENS,
        undefined,
        field(priorities?.batch ?? 0),
      );
      if (!r.ok) throw new Error(`batch request failed: ${r.error}`);
    }
  });
  await sleep(1000);
  generated0 = await generated();
  t0 = performance.now();
  const ttft: number[] = [];
  const total: number[] = [];
  for (let i = 0; i < URGENT; i++) {
    const r = await chat(
      base,
      `Urgent ${i}: ${PROMPTS[i % PROMPTS.length]}`,
      URGENT_TOKENS,
      undefined,
      field(priorities?.urgent ?? 0),
    );
    if (!r.ok || r.tokens !== URGENT_TOKENS)
      throw new Error(`urgent request failed: ${r.error ?? `${r.tokens} tokens`}`);
    ttft.push(r.ttftMs);
    total.push(r.totalMs);
    await sleep(URGENT_GAP_MS);
  }
  // Tokens sampled while the urgent requests came and went, theirs taken out (a batch
  // request's tokens count as they are sampled, not when it ends).
  const seconds = (performance.now() - t0) / 1000;
  const tokens = (await generated()) - generated0 - URGENT * URGENT_TOKENS;
  running = false;
  await Promise.all(batch);
  return {
    ttft,
    total,
    batchTokPerS: tokens / seconds,
    preemptions: (await metricValue(base, "expertmesh_gateway_num_preemptions")) - preempted0,
  };
}

export async function runPriority(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<PriorityResults> {
  const modelDir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  const rounds = o.quick ? 1 : o.runs;
  try {
    const start = (name: string, extra: string[]) =>
      localGateway(name, modelDir, [`--max-running=${MAX_RUNNING}`, ...extra], children);
    o.log("[priority] starting two gateways on mini-v3 (fcfs and --scheduling-policy priority)");
    const [fcfs, prio] = await Promise.all([
      start("gateway-fcfs", []),
      start("gateway-priority", ["--scheduling-policy=priority"]),
    ]);
    const acc = {
      fcfs: { ttft: [] as number[], total: [] as number[], tps: [] as number[], pre: 0 },
      priority: { ttft: [] as number[], total: [] as number[], tps: [] as number[], pre: 0 },
    };
    for (let round = 0; round < rounds; round++)
      for (const side of ["fcfs", "priority"] as const) {
        const r = await phase(
          side === "fcfs" ? fcfs : prio,
          side === "fcfs" ? null : { batch: 10, urgent: 0 },
        );
        const a = acc[side];
        a.ttft.push(...r.ttft);
        a.total.push(...r.total);
        a.tps.push(r.batchTokPerS);
        a.pre += r.preemptions;
        o.log(
          `[priority] round ${round + 1}/${rounds} ${side}: urgent TTFT median ${stats(r.ttft).median.toFixed(0)} ms, batch ${r.batchTokPerS.toFixed(1)} tok/s, ${r.preemptions} preemptions`,
        );
      }
    const side = (a: (typeof acc)["fcfs"]): PrioritySide => ({
      ttftMs: stats(a.ttft),
      totalMs: stats(a.total),
      batchTokPerS: stats(a.tps),
      preemptions: a.pre,
    });
    return { runs: rounds, fcfs: side(acc.fcfs), priority: side(acc.priority) };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
  }
}

const ms = (s: Stats) => medianRange(s, 0);

/** The suite's table for BENCHMARKS.md. */
export function priorityTables(
  r: PriorityResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const f = r.fcfs;
  const p = r.priority;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3 single-process, \`--max-running=${MAX_RUNNING}\`, ${r.runs} rounds of one phase per gateway (fcfs first); from \`${source}\`. In each phase ${BATCH_CLIENTS} batch clients keep every slot busy (chats of ${BATCH_TOKENS} tokens, priority 10 on the priority gateway) while an urgent client sends ${URGENT} chats of ${URGENT_TOKENS} tokens, one after another (priority 0). Urgent figures: milliseconds, median (min-max) over its ${r.runs * URGENT} requests; batch: output tokens/s per phase.

| gateway | urgent: time to first token | urgent: whole request | batch output tok/s | preemptions |
|---|---:|---:|---:|---:|
| fcfs (peer) | ${ms(f.ttftMs)} | ${ms(f.totalMs)} | ${medianRange(f.batchTokPerS, 1)} | ${f.preemptions} |
| \`--scheduling-policy priority\` | ${ms(p.ttftMs)} | ${ms(p.totalMs)} | ${medianRange(p.batchTokPerS, 1)} | ${p.preemptions} |
| priority / peer | ${(p.ttftMs.median / f.ttftMs.median).toFixed(3)}x | ${(p.totalMs.median / f.totalMs.median).toFixed(3)}x | ${(p.batchTokPerS.median / f.batchTokPerS.median).toFixed(3)}x | |`;
}
