// Constrained decoding over a byte automaton (JSON mode, JSON schemas): which tokens of the
// vocabulary may come next in a state, as a bitset ServingEngine applies to the logits
// (TokenConstraint), and the state a choice is in.
//
// Masks depend only on the automaton's state: they are computed over the vocabulary in
// byte order, so tokens sharing a prefix share its steps and a refused prefix skips every
// token under it (a trie walk without a trie), and kept per state key (LRU).
import type { Tokenizer } from "../model/tokenizer.ts";
import type { TokenConstraint } from "./engine.ts";

/** A byte-level automaton: immutable states, `key` equal exactly for equal futures. */
export interface ByteAutomaton<S> {
  readonly start: S;
  /** The state after byte `b`, or null when the output cannot continue with it. */
  step(s: S, b: number): S | null;
  /** Complete: the choice ends here. */
  isDone(s: S): boolean;
  key(s: S): string;
  /**
   * Optional: in `s`, a token without byte `byte` is allowed or not whatever the rest of
   * the state (inside a string, only a quote can lead out of it): its verdict is the same
   * in every state of the same `key`. Masks are then built from a part shared by those
   * states and a walk over only the tokens that hold `byte`.
   */
  local?(s: S): { key: string; byte: number } | null;
}

/** The state after `bytes`, or null where the automaton refuses them. */
export function runBytes<S>(a: ByteAutomaton<S>, s: S | null, bytes: Uint8Array): S | null {
  for (let i = 0; i < bytes.length && s; i++) s = a.step(s, bytes[i]!);
  return s;
}

/** Token ids in byte order, with the bytes each shares with the one before (lcp). */
interface Walk {
  readonly sorted: Int32Array;
  readonly lcp: Uint16Array;
}

function walkOf(bytes: readonly (Uint8Array | null)[], sortedIds: ArrayLike<number>): Walk {
  const sorted = Int32Array.from(sortedIds);
  const lcp = new Uint16Array(sorted.length);
  for (let i = 1; i < sorted.length; i++) {
    const p = bytes[sorted[i - 1]!]!;
    const q = bytes[sorted[i]!]!;
    let k = 0;
    while (k < p.length && k < q.length && p[k] === q[k]) k++;
    lcp[i] = k;
  }
  return { sorted, lcp };
}

/** A vocabulary's token bytes, sorted for the mask walk. */
export class Vocabulary implements Walk {
  readonly size: number;
  readonly bytes: readonly (Uint8Array | null)[];
  /** Token ids with bytes, in byte order; lcp[i]: bytes shared with the one before. */
  readonly sorted: Int32Array;
  readonly lcp: Uint16Array;
  readonly #split = new Map<number, { without: Walk; with: Walk }>();

  /** `bytes[id]`: a token's bytes, null for tokens never allowed (special ones). */
  constructor(bytes: readonly (Uint8Array | null)[], size: number) {
    this.size = size;
    this.bytes = bytes;
    const ids: number[] = [];
    for (let id = 0; id < Math.min(bytes.length, size); id++) if (bytes[id]?.length) ids.push(id);
    // As latin1 strings, whose code units are the bytes: string order is byte order, and
    // comparing strings is several times faster than Buffer.compare.
    const keys: string[] = [];
    for (const id of ids) keys[id] = String.fromCharCode(...bytes[id]!);
    ids.sort((a, b) => (keys[a]! < keys[b]! ? -1 : keys[a]! > keys[b]! ? 1 : 0));
    ({ sorted: this.sorted, lcp: this.lcp } = walkOf(bytes, ids));
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
 * null when the tokenizer is not byte-level (its tokens' bytes are not known).
 */
export function vocabularyFor(tokenizer: Tokenizer, size: number): Vocabulary | null {
  let v = vocabularies.get(tokenizer);
  if (v === undefined) {
    const bytes = tokenizer.tokenBytes();
    v = bytes ? new Vocabulary(bytes, size) : null;
    vocabularies.set(tokenizer, v);
  }
  return v;
}

/**
 * Masks cached per grammar, at most (and as many parts for string states): a mask is
 * vocabulary / 8 bytes, 16 KiB at 129k tokens, so 4 MiB per grammar at most.
 */
const MAX_MASKS = 256;

/** An automaton over a vocabulary: the masks of its states. */
export class TokenGrammar<S> {
  readonly automaton: ByteAutomaton<S>;
  readonly vocabulary: Vocabulary;
  readonly #masks = new Map<string, Uint32Array>();
  /** Masks over the tokens without a state's `local` byte, per local key. */
  readonly #local = new Map<string, Uint32Array>();
  /** Masks computed (not found in the cache). */
  computed = 0;

  constructor(automaton: ByteAutomaton<S>, vocabulary: Vocabulary) {
    this.automaton = automaton;
    this.vocabulary = vocabulary;
  }

  /** Bitset over the vocabulary: the tokens that may follow `s`. */
  mask(s: S): Uint32Array {
    const key = this.automaton.key(s);
    const hit = this.#masks.get(key);
    if (hit) {
      // Most recently used last.
      this.#masks.delete(key);
      this.#masks.set(key, hit);
      return hit;
    }
    const local = this.automaton.local?.(s) ?? null;
    let mask: Uint32Array;
    if (local) {
      // The tokens without the byte: shared by every state of the local key. With it: walked.
      const { without, with: holding } = this.vocabulary.split(local.byte);
      let part = this.#local.get(local.key);
      if (!part) {
        part = this.#compute(s, without);
        if (this.#local.size >= MAX_MASKS) this.#local.delete(this.#local.keys().next().value!);
        this.#local.set(local.key, part);
      }
      mask = this.#compute(s, holding);
      for (let w = 0; w < mask.length; w++) mask[w]! |= part[w]!;
    } else {
      mask = this.#compute(s, this.vocabulary);
    }
    this.computed++;
    if (this.#masks.size >= MAX_MASKS) this.#masks.delete(this.#masks.keys().next().value!);
    this.#masks.set(key, mask);
    return mask;
  }

  /** The mask of `s` over the tokens of `walk`. */
  #compute(s: S, walk: Walk): Uint32Array {
    const { sorted, lcp } = walk;
    const { bytes: all, size } = this.vocabulary;
    const a = this.automaton;
    const mask = new Uint32Array(Math.ceil(size / 32));
    // states[d]: the state after the current token's first d bytes (valid up to `known`).
    const states: S[] = [s];
    let known = 0;
    // The current prefix of this length was refused (Infinity: none).
    let refused = Number.POSITIVE_INFINITY;
    for (let i = 0; i < sorted.length; i++) {
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

  accept(id: number): boolean {
    const bytes = this.#grammar.vocabulary.bytes[id];
    const next = bytes ? runBytes(this.#grammar.automaton, this.#state, bytes) : null;
    if (next === null) throw new Error(`token ${id} is not allowed by the output grammar here`);
    this.#state = next;
    return this.#grammar.automaton.isDone(next);
  }
}
