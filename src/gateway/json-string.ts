// Strings under JSON Schema's `pattern`, `format`, `minLength` and `maxLength`
// (json-schema.ts), written byte by byte so that every prefix can still become an allowed
// string: a byte that would leave none is refused.
//
// The pattern (or the format's pattern) is an NFA over code points (regex.ts), run as a
// DFA built lazily from its state sets; the length, in code points as JSON Schema counts
// it, is a counter beside it. Which (NFA state, count) pairs can still reach the end is
// computed once per rule, so a DFA state with a count is live when one of its NFA states is.
// The bytes between code points (UTF-8 continuation bytes, escapes, \uXXXX digits) leave a
// range of code points the character can still become; they are allowed while one of them
// leads to a live state. Characters are UTF-8 (validated: no overlong forms, no
// surrogates) or escapes; \u escapes of surrogates are refused (astral characters are
// written as UTF-8), so every character is one code point.
import { epsilonClosure, inRanges, type Nfa } from "./regex.ts";

/** Pairs (NFA state, count) are at most this many (maxLength times the pattern's size). */
const MAX_PAIRS = 1 << 20;

const SURROGATES: readonly [number, number] = [0xd800, 0xdfff];
const MAX_CP = 0x10ffff;

/** Where in a character: between characters, in UTF-8, after '\', in \uXXXX. */
const Dec = { None: 0, Utf8: 1, Escape: 2, Unicode: 3 } as const;
type Dec = (typeof Dec)[keyof typeof Dec];

export interface StringState {
  /** The DFA state. */
  readonly q: number;
  /** Code points so far, capped where more no longer matter. */
  readonly count: number;
  readonly dec: Dec;
  /** UTF-8: continuation bytes left; \u: hex digits read. */
  readonly n: number;
  /** The character's bits so far. */
  readonly bits: number;
  /** UTF-8: the first code point of the character's length (0x80, 0x800 or 0x10000). */
  readonly floor: number;
}

/** The closing quote was written: the string is complete. */
export const CLOSED = "closed";

const ESCAPES = new Map<number, number>([
  [0x22, 0x22],
  [0x5c, 0x5c],
  [0x2f, 0x2f],
  [0x62, 0x08],
  [0x66, 0x0c],
  [0x6e, 0x0a],
  [0x72, 0x0d],
  [0x74, 0x09],
]);

const hexValue = (b: number): number =>
  b >= 0x30 && b <= 0x39
    ? b - 0x30
    : b >= 0x61 && b <= 0x66
      ? b - 0x57
      : b >= 0x41 && b <= 0x46
        ? b - 0x37
        : -1;

/** The strings a schema allows, as an automaton over the bytes between the quotes. */
export class StringRule {
  readonly #nfa: Nfa;
  readonly #min: number;
  readonly #max: number;
  /** Counts above this have the same future. */
  readonly #cap: number;
  readonly #closure: number[][];
  /** live[count * size + state]. */
  readonly #live: Uint8Array;
  /** DFA states: sorted NFA state sets, interned by their text. */
  readonly #sets: number[][] = [];
  readonly #ids = new Map<string, number>();
  readonly #next: Map<number, number>[] = [];
  /** Characters one token can hold at most (Infinity: unknown). */
  readonly #window: number;
  /** No pattern: only the lengths constrain. */
  readonly #lengthsOnly: boolean;
  /** Interned rows of the live table (with whether the count may end), and count classes. */
  readonly #rows = new Map<string, number>();
  readonly #rowOf = new Map<number, number>();
  readonly #classes = new Map<string, number>();
  readonly #classOf = new Map<number, number>();
  readonly start: StringState;

