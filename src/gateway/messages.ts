// Anthropic's Messages API (POST /v1/messages, POST /v1/messages/count_tokens), as DeepSeek's
// own platform also serves it, so that clients written for Anthropic's SDK (and tools built on
// it) talk to this gateway. A request becomes the chat completions request it means (system
// prompt, turns, tool_use and tool_result blocks as tool calls and tool messages, tools,
// tool_choice, thinking) and runs on the same machinery (openai.ts chatRun, ChatOutput); the
// answer comes back as Anthropic's content blocks (thinking, text, tool_use), streamed as its
// events (message_start, content_block_start/delta/stop, message_delta, message_stop).
// Errors are Anthropic's {"type": "error", "error": {"type", "message"}}, with our stable
// `code` and the `param` beside them. API keys: `x-api-key` (Anthropic's header) or Bearer.
import { randomBytes } from "node:crypto";
import { type Static, type TSchema, Type } from "@sinclair/typebox";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { isObject } from "../util/objects.ts";
import { type ChatDelta, ChatOutput, type ToolCallDelta } from "./chat-output.ts";
import { ApiError, refusalHeaders, renameParam, toApiError } from "./errors.ts";
import { type Choice, type Job, logServerError, type ServeContext, startJob } from "./jobs.ts";
import { bind, chatPrompt, chatRun, eventStream } from "./openai.ts";
import type { ChatCompletionRequest, ChatMessage } from "./schemas.ts";

const Block = Type.Object({ type: Type.String() }, { additionalProperties: true });
const Content = Type.Union([Type.String(), Type.Array(Block)]);
const Tool = Type.Object(
  {
    name: Type.String({ minLength: 1 }),
    description: Type.Optional(Type.String()),
    input_schema: Type.Optional(Type.Unknown()),
    type: Type.Optional(Type.String()),
  },
  { additionalProperties: true },
);
const common = {
  model: Type.String(),
  messages: Type.Array(
    Type.Object({
      role: Type.Union([Type.Literal("user"), Type.Literal("assistant")]),
      content: Content,
    }),
    { minItems: 1 },
  ),
  system: Type.Optional(Content),
  tools: Type.Optional(Type.Array(Tool)),
  tool_choice: Type.Optional(
    Type.Object(
      {
        type: Type.Union([
          Type.Literal("auto"),
          Type.Literal("any"),
          Type.Literal("tool"),
          Type.Literal("none"),
        ]),
        name: Type.Optional(Type.String()),
        disable_parallel_tool_use: Type.Optional(Type.Boolean()),
      },
      { additionalProperties: true },
    ),
  ),
  /**
   * Anthropic's structured outputs: `format` a JSON schema the answer's text follows (the
   * chat's response_format json_schema); `effort` is a hint, accepted and not acted on.
   */
  output_config: Type.Optional(
    Type.Object(
      {
        format: Type.Optional(
          Type.Union([
            Type.Object(
              {
                type: Type.Literal("json_schema"),
                schema: Type.Record(Type.String(), Type.Unknown()),
              },
              { additionalProperties: true },
            ),
            Type.Null(),
          ]),
        ),
        effort: Type.Optional(Type.Union([Type.String({ maxLength: 32 }), Type.Null()])),
      },
      { additionalProperties: true },
    ),
  ),
  thinking: Type.Optional(
    Type.Object(
      {
        // adaptive (the model decides how much) and between_tools think as enabled does,
        // without a budget.
        type: Type.Union([
          Type.Literal("enabled"),
          Type.Literal("disabled"),
          Type.Literal("adaptive"),
          Type.Literal("between_tools"),
        ]),
        budget_tokens: Type.Optional(Type.Integer({ minimum: 1 })),
        /** "omitted": thinking blocks come empty (their text left out), as Anthropic's. */
        display: Type.Optional(
          Type.Union([Type.Literal("summarized"), Type.Literal("omitted"), Type.Null()]),
        ),
      },
      { additionalProperties: true },
    ),
  ),
} satisfies Record<string, TSchema>;

