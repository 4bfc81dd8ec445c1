// Strings and numbers under their JSON Schema keywords, through the schema automaton
// (src/gateway/json-schema.ts, json-string.ts, json-number.ts): hand cases; random strings
// written as JSON (escapes, UTF-8, astral characters) taken exactly when the pattern (as
// RegExp with the u flag) and the lengths (in code points) allow them; every state reached
// can still be completed; masks equal checking every token; refusals with 400.
import { describe, expect, it } from "vitest";
import { ApiError } from "../../src/gateway/errors.ts";
import { runBytes, TokenGrammar, Vocabulary } from "../../src/gateway/grammar.ts";
import {
  compileSchema,
  type SchemaAutomaton,
  type SchemaState,
} from "../../src/gateway/json-schema.ts";
import { FORMAT_PATTERNS } from "../../src/gateway/regex.ts";
import { Prng } from "../../src/model/prng.ts";
import { expectExactMasks, utf8 } from "../support/grammar.ts";

type Schema = Record<string, unknown>;

/** An object of one required property `v` of schema `v`. */
const one = (v: Schema): Schema => ({ type: "object", properties: { v }, required: ["v"] });

/** Whether `{"v":VALUE}` is taken whole and complete, VALUE being JSON text. */
function takes(a: SchemaAutomaton, value: string): boolean {
  const s = runBytes(a, a.start, utf8(`{"v":${value}}`));
  return s !== null && a.isDone(s);
}

