// The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions (JSON or
// server-sent events), GET /v1/models. Bodies are validated by their TypeBox schemas
// before the handlers run; a client that disconnects cancels its choices. A chat completion
// made with store: true is kept (stored-completions.ts).
import { randomBytes, randomInt } from "node:crypto";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import type { TokenLogprob } from "../engine/sampling.ts";
import type { ChatMessage as TemplateMessage } from "../model/tokenizer.ts";
import { ChatOutput, type ChatOutputOptions } from "./chat-output.ts";
import { textOfParts } from "./content-parts.ts";
import { ApiError, errorBody, toApiError } from "./errors.ts";
import { vocabularyFor } from "./grammar.ts";
import {
  type Choice,
  checkServed,
  encodablePrompt,
  type Job,
  type JobSpec,
  jobPrompt,
  type ServeContext,
  startJob,
} from "./jobs.ts";
import {
  callsOrAnswer,
  type OutputFormat,
  outputFormat,
  type ToolPlan,
  toolPlan,
} from "./output-grammar.ts";
import {
  effortKwargs,
  requestThinks,
  type ThinkingBudgetSpec,
  thinkingFirst,
} from "./reasoning.ts";
import {
  ChatCompletionRequest,
  type ChatMessage,
  CompletionRequest,
  DetokenizeRequest,
  TokenizeRequest,
} from "./schemas.ts";
import {
  completionId,
  type StoredCompletions,
  storedMessages,
  storeOff,
} from "./stored-completions.ts";
import { customInputText, type ToolFunction, withTools } from "./tool-calls.ts";

type Common = ChatCompletionRequest | CompletionRequest;

/** Where chat completions made with store: true go, and whose a request's are (ownerOf). */
export interface Keeping {
  readonly store: StoredCompletions;
  readonly owner: (req: FastifyRequest) => string;
}

/** The route plugin. */
export function openaiRoutes(ctx: ServeContext, keeping: Keeping) {
  return async (app: FastifyInstance) => {
    // OpenAI's model object and Anthropic's (type, display_name, created_at) in one, and a
    // list that is both APIs' page (Anthropic's has_more, first_id, last_id): either SDK's
    // client.models.list() and retrieve(id) read it. An alias is listed as a model of its own.
    const modelOf = (id: string) => ({
      id,
      object: "model",
      created: 0,
      owned_by: "expertmesh",
      max_model_len: ctx.maxModelLen,
      type: "model",
      display_name: id,
      created_at: new Date(0).toISOString(),
      // (Anthropic's ModelInfo: the context a prompt may fill, the most an answer may take)
      max_input_tokens: ctx.maxModelLen - 1,
      max_tokens: ctx.maxModelLen - 1,
      capabilities: null,
      lifecycle: "active",
      deprecated_at: null,
      retires_at: null,
    });
    const models = [ctx.servedModelName, ...(ctx.modelAliases ?? [])].map(modelOf);
    app.get("/v1/models", async () => ({
      object: "list",
      data: models,
      has_more: false,
      first_id: models[0]!.id,
      last_id: models.at(-1)!.id,
    }));
    // The SDKs' retrieve (client.models.retrieve(id)).
    app.get<{ Params: { id: string } }>("/v1/models/:id", async (req) => {
      checkModel(ctx, req.params.id);
      return modelOf(req.params.id);
    });
    app.post<{ Body: ChatCompletionRequest }>(
      "/v1/chat/completions",
      { schema: { body: ChatCompletionRequest } },
      (req, reply) => chat(ctx, keeping, req, reply),
    );
    app.post<{ Body: CompletionRequest }>(
      "/v1/completions",
      { schema: { body: CompletionRequest } },
      (req, reply) => completion(ctx, req, reply),
    );
    // vLLM's token counting routes: the prompt tokens a request would run on.
    app.post<{ Body: TokenizeRequest }>("/tokenize", { schema: { body: TokenizeRequest } }, (req) =>
      tokenize(ctx, req.body),
    );
    app.post<{ Body: DetokenizeRequest }>(
      "/detokenize",
      { schema: { body: DetokenizeRequest } },
      async (req) => {
        const b = req.body;
        if (b.model != null) checkModel(ctx, b.model);
        checkTokenIds(ctx, b.tokens, "tokens");
        return { prompt: ctx.tokenizer.decode(b.tokens) };
      },
    );
  };
}

/**
 * POST /tokenize: a completion's prompt (text, with the tokenizer's special tokens unless
 * add_special_tokens is false) or a chat's messages (and tools) through the chat template,
 * as the completion routes encode them; the count and the context length served.
 */
async function tokenize(ctx: ServeContext, b: TokenizeRequest): Promise<object> {
  if (b.model != null) checkModel(ctx, b.model);
  if ((b.prompt === undefined) === (b.messages === undefined))
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", "give exactly one of prompt and messages", {
      param: b.prompt === undefined ? "prompt" : "messages",
    });
  let tokens: number[];
  if (b.prompt !== undefined) {
    tokens = await ctx.encoder.encode(
      encodablePrompt(ctx, b.prompt, "prompt"),
      b.add_special_tokens ?? true,
    );
  } else {
    const chatBody = {
      model: ctx.servedModelName,
      messages: b.messages!,
      ...(b.tools !== undefined ? { tools: b.tools } : {}),
      ...(b.tool_choice !== undefined ? { tool_choice: b.tool_choice } : {}),
      ...(b.chat_template_kwargs != null ? { chat_template_kwargs: b.chat_template_kwargs } : {}),
      ...(b.add_generation_prompt != null
        ? { add_generation_prompt: b.add_generation_prompt }
        : {}),
      ...(b.continue_final_message != null
        ? { continue_final_message: b.continue_final_message }
        : {}),
    } as ChatCompletionRequest;
    tokens = (await chatPrompt(ctx, chatBody)).prompt;
  }
  return {
    count: tokens.length,
    max_model_len: ctx.maxModelLen,
    tokens,
    ...(b.return_token_strs ? { token_strs: tokens.map((t) => ctx.tokenizer.decode([t])) } : {}),
  };
}

/**
 * vLLM's bad_words as token ids: each word as it is and with a leading space (a word's
 * start in the middle of text), the latter only when it is another token sequence of the
 * same length (vLLM's rule).
 */
function badWordTokens(ctx: ServeContext, words: readonly string[]): number[][] {
  const out: number[][] = [];
  for (const word of words) {
    const bare = ctx.tokenizer.encode(word.trimStart(), false);
    const spaced = ctx.tokenizer.encode(` ${word.trimStart()}`, false);
    if (bare.length > 0) out.push(bare);
    if (spaced.length === bare.length && spaced[0] !== bare[0]) out.push(spaced);
  }
  return out;
}