/** POST /v1/messages (unknown fields, metadata and cache_control among them, are ignored). */
export const MessagesRequest = Type.Object(
  {
    ...common,
    max_tokens: Type.Integer({ minimum: 1 }),
    stop_sequences: Type.Optional(Type.Array(Type.String())),
    temperature: Type.Optional(Type.Number({ minimum: 0, maximum: 1 })),
    top_p: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 1 })),
    top_k: Type.Optional(Type.Integer({ minimum: 0 })),
    stream: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: true },
);
export type MessagesRequest = Static<typeof MessagesRequest>;
const CountRequest = Type.Object(common, { additionalProperties: true });
type CountRequest = Static<typeof CountRequest>;
type Blocks = Static<typeof Content>;
/** A content block: its type and whatever else it carries. */
type AnyBlock = { readonly type: string } & Readonly<Record<string, unknown>>;

const bad = (message: string, param: string) =>
  new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });

/** The text of a content field: a string, or its text blocks (others refused). */
function textOf(content: Blocks, param: string): string {
  if (typeof content === "string") return content;
  return (content as unknown[])
    .map((x, i) => {
      const b = (isObject(x) ? x : { type: "not an object" }) as AnyBlock;
      if (b.type !== "text" || typeof b["text"] !== "string")
        throw bad(
          `${param}[${i}]: a '${String(b.type).slice(0, 40)}' block is not supported here (text is)`,
          `${param}.${i}`,
        );
      return b["text"] as string;
    })
    .join("");
}

/** The chat completions request a Messages request means. */
export function chatRequestOfMessages(b: MessagesRequest | CountRequest): ChatCompletionRequest {
  const messages: ChatMessage[] = [];
  if (b.system !== undefined) {
    const system = textOf(b.system, "system");
    if (system) messages.push({ role: "system", content: system });
  }
  for (const [i, m] of b.messages.entries()) {
    const blocks: AnyBlock[] =
      typeof m.content === "string" ? [{ type: "text", text: m.content }] : m.content;
    let text = "";
    const calls: NonNullable<ChatMessage["tool_calls"]> = [];
    const results: ChatMessage[] = [];
    for (const [j, blk] of blocks.entries()) {
      const at = `messages.${i}.content.${j}`;
      if (blk.type === "text" && typeof blk["text"] === "string") text += blk["text"] as string;
      else if (blk.type === "tool_use" && m.role === "assistant") {
        const { id, name, input } = blk as { id?: unknown; name?: unknown; input?: unknown };
        if (typeof id !== "string" || typeof name !== "string")
          throw bad("a tool_use block needs an id and a name", at);
        calls.push({
          id,
          type: "function",
          function: { name, arguments: JSON.stringify(input ?? {}) },
        });
      } else if (blk.type === "tool_result" && m.role === "user") {
        const { tool_use_id: id, content } = blk as { tool_use_id?: unknown; content?: unknown };
        if (typeof id !== "string") throw bad("a tool_result block needs a tool_use_id", at);
        const out =
          content === undefined
            ? ""
            : typeof content === "string" || Array.isArray(content)
              ? textOf(content as Blocks, `${at}.content`)
              : "";
        results.push({ role: "tool", tool_call_id: id, content: out });
      } else if (blk.type === "thinking" || blk.type === "redacted_thinking") {
        // Earlier turns' thinking: the chat templates leave it out of the prompt.
      } else
        throw bad(
          `a '${blk.type.slice(0, 40)}' block is not supported in a ${m.role} turn (text${m.role === "user" ? ", tool_result" : ", tool_use, thinking"} are)`,
          at,
        );
    }
    if (m.role === "user") {
      messages.push(...results);
      if (text || results.length === 0) messages.push({ role: "user", content: text });
    } else if (calls.length > 0) {
      messages.push({ role: "assistant", content: text || null, tool_calls: calls });
    } else messages.push({ role: "assistant", content: text });
  }
  const tools = (b.tools ?? []).map((t, i) => {
    if (t.type !== undefined && t.type !== "custom")
      throw bad(
        `tools[${i}]: '${t.type.slice(0, 40)}' tools are Anthropic's own; only client tools (name, input_schema) are supported`,
        `tools.${i}.type`,
      );
    return {
      type: "function" as const,
      function: {
        name: t.name,
        ...(t.description !== undefined ? { description: t.description } : {}),
        parameters: t.input_schema ?? { type: "object" },
      },
    };
  });
  const choice = b.tool_choice;
  if (choice?.type === "tool" && !choice.name)
    throw bad("tool_choice {type: 'tool'} needs the tool's name", "tool_choice.name");
  const toolChoice =
    choice === undefined || tools.length === 0
      ? undefined
      : choice.type === "auto"
        ? "auto"
        : choice.type === "any"
          ? "required"
          : choice.type === "none"
            ? "none"
            : { type: "function", function: { name: choice.name } };
  const thinking = b.thinking?.type;
  const format = b.output_config?.format;
  const r = b as Partial<MessagesRequest>;
  // Anthropic's prefill: a last assistant turn is the start of the answer, continued.
  const final = messages.at(-1);
  const prefill = final?.role === "assistant" && !final.tool_calls;
  return {
    model: b.model,
    messages,
    ...(prefill ? { continue_final_message: true } : {}),
    ...(r.max_tokens !== undefined ? { max_completion_tokens: r.max_tokens } : {}),
    ...(r.stop_sequences?.length ? { stop: r.stop_sequences } : {}),
    ...(r.temperature !== undefined ? { temperature: r.temperature } : {}),
    ...(r.top_p !== undefined ? { top_p: r.top_p } : {}),
    ...(r.top_k !== undefined && r.top_k > 0 ? { top_k: r.top_k } : {}),
    ...(tools.length ? { tools } : {}),
    ...(toolChoice !== undefined ? { tool_choice: toolChoice } : {}),
    ...(choice?.disable_parallel_tool_use ? { parallel_tool_calls: false } : {}),
    ...(format
      ? {
          response_format: {
            type: "json_schema",
            json_schema: { name: "output", schema: format.schema, strict: true },
          },
        }
      : {}),
    // A hybrid model (V3.1) thinks when asked; R1 thinks whatever the request says.
    ...(thinking ? { chat_template_kwargs: { thinking: thinking !== "disabled" } } : {}),
    // Its budget bounds the thought (reasoning.ts ThinkingBudget), as Anthropic's does.
    ...(thinking === "enabled" && b.thinking?.budget_tokens != null
      ? { thinking_token_budget: b.thinking.budget_tokens }
      : {}),
  } as ChatCompletionRequest;
}