describe("strings under pattern, format, minLength and maxLength", () => {
  it.each([
    [{ pattern: "^[a-z]+$" }, ['"abc"', '"\\u0061"'], ['""', '"aBc"', '"ab1"', '"a\\n"']],
    [{ pattern: "b" }, ['"b"', '"abc"', '"xxbxx"'], ['""', '"ac"']],
    [{ pattern: "^a\\nb$" }, ['"a\\nb"', '"a\\u000ab"'], ['"ab"', '"a\\\\nb"']],
    [{ pattern: '^"\\\\$' }, ['"\\"\\\\"'], ['"\\""']],
    [{ pattern: "^.$" }, ['"😀"', '"é"', '"x"'], ['""', '"ab"', '"\\ud83d\\ude00"']],
    [{ pattern: "^[^a]{2}$" }, ['"東京"', '"😀😀"', '"\\t "'], ['"ab"', '"a"']],
    [{ minLength: 2, maxLength: 3 }, ['"ab"', '"😀é東"', '"\\n\\t"'], ['"a"', '"abcd"', '""']],
    [{ maxLength: 0 }, ['""'], ['"a"']],
    [{ pattern: "^(ab)+$", maxLength: 5 }, ['"ab"', '"abab"'], ['"ababab"', '"aba"']],
    [{ pattern: "^(ab)+$", minLength: 3 }, ['"abab"'], ['"ab"']],
    [{ format: "date" }, ['"2026-11-30"'], ['"2026-13-01"', '"2026-1-01"']],
    [
      { format: "date-time" },
      ['"2026-11-30T10:54:37Z"', '"2026-11-30T10:54:37.5+01:00"'],
      ['"2026-11-30"'],
    ],
    [{ format: "uuid" }, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567"']],
    [{ format: "ipv4" }, ['"192.168.0.1"'], ['"256.0.0.1"', '"01.2.3.4"']],
    [{ format: "email" }, ['"ann@example.com"'], ['"ann"', '"@example.com"']],
  ] as [Schema, string[], string[]][])("%o", (rule, good, badOnes) => {
    const a = compileSchema(one({ type: "string", ...rule }));
    for (const g of good) expect(takes(a, g), g).toBe(true);
    for (const b of badOnes) expect(takes(a, b), b).toBe(false);
  });

  it("refuses invalid UTF-8 and \\u escapes of surrogates, whatever the pattern", () => {
    const a = compileSchema(one({ type: "string", pattern: "^.*$" }));
    const run = (b: number[]) => runBytes(a, a.start, Uint8Array.from([...utf8('{"v":"'), ...b]));
    expect(run([0xc3, 0xa9])).not.toBeNull(); // é
    expect(run([0xc0, 0x80])).toBeNull(); // overlong
    expect(run([0xed, 0xa0])).toBeNull(); // a surrogate's start
    expect(run([0xf4, 0x90])).toBeNull(); // above U+10FFFF
    expect(run([0x80])).toBeNull(); // a lone continuation byte
    expect(run([...utf8("\\ud8")])).toBeNull();
    expect(run([...utf8("\\ud7ff")])).not.toBeNull();
  });

  it("does not let a character start that no allowed string continues", () => {
    const a = compileSchema(one({ type: "string", pattern: "^[a-z]*$" }));
    const run = (s: string) => runBytes(a, a.start, utf8(`{"v":"${s}`));
    expect(run("ab")).not.toBeNull();
    expect(run("\\n")).toBeNull();
    expect(run("\\")).not.toBeNull(); // \u0061 writes a
    expect(run("\\u00")).not.toBeNull();
    expect(run("\\u01")).toBeNull();
    expect(run("é".slice(0, 1))).toBeNull();
  });
});

describe("numbers under minimum, maximum and multipleOf", () => {
  it.each([
    [
      { type: "integer", minimum: 1, maximum: 12 },
      ["1", "12", "7"],
      ["0", "13", "-1", "1.0", "1e1"],
    ],
    [
      { type: "number", exclusiveMinimum: 0, maximum: 1 },
      ["0.5", "1", "0.001"],
      ["0", "1.01", "-0.5"],
    ],
    [{ type: "number", multipleOf: 0.25 }, ["0.75", "-2", "3.50"], ["0.1", "1e2"]],
    [{ type: ["integer", "null"], minimum: 0 }, ["0", "null", "5"], ["-5"]],
  ] as [Schema, string[], string[]][])("%o", (rule, good, badOnes) => {
    const a = compileSchema(one(rule));
    for (const g of good) expect(takes(a, g), g).toBe(true);
    for (const b of badOnes) expect(takes(a, b), b).toBe(false);
  });

  it("ends a number at the next structural byte only when its value is allowed", () => {
    const a = compileSchema({
      type: "object",
      properties: { v: { type: "array", items: { type: "integer", minimum: 10 } } },
      required: ["v"],
    });
    expect(takes(a, "[10, 20 ,300]")).toBe(true);
    expect(runBytes(a, a.start, utf8('{"v":[1,'))).toBeNull();
    expect(runBytes(a, a.start, utf8('{"v":[1'))).not.toBeNull();
  });
});

// ---- random strings against RegExp ----

const RULES: Schema[] = [
  { pattern: "^[a-c]{1,3}x?$" },
  { pattern: "^(a|bc)*$", maxLength: 4 },
  { pattern: "a.c" },
  { pattern: "^\\d+(\\.\\d{1,2})?$" },
  { pattern: '^[^"\\\\]*$', minLength: 2 },
  { pattern: "^\\S+@\\S+$" },
  { pattern: "^[😀-😂é]+$" },
  { minLength: 1, maxLength: 3 },
  { format: "date" },
  { format: "hostname" },
];

const CHARS = [
  "a",
  "b",
  "c",
  "x",
  "1",
  "9",
  ".",
  "@",
  " ",
  '"',
  "\\",
  "\n",
  "\t",
  "é",
  "東",
  "😀",
  "😂",
  "-",
  "\u0001",
];

/** Code points: what JSON Schema's lengths count. */
const length = (s: string) => [...s].length;

function allows(rule: Schema, s: string): boolean {
  const pattern =
    (rule["pattern"] as string | undefined) ??
    (rule["format"] ? FORMAT_PATTERNS[rule["format"] as string] : undefined);
  if (pattern !== undefined && !new RegExp(pattern, "u").test(s)) return false;
  return (
    length(s) >= ((rule["minLength"] as number) ?? 0) &&
    length(s) <= ((rule["maxLength"] as number) ?? Number.POSITIVE_INFINITY)
  );
}

/** Random strings: from CHARS, and near-misses of matching ones. */
function candidates(rule: Schema, rng: Prng): string[] {
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rng.uniform() * xs.length)]!;
  const out: string[] = ["", "2026-11-30", "a.b-c.example", "1.25", "abc", "a@b", "😀é", "aabc"];
  for (let i = 0; i < 400; i++) {
    const n = Math.floor(rng.uniform() * 7);
    out.push(Array.from({ length: n }, () => pick(CHARS)).join(""));
  }
  // Edits of the allowed ones, which random draws rarely hit.
  for (const s of out.filter((s) => allows(rule, s)))
    for (let e = 0; e < 5; e++) {
      const at = Math.floor(rng.uniform() * (s.length + 1));
      out.push(s.slice(0, at) + pick(CHARS) + s.slice(at));
    }
  return out.filter((s) => s.isWellFormed());
}