/** Token ids given by a client (inside the vocabulary) as a bit set over it. */
function tokenSet(ctx: ServeContext, ids: readonly number[], param: string): Uint32Array {
  checkTokenIds(ctx, ids, param);
  const set = new Uint32Array(Math.ceil(ctx.vocabSize / 32));
  for (const id of ids) set[id >>> 5]! |= 1 << (id & 31);
  return set;
}

/** Token ids given by a client, each inside the vocabulary. */
function checkTokenIds(ctx: ServeContext, ids: readonly number[], param: string): void {
  const bad = ids.find((t) => t >= ctx.vocabSize);
  if (bad !== undefined)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `${param}: token ${bad} is outside the vocabulary (size ${ctx.vocabSize})`,
      { param },
    );
}

/**
 * Refuses what would change the answer and is not implemented, rather than answering as if
 * it had not been asked (a client that sends tools expects tool calls).
 */
function unsupported(fields: Record<string, unknown>): void {
  const refuse = (param: string, what: string): never => {
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${what} is not supported by this gateway`, {
      param,
    });
  };
  if (Array.isArray(fields["functions"]) && fields["functions"].length > 0)
    refuse("functions", "functions (the legacy form of tools; send tools and tool_choice)");
  // vLLM's fields that would change the answer, not implemented here.
  const given = (k: string) => {
    const v = fields[k];
    return v === true || (Array.isArray(v) && v.length > 0);
  };
  if (given("use_beam_search")) refuse("use_beam_search", "beam search (vLLM's use_beam_search)");
  if (given("logits_processors")) refuse("logits_processors", "vLLM's logits_processors");
  if (fields["prompt_embeds"] != null) refuse("prompt_embeds", "vLLM's prompt_embeds");
  // Output other than text (OpenAI's audio models): a text model answers text only.
  const modalities = fields["modalities"];
  if (Array.isArray(modalities) && modalities.some((m) => m !== "text"))
    refuse("modalities", `output modalities other than "text" (this model writes text only)`);
  if (fields["audio"] != null) refuse("audio", "audio output (this model writes text only)");
  const format = fields["response_format"] as { type?: unknown } | null | undefined;
  const formats = ["text", "json_object", "json_schema", "structural_tag"];
  if (format != null && !formats.includes(format.type as string))
    refuse(
      "response_format",
      `response_format ${JSON.stringify(format.type ?? format).slice(0, 40)} (only ${formats.map((f) => `"${f}"`).join(", ")} are)`,
    );
}

/** 404 EM_GATEWAY_UNKNOWN_MODEL for a model other than the one served. */
export function checkModel(ctx: ServeContext, model: string): void {
  checkServed(ctx, model, "model");
}

/** The shared sampling fields as a JobSpec (logprob fields and the grammar from the route). */
/**
 * The temperature and top_p a request samples with: its own, else the model's recommended
 * (generation_config.json), else OpenAI's defaults (1).
 */
export function temperatureOf(
  ctx: Pick<ServeContext, "samplingDefaults">,
  b: Pick<Common, "temperature" | "top_p">,
): { temperature: number; topP: number } {
  const d = ctx.samplingDefaults;
  return { temperature: b.temperature ?? d.temperature ?? 1, topP: b.top_p ?? d.top_p ?? 1 };
}

function jobSpec(
  ctx: ServeContext,
  b: Common,
  prompts: readonly (readonly number[])[],
  requested: number | null | undefined,
  defaultMax: number | null,
  promptParam: string,
  toWindow = false,
): Omit<JobSpec, "logprobs" | "promptLogprobs" | "grammar"> {
  const jobPrompts = prompts.map((tokens, i) =>
    jobPrompt(
      ctx,
      tokens,
      requested,
      defaultMax,
      prompts.length > 1
        ? { param: `${promptParam}[${i}]`, which: `prompt ${i}`, toWindow }
        : { param: promptParam, toWindow },
    ),
  );
  const stop = b.stop == null ? [] : typeof b.stop === "string" ? [b.stop] : b.stop;
  const logitBias = Object.entries(b.logit_bias ?? {}).map(([key, bias]) => {
    const id = Number(key);
    if (id >= ctx.vocabSize)
      throw new ApiError(
        "EM_GATEWAY_BAD_REQUEST",
        `logit_bias: token ${key} is outside the vocabulary (size ${ctx.vocabSize})`,
        { param: "logit_bias" },
      );
    return [id, bias] as const;
  });
  // Fields left out: the model's recommendations (generation_config.json), then OpenAI's.
  const d = ctx.samplingDefaults;
  const topK = b.top_k ?? d.top_k ?? 0;
  const minP = b.min_p ?? d.min_p ?? 0;
  const repetition = b.repetition_penalty ?? d.repetition_penalty ?? 1;
  return {
    prompts: jobPrompts,
    n: b.n ?? 1,
    sampling: {
      ...temperatureOf(ctx, b),
      topK: Math.max(topK, 0),
      presencePenalty: b.presence_penalty ?? 0,
      frequencyPenalty: b.frequency_penalty ?? 0,
      ...(minP ? { minP } : {}),
      ...(repetition !== 1 ? { repetitionPenalty: repetition } : {}),
      ...(b.allowed_token_ids != null
        ? { allowedTokens: tokenSet(ctx, b.allowed_token_ids, "allowed_token_ids") }
        : {}),
      ...(b.bad_words?.length ? { badWords: badWordTokens(ctx, b.bad_words) } : {}),
      seed: b.seed ?? randomInt(2 ** 32 - 1),
      ...(logitBias.length ? { logitBias } : {}),
    },
    stops: stop.filter((s) => s.length > 0),
    ...(b.include_stop_str_in_output ? { includeStopStr: true } : {}),
    ...(b.skip_special_tokens === false ? { skipSpecialTokens: false } : {}),
    ignoreEos: b.ignore_eos ?? false,
    ...(b.priority ? { priority: b.priority } : {}),
    ...(b.cache_salt != null ? { cacheSalt: b.cache_salt } : {}),
    ...stopTokens(ctx, b, jobPrompts),
  };
}

/**
 * vLLM's truncate_prompt_tokens: how many of a prompt's last tokens to keep (-1: the
 * context's worth); null when the request keeps them all.
 */
function truncation(ctx: ServeContext, b: Common): number | null {
  const k = b.truncate_prompt_tokens;
  if (k == null) return null;
  if (k === 0)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "truncate_prompt_tokens must be at least 1 (or -1: the context length)",
      { param: "truncate_prompt_tokens" },
    );
  return k === -1 ? ctx.maxModelLen : k;
}

/** The last `k` of `tokens` (left truncation). */
const lastTokens = (tokens: number[], k: number): number[] =>
  tokens.length > k ? tokens.slice(tokens.length - k) : tokens;

/** vLLM's stop_token_ids and min_tokens, checked against the vocabulary and max_tokens. */
function stopTokens(
  ctx: ServeContext,
  b: Common,
  prompts: readonly { maxTokens: number }[],
): Pick<JobSpec, "stopTokenIds" | "minTokens"> {
  const ids = b.stop_token_ids ?? [];
  const bad = ids.find((id) => id >= ctx.vocabSize);
  if (bad !== undefined)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `stop_token_ids: token ${bad} is outside the vocabulary (size ${ctx.vocabSize})`,
      { param: "stop_token_ids" },
    );
  const min = b.min_tokens ?? 0;
  const most = Math.min(...prompts.map((p) => p.maxTokens));
  if (min > most)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `min_tokens (${min}) is more than max_tokens (${most})`,
      { param: "min_tokens" },
    );
  return { ...(ids.length ? { stopTokenIds: ids } : {}), ...(min ? { minTokens: min } : {}) };
}

/**
 * A job's usage as chat and completions answer it; `reasoningTokens` (chat answers that
 * think) as OpenAI's completion_tokens_details.
 */
export const usageOf = (job: Job, reasoningTokens?: number) => ({
  prompt_tokens: job.promptTokens,
  completion_tokens: job.completionTokens,
  total_tokens: job.promptTokens + job.completionTokens,
  // OpenAI's: prompt tokens served from the prefix cache.
  prompt_tokens_details: { cached_tokens: job.cachedTokens },
  ...(reasoningTokens !== undefined || job.prediction
    ? {
        completion_tokens_details: {
          ...(reasoningTokens !== undefined ? { reasoning_tokens: reasoningTokens } : {}),
          // A predicted output's draft tokens the answer kept, and those it did not.
          ...(job.prediction
            ? {
                accepted_prediction_tokens: job.prediction.accepted,
                rejected_prediction_tokens: job.prediction.rejected,
              }
            : {}),
        },
      }
    : {}),
  // DeepSeek's API: the same split, as its clients read it.
  prompt_cache_hit_tokens: job.cachedTokens,
  prompt_cache_miss_tokens: job.promptTokens - job.cachedTokens,
});

/**
 * The output tokens a chat answer's thinking spans: its text encoded again, near enough
 * (undefined when the request does not think).
 */
function reasoningTokens(ctx: ServeContext, thinks: boolean, texts: Iterable<string>) {
  if (!thinks) return undefined;
  let n = 0;
  for (const t of texts) if (t) n += ctx.tokenizer.encode(t, false).length; // (no BOS: the thought's own tokens)
  return n;
}

/**
 * Binds a job to the HTTP exchange: a connection closed before the end cancels it (also
 * one that closed while the prompt was being encoded).
 */
export function bind(reply: FastifyReply, job: Job): void {
  jobs.set(reply.raw, job);
  if (reply.raw.closed) job.cancel();
  else
    reply.raw.on("close", () => {
      if (!reply.raw.writableFinished) job.cancel();
    });
}

/** The job each HTTP response runs (bind), for the access log. */
const jobs = new WeakMap<object, Job>();

/** The job bound to a raw response, if any. */
export function jobOf(raw: object): Job | undefined {
  return jobs.get(raw);
}

/** A comment: the keepalive of server-sent events that every client skips (SSE's own). */
export const KEEPALIVE_COMMENT = ": keepalive\n\n";

/** How long a stream may be silent before its keepalive when the gateway sets none. */
export const KEEPALIVE_MS = 15_000;

/**
 * Takes the raw response over for server-sent events: the status and headers, sent now.
 * A stream that sends nothing for ctx.streamKeepaliveMs (the prompt waiting its turn, a long
 * prefill, a summary made before the answer) gets `keepalive` then, and again after as long
 * again, lest a proxy or load balancer take the quiet connection for a dead one (an idle
 * timeout of 60 s is common) and cut it.
 */
export function eventStream(
  reply: FastifyReply,
  ctx: Pick<ServeContext, "streamKeepaliveMs">,
  keepalive = KEEPALIVE_COMMENT,
): FastifyReply["raw"] {
  reply.hijack();
  reply.raw.writeHead(200, {
    // Those set before (x-request-id), then the stream's own.
    ...(reply.getHeaders() as Record<string, string>),
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    connection: "keep-alive",
  });
  // Clients wait for the headers: send them now, before the first token.
  reply.raw.flushHeaders();
  keepAlive(reply.raw, ctx.streamKeepaliveMs ?? KEEPALIVE_MS, keepalive);
  return reply.raw;
}

/**
 * Writes `line` on `raw` whenever nothing went out for `ms` (0: never), until it ends.
 * What went out is read off the socket's count of bytes, so that every writer of the stream
 * counts without being told; a slow client's buffer still draining counts as sending.
 */
function keepAlive(raw: FastifyReply["raw"], ms: number, line: string): void {
  const socket = raw.socket;
  if (!(ms > 0) || socket === null) return;
  let seen = socket.bytesWritten;
  let quietSince = Date.now();
  // (checked three times a period: a silence is cut within 4/3 of it)
  const timer = setInterval(
    () => {
      if (raw.destroyed || raw.writableEnded) return clearInterval(timer);
      const now = Date.now();
      if (socket.bytesWritten !== seen || raw.writableLength > 0) quietSince = now;
      else if (now - quietSince >= ms) {
        raw.write(line);
        quietSince = now;
      }
      seen = socket.bytesWritten;
    },
    Math.max(1, Math.floor(ms / 3)),
  );
  timer.unref();
  raw.once("close", () => clearInterval(timer));
}

/** Server-sent events on the raw response (after the job was admitted). */
function sse(
  ctx: ServeContext,
  reply: FastifyReply,
): { send: (o: unknown) => void; end: () => void } {
  eventStream(reply, ctx);
  return {
    send: (o) => {
      if (!reply.raw.destroyed) reply.raw.write(`data: ${JSON.stringify(o)}\n\n`);
    },
    end: () => {
      if (!reply.raw.destroyed) reply.raw.end("data: [DONE]\n\n");
    },
  };
}

/**
 * Runs a streamed job to the end; an engine error becomes an error event. Whether it ended
 * without one.
 */
async function streamJob(
  job: Job,
  out: ReturnType<typeof sse>,
  final: () => unknown,
): Promise<boolean> {
  let ended = true;
  try {
    await job.done;
    out.send(final());
  } catch (err) {
    out.send(errorBody(toApiError(err)));
    ended = false;
  }
  out.end();
  return ended;
}

// ---- chat ----

/** Message i's content as text (null: none); parts that are not text are refused. */
function chatContentText(m: ChatMessage, i: number): string | null {
  if (m.content == null || typeof m.content === "string") return m.content ?? null;
  return textOfParts(m.content, ["messages", i, "content"], ["text"]);
}

/** The request's messages for the template (withTools: the functions presented). */
function chatMessages(
  ctx: ServeContext,
  b: ChatCompletionRequest,
  tools: readonly ToolFunction[],
): TemplateMessage[] {
  const refuse = (i: number, message: string): never => {
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", `messages[${i}]: ${message}`, {
      param: `messages.${i}`,
    });
  };
  const messages = b.messages.map((m, i): TemplateMessage => {
    const content = chatContentText(m, i);
    const calls = m.tool_calls ?? [];
    if (calls.length > 0 && m.role !== "assistant")
      refuse(i, "only assistant messages have tool_calls");
    if (m.role === "tool") {
      if (typeof m.tool_call_id !== "string")
        refuse(i, "a tool message needs tool_call_id (the call it answers)");
      if (content === null) refuse(i, "a tool message needs content (the call's result)");
      return { role: "tool", content, tool_call_id: m.tool_call_id! };
    }
    if (calls.length > 0)
      // A custom tool's call as a function's whose arguments are its input (as the model
      // writes it: tool-calls.ts).
      return {
        role: "assistant",
        content,
        tool_calls: calls.map((c) =>
          c.type === "custom"
            ? {
                id: c.id,
                type: "function",
                function: { name: c.custom.name, arguments: c.custom.input },
              }
            : c,
        ),
      };
    if (content === null) refuse(i, "content is required (but for an assistant's tool_calls)");
    return { role: m.role === "developer" ? "system" : m.role, content };
  });
  return withTools(messages, tools, ctx.tokenizer.templatePresentsTools, ctx.toolCallFormat);
}

/**
 * A chat request's tool plan, output format and prompt tokens (checked): the tokens its
 * completion runs on, and what POST /tokenize counts for it.
 */
export async function chatPrompt(
  ctx: ServeContext,
  b: ChatCompletionRequest,
): Promise<{ plan: ToolPlan; format: OutputFormat; prompt: number[]; continues: boolean }> {
  let plan = toolPlan(ctx, b);
  const format = outputFormat(ctx, b);
  const continues = continuesFinalMessage(b);
  if (continues && (format.grammar || plan.kind === "arguments" || b.tool_choice === "required"))
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "a continued message cannot be shaped by a response format or required tool calls (they start a new answer)",
      { param: format.grammar ? format.param! : "tool_choice" },
    );
  const addGenerationPrompt = !continues && b.add_generation_prompt !== false;
  if (format.kind === "text" && plan.kind !== "text" && b.tool_choice !== "none")
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `${format.param} with tools needs tool_choice "none" (calls are JSON; a pattern constrains text)`,
      { param: format.param! },
    );
  if (format.grammar && plan.kind !== "text") {
    // tool_choice "none": the format rules (its grammar allows no tool-call token).
    // "auto": calls, or an answer under the format (the first token chooses).
    // "required" or a named function: calls, which follow their functions' parameters.
    if (b.tool_choice === "none") plan = { kind: "text", tools: plan.tools };
    else if (plan.kind === "native" && !plan.named && (b.tool_choice ?? "auto") === "auto") {
      const either = callsOrAnswer(plan.grammar, format.grammar);
      if (either) plan = { ...plan, grammar: either, answerFormat: true };
    }
  }
  const messages = chatMessages(ctx, b, plan.tools);
  const keep = truncation(ctx, b);
  // Truncated, a prompt may be longer than the context before it is.
  if (keep === null)
    encodablePrompt(
      ctx,
      messages
        .map(
          (m) => (m.content ?? "") + (m.tool_calls ?? []).map((c) => c.function.arguments).join(""),
        )
        .join(""),
      "messages",
    );
  const kwargs = templateKwargs(b.chat_template_kwargs);
  const prompt = await ctx.encoder.encodeChat(messages, addGenerationPrompt, {
    ...(plan.tools.length ? { tools: templateTools(b.tools as unknown[], plan.tools) } : {}),
    ...(kwargs ? { kwargs } : {}),
    ...(continues ? { continueFinalMessage: true } : {}),
  });
  return { plan, format, prompt: keep === null ? prompt : lastTokens(prompt, keep), continues };
}

/**
 * The request's tools as a chat template is given them (HF's `tools=`): as sent, but a custom
 * tool as a function whose description says what its input is (templates know functions).
 */
function templateTools(given: readonly unknown[], tools: readonly ToolFunction[]): unknown[] {
  return given.map((t, i) => {
    const f = tools[i]!;
    if (!f.custom) return t;
    const input = customInputText(f.custom);
    return {
      type: "function",
      function: {
        name: f.name,
        description: f.description ? `${f.description}\n\n${input}` : input,
        parameters: { type: "string" },
      },
    };
  });
}

/**
 * Whether a chat continues its last message, an assistant's (vLLM's continue_final_message,
 * DeepSeek API's `prefix: true` on that message); refuses what cannot be continued.
 */
function continuesFinalMessage(b: ChatCompletionRequest): boolean {
  const last = b.messages.length - 1;
  const marked = b.messages.findIndex((m) => m.prefix === true);
  if (marked >= 0 && marked !== last)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "only the last message may be a prefix to continue",
      { param: `messages.${marked}.prefix` },
    );
  if (b.continue_final_message !== true && marked < 0) return false;
  const param = marked >= 0 ? `messages.${last}.prefix` : "continue_final_message";
  const refuse = (why: string): never => {
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", why, { param });
  };
  const m = b.messages[last]!;
  if (m.role !== "assistant") refuse("only an assistant's message can be continued (the last one)");
  if (m.tool_calls?.length) refuse("an assistant message with tool_calls cannot be continued");
  const content = chatContentText(m, last) ?? "";
  if (content === "") refuse("the message to continue has no content");
  if (b.add_generation_prompt === true)
    refuse("continue_final_message and add_generation_prompt cannot both be true");
  return true;
}

/** Variables the template itself sets: a request may not give them. */
const TEMPLATE_OWN = [
  "messages",
  "add_generation_prompt",
  "tools",
  "bos_token",
  "eos_token",
  "pad_token",
  "unk_token",
];

/** A request's chat_template_kwargs, checked (undefined when none). */
function templateKwargs(
  kwargs: Record<string, unknown> | null | undefined,
): Record<string, unknown> | undefined {
  if (kwargs == null) return undefined;
  const own = Object.keys(kwargs).find((k) => TEMPLATE_OWN.includes(k));
  if (own !== undefined)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `chat_template_kwargs: '${own}' is set by the gateway (send it as the request's own field)`,
      { param: "chat_template_kwargs" },
    );
  return kwargs;
}

/** What a chat request runs: its job, how its text reads, and how a choice finished. */
export interface ChatRun {
  readonly spec: JobSpec;
  readonly outputOptions: ChatOutputOptions;
  /** "tool_calls" when the calls ended, but for a named tool_choice (OpenAI's "stop"). */
  readonly finishOf: (c: Choice, output: ChatOutput) => string | null;
}

/**
 * The chat request `chat` run (chatRun), with truncation "auto" (`auto`) fitted to the
 * context first when it is too long: the fewest items dropped from the conversation's start
 * (the instructions kept, a tool's output never without its call, the last message always
 * kept) that let the prompt and max_output_tokens fit, found by bisection (a few encodings,
 * not one per item). Too long even so: the refusal of the shortest. `rename`: what a refusal
 * becomes (the fields named as the caller's API names them).
 */
export async function fittedRun(
  ctx: ServeContext,
  chat: ChatCompletionRequest,
  auto: boolean,
  rename: (err: unknown) => unknown = (err) => err,
): Promise<ChatRun> {
  const attempt = (messages: ChatMessage[]) =>
    chatRun(ctx, { ...chat, messages }).catch((err: unknown) => {
      throw rename(err);
    });
  const tooLong = (err: unknown) =>
    err instanceof ApiError && err.code === "EM_GATEWAY_PROMPT_TOO_LONG";
  let refusal: unknown;
  try {
    return await attempt(chat.messages);
  } catch (err) {
    if (!auto || !tooLong(err)) throw err;
    refusal = err;
  }
  // (the instructions, or a system message the conversation starts with, kept)
  const head = chat.messages[0]?.role === "system" && chat.messages.length > 1 ? 1 : 0;
  const rest = chat.messages.slice(head);
  // Where the kept part may start: not at a tool's output, and before the last message.
  const cuts: number[] = [];
  for (let k = 1; k < rest.length; k++) if (rest[k]!.role !== "tool") cuts.push(k);
  const at = (k: number) => [...chat.messages.slice(0, head), ...rest.slice(k)];
  let lo = 0;
  let hi = cuts.length - 1;
  let best: ChatRun | null = null;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    try {
      best = await attempt(at(cuts[mid]!));
      hi = mid - 1;
    } catch (err) {
      if (!tooLong(err)) throw err;
      refusal = err; // (when none fits: the last tried, the shortest)
      lo = mid + 1;
    }
  }
  if (best) return best;
  throw refusal;
}

