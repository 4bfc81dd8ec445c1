// Tool calls in DeepSeek's format (src/gateway/tool-calls.ts) over the tiny tokenizer's
// vocabulary, whose tool tokens are symbols: the automaton on hand-written outputs, its
// masks against checking every token, the JSON grammars never allowing a symbol, the
// parser against a regular-expression reading of random constrained outputs (whole and cut
// in random pieces), and the functions presented to a template that does not present them.
import { describe, expect, it } from "vitest";
import {
  GrammarConstraint,
  runBytes,
  SYMBOL_BASE,
  type TokenBytes,
  type TokenGrammar,
  vocabularyFor,
} from "../../src/gateway/grammar.ts";
import { jsonObjectGrammar } from "../../src/gateway/json-mode.ts";
import { schemaGrammar } from "../../src/gateway/json-schema.ts";
import { callsOrAnswer, prepareVocabulary } from "../../src/gateway/output-grammar.ts";
import { thinkingFirst } from "../../src/gateway/reasoning.ts";
import {
  formatCall,
  parseToolCalls,
  type ToolCallOptions,
  ToolCallParser,
  type ToolEvent,
  type ToolFunction,
  type ToolState,
  toolCallGrammar,
  toolsPrompt,
  withTools,
} from "../../src/gateway/tool-calls.ts";
import { Prng } from "../../src/model/prng.ts";
import { tinyTokenizerConfigJson, tinyTokenizerJson } from "../../src/model/tiny-tokenizer.ts";
import { TOOL_TOKENS, Tokenizer } from "../../src/model/tokenizer.ts";
import { expectExactMasks, randomPieces, textUnits } from "../support/grammar.ts";

const tok = new Tokenizer(tinyTokenizerJson(), tinyTokenizerConfigJson(256));
const V = 320;
const vocab = vocabularyFor(tok, V)!;
const T = TOOL_TOKENS;

const TOOLS: ToolFunction[] = [
  {
    name: "get_weather",
    parameters: {
      type: "object",
      properties: { city: { type: "string" }, days: { type: "integer" } },
      required: ["city", "days"],
    },
  },
  // A prefix of the other's name: the name trie has to wait for the newline.
  { name: "get", parameters: { type: "object", properties: {} } },
];

/** `text` as the automaton's units (added tokens as their symbols). */
const units = (text: string) => textUnits(tok, vocab, text);

const call = (name: string, args: string) =>
  `${T.callBegin}function${T.sep}${name}\n\`\`\`json\n${args}\n\`\`\`${T.callEnd}`;
const calls = (...c: string[]) => `${T.callsBegin}${c.join("\n")}${T.callsEnd}`;

/** `text` (or units) through the automaton: where it is refused (-1: never), and whether done. */
function check(
  text: string | number[],
  o: ToolCallOptions,
): { refusedAt: number; done: boolean; state: ToolState | null } {
  const a = toolCallGrammar(vocab, TOOLS, o)!.automaton;
  let s: ToolState | null = a.start;
  const u = typeof text === "string" ? units(text) : text;
  for (let i = 0; i < u.length; i++) {
    s = a.step(s, u[i]!);
    if (!s) return { refusedAt: i, done: false, state: null };
  }
  return { refusedAt: -1, done: a.isDone(s), state: s };
}

const AUTO: ToolCallOptions = { mode: "auto", parallel: true };
const REQUIRED: ToolCallOptions = { mode: "required", parallel: true };
const SINGLE: ToolCallOptions = { mode: "auto", parallel: false };
const NONE: ToolCallOptions = { mode: "none", parallel: true };

