// One API request's generation: its n choices as engine sequences, their text with stop
// strings, logprobs and timings. Routes (openai.ts) turn a Job into JSON or SSE.
import { type Attributes, SpanStatusCode } from "@opentelemetry/api";
import type { TokenLogprob } from "../engine/sampling.ts";
import type { SamplingDefaults } from "../model/generation-config.ts";
import type { Tokenizer } from "../model/tokenizer.ts";
import type {
  FinishReason,
  GenerationRequest,
  SamplingParams,
  ServingEngine,
  TokenConstraint,
} from "./engine.ts";
import { ApiError, toApiError } from "./errors.ts";
import { GrammarConstraint, type TokenGrammar } from "./grammar.ts";
import type { GatewayMetrics } from "./metrics.ts";
import type { PromptEncoder } from "./prompt-encoder.ts";
import { type ReasoningParserName, ThinkingBudget, type ThinkingBudgetSpec } from "./reasoning.ts";
import { OutputText } from "./text.ts";
import type { ToolCallFormat } from "./tool-calls.ts";
import { sampledTraceId, startJobSpan, type Tracing } from "./tracing.ts";

/** What the routes share: the engine and the model's facts. */
export interface ServeContext {
  readonly engine: ServingEngine;
  /** Decodes outputs (and short prompts). */
  readonly tokenizer: Tokenizer;
  /** Encodes prompts, long ones off the event loop. */
  readonly encoder: PromptEncoder;
  readonly servedModelName: string;
  /** Other names clients may ask for the model by (--served-model-alias); answers say servedModelName. */
  readonly modelAliases?: readonly string[];
  readonly maxModelLen: number;
  readonly vocabSize: number;
  /** Chat answers' thinking apart from their content (reasoning.ts). */
  readonly reasoningParser: ReasoningParserName;
  /** A thought's most tokens when a request sets none (--thinking-token-budget); null: none. */
  readonly thinkingTokenBudget?: number | null;
  /** The model's tool-call format (tool-calls.ts). */
  readonly toolCallFormat: ToolCallFormat;
  /**
   * Sampling fields a request leaves out take these (the model's generation_config.json;
   * generation-config.ts), then the APIs' own defaults.
   */
  readonly samplingDefaults: SamplingDefaults;
  readonly metrics: GatewayMetrics;
  /** OpenTelemetry traces of the requests (--otlp-traces-endpoint), when on. */
  readonly tracing?: Tracing;
  /**
   * A stream silent this long gets a keepalive (openai.ts eventStream; --stream-keepalive;
   * absent: 15 s; 0: none).
   */
  readonly streamKeepaliveMs?: number;
  /** Where requests that fail on the server's side (5xx: a shard, a bug) are logged. */
  readonly log?: (message: string) => void;
}

/**
 * 404 EM_GATEWAY_UNKNOWN_MODEL (`param` naming the field) unless `name` is this gateway's
 * model: its served name or one of its aliases. Every API's model check.
 */
export function checkServed(
  ctx: Pick<ServeContext, "servedModelName" | "modelAliases">,
  name: string | undefined,
  param: string,
): void {
  const aliases = ctx.modelAliases ?? [];
  if (name === ctx.servedModelName || (name !== undefined && aliases.includes(name))) return;
  const also = aliases.length ? ` (also as ${aliases.map((a) => `'${a}'`).join(", ")})` : "";
  throw new ApiError(
    "EM_GATEWAY_UNKNOWN_MODEL",
    `the model '${name ?? ""}' does not exist here; this gateway serves '${ctx.servedModelName}'${also}`,
    { param },
  );
}

/** A request id taken from a client (x-request-id): printable ASCII, up to 128 characters. */
export const REQUEST_ID = /^[\x21-\x7e]{1,128}$/;

const logged = new WeakSet<object>();

/**
 * Logs a request that failed on the server's side (a shard that did not answer, a bug):
 * the client's own mistakes (4xx) are only answered. Each error once, wherever it surfaces.
 */
