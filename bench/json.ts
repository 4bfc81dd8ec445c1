// The json suite: what JSON mode (response_format json_object, src/gateway/json-mode.ts)
// costs per sampled token at a DeepSeek-sized vocabulary (129,280 tokens), against the same
// step without it (the peer: sampling alone, in the same run).
//
// No real DeepSeek tokenizer is available offline, so the vocabulary is synthetic: the 256
// bytes, then distinct substrings (2-16 bytes) of English-like text and of JSON documents
// until there are 129,280; what a mask costs depends on how many tokens share prefixes and
// how many a state allows, which this only approximates. A "document" is a random JSON
// object (JSON.stringify, indented) cut into tokens by greedy longest match; each of its
// tokens is one step: the constraint's mask (computed the first time a state is seen, then
// cached), -inf applied to the refused tokens of a logits row (the sampling suite's kind),
// the native sampler (top_p 0.9, temperature 0.7) and the constraint's accept; the peer
// samples the same row unmasked.
// Also timed: building the grammar (sorting the vocabulary, once per gateway), and
// computing a state's mask the first time (cold), for a few kinds of states.
// GBNF (guided_grammar, src/gateway/cfg.ts): a JSON grammar in GBNF over the same documents,
// step by step as JSON mode (its peer in the same run: the hand-written JSON automaton);
// and the same in Lark (src/gateway/lark.ts: whitespace as %ignore, allowed before each
// terminal, and left recursion rewritten for lists), the same way.
// Tool calls (src/gateway/tool-calls.ts): the same vocabulary with its last 818 tokens made
// added tokens (DeepSeek-V3 has 818, its tool-call tokens among them): the first masks of
// the call grammar's states, and a step of plain text under tool_choice "auto" (the mask
// allows all but the tool tokens) against the same step unconstrained.
// Structural tags (src/gateway/structural-tag.ts): triggered_tags with two calls in a
// model's own wrapper, over the same vocabulary: first masks of free text, of a partly
// written trigger and of a call's argument string, and a step of plain text under it (mask
// cached) against the same step unconstrained.

import { nativeBackend } from "../src/engine/native.ts";
import { uniform32 } from "../src/engine/sampling.ts";
import { type CfgState, compileGrammar, GrammarText } from "../src/gateway/cfg.ts";
import { applyMask } from "../src/gateway/engine.ts";
import {
  GrammarConstraint,
  SYMBOL_BASE,
  type TokenBytes,
  TokenGrammar,
  Vocabulary,
} from "../src/gateway/grammar.ts";
import { JSON_OBJECT, type JsonState, run, START } from "../src/gateway/json-mode.ts";
import { compileSchema, type SchemaState } from "../src/gateway/json-schema.ts";
import { compileLark } from "../src/gateway/lark.ts";
import { type StructuralState, structuralTagGrammar } from "../src/gateway/structural-tag.ts";
import { type ToolState, toolCallGrammar } from "../src/gateway/tool-calls.ts";
import { Prng } from "../src/model/prng.ts";
import { TOOL_TOKENS } from "../src/model/tokenizer.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import { promptText } from "./tokenize.ts";

const VOCAB = 129_280;

/** JSON in GBNF (as llama.cpp's json.gbnf, whitespace as JSON.stringify indents it). */
export const JSON_GBNF = String.raw`
root   ::= object
value  ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( string ws ":" ws value ws ( "," ws string ws ":" ws value ws )* )? "}"
array  ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws     ::= [ \t\n]*
`;

/** JSON objects in Lark: strings and numbers as terminals, whitespace ignored, lists left-recursive. */
export const JSON_LARK = String.raw`
?start: object
?value: object | array | STRING | NUMBER | "true" | "false" | "null"
object: "{" "}" | "{" pairs "}"
pairs: pairs "," pair | pair
pair: STRING ":" value
array: "[" "]" | "[" values "]"
values: values "," value | value
STRING: /"([^"\\\x00-\x1f\x7f]|\\(["\\\/bfnrt]|u[0-9a-fA-F]{4}))*"/
NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/
%ignore /[ \t\n]+/
`;