describe("the tool-call automaton", () => {
  const weather = call("get_weather", '{"city": "Paris", "days": 2}');
  it.each([
    ["text alone (auto)", "Let me see. <b>ok</b>", AUTO, false],
    ["text, then a call", `Checking.${calls(weather)}`, AUTO, true],
    ["a call at once", calls(call("get", "{}")), AUTO, true],
    ["two calls, a newline between", calls(weather, call("get", "{ }")), AUTO, true],
    [
      "two calls, nothing between",
      calls(weather).replace(T.callsEnd, call("get", "{}") + T.callsEnd),
      AUTO,
      true,
    ],
    ["required: a call", calls(weather), REQUIRED, true],
    ["one call when not parallel", calls(weather), SINGLE, true],
    ["text when none", "plain", NONE, false],
    ["the end-of-sentence token in text", `bye<｜end▁of▁sentence｜>`, AUTO, false],
    ["a near miss of the marker in text", "<｜tool▁calls▁begin| <｜tool▁calls▁begin", AUTO, false],
  ])("accepts %s", (_what, text, o, done) => {
    const r = check(text, o);
    expect(r.refusedAt).toBe(-1);
    expect(r.done).toBe(done);
  });

  // [what, a prefix taken whole, the rest: refused at its first unit, options]
  const refused: [string, string, string, ToolCallOptions][] = [
    ["required: text first", "", "Hi", REQUIRED],
    ["none: the calls token", "x", T.callsBegin, NONE],
    ["a second call when not parallel", T.callsBegin + weather, `\n${weather}`, SINGLE],
    ["another tool token in text", "x", T.callBegin, AUTO],
    ["an unknown function", `${T.callsBegin}${T.callBegin}function${T.sep}g`, "ot", AUTO],
    ["a name without its newline", `${T.callsBegin}${T.callBegin}function${T.sep}get`, "```", AUTO],
    ["another call type", `${T.callsBegin}${T.callBegin}f`, "n", AUTO],
    [
      "arguments against the schema",
      `${T.callsBegin}${call("get_weather", "").split("\n```json\n")[0]}\n\`\`\`json\n{"city": `,
      "1",
      AUTO,
    ],
    [
      "a token inside the arguments",
      `${T.callsBegin}${T.callBegin}function${T.sep}get\n\`\`\`json\n{`,
      T.sep,
      AUTO,
    ],
    ["text after the calls", calls(weather), "more", AUTO],
  ];
  it.each(refused)("refuses %s", (_what, prefix, rest, o) => {
    expect(check(prefix, o).refusedAt).toBe(-1);
    expect(check(prefix + rest, o).refusedAt).toBe(units(prefix).length);
  });

  it("refuses the marker spelled in bytes, at its last byte", () => {
    const bytes = [...Buffer.from(`a ${T.callsBegin}`)];
    expect(check(bytes, AUTO).refusedAt).toBe(bytes.length - 1);
    // One byte short is text; the whole marker after such a near miss is refused again.
    expect(check(bytes.slice(0, -1), AUTO).refusedAt).toBe(-1);
    const again = [...bytes.slice(0, -1), 0x3c, ...bytes.slice(2)];
    expect(check(again, AUTO).refusedAt).toBe(again.length - 1);
  });

  it("keys equal futures: text states are the marker bytes matched", () => {
    const a = toolCallGrammar(vocab, TOOLS, AUTO)!.automaton;
    expect(a.key(check("abc", AUTO).state!)).toBe(a.key(check("", AUTO).state!));
    expect(a.key(check("x<｜", AUTO).state!)).toBe(a.key(check("<｜", AUTO).state!));
    expect(a.key(check("<｜", AUTO).state!)).not.toBe(a.key(check("<", AUTO).state!));
  });
});

