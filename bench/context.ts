// The context suite (`npm run bench -- --suite context`): what Anthropic's context management
// on /v1/messages (context-edits.ts, ADR 0060) costs an agent whose loop outgrows the context.
//
// A single-process gateway (`gateway --local`) on the mini V3 checkpoint with a context of
// CONTEXT tokens. One loop: a user message, then STEPS steps, each a Messages request with
// the whole history so far (as Anthropic's clients send it: the server edits, the client
// keeps everything) and `tool_choice: any` on a lookup tool of no input (greedy, at most
// MAX_TOKENS tokens),
// answered with a tool result of ~RESULT_WORDS words. Without an edit the loop is refused
// (400, the prompt too long) within a few steps, so there is no unmanaged peer; the peer is
// the edit that needs no model work (it keeps every call, ~70 tokens each in the template
// even cleared, so the loop is STEPS long: at 27 the calls alone outgrow the context), `clear_tool_uses_20250919` (its default trigger, three
// quarters of the context; the last 3 uses kept; `clear_tool_inputs`), against `compact_20260112` (its default
// trigger, the same; the summary, up to a quarter of the context, stands for everything
// before it, and the client sends the compaction block back, as Anthropic's clients do).
// Each loop's message and results name its number, so no loop finds another's prompts
// cached. Per round and side: the whole loop, its slowest step, the prompt tokens served
// from the prefix cache (of all prompt tokens, the summaries' included), and the edits made.
// Sides alternate (the peer first, then the other first), --runs rounds (--quick: 1), after a
// warm-up loop of each.
import type { ChildProcess } from "node:child_process";
import { medianRange, type Stats, stats } from "./lib.ts";
import { ensureMiniModel, localGateway, SERVE_MODEL, stop, toolResultText } from "./serve.ts";

const CONTEXT = 2048;
/** Steps: clearing keeps every call (~70 tokens each, cleared), so 27 outgrow 2,048 tokens. */
const STEPS = 24;
const RESULT_WORDS = 40;
/** Room for the call: `{}` and the whitespace JSON allows before, inside and after it (24 each). */
const MAX_TOKENS = 96;
let loops = 0;

type Side = "clear" | "compact";

export interface ContextSide {
  loopMs: Stats;
  slowestStepMs: Stats;
  /** Prompt tokens served from the prefix cache, of all prompt tokens (0-1). */
  cachedShare: Stats;
  /** Steps whose prompt the edit changed (tool results cleared, or a compaction made). */
  edits: Stats;
  /** The prompt of the last step (tokens), what the edit left of the loop. */
  lastPrompt: Stats;
}

export interface ContextResults {
  runs: number;
  clear: ContextSide;
  compact: ContextSide;
}

type Usage = {
  input_tokens: number;
  cache_read_input_tokens: number;
  iterations?: { type: string; input_tokens: number; cache_read_input_tokens: number }[];
};

/** One loop through `base`, the history managed by `side`'s edit. */
async function loop(base: string, side: Side) {
  const tools = [
    {
      name: "lookup",
      description: "Looks a topic up.",
      // (no input: the random model's call is `{}` and whitespace, which fits MAX_TOKENS; a
      // call cut short would be left out of the answer)
      input_schema: { type: "object", properties: {}, additionalProperties: false },
    },
  ];
  const edit =
    side === "clear"
      ? { type: "clear_tool_uses_20250919", clear_tool_inputs: true }
      : { type: "compact_20260112" };
  const task = ++loops;
  const messages: object[] = [
    {
      role: "user",
      content: `Task ${task}: find out all you can with the lookup tool, calling it as often as needed.`,
    },
  ];
  const steps: number[] = [];
  let prompt = 0;
  let cached = 0;
  let edits = 0;
  let last = 0;
  const t0 = performance.now();
  for (let s = 0; s < STEPS; s++) {
    const t = performance.now();
    const r = await fetch(`${base}/v1/messages`, {
      method: "POST",
      headers: { "content-type": "application/json", "anthropic-version": "2023-06-01" },
      body: JSON.stringify({
        model: SERVE_MODEL,
        max_tokens: MAX_TOKENS,
        temperature: 0,
        tools,
        tool_choice: { type: "any", disable_parallel_tool_use: true },
        messages,
        context_management: { edits: [edit] },
      }),
    });
    const body = (await r.json()) as {
      content?: { type: string; id?: string }[];
      usage?: Usage;
      context_management?: { applied_edits: object[] };
    };
    const use = body.content?.find((b) => b.type === "tool_use");
    if (!r.ok || !use?.id)
      throw new Error(`${side} step ${s}: ${r.status} ${JSON.stringify(body).slice(0, 300)}`);
    steps.push(performance.now() - t);
    const u = body.usage!;
    for (const i of u.iterations ?? [{ ...u, type: "message" }]) {
      prompt += i.input_tokens + i.cache_read_input_tokens;
      cached += i.cache_read_input_tokens;
    }
    last = u.input_tokens + u.cache_read_input_tokens;
    if (body.content![0]!.type === "compaction" || body.context_management!.applied_edits.length)
      edits++;
    messages.push(
      { role: "assistant", content: body.content },
      {
        role: "user",
        content: [
          {
            type: "tool_result",
            tool_use_id: use.id,
            content: toolResultText(task, s, RESULT_WORDS),
          },
        ],
      },
    );
  }
  return {
    loopMs: performance.now() - t0,
    slowestMs: Math.max(...steps),
    cachedShare: cached / prompt,
    edits,
    lastPrompt: last,
  };
}

