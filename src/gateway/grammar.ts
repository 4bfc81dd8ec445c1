// Constrained decoding over a byte automaton (JSON mode, JSON schemas): which tokens of the
// vocabulary may come next in a state, as a bitset ServingEngine applies to the logits
// (TokenConstraint), and the state a choice is in.
//
// Tokens are byte strings; added tokens (special ones, DeepSeek's tool-call tokens) are
// one symbol each, numbered from 256, which only automata declaring `symbols` step over.
//
// Masks depend only on the automaton's state: they are computed over the vocabulary in
// byte order, so tokens sharing a prefix share its steps and a refused prefix skips every
// token under it (a trie walk without a trie), and kept per state key (LRU).
import type { Tokenizer } from "../model/tokenizer.ts";
import type { TokenConstraint } from "./engine.ts";

/**
 * Masks cached per grammar, and per vocabulary (shared masks and string parts), at most: a
 * mask is vocabulary / 8 bytes, 16 KiB at 129k tokens, so 4 MiB per grammar at most.
 */
const MAX_MASKS = 256;

/** Least recently used entries go first once there are `max`. */
class Lru<V> {
  readonly #map = new Map<string, V>();
  readonly #max: number;

  constructor(max: number) {
    this.#max = max;
  }

  get(key: string): V | undefined {
    const v = this.#map.get(key);
    if (v !== undefined) {
      this.#map.delete(key);
      this.#map.set(key, v);
    }
    return v;
  }

  set(key: string, v: V): void {
    if (this.#map.size >= this.#max) this.#map.delete(this.#map.keys().next().value!);
    this.#map.set(key, v);
  }
}

/** A token's bytes; an added token's one symbol (SYMBOL_BASE + k). */
export type TokenBytes = Uint8Array | Uint16Array;

/** The first symbol: added tokens are SYMBOL_BASE, SYMBOL_BASE + 1, ... (Vocabulary.symbol). */
export const SYMBOL_BASE = 256;

/** A byte-level automaton: immutable states, `key` equal exactly for equal futures. */
export interface ByteAutomaton<S> {
  readonly start: S;
  /**
   * The automaton steps over symbols (added tokens) too; without this they are never
   * allowed (the end-of-sequence token among them: the automaton's isDone ends a choice).
   */
  readonly symbols?: boolean;
  /**
   * The state after byte (or, with `symbols`, symbol) `b`, or null when the output cannot
   * continue with it.
   */
  step(s: S, b: number): S | null;
  /** Complete: the choice ends here. */
  isDone(s: S): boolean;
  key(s: S): string;
  /**
   * Optional: in `s`, a token without byte `byte` is allowed or not whatever the rest of
   * the state (inside a string, only a quote can lead out of it): its verdict is the same
   * in every state of the same `key`, in any automaton over the vocabulary (json-mode.ts's
   * stringLocal names them). Masks are then built from a part kept once per vocabulary and
   * a walk over only the tokens that hold `byte`.
   */
  local?(s: S): { key: string; byte: number } | null;
  /**
   * Optional: a key under which `s`'s mask is the same in every automaton over the
   * vocabulary that gives it (the tool-call grammar's text, whatever the tools): kept once
   * per vocabulary, so a new grammar does not compute it again.
   */
  shared?(s: S): string | null;
}

/** The state after `bytes`, or null where the automaton refuses them. */
export function runBytes<S>(a: ByteAutomaton<S>, s: S | null, bytes: TokenBytes): S | null {
  for (let i = 0; i < bytes.length && s; i++) s = a.step(s, bytes[i]!);
  return s;
}

/**
 * Token ids in byte order, with the bytes each shares with the one before (lcp); the
 * symbols (whose one unit is above every byte) come last, from `bytesEnd`.
 */
interface Walk {
  readonly sorted: Int32Array;
  readonly lcp: Uint16Array;
  readonly bytesEnd: number;
}

function walkOf(bytes: readonly (TokenBytes | null)[], sortedIds: ArrayLike<number>): Walk {
  const sorted = Int32Array.from(sortedIds);
  const lcp = new Uint16Array(sorted.length);
  let bytesEnd = sorted.length;
  while (bytesEnd > 0 && bytes[sorted[bytesEnd - 1]!]![0]! >= SYMBOL_BASE) bytesEnd--;
  for (let i = 1; i < sorted.length; i++) {
    const p = bytes[sorted[i - 1]!]!;
    const q = bytes[sorted[i]!]!;
    let k = 0;
    while (k < p.length && k < q.length && p[k] === q[k]) k++;
    lcp[i] = k;
  }
  return { sorted, lcp, bytesEnd };
}

/** A vocabulary's token bytes, sorted for the mask walk. */
export class Vocabulary implements Walk {
  readonly size: number;
  readonly bytes: readonly (TokenBytes | null)[];
  /** Token ids with bytes, in byte order; lcp[i]: bytes shared with the one before. */
  readonly sorted: Int32Array;
  readonly lcp: Uint16Array;
  readonly bytesEnd: number;
  /** The longest token's length in bytes (so it holds at most as many characters). */
  readonly maxTokenBytes: number;
  /** Masks and local parts every grammar over this vocabulary shares (ByteAutomaton). */
  readonly masks = new Lru<Uint32Array>(MAX_MASKS);
  readonly #symbols: ReadonlyMap<string, number>;
  readonly #split = new Map<number, { without: Walk; with: Walk }>();

