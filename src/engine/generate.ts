// Single-sequence generation: prefill the prompt, then decode one token at a time with the
// latent KV cache, sampling with temperature / top-k / top-p from a seeded generator.
import { Prng } from "../model/prng.ts";
import { type DeepSeekForward, SequenceCache } from "./model.ts";

export interface SamplingOptions {
  maxTokens: number;
  /** 0: greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number;
  /** Token ids that end generation (not included in the output). */
  stopTokens?: readonly number[];
}

export interface GenerationStats {
  promptTokens: number;
  generatedTokens: number;
  /** Wall time of the prefill and of all decode steps (ms). */
  prefillMs: number;
  decodeMs: number;
}

/**
 * Picks a token from logits [vocab]: argmax (lowest id on ties) when temperature <= 0,
 * else softmax(logits / T) restricted to top-k, then the top-p nucleus, by inverse CDF of `u`.
 */
export function sampleToken(
  logits: Float32Array,
  temperature: number,
  topK: number,
  topP: number,
  u: number,
): number {
  if (temperature <= 0) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
    return best;
  }
  const ids = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]! || a - b);
  const kept = topK > 0 ? ids.slice(0, topK) : ids;
  const max = logits[kept[0]!]!;
  const probs = kept.map((i) => Math.exp((logits[i]! - max) / temperature));
  const total = probs.reduce((a, b) => a + b, 0);
  let n = kept.length;
  if (topP < 1) {
    let mass = 0;
    for (n = 0; n < kept.length && mass < topP * total; n++) mass += probs[n]!;
  }
  const nucleus = probs.slice(0, n).reduce((a, b) => a + b, 0);
  let acc = 0;
  for (let i = 0; i < n; i++) {
    acc += probs[i]!;
    if (u * nucleus < acc) return kept[i]!;
  }
  return kept[n - 1]!;
}

/** Generates up to maxTokens after `prompt`; calls onToken for each new token. */
export async function generate(
  model: DeepSeekForward,
  prompt: readonly number[],
  opts: SamplingOptions,
  onToken?: (id: number) => void,
): Promise<{ tokens: number[]; stats: GenerationStats }> {
  const cache = new SequenceCache(model.config, prompt.length + opts.maxTokens);
  const rng = new Prng(opts.seed ?? 0);
  const stop = new Set(opts.stopTokens ?? []);
  const pick = (logits: Float32Array) =>
    sampleToken(logits, opts.temperature ?? 0, opts.topK ?? 0, opts.topP ?? 1, rng.uniform());
  const tokens: number[] = [];
  const t0 = performance.now();
  let next = pick(await model.forward(prompt, cache, true));
  const t1 = performance.now();
  while (tokens.length < opts.maxTokens && !stop.has(next)) {
    tokens.push(next);
    onToken?.(next);
    if (tokens.length === opts.maxTokens) break;
    next = pick(await model.forward([next], cache, true));
  }
  const t2 = performance.now();
  return {
    tokens,
    stats: {
      promptTokens: prompt.length,
      generatedTokens: tokens.length,
      prefillMs: t1 - t0,
      decodeMs: t2 - t1,
    },
  };
}