export interface JsonResults {
  runs: number;
  vocab: number;
  buildMs: Stats;
  /** Splitting it into the tokens with and without a quote (once per gateway). */
  splitMs: Stats;
  cold: { state: string; allowed: number; ms: Stats }[];
  /** Per token, over the documents: masks computed on the way (cold), all cached (warm). */
  stepMs: { cold: Stats; warm: Stats; plain: Stats };
  tokens: number;
  /** Masks computed (cache misses) over the documents, per run. */
  misses: number;
  /** The GBNF JSON grammar over the same documents: steps as stepMs', and first masks. */
  gbnf?: GrammarResults;
  /** The Lark JSON grammar, the same way. */
  lark?: GrammarResults;
  /** json_schema states under a string's or number's keywords: their first masks. */
  schemaCold?: { state: string; allowed: number; ms: Stats }[];
  tools: {
    cold: { state: string; allowed: number; ms: Stats }[];
    /** Per token of plain text under tool_choice "auto" (mask cached), and without. */
    textStepMs: Stats;
    plainMs: Stats;
  };
  /** Structural tags (triggered_tags): first masks, and a step of plain text under them. */
  structural?: {
    cold: { state: string; allowed: number; ms: Stats }[];
    textStepMs: Stats;
  };
}

/** A context-free grammar's steps over the documents, and its first masks. */
interface GrammarResults {
  stepMs: { cold: Stats; warm: Stats };
  misses: number;
  cold: { state: string; allowed: number; ms: Stats }[];
}

/** DeepSeek-V3's added tokens (special ones and the tool-call tokens among them). */
const ADDED = 818;

function randomJson(rng: Prng, depth = 0): unknown {
  const r = rng.uniform();
  if (depth > 2 || r < 0.4) {
    const k = Math.floor(rng.uniform() * 4);
    if (k === 0) return Math.round((rng.uniform() - 0.3) * 10_000) / 100;
    if (k === 1) return rng.uniform() < 0.5;
    if (k === 2) return null;
    return promptText(4 + Math.floor(rng.uniform() * 40)).trim();
  }
  if (r < 0.6)
    return Array.from({ length: 1 + Math.floor(rng.uniform() * 4) }, () =>
      randomJson(rng, depth + 1),
    );
  return Object.fromEntries(
    Array.from({ length: 1 + Math.floor(rng.uniform() * 5) }, (_, i) => [
      `${promptText(3 + Math.floor(rng.uniform() * 10))
        .trim()
        .replace(/\s+/g, "_")}${i}`,
      randomJson(rng, depth + 1),
    ]),
  );
}

const document = (rng: Prng) => JSON.stringify({ result: randomJson(rng) }, null, 2);

/** The synthetic vocabulary: bytes, then distinct substrings of text and JSON. */
function vocabulary(rng: Prng): Uint8Array[] {
  const seen = new Set<string>();
  const out: Uint8Array[] = [];
  for (let b = 0; b < 256; b++) {
    out.push(Uint8Array.of(b));
    seen.add(String.fromCharCode(b));
  }
  const corpus = [promptText(1 << 20), ...Array.from({ length: 400 }, () => document(rng))].join(
    "\n",
  );
  while (out.length < VOCAB) {
    const len = 2 + Math.floor(rng.uniform() * rng.uniform() * 15);
    const at = Math.floor(rng.uniform() * (corpus.length - len));
    const piece = corpus.slice(at, at + len);
    if (seen.has(piece)) continue;
    seen.add(piece);
    out.push(new Uint8Array(Buffer.from(piece)));
  }
  return out;
}

/** Greedy longest-match tokenization of `text` with the vocabulary. */
function tokenize(text: string, byText: Map<string, number>): number[] {
  const ids: number[] = [];
  for (let i = 0; i < text.length; ) {
    let n = Math.min(16, text.length - i);
    while (n > 1 && !byText.has(text.slice(i, i + n))) n--;
    const id = byText.get(text.slice(i, i + n));
    if (id === undefined) throw new Error(`no token for ${JSON.stringify(text[i])}`);
    ids.push(id);
    i += n;
  }
  return ids;
}

