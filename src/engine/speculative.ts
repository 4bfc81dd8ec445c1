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

/** Draft tokens per step from a request's prediction, at most (halved and regrown as ngram's). */
export const PREDICTION_DRAFT_TOKENS = 8;

/** Tokens of the output's end that re-align it with the prediction, at most. */
const PREDICTION_ALIGN_MAX = 16;

/**
 * OpenAI's predicted outputs: the request gives the text it expects back (a file to edit
 * with a few changes), and its tokens are the draft. While the output follows the
 * prediction the draft is the prediction's next tokens; where the output leaves it (an
 * edit), the draft resumes after the place in the prediction where the output's last
 * tokens are found again (the longest such match, at least two tokens, the one nearest
 * after the last place); failing that, the first token off it is taken to replace one of
 * its tokens (the draft goes on after that one), and after a second none is drafted until
 * the output is found in it again.
 */
export class PredictionDrafter implements Drafter {
  readonly #p: readonly number[];
  readonly #promptLength: number;
  /** Per bigram of the prediction: the positions right after it. */
  readonly #after = new Map<number, number[]>();
  /** Where in the prediction the output's next token is expected; -1: lost. */
  #cursor = 0;
  /** The last place the output was found in the prediction (a re-alignment prefers after it). */
  #last = 0;
  /** Output tokens read so far. */
  #read = 0;
  /** The last token read was the prediction's (the start counts as such). */
  #following = true;

  constructor(prediction: readonly number[], promptLength: number) {
    this.#p = prediction;
    this.#promptLength = promptLength;
    for (let i = 2; i <= prediction.length; i++) {
      const key = bigram(prediction[i - 2]!, prediction[i - 1]!);
      const list = this.#after.get(key);
      if (list) list.push(i);
      else this.#after.set(key, [i]);
    }
  }

  propose(seq: TokenSource, k: number): number[] {
    const out = seq.numTokens - this.#promptLength;
    // Follow the output since the last proposal along the prediction while it matches.
    while (this.#read < out) {
      const t = seq.tokenAt(this.#promptLength + this.#read);
      this.#read++;
      if (this.#cursor >= 0 && this.#p[this.#cursor] === t) {
        this.#cursor++;
        this.#following = true;
        this.#last = this.#cursor;
        continue;
      }
      // Left the prediction: found again after the output's last two tokens, or (the first
      // token off it) guessed to stand for one token of it, as an edit that replaces a word
      // does; the next token tells.
      const found = this.#realign(seq);
      this.#cursor =
        found >= 0 ? found : this.#following && this.#cursor >= 0 ? this.#cursor + 1 : -1;
      this.#following = false;
      if (found >= 0) this.#last = found;
    }
    if (this.#cursor < 0 || k <= 0) return [];
    return this.#p.slice(this.#cursor, this.#cursor + k);
  }

  /** Where the prediction continues the output read so far, or -1. */
  #realign(seq: TokenSource): number {
    const end = this.#read;
    if (end < 2) return -1;
    const at = (i: number) => seq.tokenAt(this.#promptLength + i);
    const ends = this.#after.get(bigram(at(end - 2), at(end - 1)));
    if (!ends) return -1;
    let best = -1;
    let bestLen = 0;
    for (const e of ends) {
      // The match's length: the bigram, and the tokens before it that match too.
      let n = 2;
      while (n < PREDICTION_ALIGN_MAX && n < e && n < end && this.#p[e - 1 - n] === at(end - 1 - n))
        n++;
      const nearer = best < this.#last && e >= this.#last;
      if (n > bestLen || (n === bestLen && nearer)) {
        best = e;
        bestLen = n;
      }
    }
    return best < this.#p.length ? best : -1;
  }
}

/** A bigram of token ids as one map key (ids below 2^20). */
const bigram = (a: number, b: number) => a * 0x100000 + b;
