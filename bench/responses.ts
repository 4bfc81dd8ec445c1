// The responses suite (`npm run bench -- --suite responses`): what keeping Responses in the
// files folder (src/gateway/response-files.ts, ADR 0051) costs against keeping them in the
// gateway's memory (ResponseStore), the peer that was there before.
//
// 1. A conversation through a gateway: two single-process gateways (`gateway --local`) on the
//    mini V3 checkpoint, one keeping responses in memory, one with `--files-dir` (a folder on
//    this machine's disk). Each side runs a conversation of TURNS turns, each a
//    `POST /v1/responses` continuing the last (`previous_response_id`), OUTPUT tokens each
//    (greedy): per round, the median turn's latency. Sides alternate (memory first, then the
//    other first), --runs rounds (--quick: 1), after a warm-up conversation on each.
// 2. The store alone, in this process: a turn's store work (read the previous response,
//    keep the new one: ResponseStore get + put against ResponseFiles get + put, the file
//    read, parsed, written with a rename) for conversations of DEPTHS turns (each turn's
//    messages and response as the gateway keeps them, ~TURN_CHARS characters), ITERATIONS
//    turns per side and round, alternating; per round the median µs of a turn.
//    The same for a conversation (conversations.ts, ADR 0053) of the same depth, a record a
//    turn: a turn's work (find; add the turn's two items, one record appended) in memory
//    (MemoryLogs) and in the folder (FolderLogs), CONV_ITERATIONS turns per side and round,
//    each on a conversation made afresh (not timed) at that depth: the first turn a gateway
//    serves in it (the whole log read and folded) and the next (only the record since).
// 3. What a background response's events cost (response-events.ts, ADR 0052): on each of
//    the two gateways, the same streamed request (STREAM_OUTPUT tokens, greedy) in the
//    foreground (the peer: its events written to the client only) and with background
//    (its events appended to a log, and in the folder to `<id>.events` every 50 ms, which
//    the client follows); the time until the stream's last event, alternating, per round the
//    median of STREAMS requests of each.
// 4. A page of stored chat completions (stored-completions.ts, ADR 0055): one key with
//    LIST_SIZES completions (~1 KiB each, one in 10 tagged in its metadata), the 20 newest
//    (GET /v1/chat/completions?order=desc, listCompletions), in memory (MemoryCompletions),
//    in the folder (FolderCompletions: a directory listing sorted, the page's files read),
//    the same filtered by the tag (metadata[tag]=x: ~200 files read for 20), and the peer
//    the ADR chose against: every file of the folder read and parsed, sorted by `created`,
//    the 20 newest taken. LIST_ITERATIONS pages per side and round; the median µs.
// 5. An agent's loop past the context (server-side compaction, ADR 0058): a gateway with a
//    context of AGENT_CONTEXT tokens; one user message, then AGENT_STEPS steps, each a
//    required call of a tool (`previous_response_id`) whose output (~TOOL_OUTPUT_WORDS words)
//    the next step sends: the loop outgrows the context within a few steps. The peer:
//    `truncation: "auto"` (the oldest items dropped to fit, every step once full); against it
//    the same with `context_management` (its default threshold, three quarters of the
//    context: the steps before the last summarized). Each loop's first message and tool
//    outputs name its number, so no loop finds another's prompts cached (the tools' part
//    apart). Per round and
//    side: the whole loop's time, its slowest step, the prompt tokens served from the prefix
//    cache (of all the steps' prompt tokens, summaries' included), and the compactions made.
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type ConversationItem,
  type ConversationLogs,
  Conversations,
  FolderLogs,
  MemoryLogs,
} from "../src/gateway/conversations.ts";
import { ResponseFiles } from "../src/gateway/response-files.ts";
import { type Kept, type KeptResponses, ResponseStore } from "../src/gateway/responses.ts";
import {
  completionId,
  FolderCompletions,
  listCompletions,
  MemoryCompletions,
  type StoredCompletion,
  type StoredCompletions,
} from "../src/gateway/stored-completions.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import {
  ensureMiniModel,
  localGateway,
  PROMPTS,
  SERVE_MODEL,
  stop,
  toolResultText,
} from "./serve.ts";

