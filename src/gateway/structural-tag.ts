// Structural tags (xgrammar's format, as vLLM takes it: response_format {"type":
// "structural_tag"}, or structured_outputs.structural_tag): free text with structured regions
// in it, such as a tool call in a model's own wrapper inside an answer
// (`I will look. <function=get_weather>{"city": "Paris"}</function>`), or a thought in tags
// before an answer. A format is a tree: text primitives (const_string, json_schema, regex,
// grammar, any_text, token), compositions (sequence, or, optional, plus, star, repeat),
// dispatch (tag, triggered_tags, tags_with_separator, dispatch) and their token-level kinds
// over added tokens (any_tokens, token_triggered_tags, token_dispatch); vLLM's older form
// ({"structures": [{begin, schema, end}], "triggers": [...]}) is triggered_tags.
// exclude_token (one token of any kind), max_tokens, and json_schema's styles other than JSON
// and its any_order are refused (400).
//
// The tree compiles into a nondeterministic automaton over bytes and added tokens' symbols:
// a state is the set of the ways the output so far can be read (each way a path down the
// tree to a leaf's state), a byte advances every way, and where a way's part may end, the
// byte may also begin the part after it (ADR 0045). Free text (any_text, and the text between
// triggered_tags' and dispatch's regions) is UTF-8 that never holds its excluded strings,
// the triggers among them (an Aho-Corasick automaton over them), and inside a tag it stops
// at the tag's end, as xgrammar's does. The leaves under JSON schemas, patterns and GBNF
// grammars are the automata of json-schema.ts, guided.ts and cfg.ts, with the masks they
// cache per vocabulary inside strings (grammar.ts's local parts).
import { ApiError } from "./errors.ts";
import {
  type ByteAutomaton,
  GrammarCache,
  SYMBOL_BASE,
  TokenGrammar,
  type Vocabulary,
} from "./grammar.ts";
import { cfgGrammar, patternGrammar } from "./guided.ts";
import { schemaGrammar } from "./json-schema.ts";

/** A state of one way through a part (each part's own shape). */
type St = unknown;
/** Bytes, or an added token's symbol: what a literal (a tag's begin or end) is made of. */
type Units = Uint16Array;
const NONE: readonly St[] = [];

/** A part of the format tree, compiled: the ways through it, byte by byte. */
interface Part {
  /** The ways it can begin (before any byte). */
  starts(): readonly St[];
  /** The ways after byte (or added token's symbol) `b` from `s`. */
  step(s: St, b: number): readonly St[];
  /** The part may end here. */
  accepts(s: St): boolean;
  key(s: St): string;
  /** grammar.ts's local part, from a leaf (tokens without its byte stay inside it). */
  local?(s: St): { key: string; byte: number } | null;
}

/** A symbol no vocabulary has: stepping a leaf over it asks whether the leaf may end. */
const PROBE = 0xffff;

/** Literal bytes, or an added token's symbol (the `token` format). */
class Literal implements Part {
  readonly #units: Uint16Array;

  constructor(units: Uint16Array) {
    this.#units = units;
  }

  static readonly #START: readonly St[] = [0];

  starts(): readonly St[] {
    return Literal.#START;
  }

  step(s: St, b: number): readonly St[] {
    const i = s as number;
    return this.#units[i] === b ? [i + 1] : NONE;
  }

  accepts(s: St): boolean {
    return s === this.#units.length;
  }

  key(s: St): string {
    return `${s as number}`;
  }
}

/** One of grammar.ts's automata (a JSON schema, a pattern, a GBNF grammar) as a part. */
class Leaf implements Part {
  readonly #a: ByteAutomaton<unknown>;
  readonly #accepts: (s: unknown) => boolean;

  readonly #starts: readonly St[];

  constructor(a: ByteAutomaton<unknown>, accepts: (s: unknown) => boolean) {
    this.#a = a;
    this.#accepts = accepts;
    this.#starts = [a.start];
  }

  starts(): readonly St[] {
    return this.#starts;
  }

  step(s: St, b: number): readonly St[] {
    if (b >= SYMBOL_BASE) return NONE;
    const next = this.#a.step(s, b);
    return next === null ? NONE : [next];
  }

  accepts(s: St): boolean {
    return this.#accepts(s);
  }

  key(s: St): string {
    return this.#a.key(s);
  }

  local(s: St): { key: string; byte: number } | null {
    return this.#a.local?.(s) ?? null;
  }
}

/**
 * A UTF-8 character being written: the continuation bytes it still needs and the range of the
 * next one (after E0, ED, F0 and F4 narrower: no overlong form, no surrogate, at most
 * U+10FFFF). Index 0: none (between characters).
 */
const PENDING: readonly (readonly [u: number, lo: number, hi: number])[] = [
  [0, 0x80, 0xbf],
  [1, 0x80, 0xbf],
  [2, 0x80, 0xbf],
  [2, 0xa0, 0xbf],
  [2, 0x80, 0x9f],
  [3, 0x80, 0xbf],
  [3, 0x90, 0xbf],
  [3, 0x80, 0x8f],
];