  /**
   * `bytes[id]`: a token's bytes (an added token's symbol), null for tokens never allowed;
   * `symbols`: added tokens' texts to their symbols.
   */
  constructor(
    bytes: readonly (TokenBytes | null)[],
    size: number,
    symbols: ReadonlyMap<string, number> = new Map(),
  ) {
    this.size = size;
    this.bytes = bytes;
    this.#symbols = symbols;
    const ids: number[] = [];
    let longest = 0;
    for (let id = 0; id < Math.min(bytes.length, size); id++)
      if (bytes[id]?.length) {
        ids.push(id);
        longest = Math.max(longest, bytes[id]!.length);
      }
    this.maxTokenBytes = longest;
    // As latin1 strings, whose code units are the bytes: string order is byte order, and
    // comparing strings is several times faster than Buffer.compare.
    const keys: string[] = [];
    for (const id of ids) keys[id] = String.fromCharCode(...bytes[id]!);
    ids.sort((a, b) => (keys[a]! < keys[b]! ? -1 : keys[a]! > keys[b]! ? 1 : 0));
    ({ sorted: this.sorted, lcp: this.lcp, bytesEnd: this.bytesEnd } = walkOf(bytes, ids));
  }

  /** The symbol of the added token `text`, or null when the vocabulary has none. */
  symbol(text: string): number | null {
    return this.#symbols.get(text) ?? null;
  }

  /** The tokens without byte `b` and those with it, each in byte order (built once). */
  split(b: number): { without: Walk; with: Walk } {
    let s = this.#split.get(b);
    if (!s) {
      const without: number[] = [];
      const holding: number[] = [];
      for (const id of this.sorted) {
        const t = this.bytes[id]!;
        let has = false;
        for (let i = 0; i < t.length && !has; i++) has = t[i] === b;
        (has ? holding : without).push(id);
      }
      s = { without: walkOf(this.bytes, without), with: walkOf(this.bytes, holding) };
      this.#split.set(b, s);
    }
    return s;
  }
}

const vocabularies = new WeakMap<Tokenizer, Vocabulary | null>();

/**
 * The vocabulary of a tokenizer (model vocab_size `size`), built on first use and kept;
 * null when the tokenizer is not byte-level (its tokens' bytes are not known). Added
 * tokens are symbols.
 */
export function vocabularyFor(tokenizer: Tokenizer, size: number): Vocabulary | null {
  let v = vocabularies.get(tokenizer);
  if (v === undefined) {
    const tokenBytes = tokenizer.tokenBytes();
    if (tokenBytes) {
      const bytes: (TokenBytes | null)[] = [...tokenBytes];
      const symbols = new Map<string, number>();
      for (const { id, content } of tokenizer.addedTokens) {
        if (id >= size) continue;
        const symbol = SYMBOL_BASE + symbols.size;
        bytes[id] = Uint16Array.of(symbol);
        symbols.set(content, symbol);
      }
      v = new Vocabulary(bytes, size, symbols);
    } else {
      v = null;
    }
    vocabularies.set(tokenizer, v);
  }
  return v;
}

/** An automaton over a vocabulary: the masks of its states. */
export class TokenGrammar<S> {
  readonly automaton: ByteAutomaton<S>;
  readonly vocabulary: Vocabulary;
  readonly #masks = new Lru<Uint32Array>(MAX_MASKS);
  /** Masks computed (not found in a cache). */
  computed = 0;

