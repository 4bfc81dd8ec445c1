// JSON mode's automaton and masks (src/gateway/json-mode.ts): hand-written cases, then a
// differential test against JSON.parse (random documents: every prefix is accepted, the
// whole one completes; random one-character edits: accepted and complete exactly when
// JSON.parse takes them and gives an object), then masks against checking every token.
import { describe, expect, it } from "vitest";
import { TokenGrammar, Vocabulary } from "../../src/gateway/grammar.ts";
import {
  isDone,
  JSON_OBJECT,
  type JsonState,
  MAX_WHITESPACE,
  run,
  START,
  step,
} from "../../src/gateway/json-mode.ts";
import { Prng } from "../../src/model/prng.ts";
import { expectExactMasks, JSON_CHARS, oneCharEdits } from "../support/grammar.ts";

const bytes = (s: string) => new Uint8Array(Buffer.from(s, "utf8"));

/** Index of the first refused byte, or -1 when all are accepted; and whether complete. */
function check(text: string): { refusedAt: number; done: boolean } {
  const b = bytes(text);
  let s: JsonState | null = START;
  for (let i = 0; i < b.length; i++) {
    s = step(s, b[i]!);
    if (!s) return { refusedAt: i, done: false };
  }
  return { refusedAt: -1, done: isDone(s) };
}

describe("the JSON automaton", () => {
  const complete: string[] = [
    "{}",
    ' {\n  "a" : 1 }\n',
    '{"a":[1,-2.5e+3,0,-0.25E-2,true,false,null,{"b":"c\\n\\u00e9\\"\\\\\\/"}],"":[]}',
    '{"k\u00e9y \u6771\u4eac":"\ud83d\ude00","x":[[],[{}],[[1]]]}',
    `{${" ".repeat(MAX_WHITESPACE)}}`,
  ];
  it.each(complete)("accepts %j whole and completes", (text) => {
    expect(check(text)).toEqual({ refusedAt: -1, done: true });
  });

  const refused: [string, string, number][] = [
    ["a root that is not an object", "[1]", 0],
    ["a root string", '"x"', 0],
    ["a leading zero", '{"a":01}', 6],
    ["a dot without digits", '{"a":1.}', 7],
    ["a lone minus", '{"a":-}', 6],
    ["an exponent without digits", '{"a":1e}', 7],
    ["a missing colon", '{"a" 1}', 5],
    ["a trailing comma", '{"a":1,}', 7],
    ["a comma first", "{,}", 1],
    ["a broken literal", '{"a":tru}', 8],
    ["an unquoted key", "{a:1}", 1],
    ["a raw control character", '{"a\u0001":1}', 3],
    ["a raw newline in a string", '{"a":"x\ny"}', 7],
    ["an unknown escape", '{"a":"\\x"}', 7],
    ["a short \\u escape", '{"a":"\\u12g4"}', 10],
    ["the wrong closer", '{"a":[1}', 7],
    ["anything after the object", '{"a":1} x', 8],
    ["a second object", "{}{}", 2],
    ["too much whitespace", `{${" ".repeat(MAX_WHITESPACE + 1)}}`, MAX_WHITESPACE + 1],
  ];
  it.each(refused)("refuses %s (%j at byte %i)", (_what, text, at) => {
    expect(check(text).refusedAt).toBe(at);
  });

  it("a prefix is accepted and not complete", () => {
    expect(check('{"a":[1,2')).toEqual({ refusedAt: -1, done: false });
    expect(check('{"a":"unfinished')).toEqual({ refusedAt: -1, done: false });
  });
});

// ---- against JSON.parse ----

function randomValue(rng: Prng, depth: number): unknown {
  const r = rng.uniform();
  if (depth > 3 || r < 0.35) {
    const k = Math.floor(rng.uniform() * 6);
    if (k === 0) return Math.floor(rng.uniform() * 2000) - 1000;
    if (k === 1) return (rng.uniform() - 0.5) * 10 ** Math.floor(rng.uniform() * 40 - 20);
    if (k === 2) return rng.uniform() < 0.5;
    if (k === 3) return null;
    return randomString(rng);
  }
  if (r < 0.6)
    return Array.from({ length: Math.floor(rng.uniform() * 4) }, () => randomValue(rng, depth + 1));
  return randomObject(rng, depth + 1);
}

function randomObject(rng: Prng, depth: number): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  const n = Math.floor(rng.uniform() * 4);
  for (let i = 0; i < n; i++) o[randomString(rng)] = randomValue(rng, depth);
  return o;
}