/**
 * Times `grammar`'s mask of `s` (its first: the grammar is fresh) into `into[name]` when
 * `counted`, with the tokens it allows.
 */
function firstMask<S>(
  into: Map<string, { allowed: number; ms: number[] }>,
  name: string,
  grammar: TokenGrammar<S>,
  s: S,
  counted: boolean,
): void {
  const t = performance.now();
  const mask = grammar.mask(s);
  const ms = performance.now() - t;
  let allowed = 0;
  for (const w of mask) for (let x = w; x; x &= x - 1) allowed++;
  const c = into.get(name) ?? { allowed, ms: [] };
  if (counted) c.ms.push(ms);
  into.set(name, c);
}

export async function runJson(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<JsonResults> {
  const rng = new Prng(99);
  const vocab = vocabulary(rng);
  const byText = new Map(vocab.map((b, id) => [Buffer.from(b).toString("latin1"), id]));
  // Documents are ASCII: latin1 keys equal their text.
  const docs = Array.from({ length: o.quick ? 3 : 12 }, () => tokenize(document(rng), byText));
  const tokens = docs.reduce((n, d) => n + d.length, 0);
  const backend = nativeBackend();
  const logits = new Float32Array(VOCAB);
  for (let i = 0; i < VOCAB; i++)
    logits[i] = (rng.uniform() + rng.uniform() + rng.uniform() - 1.5) * 2;
  // As the sampling suite's rows: noise plus 16 tokens that hold most of the mass.
  for (let j = 0; j < 16; j++) logits[Math.floor(rng.uniform() * VOCAB)]! += 12 + 3 * rng.uniform();
  const row = new Float32Array(VOCAB);
  const sampleOnce = (u: number) =>
    backend.sample(row, VOCAB, {
      temperature: Float32Array.of(0.7),
      topK: Int32Array.of(0),
      topP: Float32Array.of(0.9),
      uniform: Float32Array.of(uniform32(u)),
    })[0]!;

  const states: [string, JsonState][] = [
    ["start", START],
    ["after '{'", run(START, Buffer.from("{")) as JsonState],
    ["in a value string", run(START, Buffer.from('{"a": [{"b": "some te')) as JsonState],
    ["in a number", run(START, Buffer.from('{"a": [{"b": 12')) as JsonState],
    ["after a value", run(START, Buffer.from('{"a": [{"b": true')) as JsonState],
  ];
  // The tools' vocabulary: the last ADDED tokens are added tokens (symbols), the first of
  // them DeepSeek's tool-call tokens.
  const toolBytes: TokenBytes[] = [...vocab];
  const symbols = new Map<string, number>();
  const toolTexts = Object.values(TOOL_TOKENS);
  for (let k = 0; k < ADDED; k++) {
    toolBytes[VOCAB - ADDED + k] = Uint16Array.of(SYMBOL_BASE + k);
    symbols.set(toolTexts[k] ?? `<added ${k}>`, SYMBOL_BASE + k);
  }
  const symbol = (t: string) => symbols.get(t)!;
  const tools = (n: number) => [
    {
      name: `get_weather_${n}`,
      parameters: {
        type: "object",
        properties: { city: { type: "string" }, days: { type: "integer" } },
        required: ["city"],
      },
    },
  ];
  const toolCold = new Map<string, { allowed: number; ms: number[] }>();
  const schemaCold = new Map<string, { allowed: number; ms: number[] }>();
  const keyed = {
    type: "object",
    properties: {
      code: { type: "string", pattern: "^[A-Z]{2}-\\d{3}$" },
      day: { type: "string", format: "date" },
      email: { type: "string", format: "email" },
      name: { type: "string", maxLength: 200 },
      title: { type: "string", minLength: 1, maxLength: 80 },
      n: { type: "integer", minimum: 1, maximum: 250 },
      pet: {
        anyOf: [
          { type: "object", properties: { name: { type: "string" }, lives: { type: "integer" } } },
          { type: "object", properties: { name: { type: "string" }, good: { type: "boolean" } } },
        ],
      },
    },
    required: ["code", "day", "email", "name", "title", "n", "pet"],
  };
  const schemaStates: [string, string][] = [
    ["a pattern ^[A-Z]{2}-\\d{3}$ after 'AB'", '{"code": "AB'],
    ["format date after '2026-1'", '{"code": "AB-123", "day": "2026-1'],
    [
      "format email after 'ann.lee@ex'",
      '{"code": "AB-123", "day": "2026-11-30", "email": "ann.lee@ex',
    ],
    [
      "maxLength 200, 10 characters in",
      '{"code": "AB-123", "day": "2026-11-30", "email": "a@b.c", "name": "0123456789',
    ],
    [
      "another string under lengths (the part above kept per vocabulary)",
      '{"code": "AB-123", "day": "2026-11-30", "email": "a@b.c", "name": "x", "title": "Ab',
    ],
    [
      "an integer 1..250 after '2'",
      '{"code": "AB-123", "day": "2026-11-30", "email": "a@b.c", "name": "x", "title": "t", "n": 2',
    ],
    [
      "anyOf of two objects, in the name both have (2 readings)",
      '{"code": "AB-123", "day": "2026-11-30", "email": "a@b.c", "name": "x", "title": "t", "n": 2, "pet": {"name": "Re',
    ],
  ];
  const gbnfStates: [string, string][] = [
    ["after '{'", "{"],
    ["in a value string", '{\n  "name": "Par'],
    ["in a number", '{\n  "n": 12'],
  ];
  /** Per grammar (GBNF, Lark): first masks, steps cold and warm, masks computed. */
  const cfgs = {
    gbnf: () => compileGrammar(JSON_GBNF),
    lark: () => compileLark(JSON_LARK),
  };
  const cfgRuns = Object.fromEntries(
    Object.keys(cfgs).map((k) => [
      k,
      {
        cold: new Map<string, { allowed: number; ms: number[] }>(),
        coldSteps: [] as number[],
        warmSteps: [] as number[],
        misses: 0,
      },
    ]),
  ) as Record<
    keyof typeof cfgs,
    {
      cold: Map<string, { allowed: number; ms: number[] }>;
      coldSteps: number[];
      warmSteps: number[];
      misses: number;
    }
  >;
  const textSteps: number[] = [];
  const plainSteps: number[] = [];
  const structuralCold = new Map<string, { allowed: number; ms: number[] }>();
  const structuralSteps: number[] = [];
  const weather = {
    type: "object",
    properties: { city: { type: "string" } },
    required: ["city"],
  };
  const callTag = (name: string) => ({
    type: "tag",
    begin: `<function=${name}>`,
    content: { type: "json_schema", json_schema: weather },
    end: "</function>",
  });
  const structural = {
    type: "structural_tag",
    format: {
      type: "triggered_tags",
      triggers: ["<function="],
      tags: [callTag("get_weather"), callTag("get_time")],
    },
  };
  const build: number[] = [];
  const split: number[] = [];
  const cold = new Map<string, { allowed: number; ms: number[] }>();
  const coldSteps: number[] = [];
  const warmSteps: number[] = [];
  const plain: number[] = [];
  let misses = 0;
  for (let r = -1; r < o.runs; r++) {
    const t0 = performance.now();
    const vocabulary = new Vocabulary(vocab, VOCAB);
    const built = performance.now() - t0;
    const t2 = performance.now();
    vocabulary.split(0x22);
    const splitMs = performance.now() - t2;
    const grammar = new TokenGrammar(JSON_OBJECT, vocabulary);
    for (const [name, s] of states) firstMask(cold, name, grammar, s, r >= 0);
    // Steps: constrained and plain alternate token by token. The first pass over the
    // documents meets each state for the first time in this grammar (cold: its mask is
    // computed then); the second finds every mask cached (warm).
    const before = grammar.computed;
    const pass = <S>(g: TokenGrammar<S> = grammar as unknown as TokenGrammar<S>) => {
      let tc = 0;
      let tp = 0;
      for (const doc of docs) {
        const json = new GrammarConstraint(g);
        for (const [i, id] of doc.entries()) {
          const u = (i * 0.618) % 1;
          let t = performance.now();
          row.set(logits);
          applyMask(row, json.allowed());
          sampleOnce(u);
          json.accept(id);
          tc += performance.now() - t;
          t = performance.now();
          row.set(logits);
          sampleOnce(u);
          tp += performance.now() - t;
        }
      }
      return { constrained: tc / tokens, plain: tp / tokens };
    };
    const first = pass();
    const computed = grammar.computed - before;
    const second = pass();
    // The same documents under the JSON grammars, fresh (cold), then cached (warm).
    for (const [k, compile] of Object.entries(cfgs)) {
      const c = cfgRuns[k as keyof typeof cfgs];
      const g = new TokenGrammar(new GrammarText(compile(), null), vocabulary);
      const ga = g.automaton;
      for (const [name, text] of gbnfStates) {
        const s = [...Buffer.from(text)].reduce<CfgState>((x, b) => ga.step(x, b)!, ga.start);
        firstMask(c.cold, name, g, s, r >= 0);
      }
      const gBefore = g.computed;
      const gFirst = pass(g);
      const gComputed = g.computed - gBefore;
      const gSecond = pass(g);
      if (r < 0) continue;
      c.coldSteps.push(gFirst.constrained);
      c.warmSteps.push(gSecond.constrained);
      c.misses = gComputed;
    }
    if (r < 0) continue;
    build.push(built);
    split.push(splitMs);
    coldSteps.push(first.constrained);
    warmSteps.push(second.constrained);
    plain.push((first.plain + second.plain) / 2);
    misses = computed;
    // Tool calls, over a fresh vocabulary (its shared masks empty).
    const tv = new Vocabulary(toolBytes, VOCAB, symbols);
    tv.split(0x22);
    const g1 = toolCallGrammar(tv, tools(1), { mode: "auto", parallel: true })!;
    const g2 = toolCallGrammar(tv, tools(2), { mode: "auto", parallel: true })!;
    const a = g1.automaton;
    const after = (s: ToolState, units: number[]) =>
      units.reduce<ToolState>((x, u) => a.step(x, u)!, s);
    const head = [
      symbol(TOOL_TOKENS.callsBegin),
      symbol(TOOL_TOKENS.callBegin),
      ...Buffer.from("function"),
      symbol(TOOL_TOKENS.sep),
    ];
    const inName = after(a.start, head);
    const inString = after(inName, [...Buffer.from('get_weather_1\n```json\n{"city": "Par')]);
    const toolStates: [string, TokenGrammar<ToolState>, ToolState][] = [
      ['text under "auto", the first tool set over the vocabulary', g1, a.start],
      ['text under "auto", another tool set (kept per vocabulary)', g2, g2.automaton.start],
      ["a call's name", g1, inName],
      ["in an argument's string", g1, inString],
    ];
    for (const [name, g, s] of toolStates) firstMask(toolCold, name, g, s, r >= 0);
    // json_schema keywords, over the same fresh vocabulary (these states have no part kept
    // per vocabulary: each walks the whole vocabulary).
    const sa = compileSchema(keyed, undefined, { tokenBytes: tv.maxTokenBytes });
    const sg = new TokenGrammar(sa, tv);
    for (const [name, text] of schemaStates) {
      const s = [...Buffer.from(text)].reduce<SchemaState>((x, b) => sa.step(x, b)!, sa.start);
      firstMask(schemaCold, name, sg, s, r >= 0);
    }
    // Structural tags over the same fresh vocabulary.
    const sg2 = structuralTagGrammar(tv, structural, SYMBOL_BASE, "response_format");
    const st = sg2.automaton;
    const stAfter = (text: string) =>
      [...Buffer.from(text)].reduce<StructuralState>((x, b) => st.step(x, b)!, st.start);
    const structuralStates: [string, StructuralState][] = [
      ["free text (triggered_tags, two calls)", st.start],
      ["a partly written trigger '<fun'", stAfter("Let me see. <fun")],
      ["in a call's argument string", stAfter('Hi <function=get_weather>{"city": "Pa')],
      ["free text after a call", stAfter('<function=get_time>{"city": "x"}</function> ')],
    ];
    for (const [name, s] of structuralStates) firstMask(structuralCold, name, sg2, s, r >= 0);
    // Plain text under "auto": the cached text mask on every row, against none.
    const textMask = g1.mask(a.start);
    const freeMask = sg2.mask(st.start);
    let tt = 0;
    let tp = 0;
    let ts = 0;
    for (let i = 0; i < tokens; i++) {
      const u = (i * 0.618) % 1;
      let t = performance.now();
      row.set(logits);
      applyMask(row, textMask);
      sampleOnce(u);
      tt += performance.now() - t;
      t = performance.now();
      row.set(logits);
      sampleOnce(u);
      tp += performance.now() - t;
      t = performance.now();
      row.set(logits);
      applyMask(row, freeMask);
      sampleOnce(u);
      ts += performance.now() - t;
    }
    if (r >= 0) {
      textSteps.push(tt / tokens);
      plainSteps.push(tp / tokens);
      structuralSteps.push(ts / tokens);
    }
    o.log(
      `[bench] json run ${r + 1}: build ${built.toFixed(0)} ms; per token: cold ${first.constrained.toFixed(3)} ms, warm ${second.constrained.toFixed(3)} ms, plain ${plain.at(-1)!.toFixed(3)} ms; ${computed} masks computed over ${tokens} tokens`,
    );
  }
  return {
    runs: o.runs,
    vocab: VOCAB,
    buildMs: stats(build),
    splitMs: stats(split),
    cold: [...cold.entries()].map(([state, c]) => ({ state, allowed: c.allowed, ms: stats(c.ms) })),
    stepMs: { cold: stats(coldSteps), warm: stats(warmSteps), plain: stats(plain) },
    tokens,
    misses,
    gbnf: grammarResults(cfgRuns.gbnf),
    lark: grammarResults(cfgRuns.lark),
    schemaCold: [...schemaCold.entries()].map(([state, c]) => ({
      state,
      allowed: c.allowed,
      ms: stats(c.ms),
    })),
    tools: {
      cold: [...toolCold.entries()].map(([state, c]) => ({
        state,
        allowed: c.allowed,
        ms: stats(c.ms),
      })),
      textStepMs: stats(textSteps),
      plainMs: stats(plainSteps),
    },
    structural: {
      cold: [...structuralCold.entries()].map(([state, c]) => ({
        state,
        allowed: c.allowed,
        ms: stats(c.ms),
      })),
      textStepMs: stats(structuralSteps),
    },
  };
}

const ms = medianRange;

/** The suite's table for BENCHMARKS.md. */
export function jsonTables(
  r: JsonResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const coldRows = r.cold
    .map((c) => `| first mask of a state: ${c.state} (${c.allowed} tokens allowed) | ${ms(c.ms)} |`)
    .join("\n");
  const { cold, warm, plain } = r.stepMs;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), synthetic byte-level vocabulary of ${r.vocab} tokens, ${r.runs} counted runs after a warm-up (each with a fresh grammar); from \`${source}\`. Milliseconds, median (min-max) over the runs.

| what | ms |
|---|---:|
| sorting the vocabulary (once per gateway, at startup) | ${ms(r.buildMs, 0)} |
| splitting it into tokens with and without a quote (once per gateway, at startup) | ${ms(r.splitMs, 0)} |
${coldRows}
| a step of JSON mode per token, first pass over ${r.tokens} tokens of indented JSON (${r.misses} masks computed on the way) | ${ms(cold, 3)} |
| the same, second pass (every mask cached) | ${ms(warm, 3)} |
| the same step without JSON mode (peer: sampling alone) | ${ms(plain, 3)} |
| JSON mode / peer: first pass, second pass | ${(cold.median / plain.median).toFixed(2)}x, ${(warm.median / plain.median).toFixed(2)}x |${gbnfRows(r)}${schemaRows(r)}${toolRows(r)}${structuralRows(r)}`;
}