  /**
   * `nfa` null: any string. Throws RangeError when no string is allowed or the rule is
   * too large to enforce (callers make either a 400).
   */
  constructor(nfa: Nfa | null, min: number, max: number, tokenBytes = Number.POSITIVE_INFINITY) {
    this.#window = tokenBytes;
    this.#lengthsOnly = nfa === null;
    this.#nfa = nfa ?? anyString();
    this.#min = min;
    this.#max = max;
    this.#cap = Number.isFinite(max) ? max : min;
    const size = this.#nfa.size;
    if ((this.#cap + 1) * size > MAX_PAIRS)
      throw new RangeError(
        `the pattern and length bounds are too large to enforce (${size} states x ${this.#cap + 1} lengths)`,
      );
    this.#closure = Array.from({ length: size }, (_, s) => epsilonClosure(this.#nfa, [s]));
    this.#live = this.#liveness();
    const q = this.#intern(this.#closure[this.#nfa.start]!);
    this.start = { q, count: 0, dec: Dec.None, n: 0, bits: 0, floor: 0 };
    if (!this.#isLive(q, 0))
      throw new RangeError("no string satisfies the pattern, format and length bounds");
  }

  /** The count after one more character, or -1 past maxLength. */
  #after(count: number): number {
    if (count + 1 > this.#max) return -1;
    return Math.min(count + 1, this.#cap);
  }

  /** Which (state, count) pairs reach the accepting state with an allowed length. */
  #liveness(): Uint8Array {
    const { size, accept, edges, eps } = this.#nfa;
    const counts = this.#cap + 1;
    const live = new Uint8Array(counts * size);
    // Backwards from the accepting pairs over reversed edges.
    const into: { from: number; char: boolean }[][] = Array.from({ length: size }, () => []);
    for (let s = 0; s < size; s++) {
      for (const t of eps[s]!) into[t]!.push({ from: s, char: false });
      for (const e of edges[s]!) into[e.to]!.push({ from: s, char: true });
    }
    const queue: number[] = [];
    for (let c = this.#min; c < counts; c++) {
      live[c * size + accept] = 1;
      queue.push(c * size + accept);
    }
    while (queue.length > 0) {
      const pair = queue.pop()!;
      const c = Math.floor(pair / size);
      const t = pair % size;
      for (const { from, char } of into[t]!) {
        // A character edge into (t, c) leaves from (from, c') with after(c') === c.
        const sources = char ? this.#before(c) : [c];
        for (const c0 of sources) {
          const p = c0 * size + from;
          if (!live[p]) {
            live[p] = 1;
            queue.push(p);
          }
        }
      }
    }
    return live;
  }

  /** The counts one character before `c`. */
  #before(c: number): number[] {
    // At the cap without maxLength, both cap - 1 and cap itself lead to it.
    if (c === this.#cap && !Number.isFinite(this.#max)) return c === 0 ? [0] : [c - 1, c];
    return c === 0 ? [] : [c - 1];
  }

  #intern(set: number[]): number {
    const key = set.join(",");
    let id = this.#ids.get(key);
    if (id === undefined) {
      id = this.#sets.length;
      this.#sets.push(set);
      this.#next.push(new Map());
      this.#ids.set(key, id);
    }
    return id;
  }

  #isLive(q: number, count: number): boolean {
    const base = count * this.#nfa.size;
    return this.#sets[q]!.some((s) => this.#live[base + s] === 1);
  }

  /** The DFA state after code point `cp`. */
  #move(q: number, cp: number): number {
    const cached = this.#next[q]!.get(cp);
    if (cached !== undefined) return cached;
    const out = new Set<number>();
    for (const s of this.#sets[q]!)
      for (const e of this.#nfa.edges[s]!)
        if (inRanges(e.ranges, cp)) for (const t of this.#closure[e.to]!) out.add(t);
    const id = this.#intern([...out].sort((a, b) => a - b));
    this.#next[q]!.set(cp, id);
    return id;
  }

  /** Whether some code point in [lo, hi] (not a surrogate) leads from (q, count) to a live state. */
  #canReach(q: number, count: number, lo: number, hi: number): boolean {
    const c = this.#after(count);
    if (c < 0 || lo > hi) return false;
    const base = c * this.#nfa.size;
    for (const s of this.#sets[q]!)
      for (const e of this.#nfa.edges[s]!) {
        if (!this.#live[base + e.to]) continue;
        if (overlaps(e.ranges, lo, hi)) return true;
      }
    return false;
  }

  /** The state after one complete code point, or null. */
  #char(st: StringState, cp: number): StringState | null {
    const count = this.#after(st.count);
    if (count < 0) return null;
    const q = this.#move(st.q, cp);
    return this.#isLive(q, count) ? { q, count, dec: Dec.None, n: 0, bits: 0, floor: 0 } : null;
  }

  /** A partial character that can still become one in [lo, hi] (surrogates excluded). */
  #partial(st: StringState, next: StringState, lo: number, hi: number): StringState | null {
    const reach = (a: number, b: number) => this.#canReach(st.q, st.count, a, b);
    const ok =
      hi < SURROGATES[0] || lo > SURROGATES[1]
        ? reach(lo, hi)
        : reach(lo, SURROGATES[0] - 1) || reach(SURROGATES[1] + 1, hi);
    return ok ? next : null;
  }

  /** Whether the string `text` is allowed (its JSON text, run through the rule). */
  matches(text: string): boolean {
    const bytes = Buffer.from(JSON.stringify(text).slice(1), "utf8");
    let st: StringState = this.start;
    for (let i = 0; i < bytes.length; i++) {
      const next = this.step(st, bytes[i]!);
      if (next === CLOSED) return i === bytes.length - 1;
      if (next === null) return false;
      st = next;
    }
    return false;
  }

  /** Whether the string may close here. */
  canClose(st: StringState): boolean {
    return (
      st.dec === Dec.None && st.count >= this.#min && this.#sets[st.q]!.includes(this.#nfa.accept)
    );
  }

  /** The state after byte `b` inside the string; CLOSED after its closing quote; null: refused. */
  step(st: StringState, b: number): StringState | typeof CLOSED | null {
    switch (st.dec) {
      case Dec.None:
        if (b === 0x22) return this.canClose(st) ? CLOSED : null;
        if (b === 0x5c) return this.#partial(st, { ...st, dec: Dec.Escape }, 0, 0xffff);
        if (b < 0x20) return null;
        if (b < 0x80) return this.#char(st, b);
        return this.#lead(st, b);
      case Dec.Utf8: {
        if (b < 0x80 || b > 0xbf) return null;
        const bits = (st.bits << 6) | (b & 0x3f);
        const n = st.n - 1;
        const span = 1 << (6 * n);
        const lo = Math.max(bits * span, st.floor);
        const hi = Math.min((bits + 1) * span - 1, MAX_CP);
        if (n === 0) {
          const valid =
            bits >= st.floor && bits <= MAX_CP && !(bits >= SURROGATES[0] && bits <= SURROGATES[1]);
          return valid ? this.#char(st, bits) : null;
        }
        return this.#partial(st, { ...st, n, bits }, lo, hi);
      }
      case Dec.Escape: {
        const cp = ESCAPES.get(b);
        if (cp !== undefined) return this.#char(st, cp);
        return b === 0x75
          ? this.#partial(st, { ...st, dec: Dec.Unicode, n: 0, bits: 0 }, 0, 0xffff)
          : null;
      }
      case Dec.Unicode: {
        const h = hexValue(b);
        if (h < 0) return null;
        const bits = st.bits * 16 + h;
        const n = st.n + 1;
        if (n === 4)
          return bits >= SURROGATES[0] && bits <= SURROGATES[1] ? null : this.#char(st, bits);
        const span = 16 ** (4 - n);
        return this.#partial(st, { ...st, n, bits }, bits * span, (bits + 1) * span - 1);
      }
    }
  }

  /**
   * The state after byte `b` of raw text (guided.ts: the whole output under a pattern):
   * UTF-8 only, no escapes, no closing quote; control characters are characters.
   */
  stepRaw(st: StringState, b: number): StringState | null {
    if (st.dec === Dec.Utf8) return this.step(st, b) as StringState | null;
    if (b < 0x80) return this.#char(st, b);
    return this.#lead(st, b);
  }

  /** Whether another character can follow (raw text: else the output must end here). */
  canContinue(st: StringState): boolean {
    if (st.dec !== Dec.None) return true;
    return (
      this.#canReach(st.q, st.count, 0, SURROGATES[0] - 1) ||
      this.#canReach(st.q, st.count, SURROGATES[1] + 1, MAX_CP)
    );
  }

  /** A UTF-8 lead byte. */
  #lead(st: StringState, b: number): StringState | null {
    const [n, bits, floor] =
      b >= 0xc2 && b <= 0xdf
        ? [1, b & 0x1f, 0x80]
        : b >= 0xe0 && b <= 0xef
          ? [2, b & 0x0f, 0x800]
          : b >= 0xf0 && b <= 0xf4
            ? [3, b & 0x07, 0x10000]
            : [0, 0, 0];
    if (n === 0) return null;
    const span = 1 << (6 * n);
    const lo = Math.max(bits * span, floor);
    const hi = Math.min((bits + 1) * span - 1, MAX_CP);
    return this.#partial(st, { ...st, dec: Dec.Utf8, n, bits, floor }, lo, hi);
  }

  /**
   * grammar.ts's local key: without a pattern, and where no token can reach maxLength, a
   * token without a quote is allowed or not by its bytes alone (valid string content,
   * whatever the count): the same in every such state of every rule, keyed by where in a
   * character it is.
   */
  local(st: StringState): string | null {
    if (!this.#lengthsOnly || this.#max - st.count < this.#window) return null;
    return `utf8 string ${st.dec},${st.n},${st.bits},${st.floor}`;
  }

  key(st: StringState): string {
    return `${st.q},${this.#countClass(st.count)},${st.dec},${st.n},${st.bits},${st.floor}`;
  }

  /**
   * Counts whose next `window` counts have the same rows of the live table (and may end
   * alike) step every token alike, a token holding at most `window` characters: one class,
   * so a long string under maxLength does not make every length a new mask.
   */
  #countClass(count: number): string {
    if (!Number.isFinite(this.#window) || this.#cap === 0) return `${count}`;
    let id = this.#classOf.get(count);
    if (id === undefined) {
      const rows: number[] = [];
      for (let c = count, k = 0; k <= this.#window; k++) {
        rows.push(this.#row(c));
        if (c < 0 || (c === this.#cap && !Number.isFinite(this.#max))) break;
        c = this.#after(c);
      }
      const signature = rows.join(",");
      id = this.#classes.get(signature);
      if (id === undefined) {
        id = this.#classes.size;
        this.#classes.set(signature, id);
      }
      this.#classOf.set(count, id);
    }
    return `c${id}`;
  }

  /** Count `c`'s row of the live table as a small integer (0: past maxLength). */
  #row(c: number): number {
    if (c < 0) return 0;
    let id = this.#rowOf.get(c);
    if (id === undefined) {
      const size = this.#nfa.size;
      const bits = Buffer.from(this.#live.subarray(c * size, (c + 1) * size)).toString("latin1");
      const text = (c >= this.#min ? "1" : "0") + bits;
      id = this.#rows.get(text);
      if (id === undefined) {
        id = this.#rows.size + 1;
        this.#rows.set(text, id);
      }
      this.#rowOf.set(c, id);
    }
    return id;
  }
}

/** An NFA of every string. */
function anyString(): Nfa {
  return { size: 1, start: 0, accept: 0, edges: [[{ ranges: [0, MAX_CP], to: 0 }]], eps: [[]] };
}

function overlaps(r: readonly number[], lo: number, hi: number): boolean {
  for (let i = 0; i < r.length; i += 2) if (r[i]! <= hi && r[i + 1]! >= lo) return true;
  return false;
}