const TURNS = 16;
const OUTPUT = 4;
const DEPTHS = [1, 32, 256] as const;
const TURN_CHARS = 400;
const ITERATIONS = 200;
const CONV_ITERATIONS = 50;
const STREAM_OUTPUT = 32;
const STREAMS = 4;
const LIST_SIZES = [100, 1000, 10_000] as const;
const LIST_ITERATIONS = 30;
const AGENT_CONTEXT = 2048;
const AGENT_STEPS = 32;
const TOOL_OUTPUT_WORDS = 40;
/**
 * Loops run so far: each loop's first message and tool outputs name its number, so no loop
 * finds another's prompts cached (the first message gone, the outputs still differ).
 */
let agentLoops = 0;

export interface ResponsesResults {
  runs: number;
  /** Median turn latency (ms) of each round's conversation, per side. */
  memoryTurnMs: Stats;
  folderTurnMs: Stats;
  /** Per conversation depth: its kept response's size and a turn's store work (µs). */
  store: {
    depth: number;
    keptBytes: number;
    memoryUs: Stats;
    folderUs: Stats;
    /**
     * A conversation of that depth: a turn's find and add (µs), in memory and in the folder,
     * the gateway having found it at the turn before; and as the first turn a gateway serves.
     */
    conversationMemoryUs?: Stats;
    conversationFolderUs?: Stats;
    conversationMemoryFirstUs?: Stats;
    conversationFolderFirstUs?: Stats;
  }[];
  /** A page of 20 stored chat completions (µs) of a key with `size` of them. */
  lists?: {
    size: number;
    memoryUs: Stats;
    folderUs: Stats;
    folderFilteredUs: Stats;
    readAllUs: Stats;
  }[];
  /** An agent's loop past the context, per side: truncation "auto" (peer), compaction. */
  agent?: { truncation: AgentSide; compaction: AgentSide };
  /** A streamed response until its last event (ms): foreground and background, per side. */
  streamed?: {
    memory: { foregroundMs: Stats; backgroundMs: Stats };
    folder: { foregroundMs: Stats; backgroundMs: Stats };
    events: number;
  };
}

/** One side of the agent loop: per round, the loop (ms), its slowest step, cache, compactions. */
export interface AgentSide {
  loopMs: Stats;
  slowestStepMs: Stats;
  /** Prompt tokens served from the prefix cache, of all prompt tokens (0-1). */
  cachedShare: Stats;
  compactions: Stats;
}

/**
 * An agent's loop on `base` (section 5): a user message, then AGENT_STEPS required calls of a
 * lookup tool, each answered with a long output; `managed`: with context_management.
 */
async function agentLoop(base: string, managed: boolean) {
  const tools = [
    {
      type: "function",
      name: "lookup",
      description: "Looks a topic up.",
      parameters: {
        type: "object",
        properties: { topic: { type: "string", enum: ["sea", "sky", "hash"] } },
        required: ["topic"],
        additionalProperties: false,
      },
      strict: true,
    },
  ];
  const task = ++agentLoops;
  let input: unknown = `Task ${task}: find out all you can with the lookup tool, calling it as often as needed.`;
  let previous: string | null = null;
  const steps: number[] = [];
  let prompt = 0;
  let cached = 0;
  let compactions = 0;
  const t0 = performance.now();
  for (let s = 0; s < AGENT_STEPS; s++) {
    const t = performance.now();
    const r = await fetch(`${base}/v1/responses`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: SERVE_MODEL,
        input,
        tools,
        tool_choice: "required",
        max_output_tokens: 48,
        temperature: 0,
        truncation: "auto",
        ...(managed ? { context_management: [{ type: "compaction" }] } : {}),
        ...(previous ? { previous_response_id: previous } : {}),
      }),
    });
    const body = (await r.json()) as {
      id?: string;
      output?: { type: string; call_id?: string }[];
      usage?: { input_tokens: number; input_tokens_details: { cached_tokens: number } };
    };
    const call = body.output?.find((i) => i.type === "function_call");
    if (!r.ok || !body.id || !call?.call_id)
      throw new Error(`agent step ${s}: ${r.status} ${JSON.stringify(body).slice(0, 300)}`);
    steps.push(performance.now() - t);
    prompt += body.usage!.input_tokens;
    cached += body.usage!.input_tokens_details.cached_tokens;
    if (body.output![0]!.type === "compaction") compactions++;
    previous = body.id;
    input = [
      {
        type: "function_call_output",
        call_id: call.call_id,
        output: toolResultText(task, s, TOOL_OUTPUT_WORDS),
      },
    ];
  }
  return {
    loopMs: performance.now() - t0,
    slowestMs: Math.max(...steps),
    cachedShare: cached / prompt,
    compactions,
  };
}

