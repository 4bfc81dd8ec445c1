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
}

/** The state after `bytes`, or null where the automaton refuses them. */
export function runBytes<S>(a: ByteAutomaton<S>, s: S | null, bytes: Uint8Array): S | null {
  for (let i = 0; i < bytes.length && s; i++) s = a.step(s, bytes[i]!);
  return s;
}

/** A vocabulary's token bytes, sorted for the mask walk. */
export class Vocabulary {
  readonly size: number;
  readonly bytes: readonly (Uint8Array | null)[];
  /** Token ids with bytes, in byte order; lcp[i]: bytes shared with the one before. */
  readonly sorted: Int32Array;
  readonly lcp: Uint16Array;

  /** `bytes[id]`: a token's bytes, null for tokens never allowed (special ones). */
  constructor(bytes: readonly (Uint8Array | null)[], size: number) {
    this.size = size;
    this.bytes = bytes;
    const ids: number[] = [];
    for (let id = 0; id < Math.min(bytes.length, size); id++) if (bytes[id]?.length) ids.push(id);
    // As latin1 strings, whose code units are the bytes: string order is byte order, and
    // comparing strings is several times faster than Buffer.compare.
    const keys: string[] = [];
    for (const id of ids) keys[id] = Buffer.from(bytes[id]!).toString("latin1");
    ids.sort((a, b) => (keys[a]! < keys[b]! ? -1 : keys[a]! > keys[b]! ? 1 : 0));
    this.sorted = Int32Array.from(ids);
    this.lcp = new Uint16Array(ids.length);
    for (let i = 1; i < ids.length; i++) {
      const p = bytes[ids[i - 1]!]!;
      const q = bytes[ids[i]!]!;
      let k = 0;
      while (k < p.length && k < q.length && p[k] === q[k]) k++;
      this.lcp[i] = k;
    }
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

/** Masks cached per state, at most. */
const MAX_MASKS = 512;

/** An automaton over a vocabulary: the masks of its states. */
export class TokenGrammar<S> {
  readonly automaton: ByteAutomaton<S>;
  readonly vocabulary: Vocabulary;
  readonly #masks = new Map<string, Uint32Array>();
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
    const mask = this.#compute(s);
    this.computed++;
    if (this.#masks.size >= MAX_MASKS) this.#masks.delete(this.#masks.keys().next().value!);
    this.#masks.set(key, mask);
    return mask;
  }

  #compute(s: S): Uint32Array {
    const { sorted, lcp, bytes: all, size } = this.vocabulary;
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