/** A chat field a refusal names, as the Messages field it came from. */
const PARAMS: [RegExp, string][] = [
  [/^(max_tokens|max_completion_tokens)$/, "max_tokens"],
  [/^stop(\.|$)/, "stop_sequences"],
  [/^tools\.(\d+)\.function\.parameters/, "tools.$1.input_schema"],
  [/^tools\.(\d+)\.function\.name/, "tools.$1.name"],
  [/^chat_template_kwargs/, "thinking"],
  [/^thinking_token_budget$/, "thinking.budget_tokens"],
  [/^continue_final_message$/, "messages"],
  [/^response_format.*$/, "output_config.format"],
];

/** Anthropic's error type for an HTTP status. */
function errorType(status: number): string {
  if (status === 401) return "authentication_error";
  if (status === 403) return "permission_error";
  if (status === 404) return "not_found_error";
  if (status === 413) return "request_too_large";
  if (status === 429) return "rate_limit_error";
  if (status === 503) return "overloaded_error";
  if (status >= 500) return "api_error";
  return "invalid_request_error";
}

function errorBody(e: ApiError) {
  return {
    type: "error",
    error: {
      type: errorType(e.status),
      message: e.message,
      code: e.code,
      ...(e.param ? { param: e.param } : {}),
    },
  };
}

type StopReason = "end_turn" | "max_tokens" | "stop_sequence" | "tool_use";

/** Why a choice ended, in Anthropic's words, and the stop sequence that ended it. */
function stopOf(
  c: Choice,
  calls: number,
): { stop_reason: StopReason; stop_sequence: string | null } {
  if (c.finishReason === "length") return { stop_reason: "max_tokens", stop_sequence: null };
  if (calls > 0) return { stop_reason: "tool_use", stop_sequence: null };
  if (c.out.stoppedBy !== null)
    return { stop_reason: "stop_sequence", stop_sequence: c.out.stoppedBy };
  return { stop_reason: "end_turn", stop_sequence: null };
}