/**
 * A chat request, checked, as the job it runs (chat completions and responses alike).
 * `toWindow`: a max_tokens past the rest of the context is cut to it instead of refused
 * (Anthropic's Messages).
 */
export async function chatRun(
  ctx: ServeContext,
  request: ChatCompletionRequest,
  o: { toWindow?: boolean } = {},
): Promise<ChatRun> {
  const b = withEffort(request);
  checkModel(ctx, b.model);
  unsupported(b);
  const { plan, format, prompt, continues } = await chatPrompt(ctx, b);
  // A continued answer picks up its own text: no thinking first.
  const thinks =
    !continues && requestThinks(ctx.reasoningParser, b.chat_template_kwargs ?? undefined);
  const requested = b.max_completion_tokens ?? b.max_tokens;
  const base = jobSpec(ctx, b, [prompt], requested, null, "messages", o.toWindow ?? false);
  const grammar = plan.kind !== "text" ? plan.grammar : format.grammar;
  // A grammar that shapes the answer from its first token (response_format, calls required
  // at once) lets a thinking model think first (reasoning.ts: ThinkThen).
  const shapesStart =
    grammar !== undefined &&
    ((plan.kind === "native" && plan.answerFormat === true) ||
      !(plan.kind === "native" && [undefined, "auto", "none"].includes(b.tool_choice as string)));
  const budget = thinks ? (b.thinking_token_budget ?? ctx.thinkingTokenBudget ?? null) : null;
  const spec: JobSpec = {
    ...base,
    ...(grammar ? { grammar: thinks && shapesStart ? thinkingFirst(grammar) : grammar } : {}),
    ...(budget != null ? { thinkingBudget: thinkingBudgetOf(ctx, budget) } : {}),
    ...(await predictionOf(ctx, b, base.prompts[0]!.maxTokens)),
    logprobs: b.logprobs ? (b.top_logprobs ?? 0) : null,
    ...promptLogprobsSpec(b, 0),
  };
  const outputOptions: ChatOutputOptions = {
    tools: plan.kind === "native" ? "calls" : plan.kind === "arguments" ? "arguments" : "text",
    ...(plan.kind === "arguments" ? { forced: plan.tool.name } : {}),
    custom: plan.tools.filter((f) => f.custom).map((f) => f.name),
    format: ctx.toolCallFormat,
    reasoning: thinks,
  };
  const finishOf = (c: Choice, output: ChatOutput) =>
    plan.kind === "native" && !plan.named && output.callsComplete && c.finishReason === "stop"
      ? "tool_calls"
      : c.finishReason;
  return { spec, outputOptions, finishOf };
}

