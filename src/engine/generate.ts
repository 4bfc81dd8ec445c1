// Single-sequence generation: prefill the prompt, then decode one token at a time with the
// latent KV cache, sampling with temperature / min-p / top-k / top-p and the repetition
// penalty (sampling.ts, on the model's backend) from a seeded generator.
import { Prng } from "../model/prng.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { KvDtype } from "./kv-format.ts";
import { type DeepSeekForward, SequenceCache } from "./model.ts";
import { applyPenalties, temperature32, topP32, uniform32 } from "./sampling.ts";

export interface SamplingOptions {
  maxTokens: number;
  /** 0: greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  /** 0: off. */
  minP?: number;
  /** 1: off (sampling.ts applyPenalties). */
  repetitionPenalty?: number;
  seed?: number;
  /** Token ids that end generation (not included in the output). */
  stopTokens?: readonly number[];
  /** How the KV cache stores rows (kv-format.ts; default f32). */
  kvCacheDtype?: KvDtype;
}

export interface GenerationStats {
  promptTokens: number;
  generatedTokens: number;
  /** Wall time of the prefill and of all decode steps (ms). */
  prefillMs: number;
  decodeMs: number;
}

/** Generates up to maxTokens after `prompt`; calls onToken for each new token. */
export async function generate(
  model: DeepSeekForward,
  prompt: readonly number[],
  opts: SamplingOptions,
  onToken?: (id: number) => void,
): Promise<{ tokens: number[]; stats: GenerationStats }> {
  const cache = new SequenceCache(
    model.config,
    prompt.length + opts.maxTokens,
    opts.kvCacheDtype ?? "f32",
  );
  const rng = new Prng(opts.seed ?? 0);
  const stop = new Set(opts.stopTokens ?? []);
  const repetition = opts.repetitionPenalty ?? 1;
  const seen = new Set(prompt);
  const none = new Map<number, number>();
  const pick = (logits: Float32Array) => {
    if (repetition !== 1)
      applyPenalties(logits, { presence: 0, frequency: 0, repetition }, none, seen);
    const [id] = model.sample(logits, {
      temperature: Float32Array.of(temperature32(opts.temperature ?? 0)),
      topK: Int32Array.of(opts.topK ?? 0),
      topP: Float32Array.of(topP32(opts.topP ?? 1)),
      minP: Float32Array.of(opts.minP ?? 0),
      uniform: Float32Array.of(uniform32(rng.uniform())),
    });
    if (id === -1)
      throw new ExpertMeshError(
        "EM_ENGINE_NONFINITE",
        `the model's logits after ${tokens.length} generated tokens hold NaN or infinity ` +
          "(its weights or activations overflowed)",
      );
    return id!;
  };
  const tokens: number[] = [];
  const t0 = performance.now();
  let next = pick(await model.forward(prompt, cache, true));
  const t1 = performance.now();
  while (tokens.length < opts.maxTokens && !stop.has(next)) {
    tokens.push(next);
    seen.add(next);
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