/**
 * Anthropic's usage; with a thought, its tokens (`thought` encoded again, near enough) as
 * output_tokens_details.thinking_tokens.
 */
const usageOf = (ctx: ServeContext, job: Job, thought = "") => ({
  input_tokens: job.promptTokens - job.cachedTokens,
  cache_creation_input_tokens: 0,
  cache_read_input_tokens: job.cachedTokens,
  output_tokens: job.completionTokens,
  ...(thought
    ? { output_tokens_details: { thinking_tokens: ctx.tokenizer.encode(thought, false).length } }
    : {}),
});

/** The parsed arguments of a call (null when cut short: not valid JSON). */
function inputOf(args: string): unknown {
  try {
    return JSON.parse(args || "{}");
  } catch {
    return null;
  }
}

/**
 * The routes plugin; `more`: routes registered in its scope, so that their errors are
 * Anthropic's too (the Message Batches API, message-batches.ts).
 */
export function messagesRoutes(ctx: ServeContext, more?: (app: FastifyInstance) => Promise<void>) {
  return async (app: FastifyInstance) => {
    app.setErrorHandler((err, req, reply) => {
      const e = toApiError(renameParam(err, PARAMS));
      logServerError(ctx, `${req.method} ${req.url}`, err);
      reply.headers(refusalHeaders(e));
      reply.status(e.status).send(errorBody(e));
    });
    if (more) await app.register(more);
    app.post<{ Body: CountRequest }>(
      "/v1/messages/count_tokens",
      { schema: { body: CountRequest } },
      async (req) => {
        const chat = chatRequestOfMessages(req.body);
        const { prompt } = await chatPrompt(ctx, chat);
        return { input_tokens: prompt.length };
      },
    );
    app.post<{ Body: MessagesRequest }>(
      "/v1/messages",
      { schema: { body: MessagesRequest } },
      (req, reply) => messages(ctx, req, reply),
    );
  };
}

async function messages(
  ctx: ServeContext,
  req: FastifyRequest<{ Body: MessagesRequest }>,
  reply: FastifyReply,
): Promise<unknown> {
  const b = req.body;
  const { spec, outputOptions } = await chatRun(ctx, chatRequestOfMessages(b));
  /** display "omitted": thinking blocks without their text. */
  const omitted = b.thinking?.display === "omitted";
  const id = `msg_${randomBytes(12).toString("hex")}`;
  const head = { id, type: "message", role: "assistant", model: ctx.servedModelName };
  if (!b.stream) {
    const job = startJob(ctx, spec);
    bind(reply, job);
    await job.done;
    const c = job.choices[0]!;
    const m = new ChatOutput(outputOptions).message(c.out.text) as {
      content: string | null;
      reasoning_content?: string;
      tool_calls?: { id: string; function: { name: string; arguments: string } }[];
    };
    const content: object[] = [];
    if (m.reasoning_content)
      content.push({
        type: "thinking",
        thinking: omitted ? "" : m.reasoning_content,
        signature: "",
      });
    if (m.content) content.push({ type: "text", text: m.content });
    let calls = 0;
    for (const t of m.tool_calls ?? []) {
      const input = inputOf(t.function.arguments);
      if (input === null) continue; // cut by max_tokens: stop_reason says so
      content.push({ type: "tool_use", id: t.id, name: t.function.name, input });
      calls++;
    }
    return {
      ...head,
      content,
      ...stopOf(c, calls),
      usage: usageOf(ctx, job, m.reasoning_content),
    };
  }

  // Streamed: Anthropic's events, each `event: <type>` and its JSON.
  let raw: FastifyReply["raw"] | null = null;
  const pending: string[] = [];
  const event = (o: { type: string }) => `event: ${o.type}\ndata: ${JSON.stringify(o)}\n\n`;
  const send = (o: { type: string }) => {
    if (raw === null) pending.push(event(o));
    else if (!raw.destroyed) raw.write(event(o));
  };
  const blocks = new BlockStream(send, omitted);
  const output = new ChatOutput(outputOptions);
  // A forced call (tool_choice naming a tool): its block opens first.
  const forced = output.first()["tool_calls"];
  if (Array.isArray(forced)) blocks.push([{ tool_calls: forced as ToolCallDelta[] }]);
  let stop: ReturnType<typeof stopOf> | null = null;
  const job = startJob(ctx, spec, {
    onToken: (_c, _t, text) => blocks.push(output.push(text)),
    onFinish: (c, text) => {
      blocks.push([...output.push(text), ...output.end()]);
      blocks.close();
      stop = stopOf(c, blocks.calls);
    },
  });
  // Admitted (no 4xx left to answer): the events start.
  raw = eventStream(reply);
  bind(reply, job);
  raw.write(
    event({
      type: "message_start",
      message: {
        ...head,
        content: [],
        stop_reason: null,
        stop_sequence: null,
        usage: { ...usageOf(ctx, job), output_tokens: 0 },
      },
    } as { type: string }),
  );
  for (const e of pending) raw.write(e);
  try {
    await job.done;
    // The whole usage again: message_start's came before the prefix cache was looked up.
    send({
      type: "message_delta",
      delta: stop ?? { stop_reason: "end_turn", stop_sequence: null },
      usage: usageOf(ctx, job, blocks.thought),
    } as { type: string });
    send({ type: "message_stop" });
  } catch (err) {
    send(errorBody(toApiError(err)));
  }
  if (!raw.destroyed) raw.end();
  return reply;
}

