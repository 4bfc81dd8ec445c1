// Bounded numbers (src/gateway/json-number.ts): every string over the number alphabet up
// to 5 characters is taken, byte by byte, exactly when it is a prefix of an allowed
// number, and may end exactly when it is one; checked against an oracle in exact decimal
// arithmetic written here, for rules with every keyword. Liveness: from every prefix taken,
// a search finds an allowed number.
import { describe, expect, it } from "vitest";
import {
  canEnd,
  decimal,
  type NumberRule,
  type NumberState,
  numberKey,
  numberRule,
  stepNumber,
} from "../../src/gateway/json-number.ts";

type Keywords = Record<string, number | boolean>;

const bad = (m: string): never => {
  throw new Error(m);
};

const rule = (k: Keywords, integer = false): NumberRule => numberRule(k, integer, bad)!;

/** A JSON number without an exponent: the text the automaton writes. */
const PLAIN = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?$/;
/** Its prefixes. */
const PLAIN_PREFIX = /^-?((0|[1-9][0-9]*)(\.[0-9]*)?)?$/;

/** value * 10^12 exactly (the test's numbers and bounds have at most 12 fraction digits). */
function micro(text: string): bigint {
  const negative = text.startsWith("-");
  const [int, frac = ""] = text.replace("-", "").split(".");
  const v = BigInt(int! + frac.padEnd(12, "0"));
  return negative ? -v : v;
}

/** Whether the plain number `text` satisfies `k` (JSON Schema's meaning, draft 2020 and 4). */
function allowed(text: string, k: Keywords, integer: boolean): boolean {
  const v = micro(text);
  const num = (x: number | boolean | undefined) => (typeof x === "number" ? microOf(x) : undefined);
  if (integer && v % micro("1") !== 0n) return false;
  const min = num(k["minimum"]);
  const max = num(k["maximum"]);
  if (min !== undefined && (k["exclusiveMinimum"] === true ? v <= min : v < min)) return false;
  if (max !== undefined && (k["exclusiveMaximum"] === true ? v >= max : v > max)) return false;
  const exMin = num(k["exclusiveMinimum"]);
  const exMax = num(k["exclusiveMaximum"]);
  if (exMin !== undefined && v <= exMin) return false;
  if (exMax !== undefined && v >= exMax) return false;
  const m = num(k["multipleOf"]);
  return m === undefined || v % m === 0n;
}

const micros = new Map<number, bigint>();
/** A bound's micro(), its decimal text from Intl (slow: kept). */
function microOf(x: number): bigint {
  let v = micros.get(x);
  if (v === undefined) {
    v = micro(x.toLocaleString("en-US", { useGrouping: false, maximumFractionDigits: 20 }));
    micros.set(x, v);
  }
  return v;
}

/** Runs `text`; null where refused. */
function run(r: NumberRule, text: string): NumberState | null {
  let s: NumberState | null = null;
  for (let i = 0; i < text.length; i++) {
    s = stepNumber(r, s, text.charCodeAt(i));
    if (!s) return null;
  }
  return s;
}

const ALPHABET = ["-", ".", "0", "1", "2", "3", "5", "7", "9"];

/**
 * An allowed number extending `text`, found by following the automaton (at most `budget`
 * more characters, `nodes` steps): the oracle then checks it. Null when none is found.
 */
function complete(
  r: NumberRule,
  text: string,
  budget: number,
  nodes = { left: 20_000 },
): string | null {
  const s = run(r, text);
  if (s === null || nodes.left-- <= 0) return null;
  if (canEnd(r, s)) return text;
  if (budget === 0) return null;
  for (const c of ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ".", "-"]) {
    const found = complete(r, text + c, budget - 1, nodes);
    if (found !== null) return found;
  }
  return null;
}

/** Whether an allowed number of at most `budget` more characters extends `text` (brute force). */
function completable(text: string, k: Keywords, integer: boolean, budget: number): boolean {
  // Integers are written without a fraction.
  if ((integer && text.includes(".")) || !PLAIN_PREFIX.test(text)) return false;
  if (PLAIN.test(text) && allowed(text, k, integer)) return true;
  if (budget === 0) return false;
  return ["-", ".", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"].some((c) =>
    completable(text + c, k, integer, budget - 1),
  );
}