describe("calls or an answer under response_format (tool_choice auto)", () => {
  const schema = {
    type: "object",
    properties: { answer: { type: "string" } },
    required: ["answer"],
  };
  const grammar = () =>
    callsOrAnswer(
      toolCallGrammar(vocab, TOOLS, AUTO) as TokenGrammar<unknown>,
      schemaGrammar(vocab, schema) as TokenGrammar<unknown>,
    )!;
  /** Where `text` is refused (-1: never), and whether it is done. */
  const run = (text: string) => {
    const a = grammar().automaton;
    let st: unknown = a.start;
    const u = units(text);
    for (let i = 0; i < u.length; i++) {
      st = a.step(st, u[i]!);
      if (st === null) return { refusedAt: i, done: false };
    }
    return { refusedAt: -1, done: a.isDone(st) };
  };
  const weather = call("get_weather", '{"city": "Paris", "days": 2}');
  it.each([
    ["calls", calls(weather), true],
    ["an answer", '{"answer": "sunny"}', true],
    ["an answer's start", '{"answer": "sun', false],
  ])("accepts %s", (_what, text, done) => {
    expect(run(text)).toEqual({ refusedAt: -1, done });
  });
  it.each([
    ["free text first", "Sure", 0],
    ["the end-of-sentence token first", "<｜end▁of▁sentence｜>", 0],
    ["another tool token first", T.callBegin, 0],
    ["the calls token after the answer began", `{${T.callsBegin}`, 1],
    ["an answer against the schema", '{"other": 1}', 2],
    ["text after the calls", `${calls(weather)}more`, units(calls(weather)).length],
  ])("refuses %s", (_what, text, at) => {
    expect(run(text).refusedAt).toBe(at);
  });
  it("masks allow exactly the tokens it takes; the same grammar for the same parts", () => {
    const g = grammar();
    expect(grammar()).toBe(g);
    const a = g.automaton;
    const states: unknown[] = [a.start];
    for (const text of [calls(weather), '{"answer": "a\\"b"}']) {
      let st: unknown = a.start;
      for (const u of units(text)) {
        st = st === null ? null : a.step(st, u);
        if (st !== null) states.push(st);
      }
    }
    expectExactMasks(g, a, states, vocab.bytes as readonly (TokenBytes | null)[], V);
  });
});

/** A random constrained output: tokens drawn from each state's mask (a token at a time). */
function randomOutput(o: ToolCallOptions, rng: Prng, bias: (id: number) => number): number[] {
  const g = toolCallGrammar(vocab, TOOLS, o)!;
  const c = new GrammarConstraint(g);
  const ids: number[] = [];
  for (let n = 0; n < 200; n++) {
    const mask = c.allowed();
    const allowed: number[] = [];
    const weights: number[] = [];
    for (let id = 0; id < V; id++)
      if ((mask[id >>> 5]! >>> (id & 31)) & 1) {
        allowed.push(id);
        weights.push(bias(id));
      }
    let u = rng.uniform() * weights.reduce((x, y) => x + y, 0);
    let pick = 0;
    while (pick < allowed.length - 1 && u >= weights[pick]!) u -= weights[pick++]!;
    const id = allowed[pick]!;
    if (id === tok.eosTokenId) break;
    ids.push(id);
    if (c.accept(id)) break;
  }
  return ids;
}

