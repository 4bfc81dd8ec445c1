// Numbers under JSON Schema's `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`
// and `multipleOf` (json-schema.ts), written byte by byte so that every prefix can still
// become an allowed value: a digit that would leave none is refused, as a byte outside
// JSON is.
//
// A prefix stands for the values it can still become: after "-" every value <= 0; after
// the integer digits p every value in [p*10^k, (p+1)*10^k) for some k >= 0; after a
// fraction's s digits every value in [v, v + 10^-s). The prefix lives while one of those
// intervals holds an allowed value (within the bounds and, with multipleOf, a multiple of
// it). Arithmetic is exact: decimals are BigInt numerators over a power of ten, the bounds
// read from their shortest decimal text. Bounded numbers are written without an exponent
// (plain decimals, as a model writes them), which keeps the intervals above simple.

import { isDigit } from "./json-mode.ts";

/** A decimal n / 10^s. */
interface Dec {
  readonly n: bigint;
  readonly s: number;
}

/** What a number must satisfy; a bound absent is unbounded. */
export interface NumberRule {
  readonly integer: boolean;
  readonly min: Dec | null;
  readonly minExclusive: boolean;
  readonly max: Dec | null;
  readonly maxExclusive: boolean;
  /** The values must be multiples of this (integers: a multiple of 1 at least). */
  readonly step: Dec | null;
}

/** Where in the number: after "-", a leading 0, integer digits, ".", fraction digits. */
export const Phase = { Minus: 1, Zero: 2, Integer: 3, Dot: 4, Fraction: 5 } as const;
export type Phase = (typeof Phase)[keyof typeof Phase];

export interface NumberState {
  readonly phase: Phase;
  readonly negative: boolean;
  /** Integer digits ("0" after a leading zero) and fraction digits written. */
  readonly int: string;
  readonly frac: string;
}

const pow10 = (k: number): bigint => 10n ** BigInt(k);

/** The exact decimal of a finite JS number, from its shortest text ("1e-7" included). */
export function decimal(x: number): Dec {
  const [mantissa, exp] = x.toString().toLowerCase().split("e") as [string, string | undefined];
  const negative = mantissa.startsWith("-");
  const [int, frac = ""] = mantissa.replace("-", "").split(".") as [string, string | undefined];
  let n = BigInt(int + frac);
  let s = frac.length - Number(exp ?? 0);
  if (s < 0) {
    n *= pow10(-s);
    s = 0;
  }
  return { n: negative ? -n : n, s };
}

const rescale = (d: Dec, s: number): bigint => d.n * pow10(s - d.s);
const cmp = (a: Dec, b: Dec): number => {
  const s = Math.max(a.s, b.s);
  const x = rescale(a, s);
  const y = rescale(b, s);
  return x < y ? -1 : x > y ? 1 : 0;
};

/** One end of an interval: null is infinite. */
interface End {
  readonly at: Dec | null;
  readonly inclusive: boolean;
}

const ceilDiv = (a: bigint, b: bigint): bigint => {
  const q = a / b;
  return a % b !== 0n && a > 0n ? q + 1n : q;
};

/** Whether the interval (lo, hi) holds a value the rule allows. */
function holds(rule: NumberRule, lo: End, hi: End): boolean {
  // The tighter of each pair of ends.
  const low = tighter(lo, { at: rule.min, inclusive: !rule.minExclusive }, 1);
  const high = tighter(hi, { at: rule.max, inclusive: !rule.maxExclusive }, -1);
  if (low.at === null || high.at === null) return true;
  if (!rule.step) {
    const c = cmp(low.at, high.at);
    return c < 0 || (c === 0 && low.inclusive && high.inclusive);
  }
  // The first multiple of the step at or above (beyond, if exclusive) the low end.
  const s = Math.max(low.at.s, high.at.s, rule.step.s);
  const step = rescale(rule.step, s);
  const l = rescale(low.at, s);
  let k = ceilDiv(l, step);
  if (!low.inclusive && k * step === l) k += 1n;
  const first = k * step;
  const h = rescale(high.at, s);
  return first < h || (first === h && high.inclusive);
}