/**
 * A predicted output's tokens (none for an empty one), encoded off the event loop as prompts
 * are; no more than the answer may have (`maxTokens`): the rest could never be drafted.
 */
async function predictionOf(
  ctx: ServeContext,
  b: ChatCompletionRequest,
  maxTokens: number,
): Promise<{ prediction?: number[] }> {
  const c = b.prediction?.content;
  if (c == null) return {};
  const text = typeof c === "string" ? c : c.map((p) => p.text).join("");
  const tokens = text ? (await ctx.encoder.encode(text, false)).slice(0, maxTokens) : [];
  return tokens.length > 0 ? { prediction: tokens } : {};
}

/** A chat request with its reasoning_effort applied to its template variables (effortKwargs). */
function withEffort(b: ChatCompletionRequest): ChatCompletionRequest {
  if (b.reasoning_effort == null) return b;
  const kwargs = effortKwargs(b.reasoning_effort, b.chat_template_kwargs);
  return kwargs ? { ...b, chat_template_kwargs: kwargs } : b;
}

/**
 * A thought's budget (thinking_token_budget): `</think>` as the tokenizer encodes it closes
 * one cut short; the vocabulary's bytes tell a thought closed by the model.
 */
function thinkingBudgetOf(ctx: ServeContext, budget: number): ThinkingBudgetSpec {
  const vocabulary = vocabularyFor(ctx.tokenizer, ctx.vocabSize);
  if (!vocabulary)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "thinking_token_budget needs a byte-level tokenizer (its tokens' bytes tell where a thought ends); this model's is not",
      { param: "thinking_token_budget" },
    );
  const close = "</think>";
  const closeRest = Array.from({ length: close.length }, (_, m) =>
    ctx.tokenizer.encode(close.slice(m), false),
  );
  return { budget, closeIds: closeRest[0]!, closeRest, vocabulary };
}