describe("masks", () => {
  it("allow exactly the tokens the automaton takes, symbols included", () => {
    // String parts are kept per vocabulary: JSON mode's first, then the calls' use them.
    const json = jsonObjectGrammar(vocab);
    json.mask(runBytes(json.automaton, json.automaton.start, Buffer.from('{"a": "b'))!);
    for (const o of [AUTO, REQUIRED, SINGLE, NONE]) {
      const g = toolCallGrammar(vocab, TOOLS, o)!;
      const a = g.automaton;
      const states: ToolState[] = [a.start];
      const texts = [
        `ok <｜tool▁calls▁beg`,
        calls(call("get_weather", '{"city": "a\\"b", "days": -3}'), call("get", "{}")),
      ];
      for (const text of texts) {
        let s: ToolState | null = a.start;
        for (const u of units(text)) {
          s = s && a.step(s, u);
          if (s) states.push(s);
        }
      }
      expectExactMasks(g, a, states, vocab.bytes as readonly (TokenBytes | null)[], V);
    }
  });

  it("text masks are computed once per vocabulary, whatever the tools", () => {
    const other: ToolFunction[] = [{ name: "other_tool", parameters: { type: "object" } }];
    const first = toolCallGrammar(vocab, TOOLS, AUTO)!;
    const mask = first.mask(first.automaton.start);
    const second = toolCallGrammar(vocab, other, AUTO)!;
    expect(second).not.toBe(first);
    const computed = second.computed;
    expect(second.mask(second.automaton.start)).toBe(mask);
    expect(second.computed).toBe(computed);
    // "none" is another text: the calls token is not allowed there.
    const none = toolCallGrammar(vocab, other, NONE)!;
    const calls = tok.tokenToId(T.callsBegin)!;
    const bit = (m: Uint32Array) => (m[calls >>> 5]! >>> (calls & 31)) & 1;
    expect([bit(mask), bit(none.mask(none.automaton.start))]).toEqual([1, 0]);
  });

  it("the gateway computes the text masks at startup (prepareVocabulary): a first request finds them", () => {
    const fresh = new Tokenizer(tinyTokenizerJson(), tinyTokenizerConfigJson(256));
    prepareVocabulary(fresh, V, { thinking: true });
    const v = vocabularyFor(fresh, V)!;
    for (const o of [AUTO, NONE]) {
      const g = toolCallGrammar(v, TOOLS, o)!;
      g.mask(g.automaton.start);
      expect(g.computed).toBe(0);
    }
    const think = thinkingFirst(
      schemaGrammar(v, { type: "object", properties: {} }) as TokenGrammar<unknown>,
    );
    think.mask(think.automaton.start);
    expect(think.computed).toBe(0);
  });

  it("JSON grammars never allow a symbol (the end-of-sentence token among them)", () => {
    const g = jsonObjectGrammar(vocab);
    let s = g.automaton.start;
    for (const b of Buffer.from('{"a": "in a string')) s = g.automaton.step(s, b)!;
    const symbolIds = tok.addedTokens.map((t) => t.id);
    for (const state of [g.automaton.start, s]) {
      const mask = g.mask(state);
      for (const id of symbolIds) expect((mask[id >>> 5]! >>> (id & 31)) & 1, `id ${id}`).toBe(0);
    }
    expect(symbolIds.every((id) => vocab.bytes[id]![0]! >= SYMBOL_BASE)).toBe(true);
    const c = new GrammarConstraint(g);
    expect(() => c.accept(tok.eosTokenId!)).toThrow(/not allowed/);
  });
});

/** The calls as a regular expression reads a whole text (as vLLM's DeepSeek-V3 parser). */
function oracle(text: string): { content: string; calls: { name: string; arguments: string }[] } {
  const at = text.indexOf(T.callsBegin);
  if (at < 0) return { content: text, calls: [] };
  const re = new RegExp(
    `${T.callBegin}function${T.sep}([^\\n]*)\\n\`\`\`json\\n([\\s\\S]*?)\\n\`\`\`${T.callEnd}`,
    "g",
  );
  return {
    content: text.slice(0, at),
    calls: [...text.slice(at).matchAll(re)].map((m) => ({ name: m[1]!, arguments: m[2]! })),
  };
}

/** The events of `text` pushed in random pieces (markers cut too), merged per kind. */
function parseInPieces(text: string, rng: Prng): ReturnType<typeof parseToolCalls> {
  const p = new ToolCallParser();
  const events: ToolEvent[] = [];
  for (const piece of randomPieces(text, rng, 12)) events.push(...p.push(piece));
  events.push(...p.end());
  const out: ReturnType<typeof parseToolCalls> = { content: "", calls: [], complete: false };
  for (const e of events) {
    if (e.type === "content") out.content += e.text;
    else if (e.type === "call") {
      expect(e.index).toBe(out.calls.length);
      out.calls.push({ name: e.name, arguments: "" });
    } else out.calls[e.index]!.arguments += e.text;
  }
  return { ...out, complete: p.complete };
}

