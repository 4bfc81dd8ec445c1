// Token sampling and logprobs over rows of logits [vocab].
//
// The rule (shards/include/expertmesh/ops.h, em_sample_args): temperature <= 0 is greedy
// (argmax, lowest id on ties); otherwise softmax(logits / temperature), keep the tokens at
// least min_p times as likely as the most likely one (min_p <= 0: all; vLLM's min_p), of
// those the top_k most likely (top_k <= 0: all), then the smallest most-likely prefix whose
// mass reaches top_p (top_p >= 1: all), renormalize, and pick by inverse CDF with the
// caller's uniform number u: the kept tokens are walked from most to least likely (ties:
// lower id first) when top_k or top_p cut, else in vocabulary order (the same distribution
// without sorting the vocabulary). A row with nothing to pick (a NaN or +Infinity among its
// logits, or every one -Infinity) gets -1. The native backend implements it in C++ over all rows of a step at once
// (threads); `sampleToken` is the TypeScript reference, with float32 weights as there.

/** Per-row settings of one sampling call over rows of logits [rows, vocab]. */
export interface SampleRows {
  readonly temperature: Float32Array;
  /** <= 0: no cut. */
  readonly topK: Int32Array;
  /** >= 1: no cut. */
  readonly topP: Float32Array;
  /** In [0, 1): see `uniform32`. */
  readonly uniform: Float32Array;
  /** In [0, 1]; 0 (or absent): no cut. */
  readonly minP?: Float32Array;
}

/** The largest float32 below 1. */
const BELOW_ONE = 1 - 2 ** -24;

/** A uniform number in [0, 1) as the float32 that samplers take (never rounded up to 1). */
export function uniform32(u: number): number {
  return Math.min(Math.fround(u), BELOW_ONE);
}

/** float32's smallest normal number. */
const FLT_MIN = 1.1754943508222875e-38;
/** Temperatures below are greedy (vLLM's _SAMPLING_EPS). */
const MIN_TEMPERATURE = 1e-5;

/**
 * A temperature as samplers take it: below 1e-5 greedy (0), as in vLLM. A float32
 * denormal made logits / T overflow to infinity, and the weights NaN: tokens at random.
 */
export function temperature32(t: number): number {
  return t < MIN_TEMPERATURE ? 0 : t;
}

/**
 * A top_p as samplers take it: at least float32's smallest normal (a smaller one rounds to
 * 0, which samplers refuse; any top_p that small keeps only the most likely token).
 */
export function topP32(p: number): number {
  return Math.max(p, FLT_MIN);
}

/** The penalties on a row of logits, as vLLM applies them. */
export interface Penalties {
  /** Subtracted once from a token generated at least once (OpenAI's). */
  readonly presence: number;
  /** Subtracted per time a token was generated (OpenAI's). */
  readonly frequency: number;
  /**
   * 1: off. A token of the prompt or generated so far has its logit divided by it when
   * positive, multiplied when not (Hugging Face's and vLLM's repetition_penalty): > 1
   * makes seen tokens less likely, < 1 more.
   */
  readonly repetition: number;
}

/**
 * Applies `p` to `row` in place, repetition first (vLLM's order): `counts` are the output
 * tokens' counts so far, `prompt` the prompt's token ids (read only when repetition != 1).
 */
export function applyPenalties(
  row: Float32Array,
  p: Penalties,
  counts: ReadonlyMap<number, number>,
  prompt: ReadonlySet<number> | null,
): void {
  if (p.repetition !== 1) {
    const r = p.repetition;
    const scale = (id: number) => {
      const v = row[id]!;
      row[id] = v > 0 ? v / r : v * r;
    };
    for (const id of prompt ?? []) scale(id);
    for (const id of counts.keys()) if (!prompt?.has(id)) scale(id);
  }
  if (p.presence !== 0 || p.frequency !== 0)
    for (const [id, n] of counts) row[id]! -= p.presence + p.frequency * n;
}