const ALPHABET = [
  "a",
  "Z",
  "0",
  " ",
  '"',
  "\\",
  "/",
  "\n",
  "\t",
  "\u0001",
  "\u00e9",
  "\u6771",
  "\ud83d\ude00",
  "{",
  "]",
  ":",
  ",",
];
function randomString(rng: Prng): string {
  return Array.from(
    { length: Math.floor(rng.uniform() * 6) },
    () => ALPHABET[Math.floor(rng.uniform() * ALPHABET.length)]!,
  ).join("");
}

/** Characters an edit inserts or substitutes: the ones JSON's grammar turns on. */
const EDITS = [...JSON_CHARS, "+", ".", "e", "0", "1", "t", "n", "u", "a", "\u0002"];

function parsesToObject(text: string): boolean {
  try {
    const v = JSON.parse(text) as unknown;
    return typeof v === "object" && v !== null && !Array.isArray(v);
  } catch {
    return false;
  }
}

describe("the JSON automaton against JSON.parse", () => {
  const rng = new Prng(2024);
  const docs = Array.from({ length: 300 }, (_, i) =>
    JSON.stringify(randomObject(rng, 0), null, i % 3 === 0 ? undefined : i % 3),
  );

  it("accepts every prefix of 300 random documents and completes each", () => {
    for (const doc of docs) {
      const b = bytes(doc);
      let s: JsonState | null = START;
      for (let i = 0; i < b.length; i++) {
        expect(isDone(s!), `${JSON.stringify(doc)} complete before byte ${i}`).toBe(false);
        s = step(s!, b[i]!);
        expect(s, `${JSON.stringify(doc)} refused at byte ${i}`).not.toBeNull();
      }
      expect(isDone(s!)).toBe(true);
    }
  });

  it("one-character edits: accepted and complete exactly when JSON.parse gives an object", () => {
    let valid = 0;
    let invalid = 0;
    for (const edited of oneCharEdits(docs, rng, EDITS, 10)) {
      const want = parsesToObject(edited);
      const got = check(edited);
      expect(got.refusedAt === -1 && got.done, JSON.stringify(edited)).toBe(want);
      if (want) valid++;
      else invalid++;
    }
    // Both outcomes were exercised.
    expect(valid).toBeGreaterThan(200);
    expect(invalid).toBeGreaterThan(200);
  });
});

// ---- masks ----

describe("JSON masks", () => {
  const texts = [
    ...JSON_CHARS,
    "  ",
    ".",
    "e",
    "E",
    "+",
    "0",
    "1",
    "9",
    "12",
    "1.5e",
    "true",
    "tr",
    "ue",
    "null",
    "fal",
    "se",
    "a",
    "key",
    '"}',
    "},{",
    '{"',
    '":',
    '","',
    "]}",
    "}}",
    "} ",
    "\\u",
    "00",
    "e9",
    "\\n",
    " {",
    '"a":',
    "é",
    "東京",
    "\u0001",
    "\t\t\t",
  ];
  // id 0 and 3 are special (no bytes); vocab_size leaves padding ids past the texts.
  const tokenBytes: (Uint8Array | null)[] = [
    null,
    ...texts.slice(0, 2).map(bytes),
    null,
    ...texts.slice(2).map(bytes),
  ];
  const V = tokenBytes.length + 5;
  const grammar = new TokenGrammar(JSON_OBJECT, new Vocabulary(tokenBytes, V));

  /** States reached along random documents. */
  const states: JsonState[] = [START];
  const rng = new Prng(7);
  for (let d = 0; d < 40; d++) {
    const b = bytes(JSON.stringify(randomObject(rng, 0), null, d % 2));
    let s: JsonState | null = START;
    for (const x of b) {
      s = step(s!, x);
      if (rng.uniform() < 0.3) states.push(s!);
    }
  }

  it(`equal checking every token, in ${states.length} states along random documents`, () => {
    expectExactMasks(grammar, JSON_OBJECT, states, tokenBytes, V);
  });

  it("are kept per state", () => {
    const before = grammar.computed;
    // The states asked last are still cached (the cache keeps the most recently used).
    for (const s of states.slice(-20)) grammar.mask(s);
    expect(grammar.computed).toBe(before);
    // A state not seen yet is computed once.
    const fresh = run(START, bytes('{"zz":[[[[')) as JsonState;
    grammar.mask(fresh);
    grammar.mask(fresh);
    expect(grammar.computed).toBe(before + 1);
    // The cache is bounded: the first state, asked before hundreds of others, was dropped.
    expect(new Set(states.map((s) => JSON_OBJECT.key(s))).size).toBeGreaterThan(300);
    grammar.mask(START);
    expect(grammar.computed).toBe(before + 2);
  });
});