/** A streamed `POST /v1/responses` on `base`, read to its end: ms, and the events it sent. */
async function streamed(
  base: string,
  background: boolean,
): Promise<{ ms: number; events: number }> {
  const t0 = performance.now();
  const r = await fetch(`${base}/v1/responses`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      model: SERVE_MODEL,
      input: PROMPTS[1],
      max_output_tokens: STREAM_OUTPUT,
      temperature: 0,
      stream: true,
      ...(background ? { background: true } : {}),
    }),
  });
  const text = await r.text();
  const ms = performance.now() - t0;
  const last = /event: (response\.[a-z_.]+)\n[^\n]*\n\n$/.exec(text)?.[1];
  if (!r.ok || (last !== "response.completed" && last !== "response.incomplete"))
    throw new Error(`streamed response: ${r.status}, ended with ${last}: ${text.slice(-300)}`);
  return { ms, events: text.match(/^event: /gm)?.length ?? 0 };
}

const median = (xs: number[]) => stats(xs).median;

/** A conversation of TURNS turns on `base`; each turn's latency (ms). */
async function conversation(base: string): Promise<number[]> {
  const ms: number[] = [];
  let previous: string | null = null;
  for (let t = 0; t < TURNS; t++) {
    const t0 = performance.now();
    const r = await fetch(`${base}/v1/responses`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: SERVE_MODEL,
        input: PROMPTS[t % PROMPTS.length],
        max_output_tokens: OUTPUT,
        temperature: 0,
        ...(previous ? { previous_response_id: previous } : {}),
      }),
    });
    const body = (await r.json()) as { id?: string; error?: unknown };
    if (!r.ok || !body.id) throw new Error(`turn ${t}: ${r.status} ${JSON.stringify(body)}`);
    ms.push(performance.now() - t0);
    previous = body.id;
  }
  return ms;
}

/** A kept response of a conversation `depth` turns deep, as the gateway keeps one. */
function keptOf(depth: number): Kept {
  const text = (t: number, who: string) =>
    `${who} ${t}: ${"lorem ipsum dolor sit amet ".repeat(Math.ceil(TURN_CHARS / 2 / 27))}`.slice(
      0,
      TURN_CHARS / 2,
    );
  const conversation = Array.from({ length: depth }, (_, t) => [
    { role: "user" as const, content: text(t, "user") },
    { role: "assistant" as const, content: text(t, "assistant") },
  ]).flat();
  const answer = conversation.at(-1)!.content;
  return {
    conversation,
    response: {
      id: "resp_x",
      object: "response",
      status: "completed",
      output: [{ type: "message", content: [{ type: "output_text", text: answer }] }],
      usage: { input_tokens: depth * 100, output_tokens: 50 },
    },
    inputItems: [{ id: "msg_x", type: "message", role: "user", content: text(depth, "user") }],
    owner: "",
  };
}

/** A turn of a conversation as its items (a user message, the answer's message item). */
function turnItems(t: number): ConversationItem[] {
  const text = (who: string) =>
    `${who} ${t}: ${"lorem ipsum dolor sit amet ".repeat(Math.ceil(TURN_CHARS / 2 / 27))}`.slice(
      0,
      TURN_CHARS / 2,
    );
  return [
    {
      id: `msg_u${t}`,
      type: "message",
      role: "user",
      content: [{ type: "input_text", text: text("user") }],
      status: "completed",
    },
    {
      id: `msg_a${t}`,
      type: "message",
      role: "assistant",
      status: "completed",
      content: [{ type: "output_text", text: text("assistant"), annotations: [], logprobs: [] }],
    },
  ];
}