function grammarResults(c: {
  cold: Map<string, { allowed: number; ms: number[] }>;
  coldSteps: number[];
  warmSteps: number[];
  misses: number;
}): GrammarResults {
  return {
    stepMs: { cold: stats(c.coldSteps), warm: stats(c.warmSteps) },
    misses: c.misses,
    cold: [...c.cold.entries()].map(([state, x]) => ({
      state,
      allowed: x.allowed,
      ms: stats(x.ms),
    })),
  };
}

/** The JSON grammars' rows, each after a newline (none in results from before them). */
function gbnfRows(r: JsonResults): string {
  const { cold, warm } = r.stepMs;
  const rows = (g: GrammarResults | undefined, format: string) =>
    g
      ? [
          ...g.cold.map(
            (c) =>
              `| guided_grammar (JSON in ${format}), first mask: ${c.state} (${c.allowed} tokens allowed) | ${ms(c.ms)} |`,
          ),
          `| guided_grammar (JSON in ${format}), a step per token, first pass (${g.misses} masks computed on the way) | ${ms(g.stepMs.cold, 3)} |`,
          "| the same, second pass (every mask cached) | " + ms(g.stepMs.warm, 3) + " |",
          `| ${format} / JSON mode (peer: the hand-written automaton): first pass, second pass | ${(g.stepMs.cold.median / cold.median).toFixed(2)}x, ${(g.stepMs.warm.median / warm.median).toFixed(2)}x |`,
        ]
      : [];
  const out = [...rows(r.gbnf, "GBNF"), ...rows(r.lark, "Lark")];
  return out.length ? `\n${out.join("\n")}` : "";
}