/** The pending index after a lead byte b (0x80 and up), or -1 where b leads nothing. */
function lead(b: number): number {
  if (b < 0xc2 || b > 0xf4) return -1;
  if (b < 0xe0) return 1;
  if (b < 0xf0) return b === 0xe0 ? 3 : b === 0xed ? 4 : 2;
  return b === 0xf0 ? 6 : b === 0xf4 ? 7 : 5;
}

/** A FreeText state: the excluded strings' node, characters so far (with max_chars), PENDING. */
interface FreeState {
  readonly n: number;
  readonly c: number;
  readonly p: number;
}

/** Free text: UTF-8 (no added token) that never holds an excluded string. */
class FreeText implements Part {
  /** Aho-Corasick over the excluded strings as a table: node x 256 bytes -> node. */
  readonly #delta: Int32Array;
  /** The node ends an excluded string. */
  readonly #end: Uint8Array;
  readonly #maxChars: number;
  /** Without max_chars, each (node, pending) state's one way: made once. */
  readonly #ways: (readonly St[])[] = [];

  /** `excludes`: unit sequences; those with an added token's symbol never occur in text. */
  constructor(excludes: readonly Units[], maxChars = Number.POSITIVE_INFINITY) {
    this.#maxChars = maxChars;
    const goto: Map<number, number>[] = [new Map()];
    const end: boolean[] = [false];
    for (const x of excludes) {
      if (x.some((u) => u >= SYMBOL_BASE)) continue;
      let n = 0;
      for (const b of x) {
        let next = goto[n]!.get(b);
        if (next === undefined) {
          next = goto.length;
          goto.push(new Map());
          end.push(false);
          goto[n]!.set(b, next);
        }
        n = next;
      }
      end[n] = true;
    }
    // Breadth first, so that a node's fail link (the longest proper suffix that is a node)
    // has its row before the node does: a byte without a child goes where the fail link's
    // row says.
    const delta = new Int32Array(goto.length * 256);
    const fail = new Int32Array(goto.length);
    for (const [b, child] of goto[0]!) delta[b] = child;
    const queue = [...goto[0]!.values()];
    for (let q = 0; q < queue.length; q++) {
      const n = queue[q]!;
      end[n] ||= end[fail[n]!]!;
      for (let b = 0; b < 256; b++) {
        const child = goto[n]!.get(b);
        if (child === undefined) delta[n * 256 + b] = delta[fail[n]! * 256 + b]!;
        else {
          delta[n * 256 + b] = child;
          fail[child] = delta[fail[n]! * 256 + b]!;
          queue.push(child);
        }
      }
    }
    this.#delta = delta;
    this.#end = Uint8Array.from(end, (e) => (e ? 1 : 0));
  }