async function chat(
  ctx: ServeContext,
  keeping: Keeping,
  req: FastifyRequest<{ Body: ChatCompletionRequest }>,
  reply: FastifyReply,
): Promise<unknown> {
  const { spec, outputOptions, finishOf } = await chatRun(ctx, req.body);
  const b = req.body;
  const { store } = keeping;
  if (b.store === true) {
    // (refused before anything runs)
    if (!store.keeps) throw storeOff();
    const full = store.refusal();
    if (full) throw full;
  }
  const id = completionId();
  const created = Math.floor(Date.now() / 1000);
  const head = { id, created, model: ctx.servedModelName };
  const asIds = b.return_tokens_as_token_ids === true;
  const lp = (tokens: TokenLogprob[]) =>
    spec.logprobs === null ? null : { content: tokens.map((t) => chatLogprob(ctx, t, asIds)) };
  /**
   * Keeps the completion (store: true) once its job ended: not one cancelled (its client
   * left) or failed. A streamed one as it would have been answered whole.
   */
  const keep = (job: Job, completion: object) => {
    if (b.store !== true || job.choices.some((c) => c.finishReason === null)) return;
    store.put({
      owner: keeping.owner(req),
      completion: {
        ...(completion as typeof head),
        metadata: b.metadata ?? {},
        request_id: String(reply.getHeader("x-request-id") ?? ""),
        seed: b.seed ?? null,
        temperature: b.temperature ?? null,
        top_p: b.top_p ?? null,
        presence_penalty: b.presence_penalty ?? null,
        frequency_penalty: b.frequency_penalty ?? null,
        tools: b.tools ?? null,
        tool_choice: b.tool_choice ?? null,
        response_format: b.response_format ?? null,
      },
      messages: storedMessages(id, b.messages),
    });
  };
  /** The answer of a job that ended, whole (what a request without stream gets). */
  const whole = (job: Job) => {
    const thoughts: string[] = [];
    const choices = job.choices.map((c) => {
      const output = new ChatOutput(outputOptions);
      const message = output.message(c.out.text);
      if ("reasoning_content" in message) thoughts.push(message.reasoning_content as string);
      return {
        index: c.index,
        message,
        logprobs: lp(c.tokens),
        finish_reason: finishOf(c, output),
      };
    });
    const promptLps = b.prompt_logprobs;
    return {
      ...head,
      object: "chat.completion",
      choices,
      ...(promptLps != null
        ? {
            prompt_logprobs: vllmPromptLogprobs(
              ctx,
              spec.prompts[0]!.tokens,
              job.choices[0]!.promptLogprobs,
              promptLps,
            ),
          }
        : {}),
      usage: usageOf(job, reasoningTokens(ctx, outputOptions.reasoning, thoughts)),
    };
  };
  if (!b.stream) {
    const job = startJob(ctx, spec);
    bind(reply, job);
    await job.done;
    const answer = whole(job);
    keep(job, answer);
    return answer;
  }
  const chunk = (choices: unknown[]) => ({ ...head, object: "chat.completion.chunk", choices });
  let out: ReturnType<typeof sse> | null = null;
  const pending: unknown[] = [];
  const send = (o: unknown) => (out ? out.send(o) : pending.push(o));
  const outputs = new Map<number, ChatOutput>();
  /** Each choice's thinking so far, for the usage. */
  const thoughts = new Map<number, string>();
  const think = (c: Choice, ds: readonly object[]) => {
    for (const d of ds)
      if ("reasoning_content" in d)
        thoughts.set(c.index, (thoughts.get(c.index) ?? "") + (d.reasoning_content as string));
  };
  const outputOf = (c: Choice) => {
    const o = outputs.get(c.index) ?? new ChatOutput(outputOptions);
    outputs.set(c.index, o);
    return o;
  };
  const job = startJob(ctx, spec, {
    onToken: (c, t, text) => {
      const output = outputOf(c);
      const ds: object[] = output.push(text).map((d) => output.chatDelta(d));
      think(c, ds);
      if (ds.length === 0 && spec.logprobs !== null) ds.push({});
      for (const [i, delta] of ds.entries())
        send(
          chunk([
            { index: c.index, delta, logprobs: i === 0 ? lp([t]) : null, finish_reason: null },
          ]),
        );
    },
    onFinish: (c, text) => {
      const output = outputOf(c);
      const ds: object[] = [...output.push(text), ...output.end()].map((d) => output.chatDelta(d));
      think(c, ds);
      const last = ds.pop() ?? {};
      for (const delta of ds)
        send(chunk([{ index: c.index, delta, logprobs: null, finish_reason: null }]));
      send(
        chunk([
          { index: c.index, delta: last, logprobs: null, finish_reason: finishOf(c, output) },
        ]),
      );
    },
  });
  out = sse(ctx, reply);
  bind(reply, job);
  for (const c of job.choices)
    out.send(
      chunk([
        {
          index: c.index,
          delta: outputOf(c).chatDelta(outputOf(c).first()),
          logprobs: null,
          finish_reason: null,
        },
      ]),
    );
  for (const p of pending) out.send(p);
  // Usage in the last chunk always (OpenAI sends it with stream_options.include_usage).
  const ended = await streamJob(job, out, () => ({
    ...chunk([]),
    usage: usageOf(job, reasoningTokens(ctx, outputOptions.reasoning, thoughts.values())),
  }));
  if (ended) keep(job, whole(job));
  return reply;
}