/** The json_schema keyword rows, each after a newline (none in results from before them). */
function schemaRows(r: JsonResults): string {
  return (r.schemaCold ?? [])
    .map(
      (c) =>
        `\n| json_schema, first mask: ${c.state} (${c.allowed} tokens allowed) | ${ms(c.ms)} |`,
    )
    .join("");
}

/** The tool-call rows, each after a newline (results written before they were measured have none). */
function toolRows(r: JsonResults): string {
  if (!r.tools) return "";
  const t = r.tools;
  return [
    "",
    ...t.cold.map(
      (c) => `| tool calls, first mask: ${c.state} (${c.allowed} tokens allowed) | ${ms(c.ms)} |`,
    ),
    `| tool calls: a step of plain text under tool_choice "auto" (mask cached) | ${ms(t.textStepMs, 3)} |`,
    `| the same step unconstrained (peer) | ${ms(t.plainMs, 3)} |`,
    `| "auto" text / peer | ${(t.textStepMs.median / t.plainMs.median).toFixed(2)}x |`,
  ].join("\n");
}

/** The structural-tag rows, each after a newline (none in results from before them). */
function structuralRows(r: JsonResults): string {
  if (!r.structural || !r.tools) return "";
  const t = r.structural;
  return [
    "",
    ...t.cold.map(
      (c) =>
        `| structural tag, first mask: ${c.state} (${c.allowed} tokens allowed) | ${ms(c.ms)} |`,
    ),
    `| structural tag: a step of plain text under triggered_tags (mask cached) | ${ms(t.textStepMs, 3)} |`,
    `| structural text / peer (the unconstrained step above) | ${(t.textStepMs.median / r.tools.plainMs.median).toFixed(2)}x |`,
  ].join("\n");
}