  #way(n: number, c: number, p: number): readonly St[] {
    if (Number.isFinite(this.#maxChars)) return [{ n, c, p } satisfies FreeState];
    const at = n * PENDING.length + p;
    let way = this.#ways[at];
    if (!way) {
      way = [{ n, c: 0, p } satisfies FreeState];
      this.#ways[at] = way;
    }
    return way;
  }

  starts(): readonly St[] {
    return this.#way(0, 0, 0);
  }

  step(s: St, b: number): readonly St[] {
    if (b >= SYMBOL_BASE) return NONE;
    const { n, c, p } = s as FreeState;
    let next = 0;
    if (p > 0) {
      const [u, lo, hi] = PENDING[p]!;
      if (b < lo || b > hi) return NONE;
      next = u === 1 ? 0 : u === 2 ? 1 : 2;
    } else if (b >= 0x80) {
      next = lead(b);
      if (next < 0) return NONE;
    }
    const m = this.#delta[n * 256 + b]!;
    if (this.#end[m] === 1) return NONE;
    // Characters: each begins with a byte between characters.
    const chars = p > 0 ? c : c + 1;
    if (chars > this.#maxChars) return NONE;
    return this.#way(m, chars, next);
  }

  /** Between characters. */
  accepts(s: St): boolean {
    return (s as FreeState).p === 0;
  }

  key(s: St): string {
    const { n, c, p } = s as FreeState;
    return `${n},${c},${p}`;
  }
}

/** Any tokens but some added ones (any_tokens): every byte, and the symbols not excluded. */
class TokenText implements Part {
  static readonly #START: readonly St[] = [0];
  readonly #excluded: ReadonlySet<number>;

  /** `excludes`: unit sequences; the one-symbol ones are the excluded added tokens. */
  constructor(excludes: readonly Units[]) {
    this.#excluded = new Set(
      excludes.filter((x) => x.length === 1 && x[0]! >= SYMBOL_BASE).map((x) => x[0]!),
    );
  }

  starts(): readonly St[] {
    return TokenText.#START;
  }

  step(_: St, b: number): readonly St[] {
    return this.#excluded.has(b) ? NONE : TokenText.#START;
  }

  accepts(): boolean {
    return true;
  }

  key(): string {
    return "*";
  }
}

/**
 * Parts one after another. Ways into a part are made by the byte that enters it (from a way
 * of the part before, where that one may end): a part waiting to begin is no way of its own,
 * so free text followed by an end string is one way per byte, not two.
 */
class Sequence implements Part {
  readonly #parts: readonly Part[];
  /** nullable[i]: part i may be empty. */
  readonly #nullable: boolean[];
  /** restEmpty[i]: every part after i may be empty. */
  readonly #restEmpty: boolean[];
  readonly #starts: readonly St[];

  constructor(parts: readonly Part[]) {
    this.#parts = parts;
    this.#nullable = parts.map((p) => p.starts().some((s) => p.accepts(s)));
    this.#restEmpty = parts.map((_, i) => this.#nullable.slice(i + 1).every(Boolean));
    this.#starts = parts[0]!.starts().map((s) => ({ i: 0, s }));
  }

  starts(): readonly St[] {
    return this.#starts;
  }

  step(st: St, b: number): readonly St[] {
    const { i, s } = st as { i: number; s: St };
    const part = this.#parts[i]!;
    const out: St[] = [];
    for (const n of part.step(s, b)) out.push({ i, s: n });
    // Where part i may end, b may begin the next (or one past the empty ones).
    if (part.accepts(s))
      for (let j = i + 1; j < this.#parts.length; j++) {
        const next = this.#parts[j]!;
        for (const s0 of next.starts()) for (const n of next.step(s0, b)) out.push({ i: j, s: n });
        if (!this.#nullable[j]) break;
      }
    return out;
  }

  accepts(st: St): boolean {
    const { i, s } = st as { i: number; s: St };
    return this.#restEmpty[i]! && this.#parts[i]!.accepts(s);
  }

  key(st: St): string {
    const { i, s } = st as { i: number; s: St };
    return `${i}(${this.#parts[i]!.key(s)})`;
  }

  local(st: St): { key: string; byte: number } | null {
    // (a token without the leaf's byte stays inside the leaf, never reaching the next part)
    const { i, s } = st as { i: number; s: St };
    return this.#parts[i]!.local?.(s) ?? null;
  }
}

/** One of several parts. */
class Choice implements Part {
  readonly #parts: readonly Part[];
  readonly #starts: readonly St[];

  constructor(parts: readonly Part[]) {
    this.#parts = parts;
    this.#starts = parts.flatMap((p, k) => p.starts().map((s) => ({ k, s })));
  }

  starts(): readonly St[] {
    return this.#starts;
  }

  step(st: St, b: number): readonly St[] {
    const { k, s } = st as { k: number; s: St };
    const next = this.#parts[k]!.step(s, b);
    return next.length === 0 ? NONE : next.map((n) => ({ k, s: n }));
  }

  accepts(st: St): boolean {
    const { k, s } = st as { k: number; s: St };
    return this.#parts[k]!.accepts(s);
  }

  key(st: St): string {
    const { k, s } = st as { k: number; s: St };
    return `${k}(${this.#parts[k]!.key(s)})`;
  }

  local(st: St): { key: string; byte: number } | null {
    const { k, s } = st as { k: number; s: St };
    return this.#parts[k]!.local?.(s) ?? null;
  }
}

/** Before the first repetition's first byte. */
const EMPTY = Symbol("empty");

/** A part `min` to `max` times (Infinity: unbounded). */
class Repeat implements Part {
  readonly #part: Part;
  readonly #min: number;
  readonly #max: number;
  readonly #nullable: boolean;

  constructor(part: Part, min: number, max: number) {
    this.#part = part;
    this.#min = min;
    this.#max = max;
    this.#nullable = part.starts().some((s) => part.accepts(s));
  }

  static readonly #START: readonly St[] = [{ c: 0, s: EMPTY }];

  starts(): readonly St[] {
    return Repeat.#START;
  }

  /** The ways b begins repetition c (counted from 0) with. */
  #begin(c: number, b: number, out: St[]): void {
    for (const s0 of this.#part.starts())
      for (const s of this.#part.step(s0, b)) out.push({ c, s });
  }

  step(st: St, b: number): readonly St[] {
    const { c, s } = st as { c: number; s: St };
    const out: St[] = [];
    if (s === EMPTY) {
      if (this.#max > 0) this.#begin(0, b, out);
      return out;
    }
    for (const n of this.#part.step(s, b)) out.push({ c, s: n });
    // Where a repetition may end, b may begin the next; unbounded, counts past min have the
    // same future (one key).
    if (this.#part.accepts(s) && c + 1 < this.#max)
      this.#begin(Number.isFinite(this.#max) ? c + 1 : Math.min(c + 1, this.#min), b, out);
    return out;
  }

  accepts(st: St): boolean {
    const { c, s } = st as { c: number; s: St };
    if (s === EMPTY) return this.#min === 0 || this.#nullable;
    return this.#part.accepts(s) && (c + 1 >= this.#min || this.#nullable);
  }

  key(st: St): string {
    const { c, s } = st as { c: number; s: St };
    return `${c}(${s === EMPTY ? "-" : this.#part.key(s)})`;
  }

  local(st: St): { key: string; byte: number } | null {
    const { s } = st as { c: number; s: St };
    return s === EMPTY ? null : (this.#part.local?.(s) ?? null);
  }
}

/**
 * Free text with regions in it (triggered_tags, dispatch): text, a region, text, ...
 * (`atLeastOne`: a region first; `stopAfterFirst`: nothing after the first region). The text
 * never holds a region's trigger, and a region is a way of its own only from the byte that
 * begins it, so plain text is one way.
 */
class Dispatch implements Part {
  readonly #text: Part;
  readonly #regions: readonly Part[];
  readonly #atLeastOne: boolean;
  readonly #stopAfterFirst: boolean;

  /** opens[k][b]: byte b can begin region k (checked once per byte, not per step). */
  readonly #opens: Uint8Array[];
  /** Byte b can begin some region. */
  readonly #opensAny: Uint8Array;
  readonly #start: readonly St[];

  constructor(
    text: Part,
    regions: readonly Part[],
    o: { atLeastOne: boolean; stopAfterFirst: boolean },
  ) {
    this.#text = text;
    this.#regions = regions;
    this.#atLeastOne = o.atLeastOne;
    this.#stopAfterFirst = o.stopAfterFirst;
    this.#opens = regions.map((r) =>
      Uint8Array.from({ length: SYMBOL_BASE }, (_, b) =>
        r.starts().some((s0) => r.step(s0, b).length > 0) ? 1 : 0,
      ),
    );
    this.#opensAny = Uint8Array.from({ length: SYMBOL_BASE }, (_, b) =>
      this.#opens.some((o) => o[b] === 1) ? 1 : 0,
    );
    this.#start = [{ t: o.atLeastOne ? null : text.starts()[0], n: 0 }];
  }

  // States: { t, n } in the text (t null: no text allowed yet), { k, s, n } in region k
  // (with stopAfterFirst, the output ends with it); n: regions done (0 or 1, all that matters).
  starts(): readonly St[] {
    return this.#start;
  }

  /** The ways b begins a region with (n regions done before it). */
  #open(b: number, n: number, out: St[]): void {
    for (let k = 0; k < this.#regions.length; k++) {
      if (b < SYMBOL_BASE && this.#opens[k]![b] === 0) continue;
      const r = this.#regions[k]!;
      for (const s0 of r.starts()) for (const s of r.step(s0, b)) out.push({ k, s, n });
    }
  }

  /**
   * The ways in the text after `texts` (the text's ways after a byte), n regions done: kept
   * per array of the text's (FreeText without max_chars and TokenText make each once), so
   * that a step of plain text makes nothing new.
   */
  #inText(texts: readonly St[], n: number): readonly St[] {
    const cache = this.#textWays[n === 0 ? 0 : 1]!;
    let ways = cache.get(texts);
    if (!ways) {
      ways = texts.map((t) => ({ t, n }));
      cache.set(texts, ways);
    }
    return ways;
  }
  readonly #textWays = [new WeakMap<readonly St[], readonly St[]>(), new WeakMap()];

  step(st: St, b: number): readonly St[] {
    const x = st as { t?: St | null; k?: number; s?: St; n: number };
    if (x.k === undefined) {
      const texts = x.t === null ? NONE : this.#text.step(x.t, b);
      // (a region begins between characters of the text)
      const opens =
        (b >= SYMBOL_BASE || this.#opensAny[b] === 1) && (x.t === null || this.#text.accepts(x.t));
      if (!opens) return texts.length === 0 ? NONE : this.#inText(texts, x.n);
      const out: St[] = [...this.#inText(texts, x.n)];
      this.#open(b, x.n, out);
      return out;
    }
    const out: St[] = [];
    const region = this.#regions[x.k]!;
    for (const s of region.step(x.s, b)) out.push({ k: x.k, s, n: x.n });
    // Where the region may end, b goes on after it.
    if (region.accepts(x.s) && !this.#stopAfterFirst) {
      for (const t of this.#text.step(this.#text.starts()[0], b)) out.push({ t, n: 1 });
      this.#open(b, 1, out);
    }
    return out;
  }

  accepts(st: St): boolean {
    const x = st as { t?: St | null; k?: number; s?: St; n: number };
    if (x.k === undefined) return x.t !== null && (!this.#atLeastOne || x.n > 0);
    // (a region that may end here: the output may end with it)
    return this.#regions[x.k]!.accepts(x.s);
  }

  key(st: St): string {
    const x = st as { t?: St | null; k?: number; s?: St; n: number };
    if (x.k === undefined) return x.t === null ? "first" : `t${this.#text.key(x.t)},${x.n}`;
    return `r${x.k}(${this.#regions[x.k]!.key(x.s)}),${x.n}`;
  }

  local(st: St): { key: string; byte: number } | null {
    const x = st as { k?: number; s?: St };
    return x.k === undefined ? null : (this.#regions[x.k]!.local?.(x.s) ?? null);
  }
}

/** After the end-of-sequence token. */
const DONE = "done";
/** The ways the output so far can be read (each a state of the root part). */
export type StructuralState =
  | {
      readonly ways: readonly St[];
      /** With several ways, their keys (made once, by `distinct`). */
      readonly key?: string;
    }
  | typeof DONE;

/**
 * Ways kept at most: more are dropped (the output stays valid under those kept, only fewer
 * continuations are allowed), as json-schema.ts keeps its readings.
 */
const MAX_WAYS = 64;

/** The output under a structural tag, then the end-of-sequence token where it may end. */
export class StructuralText implements ByteAutomaton<StructuralState> {
  readonly symbols = true;
  readonly start: StructuralState;
  readonly #root: Part;
  readonly #eos: number | null;

  constructor(root: Part, eos: number | null) {
    this.#root = root;
    this.#eos = eos;
    this.start = distinct(root, root.starts());
  }

  step(s: StructuralState, b: number): StructuralState | null {
    if (s === DONE) return null;
    if (b === this.#eos) return s.ways.some((w) => this.#root.accepts(w)) ? DONE : null;
    let out: St[] | readonly St[] = NONE;
    for (const w of s.ways) {
      const next = this.#root.step(w, b);
      if (next.length === 0) continue;
      out = out.length === 0 ? next : [...out, ...next];
    }
    if (out.length === 0) return null;
    return out.length === 1 ? { ways: out } : distinct(this.#root, out);
  }

  /**
   * Only after the end-of-sequence token: where nothing can follow (a lone tag's end), the
   * mask allows that token alone, and the model's next step ends the choice.
   */
  isDone(s: StructuralState): boolean {
    return s === DONE;
  }

  key(s: StructuralState): string {
    if (s === DONE) return DONE;
    return s.key ?? this.#root.key(s.ways[0]);
  }

  local(s: StructuralState): { key: string; byte: number } | null {
    if (s === DONE || s.ways.length !== 1) return null;
    return this.#root.local?.(s.ways[0]) ?? null;
  }
}

/**
 * A state of `ways` without repeats (by key), in key order (equal sets, equal keys),
 * MAX_WAYS at most, with their keys when there are several (each computed once).
 */
function distinct(root: Part, ways: readonly St[]): { ways: readonly St[]; key?: string } {
  if (ways.length === 1) return { ways };
  const byKey = new Map<string, St>();
  for (const w of ways) {
    const k = root.key(w);
    if (!byKey.has(k)) byKey.set(k, w);
  }
  const keys = [...byKey.keys()].sort().slice(0, MAX_WAYS);
  return keys.length === 1
    ? { ways: [byKey.get(keys[0]!)] }
    : { ways: keys.map((k) => byKey.get(k)), key: keys.join(" / ") };
}

// ---------------------------------------------------------------------------------------
// Compiling a request's format

/** Parts a format may have, and how deep they may nest. */
const MAX_PARTS = 1024;
const MAX_DEPTH = 32;
/** Bytes of a literal string (begin, end, a trigger, a constant). */
const MAX_LITERAL = 4096;

/** exclude_token: one token of any kind, which automata over bytes cannot tell apart. */
const REFUSED = new Set(["exclude_token"]);

const bytesOf = (b: Uint8Array): Units => Uint16Array.from(b);
const startsWith = (s: Units, p: Units) => p.length <= s.length && p.every((u, i) => s[i] === u);

class Compiler {
  readonly #v: Vocabulary;
  readonly #param: string;
  #parts = 0;

  constructor(vocabulary: Vocabulary, param: string) {
    this.#v = vocabulary;
    this.#param = param;
  }

  fail(path: string, why: string): never {
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${path}: ${why}`, { param: this.#param });
  }

  #object(x: unknown, path: string): Record<string, unknown> {
    if (typeof x !== "object" || x === null || Array.isArray(x))
      this.fail(path, "must be an object (a format)");
    return x as Record<string, unknown>;
  }

  #string(x: unknown, path: string, nonEmpty = false): Uint8Array {
    if (typeof x !== "string") this.fail(path, "must be a string");
    if (nonEmpty && x === "") this.fail(path, "must not be empty");
    const bytes = Buffer.from(x, "utf8");
    if (bytes.length > MAX_LITERAL) this.fail(path, `is longer than ${MAX_LITERAL} bytes`);
    return new Uint8Array(bytes);
  }

  #strings(x: unknown, path: string, o: { nonEmpty: boolean; optional: boolean }): Uint8Array[] {
    if (x === undefined && o.optional) return [];
    if (!Array.isArray(x) || (o.nonEmpty && x.length === 0))
      this.fail(
        path,
        o.nonEmpty ? "must be a non-empty array of strings" : "must be an array of strings",
      );
    return x.map((s, i) => this.#string(s, `${path}.${i}`, true));
  }

  #bool(x: unknown, path: string): boolean {
    if (x === undefined) return false;
    if (typeof x !== "boolean") this.fail(path, "must be true or false");
    return x;
  }

  /** An integer >= 0 (with `unbounded`, -1 too: Infinity). */
  #count(x: unknown, path: string, unbounded = false): number {
    if (unbounded && x === -1) return Number.POSITIVE_INFINITY;
    if (!Number.isSafeInteger(x) || (x as number) < 0)
      this.fail(path, `must be an integer >= 0${unbounded ? ", or -1 (unbounded)" : ""}`);
    return x as number;
  }

  #formats(x: unknown, path: string, depth: number, stops: readonly Units[]): Part[] {
    if (!Array.isArray(x) || x.length === 0)
      this.fail(path, "must be a non-empty array of formats");
    return x.map((f, i) => this.format(f, `${path}.${i}`, depth + 1, stops));
  }

  /**
   * A `tag`: begin, content, end, each a string or a `token` (end: several strings too).
   * Content that is free text (any_text, any_tokens, or the text between regions) stops at
   * the end (at an end string for text, at an end token for tokens), as xgrammar's does.
   */
  #tag(f: Record<string, unknown>, path: string, depth: number): { part: Part; begin: Units } {
    if (f["type"] !== "tag") this.fail(`${path}.type`, 'must be "tag"');
    const begin = this.#literal(f["begin"], `${path}.begin`);
    const endValue = f["end"];
    const ends = Array.isArray(endValue)
      ? this.#strings(endValue, `${path}.end`, { nonEmpty: true, optional: false }).map(bytesOf)
      : [this.#literal(endValue, `${path}.end`, false)];
    const content = this.format(f["content"], `${path}.content`, depth + 1, ends);
    const endPart = new Choice(ends.map((e) => new Literal(e)));
    return { part: new Sequence([new Literal(begin), content, endPart]), begin };
  }

  /** A string's bytes, or a `token` format's units. */
  #literal(x: unknown, path: string, nonEmpty = true): Units {
    return typeof x === "string" ? bytesOf(this.#string(x, path, nonEmpty)) : this.#token(x, path);
  }

  /** Tags (of triggered_tags and token_triggered_tags): each begins with one of the triggers. */
  #tags(f: Record<string, unknown>, path: string, depth: number, triggers: readonly Units[]) {
    const value = f["tags"];
    if (!Array.isArray(value) || value.length === 0)
      this.fail(`${path}.tags`, "must be a non-empty array of tags");
    const tags = value.map((t, i) =>
      this.#tag(this.#object(t, `${path}.tags.${i}`), `${path}.tags.${i}`, depth + 1),
    );
    tags.forEach(({ begin }, i) => {
      if (!triggers.some((t) => startsWith(begin, t)))
        this.fail(`${path}.tags.${i}.begin`, "must begin with one of the triggers");
    });
    triggers.forEach((t, i) => {
      if (!tags.some(({ begin }) => startsWith(begin, t)))
        this.fail(`${path}.triggers.${i}`, "begins no tag (a trigger must lead into one)");
    });
    return tags.map((t) => t.part);
  }

  /** Added tokens (by text or id), as one-symbol unit sequences (trigger_tokens, ...). */
  #addedTokens(x: unknown, path: string, o: { nonEmpty: boolean }): Units[] {
    if (x === undefined && !o.nonEmpty) return [];
    if (!Array.isArray(x) || (o.nonEmpty && x.length === 0))
      this.fail(path, `must be ${o.nonEmpty ? "a non-empty " : "an "}array of tokens`);
    return x.map((t, i) => {
      const units = this.#token({ type: "token", token: t }, `${path}.${i}`);
      if (units.length !== 1 || units[0]! < SYMBOL_BASE)
        this.fail(
          `${path}.${i}`,
          "must be an added token (a special one: a plain token's text can be written by others)",
        );
      return units;
    });
  }

  /** A `token` format (or a tag's begin or end given as one): a token, by text or id. */
  #token(x: unknown, path: string): Units {
    const f = this.#object(x, path);
    if (f["type"] !== "token") this.fail(path, 'must be a string, or a format of type "token"');
    const t = f["token"];
    let units: Uint16Array | null = null;
    if (typeof t === "string") {
      const symbol = this.#v.symbol(t);
      units = symbol === null ? null : Uint16Array.of(symbol);
    } else if (Number.isSafeInteger(t) && (t as number) >= 0 && (t as number) < this.#v.size) {
      const bytes = this.#v.bytes[t as number];
      units = bytes ? Uint16Array.from(bytes) : null;
    }
    if (!units)
      this.fail(
        `${path}.token`,
        typeof t === "string"
          ? `names no added token of this model's vocabulary (${JSON.stringify(t).slice(0, 60)}; a plain token is named by its id)`
          : `names no token of this model's vocabulary (${JSON.stringify(t)?.slice(0, 60)})`,
      );
    return units;
  }

  format(x: unknown, path: string, depth: number, stops: readonly Units[] = []): Part {
    if (depth > MAX_DEPTH) this.fail(path, `formats nest more than ${MAX_DEPTH} deep`);
    if (++this.#parts > MAX_PARTS) this.fail(path, `the format has more than ${MAX_PARTS} parts`);
    const f = this.#object(x, path);
    const type = f["type"];
    switch (type) {
      case "const_string":
        return new Literal(bytesOf(this.#string(f["value"], `${path}.value`)));
      case "json_schema": {
        if (f["style"] !== undefined && f["style"] !== "json")
          this.fail(
            `${path}.style`,
            `${JSON.stringify(f["style"])?.slice(0, 40)} is not supported (only "json" is)`,
          );
        if (f["any_order"] === true)
          this.fail(`${path}.any_order`, "is not supported (properties come in their order)");
        const schema = f["json_schema"];
        if (schema === undefined) this.fail(`${path}.json_schema`, "is missing");
        const g = schemaGrammar(this.#v, schema, {
          param: this.#param,
          label: `${path}.json_schema`,
        });
        const a = g.automaton as ByteAutomaton<unknown>;
        return new Leaf(a, (s) => a.isDone(s));
      }
      case "regex": {
        if (typeof f["pattern"] !== "string") this.fail(`${path}.pattern`, "must be a string");
        const a = patternGrammar(this.#v, f["pattern"], PROBE, `${path}.pattern`)
          .automaton as ByteAutomaton<unknown>;
        return new Leaf(a, (s) => a.step(s, PROBE) !== null);
      }
      case "grammar": {
        if (typeof f["grammar"] !== "string" || f["grammar"].trim() === "")
          this.fail(`${path}.grammar`, "must be a GBNF grammar's text");
        const a = cfgGrammar(this.#v, f["grammar"], PROBE, `${path}.grammar`)
          .automaton as ByteAutomaton<unknown>;
        return new Leaf(a, (s) => a.step(s, PROBE) !== null);
      }
      case "any_text": {
        if (f["max_tokens"] != null)
          this.fail(`${path}.max_tokens`, "is not supported (max_chars is)");
        const excludes = this.#strings(f["excludes"], `${path}.excludes`, {
          nonEmpty: false,
          optional: true,
        });
        const maxChars =
          f["max_chars"] == null ? undefined : this.#count(f["max_chars"], `${path}.max_chars`);
        return new FreeText([...excludes.map(bytesOf), ...stops], maxChars);
      }
      case "token":
        return new Literal(this.#token(f, path));
      case "any_tokens": {
        if (f["max_tokens"] != null) this.fail(`${path}.max_tokens`, "is not supported");
        const excludes = this.#addedTokens(f["exclude_tokens"], `${path}.exclude_tokens`, {
          nonEmpty: false,
        });
        return new TokenText([...excludes, ...stops]);
      }
      case "sequence": {
        const elements = f["elements"];
        const n = Array.isArray(elements) ? elements.length : 0;
        if (n === 0) this.fail(`${path}.elements`, "must be a non-empty array of formats");
        // The enclosing tag's end stops the last element's free text.
        return new Sequence(
          (elements as unknown[]).map((e, i) =>
            this.format(e, `${path}.elements.${i}`, depth + 1, i === n - 1 ? stops : []),
          ),
        );
      }
      case "or":
        return new Choice(this.#formats(f["elements"], `${path}.elements`, depth, stops));
      case "optional":
        return new Repeat(this.format(f["content"], `${path}.content`, depth + 1, stops), 0, 1);
      case "plus":
        return new Repeat(
          this.format(f["content"], `${path}.content`, depth + 1, stops),
          1,
          Number.POSITIVE_INFINITY,
        );
      case "star":
        return new Repeat(
          this.format(f["content"], `${path}.content`, depth + 1, stops),
          0,
          Number.POSITIVE_INFINITY,
        );
      case "repeat": {
        const min = this.#count(f["min"], `${path}.min`);
        const max = this.#count(f["max"], `${path}.max`, true);
        if (max < min) this.fail(`${path}.max`, `must be at least min (${min}), or -1`);
        return new Repeat(this.format(f["content"], `${path}.content`, depth + 1, stops), min, max);
      }
      case "tag":
        return this.#tag(f, path, depth).part;
      case "triggered_tags": {
        const triggers = this.#strings(f["triggers"], `${path}.triggers`, {
          nonEmpty: true,
          optional: false,
        }).map(bytesOf);
        const tags = this.#tags(f, path, depth, triggers);
        const excludes = this.#strings(f["excludes"], `${path}.excludes`, {
          nonEmpty: false,
          optional: true,
        }).map(bytesOf);
        return new Dispatch(new FreeText([...triggers, ...excludes, ...stops]), tags, {
          atLeastOne: this.#bool(f["at_least_one"], `${path}.at_least_one`),
          stopAfterFirst: this.#bool(f["stop_after_first"], `${path}.stop_after_first`),
        });
      }
      case "token_triggered_tags": {
        const triggers = this.#addedTokens(f["trigger_tokens"], `${path}.trigger_tokens`, {
          nonEmpty: true,
        });
        const tags = this.#tags(f, path, depth, triggers);
        const excludes = this.#addedTokens(f["exclude_tokens"], `${path}.exclude_tokens`, {
          nonEmpty: false,
        });
        return new Dispatch(new TokenText([...triggers, ...excludes, ...stops]), tags, {
          atLeastOne: this.#bool(f["at_least_one"], `${path}.at_least_one`),
          stopAfterFirst: this.#bool(f["stop_after_first"], `${path}.stop_after_first`),
        });
      }
      case "tags_with_separator": {
        const tagsValue = f["tags"];
        if (!Array.isArray(tagsValue) || tagsValue.length === 0)
          this.fail(`${path}.tags`, "must be a non-empty array of tags");
        const tag = new Choice(
          tagsValue.map(
            (t, i) =>
              this.#tag(this.#object(t, `${path}.tags.${i}`), `${path}.tags.${i}`, depth + 1).part,
          ),
        );
        const separator = new Literal(bytesOf(this.#string(f["separator"], `${path}.separator`)));
        const list = this.#bool(f["stop_after_first"], `${path}.stop_after_first`)
          ? tag
          : new Sequence([
              tag,
              new Repeat(new Sequence([separator, tag]), 0, Number.POSITIVE_INFINITY),
            ]);
        return this.#bool(f["at_least_one"], `${path}.at_least_one`)
          ? list
          : new Repeat(list, 0, 1);
      }
      case "dispatch":
      case "token_dispatch": {
        const tokens = type === "token_dispatch";
        const rules = f["rules"];
        if (!Array.isArray(rules) || rules.length === 0)
          this.fail(
            `${path}.rules`,
            `must be a non-empty array of [${tokens ? "token" : "pattern"}, format] pairs`,
          );
        const patterns: Units[] = [];
        const parts = rules.map((r, i) => {
          if (!Array.isArray(r) || r.length !== 2)
            this.fail(
              `${path}.rules.${i}`,
              `must be a [${tokens ? "token" : "pattern"}, format] pair`,
            );
          const pattern = tokens
            ? this.#addedTokens([r[0]], `${path}.rules.${i}`, { nonEmpty: true })[0]!
            : bytesOf(this.#string(r[0], `${path}.rules.${i}.0`, true));
          patterns.push(pattern);
          return new Sequence([
            new Literal(pattern),
            this.format(r[1], `${path}.rules.${i}.1`, depth + 1),
          ]);
        });
        const loop = f["loop"] === undefined ? true : this.#bool(f["loop"], `${path}.loop`);
        const excludes = tokens
          ? this.#addedTokens(f["exclude_tokens"], `${path}.exclude_tokens`, { nonEmpty: false })
          : this.#strings(f["excludes"], `${path}.excludes`, {
              nonEmpty: false,
              optional: true,
            }).map(bytesOf);
        const text = [...patterns, ...excludes, ...stops];
        return new Dispatch(tokens ? new TokenText(text) : new FreeText(text), parts, {
          atLeastOne: false,
          stopAfterFirst: !loop,
        });
      }
      default:
        if (typeof type === "string" && REFUSED.has(type))
          this.fail(
            `${path}.type`,
            `"${type}" is not supported (one token of any kind: the automata here see bytes and added tokens, not where a token ends)`,
          );
        return this.fail(
          `${path}.type`,
          `${JSON.stringify(type)?.slice(0, 40) ?? "undefined"} is no format`,
        );
    }
  }
}

/**
 * A request's structural tag: `{"type": "structural_tag", "format": {...}}`, or vLLM's older
 * `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}`
 * (triggered_tags: free text, a structure wherever a trigger appears). Its root format.
 */
export function structuralTagFormat(tag: unknown, param: string): unknown {
  const bad = (why: string): never => {
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${param}: ${why}`, { param });
  };
  if (typeof tag !== "object" || tag === null || Array.isArray(tag))
    return bad('must be an object: {"type": "structural_tag", "format": {...}}');
  const t = tag as Record<string, unknown>;
  if (t["type"] !== undefined && t["type"] !== "structural_tag")
    return bad('type must be "structural_tag"');
  if (t["format"] !== undefined) return t["format"];
  if (t["structures"] === undefined)
    return bad('has neither "format" nor "structures" (and "triggers")');
  const structures = t["structures"];
  if (!Array.isArray(structures) || structures.length === 0)
    return bad("structures must be a non-empty array of {begin, schema, end}");
  return {
    type: "triggered_tags",
    triggers: t["triggers"],
    tags: structures.map((s: unknown) => {
      const x = (typeof s === "object" && s !== null ? s : {}) as Record<string, unknown>;
      return {
        type: "tag",
        begin: x["begin"],
        content: { type: "json_schema", json_schema: x["schema"] ?? x["json_schema"] ?? {} },
        end: x["end"],
      };
    }),
  };
}

/** Grammars of the last 16 structural tags (with their end-of-sequence symbol), per vocabulary. */
const grammars = new GrammarCache<StructuralState>(16);

/**
 * The grammar of outputs under structural tag `tag` (see structuralTagFormat), ended by the
 * `eos` symbol; 400 naming `param` (and the path to the part at fault) for one that cannot
 * be compiled.
 */
export function structuralTagGrammar(
  vocabulary: Vocabulary,
  tag: unknown,
  eos: number | null,
  param: string,
): TokenGrammar<StructuralState> {
  const format = structuralTagFormat(tag, param);
  return grammars.get(vocabulary, `${eos} ${JSON.stringify(format)}`, () => {
    const root = new Compiler(vocabulary, param).format(format, param, 0);
    return new TokenGrammar(new StructuralText(root, eos), vocabulary);
  });
}