describe("the parser", () => {
  const rng = new Prng(42, "tool-calls");
  const specials = new Set(Object.values(T).map((t) => vocab.symbol(t)!));
  // Tool tokens, closing braces and quotes favoured so that outputs end within 200 tokens.
  const closing = new Set(['"', "}"].map((c) => tok.encode(c, false)[0]!));
  const ws = new Set([" ", "\n", "\t", "\r"].map((c) => tok.encode(c, false)[0]!));
  const bias = (id: number) => {
    const bytes = vocab.bytes[id]!;
    if (bytes[0]! >= SYMBOL_BASE && specials.has(bytes[0]!)) return 400;
    return closing.has(id) ? 60 : ws.has(id) ? 0.2 : 1;
  };
  const outputs = Array.from({ length: 60 }, (_, i) =>
    tok.decode(randomOutput([AUTO, REQUIRED, SINGLE][i % 3]!, rng, bias), true),
  );

  it("reads random outputs as a regular expression does, whole or in pieces", () => {
    let withCalls = 0;
    for (const text of outputs) {
      const want = oracle(text);
      const { complete: ended, ...whole } = parseToolCalls(text);
      // A call the output ended within: its arguments so far (the oracle needs the end).
      const complete = text.endsWith(T.callsEnd);
      expect(ended).toBe(complete);
      if (complete) expect(whole, JSON.stringify(text)).toEqual(want);
      else expect(whole.calls.slice(0, want.calls.length)).toEqual(want.calls);
      expect(parseInPieces(text, rng), JSON.stringify(text)).toEqual({ ...whole, complete });
      if (complete) for (const c of whole.calls) JSON.parse(c.arguments);
      if (whole.calls.length > 0) withCalls++;
    }
    // The sample holds calls (and several complete ones).
    expect(withCalls).toBeGreaterThan(20);
    expect(outputs.filter((t) => t.endsWith(T.callsEnd)).length).toBeGreaterThan(10);
  });

  it.each([
    ["text only", "hello", { content: "hello", calls: [] }, false],
    [
      "a marker's start held back, then released at the end",
      "a <｜tool",
      { content: "a <｜tool", calls: [] },
      false,
    ],
    [
      "a call cut in its arguments",
      `${T.callsBegin}${T.callBegin}function${T.sep}get\n\`\`\`json\n{"a": \n\``,
      { content: "", calls: [{ name: "get", arguments: '{"a": \n`' }] },
      false,
    ],
    [
      "a call cut in its name",
      `x${T.callsBegin}${T.callBegin}function${T.sep}ge`,
      { content: "x", calls: [] },
      false,
    ],
    [
      "calls cut before their end token",
      `${T.callsBegin}${call("get", "{}")}`,
      { content: "", calls: [{ name: "get", arguments: "{}" }] },
      false,
    ],
    [
      "calls ended",
      calls(call("get", "{}")),
      { content: "", calls: [{ name: "get", arguments: "{}" }] },
      true,
    ],
  ])("%s", (_what, text, want, complete) => {
    expect(parseToolCalls(text)).toEqual({ ...want, complete });
    expect(parseInPieces(text, rng)).toEqual({ ...want, complete });
  });
});

describe("presenting the functions", () => {
  const messages = [
    { role: "system" as const, content: "Be brief." },
    { role: "user" as const, content: "Weather?" },
  ];

  it("as a system message after the leading ones, where the template does not", () => {
    const out = withTools(messages, TOOLS, false);
    expect(out.map((m) => m.role)).toEqual(["system", "system", "user"]);
    expect(out[1]!.content).toBe(toolsPrompt(TOOLS));
    expect(withTools(messages.slice(1), TOOLS, false).map((m) => m.role)).toEqual([
      "system",
      "user",
    ]);
    expect(withTools(messages, TOOLS, true)).toEqual(messages);
    expect(withTools(messages, [], false)).toEqual(messages);
  });

  it("names each function, its parameters and the format, the markers as single tokens", () => {
    const prompt = toolsPrompt([{ ...TOOLS[0]!, description: "The weather in a city" }]);
    expect(prompt).toContain("### get_weather\nDescription: The weather in a city\n");
    expect(prompt).toContain(JSON.stringify(TOOLS[0]!.parameters));
    const ids = tok.encode(prompt, false);
    for (const t of [T.callsBegin, T.callBegin, T.sep, T.callEnd, T.callsEnd])
      expect(ids).toContain(tok.tokenToId(t));
  });

  it("V3's template (without a tools section) is told apart from one with", () => {
    const config = tinyTokenizerConfigJson(256);
    const template = config["chat_template"] as string;
    const v3 = new Tokenizer(tinyTokenizerJson(), {
      ...config,
      // The tiny template without its line naming the tools: V3's own leaves them out.
      chat_template: template.replace(/\{%- if tools %\}.*?\{%- endif %\}/, ""),
    });
    expect(tok.templatePresentsTools).toBe(true);
    expect(v3.templatePresentsTools).toBe(false);
    const rendered = v3.applyChatTemplate(withTools(messages, TOOLS, false), true);
    expect(rendered).toContain(`Be brief.\n\n## Tools`);
    expect(rendered.endsWith("<｜User｜>Weather?<｜Assistant｜>")).toBe(true);
  });
});

