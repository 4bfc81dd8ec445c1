// DeepSeek-R1's thinking apart from its answer (src/gateway/reasoning.ts) and a chat
// choice's reader (src/gateway/chat-output.ts): hand cases, then random texts built from
// the markers' pieces split as a direct reading splits them, whole or pushed in random
// pieces, and a streamed choice's deltas adding up to the whole response's message; then
// grammars that let the model think first (ThinkThen): hand cases and exact masks.
import { describe, expect, it } from "vitest";
import { type ChatDelta, ChatOutput } from "../../src/gateway/chat-output.ts";
import { runBytes, type TokenBytes, vocabularyFor } from "../../src/gateway/grammar.ts";
import { jsonObjectGrammar } from "../../src/gateway/json-mode.ts";
import { schemaGrammar } from "../../src/gateway/json-schema.ts";
import {
  effortKwargs,
  ReasoningParser,
  splitReasoning,
  ThinkingBudget,
  type ThinkState,
  thinkingFirst,
} from "../../src/gateway/reasoning.ts";
import { toolCallGrammar } from "../../src/gateway/tool-calls.ts";
import { Prng } from "../../src/model/prng.ts";
import { tinyTokenizerConfigJson, tinyTokenizerJson } from "../../src/model/tiny-tokenizer.ts";
import { TOOL_TOKENS, Tokenizer } from "../../src/model/tokenizer.ts";
import { expectExactMasks, randomPieces, textUnits } from "../support/grammar.ts";

const T = TOOL_TOKENS;

describe("the reasoning split", () => {
  it.each([
    [
      "tags, then the answer",
      "<think>\nLet me see.</think>\n\nIt is 4.",
      "\nLet me see.",
      "\n\nIt is 4.",
    ],
    ["no opening tag (the template wrote it)", "Hmm.</think>Yes.", "Hmm.", "Yes."],
    ["an opening tag after whitespace", "\n <think>x</think>y", "x", "y"],
    ["thinking never closed: all reasoning", "<think>still thinking", "still thinking", ""],
    ["an empty thought", "<think></think>Answer", "", "Answer"],
    ["a second closing tag belongs to the answer", "a</think>b</think>c", "a", "b</think>c"],
    ["a tag's start at the end stays reasoning", "a </thi", "a </thi", ""],
    ["calls end the thinking too", `plan${T.callsBegin}x`, "plan", `${T.callsBegin}x`],
    ["the first of the two ends it", `a</think>b${T.callsBegin}`, "a", `b${T.callsBegin}`],
    ["only the start of <think>", "<thi", "<thi", ""],
  ])("%s", (_what, text, reasoning, content) => {
    expect(splitReasoning(text)).toEqual({ reasoning, content });
  });

  /** A direct reading: an optional leading <think>, then up to the first end marker. */
  function oracle(text: string) {
    const body = /^\s*<think>/.test(text) ? text.replace(/^\s*<think>/, "") : text;
    const close = body.indexOf("</think>");
    const calls = body.indexOf(T.callsBegin);
    const ends = [close, calls].filter((i) => i >= 0);
    if (ends.length === 0) return { reasoning: body, content: "" };
    const at = Math.min(...ends);
    return {
      reasoning: body.slice(0, at),
      content: body.slice(at === close ? at + "</think>".length : at),
    };
  }

  const PIECES = [
    "<think>",
    "</think>",
    "<",
    "</",
    "think",
    ">",
    "a b",
    "\n",
    " ",
    T.callsBegin,
    "<｜tool",
    "é",
  ];
  const rng = new Prng(5, "reasoning");
  const texts = Array.from({ length: 400 }, () =>
    Array.from(
      { length: 1 + Math.floor(rng.uniform() * 12) },
      () => PIECES[Math.floor(rng.uniform() * PIECES.length)]!,
    ).join(""),
  );

  it("splits 400 random texts as a direct reading does, whole and in random pieces", () => {
    let closed = 0;
    for (const text of texts) {
      const want = oracle(text);
      expect(splitReasoning(text), JSON.stringify(text)).toEqual(want);
      const p = new ReasoningParser();
      let reasoning = "";
      let content = "";
      for (const piece of randomPieces(text, rng, 6)) {
        const r = p.push(piece);
        reasoning += r.reasoning;
        content += r.content;
      }
      const r = p.end();
      expect(
        { reasoning: reasoning + r.reasoning, content: content + r.content },
        JSON.stringify(text),
      ).toEqual(want);
      if (want.content) closed++;
    }
    expect(closed).toBeGreaterThan(100);
  });
});