/**
 * CONV_ITERATIONS turns on conversations of `depth` turns in `logs` (each made afresh, a
 * record a turn, not timed): the median µs of a turn's find and add, as the first turn a
 * gateway serves in it (`first`: the whole log read and folded) and as the next one (`next`:
 * the gateway found it at the turn before, then added that turn's record; only that record
 * is read and folded).
 */
function conversationTurns(logs: ConversationLogs, depth: number): { first: number; next: number } {
  const times = { first: [] as number[], next: [] as number[] };
  const turn = (conversations: Conversations, id: string, t: number) => {
    const t0 = performance.now();
    const found = conversations.find("", id);
    if (found?.items.length !== 2 * t) throw new Error(`conversation ${id} lost items`);
    conversations.add(id, turnItems(t));
    return (performance.now() - t0) * 1000;
  };
  for (let i = 0; i < CONV_ITERATIONS; i++) {
    const conversations = new Conversations(logs); // (nothing folded yet: a gateway started)
    const c = conversations.make("", {}, []);
    for (let t = 0; t < depth - 1; t++) conversations.append(c.id, turnItems(t));
    times.first.push(turn(conversations, c.id, depth - 1));
    times.next.push(turn(conversations, c.id, depth));
    conversations.delete(c.id);
  }
  return { first: median(times.first), next: median(times.next) };
}

/** Stored completion `i` of a list (~1 KiB as kept), made at `t`; every 10th tagged. */
function storedOf(i: number, t: number): StoredCompletion {
  const id = completionId(t);
  const text = `answer ${i}: ${"lorem ipsum dolor sit amet ".repeat(12)}`;
  return {
    owner: "",
    completion: {
      id,
      object: "chat.completion",
      created: Math.floor(t / 1000),
      model: "mini-v3",
      choices: [
        { index: 0, message: { role: "assistant", content: text }, finish_reason: "length" },
      ],
      usage: { prompt_tokens: 40, completion_tokens: 64, total_tokens: 104 },
      metadata: i % 10 === 0 ? { tag: "x", n: String(i) } : { n: String(i) },
    },
    messages: [{ id: `${id}-0`, role: "user", content: `question ${i}`, content_parts: null }],
  };
}

/** The median µs of LIST_ITERATIONS calls of `page`, each checked to give `want`. */
function pageTimes(page: () => { data: unknown[] }, want: number): number {
  const times: number[] = [];
  for (let i = 0; i < LIST_ITERATIONS; i++) {
    const t0 = performance.now();
    const got = page();
    times.push((performance.now() - t0) * 1000);
    if (got.data.length !== want) throw new Error(`a page of ${got.data.length}, not ${want}`);
  }
  return median(times);
}

/** The ADR's rejected option: every file of `dir` read and parsed, the 20 newest taken. */
function readAllPage(dir: string): { data: unknown[] } {
  const all = readdirSync(dir)
    .filter((n) => n.endsWith(".json"))
    .map((n) => (JSON.parse(readFileSync(join(dir, n), "utf8")) as StoredCompletion).completion);
  all.sort((a, b) => b.created - a.created || (b.id < a.id ? -1 : 1));
  return { data: all.slice(0, 20) };
}