/** A token's logprob entry as chat completions (and Responses' output_text) give it. */
export function chatLogprob(ctx: ServeContext, t: TokenLogprob, asIds = false) {
  // bytes: the token's own bytes (byte-level BPE), so a character split over tokens comes
  // back whole from their concatenation; its text alone decodes such a piece to U+FFFD.
  // With vLLM's return_tokens_as_token_ids, "token_id:<id>" and that string's bytes.
  const table = ctx.tokenizer.tokenBytes();
  const entry = (id: number, logprob: number) => {
    if (asIds) {
      const token = `token_id:${id}`;
      return { token, logprob, bytes: [...Buffer.from(token, "utf8")] };
    }
    const token = ctx.tokenizer.decode([id]);
    const own = table?.[id];
    return { token, logprob, bytes: [...(own ?? Buffer.from(token, "utf8"))] };
  };
  return {
    ...entry(t.id, t.logprob),
    top_logprobs: t.top.map(([id, logprob]) => entry(id, logprob)),
  };
}

// ---- completions ----

async function completion(
  ctx: ServeContext,
  req: FastifyRequest<{ Body: CompletionRequest }>,
  reply: FastifyReply,
): Promise<unknown> {
  const b = req.body;
  checkModel(ctx, b.model);
  unsupported(b);
  const fim = fillInTheMiddle(ctx, b);
  // One prompt or a batch; each text or token ids.
  const given: (string | number[])[] =
    typeof b.prompt === "string" || typeof b.prompt[0] === "number"
      ? [b.prompt as string | number[]]
      : (b.prompt as string[] | number[][]);
  const param = (i: number) => (given.length > 1 ? `prompt[${i}]` : "prompt");
  const prompts: number[][] = [];
  const suffix = fim
    ? await ctx.encoder.encode(encodablePrompt(ctx, fim.suffix, "suffix"), false)
    : null;
  // Left truncation (with a suffix, of the text before it).
  const keep = truncation(ctx, b);
  const truncated: boolean[] = [];
  for (const [i, p] of given.entries()) {
    let tokens: number[];
    if (typeof p === "string") {
      tokens = await ctx.encoder.encode(
        keep === null ? encodablePrompt(ctx, p, param(i)) : p,
        !fim,
      );
    } else {
      checkTokenIds(ctx, p, param(i));
      tokens = p;
    }
    truncated.push(keep !== null && tokens.length > keep);
    if (keep !== null) tokens = lastTokens(tokens, keep);
    // With a suffix the model writes what goes between: DeepSeek's prefix-suffix-middle form.
    prompts.push(fim ? fimPrompt(fim, tokens, suffix!) : tokens);
  }
  const echo = b.echo === true;
  const asIds = b.return_tokens_as_token_ids === true;
  const n = b.n ?? 1;
  const bestOf = bestOfOf(b, n);
  const promptLps = promptLogprobsSpec(b, echo ? (b.logprobs ?? 0) : 0);
  const spec: JobSpec = {
    ...jobSpec(ctx, b, prompts, b.max_tokens, 16, "prompt"),
    ...outputFormat(ctx, b),
    // best_of: that many choices per prompt, ranked by their tokens' summed logprobs.
    ...(bestOf > n ? { n: bestOf } : {}),
    logprobs: b.logprobs ?? (bestOf > n ? 0 : null),
    ...promptLps,
    // echo with logprobs takes the prompt's logprobs too.
    promptLogprobs: promptLps.promptLogprobs || (echo && b.logprobs != null),
  };
  const wantLogprobs = b.logprobs != null;
  const id = `cmpl-${randomBytes(12).toString("hex")}`;
  const created = Math.floor(Date.now() / 1000);
  const head = { id, object: "text_completion", created, model: ctx.servedModelName };
  const promptTexts = given.map((p, i) =>
    !echo
      ? ""
      : typeof p === "string" && !truncated[i]
        ? p
        : ctx.tokenizer.decode(prompts[i]!, true),
  );
  if (!b.stream) {
    const job = startJob(ctx, spec);
    bind(reply, job);
    await job.done;
    return {
      ...head,
      choices: bestChoices(job.choices, prompts.length, n).map(({ c, index }) => ({
        index,
        text: promptTexts[c.prompt] + c.out.text,
        logprobs: wantLogprobs
          ? completionLogprobs(ctx, c, prompts[c.prompt]!, echo, b.logprobs ?? 0, asIds)
          : null,
        finish_reason: c.finishReason,
        ...(b.prompt_logprobs != null
          ? {
              prompt_logprobs: vllmPromptLogprobs(
                ctx,
                prompts[c.prompt]!,
                c.promptLogprobs,
                b.prompt_logprobs,
              ),
            }
          : {}),
      })),
      // Every generated choice counts (as OpenAI bills best_of).
      usage: usageOf(job),
    };
  }
  let out: ReturnType<typeof sse> | null = null;
  const pending: unknown[] = [];
  const send = (o: unknown) => (out ? out.send(o) : pending.push(o));
  const choice = (
    index: number,
    text: string,
    finish: string | null,
    logprobs: unknown = null,
  ) => ({ ...head, choices: [{ index, text, logprobs, finish_reason: finish }] });
  // Per choice: the text_offset of its next token, counted over token texts as in the
  // response without streaming (the echoed prompt's tokens first).
  const offsets = new Map<number, number>();
  const logprobsAt = (c: Choice, entries: (TokenLogprob | null)[], ids: readonly number[]) => {
    const at = offsets.get(c.index) ?? 0;
    const texts = ids.map((id) => ctx.tokenizer.decode([id]));
    offsets.set(
      c.index,
      texts.reduce((n, t) => n + t.length, at),
    );
    return logprobsOf(ctx, entries, texts, at, asIds ? ids : null);
  };
  const job = startJob(ctx, spec, {
    // With logprobs, the echo waits for the prompt's logprobs (they come before the first
    // token) and carries them, as in the response without streaming.
    onPromptLogprobs: (c, lps) => {
      const prompt = prompts[c.prompt]!;
      send(
        choice(
          c.index,
          promptTexts[c.prompt]!,
          null,
          logprobsAt(c, promptEntries(prompt, lps, b.logprobs ?? 0), prompt),
        ),
      );
    },
    onToken: (c, t, text) => {
      if (text || spec.logprobs !== null)
        send(
          choice(c.index, text, null, spec.logprobs === null ? null : logprobsAt(c, [t], [t.id])),
        );
    },
    onFinish: (c, text) => send(choice(c.index, text, c.finishReason)),
  });
  out = sse(ctx, reply);
  bind(reply, job);
  if (echo && !spec.promptLogprobs)
    for (const c of job.choices) out.send(choice(c.index, promptTexts[c.prompt]!, null));
  for (const p of pending) out.send(p);
  await streamJob(job, out, () => ({ ...head, choices: [], usage: usageOf(job) }));
  return reply;
}