/** Of two lower (sign 1) or upper (sign -1) ends, the one that cuts more. */
function tighter(a: End, b: End, sign: 1 | -1): End {
  if (a.at === null) return b;
  if (b.at === null) return a;
  const c = cmp(a.at, b.at) * sign;
  if (c !== 0) return c > 0 ? a : b;
  return { at: a.at, inclusive: a.inclusive && b.inclusive };
}

const INF: End = { at: null, inclusive: false };
const closed = (at: Dec): End => ({ at, inclusive: true });
const open = (at: Dec): End => ({ at, inclusive: false });
const neg = (d: Dec): Dec => ({ n: -d.n, s: d.s });

/** Values of magnitude [a, b) with the state's sign: [a, b) or (-b, -a]. */
function signed(negative: boolean, a: Dec, b: Dec | null): [End, End] {
  if (!negative) return [closed(a), b ? open(b) : INF];
  return [b ? open(neg(b)) : INF, closed(neg(a))];
}

const digits = (int: string, frac: string): Dec => ({ n: BigInt(int + frac), s: frac.length });

/** Whether the prefix can still become an allowed value. */
export function isLive(rule: NumberRule, st: NumberState): boolean {
  switch (st.phase) {
    case Phase.Minus:
      return holds(rule, INF, closed({ n: 0n, s: 0 }));
    case Phase.Zero:
    case Phase.Dot:
    case Phase.Fraction: {
      const v = digits(st.int, st.frac);
      const [lo, hi] = signed(st.negative, v, { n: v.n + 1n, s: v.s });
      return holds(rule, lo, hi);
    }
    case Phase.Integer: {
      // [p*10^k, (p+1)*10^k) for k = 0, 1, ...: past every finite bound and the step, one
      // more interval says what all the longer ones would.
      const p = BigInt(st.int);
      const big = [rule.min, rule.max, rule.step].reduce(
        (m, d) => (d ? (abs(d.n) / pow10(d.s) > m ? abs(d.n) / pow10(d.s) : m) : m),
        0n,
      );
      for (let k = 0; ; k++) {
        const scale = pow10(k);
        const [lo, hi] = signed(st.negative, { n: p * scale, s: 0 }, { n: (p + 1n) * scale, s: 0 });
        if (holds(rule, lo, hi)) return true;
        if (p * scale > big && scale > big) return false;
      }
    }
  }
}

const abs = (n: bigint): bigint => (n < 0n ? -n : n);

/** Whether the number may end here: its value is allowed. */
export function canEnd(rule: NumberRule, st: NumberState): boolean {
  if (st.phase !== Phase.Zero && st.phase !== Phase.Integer && st.phase !== Phase.Fraction)
    return false;
  const v = digits(st.int, st.frac);
  const x = st.negative ? neg(v) : v;
  return holds(rule, closed(x), closed(x));
}

/**
 * The state after byte `b` (the first byte: `st` null), or null when `b` does not continue
 * the number or leaves no allowed value.
 */
export function stepNumber(
  rule: NumberRule,
  st: NumberState | null,
  b: number,
): NumberState | null {
  const next = advance(rule, st, b);
  return next && isLive(rule, next) ? next : null;
}

function advance(rule: NumberRule, st: NumberState | null, b: number): NumberState | null {
  const d = String.fromCharCode(b);
  if (st === null) {
    if (b === 0x2d) return { phase: Phase.Minus, negative: true, int: "", frac: "" };
    if (!isDigit(b)) return null;
    return { phase: b === 0x30 ? Phase.Zero : Phase.Integer, negative: false, int: d, frac: "" };
  }
  switch (st.phase) {
    case Phase.Minus:
      return isDigit(b) ? { ...st, phase: b === 0x30 ? Phase.Zero : Phase.Integer, int: d } : null;
    case Phase.Zero:
    case Phase.Integer:
      if (isDigit(b)) return st.phase === Phase.Integer ? { ...st, int: st.int + d } : null;
      return b === 0x2e && !rule.integer ? { ...st, phase: Phase.Dot } : null;
    case Phase.Dot:
    case Phase.Fraction:
      return isDigit(b) ? { ...st, phase: Phase.Fraction, frac: st.frac + d } : null;
  }
}

