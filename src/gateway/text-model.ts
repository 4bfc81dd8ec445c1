// What KServe's Open Inference Protocol serves here, over gRPC (grpc.ts) and REST
// (kserve-rest.ts) alike: one text model, its prompt a BYTES input `text_input`, its answer
// a BYTES output `text_output` and why each answer ended a BYTES output `finish_reason`, both
// in the input's shape; sampled with the completions route's fields and ranges; and
// Triton's generate extension's text fields.
import { randomInt } from "node:crypto";
import {
  SAMPLING_DEFAULT_FIELDS,
  SAMPLING_FIELD_RULES,
  type SamplingDefaults,
} from "../model/generation-config.ts";
import { ApiError } from "./errors.ts";
import { encodablePrompt, type Job, type JobSpec, jobPrompt, type ServeContext } from "./jobs.ts";
import { fimFrame, fimPrompt } from "./openai.ts";
import { MAX_PROMPTS } from "./schemas.ts";

/** The numeric sampling fields (SamplingFields' numbers), as parameters name them. */
export const NUMBER_FIELDS = [
  "max_tokens",
  "temperature",
  "top_p",
  "top_k",
  "min_p",
  "repetition_penalty",
  "seed",
  "presence_penalty",
  "frequency_penalty",
  "priority",
] as const;

/**
 * A parameter sent as a string, read as a decimal number (NaN when it is none): Number()
 * would also read "0x10" as 16 and "" as 0.
 */
export function decimal(s: string): number {
  const t = s.trim();
  return /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t) ? Number(t) : Number.NaN;
}

/** A 400 naming the field. */
export const bad = (message: string, param: string) =>
  new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });

/** The model's only version. */
export const MODEL_VERSION = "1";
export const TEXT_INPUT = "text_input";
export const TEXT_OUTPUT = "text_output";
export const FINISH_OUTPUT = "finish_reason";
/** The model's outputs, in the order they are returned when a request names none. */
export const OUTPUTS = [TEXT_OUTPUT, FINISH_OUTPUT] as const;
export type OutputName = (typeof OUTPUTS)[number];

/**
 * The outputs a request names, checked (each one of the model's, each once; a 400 naming
 * `paramOf(i)` else), or all of the model's when it names none.
 */
export function outputsAsked(
  names: readonly unknown[],
  paramOf: (i: number) => string,
): OutputName[] {
  if (names.length === 0) return [...OUTPUTS];
  const out: OutputName[] = [];
  for (const [i, name] of names.entries()) {
    if (typeof name !== "string" || !(OUTPUTS as readonly string[]).includes(name))
      throw bad(
        `unknown output '${String(name ?? "").slice(0, 64)}': the model's outputs are ${OUTPUTS.map((o) => `'${o}'`).join(" and ")}`,
        paramOf(i),
      );
    if (out.includes(name as OutputName))
      throw bad(`output '${name}' is asked for twice`, paramOf(i));
    out.push(name as OutputName);
  }
  return out;
}

/** An answer's values of each output, an element a prompt. */
export type OutputValues = Record<OutputName, readonly string[]>;
/** Completion length when the request sets none (as /v1/completions). */
export const DEFAULT_MAX_TOKENS = 16;

/** Sampling fields, wherever they came from (already numbers, strings or absent). */
export interface SamplingFields {
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  seed?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
  priority?: number;
  /** vLLM's cache_salt: prompt blocks cached for requests of the same salt only. */
  cache_salt?: string;
  stop: string[];
}

export type Sampling = Omit<JobSpec, "prompts"> & { maxTokens?: number };

/**
 * Validated sampling settings (the HTTP API's ranges) with their defaults: the model's
 * (`defaults`, generation-config.ts) for the fields `fields` leaves out, then the API's.
 */
