import { type ByteAutomaton, runBytes, TokenGrammar, type Vocabulary } from "./grammar.ts";

/** The automaton's modes (exported for json-schema.ts, which runs values through it). */
export const Mode = {
  /** Before the root object: whitespace or '{'. */
  Start: 0,
  /** After '{': whitespace, a key or '}'. */
  ObjectFirst: 1,
  /** After ',' in an object: whitespace or a key. */
  ObjectKey: 2,
  /** After a key: whitespace or ':'. */
  Colon: 3,
  /** A value: after ':' or ',' in an array. */
  Value: 4,
  /** After '[': a value or ']'. */
  ArrayFirst: 5,
  /** After a value: whitespace, ',' or the closer of the innermost container. */
  After: 6,
  /** Inside a key or a value string; after a backslash; in \uXXXX (n: digits so far). */
  KeyString: 7,
  ValueString: 8,
  KeyEscape: 9,
  ValueEscape: 10,
  KeyUnicode: 11,
  ValueUnicode: 12,
  /** Numbers: after '-', a leading 0, integer digits, '.', fraction digits, 'e', its sign, its digits. */
  Minus: 13,
  Zero: 14,
  Integer: 15,
  Dot: 16,
  Fraction: 17,
  Exponent: 18,
  ExponentSign: 19,
  ExponentDigits: 20,
  /** true / false / null: n = literal * 8 + bytes matched. */
  Literal: 21,
  /** The root object closed: only whitespace. */
  Done: 22,
} as const;
export type Mode = (typeof Mode)[keyof typeof Mode];

/** The automaton's state: immutable; `stack` holds the open containers ('{' or '['). */
export interface JsonState {
  readonly mode: Mode;
  readonly stack: string;
  /** Digits of \uXXXX, literal progress, or consecutive whitespace bytes. */
  readonly n: number;
}

/** Consecutive whitespace bytes allowed (a model can loop on whitespace forever). */
export const MAX_WHITESPACE = 24;
const LITERALS = ["true", "false", "null"];

export const START: JsonState = { mode: Mode.Start, stack: "", n: 0 };

/** JSON whitespace, and decimal digits (bytes). */
export const isWs = (b: number) => b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;
export const isDigit = (b: number) => b >= 0x30 && b <= 0x39;
const isHex = (b: number) => isDigit(b) || (b >= 0x61 && b <= 0x66) || (b >= 0x41 && b <= 0x46);
const state = (mode: Mode, stack: string, n = 0): JsonState => ({ mode, stack, n });

/** True when `s` is complete: the root object closed. */
export const isDone = (s: JsonState) => s.mode === Mode.Done;

/** The state after byte `b`, or null when JSON cannot continue with it. */
export function step(s: JsonState, b: number): JsonState | null {
  const { mode, stack, n } = s;
  switch (mode) {
    case Mode.Start:
    case Mode.ObjectFirst:
    case Mode.ObjectKey:
    case Mode.Colon:
    case Mode.Value:
    case Mode.ArrayFirst:
    case Mode.After:
    case Mode.Done:
      if (isWs(b)) return n < MAX_WHITESPACE ? state(mode, stack, n + 1) : null;
      return structural(mode, stack, b);
    case Mode.KeyString:
    case Mode.ValueString:
      if (b === 0x22)
        return mode === Mode.KeyString ? state(Mode.Colon, stack) : state(Mode.After, stack);
      if (b === 0x5c)
        return state(mode === Mode.KeyString ? Mode.KeyEscape : Mode.ValueEscape, stack);
      // Control characters must be escaped; other bytes (UTF-8 included) stand for themselves.
      return b < 0x20 ? null : s;
    case Mode.KeyEscape:
    case Mode.ValueEscape: {
      const key = mode === Mode.KeyEscape;
      if (b === 0x75) return state(key ? Mode.KeyUnicode : Mode.ValueUnicode, stack);
      // " \ / b f n r t
      if ([0x22, 0x5c, 0x2f, 0x62, 0x66, 0x6e, 0x72, 0x74].includes(b))
        return state(key ? Mode.KeyString : Mode.ValueString, stack);
      return null;
    }
    case Mode.KeyUnicode:
    case Mode.ValueUnicode: {
      if (!isHex(b)) return null;
      if (n < 3) return state(mode, stack, n + 1);
      return state(mode === Mode.KeyUnicode ? Mode.KeyString : Mode.ValueString, stack);
    }
    case Mode.Minus:
      if (b === 0x30) return state(Mode.Zero, stack);
      return isDigit(b) ? state(Mode.Integer, stack) : null;
    case Mode.Zero:
    case Mode.Integer:
      if (mode === Mode.Integer && isDigit(b)) return s;
      if (b === 0x2e) return state(Mode.Dot, stack);
      if (b === 0x65 || b === 0x45) return state(Mode.Exponent, stack);
      return step(state(Mode.After, stack), b);
    case Mode.Dot:
      return isDigit(b) ? state(Mode.Fraction, stack) : null;
    case Mode.Fraction:
      if (isDigit(b)) return s;
      if (b === 0x65 || b === 0x45) return state(Mode.Exponent, stack);
      return step(state(Mode.After, stack), b);
    case Mode.Exponent:
      if (b === 0x2b || b === 0x2d) return state(Mode.ExponentSign, stack);
      return isDigit(b) ? state(Mode.ExponentDigits, stack) : null;
    case Mode.ExponentSign:
      return isDigit(b) ? state(Mode.ExponentDigits, stack) : null;
    case Mode.ExponentDigits:
      return isDigit(b) ? s : step(state(Mode.After, stack), b);
    case Mode.Literal: {
      const word = LITERALS[n >> 3]!;
      const at = n & 7;
      if (b !== word.charCodeAt(at)) return null;
      return at + 1 === word.length ? state(Mode.After, stack) : state(mode, stack, n + 1);
    }
  }
}

