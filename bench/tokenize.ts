// The tokenize suite: what a long prompt costs the gateway's event loop, encoded in place
// (the peer: what the gateway did before it had tokenizer workers) against on the
// PromptEncoder's worker thread. Every stream's tokens go out on that one loop, so its
// longest stall while a prompt is encoded is the extra inter-token latency every running
// stream sees. Per prompt size: the time to the ids (what the request waits) and the
// longest gap between two turns of the loop (a setImmediate chain) while encoding.
// The tokenizer is the tiny checkpoints' byte-level BPE (a real DeepSeek tokenizer is not
// available offline; its vocabulary is larger, its per-byte cost of the same order).
// Also the other way: a choice's text as its tokens arrive (OutputText, incremental: a
// window of the last tokens decoded) against decoding the whole output at every token (the
// peer: what the gateway did before), per output length.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PromptEncoder } from "../src/gateway/prompt-encoder.ts";
import { OutputText } from "../src/gateway/text.ts";
import { tinyTokenizerConfigJson, tinyTokenizerJson } from "../src/model/tiny-tokenizer.ts";
import { Tokenizer } from "../src/model/tokenizer.ts";
import { medianRange, type Stats, stats } from "./lib.ts";

export interface TokenizeRow {
  /** UTF-8 bytes of the prompt. */
  bytes: number;
  tokens: number;
  /** Milliseconds from the call to the ids. */
  inlineMs: Stats;
  workerMs: Stats;
  /** The longest gap between two turns of the event loop while encoding, ms. */
  inlineStallMs: Stats;
  workerStallMs: Stats;
}

export interface DetokenizeRow {
  /** Output tokens. */
  tokens: number;
  /** Mean milliseconds a token over the whole output, and over its last tenth. */
  incrementalMs: Stats;
  wholeMs: Stats;
  incrementalLastMs: Stats;
  wholeLastMs: Stats;
}

export interface AgentLoopRow {
  /** UTF-8 bytes of the conversation before the steps measured. */
  historyBytes: number;
  /** Prompt tokens of the last step. */
  tokens: number;
  /** Milliseconds from the call to the ids, a step: pieces kept encoded, and the peer without. */
  cachedMs: Stats;
  wholeMs: Stats;
  /** The longest gap between two turns of the event loop in a step, ms (absent before). */
  cachedStallMs?: Stats;
  wholeStallMs?: Stats;
  /** Of the counted steps' prompt tokens, the share taken from pieces kept encoded. */
  cachedShare: number;
}

export interface TokenizeResults {
  runs: number;
  inlineBytes: number;
  rows: TokenizeRow[];
  /** Absent in results written before it was measured. */
  detokenize?: DetokenizeRow[];
  /** Absent in results written before it was measured. */
  agentLoop?: AgentLoopRow[];
}

const HISTORIES = [64 << 10, 256 << 10, 1 << 20];
const QUICK_HISTORIES = [64 << 10];

/**
 * An agent's loop: a conversation of `historyBytes` (a system prompt, then turns of a call's
 * result and the model's answer), sent again at each step with one turn more, its chat
 * prompt encoded on the gateway's worker with pieces kept encoded against without (the
 * peer: the gateway before), the sides alternating on the same chat.
 */