export async function runContext(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<ContextResults> {
  const rounds = o.quick ? 1 : o.runs;
  const modelDir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  try {
    const base = await localGateway(
      "gateway-context",
      modelDir,
      [`--max-model-len=${CONTEXT}`],
      children,
    );
    await loop(base, "clear"); // (warm-up of each)
    await loop(base, "compact");
    const acc = {
      clear: [] as Awaited<ReturnType<typeof loop>>[],
      compact: [] as Awaited<ReturnType<typeof loop>>[],
    };
    for (let round = 0; round < rounds; round++) {
      const order: Side[] = round % 2 === 0 ? ["clear", "compact"] : ["compact", "clear"];
      for (const side of order) acc[side].push(await loop(base, side));
      const [a, b] = [acc.clear.at(-1)!, acc.compact.at(-1)!];
      o.log(
        `[context] round ${round + 1}/${rounds}: ${STEPS} steps, clearing ${a.loopMs.toFixed(0)} ms (${(a.cachedShare * 100).toFixed(0)} % cached, ${a.edits} edits), compaction ${b.loopMs.toFixed(0)} ms (${(b.cachedShare * 100).toFixed(0)} % cached, ${b.edits} compactions)`,
      );
    }
    const side = (xs: Awaited<ReturnType<typeof loop>>[]): ContextSide => ({
      loopMs: stats(xs.map((x) => x.loopMs)),
      slowestStepMs: stats(xs.map((x) => x.slowestMs)),
      cachedShare: stats(xs.map((x) => x.cachedShare)),
      edits: stats(xs.map((x) => x.edits)),
      lastPrompt: stats(xs.map((x) => x.lastPrompt)),
    });
    return { runs: rounds, clear: side(acc.clear), compact: side(acc.compact) };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
  }
}

/** The suite's table for BENCHMARKS.md. */
export function contextTables(
  r: ContextResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const row = (what: string, x: ContextSide) =>
    `| ${what} | ${medianRange(x.loopMs, 0)} | **${(x.loopMs.median / r.clear.loopMs.median).toFixed(2)}x** | ${medianRange(x.slowestStepMs, 0)} | ${(x.cachedShare.median * 100).toFixed(0)} % | ${x.edits.median} | ${x.lastPrompt.median} |`;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), a mini-v3 single-process gateway with a context of ${CONTEXT} tokens, ${r.runs} rounds (sides alternating), after a warm-up loop of each; from \`${source}\`. One user message, then ${STEPS} steps, each a \`/v1/messages\` request with the whole history (a required call of a lookup tool of no input, greedy, at most ${MAX_TOKENS} tokens) answered with a result of ~${RESULT_WORDS} words. Per round: the loop, its slowest step, the share of all prompt tokens (summaries' included) served from the prefix cache, the steps the edit changed, and the last step's prompt. Medians (min-max).

| history kept in the context by | the loop (ms) | against clearing | slowest step (ms) | prompt tokens cached | steps edited | last prompt (tokens) |
|---|---:|---:|---:|---:|---:|---:|
${row("clear_tool_uses_20250919, clear_tool_inputs (peer)", r.clear)}
${row("compact_20260112", r.compact)}`;
}