/** A non-whitespace byte where whitespace is allowed. */
function structural(mode: Mode, stack: string, b: number): JsonState | null {
  const close = (): JsonState => {
    const rest = stack.slice(0, -1);
    return rest === "" ? state(Mode.Done, "") : state(Mode.After, rest);
  };
  switch (mode) {
    case Mode.Start:
      return b === 0x7b ? state(Mode.ObjectFirst, "{") : null;
    case Mode.ObjectFirst:
      if (b === 0x7d) return close();
      return b === 0x22 ? state(Mode.KeyString, stack) : null;
    case Mode.ObjectKey:
      return b === 0x22 ? state(Mode.KeyString, stack) : null;
    case Mode.Colon:
      return b === 0x3a ? state(Mode.Value, stack) : null;
    case Mode.ArrayFirst:
      if (b === 0x5d) return close();
      return value(stack, b);
    case Mode.Value:
      return value(stack, b);
    case Mode.After: {
      const top = stack[stack.length - 1];
      if (b === 0x2c) return state(top === "{" ? Mode.ObjectKey : Mode.Value, stack);
      if ((b === 0x7d && top === "{") || (b === 0x5d && top === "[")) return close();
      return null;
    }
    default:
      return null;
  }
}

/** The first byte of a value. */
function value(stack: string, b: number): JsonState | null {
  if (b === 0x7b) return state(Mode.ObjectFirst, `${stack}{`);
  if (b === 0x5b) return state(Mode.ArrayFirst, `${stack}[`);
  if (b === 0x22) return state(Mode.ValueString, stack);
  if (b === 0x2d) return state(Mode.Minus, stack);
  if (b === 0x30) return state(Mode.Zero, stack);
  if (isDigit(b)) return state(Mode.Integer, stack);
  const literal = LITERALS.findIndex((w) => w.charCodeAt(0) === b);
  return literal < 0 ? null : state(Mode.Literal, stack, literal * 8 + 1);
}

/** The state after `bytes`, or null where they stop being a JSON object's prefix. */
export function run(s: JsonState | null, bytes: Uint8Array): JsonState | null {
  return runBytes(JSON_OBJECT, s, bytes);
}

const STRING_MODES = new Set<number>([
  Mode.KeyString,
  Mode.ValueString,
  Mode.KeyEscape,
  Mode.ValueEscape,
  Mode.KeyUnicode,
  Mode.ValueUnicode,
]);

/**
 * Inside a string only a quote leads out of it: a token without one is allowed or not by
 * the string's own state, whatever the containers around it (grammar.ts: local).
 */
export function stringLocal(s: JsonState): { key: string; byte: number } | null {
  return STRING_MODES.has(s.mode) ? { key: `string ${s.mode},${s.n}`, byte: 0x22 } : null;
}

/** The automaton of one JSON object. */
export const JSON_OBJECT: ByteAutomaton<JsonState> = {
  start: START,
  step,
  isDone,
  key: (s) => `${s.mode},${s.n},${s.stack}`,
  local: stringLocal,
};

const grammars = new WeakMap<Vocabulary, TokenGrammar<JsonState>>();

/** JSON mode's grammar over a vocabulary (one per vocabulary: its masks are shared). */
export function jsonObjectGrammar(vocabulary: Vocabulary): TokenGrammar<JsonState> {
  let g = grammars.get(vocabulary);
  if (!g) {
    g = new TokenGrammar(JSON_OBJECT, vocabulary);
    grammars.set(vocabulary, g);
  }
  return g;
}