describe("a chat choice's reader", () => {
  const call = (name: string, args: string) =>
    `${T.callBegin}function${T.sep}${name}\n\`\`\`json\n${args}\n\`\`\`${T.callEnd}`;

  /** The message the deltas of a stream add up to (as a client accumulates them). */
  function accumulate(first: Record<string, unknown>, deltas: ChatDelta[], reasoning: boolean) {
    let content = "";
    let thought = "";
    const calls: { id: string; type: string; function: { name: string; arguments: string } }[] = [];
    const head = first["tool_calls"] as { id: string; function: { name: string } }[] | undefined;
    if (head)
      calls.push({
        id: head[0]!.id,
        type: "function",
        function: { name: head[0]!.function.name, arguments: "" },
      });
    for (const d of deltas) {
      if ("content" in d) content += d.content;
      else if ("reasoning_content" in d) thought += d.reasoning_content;
      else
        for (const t of d.tool_calls) {
          if (t.id)
            calls[t.index] = {
              id: t.id,
              type: "function",
              function: { name: t.function.name!, arguments: "" },
            };
          calls[t.index]!.function.arguments += t.function.arguments;
        }
    }
    return {
      role: "assistant",
      content: calls.length > 0 && content.trim() === "" ? null : content,
      ...(reasoning ? { reasoning_content: thought } : {}),
      ...(calls.length > 0 ? { tool_calls: calls } : {}),
    };
  }

  const withoutIds = (m: Record<string, unknown>) =>
    JSON.parse(JSON.stringify(m, (k, v) => (k === "id" ? "call" : v))) as unknown;

  it.each([
    ["text", { tools: "text", reasoning: false }, "Hello", { role: "assistant", content: "Hello" }],
    [
      "thinking, then text",
      { tools: "text", reasoning: true },
      "<think>hm</think>Hi",
      { role: "assistant", content: "Hi", reasoning_content: "hm" },
    ],
    [
      "thinking, then a call",
      { tools: "calls", reasoning: true },
      `<think>need weather</think>\n${T.callsBegin}${call("get", '{"a":1}')}${T.callsEnd}`,
      {
        role: "assistant",
        content: null,
        reasoning_content: "need weather",
        tool_calls: [
          { id: "call", type: "function", function: { name: "get", arguments: '{"a":1}' } },
        ],
      },
    ],
    [
      "a call without closing the thought",
      { tools: "calls", reasoning: true },
      `thinking${T.callsBegin}${call("get", "{}")}${T.callsEnd}`,
      {
        role: "assistant",
        content: null,
        reasoning_content: "thinking",
        tool_calls: [{ id: "call", type: "function", function: { name: "get", arguments: "{}" } }],
      },
    ],
    [
      "a forced call's arguments",
      { tools: "arguments", forced: "get", reasoning: false },
      '{"a": 2}',
      {
        role: "assistant",
        content: null,
        tool_calls: [
          { id: "call", type: "function", function: { name: "get", arguments: '{"a": 2}' } },
        ],
      },
    ],
  ] as const)("reads %s; streamed deltas add up to the same message", (_what, o, text, want) => {
    const whole = new ChatOutput(o).message(text);
    expect(withoutIds(whole)).toEqual(want);
    for (let trial = 0; trial < 20; trial++) {
      const rng = new Prng(trial, "chat-output");
      const stream = new ChatOutput(o);
      const first = stream.first();
      const deltas: ChatDelta[] = [];
      for (const piece of randomPieces(text, rng, 8)) deltas.push(...stream.push(piece));
      deltas.push(...stream.end());
      expect(withoutIds(accumulate(first, deltas, o.reasoning))).toEqual(want);
    }
  });
});