  constructor(automaton: ByteAutomaton<S>, vocabulary: Vocabulary) {
    this.automaton = automaton;
    this.vocabulary = vocabulary;
  }

  /** Bitset over the vocabulary: the tokens that may follow `s`. */
  mask(s: S): Uint32Array {
    const shared = this.automaton.shared?.(s) ?? null;
    const key = shared === null ? this.automaton.key(s) : `shared ${shared}`;
    const cache = shared === null ? this.#masks : this.vocabulary.masks;
    const hit = cache.get(key);
    if (hit) return hit;
    const local = this.automaton.local?.(s) ?? null;
    let mask: Uint32Array;
    if (local) {
      // The tokens without the byte: the same for every state of the local key. With it:
      // walked.
      const { without, with: holding } = this.vocabulary.split(local.byte);
      const partKey = `local ${local.key}`;
      let part = this.vocabulary.masks.get(partKey);
      if (!part) {
        part = this.#compute(s, without);
        this.vocabulary.masks.set(partKey, part);
      }
      mask = this.#compute(s, holding);
      for (let w = 0; w < mask.length; w++) mask[w]! |= part[w]!;
    } else {
      mask = this.#compute(s, this.vocabulary);
    }
    this.computed++;
    cache.set(key, mask);
    return mask;
  }

  /** The mask of `s` over the tokens of `walk`. */
  #compute(s: S, walk: Walk): Uint32Array {
    const { sorted, lcp } = walk;
    const { bytes: all, size } = this.vocabulary;
    const a = this.automaton;
    const end = a.symbols ? sorted.length : walk.bytesEnd;
    const mask = new Uint32Array(Math.ceil(size / 32));
    // states[d]: the state after the current token's first d bytes (valid up to `known`).
    const states: S[] = [s];
    let known = 0;
    // The current prefix of this length was refused (Infinity: none).
    let refused = Number.POSITIVE_INFINITY;
    for (let i = 0; i < end; i++) {
      const id = sorted[i]!;
      const bytes = all[id]!;
      const shared = lcp[i]!;
      if (shared >= refused) continue;
      refused = Number.POSITIVE_INFINITY;
      known = Math.min(known, shared);
      let d = known;
      for (; d < bytes.length; d++) {
        const next = a.step(states[d]!, bytes[d]!);
        if (next === null) break;
        states[d + 1] = next;
      }
      if (d < bytes.length) {
        refused = d + 1;
        known = d;
        continue;
      }
      known = bytes.length;
      mask[id >>> 5]! |= 1 << (id & 31);
    }
    return mask;
  }
}

/**
 * Grammars built from requests (schemas, tool sets, patterns), kept per vocabulary by the
 * text they were built from: the last `max` used (clients send the same ones again).
 */
export class GrammarCache<S> {
  readonly #max: number;
  readonly #byVocabulary = new WeakMap<Vocabulary, Lru<TokenGrammar<S>>>();

  constructor(max: number) {
    this.#max = max;
  }

  /** The grammar built from `key` over `vocabulary`: kept, or `build()` (and kept). */
  get(vocabulary: Vocabulary, key: string, build: () => TokenGrammar<S>): TokenGrammar<S> {
    let lru = this.#byVocabulary.get(vocabulary);
    if (!lru) {
      lru = new Lru(this.#max);
      this.#byVocabulary.set(vocabulary, lru);
    }
    let g = lru.get(key);
    if (!g) {
      g = build();
      lru.set(key, g);
    }
    return g;
  }
}

/** One choice's constraint: its state, advanced by each token it samples. */
export class GrammarConstraint<S> implements TokenConstraint {
  readonly #grammar: TokenGrammar<S>;
  #state: S;

  constructor(grammar: TokenGrammar<S>) {
    this.#grammar = grammar;
    this.#state = grammar.automaton.start;
  }

  allowed(): Uint32Array {
    return this.#grammar.mask(this.#state);
  }

  fork(): GrammarConstraint<S> {
    const c = new GrammarConstraint(this.#grammar);
    c.#state = this.#state;
    return c;
  }

  accept(id: number): boolean {
    const a = this.#grammar.automaton;
    const bytes = this.#grammar.vocabulary.bytes[id];
    const next =
      bytes && (a.symbols || bytes[0]! < SYMBOL_BASE) ? runBytes(a, this.#state, bytes) : null;
    if (next === null) throw new Error(`token ${id} is not allowed by the output grammar here`);
    this.#state = next;
    return this.#grammar.automaton.isDone(next);
  }
}