describe.each(RULES)("random strings under %o", (rule) => {
  const a = compileSchema(one({ type: "string", ...rule }));
  const rng = new Prng(11);
  const texts = candidates(rule, rng);

  it("are taken exactly when RegExp and the lengths allow them, however escaped", () => {
    let allowed = 0;
    for (const s of texts) {
      const want = allows(rule, s);
      if (want) allowed++;
      expect(takes(a, JSON.stringify(s)), JSON.stringify(s)).toBe(want);
      // The same string with every character escaped that can be.
      const escaped = `"${[...s].map((c) => (c.codePointAt(0)! <= 0xffff ? `\\u${c.codePointAt(0)!.toString(16).padStart(4, "0")}` : c)).join("")}"`;
      expect(takes(a, escaped), escaped).toBe(want);
    }
    expect(allowed).toBeGreaterThan(0);
  });

  it("can complete every state it reaches (a search over its own steps finds an allowed string)", () => {
    const steps = [
      ...CHARS.map((c) => JSON.stringify(c).slice(1, -1)),
      ..."0123456789abcdefABCDEF-zu",
    ].map(utf8);
    for (const s of texts.slice(0, 120)) {
      // The longest prefix taken.
      let st: SchemaState | null = runBytes(a, a.start, utf8('{"v":"'));
      for (const b of utf8(JSON.stringify(s).slice(1, -1))) {
        const next = a.step(st!, b);
        if (next === null) break;
        st = next;
      }
      let budget = 20_000;
      const search = (x: SchemaState, depth: number): boolean => {
        if (budget-- <= 0) return false;
        const closed = a.step(x, 0x22);
        if (closed && a.step(closed, 0x7d) && a.isDone(a.step(closed, 0x7d)!)) return true;
        if (depth === 0) return false;
        return steps.some((t) => {
          const y = runBytes(a, x, t);
          return y !== null && search(y, depth - 1);
        });
      };
      expect(search(st!, 24), JSON.stringify(s)).toBe(true);
    }
  });
});

describe("masks of pattern, format and bound states", () => {
  const schema: Schema = {
    type: "object",
    properties: {
      code: { type: "string", pattern: "^[A-Z]{2}-\\d{3}$" },
      day: { type: "string", format: "date" },
      name: { type: "string", minLength: 1, maxLength: 4 },
      n: { type: "integer", minimum: 5, maximum: 250 },
      x: { type: "number", multipleOf: 0.5, exclusiveMaximum: 3 },
    },
    required: ["code", "day", "name", "n", "x"],
  };
  const texts = [
    '"',
    '",',
    "AB",
    "A",
    "B-",
    "-",
    "-1",
    "12",
    "3",
    "25",
    "0",
    "5",
    ".",
    ".5",
    "2026",
    "-11",
    "-30",
    "é",
    "😀",
    "\\",
    "\\u",
    "\\u00",
    "41",
    "ab",
    "abcd",
    "abcde",
    '"}',
    "}",
    ",",
    ":",
    '"code":"',
    '"day":"',
    '"name":"',
    '"n":',
    '"x":',
    "{",
  ];
  const tokenBytes: (Uint8Array | null)[] = [
    null,
    ...texts.map(utf8),
    Uint8Array.of(0xc3),
    Uint8Array.of(0xa9),
    Uint8Array.of(0xf0, 0x9f),
    Uint8Array.of(0x98, 0x80),
  ];
  const V = tokenBytes.length + 2;
  const a = compileSchema(schema);
  const grammar = new TokenGrammar(a, new Vocabulary(tokenBytes, V));
  const doc = '{"code":"AB-123","day":"2026-11-30","name":"é😀","n":250,"x":2.5}';
  const states: SchemaState[] = [];
  let s: SchemaState | null = a.start;
  for (const b of utf8(doc)) {
    states.push(s!);
    s = a.step(s!, b);
  }

  it(`equal checking every token in each of the ${utf8(doc).length} states of an instance`, () => {
    expect(s !== null && a.isDone(s)).toBe(true);
    expectExactMasks(grammar, a, states, tokenBytes, V);
  });
});