describe("DeepSeek-V3.1's call format", () => {
  const V31 = (o: ToolCallOptions): ToolCallOptions => ({ ...o, format: "deepseek-v3.1" });
  const call31 = (name: string, args: string) => formatCall("deepseek-v3.1", name, args);
  const calls31 = (...c: string[]) => `${T.callsBegin}${c.join("")}${T.callsEnd}`;
  const weather = call31("get_weather", '{"city": "Paris", "days": 2}');

  it("writes a call as the name, the separator, the raw arguments", () => {
    expect(weather).toBe(
      `${T.callBegin}get_weather${T.sep}{"city": "Paris", "days": 2}${T.callEnd}`,
    );
  });

  it.each([
    ["text, then a call", `Checking.${calls31(weather)}`, V31(AUTO), true],
    ["two calls, one after the other", calls31(weather, call31("get", "{}")), V31(AUTO), true],
    [
      "two calls, a newline between",
      calls31(weather, `\n${call31("get", "{ }")}`),
      V31(AUTO),
      true,
    ],
    ["required: a call", calls31(call31("get", "{}")), V31(REQUIRED), true],
  ])("accepts %s", (_what, text, o, done) => {
    const a = toolCallGrammar(vocab, TOOLS, o)!.automaton;
    let s: ToolState | null = a.start;
    for (const u of units(text)) s = s && a.step(s, u);
    expect(s).not.toBeNull();
    expect(a.isDone(s!)).toBe(done);
  });

  it.each([
    ["V3's call type", `${T.callsBegin}${T.callBegin}`, "function", V31(AUTO)],
    ["a name prefix without the separator", `${T.callsBegin}${T.callBegin}get`, "\n", V31(AUTO)],
    ["V3's json block", `${T.callsBegin}${T.callBegin}get${T.sep}`, "```json", V31(AUTO)],
    ["a second call when not parallel", T.callsBegin + weather, call31("get", "{}"), V31(SINGLE)],
  ])("refuses %s", (_what, prefix, rest, o) => {
    const a = toolCallGrammar(vocab, TOOLS, o)!.automaton;
    const run = (text: string) => {
      let s: ToolState | null = a.start;
      const u = units(text);
      for (let i = 0; i < u.length; i++) {
        s = a.step(s, u[i]!);
        if (!s) return i;
      }
      return -1;
    };
    expect(run(prefix)).toBe(-1);
    expect(run(prefix + rest)).toBe(units(prefix).length);
  });

  it("masks allow exactly the tokens the automaton takes", () => {
    for (const o of [V31(AUTO), V31(REQUIRED), V31(SINGLE)]) {
      const g = toolCallGrammar(vocab, TOOLS, o)!;
      const a = g.automaton;
      const states: ToolState[] = [a.start];
      let s: ToolState | null = a.start;
      for (const u of units(calls31(weather, call31("get", '{"x": [1]}')))) {
        s = s && a.step(s, u);
        if (s) states.push(s);
      }
      expectExactMasks(g, a, states, vocab.bytes as readonly (TokenBytes | null)[], V);
    }
  });

  it("reads random outputs as a regular expression does (vLLM's V3.1 parser), whole or in pieces", () => {
    const rng = new Prng(7, "tool-calls-v31");
    const specials = new Set(Object.values(T).map((t) => vocab.symbol(t)!));
    const closing = new Set(['"', "}"].map((c) => tok.encode(c, false)[0]!));
    const bias = (id: number) => {
      const bytes = vocab.bytes[id]!;
      if (bytes[0]! >= SYMBOL_BASE && specials.has(bytes[0]!)) return 400;
      return closing.has(id) ? 60 : 1;
    };
    const re = new RegExp(`${T.callBegin}([^${T.sep[0]}]*?)${T.sep}([\\s\\S]*?)${T.callEnd}`, "g");
    let complete = 0;
    for (let i = 0; i < 40; i++) {
      const o = V31([AUTO, REQUIRED, SINGLE][i % 3]!);
      const ids = randomOutput(o, rng, bias);
      const text = tok.decode(ids, true);
      const whole = parseToolCalls(text, "deepseek-v3.1");
      expect(whole.complete).toBe(text.endsWith(T.callsEnd));
      if (whole.complete) {
        complete++;
        const at = text.indexOf(T.callsBegin);
        expect(whole.content).toBe(text.slice(0, at));
        expect(whole.calls).toEqual(
          [...text.slice(at).matchAll(re)].map((m) => ({ name: m[1]!, arguments: m[2]! })),
        );
        for (const call of whole.calls) JSON.parse(call.arguments);
      }
      // In random pieces: the same events.
      const p = new ToolCallParser("deepseek-v3.1");
      const pieces = { content: "", calls: [] as { name: string; arguments: string }[] };
      for (const e of [...randomPieces(text, rng, 12).flatMap((x) => p.push(x)), ...p.end()]) {
        if (e.type === "content") pieces.content += e.text;
        else if (e.type === "call") pieces.calls.push({ name: e.name, arguments: "" });
        else pieces.calls[e.index]!.arguments += e.text;
      }
      expect({ ...pieces, complete: p.complete }).toEqual(whole);
    }
    expect(complete).toBeGreaterThan(8);
  });

  it("a V3 grammar and a V3.1 grammar of the same tools are different grammars", () => {
    const v3 = toolCallGrammar(vocab, TOOLS, AUTO)!;
    const v31 = toolCallGrammar(vocab, TOOLS, V31(AUTO))!;
    expect(v31).not.toBe(v3);
    // Their text masks are the same (shared per vocabulary); the call heads differ.
    expect(v31.mask(v31.automaton.start)).toBe(v3.mask(v3.automaton.start));
  });

  it("presents the V3.1 format to templates that do not present tools", () => {
    const prompt = toolsPrompt(TOOLS, "deepseek-v3.1");
    expect(prompt).toContain(`${T.callBegin}FUNCTION_NAME${T.sep}ARGUMENTS_AS_JSON${T.callEnd}`);
    expect(prompt).not.toContain("```json");
  });
});