const RULES: [string, Keywords, boolean][] = [
  ["minimum 0", { minimum: 0 }, false],
  ["maximum 12.5", { maximum: 12.5 }, false],
  ["1 <= x <= 31 integer", { minimum: 1, maximum: 31 }, true],
  ["-5 < x < 0.25 (2020)", { exclusiveMinimum: -5, exclusiveMaximum: 0.25 }, false],
  ["0 < x <= 1 (draft 4)", { minimum: 0, exclusiveMinimum: true, maximum: 1 }, false],
  ["multipleOf 0.25", { multipleOf: 0.25 }, false],
  ["multipleOf 7, 10 <= x <= 100, integer", { multipleOf: 7, minimum: 10, maximum: 100 }, true],
  ["multipleOf 0.5 integer (every integer)", { multipleOf: 0.5, minimum: -3 }, true],
  ["multipleOf 3, x >= 990 (long numbers)", { multipleOf: 3, minimum: 990 }, false],
  ["x <= -100", { maximum: -100 }, false],
  ["1e-3 <= x <= 2e-3", { minimum: 1e-3, maximum: 2e-3 }, false],
  ["minimum 1e21 (exponent text)", { minimum: 1e21 }, true],
  ["exactly 0", { minimum: 0, maximum: 0 }, false],
  ["multipleOf 0.1 (not exact in binary)", { multipleOf: 0.1, maximum: 1 }, false],
];

describe.each(RULES)("a number with %s", (_name, k, integer) => {
  const r = rule(k, integer);

  it("takes exactly the prefixes of allowed numbers, ends exactly on allowed ones", () => {
    let taken = 0;
    let ends = 0;
    // Every string over the alphabet up to 5 characters, each prefix's state stepped once.
    const walk = (text: string, s: NumberState | null): void => {
      const isNumber = PLAIN.test(text) && !(integer && text.includes("."));
      const want = isNumber && allowed(text, k, integer);
      expect(s !== null && canEnd(r, s), `end ${text}`).toBe(want);
      if (want) ends++;
      if (s === null) {
        // Refused after a taken prefix: nothing allowed starts so (searched to 5 characters).
        if (text.length <= 3)
          expect(completable(text, k, integer, 5 - text.length), `dead ${text}`).toBe(false);
        return;
      }
      taken++;
      // Every prefix taken leads to an allowed number (within 25 characters for these rules).
      if (text.length <= 3) {
        const found = complete(r, text, 25);
        expect(found !== null && allowed(found, k, integer), `live ${text}: ${found}`).toBe(true);
      }
      if (text.length < 5)
        for (const c of ALPHABET) walk(text + c, stepNumber(r, s, c.charCodeAt(0)));
    };
    for (const c of ALPHABET) walk(c, stepNumber(r, null, c.charCodeAt(0)));
    expect(taken).toBeGreaterThan(0);
    if (k["minimum"] !== 1e21) expect(ends).toBeGreaterThan(0);
  });
});

describe("numberRule", () => {
  it.each([
    [{ minimum: 5, maximum: 4 }, false, /no number/],
    [{ exclusiveMinimum: 1, exclusiveMaximum: 1 }, false, /no number/],
    [{ minimum: 0.5, maximum: 0.9 }, true, /no number/],
    [{ multipleOf: 10, minimum: 1, maximum: 9 }, false, /no number/],
    [{ multipleOf: 0 }, false, /greater than 0/],
    [{ minimum: "1" }, false, /must be a number/],
    [{ exclusiveMaximum: true }, false, /needs minimum \/ maximum/],
  ] as [Keywords, boolean, RegExp][])("refuses %o (integer %s)", (k, integer, message) => {
    expect(() => numberRule(k, integer, bad)).toThrow(message);
  });

  it("is null for keywords that constrain nothing", () => {
    expect(numberRule({}, false, bad)).toBeNull();
    expect(numberRule({ multipleOf: 1 }, true, bad)).toBeNull();
    expect(numberRule({ description: "x" }, true, bad)).toBeNull();
  });

  it.each([
    [0.1, 1n, 1],
    [-2.5, -25n, 1],
    [1e-7, 1n, 7],
    [1.5e21, 1500000000000000000000n, 0],
    [42, 42n, 0],
  ])("reads %d exactly", (x, n, s) => {
    expect(decimal(x)).toEqual({ n, s });
  });

  it("gives prefixes whose every value is allowed one key, others their digits", () => {
    const r = rule({ minimum: 10 });
    const key = (t: string) => numberKey(r, run(r, t)!);
    expect(key("12")).toBe(key("345"));
    expect(key("12.5")).toBe(key("99.0"));
    expect(key("1")).not.toBe(key("2"));
    expect(key("1")).not.toBe(key("12"));
    const m = rule({ multipleOf: 3 });
    expect(numberKey(m, run(m, "1")!)).not.toBe(numberKey(m, run(m, "2")!));
  });
});