/**
 * vLLM's bad_words on a row of logits: each word's token ids (the word alone and with a
 * leading space, as `badWordTokens` gives them) may not be completed. A one-token word is
 * never sampled; a longer one's last token is masked where the output so far (`past`, the
 * generated tokens only) ends with the rest.
 */
export function maskBadWords(
  row: Float32Array,
  words: readonly (readonly number[])[],
  past: readonly number[],
): void {
  for (const w of words) {
    const n = w.length - 1;
    if (n > past.length) continue;
    let match = true;
    for (let j = 0; j < n && match; j++) match = past[past.length - n + j] === w[j];
    if (match) row[w[n]!] = Number.NEGATIVE_INFINITY;
  }
}

/** The reference sampler: one token per row (see the rule above). */
export function sampleRows(logits: Float32Array, vocab: number, rows: SampleRows): Int32Array {
  const n = logits.length / vocab;
  const out = new Int32Array(n);
  for (let r = 0; r < n; r++)
    out[r] = sampleToken(
      logits.subarray(r * vocab, (r + 1) * vocab),
      rows.temperature[r]!,
      rows.topK[r]!,
      rows.topP[r]!,
      rows.uniform[r]!,
      rows.minP?.[r] ?? 0,
    );
  return out;
}

/**
 * Whether `row` has a token to pick: no NaN or +Infinity (numbers that overflowed upstream)
 * and something above -Infinity (constraints that exclude every token). Samplers give -1
 * for a row without.
 */
export function pickable(row: Float32Array): boolean {
  let any = false;
  for (let i = 0; i < row.length; i++) {
    const v = row[i]!;
    if (!(v < Number.POSITIVE_INFINITY)) return false;
    if (v > Number.NEGATIVE_INFINITY) any = true;
  }
  return any;
}

/** One token from logits [vocab] (see the rule above); -1 when none is `pickable`. */
export function sampleToken(
  logits: Float32Array,
  temperature: number,
  topK: number,
  topP: number,
  u: number,
  minP = 0,
): number {
  const V = logits.length;
  if (!pickable(logits)) return -1;
  if (temperature <= 0) return argmax(logits);
  const w = new Float32Array(V);
  for (let i = 0; i < V; i++) w[i] = logits[i]! / temperature;
  // Kept tokens, most likely first; null: all of them, in vocabulary order.
  let order: Int32Array | null = null;
  let mass = 0;
  if (minP > 0) {
    // p_i >= min_p * p_max  <=>  l_i >= l_max + T log(min_p) (in float32, as the native
    // one); the kept ones in id order unless top_k or top_p cut.
    const lmax = logits[argmax(logits)]!;
    const top = Math.fround(lmax / temperature);
    const cut = Math.fround(lmax + Math.fround(temperature * Math.fround(Math.log(minP))));
    const kept = Int32Array.from({ length: V }, (_, i) => i).filter((id) => logits[id]! >= cut);
    const sorted = () => kept.sort((a, b) => w[b]! - w[a]! || a - b);
    order =
      topK > 0 && topK < kept.length ? sorted().subarray(0, topK) : topP < 1 ? sorted() : kept;
    for (const id of order) {
      w[id] = Math.exp(w[id]! - top);
      mass += w[id]!;
    }
  } else if (topK > 0 && topK < V) {
    order = byValue(w).subarray(0, topK);
    const mx = w[order[0]!]!;
    for (const id of order) {
      w[id] = Math.exp(w[id]! - mx);
      mass += w[id]!;
    }
  } else {
    let mx = -Infinity;
    for (let i = 0; i < V; i++) if (w[i]! > mx) mx = w[i]!;
    for (let i = 0; i < V; i++) {
      w[i] = Math.exp(w[i]! - mx);
      mass += w[i]!;
    }
  }
  if (topP < 1) {
    order ??= byValue(w);
    const target = topP * mass;
    let cum = 0;
    let keep = order.length;
    for (let j = 0; j < order.length; j++) {
      cum += w[order[j]!]!;
      if (cum >= target) {
        keep = j + 1;
        break;
      }
    }
    order = order.subarray(0, keep);
    mass = cum;
  }
  const target = u * mass;
  let acc = 0;
  if (order) {
    for (const id of order) {
      acc += w[id]!;
      if (acc > target) return id;
    }
    return order[order.length - 1]!;
  }
  for (let i = 0; i < V; i++) {
    acc += w[i]!;
    if (acc > target) return i;
  }
  return V - 1;
}