/** 4. Pages of LIST_SIZES stored completions in memory, in the folder, and read whole. */
function listRows(dir: string, rounds: number, log: (s: string) => void) {
  const rows: NonNullable<ResponsesResults["lists"]> = [];
  for (const size of LIST_SIZES) {
    const root = join(dir, `lists-${size}`);
    const memory = new MemoryCompletions(size);
    const folder = new FolderCompletions(root, null);
    const t0 = Date.now() - size;
    for (let i = 0; i < size; i++) {
      const s = storedOf(i, t0 + i);
      memory.put(s);
      folder.put(s);
    }
    const newest = { order: "desc" as const, limit: 20 };
    const tagged = { ...newest, metadata: [["tag", "x"]] as [string, string][] };
    const sides: Record<string, () => { data: unknown[] }> = {
      memory: () => listCompletions(memory, "", newest),
      folder: () => listCompletions(folder, "", newest),
      folderFiltered: () => listCompletions(folder as StoredCompletions, "", tagged),
      readAll: () => readAllPage(join(root, "chat-completions", "_")),
    };
    const acc: Record<string, number[]> = Object.fromEntries(
      Object.keys(sides).map((side) => [side, [] as number[]]),
    );
    const want = (side: string) => Math.min(20, side === "folderFiltered" ? size / 10 : size);
    for (const side of Object.keys(sides)) pageTimes(sides[side]!, want(side)); // (warm-up of each)
    for (let round = 0; round < rounds; round++) {
      const order = Object.keys(sides);
      if (round % 2 === 1) order.reverse();
      for (const side of order) acc[side]!.push(pageTimes(sides[side]!, want(side)));
    }
    folder.close();
    const row = {
      size,
      memoryUs: stats(acc["memory"]!),
      folderUs: stats(acc["folder"]!),
      folderFilteredUs: stats(acc["folderFiltered"]!),
      readAllUs: stats(acc["readAll"]!),
    };
    rows.push(row);
    log(
      `[responses] a page of 20 of ${size} stored completions: memory ${row.memoryUs.median.toFixed(1)} µs, folder ${row.folderUs.median.toFixed(1)} µs (filtered ${row.folderFilteredUs.median.toFixed(1)} µs), every file read ${row.readAllUs.median.toFixed(1)} µs`,
    );
    rmSync(root, { recursive: true, force: true });
  }
  return rows;
}

/** ITERATIONS turns of store work on `store` (read the last, keep the next); µs per turn. */
function storeTurns(store: KeptResponses, kept: Kept, tag: string): number {
  const times: number[] = [];
  const id = (i: number) => `resp_${tag}${i.toString(16).padStart(24 - tag.length, "0")}`;
  store.put(id(0), kept);
  for (let i = 1; i <= ITERATIONS; i++) {
    const t0 = performance.now();
    const last = store.get(id(i - 1));
    if (!last) throw new Error(`store lost ${id(i - 1)}`);
    store.put(id(i), kept);
    times.push((performance.now() - t0) * 1000);
    store.delete(id(i - 1)); // (the folder stays one response big)
  }
  store.delete(id(ITERATIONS));
  return median(times);
}