describe("thinking before a grammar's answer (ThinkThen)", () => {
  const tok = new Tokenizer(tinyTokenizerJson(), tinyTokenizerConfigJson(256));
  const vocab = vocabularyFor(tok, 320)!;
  const json = thinkingFirst(jsonObjectGrammar(vocab));
  const a = json.automaton;
  /** Text through `g`'s automaton (added tokens by their text as one symbol each). */
  const check = (g: typeof json, text: string) => {
    const units = textUnits(tok, vocab, text);
    let s: unknown = g.automaton.start;
    for (let i = 0; i < units.length; i++) {
      s = g.automaton.step(s, units[i]!);
      if (s === null) return { refusedAt: i, done: false };
    }
    return { refusedAt: -1, done: g.automaton.isDone(s) };
  };

  it.each([
    ["a thought, then the object", '<think>\nhm, {"not": json</think>\n\n{"a": 1}', -1, true],
    ["no opening tag (the template wrote it)", "thinking</think>{}", -1, true],
    ["still thinking", "anything { goes", -1, false],
    ["a near miss of the closing tag", "</thin></think>{}", -1, true],
    ["text after the closing tag", "</think>x", 8, false],
    ["the end-of-sentence token while thinking", "hm<｜end▁of▁sentence｜>", 2, false],
  ] as const)("%s", (_what, text, refusedAt, done) => {
    expect(check(json, text)).toEqual({ refusedAt, done });
  });

  it("thinks before required calls too, and no tool token while thinking", () => {
    const tools = toolCallGrammar(vocab, [{ name: "f", parameters: { type: "object" } }], {
      mode: "required",
      parallel: false,
    })!;
    const g = thinkingFirst(tools);
    const call = `${TOOL_TOKENS.callsBegin}${TOOL_TOKENS.callBegin}function${TOOL_TOKENS.sep}f\n\`\`\`json\n{}\n\`\`\`${TOOL_TOKENS.callEnd}${TOOL_TOKENS.callsEnd}`;
    expect(check(g, `plan</think>\n\n${call}`)).toEqual({ refusedAt: -1, done: true });
    expect(check(g, `plan${TOOL_TOKENS.callsBegin}`)).toEqual({ refusedAt: 4, done: false });
  });

  it("masks: exact in thinking, after it and in the answer; the thinking's kept once for all answers", () => {
    const states: ThinkState<unknown>[] = [];
    let s = a.start as ThinkState<unknown> | null;
    for (const b of Buffer.from('<think>a </thi</think>\n {"k": "v", "n": [1')) {
      s = a.step(s!, b) as ThinkState<unknown> | null;
      states.push(s!);
    }
    expectExactMasks(json, a, states, vocab.bytes as readonly (TokenBytes | null)[], 320);
    const other = thinkingFirst(
      schemaGrammar(vocab, { type: "object", properties: { x: { type: "integer" } } }),
    );
    const computed = other.computed;
    expect(other.mask(other.automaton.start)).toBe(json.mask(a.start));
    expect(other.computed).toBe(computed);
    expect(runBytes(a, a.start, Buffer.from("x</think>{}"))).not.toBeNull();
  });
});