function argmax(v: Float32Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i]! > v[best]!) best = i;
  return best;
}

/** Ids by value, highest first, lower id on ties. */
function byValue(v: Float32Array): Int32Array {
  const ids = new Int32Array(v.length);
  for (let i = 0; i < ids.length; i++) ids[i] = i;
  return ids.sort((a, b) => v[b]! - v[a]! || a - b);
}

/** A token with its log-probability and the most likely alternatives ([id, logprob]). */
export interface TokenLogprob {
  readonly id: number;
  readonly logprob: number;
  readonly top: readonly (readonly [number, number])[];
  /** 1 + the tokens more likely than it (vLLM's rank), where asked for (prompt logprobs). */
  readonly rank?: number;
}

/** 1 + the entries of `row` above row[id]: the token's rank (ties share the best). */
export function rankIn(row: Float32Array, id: number): number {
  const v = row[id]!;
  let above = 0;
  for (let i = 0; i < row.length; i++) if (row[i]! > v) above++;
  return above + 1;
}

/**
 * The logprob of token `id` under logits [vocab] and the `k` most likely tokens (highest
 * first, lower id on ties), in float64: two passes over the row (its max, then the sum of
 * exponentials) and one selection of the k largest; the log-softmax row itself is never
 * built (at a 129k vocabulary that cost ~8 ms a token).
 */
export function tokenLogprob(logits: Float32Array, id: number, k: number): TokenLogprob {
  const V = logits.length;
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < V; i++) if (logits[i]! > max) max = logits[i]!;
  let sum = 0;
  for (let i = 0; i < V; i++) sum += Math.exp(logits[i]! - max);
  // A row of -inf (nothing possible): every logprob is -inf.
  const lse = max === Number.NEGATIVE_INFINITY ? Number.POSITIVE_INFINITY : max + Math.log(sum);
  // The k largest so far, highest first; a later token (higher id) enters only when larger.
  const ids: number[] = [];
  const vals: number[] = [];
  for (let i = 0; i < V && k > 0; i++) {
    const v = logits[i]!;
    if (ids.length === k && v <= vals[k - 1]!) continue;
    let at = ids.length < k ? ids.length : k - 1;
    while (at > 0 && vals[at - 1]! < v) at--;
    if (ids.length === k) {
      ids.pop();
      vals.pop();
    }
    ids.splice(at, 0, i);
    vals.splice(at, 0, v);
  }
  return {
    id,
    logprob: logits[id]! - lse,
    top: ids.map((t, j) => [t, vals[j]! - lse] as const),
  };
}

/** tokenLogprob over rows [rows, vocab]: the Backend.logprobs layout (the reference). */
export function logprobRows(
  logits: Float32Array,
  vocab: number,
  ids: Int32Array,
  k: number,
): { logprob: Float64Array; topIds: Int32Array; topLogprobs: Float64Array } {
  const n = ids.length;
  const out = {
    logprob: new Float64Array(n),
    topIds: new Int32Array(n * k),
    topLogprobs: new Float64Array(n * k),
  };
  for (let r = 0; r < n; r++) {
    const t = tokenLogprob(logits.subarray(r * vocab, (r + 1) * vocab), ids[r]!, k);
    out.logprob[r] = t.logprob;
    t.top.forEach(([id, lp], j) => {
      out.topIds[r * k + j] = id;
      out.topLogprobs[r * k + j] = lp;
    });
  }
  return out;
}