/**
 * Chat deltas as Anthropic's content blocks: a block starts when the kind of output changes
 * (thinking, text, each tool call) and stops when the next starts or the answer ends. Text
 * that is only whitespace waits until more text comes (it is dropped before a call, as the
 * chat answer's null content).
 */
class BlockStream {
  readonly #send: (o: { type: string }) => void;
  #index = -1;
  #kind: "thinking" | "text" | "tool_use" | null = null;
  #blank = "";
  /** The current call's JSON has begun (past its leading whitespace). */
  #inJson = false;
  /** Tool calls started. */
  calls = 0;
  /** The thought so far (omitted or not). */
  thought = "";

  readonly #omitted: boolean;

  /** `omitted`: thinking blocks start and stop with no thinking_delta (display "omitted"). */
  constructor(send: (o: { type: string }) => void, omitted = false) {
    this.#send = send;
    this.#omitted = omitted;
  }

  push(deltas: readonly ChatDelta[]): void {
    for (const d of deltas) {
      if ("reasoning_content" in d) {
        if (!d.reasoning_content) continue;
        this.thought += d.reasoning_content;
        this.#open("thinking", { type: "thinking", thinking: "", signature: "" });
        if (!this.#omitted) this.#delta({ type: "thinking_delta", thinking: d.reasoning_content });
      } else if ("content" in d) {
        const text = this.#blank + d.content;
        if (text.trim() === "" && this.#kind !== "text") {
          this.#blank = text;
          continue;
        }
        this.#blank = "";
        this.#open("text", { type: "text", text: "" });
        this.#delta({ type: "text_delta", text });
      } else
        for (const t of d.tool_calls) {
          if (t.id !== undefined) {
            this.#blank = "";
            this.#stop();
            this.calls++;
            this.#start("tool_use", {
              type: "tool_use",
              id: t.id,
              name: t.function.name,
              input: {},
            });
            this.#inJson = false;
          }
          // Whitespace before the arguments' JSON is left out: clients parse the partial
          // JSON as it comes, and Anthropic's never starts with it.
          const json = this.#inJson ? t.function.arguments : t.function.arguments.trimStart();
          if (!json) continue;
          this.#inJson = true;
          this.#delta({ type: "input_json_delta", partial_json: json });
        }
    }
  }

  close(): void {
    this.#stop();
  }

  #open(kind: "thinking" | "text", block: object): void {
    if (this.#kind === kind) return;
    this.#stop();
    this.#start(kind, block);
  }

  #start(kind: "thinking" | "text" | "tool_use", block: object): void {
    this.#kind = kind;
    this.#index++;
    this.#send({ type: "content_block_start", index: this.#index, content_block: block } as {
      type: string;
    });
  }

  #delta(delta: object): void {
    this.#send({ type: "content_block_delta", index: this.#index, delta } as { type: string });
  }

  #stop(): void {
    if (this.#kind === null) return;
    this.#send({ type: "content_block_stop", index: this.#index } as { type: string });
    this.#kind = null;
  }
}