describe("long strings under lengths: lengths a token cannot reach the bounds from share masks", () => {
  const texts = ["a", "bc", "def", "ghij", '"', 'k"', '"}', "\\n", "é", "😀", ":", "{", ","];
  const tokenBytes: (Uint8Array | null)[] = [null, ...texts.map(utf8)];
  const V = tokenBytes.length;
  const vocabulary = new Vocabulary(tokenBytes, V);

  it.each([
    [{ maxLength: 300 }, 250],
    [{ minLength: 200 }, 250],
    [{ minLength: 100, maxLength: 150 }, 150],
    [{ pattern: "^a*(bc)*$", maxLength: 120 }, 110],
  ] as [Schema, number][])("%o", (rule, chars) => {
    const schema = one({ type: "string", ...rule });
    const a = compileSchema(schema, undefined, { tokenBytes: vocabulary.maxTokenBytes });
    const exact = compileSchema(schema);
    const grammar = new TokenGrammar(a, vocabulary);
    const states: SchemaState[] = [];
    const keys = new Set<string>();
    const exactKeys = new Set<string>();
    let s: SchemaState | null = runBytes(a, a.start, utf8('{"v":"'));
    let e: SchemaState | null = runBytes(exact, exact.start, utf8('{"v":"'));
    for (let i = 0; i < chars; i++) {
      states.push(s!);
      keys.add(a.key(s!));
      exactKeys.add(exact.key(e!));
      s = a.step(s!, 0x61);
      e = exact.step(e!, 0x61);
    }
    // Every mask is still exact: the shared keys lose nothing.
    expectExactMasks(grammar, a, states, tokenBytes, V);
    expect(exactKeys.size).toBeGreaterThan(100);
    expect(keys.size).toBeLessThanOrEqual(2 * vocabulary.maxTokenBytes + 2);
  });
});

describe("string and number keywords refused with 400", () => {
  it.each([
    [{ type: "string", pattern: "(?=a)" }, /pattern: lookahead/],
    [{ type: "string", pattern: "a(" }, /pattern/],
    [{ type: "string", format: "color" }, /format "color" is not supported/],
    [{ type: "string", format: "date", pattern: "^2" }, /together/],
    [{ type: "string", minLength: 3, maxLength: 2 }, /minLength is above maxLength/],
    [{ type: "string", minLength: -1 }, /'minLength' must be an integer/],
    [{ type: "string", pattern: "^a{5}$", maxLength: 3 }, /no string satisfies/],
    [{ type: "string", pattern: "^a{500}$", maxLength: 100000 }, /too large/],
    [{ pattern: "^a" }, /'pattern' needs a "type"/],
    [{ minimum: 1 }, /'minimum' needs a "type"/],
    [{ additionalProperties: { type: "integer" } }, /'additionalProperties' needs "type"/],
    [{ type: "integer", minimum: 3, maximum: 2 }, /no number/],
    [{ type: "number", multipleOf: -1 }, /greater than 0/],
  ] as [Schema, RegExp][])("%o", (rule, message) => {
    let err: unknown;
    try {
      compileSchema(one(rule));
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).code).toBe("EM_GATEWAY_BAD_REQUEST");
    expect((err as ApiError).message).toMatch(message);
    // Tools' parameters (lenient): the value is written without that rule.
    expect(() => compileSchema(one(rule), undefined, { lenient: true })).not.toThrow();
  });
});