export async function runResponses(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<ResponsesResults> {
  const rounds = o.quick ? 1 : o.runs;
  const dir = mkdtempSync(join(tmpdir(), "expertmesh-bench-responses-"));
  const children: ChildProcess[] = [];
  try {
    // 2. The store alone first (no gateway running beside it).
    const store: ResponsesResults["store"] = [];
    const files = new ResponseFiles(join(dir, "store"), null);
    try {
      for (const depth of DEPTHS) {
        const kept = keptOf(depth);
        const memory = new ResponseStore(1000);
        storeTurns(memory, kept, "a"); // (warm-up of each)
        storeTurns(files, kept, "b");
        const acc = { memory: [] as number[], folder: [] as number[] };
        for (let round = 0; round < rounds; round++) {
          if (round % 2 === 0) {
            acc.memory.push(storeTurns(memory, kept, "a"));
            acc.folder.push(storeTurns(files, kept, "b"));
          } else {
            acc.folder.push(storeTurns(files, kept, "b"));
            acc.memory.push(storeTurns(memory, kept, "a"));
          }
        }
        // A conversation of the same depth, a record a turn (memory and folder alternating).
        const convMemory = new MemoryLogs(1000);
        const convFolder = new FolderLogs(join(dir, "store"), null);
        const conv = {
          memory: { first: [] as number[], next: [] as number[] },
          folder: { first: [] as number[], next: [] as number[] },
        };
        conversationTurns(convMemory, depth); // (warm-up of each)
        conversationTurns(convFolder, depth);
        for (let round = 0; round < rounds; round++)
          for (const side of round % 2 === 0
            ? (["memory", "folder"] as const)
            : (["folder", "memory"] as const)) {
            const t = conversationTurns(side === "memory" ? convMemory : convFolder, depth);
            conv[side].first.push(t.first);
            conv[side].next.push(t.next);
          }
        const row = {
          depth,
          keptBytes: Buffer.byteLength(JSON.stringify(kept)),
          memoryUs: stats(acc.memory),
          folderUs: stats(acc.folder),
          conversationMemoryUs: stats(conv.memory.next),
          conversationFolderUs: stats(conv.folder.next),
          conversationMemoryFirstUs: stats(conv.memory.first),
          conversationFolderFirstUs: stats(conv.folder.first),
        };
        store.push(row);
        o.log(
          `[responses] store, ${depth} turns (${(row.keptBytes / 1024).toFixed(1)} KiB): memory ${row.memoryUs.median.toFixed(1)} µs, folder ${row.folderUs.median.toFixed(1)} µs a turn; a conversation: memory ${row.conversationMemoryUs.median.toFixed(1)} µs, folder ${row.conversationFolderUs.median.toFixed(1)} µs`,
        );
      }
    } finally {
      files.close();
    }
    const lists = listRows(dir, rounds, o.log);

    // 1. Conversations through two gateways.
    const modelDir = await ensureMiniModel(o.log);
    o.log("[responses] starting two gateways on mini-v3: responses in memory, in a folder");
    const memoryBase = await localGateway("gateway-responses-memory", modelDir, [], children);
    const folderBase = await localGateway(
      "gateway-responses-folder",
      modelDir,
      [`--files-dir=${join(dir, "folder")}`],
      children,
    );
    await conversation(memoryBase);
    await conversation(folderBase);
    const acc = { memory: [] as number[], folder: [] as number[] };
    for (let round = 0; round < rounds; round++) {
      const sides =
        round % 2 === 0
          ? ([
              ["memory", memoryBase],
              ["folder", folderBase],
            ] as const)
          : ([
              ["folder", folderBase],
              ["memory", memoryBase],
            ] as const);
      for (const [side, base] of sides) acc[side].push(median(await conversation(base)));
      o.log(
        `[responses] round ${round + 1}/${rounds}: a turn ${acc.memory.at(-1)!.toFixed(1)} ms (memory), ${acc.folder.at(-1)!.toFixed(1)} ms (folder)`,
      );
    }

    // 3. Streamed in the foreground and with background, on each gateway.
    const bases = { memory: memoryBase, folder: folderBase };
    const times = {
      memory: { foreground: [] as number[], background: [] as number[] },
      folder: { foreground: [] as number[], background: [] as number[] },
    };
    let events = 0;
    for (const side of ["memory", "folder"] as const)
      for (const bg of [false, true]) await streamed(bases[side], bg); // (warm-up)
    for (let round = 0; round < rounds; round++) {
      for (const side of ["memory", "folder"] as const) {
        const acc2 = { foreground: [] as number[], background: [] as number[] };
        for (let i = 0; i < STREAMS; i++)
          for (const bg of (round + i) % 2 === 0 ? [false, true] : [true, false]) {
            const one = await streamed(bases[side], bg);
            acc2[bg ? "background" : "foreground"].push(one.ms);
            if (bg) events = one.events;
          }
        times[side].foreground.push(median(acc2.foreground));
        times[side].background.push(median(acc2.background));
      }
      o.log(
        `[responses] round ${round + 1}/${rounds}: streamed ${STREAM_OUTPUT} tokens, memory ${times.memory.foreground.at(-1)!.toFixed(1)} ms foreground / ${times.memory.background.at(-1)!.toFixed(1)} ms background, folder ${times.folder.foreground.at(-1)!.toFixed(1)} / ${times.folder.background.at(-1)!.toFixed(1)} ms`,
      );
    }
    // 5. An agent's loop past the context: truncation "auto" against compaction.
    const agentBase = await localGateway(
      "gateway-responses-agent",
      modelDir,
      [`--max-model-len=${AGENT_CONTEXT}`],
      children,
    );
    await agentLoop(agentBase, false); // (warm-up of each)
    await agentLoop(agentBase, true);
    const agentAcc = {
      truncation: [] as Awaited<ReturnType<typeof agentLoop>>[],
      compaction: [] as Awaited<ReturnType<typeof agentLoop>>[],
    };
    for (let round = 0; round < rounds; round++) {
      for (const managed of round % 2 === 0 ? [false, true] : [true, false])
        agentAcc[managed ? "compaction" : "truncation"].push(await agentLoop(agentBase, managed));
      const [a, b] = [agentAcc.truncation.at(-1)!, agentAcc.compaction.at(-1)!];
      o.log(
        `[responses] round ${round + 1}/${rounds}: agent loop of ${AGENT_STEPS} steps, truncation ${a.loopMs.toFixed(0)} ms (${(a.cachedShare * 100).toFixed(0)} % cached), compaction ${b.loopMs.toFixed(0)} ms (${(b.cachedShare * 100).toFixed(0)} % cached, ${b.compactions} compactions)`,
      );
    }
    const side = (xs: Awaited<ReturnType<typeof agentLoop>>[]): AgentSide => ({
      loopMs: stats(xs.map((x) => x.loopMs)),
      slowestStepMs: stats(xs.map((x) => x.slowestMs)),
      cachedShare: stats(xs.map((x) => x.cachedShare)),
      compactions: stats(xs.map((x) => x.compactions)),
    });
    return {
      runs: rounds,
      agent: { truncation: side(agentAcc.truncation), compaction: side(agentAcc.compaction) },
      memoryTurnMs: stats(acc.memory),
      folderTurnMs: stats(acc.folder),
      store,
      lists,
      streamed: {
        memory: {
          foregroundMs: stats(times.memory.foreground),
          backgroundMs: stats(times.memory.background),
        },
        folder: {
          foregroundMs: stats(times.folder.foreground),
          backgroundMs: stats(times.folder.background),
        },
        events,
      },
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The suite's tables for BENCHMARKS.md. */
export function responsesTables(
  r: ResponsesResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const ratio = (a: Stats, b: Stats) => (a.median / b.median).toFixed(2);
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} rounds (sides alternating), after a warm-up of each; from \`${source}\`. Medians (min-max) over rounds.

A conversation of ${TURNS} turns (\`previous_response_id\`, ${OUTPUT} output tokens each, greedy) through a mini-v3 single-process gateway keeping responses in memory (the peer) and one keeping them in \`--files-dir\` (local disk); per round, the median turn:

| responses kept in | a turn (ms) | against memory |
|---|---:|---:|
| memory (peer) | ${medianRange(r.memoryTurnMs, 1)} | 1.00x |
| the files folder | ${medianRange(r.folderTurnMs, 1)} | **${ratio(r.folderTurnMs, r.memoryTurnMs)}x** |

The store alone, in one process: a turn's store work (read the response continued, keep the new one) for a conversation of each depth (~${TURN_CHARS} characters a turn), ${ITERATIONS} turns per side and round; per round, the median turn:

| conversation | kept response | memory (µs, peer) | folder (µs) | folder against memory |
|---:|---:|---:|---:|---:|
${r.store
  .map(
    (s) =>
      `| ${s.depth} turn${s.depth === 1 ? "" : "s"} | ${(s.keptBytes / 1024).toFixed(1)} KiB | ${medianRange(s.memoryUs, 1)} | ${medianRange(s.folderUs, 1)} | **${ratio(s.folderUs, s.memoryUs)}x** |`,
  )
  .join(
    "\n",
  )}${r.store[0]?.conversationMemoryUs ? conversationTable(r.store) : ""}${r.streamed ? streamedTable(r.streamed) : ""}${r.lists ? listsTable(r.lists) : ""}${r.agent ? agentTable(r.agent) : ""}`;
}

function listsTable(rows: NonNullable<ResponsesResults["lists"]>): string {
  const us = (x: Stats) => medianRange(x, 1);
  return `

A page of stored chat completions (\`store: true\`, ADR 0055): the 20 newest of one key's (\`GET /v1/chat/completions?order=desc\`, ~1 KiB each as kept), in memory, in the files folder (the key's folder listed and sorted by the time-ordered ids, the page's files read), the same filtered by a tag one in 10 carries (\`metadata[tag]=x\`), and the peer the ADR chose against (every file read and parsed, sorted by \`created\`); ${LIST_ITERATIONS} pages per side and round, the median:

| stored | memory (µs) | folder (µs) | folder, filtered (µs) | every file read (µs, peer) | folder against peer |
|---:|---:|---:|---:|---:|---:|
${rows
  .map(
    (r) =>
      `| ${r.size} | ${us(r.memoryUs)} | ${us(r.folderUs)} | ${us(r.folderFilteredUs)} | ${us(r.readAllUs)} | **${(r.folderUs.median / r.readAllUs.median).toFixed(3)}x** |`,
  )
  .join("\n")}`;
}

function conversationTable(rows: ResponsesResults["store"]): string {
  const ratio = (a: Stats, b: Stats) => (a.median / b.median).toFixed(2);
  return `

The same turn kept in a conversation instead (\`conversation\`, ADR 0053: a log of records, a record a turn; the conversation found, then the turn's items appended), ${CONV_ITERATIONS} turns per side and round on conversations made afresh at each depth: a turn after the gateway found the conversation at the turn before (the records since read and folded on what it keeps folded), against the response store of the same place (above) as the peer; and the first turn a gateway serves in it (the whole log read and folded):

| conversation | in memory (µs) | against responses in memory | in the folder (µs) | against responses in the folder | first turn on a gateway, memory / folder (µs) |
|---:|---:|---:|---:|---:|---:|
${rows
  .map(
    (s) =>
      `| ${s.depth} turn${s.depth === 1 ? "" : "s"} | ${medianRange(s.conversationMemoryUs!, 1)} | **${ratio(s.conversationMemoryUs!, s.memoryUs)}x** | ${medianRange(s.conversationFolderUs!, 1)} | **${ratio(s.conversationFolderUs!, s.folderUs)}x** | ${s.conversationMemoryFirstUs ? `${s.conversationMemoryFirstUs.median.toFixed(1)} / ${s.conversationFolderFirstUs!.median.toFixed(1)}` : "-"} |`,
  )
  .join("\n")}`;
}

function streamedTable(s: NonNullable<ResponsesResults["streamed"]>): string {
  const row = (where: string, x: { foregroundMs: Stats; backgroundMs: Stats }) =>
    `| ${where} | ${medianRange(x.foregroundMs, 1)} | ${medianRange(x.backgroundMs, 1)} | **${(x.backgroundMs.median / x.foregroundMs.median).toFixed(2)}x** |`;
  return `

A streamed response (${STREAM_OUTPUT} output tokens, greedy; ${s.events} events) read to its last event, in the foreground (the peer: its events written to the client only) and with \`background\` (its events kept in a log the client follows; in the folder also appended to \`<id>.events\` every 50 ms); per round, the median of ${STREAMS} of each, alternating:

| responses kept in | foreground (ms, peer) | background (ms) | background against foreground |
|---|---:|---:|---:|
${row("memory", s.memory)}
${row("the files folder", s.folder)}`;
}

function agentTable(a: NonNullable<ResponsesResults["agent"]>): string {
  const row = (what: string, x: AgentSide, peer: AgentSide) =>
    `| ${what} | ${medianRange(x.loopMs, 0)} | **${(x.loopMs.median / peer.loopMs.median).toFixed(2)}x** | ${medianRange(x.slowestStepMs, 0)} | ${(x.cachedShare.median * 100).toFixed(0)} % | ${x.compactions.median} |`;
  return `

An agent's loop past the context (server-side compaction, ADR 0058): a mini-v3 gateway with a context of ${AGENT_CONTEXT} tokens; one user message, then ${AGENT_STEPS} steps, each a required call of a tool (\`previous_response_id\`, greedy) answered with an output of ~${TOOL_OUTPUT_WORDS} words that the next step sends, so the loop outgrows the context within a few steps. The peer keeps it in the context with \`truncation: "auto"\` (the oldest items dropped, every step once full); against it \`context_management\` (the default threshold, three quarters of the context: the steps before the last summarized, up to a quarter of the context, by the model). Per round, the whole loop, its slowest step, the share of all prompt tokens (the summaries' included) served from the prefix cache, and the compactions:

| kept in the context by | the loop (ms) | against truncation | slowest step (ms) | prompt tokens cached | compactions |
|---|---:|---:|---:|---:|---:|
${row("truncation: auto (peer)", a.truncation, a.truncation)}
${row("context_management", a.compaction, a.truncation)}`;
}
