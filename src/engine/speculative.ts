// Speculative decoding by prompt lookup (vLLM's "ngram" method, after Saxena's prompt
// lookup decoding): the next tokens are guessed by finding the sequence's last few tokens
// earlier in its own prompt or output and copying what followed them there. The engine runs
// the guesses (the draft) with the sequence's next token in one step and keeps the longest
// prefix the model itself would have produced (engine.ts), so the output is unchanged and a
// step yields up to 1 + draft tokens. Pays off where outputs repeat their input: code edits,
// quoting, extraction, JSON keys, a model stuck in a loop.
//
// NgramIndex finds the match as LZ77 compressors do: a hash chain over the positions of
// every `minN`-gram, walked from the most recent, keeping the longest match (up to `maxN`
// tokens) and the most recent among equals. Positions are indexed as the sequence grows, so
// a proposal costs the new tokens plus a bounded walk, not a scan of the whole context.
import { ExpertMeshError } from "../util/errors.ts";

export interface NgramConfig {
  /** Tokens proposed per step, at most (vLLM's num_speculative_tokens). */
  readonly numTokens: number;
  /** Longest suffix matched (prompt_lookup_max). */
  readonly maxN: number;
  /** Shortest suffix that counts as a match (prompt_lookup_min). */
  readonly minN: number;
}

/**
 * A gateway's speculative decoding: prompt lookup, or the model's own MTP layer (ADR 0012).
 */
export type SpeculativeConfig = ({ readonly method?: "ngram" } & NgramConfig) | MtpConfig;

export interface MtpConfig {
  readonly method: "mtp";
  /** Draft tokens per step (default 1): the MTP layer chained on its own output past 1. */
  readonly numTokens?: number;
}

/** Draft tokens a step may verify per sequence, at most (rows sampled at once). */
export const MAX_DRAFT_TOKENS = 15;

/** Checks a configuration; throws EM_CLI_USAGE naming the bad field. */
export function checkNgramConfig(c: NgramConfig): NgramConfig {
  const int = (v: number, name: string, lo: number, hi: number) => {
    if (!Number.isInteger(v) || v < lo || v > hi)
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `speculative ${name} must be an integer in [${lo}, ${hi}], got ${v}`,
      );
  };
  int(c.numTokens, "tokens", 1, MAX_DRAFT_TOKENS);
  int(c.minN, "prompt-lookup-min", 1, 64);
  int(c.maxN, "prompt-lookup-max", 1, 64);
  if (c.minN > c.maxN)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `speculative prompt-lookup-min (${c.minN}) must not exceed prompt-lookup-max (${c.maxN})`,
    );
  return c;
}

/** Checks MTP's draft length; throws EM_CLI_USAGE. */
export function checkMtpTokens(n: number): number {
  if (!Number.isInteger(n) || n < 1 || n > MAX_DRAFT_TOKENS)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `speculative tokens must be an integer in [1, ${MAX_DRAFT_TOKENS}], got ${n}`,
    );
  return n;
}

/** The engine's speculative options for prompt lookup (checked): an index per sequence. */
export function ngramSpeculation(c: NgramConfig): {
  numTokens: number;
  drafter: () => Drafter;
} {
  checkNgramConfig(c);
  return { numTokens: c.numTokens, drafter: () => new NgramIndex(c) };
}

/** What the index reads of a sequence: its tokens so far (prompt, then output). */
export interface TokenSource {
  readonly numTokens: number;
  tokenAt(i: number): number;
}

/** Guesses a sequence's next tokens; one per sequence, kept while it runs. */
export interface Drafter {
  /** Up to `k` tokens to follow `seq`'s last token (fewer, or none, when unsure). */
  propose(seq: TokenSource, k: number): number[];
}

/** Chain links walked per proposal, at most (bounds a proposal's cost on repetitive text). */
const MAX_CHAIN = 64;

/** One sequence's n-gram index (kept with the sequence, grown as it grows). */
export class NgramIndex implements Drafter {
  readonly #c: NgramConfig;
  /** Hash of a minN-gram -> the last position it ends at (indexed so far). */
  readonly #head = new Map<number, number>();
  /** prev[p]: the previous position whose minN-gram hashes as the one ending at p, or -1. */
  #prev = new Int32Array(64);
  /** minN-grams ending before this position are indexed. */
  #indexed = 0;

  constructor(config: NgramConfig) {
    this.#c = config;
  }

  /**
   * Up to `k` tokens to follow `seq`'s last token: what followed the longest earlier match
   * (at least minN, at most maxN tokens) of its end, the most recent such match; empty when
   * there is none. A match close to the end continues into the draft itself (a loop
   * repeats).
   */
  propose(seq: TokenSource, k: number): number[] {
    const { minN, maxN } = this.#c;
    const L = seq.numTokens;
    if (k <= 0 || L <= minN) return [];
    // Index every minN-gram ending before the last token: the suffix must not find itself.
    for (let p = Math.max(this.#indexed, minN - 1); p < L - 1; p++) this.#add(seq, p);
    this.#indexed = Math.max(this.#indexed, L - 1);
    let best = -1;
    let bestLen = 0;
    let steps = 0;
    for (let p = this.#head.get(hashAt(seq, L - 1, minN)) ?? -1; p >= 0; p = this.#prev[p]!) {
      if (++steps > MAX_CHAIN) break;
      // Length of the match of the suffix ending at L - 1 with the tokens ending at p.
      let n = 0;
      while (n < maxN && n <= p && seq.tokenAt(p - n) === seq.tokenAt(L - 1 - n)) n++;
      if (n >= minN && n > bestLen) {
        best = p;
        bestLen = n;
        if (n === maxN) break;
      }
    }
    if (best < 0) return [];
    const draft: number[] = [];
    // Position best + 1 + j holds a token of the sequence, or of the draft so far.
    for (let j = 0; j < k; j++) {
      const at = best + 1 + j;
      draft.push(at < L ? seq.tokenAt(at) : draft[at - L]!);
    }
    return draft;
  }

  #add(seq: TokenSource, p: number): void {
    if (p >= this.#prev.length) {
      const grown = new Int32Array(Math.max(p + 1, this.#prev.length * 2));
      grown.set(this.#prev);
      this.#prev = grown;
    }
    const h = hashAt(seq, p, this.#c.minN);
    this.#prev[p] = this.#head.get(h) ?? -1;
    this.#head.set(h, p);
  }
}

/** A 31-bit hash of the n tokens ending at position p (FNV-1a over the ids). */
function hashAt(seq: TokenSource, p: number, n: number): number {
  let h = 0x811c9dc5;
  for (let i = p - n + 1; i <= p; i++) h = Math.imul(h ^ seq.tokenAt(i), 0x01000193);
  return h >>> 1;
}