async function agentLoop(
  tokenizer: Tokenizer,
  runs: number,
  histories: number[],
  log: (s: string) => void,
): Promise<AgentLoopRow[]> {
  const rows: AgentLoopRow[] = [];
  for (const historyBytes of histories) {
    const cached = new PromptEncoder(tokenizer, { workers: 1 });
    const whole = new PromptEncoder(tokenizer, { workers: 1, pieceCacheBytes: 0 });
    try {
      const turn = (i: number) => [
        { role: "user" as const, content: `Result ${i}: ${promptText(2048 + i)}` },
        { role: "assistant" as const, content: `Step ${i}: ${promptText(512 + i)}` },
      ];
      const chat: { role: "system" | "user" | "assistant"; content: string }[] = [
        { role: "system", content: promptText(4096) },
      ];
      let bytes = 0;
      for (let i = 0; bytes < historyBytes; i++) {
        const t = turn(i);
        chat.push(...t);
        bytes += t.reduce((n, m) => n + Buffer.byteLength(m.content), 0);
      }
      const ms = { cached: [] as number[], whole: [] as number[] };
      const stall = { cached: [] as number[], whole: [] as number[] };
      let tokens = 0;
      // 2 warm-up steps, then the counted ones; each step a turn more.
      let counted = { cached: 0, encoded: 0 };
      for (let run = -2; run < runs; run++) {
        chat.push(...turn(1000 + run));
        if (run === 0)
          counted = {
            cached: cached.stats.pieceTokensCached,
            encoded: cached.stats.pieceTokensEncoded,
          };
        const before = cached.stats.pieceTokensCached;
        for (const side of run % 2
          ? (["cached", "whole"] as const)
          : (["whole", "cached"] as const)) {
          const r = await withStall(async () => {
            tokens = (await (side === "cached" ? cached : whole).encodeChat(chat, true)).length;
          });
          if (run >= 0) {
            ms[side].push(r.ms);
            stall[side].push(r.stallMs);
          }
        }
        if (run >= 0 && cached.stats.pieceTokensCached === before)
          throw new Error("the step took nothing from the pieces kept encoded");
        if (cached.liveWorkers + whole.liveWorkers !== 2)
          throw new Error("a tokenizer worker failed: the steps would be encoded on the loop");
      }
      const fromKept = cached.stats.pieceTokensCached - counted.cached;
      const share = fromKept / (fromKept + cached.stats.pieceTokensEncoded - counted.encoded);
      const row = {
        historyBytes,
        tokens,
        cachedMs: stats(ms.cached),
        wholeMs: stats(ms.whole),
        cachedStallMs: stats(stall.cached),
        wholeStallMs: stats(stall.whole),
        cachedShare: share,
      };
      log(
        `[bench] agent loop ${historyBytes} B: pieces kept ${row.cachedMs.median.toFixed(1)} ms, whole ${row.wholeMs.median.toFixed(1)} ms`,
      );
      rows.push(row);
    } finally {
      await cached.close();
      await whole.close();
    }
  }
  return rows;
}

const OUTPUTS = [1000, 2000, 4000];
const QUICK_OUTPUTS = [1000];

/** A choice's text token by token, decoding the whole output each time (the former way). */
function wholeDecode(tokenizer: Tokenizer, ids: readonly number[], upTo: number): number {
  let chars = 0;
  for (let n = 1; n <= upTo; n++) chars = tokenizer.decode(ids.slice(0, n), true).length;
  return chars;
}

/** Per output length: ms a token over the output and over its last tenth, both ways. */
function detokenize(tokenizer: Tokenizer, runs: number, lengths: number[]): DetokenizeRow[] {
  const ids = tokenizer.encode(promptText(64 << 10), false);
  return lengths.map((tokens) => {
    const out = {
      inc: [] as number[],
      whole: [] as number[],
      incLast: [] as number[],
      wholeLast: [] as number[],
    };
    const tail = Math.floor(tokens / 10);
    for (let run = -1; run < runs; run++) {
      let t = performance.now();
      const text = new OutputText(tokenizer, []);
      for (let i = 0; i < tokens - tail; i++) text.push(ids[i]!);
      const tMid = performance.now();
      for (let i = tokens - tail; i < tokens; i++) text.push(ids[i]!);
      const inc = performance.now() - t;
      const incLast = performance.now() - tMid;
      t = performance.now();
      wholeDecode(tokenizer, ids, tokens - tail);
      const wMid = performance.now();
      let chars = 0;
      for (let n = tokens - tail + 1; n <= tokens; n++)
        chars = tokenizer.decode(ids.slice(0, n), true).length;
      const whole = performance.now() - t;
      const wholeLast = performance.now() - wMid;
      if (text.flush().length + text.text.length === 0 || chars !== text.text.length)
        throw new Error("the two ways gave different texts");
      if (run < 0) continue;
      out.inc.push(inc / tokens);
      out.whole.push(whole / tokens);
      out.incLast.push(incLast / tail);
      out.wholeLast.push(wholeLast / tail);
    }
    return {
      tokens,
      incrementalMs: stats(out.inc),
      wholeMs: stats(out.whole),
      incrementalLastMs: stats(out.incLast),
      wholeLastMs: stats(out.wholeLast),
    };
  });
}

const SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20];
const QUICK_SIZES = [4 << 10, 64 << 10];

/** English-like text of `bytes` bytes (words, punctuation, numbers), the same every run. */
export function promptText(bytes: number): string {
  const words =
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her she there been one all we their if has will".split(
      " ",
    );
  let seed = 12345;
  const next = () => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed >>> 8;
  };
  const parts: string[] = [];
  let n = 0;
  while (n < bytes) {
    const r = next();
    const w =
      r % 17 === 0 ? String(r % 100000) : (words[r % words.length] ?? "x") + (r % 11 ? "" : ",");
    const s = r % 23 === 0 ? `${w}.\n` : `${w} `;
    parts.push(s);
    n += s.length;
  }
  return parts.join("").slice(0, bytes);
}

/** Runs `fn` while a setImmediate chain measures the longest gap between loop turns. */
async function withStall<T>(fn: () => Promise<T>): Promise<{ ms: number; stallMs: number }> {
  let last = performance.now();
  let longest = 0;
  let running = true;
  const tick = () => {
    const now = performance.now();
    longest = Math.max(longest, now - last);
    last = now;
    if (running) setImmediate(tick);
  };
  setImmediate(tick);
  const t0 = performance.now();
  await fn();
  const ms = performance.now() - t0;
  running = false;
  // The gap that ends when the call returns counts too (an in-place encode is one gap).
  longest = Math.max(longest, performance.now() - last);
  return { ms, stallMs: longest };
}

export async function runTokenize(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<TokenizeResults> {
  const dir = mkdtempSync(join(tmpdir(), "em-bench-tok-"));
  writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tinyTokenizerJson()));
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(tinyTokenizerConfigJson(4096)));
  const tokenizer = Tokenizer.load(dir);
  const inlineBytes = 4096;
  const inline = new PromptEncoder(tokenizer, { workers: 0 });
  const worker = new PromptEncoder(tokenizer, { workers: 1, inlineBytes: inlineBytes - 1 });
  const rows: TokenizeRow[] = [];
  let loop: AgentLoopRow[] = [];
  try {
    for (const bytes of o.quick ? QUICK_SIZES : SIZES) {
      const text = promptText(bytes);
      const tokens = tokenizer.encode(text).length;
      const sides = { inline, worker };
      const ms = { inline: [] as number[], worker: [] as number[] };
      const stall = { inline: [] as number[], worker: [] as number[] };
      // 2 warm-up runs each, then the counted ones, the two sides alternating.
      for (let run = -2; run < o.runs; run++)
        for (const side of run % 2
          ? (["inline", "worker"] as const)
          : (["worker", "inline"] as const)) {
          const r = await withStall(() => sides[side].encode(text));
          if (run >= 0) {
            ms[side].push(r.ms);
            stall[side].push(r.stallMs);
          }
        }
      const row = {
        bytes,
        tokens,
        inlineMs: stats(ms.inline),
        workerMs: stats(ms.worker),
        inlineStallMs: stats(stall.inline),
        workerStallMs: stats(stall.worker),
      };
      o.log(
        `[bench] tokenize ${bytes} B: in place ${row.inlineMs.median.toFixed(1)} ms (stall ${row.inlineStallMs.median.toFixed(1)}), ` +
          `worker ${row.workerMs.median.toFixed(1)} ms (stall ${row.workerStallMs.median.toFixed(2)})`,
      );
      rows.push(row);
    }
    if (worker.stats.offloaded !== rows.length * (o.runs + 2))
      throw new Error(`the worker encoded ${worker.stats.offloaded} prompts, not all of them`);
    // (while the tokenizer's folder is there: the workers load it from there)
    loop = await agentLoop(tokenizer, o.runs, o.quick ? QUICK_HISTORIES : HISTORIES, o.log);
  } finally {
    await worker.close();
    rmSync(dir, { recursive: true, force: true });
  }
  const detok = detokenize(tokenizer, o.runs, o.quick ? QUICK_OUTPUTS : OUTPUTS);
  for (const d of detok)
    o.log(
      `[bench] detokenize ${d.tokens} tokens: incremental ${d.incrementalMs.median.toFixed(4)} ms a token, whole ${d.wholeMs.median.toFixed(4)}`,
    );
  return { runs: o.runs, inlineBytes, rows, detokenize: detok, agentLoop: loop };
}