export function logServerError(ctx: ServeContext, what: string, err: unknown): void {
  const e = toApiError(err);
  if (e.status < 500 || (typeof err === "object" && err !== null && logged.has(err))) return;
  if (typeof err === "object" && err !== null) logged.add(err);
  ctx.log?.(`${what} failed: ${e.status} ${e.code}: ${e.message}`);
}

/**
 * Text to be encoded as a prompt: refused at once when it cannot fit the context whatever
 * it encodes to (encoding a megabyte takes seconds of the event loop that every stream
 * shares); the exact check follows the encoding.
 */
export function encodablePrompt(ctx: ServeContext, text: string, param: string): string {
  const atLeast = ctx.tokenizer.minTokens(text);
  if (atLeast >= ctx.maxModelLen)
    throw new ApiError(
      "EM_GATEWAY_PROMPT_TOO_LONG",
      `this model's maximum context length is ${ctx.maxModelLen} tokens; the prompt has at least ${atLeast} tokens` +
        ": shorten the prompt",
      { param },
    );
  return text;
}

/** One prompt of a request and the most tokens its choices may generate. */
export interface JobPrompt {
  readonly tokens: readonly number[];
  readonly maxTokens: number;
}

/**
 * A prompt with the tokens its choices may generate: `requested` (max_tokens) if given, else
 * the rest of the context up to `defaultMax`; refused when the two do not fit the context,
 * or with `o.toWindow`, `requested` cut to the rest of the context (Anthropic's: the answer
 * stops at the context window, stop_reason model_context_window_exceeded).
 */
export function jobPrompt(
  ctx: ServeContext,
  tokens: readonly number[],
  requested: number | null | undefined,
  defaultMax: number | null,
  o: { param: string; which?: string; toWindow?: boolean },
): JobPrompt {
  const room = ctx.maxModelLen - tokens.length;
  if (o.toWindow && room >= 1 && requested != null && requested > room)
    return { tokens, maxTokens: room };
  if (room < 1 || (requested != null && requested > room))
    throw new ApiError(
      "EM_GATEWAY_PROMPT_TOO_LONG",
      `this model's maximum context length is ${ctx.maxModelLen} tokens; ${o.which ?? "the prompt"} has ${tokens.length} tokens` +
        (requested != null ? ` and max_tokens is ${requested}` : "") +
        ": shorten the prompt or lower max_tokens",
      { param: requested != null && room >= 1 ? "max_tokens" : o.param },
    );
  return { tokens, maxTokens: requested ?? Math.min(room, defaultMax ?? room) };
}

export interface JobSpec {
  /** One, or several (a completions batch): each gets n choices. */
  readonly prompts: readonly JobPrompt[];
  readonly n: number;
  readonly sampling: SamplingParams;
  readonly stops: readonly string[];
  readonly logprobs: number | null;
  readonly promptLogprobs: boolean;
  /** Top tokens per prompt position (default: logprobs), and their ranks (prompt_logprobs). */
  readonly promptTopLogprobs?: number;
  readonly promptRanks?: boolean;
  /** Generate past the end-of-sequence token, up to maxTokens (vLLM's ignore_eos). */
  readonly ignoreEos?: boolean;
  /** More tokens that end a choice, like the end-of-sequence one (vLLM's stop_token_ids). */
  readonly stopTokenIds?: readonly number[];
  /** No stop token before this many output tokens (vLLM's min_tokens). */
  readonly minTokens?: number;
  /** Constrained decoding (JSON mode, a JSON schema): each choice follows this grammar. */
  readonly grammar?: TokenGrammar<unknown>;
  /**
   * vLLM's priority: lower runs first (default 0). Needs a gateway scheduling by priority
   * (--scheduling-policy priority); startJob refuses a non-zero one otherwise.
   */
  readonly priority?: number;
  /** vLLM's cache_salt: prompt blocks are shared only with jobs of the same salt. */
  readonly cacheSalt?: string;
  /** vLLM's include_stop_str_in_output: a choice's text ends after its stop string. */
  readonly includeStopStr?: boolean;
  /** vLLM's skip_special_tokens (default true): false keeps special tokens in the text. */
  readonly skipSpecialTokens?: boolean;
  /** A thought's most tokens (thinking_token_budget), with what closes one cut short. */
  readonly thinkingBudget?: ThinkingBudgetSpec;
  /** OpenAI's predicted output, as tokens: each choice's drafts follow it (engine.ts). */
  readonly prediction?: readonly number[];
}