describe("thinking tags as added tokens (R1's and V3.1's tokenizers)", () => {
  // The tiny tokenizer with `<think>` and `</think>` added after its vocabulary, as DeepSeek's
  // tokenizers have them: the model writes each tag as that one token.
  const json = tinyTokenizerJson() as {
    added_tokens: Record<string, unknown>[];
    model: { vocab: Record<string, number> };
  };
  for (const [i, content] of ["<think>", "</think>"].entries()) {
    json.model.vocab[content] = 320 + i;
    json.added_tokens.push({
      id: 320 + i,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: false,
    });
  }
  const tok = new Tokenizer(json, tinyTokenizerConfigJson(256));
  const vocab = vocabularyFor(tok, 322)!;
  const g = thinkingFirst(jsonObjectGrammar(vocab));
  const a = g.automaton;
  const allows = (s: unknown, id: number) => ((g.mask(s)[id >>> 5]! >>> (id & 31)) & 1) === 1;

  it("encodes each tag as its token", () => {
    expect(tok.encode("</think>", false)).toEqual([321]);
  });

  it("the closing tag's token ends the thought; the opening one's may start it; no other", () => {
    const units = (text: string) => textUnits(tok, vocab, text);
    const run = (text: string) => {
      let s: unknown = a.start;
      for (const [i, u] of units(text).entries()) {
        s = a.step(s, u);
        if (s === null) return { refusedAt: i, done: false };
      }
      return { refusedAt: -1, done: a.isDone(s) };
    };
    expect(run('<think>\nhm</think>\n\n{"a": 1}')).toEqual({ refusedAt: -1, done: true });
    expect(run("hm</think>{}")).toEqual({ refusedAt: -1, done: true });
    // (the answer takes no tag: its JSON has no symbols)
    expect(run("hm</think>{}</think>")).toEqual({ refusedAt: 5, done: false });
    expect(run(`hm${TOOL_TOKENS.callsBegin}`)).toEqual({ refusedAt: 2, done: false });
    // The masks: both tags' tokens while thinking, neither in the answer.
    expect(allows(a.start, 321)).toBe(true);
    expect(allows(a.start, 320)).toBe(true);
    const answering = a.step(a.start, vocab.symbol("</think>")!)!;
    expect(allows(answering, 321)).toBe(false);
    expect(allows(answering, "{".charCodeAt(0) + 5)).toBe(true); // (byte tokens follow the 5 specials)
    const states: unknown[] = [];
    let s: unknown = a.start;
    for (const u of units("<think>x</think> {")) {
      s = a.step(s, u);
      states.push(s);
    }
    expectExactMasks(g, a, states, vocab.bytes as readonly (TokenBytes | null)[], 322);
  });
});