export function sampling(fields: SamplingFields, defaults: SamplingDefaults = {}): Sampling {
  const s: SamplingFields = { ...defaults, ...fields };
  const check = (name: keyof SamplingFields, ok: (v: number) => boolean, rule: string) => {
    const v = s[name] as number | undefined;
    if (v !== undefined && !ok(v)) throw bad(`'${name}' must be ${rule}, got ${v}`, name);
  };
  check("max_tokens", (v) => Number.isSafeInteger(v) && v >= 1, "an integer >= 1");
  // The fields a generation config may default: its ranges (the HTTP API's).
  for (const k of SAMPLING_DEFAULT_FIELDS) check(k, ...SAMPLING_FIELD_RULES[k]);
  check("seed", (v) => Number.isInteger(v), "an integer");
  check("presence_penalty", (v) => v >= -2 && v <= 2, "in -2..2");
  check("frequency_penalty", (v) => v >= -2 && v <= 2, "in -2..2");
  check(
    "priority",
    (v) => Number.isInteger(v) && v >= -(2 ** 31) && v < 2 ** 31,
    "a 32-bit integer",
  );
  if (s.stop.length > 4) throw bad("at most 4 stop strings", "stop");
  const salt = s.cache_salt;
  if (salt !== undefined && (salt.length === 0 || salt.length > 1024))
    throw bad("'cache_salt' must be a string of 1 to 1024 characters", "cache_salt");
  return {
    ...(s.max_tokens !== undefined ? { maxTokens: s.max_tokens } : {}),
    n: 1,
    sampling: {
      temperature: s.temperature ?? 1,
      topP: s.top_p ?? 1,
      topK: s.top_k !== undefined && s.top_k > 0 ? s.top_k : 0,
      presencePenalty: s.presence_penalty ?? 0,
      frequencyPenalty: s.frequency_penalty ?? 0,
      ...(s.min_p ? { minP: s.min_p } : {}),
      ...(s.repetition_penalty !== undefined && s.repetition_penalty !== 1
        ? { repetitionPenalty: s.repetition_penalty }
        : {}),
      seed: s.seed ?? randomInt(2 ** 32 - 1),
    },
    stops: s.stop.filter((x) => x.length > 0),
    logprobs: null,
    promptLogprobs: false,
    ...(s.priority ? { priority: s.priority } : {}),
    ...(salt !== undefined ? { cacheSalt: salt } : {}),
  };
}

/** The prompt tokenized as /v1/completions does, checked against the context. */
export async function textJobSpec(
  ctx: ServeContext,
  text: string,
  s: Sampling,
  suffix?: string,
): Promise<JobSpec> {
  const fim = suffix ? fimFrame(ctx, suffix) : null;
  let prompt = await ctx.encoder.encode(encodablePrompt(ctx, text, "prompt"), !fim);
  if (fim) {
    const after = await ctx.encoder.encode(encodablePrompt(ctx, suffix!, "suffix"), false);
    prompt = fimPrompt(fim, prompt, after);
  }
  if (prompt.length === 0) throw bad("the prompt is empty", "prompt");
  const { maxTokens: requested, ...rest } = s;
  return {
    ...rest,
    prompts: [jobPrompt(ctx, prompt, requested, DEFAULT_MAX_TOKENS, { param: "prompt" })],
  };
}

/** An infer request's prompts (a batch: one job, a choice per prompt, as a completions batch). */
export async function inferJobSpec(
  ctx: ServeContext,
  texts: readonly string[],
  s: Sampling,
): Promise<JobSpec> {
  const specs = await Promise.all(texts.map((t) => textJobSpec(ctx, t, s)));
  return { ...specs[0]!, prompts: specs.map((p) => p.prompts[0]!) };
}

/**
 * The prompts a text input holds, row-major: any shape whose elements are 1 to MAX_PROMPTS
 * (`[1]`, `[1, 1]`, `[4, 1]`, ...). `count` is the elements it holds.
 */
export function checkPromptShape(name: string, shape: unknown, count: number, param: string) {
  checkShape(name, shape, param);
  const declared = shape.reduce((a, d) => a * d, 1);
  if (declared !== count)
    throw bad(`input '${name}' has shape [${shape.join(", ")}] but holds ${count} elements`, param);
  if (count < 1 || count > MAX_PROMPTS)
    throw bad(
      `input '${name}' must hold 1 to ${MAX_PROMPTS} prompts (a batch), got ${count}`,
      param,
    );
}

/** Tensor dimensions at most (KServe's tensors have a few; data nests this deep at most). */
export const MAX_RANK = 16;

/** A shape: 1 to MAX_RANK integers >= 0. */
export function checkShape(name: string, shape: unknown, param: string): asserts shape is number[] {
  if (
    !Array.isArray(shape) ||
    shape.length === 0 ||
    shape.length > MAX_RANK ||
    shape.some((d) => !Number.isSafeInteger(d) || (d as number) < 0)
  )
    throw bad(`input '${name}': shape must be 1 to ${MAX_RANK} integers >= 0`, param);
}

/** What an infer answer reports of a finished job, its texts in the prompts' order. */
export function inferOutcome(job: Job, spec: JobSpec) {
  const choices = [...job.choices].sort((a, b) => a.index - b.index);
  return {
    texts: choices.map((c) => c.out.text),
    /** Why each prompt's answer ended: the finish_reason output. */
    finishReasons: choices.map((c) => c.finishReason ?? "abort"),
    // Also the response's parameter: one reason a prompt, comma-separated (parameters are
    // scalars; kept for clients that read it).
    finishReason: choices.map((c) => c.finishReason ?? "abort").join(","),
    promptTokens: spec.prompts.reduce((a, p) => a + p.tokens.length, 0),
    completionTokens: job.completionTokens,
  };
}