/**
 * `best_of` (completions): how many choices to generate per prompt, of which the `n` with the
 * highest summed token logprob are returned; n when unset. 1..16, at least n, and not with
 * `stream` when above n (OpenAI's rules; the choices must all end before one is chosen).
 */
function bestOfOf(b: CompletionRequest, n: number): number {
  const v = b.best_of;
  if (v == null) return n;
  const bad = (message: string) =>
    new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param: "best_of" });
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > 16)
    throw bad(`best_of must be an integer in 1..16, got ${JSON.stringify(v)}`);
  if (v < n) throw bad(`best_of (${v}) must be at least n (${n})`);
  if (v > n && b.stream === true) throw bad("best_of above n cannot be streamed");
  return v;
}

/**
 * Per prompt, the `n` choices with the highest summed token logprob (the earlier on ties), in
 * that order, indexed prompt * n + rank: best_of's pick (all of them when no more were made).
 */
function bestChoices(
  choices: readonly Choice[],
  prompts: number,
  n: number,
): { c: Choice; index: number }[] {
  const score = (c: Choice) => c.tokens.reduce((s, t) => s + t.logprob, 0);
  const out: { c: Choice; index: number }[] = [];
  for (let p = 0; p < prompts; p++) {
    const mine = choices.filter((c) => c.prompt === p);
    const ranked = mine.length > n ? [...mine].sort((a, b) => score(b) - score(a)) : mine;
    for (const [rank, c] of ranked.slice(0, n).entries()) out.push({ c, index: p * n + rank });
  }
  return out;
}