describe("custom tools (text input)", () => {
  const CUSTOM: ToolFunction[] = [
    ...TOOLS,
    {
      name: "calc",
      parameters: {},
      custom: { type: "grammar", syntax: "lark", definition: 'start: /[0-9]+/ ("+" /[0-9]+/)*' },
    },
    { name: "note", parameters: {}, custom: { type: "text" } },
    {
      name: "code",
      parameters: {},
      custom: { type: "grammar", syntax: "regex", definition: "[a-z]+\\(\\)" },
    },
  ];
  const V31 = (o: ToolCallOptions): ToolCallOptions => ({ ...o, format: "deepseek-v3.1" });
  const call31 = (name: string, input: string) => formatCall("deepseek-v3.1", name, input);
  const calls31 = (...c: string[]) => `${T.callsBegin}${c.join("")}${T.callsEnd}`;
  /** Where `u` is refused (-1: never), whether done, and the states passed. */
  const run = (u: number[], o: ToolCallOptions) => {
    const a = toolCallGrammar(vocab, CUSTOM, o)!.automaton;
    let s: ToolState | null = a.start;
    const states: ToolState[] = [s];
    for (let i = 0; i < u.length; i++) {
      s = a.step(s, u[i]!);
      if (!s) return { refusedAt: i, done: false, states };
      states.push(s);
    }
    return { refusedAt: -1, done: a.isDone(s), states };
  };

  it.each([
    ["a Lark input", calls(call("calc", "1+22")), AUTO],
    [
      "free text with backticks and newlines, not the fence",
      calls(call("note", "a ``` b\n`` c\n")),
      AUTO,
    ],
    ["an empty free text", calls(call("note", "")), REQUIRED],
    ["a regex input, then a function's call", calls(call("code", "ab()"), call("get", "{}")), AUTO],
    ["V3.1: a Lark input", calls31(call31("calc", "7")), V31(AUTO)],
    ["V3.1: free text holding V3's fence", calls31(call31("note", "x\n```json\n{")), V31(REQUIRED)],
  ])("accepts %s", (_what, text, o) => {
    const r = run(units(text), o);
    expect(r.refusedAt).toBe(-1);
    expect(r.done).toBe(true);
  });

  const head = `${T.callsBegin}${T.callBegin}function${T.sep}`;
  it.each([
    ["an input the grammar has not finished", `${head}calc\n\`\`\`json\n1+`, "\n```", AUTO],
    ["an input outside the grammar", `${head}calc\n\`\`\`json\n1`, "a", AUTO],
    [
      "free text holding the fence (it ends the input)",
      `${head}note\n\`\`\`json\nab\n\`\`\``,
      "x",
      AUTO,
    ],
    ["the call-end token without the fence", `${head}code\n\`\`\`json\nab()`, T.callEnd, AUTO],
    ["a tool token inside the input", `${head}note\n\`\`\`json\nab`, T.sep, AUTO],
    [
      "V3.1: an unfinished input",
      `${T.callsBegin}${T.callBegin}calc${T.sep}1+`,
      T.callEnd,
      V31(AUTO),
    ],
  ])("refuses %s", (_what, prefix, rest, o) => {
    expect(run(units(prefix), o).refusedAt).toBe(-1);
    expect(run(units(prefix + rest), o).refusedAt).toBe(units(prefix).length);
  });

  it("V3.1: free text cannot spell the call-end token in bytes", () => {
    const prefix = units(`${T.callsBegin}${T.callBegin}note${T.sep}a`);
    const bytes = [...prefix, ...Buffer.from(T.callEnd)];
    expect(run(bytes, V31(AUTO)).refusedAt).toBe(bytes.length - 1);
  });

  it("masks allow exactly the tokens the automaton takes, in both formats", () => {
    for (const [o, text] of [
      [AUTO, calls(call("calc", "1+2"), call("note", "a\n``b"))],
      [V31(AUTO), calls31(call31("code", "ab()"), call31("note", "x`\n"))],
    ] as const) {
      const g = toolCallGrammar(vocab, CUSTOM, o)!;
      const { refusedAt, states } = run(units(text), o);
      expect(refusedAt).toBe(-1);
      expectExactMasks(g, g.automaton, states, vocab.bytes as readonly (TokenBytes | null)[], V);
    }
  });

  it("the parser reads a custom input as the call's arguments text", () => {
    const text = calls(call("note", "a ``` b\n`` c"), call("calc", "1+2"));
    expect(parseToolCalls(text).calls).toEqual([
      { name: "note", arguments: "a ``` b\n`` c" },
      { name: "calc", arguments: "1+2" },
    ]);
  });

  it("presents a custom tool's input in place of parameters", () => {
    const prompt = toolsPrompt(CUSTOM);
    expect(prompt).toContain("### calc\nInput: text in the language of this Lark grammar");
    expect(prompt).toContain("### note\nInput: free text");
    expect(prompt).toContain("### code\nInput: text matching the regular expression [a-z]+\\(\\)");
  });
});