/** Whether `b` would continue a number (so it cannot end one). */
export const continuesNumber = (b: number): boolean =>
  isDigit(b) || b === 0x2e || b === 0x65 || b === 0x45;

/**
 * A key equal for states with the same future: the digits, unless every value the prefix
 * can become is allowed (then only where in the number it is matters).
 */
export function numberKey(rule: NumberRule, st: NumberState): string {
  const free = unconstrained(rule, st);
  return free ? `${st.phase},free` : `${st.phase},${st.negative ? "-" : ""}${st.int}.${st.frac}`;
}

function unconstrained(rule: NumberRule, st: NumberState): boolean {
  // With a step other than 1 the digits decide which multiples remain.
  if (rule.step && !(rule.step.n === pow10(rule.step.s))) return false;
  if (rule.step && st.phase >= Phase.Dot) return false;
  const zero = { n: 0n, s: 0 };
  let lo: End;
  let hi: End;
  switch (st.phase) {
    case Phase.Minus:
      [lo, hi] = [INF, closed(zero)];
      break;
    case Phase.Integer:
      [lo, hi] = signed(st.negative, digits(st.int, ""), null);
      break;
    default: {
      const v = digits(st.int, st.frac);
      [lo, hi] = signed(st.negative, v, { n: v.n + 1n, s: v.s });
    }
  }
  return (
    within(lo, { at: rule.min, inclusive: !rule.minExclusive }, 1) &&
    within(hi, { at: rule.max, inclusive: !rule.maxExclusive }, -1)
  );
}

/** Whether end `e` lies inside bound `b` (a lower one with sign 1, an upper one with -1). */
function within(e: End, b: End, sign: 1 | -1): boolean {
  if (b.at === null) return true;
  if (e.at === null) return false;
  const c = cmp(e.at, b.at) * sign;
  return c > 0 || (c === 0 && (b.inclusive || !e.inclusive));
}

/** Reads the keywords of a number or integer schema; null when it has none. */
export function numberRule(
  s: Record<string, unknown>,
  integer: boolean,
  bad: (message: string) => never,
): NumberRule | null {
  const num = (k: string): Dec | null => {
    const v = s[k];
    if (v === undefined || typeof v === "boolean") return null;
    if (typeof v !== "number" || !Number.isFinite(v)) return bad(`'${k}' must be a number`);
    return decimal(v);
  };
  let min = num("minimum");
  let max = num("maximum");
  let minExclusive = s["exclusiveMinimum"] === true;
  let maxExclusive = s["exclusiveMaximum"] === true;
  // Draft 6 on: the exclusive bounds are numbers of their own (the tighter bound wins).
  const exMin = num("exclusiveMinimum");
  const exMax = num("exclusiveMaximum");
  if (exMin && (!min || cmp(exMin, min) >= 0)) [min, minExclusive] = [exMin, true];
  if (exMax && (!max || cmp(exMax, max) <= 0)) [max, maxExclusive] = [exMax, true];
  if ((minExclusive && !min) || (maxExclusive && !max))
    bad("exclusiveMinimum / exclusiveMaximum true needs minimum / maximum");
  let step = num("multipleOf");
  if (step && step.n <= 0n) bad("'multipleOf' must be greater than 0");
  if (integer) step = step ? lcm(step, { n: 1n, s: 0 }) : { n: 1n, s: 0 };
  if (!min && !max && (!step || (integer && step.n === 1n && step.s === 0))) return null;
  const rule: NumberRule = { integer, min, minExclusive, max, maxExclusive, step };
  if (!holds(rule, INF, INF)) bad("no number satisfies minimum / maximum / multipleOf");
  return rule;
}

/** The least common multiple of two positive decimals. */
function lcm(a: Dec, b: Dec): Dec {
  const s = Math.max(a.s, b.s);
  const x = rescale(a, s);
  const y = rescale(b, s);
  let [p, q] = [x, y];
  while (q !== 0n) [p, q] = [q, p % q];
  return { n: (x / p) * y, s };
}