/** DeepSeek's fill-in-the-middle tokens: `<｜fim▁begin｜>` prefix `<｜fim▁hole｜>` suffix `<｜fim▁end｜>`. */
export const FIM_TOKENS = {
  begin: "<｜fim▁begin｜>",
  hole: "<｜fim▁hole｜>",
  end: "<｜fim▁end｜>",
} as const;

/**
 * A completion's `suffix` (fill in the middle, as DeepSeek's FIM completions): null without
 * one; with one, the suffix and the token ids that frame the prompt. Refused (400, `suffix`)
 * for a tokenizer without DeepSeek's FIM tokens, and with `echo` (the answer is a middle).
 */
function fillInTheMiddle(ctx: ServeContext, b: CompletionRequest): FimFrame | null {
  if (b.suffix == null || b.suffix === "") return null;
  if (typeof b.suffix !== "string") throw badSuffix("suffix must be a string");
  if (b.echo === true)
    throw badSuffix("suffix cannot be used with echo (the answer is the middle)");
  return fimFrame(ctx, b.suffix);
}

const badSuffix = (message: string) =>
  new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param: "suffix" });

/** A suffix and the token ids that frame a fill-in-the-middle prompt. */
export interface FimFrame {
  readonly suffix: string;
  readonly bos: readonly number[];
  readonly begin: number;
  readonly hole: number;
  readonly end: number;
}

/** The frame for `suffix`; refused (400, `suffix`) for a tokenizer without the FIM tokens. */
export function fimFrame(ctx: ServeContext, suffix: string): FimFrame {
  const t = ctx.tokenizer;
  const [begin, hole, end] = [FIM_TOKENS.begin, FIM_TOKENS.hole, FIM_TOKENS.end].map((s) =>
    t.tokenToId(s),
  );
  if (begin === undefined || hole === undefined || end === undefined)
    throw badSuffix(
      `this model's tokenizer has no fill-in-the-middle tokens (${Object.values(FIM_TOKENS).join(", ")}), so suffix is not supported`,
    );
  const bos = t.addBosToken && t.bosTokenId !== null ? [t.bosTokenId] : [];
  return { suffix, bos, begin, hole, end };
}

/** The prompt tokens and the suffix's in the frame (a prompt's own leading BOS is the frame's). */
export function fimPrompt(
  f: FimFrame,
  prompt: readonly number[],
  suffix: readonly number[],
): number[] {
  const body = f.bos.length > 0 && prompt[0] === f.bos[0] ? prompt.slice(1) : prompt;
  return [...f.bos, f.begin, ...body, f.hole, ...suffix, f.end];
}

/** OpenAI's legacy logprobs object; with echo the prompt tokens come first (first: null). */
function completionLogprobs(
  ctx: ServeContext,
  c: Choice,
  prompt: readonly number[],
  echo: boolean,
  k: number,
  asIds: boolean,
) {
  const entries: (TokenLogprob | null)[] = [];
  const ids: number[] = [];
  if (echo) {
    ids.push(...prompt);
    entries.push(...promptEntries(prompt, c.promptLogprobs, k));
  }
  for (const t of c.tokens) {
    ids.push(t.id);
    entries.push(t);
  }
  return logprobsOf(
    ctx,
    entries,
    ids.map((id) => ctx.tokenizer.decode([id])),
    0,
    asIds ? ids : null,
  );
}

/**
 * One entry per prompt token (null where there is none: the first token, or none asked),
 * with at most `k` top tokens.
 */
function promptEntries(
  prompt: readonly number[],
  lps: readonly (TokenLogprob | null)[] | null,
  k: number,
): (TokenLogprob | null)[] {
  return prompt.map((_, i) => {
    const e = lps?.[i] ?? null;
    return e && e.top.length > k ? { ...e, top: e.top.slice(0, k) } : e;
  });
}

/**
 * vLLM's prompt_logprobs: the job fields for it (none when the request does not ask),
 * beside completions' echo logprobs (`echoTop`: their top tokens). Refused with stream.
 */
function promptLogprobsSpec(
  b: Common,
  echoTop: number,
): Pick<JobSpec, "promptLogprobs" | "promptTopLogprobs" | "promptRanks"> {
  const k = b.prompt_logprobs;
  if (k == null) return { promptLogprobs: false };
  if (b.stream)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "prompt_logprobs is not available with stream: send the request without stream",
      { param: "prompt_logprobs" },
    );
  return { promptLogprobs: true, promptTopLogprobs: Math.max(k, echoTop), promptRanks: true };
}

/**
 * vLLM's prompt_logprobs answer: per prompt token (the first: null) its id -> logprob, rank
 * and text, and as much for the `k` most likely tokens there.
 */
function vllmPromptLogprobs(
  ctx: ServeContext,
  prompt: readonly number[],
  lps: readonly (TokenLogprob | null)[] | null,
  k: number,
) {
  const entry = (logprob: number, rank: number, id: number) => ({
    logprob,
    rank,
    decoded_token: ctx.tokenizer.decode([id]),
  });
  return prompt.map((id, i) => {
    const e = lps?.[i];
    if (!e) return null;
    const out: Record<string, ReturnType<typeof entry>> = {
      [id]: entry(e.logprob, e.rank ?? 0, id),
    };
    for (const [r, [t, lp]] of e.top.slice(0, k).entries()) out[t] ??= entry(lp, r + 1, t);
    return out;
  });
}

/**
 * Completions' logprobs of tokens whose texts are `texts`: offsets count those texts; with
 * `ids` (vLLM's return_tokens_as_token_ids) the tokens are named "token_id:<id>".
 */
function logprobsOf(
  ctx: ServeContext,
  entries: (TokenLogprob | null)[],
  texts: string[],
  start = 0,
  ids: readonly number[] | null = null,
) {
  let offset = start;
  const textOffset = texts.map((t) => {
    const at = offset;
    offset += t.length;
    return at;
  });
  const name = (id: number) => (ids ? `token_id:${id}` : ctx.tokenizer.decode([id]));
  return {
    tokens: ids ? ids.map(name) : texts,
    token_logprobs: entries.map((e) => (e ? e.logprob : null)),
    top_logprobs: entries.map((e) =>
      e ? Object.fromEntries(e.top.map(([id, lp]) => [name(id), lp])) : null,
    ),
    text_offset: textOffset,
  };
}