describe("a thinking budget (ThinkingBudget)", () => {
  const tok = new Tokenizer(tinyTokenizerJson(), tinyTokenizerConfigJson(256));
  const vocab = vocabularyFor(tok, 320)!;
  const close = tok.encode("</think>", false);
  const allowedIds = (c: ThinkingBudget) => {
    const m = c.allowed();
    const ids: number[] = [];
    for (let id = 0; id < 320; id++) if ((m[id >>> 5]! >>> (id & 31)) & 1) ids.push(id);
    return ids;
  };
  const word = (t: string) => tok.encode(t, false);

  it.each([
    ["cut at the budget", 3, "a b c d e f", 3],
    ["closed by the model first (the tag split over tokens)", 30, "ab</think>cd", -1],
    ["closed by the calls token", 30, `ab${TOOL_TOKENS.callsBegin}x`, -1],
    ["a budget of 0: closed at once", 0, "", 0],
  ] as const)("%s", (_what, budget, text, cutAt) => {
    const c = new ThinkingBudget({ budget, closeIds: close, vocabulary: vocab }, null);
    const ids = word(text);
    const forced: number[] = [];
    let i = 0;
    for (; i < ids.length && c.thinking; i++) {
      if (allowedIds(c).length === 1) break;
      expect(allowedIds(c)).toHaveLength(320);
      c.accept(ids[i]!);
    }
    if (cutAt < 0) {
      expect(c.thinking).toBe(false);
      expect(allowedIds(c)).toHaveLength(320);
      return;
    }
    expect(i).toBe(cutAt);
    // Forced: `</think>`'s tokens one by one, then anything.
    while (c.thinking) {
      const only = allowedIds(c);
      expect(only).toHaveLength(1);
      forced.push(only[0]!);
      c.accept(only[0]!);
    }
    expect(forced).toEqual(close);
    expect(allowedIds(c)).toHaveLength(320);
  });

  it("cut while the thought ends with the tag's start: only the rest of the tag is forced", () => {
    const rest = Array.from({ length: 8 }, (_, m) => tok.encode("</think>".slice(m), false));
    for (const [text, m] of [
      ["ab</th", 4],
      ["ab<", 1],
      ["ab</think", 7],
      ["ab", 0],
    ] as const) {
      const ids = word(text);
      const c = new ThinkingBudget(
        { budget: ids.length, closeIds: close, closeRest: rest, vocabulary: vocab },
        null,
      );
      for (const id of ids) c.accept(id);
      const forced: number[] = [];
      while (c.thinking) {
        const only = allowedIds(c);
        expect(only, text).toHaveLength(1);
        forced.push(only[0]!);
        c.accept(only[0]!);
      }
      expect(forced, text).toEqual(rest[m]);
      expect(tok.decode([...ids, ...forced]), text).toBe(`${text.slice(0, 2)}</think>`);
    }
  });

  it("a fork goes on alone; the request's grammar is told every token and shapes the answer", () => {
    const g = thinkingFirst(jsonObjectGrammar(vocab));
    /** The grammar's constraint, with what it was told. */
    class Told {
      told: number[] = [];
      s: unknown = g.automaton.start;
      allowed() {
        return g.mask(this.s);
      }
      accept(id: number) {
        this.told.push(id);
        this.s = runBytes(g.automaton, this.s, vocab.bytes[id]!);
        return g.automaton.isDone(this.s);
      }
      fork() {
        const f = new Told();
        f.s = this.s;
        return f;
      }
    }
    const inner = new Told();
    const c = new ThinkingBudget({ budget: 3, closeIds: close, vocabulary: vocab }, inner);
    const [x, y, z] = word("abc");
    c.accept(x!);
    c.accept(y!);
    const f = c.fork();
    c.accept(z!);
    expect(allowedIds(c)).toEqual([close[0]]);
    // The fork has thought two tokens: one more before its cut, its own.
    expect(allowedIds(f).length).toBeGreaterThan(1);
    f.accept(y!);
    expect(allowedIds(f)).toEqual([close[0]]);
    for (const id of close) c.accept(id);
    expect(inner.told).toEqual([x, y, z, ...close]);
    // After the thought: the JSON grammar's mask (an object's start, whitespace), not all.
    const after = allowedIds(c);
    expect(after.length).toBeLessThan(320);
    expect(after).toContain(word("{")[0]);
  });
});

describe("effortKwargs (reasoning_effort, reasoning.effort)", () => {
  it.each([
    ["no effort, no kwargs: none", null, undefined, undefined],
    ["no effort: the kwargs as given", undefined, { x: 1 }, { x: 1 }],
    ["an effort asks to think", "high", undefined, { thinking: true }],
    ["low and medium too", "low", null, { thinking: true }],
    ["none: nothing asked", "none", undefined, undefined],
    ["minimal: nothing asked", "minimal", { x: 1 }, { x: 1 }],
    ["the kwargs' own switch wins", "high", { thinking: false }, { thinking: false }],
    ["other kwargs kept beside it", "high", { x: 1 }, { thinking: true, x: 1 }],
  ] as const)("%s", (_what, effort, kwargs, want) => {
    expect(effortKwargs(effort, kwargs as Record<string, unknown> | null | undefined)).toEqual(
      want,
    );
  });
});