const kib = (b: number) => (b >= 1 << 20 ? `${b / (1 << 20)} MiB` : `${b / 1024} KiB`);
const ms = medianRange;

/** The suite's table for BENCHMARKS.md. */
export function tokenizeTables(
  r: TokenizeResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const rows = r.rows
    .map(
      (x) =>
        `| ${kib(x.bytes)} | ${x.tokens} | ${ms(x.inlineMs)} | ${ms(x.workerMs)} | ${(x.workerMs.median / x.inlineMs.median).toFixed(2)}x | ${ms(x.inlineStallMs)} | ${ms(x.workerStallMs, 2)} | ${(x.workerStallMs.median / x.inlineStallMs.median).toFixed(3)}x |`,
    )
    .join("\n");
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} counted runs per side after 2 warm-ups, sides alternating; from \`${source}\`. Medians (min-max), milliseconds.

| prompt | tokens | time to ids, in place | on the worker | worker / in place | longest event-loop stall, in place | on the worker | worker / in place |
|---|---:|---:|---:|---:|---:|---:|---:|
${rows}${detokenizeTable(r)}${agentLoopTable(r)}`;
}

/** An agent's loop, pieces kept encoded against not (results written before have none). */
function agentLoopTable(r: TokenizeResults): string {
  if (!r.agentLoop) return "";
  const rows = r.agentLoop
    .map(
      (a) =>
        `| ${kib(a.historyBytes)} | ${a.tokens} | ${ms(a.cachedMs)} | ${ms(a.wholeMs)} | ${(a.cachedMs.median / a.wholeMs.median).toFixed(3)}x | ${(100 * a.cachedShare).toFixed(0)} % | ${a.cachedStallMs ? ms(a.cachedStallMs) : "-"} | ${a.wholeStallMs ? ms(a.wholeStallMs) : "-"} |`,
    )
    .join("\n");
  return `

An agent's loop (the same run, ${r.runs} counted steps after 2 warm-ups, sides alternating): a conversation of that much history sent again at each step with a turn more (a 2 KiB result, a 512 B answer), its chat prompt encoded on the gateway's worker with pieces kept encoded (\`--tokenizer-cache-mib\`, the default) against without (peer: the gateway before). Milliseconds a step, median (min-max); the longest event-loop stall in a step too (the template is rendered, and pieces are looked up and joined, on the loop).

| history | tokens | time to ids, pieces kept | whole (peer) | kept / peer | tokens from kept pieces | event-loop stall, pieces kept | whole (peer) |
|---:|---:|---:|---:|---:|---:|---:|---:|
${rows}`;
}

/** Output text as tokens arrive (results written before it was measured have none). */
function detokenizeTable(r: TokenizeResults): string {
  if (!r.detokenize) return "";
  const rows = r.detokenize
    .map(
      (d) =>
        `| ${d.tokens} | ${ms(d.incrementalMs, 4)} | ${ms(d.wholeMs, 4)} | ${(d.incrementalMs.median / d.wholeMs.median).toFixed(3)}x | ${ms(d.incrementalLastMs, 4)} | ${ms(d.wholeLastMs, 4)} | ${(d.incrementalLastMs.median / d.wholeLastMs.median).toFixed(3)}x |`,
    )
    .join("\n");
  return `

A choice's text as its tokens arrive (the same run, ${r.runs} counted runs after a warm-up): milliseconds a token on the event loop, median (min-max), over the whole output and over its last tenth; incremental (a window of the last tokens decoded) against decoding the whole output at every token (peer: the gateway before).

| output tokens | ms a token, incremental | whole output decoded (peer) | incremental / peer | last tenth: incremental | peer | incremental / peer |
|---:|---:|---:|---:|---:|---:|---:|
${rows}`;
}