export interface Choice {
  /** prompt * n + the choice's number among its prompt's. */
  readonly index: number;
  /** Which prompt of the spec. */
  readonly prompt: number;
  readonly out: OutputText;
  readonly tokens: TokenLogprob[];
  promptLogprobs: (TokenLogprob | null)[] | null;
  finishReason: FinishReason | null;
}

export interface JobHooks {
  /** Its first step was scheduled: it has left the queue (not told if cancelled before). */
  onStarted?(): void;
  /** The prompt's logprobs (first token: null), before the choice's first token. */
  onPromptLogprobs?(choice: Choice, logprobs: (TokenLogprob | null)[]): void;
  /** A token and the text it released (may be ""). */
  onToken?(choice: Choice, token: TokenLogprob, text: string): void;
  /** The choice ended; `text` is what was still held back. */
  onFinish?(choice: Choice, text: string): void;
}

export interface Job {
  readonly choices: Choice[];
  /** Resolves when every choice finished; rejects with the first failure. */
  readonly done: Promise<void>;
  /** The client left: cancels every choice and frees their cache blocks. */
  cancel(): void;
  readonly completionTokens: number;
  /** Prompt tokens, each prompt once (not once per choice). */
  readonly promptTokens: number;
  /** Prompt tokens taken from the prefix cache (each prompt's first choice's). */
  readonly cachedTokens: number;
  /**
   * With a predicted output: its draft tokens the model kept (accepted) and those it did not
   * (rejected), over every choice; null without one.
   */
  readonly prediction: { readonly accepted: number; readonly rejected: number } | null;
}

/** A job's request as GenAI span attributes (tracing.ts). */
function requestAttributes(spec: JobSpec): Attributes {
  const s = spec.sampling;
  return {
    "gen_ai.request.max_tokens": Math.max(...spec.prompts.map((p) => p.maxTokens)),
    "gen_ai.request.temperature": s.temperature,
    ...(s.topP < 1 ? { "gen_ai.request.top_p": s.topP } : {}),
    ...(s.topK > 0 ? { "gen_ai.request.top_k": s.topK } : {}),
    ...(spec.n !== 1 ? { "gen_ai.request.choice.count": spec.n } : {}),
    ...(spec.prompts.length > 1 ? { "expertmesh.request.prompts": spec.prompts.length } : {}),
    ...(spec.priority ? { "expertmesh.request.priority": spec.priority } : {}),
  };
}

/** A choice's constraint: its grammar, under its thinking budget when it has one. */
function constraintOf(spec: JobSpec): { constraint?: TokenConstraint } {
  const grammar = spec.grammar ? new GrammarConstraint(spec.grammar) : null;
  if (spec.thinkingBudget) return { constraint: new ThinkingBudget(spec.thinkingBudget, grammar) };
  return grammar ? { constraint: grammar } : {};
}

/** Submits the request's choices; throws 429 (queue full) or 400 (cannot fit) at once. */
export function startJob(ctx: ServeContext, spec: JobSpec, hooks: JobHooks = {}): Job {
  if (spec.priority && ctx.engine.schedulingPolicy !== "priority")
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `priority ${spec.priority} needs a gateway that schedules by priority (--scheduling-policy priority); this one serves in arrival order (fcfs): send priority 0 or none`,
      { param: "priority" },
    );
  const t0 = performance.now();
  const { metrics } = ctx;
  let firstToken = true;
  /** When the first token came, and when the first choice was scheduled (performance.now()). */
  let firstTokenAt = 0;
  let startedAt = 0;
  const promptTokens = spec.prompts.reduce((sum, p) => sum + p.tokens.length, 0);
  /** Draft tokens of the predicted output kept and not (Job.prediction). */
  const predicted = { accepted: 0, rejected: 0 };
  const span = startJobSpan(ctx.servedModelName, () => requestAttributes(spec));
  /** The latency histograms' exemplar: the trace id, when the span is sampled (exported). */
  const exemplar = (): Record<string, string> => {
    const traceId = sampledTraceId(span);
    return traceId ? { trace_id: traceId } : {};
  };
  const total = spec.n * spec.prompts.length;
  let remaining = total;
  let settled = false;
  let resolve!: () => void;
  let reject!: (e: unknown) => void;
  const done = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // A job rejected after the client left has no one to tell.
  done.catch(() => {});
  const cancels: (() => void)[] = [];
  const choices: Choice[] = [];
  let cachedTokens = 0;
  const cancelAll = () => {
    for (const c of cancels) c();
  };
  const finish = (choice: Choice, reason: FinishReason) => {
    if (choice.finishReason !== null || settled) return;
    choice.finishReason = reason;
    // Flushed whether or not a hook takes it: the text's unfinished end is its last part.
    const rest = choice.out.flush();
    hooks.onFinish?.(choice, rest);
    if (--remaining === 0) {
      settled = true;
      // One count per request, as abort and error: 'length' if any choice ran out of tokens.
      const length = choices.some((c) => c.finishReason === "length");
      metrics.requests.inc({ finished_reason: length ? "length" : reason });
      metrics.e2eLatency.observe({
        value: (performance.now() - t0) / 1000,
        exemplarLabels: exemplar(),
      });
      endSpan(null);
      resolve();
    }
  };
  const fail = (err: unknown) => {
    if (settled) return;
    settled = true;
    logServerError(ctx, "a request", err);
    cancelAll();
    metrics.requests.inc({ finished_reason: "error" });
    endSpan(err);
    reject(err);
  };
  /** Ends the job's span with what the job did (err: it failed; "abort": the client left). */
  const endSpan = (err: unknown) => {
    if (!span) return;
    const now = performance.now();
    const secs = (at: number) => Math.round(at - t0) / 1000;
    span.setAttributes({
      "gen_ai.response.model": ctx.servedModelName,
      "gen_ai.response.finish_reasons": choices.map((c) => c.finishReason ?? "abort"),
      "gen_ai.usage.input_tokens": promptTokens,
      "gen_ai.usage.output_tokens": choices.reduce((n, c) => n + c.tokens.length, 0),
      "gen_ai.usage.cache_read.input_tokens": cachedTokens,
      "gen_ai.latency.e2e": secs(now),
      ...(startedAt > 0 ? { "gen_ai.latency.time_in_queue": secs(startedAt) } : {}),
      ...(firstTokenAt > 0 ? { "gen_ai.latency.time_to_first_token": secs(firstTokenAt) } : {}),
    });
    if (err !== null && err !== "abort") {
      const e = toApiError(err);
      span.setAttribute("error.type", e.code);
      span.setStatus({ code: SpanStatusCode.ERROR, message: e.message });
    }
    span.end();
  };
  // Per prompt, its first choice's engine id: the others take the prompt from its cached
  // blocks.
  let first: number | undefined;
  for (let i = 0; i < total; i++) {
    const p = Math.floor(i / spec.n);
    const prompt = spec.prompts[p]!;
    if (i % spec.n === 0) first = undefined;
    const choice: Choice = {
      index: i,
      prompt: p,
      out: new OutputText(ctx.tokenizer, spec.stops, {
        includeStop: spec.includeStopStr ?? false,
        skipSpecialTokens: spec.skipSpecialTokens ?? true,
      }),
      tokens: [],
      promptLogprobs: null,
      finishReason: null,
    };
    let last = 0;
    const req: GenerationRequest = {
      prompt: prompt.tokens,
      maxTokens: prompt.maxTokens,
      // Choice j of every prompt samples as choice j of a request of that prompt alone.
      sampling: { ...spec.sampling, seed: (spec.sampling.seed + (i % spec.n)) >>> 0 },
      stopTokenIds: [
        ...(ctx.tokenizer.eosTokenId === null || spec.ignoreEos ? [] : [ctx.tokenizer.eosTokenId]),
        ...(spec.stopTokenIds ?? []),
      ],
      ...(spec.minTokens ? { minTokens: spec.minTokens } : {}),
      ...(spec.priority ? { priority: spec.priority } : {}),
      ...(spec.cacheSalt !== undefined ? { cacheSalt: spec.cacheSalt } : {}),
      logprobs: spec.logprobs,
      promptLogprobs: spec.promptLogprobs,
      ...(spec.promptTopLogprobs !== undefined
        ? { promptTopLogprobs: spec.promptTopLogprobs }
        : {}),
      ...(spec.promptRanks ? { promptRanks: true } : {}),
      ...(first !== undefined ? { promptFrom: first } : {}),
      ...constraintOf(spec),
      ...(spec.prediction?.length ? { prediction: spec.prediction } : {}),
    };
    const r = ctx.engine.submit(req, {
      onStarted: (cached) => {
        if (startedAt === 0) {
          startedAt = performance.now();
          if (!settled) hooks.onStarted?.();
        }
        if (i % spec.n === 0) cachedTokens += cached;
      },
      onPromptLogprobs: (lps) => {
        if (settled) return;
        choice.promptLogprobs = lps;
        hooks.onPromptLogprobs?.(choice, lps);
      },
      onToken: (t) => {
        if (settled || choice.finishReason !== null) return;
        const now = performance.now();
        if (firstToken) {
          metrics.timeToFirstToken.observe({
            value: (now - t0) / 1000,
            exemplarLabels: exemplar(),
          });
          firstTokenAt = now;
        } else if (last > 0) metrics.interTokenLatency.observe((now - last) / 1000);
        firstToken = false;
        last = now;
        metrics.generationTokens.inc();
        choice.tokens.push(t);
        const text = choice.out.push(t.id);
        hooks.onToken?.(choice, t, text);
        if (choice.out.stopped) {
          cancels[i]!();
          finish(choice, "stop");
        }
      },
      onFinish: (reason) => {
        // A first sampled token that ends the choice (EOS, a stop token id) is its first
        // token too: the time to it counts, as vLLM counts it (the other finishes before any
        // token, an abort or an error, do not come here as "stop").
        if (firstToken && reason === "stop" && !settled && choice.finishReason === null) {
          const now = performance.now();
          metrics.timeToFirstToken.observe({
            value: (now - t0) / 1000,
            exemplarLabels: exemplar(),
          });
          if (firstTokenAt === 0) firstTokenAt = now;
          firstToken = false;
        }
        finish(choice, reason);
      },
      onDraft: (proposed, accepted) => {
        predicted.accepted += accepted;
        predicted.rejected += proposed - accepted;
      },
      onError: fail,
    });
    if (!r.ok) {
      cancelAll();
      metrics.rejected.inc({ reason: r.reason });
      const e =
        r.reason === "queue_full"
          ? new ApiError(
              "EM_GATEWAY_OVERLOADED",
              "the gateway's admission queue is full: retry later",
              {
                retryAfter: 1,
              },
            )
          : new ApiError(
              "EM_GATEWAY_PROMPT_TOO_LONG",
              `${prompt.tokens.length} prompt tokens + ${prompt.maxTokens} max_tokens do not fit in the KV cache`,
              spec.prompts.length > 1 ? { param: "prompt" } : {},
            );
      settled = true;
      endSpan(e);
      throw e;
    }
    cancels.push(r.cancel);
    choices.push(choice);
    first ??= r.id;
  }
  metrics.promptTokens.inc(promptTokens);
  return {
    choices,
    done,
    cancel: () => {
      if (settled) return;
      settled = true;
      cancelAll();
      metrics.requests.inc({ finished_reason: "abort" });
      endSpan("abort");
      resolve();
    },
    get completionTokens() {
      return choices.reduce((s, c) => s + c.tokens.length, 0);
    },
    promptTokens,
    get cachedTokens() {
      return cachedTokens;
    },
    get prediction() {
      return spec.prediction?.length ? { ...predicted } : null;
    },
  };
}
