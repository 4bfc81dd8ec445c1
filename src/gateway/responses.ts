// POST /v1/responses: OpenAI's Responses API over the chat machinery. A request becomes
// the chat request it stands for (instructions as the system message, input items as
// messages, function tools and text.format as tools and response_format), runs as that
// chat would, and its answer is read into output items: the model's thinking as a
// "reasoning" item, its text as a "message", its calls as "function_call" items; streamed
// as Responses events (response.created ... response.completed). Responses are kept in
// this gateway's memory (store, the default; the last --responses-store of them), so a
// request can continue one (previous_response_id), GET/DELETE /v1/responses/{id} find it
// and GET /v1/responses/{id}/input_items lists its input; another gateway does not know it
// (spec.gateway.sessionAffinity: ClientIP helps), unless the gateways share a files folder
// (response-files.ts). With API keys, each key finds only the responses made with it, as
// with files and batches. background: true answers at once and runs on (poll GET;
// POST /v1/responses/{id}/cancel stops it).
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { setTimeout as sleep } from "node:timers/promises";
import { type Static, type TSchema, Type } from "@sinclair/typebox";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY } from "../model/generation-config.ts";
import { isObject } from "../util/objects.ts";
import { type ChatDelta, ChatOutput } from "./chat-output.ts";
import {
  type CompactBody,
  compact,
  compactedConversation,
  compactionItem,
  compactThreshold,
  decodeCompaction,
  lastTurnStart,
  leftReply,
  type SummaryOptions,
  type SummaryUsage,
  summarize,
  userTexts,
} from "./compaction.ts";
import { ContentPart, textOfParts } from "./content-parts.ts";
import type { Conversations } from "./conversations.ts";
import { withInputFiles } from "./documents.ts";
import { ApiError, renameParam, toApiError } from "./errors.ts";
import type { FileStore } from "./files.ts";
import { type Choice, type Job, type JobHooks, type ServeContext, startJob } from "./jobs.ts";
import {
  bind,
  type ChatRun,
  chatLogprob,
  chatPrompt,
  checkModel,
  eventStream,
  fittedRun,
  temperatureOf,
  usageOf,
} from "./openai.ts";
import { effortKwargs, requestThinks } from "./reasoning.ts";
import { EventLog, sseOf, terminalType } from "./response-events.ts";
import { HEARTBEAT_MS, isRunning, lostOf, MARK_POLL_MS, ResponseFiles } from "./response-files.ts";
import { type ChatCompletionRequest, type ChatMessage, VLLM_OUTPUT_FIELDS } from "./schemas.ts";

const Nullable = <T extends TSchema>(t: T) => Type.Union([t, Type.Null()]);

/** A tool's output: text, or content parts (text read; an image or a file refused by name). */
const ToolOutput = Type.Union([Type.String(), Type.Array(ContentPart)]);

/** An input item: a message (type "message" or none), a call of the history, its output. */
export const InputItem = Type.Union([
  Type.Object({
    type: Type.Optional(Type.Literal("message")),
    role: Type.Union([
      Type.Literal("user"),
      Type.Literal("system"),
      Type.Literal("developer"),
      Type.Literal("assistant"),
    ]),
    // (parts of any type: chatRequestOf refuses those that are not text, naming them)
    content: Type.Union([Type.String(), Type.Array(ContentPart, { minItems: 1 })]),
  }),
  Type.Object({
    type: Type.Literal("function_call"),
    call_id: Type.String({ minLength: 1 }),
    name: Type.String({ minLength: 1 }),
    arguments: Type.String(),
    /** A namespace tool's function (its `name` within the namespace). */
    namespace: Type.Optional(Type.String({ minLength: 1 })),
  }),
  Type.Object({
    type: Type.Literal("function_call_output"),
    /**
     * Absent for an output a tool gave without a call (named by `name` and `namespace`:
     * Codex CLI sends its agent's goal so), read as a tool's output all the same.
     */
    call_id: Type.Optional(Nullable(Type.String({ minLength: 1 }))),
    name: Type.Optional(Nullable(Type.String({ minLength: 1 }))),
    namespace: Type.Optional(Nullable(Type.String({ minLength: 1 }))),
    output: ToolOutput,
  }),
  Type.Object({
    type: Type.Literal("custom_tool_call"),
    call_id: Type.String({ minLength: 1 }),
    name: Type.String({ minLength: 1 }),
    input: Type.String(),
    namespace: Type.Optional(Type.String({ minLength: 1 })),
  }),
  Type.Object({
    type: Type.Literal("custom_tool_call_output"),
    call_id: Type.String({ minLength: 1 }),
    output: ToolOutput,
  }),
  // An earlier answer's thinking: DeepSeek's templates drop it from the history anyway.
  Type.Object({ type: Type.Literal("reasoning") }),
  // What POST /v1/responses/compact made of the conversation before it (compaction.ts).
  Type.Object({
    type: Type.Literal("compaction"),
    encrypted_content: Type.String({ minLength: 1 }),
  }),
]);

export const ResponsesRequest = Type.Object({
  model: Type.String({ minLength: 1 }),
  input: Type.Union([Type.String(), Type.Array(InputItem, { minItems: 1 })]),
  instructions: Type.Optional(Nullable(Type.String())),
  max_output_tokens: Type.Optional(Nullable(Type.Integer({ minimum: 1 }))),
  temperature: Type.Optional(Nullable(Type.Number({ minimum: 0, maximum: 2 }))),
  top_p: Type.Optional(Nullable(Type.Number({ exclusiveMinimum: 0, maximum: 1 }))),
  stream: Type.Optional(Nullable(Type.Boolean())),
  /** Function tools, flat ({type, name, description, parameters, strict}). */
  tools: Type.Optional(Nullable(Type.Array(Type.Record(Type.String(), Type.Unknown())))),
  tool_choice: Type.Optional(Type.Unknown()),
  parallel_tool_calls: Type.Optional(Nullable(Type.Boolean())),
  text: Type.Optional(
    Nullable(
      Type.Object({
        format: Type.Optional(Nullable(Type.Record(Type.String(), Type.Unknown()))),
        /** A length hint of OpenAI's models: accepted and echoed, it changes nothing here. */
        verbosity: Type.Optional(
          Nullable(Type.Union([Type.Literal("low"), Type.Literal("medium"), Type.Literal("high")])),
        ),
      }),
    ),
  ),
  previous_response_id: Type.Optional(Nullable(Type.String())),
  /** A conversation (conversations.ts) this continues, and adds its input and output to. */
  conversation: Type.Optional(
    Nullable(
      Type.Union([
        Type.String({ minLength: 1 }),
        Type.Object({ id: Type.String({ minLength: 1 }) }),
      ]),
    ),
  ),
  /** "message.output_text.logprobs" (with top_logprobs); "reasoning.encrypted_content" is ignored. */
  include: Type.Optional(Nullable(Type.Array(Type.String()))),
  /** Answer at once (status queued) and run on; poll GET, or POST .../cancel. */
  background: Type.Optional(Nullable(Type.Boolean())),
  top_logprobs: Type.Optional(Nullable(Type.Integer({ minimum: 0, maximum: 20 }))),
  store: Type.Optional(Nullable(Type.Boolean())),
  metadata: Type.Optional(Nullable(Type.Record(Type.String(), Type.String()))),
  /** Effort "minimal"/"none" (or no field): no thinking asked for; others ask for it (V3.1). */
  reasoning: Type.Optional(
    Nullable(
      Type.Object({
        effort: Type.Optional(Nullable(Type.String())),
        /** Echoed; the thought is given whole (reasoning items' content), not summarized. */
        summary: Type.Optional(Nullable(Type.String())),
      }),
    ),
  ),
  /**
   * Fields of OpenAI's that change nothing here, accepted and echoed in the response:
   * caching and safety identifiers, the tier (every request is served alike: "default"),
   * and the most built-in tool calls (this gateway runs none).
   */
  user: Type.Optional(Nullable(Type.String())),
  prompt_cache_key: Type.Optional(Nullable(Type.String())),
  safety_identifier: Type.Optional(Nullable(Type.String())),
  service_tier: Type.Optional(Nullable(Type.String())),
  max_tool_calls: Type.Optional(Nullable(Type.Integer({ minimum: 0 }))),
  /** vLLM's extensions, as on chat completions. */
  seed: Type.Optional(Nullable(Type.Integer())),
  top_k: Type.Optional(Nullable(Type.Integer({ minimum: -1 }))),
  min_p: Type.Optional(Nullable(Type.Number({ minimum: 0, maximum: 1 }))),
  repetition_penalty: Type.Optional(
    Nullable(Type.Number({ minimum: MIN_REPETITION_PENALTY, maximum: MAX_REPETITION_PENALTY })),
  ),
  priority: Type.Optional(Nullable(Type.Integer({ minimum: -(2 ** 31), maximum: 2 ** 31 - 1 }))),
  cache_salt: Type.Optional(Nullable(Type.String({ minLength: 1, maxLength: 1024 }))),
  chat_template_kwargs: Type.Optional(Nullable(Type.Record(Type.String(), Type.Unknown()))),
  /**
   * "auto": a conversation too long for the context loses items from its start until it
   * fits (fitted); "disabled" (the default): it is refused (400 EM_GATEWAY_PROMPT_TOO_LONG).
   */
  truncation: Type.Optional(Nullable(Type.Union([Type.Literal("auto"), Type.Literal("disabled")]))),
  /** vLLM's, as on chat completions: the most tokens the thought may take. */
  thinking_token_budget: Type.Optional(Nullable(Type.Integer({ minimum: 0 }))),
  /**
   * [{type: "compaction", compact_threshold?}]: a prompt of that many tokens or more has its
   * conversation compacted before the answer (compaction.ts; checked there, with clear
   * refusals, hence unknown here).
   */
  context_management: Type.Optional(Type.Unknown()),
  ...VLLM_OUTPUT_FIELDS,
});
export type ResponsesRequest = Static<typeof ResponsesRequest>;

/** POST /v1/responses/compact: a conversation (input, after a previous response's) to compact. */
const CompactRequest = Type.Object({
  model: Type.Optional(Nullable(Type.String({ minLength: 1 }))),
  input: Type.Optional(Nullable(Type.Union([Type.String(), Type.Array(InputItem)]))),
  instructions: Type.Optional(Nullable(Type.String())),
  previous_response_id: Type.Optional(Nullable(Type.String())),
});

/**
 * POST /v1/responses/input_tokens: the fields of a response whose prompt is counted, the
 * model optional (OpenAI's).
 */
const InputTokensRequest = Type.Object({
  ...ResponsesRequest.properties,
  model: Type.Optional(Nullable(Type.String({ minLength: 1 }))),
});
type InputTokensRequest = Static<typeof InputTokensRequest>;

/** How long a cancel waits for another gateway to stop the response it runs. */
const CANCEL_WAIT_MS = 15_000;

const bad = (message: string, param: string): ApiError =>
  new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });

/**
 * A kept response: the conversation up to and including its answer, the response, and its
 * request's input as items with ids (GET /v1/responses/{id}/input_items).
 */
export interface Kept {
  readonly conversation: readonly ChatMessage[];
  readonly response: object;
  readonly inputItems: readonly InputListItem[];
  /**
   * Who made it (files.ts ownerOf of the request's key; "" without keys): only they find it.
   * Absent in a file kept before responses had owners: as "".
   */
  readonly owner?: string;
}

/**
 * Where a gateway keeps responses: its memory (ResponseStore), or the files folder it shares
 * with the other gateways (ResponseFiles). `capacity` 0: none kept.
 */
export interface KeptResponses {
  readonly capacity: number;
  get(id: string): Kept | undefined;
  put(id: string, kept: Kept): void;
  /** Removes response `id` and its events. */
  delete(id: string): boolean;
  /** A new log for background response `id`'s events, kept as this store keeps them. */
  eventLog(id: string): EventLog;
  /**
   * Background response `id`'s kept events after number `after`, followed until its last
   * (`ended`: the response as kept once it is no longer in_progress, else null); undefined
   * when none are kept.
   */
  events(
    id: string,
    after: number,
    ended: () => object | null,
    signal: AbortSignal,
  ): AsyncGenerator<string> | undefined;
}

/** An input item as GET /v1/responses/{id}/input_items lists it. */
export type InputListItem = { readonly id: string; readonly type: string } & Record<
  string,
  unknown
>;

/**
 * Query of GET /v1/responses/{id}/input_items (OpenAI's: newest first unless order=asc).
 * Query values are strings (the gateway's schemas do not coerce types): limit is digits.
 */
const InputItemsQuery = Type.Object({
  limit: Type.Optional(Type.String({ pattern: "^(100|[1-9][0-9]?)$" })),
  order: Type.Optional(Type.Union([Type.Literal("asc"), Type.Literal("desc")])),
  after: Type.Optional(Type.String()),
  include: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String())])),
});
type InputItemsQuery = Static<typeof InputItemsQuery>;

/**
 * A page of items (ids first: a response's input items, a conversation's), as OpenAI's
 * lists are: newest first unless order=asc, `limit` (default 20) after item `after` of
 * `holder`'s (400 `after` when it has none such).
 */
export function itemsPage(
  items: readonly InputListItem[],
  q: { limit?: string | undefined; order?: "asc" | "desc" | undefined; after?: string | undefined },
  holder: string,
) {
  const limit = q.limit === undefined ? 20 : Number(q.limit);
  let ordered = q.order === "asc" ? [...items] : [...items].reverse();
  if (q.after !== undefined) {
    const at = ordered.findIndex((i) => i.id === q.after);
    if (at < 0) throw bad(`${holder.slice(0, 100)} has no item '${q.after.slice(0, 80)}'`, "after");
    ordered = ordered.slice(at + 1);
  }
  const data = ordered.slice(0, limit);
  return {
    object: "list",
    data,
    first_id: data[0]?.id ?? null,
    last_id: data.at(-1)?.id ?? null,
    has_more: ordered.length > limit,
  };
}

/**
 * Query of GET /v1/responses/{id}: stream=true sends a background response's events (from
 * the start, or after number starting_after) until its last; include is accepted, as for a
 * request.
 */
const RetrieveQuery = Type.Object({
  stream: Type.Optional(Type.Union([Type.Literal("true"), Type.Literal("false")])),
  starting_after: Type.Optional(Type.String({ pattern: "^(0|[1-9][0-9]{0,8})$" })),
  include: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String())])),
  include_obfuscation: Type.Optional(Type.Union([Type.Literal("true"), Type.Literal("false")])),
});
type RetrieveQuery = Static<typeof RetrieveQuery>;

/**
 * The last `capacity` responses of this gateway, by id, holding at most `maxChars`
 * characters of conversations and responses in all (least recently used out first).
 */
export class ResponseStore implements KeptResponses {
  readonly capacity: number;
  readonly maxChars: number;
  readonly #kept = new Map<string, Kept & { chars: number }>();
  /** Background responses' events, as long as their responses (counted with them). */
  readonly #logs = new Map<string, EventLog>();
  #chars = 0;

  constructor(capacity: number, maxChars = 128 * 2 ** 20) {
    this.capacity = capacity;
    this.maxChars = maxChars;
  }

  get size(): number {
    return this.#kept.size;
  }

  /** Characters held (conversations and responses, as JSON). */
  get chars(): number {
    return this.#chars;
  }

  get(id: string): Kept | undefined {
    const k = this.#kept.get(id);
    if (k) {
      this.#kept.delete(id);
      this.#kept.set(id, k);
    }
    return k;
  }

  put(id: string, kept: Kept): void {
    const chars =
      JSON.stringify(kept.conversation).length +
      JSON.stringify(kept.response).length +
      JSON.stringify(kept.inputItems).length +
      (this.#logs.get(id)?.chars ?? 0);
    if (this.capacity < 1 || chars > this.maxChars) {
      this.delete(id); // (not left as it was: a running response's first state)
      return;
    }
    this.#forget(id);
    this.#kept.set(id, { ...kept, chars });
    this.#chars += chars;
    while (this.#kept.size > this.capacity || this.#chars > this.maxChars)
      this.#evict(this.#kept.keys().next().value!);
  }

  /** Pushed out: the response, and its events unless it still runs (its end keeps both). */
  #evict(id: string): void {
    if (this.#logs.get(id)?.ended !== false) this.#logs.delete(id);
    this.#forget(id);
  }

  delete(id: string): boolean {
    this.#logs.delete(id);
    return this.#forget(id);
  }

  #forget(id: string): boolean {
    const k = this.#kept.get(id);
    if (!k) return false;
    this.#kept.delete(id);
    this.#chars -= k.chars;
    return true;
  }

  eventLog(id: string): EventLog {
    const log = new EventLog();
    if (this.capacity > 0) this.#logs.set(id, log);
    return log;
  }

  events(id: string, after: number, _ended: () => object | null, signal: AbortSignal) {
    return this.#logs.get(id)?.follow(after, signal);
  }
}

const notFound = (id: string, param: string | null) =>
  new ApiError(
    "EM_GATEWAY_RESPONSE_NOT_FOUND",
    `no response '${id.slice(0, 80)}' here: it was not stored (store: false), was deleted or pushed out by newer ones, or another gateway answered it`,
    { param },
  );

/** A namespace tool's function or custom tool, as its call items name it. */
interface Namespaced {
  readonly namespace: string;
  readonly name: string;
}

/**
 * The name the model knows a namespace's tool by: `<namespace>__<name>` (the chat's tools
 * are flat; `__` as MCP clients join a server's name and its tool's).
 */
const qualified = (namespace: string | undefined, name: string): string =>
  namespace ? `${namespace}__${name}` : name;

/** A tool_choice's (or allowed tool's) name, with its namespace when it names one. */
const qualifiedOf = (t: { name?: unknown; namespace?: unknown }): unknown =>
  typeof t.namespace === "string" && typeof t.name === "string"
    ? qualified(t.namespace, t.name)
    : t.name;

/**
 * The request's tools with each namespace tool's tools in its place, named as the model
 * knows them (qualified), the namespace's description before each one's; `param`: where
 * each came from; `from`: a namespace's tool, as its calls are named.
 */
function flatTools(
  tools: readonly Record<string, unknown>[],
): { tool: Record<string, unknown>; param: string; from?: Namespaced }[] {
  return tools.flatMap((t, i) => {
    if (t["type"] !== "namespace") return [{ tool: t, param: `tools.${i}` }];
    const {
      name,
      description,
      tools: inner,
    } = t as {
      name?: unknown;
      description?: unknown;
      tools?: unknown;
    };
    if (typeof name !== "string" || !/^[a-zA-Z0-9_-]+$/.test(name))
      throw bad("a namespace tool's name is letters, digits, _ and -", `tools.${i}.name`);
    if (!Array.isArray(inner) || inner.length === 0)
      throw bad("a namespace tool holds function or custom tools: tools", `tools.${i}.tools`);
    return inner.map((x: unknown, k) => {
      const param = `tools.${i}.tools.${k}`;
      if (!isObject(x) || (x["type"] !== "function" && x["type"] !== "custom"))
        throw bad("a namespace tool holds function and custom tools only", param);
      const full = qualified(name, String(x["name"]));
      if (full.length > 64)
        throw bad(
          `'${full.slice(0, 80)}': a namespace's name and its tool's, joined by '__', are at most 64 characters (the model calls it by that name)`,
          `${param}.name`,
        );
      const about = [description, x["description"]].filter((d) => typeof d === "string" && d);
      return {
        tool: { ...x, name: full, ...(about.length ? { description: about.join("\n\n") } : {}) },
        param,
        from: { namespace: name, name: String(x["name"]) },
      };
    });
  });
}

/** The namespace tools' functions by the names the model calls them (flatTools). */
const namespacesOf = (tools: readonly Record<string, unknown>[] | null | undefined) =>
  new Map(
    flatTools(tools ?? []).flatMap((f) => (f.from ? [[f.tool["name"] as string, f.from]] : [])),
  );

/**
 * The chat request a Responses request stands for (after the conversation `before` it,
 * the previous response's), and the conversation without its instructions (what a
 * response continuing it carries over).
 */
export function chatRequestOf(
  b: ResponsesRequest,
  before: readonly ChatMessage[] = [],
): { chat: ChatCompletionRequest; conversation: ChatMessage[] } {
  // (a stored prompt would shape the answer: refused, not ignored)
  if ((b as { prompt?: unknown }).prompt != null)
    throw bad(
      "prompt: reusable prompts (kept by OpenAI, named by id) are not kept by this gateway; send their text as instructions and input",
      "prompt",
    );
  let messages: ChatMessage[] = [...before];
  const items =
    typeof b.input === "string" ? [{ role: "user" as const, content: b.input }] : b.input;
  // (an input of reasoning items alone says nothing)
  if (items.every((i) => i.type === "reasoning")) throw bad("input has no message", "input");
  for (const [j, item] of items.entries()) {
    if (!("type" in item) || item.type === undefined || item.type === "message") {
      const m = item as { role: ChatMessage["role"]; content: string | ContentPart[] };
      const content =
        typeof m.content === "string"
          ? m.content
          : textOfParts(m.content, ["input", j, "content"], ["input_text", "output_text"]);
      messages.push({ role: m.role, content });
    } else if (item.type === "function_call" || item.type === "custom_tool_call") {
      const name = qualified(item.namespace, item.name);
      const call: NonNullable<ChatMessage["tool_calls"]>[number] =
        item.type === "function_call"
          ? { id: item.call_id, type: "function", function: { name, arguments: item.arguments } }
          : { id: item.call_id, type: "custom", custom: { name, input: item.input } };
      // Consecutive calls are one assistant turn.
      const last = messages.at(-1);
      if (last?.role === "assistant" && last.tool_calls) last.tool_calls.push(call);
      else messages.push({ role: "assistant", content: null, tool_calls: [call] });
    } else if (item.type === "function_call_output" || item.type === "custom_tool_call_output") {
      const content =
        typeof item.output === "string"
          ? item.output
          : textOfParts(item.output, ["input", j, "output"], ["input_text", "output_text"]);
      // (an output without a call: named by its tool, which DeepSeek's templates do not show)
      const tool =
        item.type === "function_call_output" && item.name
          ? qualified(item.namespace ?? undefined, item.name)
          : null;
      const id = item.call_id ?? tool;
      if (!id)
        throw bad(
          "a function_call_output names its call (call_id) or its tool (name)",
          `input.${j}`,
        );
      messages.push({ role: "tool", tool_call_id: id, content });
    } else if (item.type === "compaction") {
      // The conversation before it, compacted: its user messages, then the model's summary
      // of what it answered and did as its own earlier turn (compaction.ts).
      const c = decodeCompaction(item.encrypted_content, `input.${j}.encrypted_content`);
      messages = compactedConversation(messages, c);
    }
  }
  const tools = flatTools(b.tools ?? []).map(({ tool: t, param }) => {
    if (t["type"] === "custom") {
      // Chat Completions' form: the grammar's syntax and definition under `grammar`.
      const { name, description, format } = t as {
        name?: unknown;
        description?: unknown;
        format?: { type?: unknown; syntax?: unknown; definition?: unknown } | null;
      };
      return {
        type: "custom",
        custom: {
          name,
          ...(description !== undefined ? { description } : {}),
          ...(format?.type === "grammar"
            ? {
                format: {
                  type: "grammar",
                  grammar: { syntax: format.syntax, definition: format.definition },
                },
              }
            : format != null
              ? { format }
              : {}),
        },
      };
    }
    if (t["type"] !== "function")
      throw bad(
        `${param.replace(/\.(\d+)/g, "[$1]")}: only function, custom and namespace tools are supported (got ${JSON.stringify(t["type"] ?? null).slice(0, 40)}): OpenAI's hosted tools (web search, file search, ...) are not run here; leave them out (Codex CLI: web_search = "disabled" in its config.toml)`,
        param,
      );
    const { name, description, parameters, strict } = t;
    return {
      type: "function",
      function: {
        name,
        ...(description !== undefined ? { description } : {}),
        ...(parameters !== undefined ? { parameters } : {}),
        ...(strict !== undefined ? { strict } : {}),
      },
    };
  });
  const choice = b.tool_choice as
    | { type?: string; name?: string; namespace?: unknown; mode?: unknown; tools?: unknown }
    | string
    | undefined
    | null;
  const toolChoice =
    choice != null && typeof choice === "object" && choice.type === "function"
      ? { type: "function", function: { name: qualifiedOf(choice) } }
      : choice != null && typeof choice === "object" && choice.type === "custom"
        ? { type: "custom", custom: { name: qualifiedOf(choice) } }
        : choice != null && typeof choice === "object" && choice.type === "allowed_tools"
          ? { type: "allowed_tools", allowed_tools: allowedTools(choice) }
          : choice;
  const format = b.text?.format as
    | { type?: string; name?: string; schema?: unknown; strict?: boolean }
    | null
    | undefined;
  const responseFormat =
    format?.type === "json_schema"
      ? {
          type: "json_schema",
          json_schema: {
            name: format.name,
            schema: format.schema,
            ...(format.strict !== undefined ? { strict: format.strict } : {}),
          },
        }
      : format;
  const kwargs = effortKwargs(b.reasoning?.effort, b.chat_template_kwargs);
  // include: the output text's token logprobs; encrypted reasoning (to carry thinking over
  // without storing it) is ignored, as the thinking of earlier turns is (the templates drop it).
  const include = b.include ?? [];
  for (const [i, v] of include.entries())
    if (v !== "message.output_text.logprobs" && v !== "reasoning.encrypted_content")
      throw bad(
        `include[${i}]: '${v.slice(0, 60)}' is not supported (message.output_text.logprobs is; reasoning.encrypted_content is accepted and ignored)`,
        `include.${i}`,
      );
  const logprobs = include.includes("message.output_text.logprobs");
  const chat: ChatCompletionRequest = {
    model: b.model,
    messages: b.instructions
      ? [{ role: "system", content: b.instructions }, ...messages]
      : messages,
    ...(b.max_output_tokens != null ? { max_completion_tokens: b.max_output_tokens } : {}),
    ...(b.temperature != null ? { temperature: b.temperature } : {}),
    ...(b.top_p != null ? { top_p: b.top_p } : {}),
    ...(b.seed != null ? { seed: b.seed } : {}),
    ...(b.top_k != null ? { top_k: b.top_k } : {}),
    ...(b.min_p != null ? { min_p: b.min_p } : {}),
    ...(b.repetition_penalty != null ? { repetition_penalty: b.repetition_penalty } : {}),
    ...(b.priority != null ? { priority: b.priority } : {}),
    ...(b.cache_salt != null ? { cache_salt: b.cache_salt } : {}),
    ...(b.thinking_token_budget != null ? { thinking_token_budget: b.thinking_token_budget } : {}),
    ...Object.fromEntries(
      Object.keys(VLLM_OUTPUT_FIELDS).flatMap((k) => {
        const v = b[k as keyof typeof VLLM_OUTPUT_FIELDS];
        return v == null ? [] : [[k, v]];
      }),
    ),
    ...(tools.length ? { tools } : {}),
    ...(toolChoice != null ? { tool_choice: toolChoice } : {}),
    ...(b.parallel_tool_calls != null ? { parallel_tool_calls: b.parallel_tool_calls } : {}),
    ...(responseFormat != null ? { response_format: responseFormat } : {}),
    ...(kwargs ? { chat_template_kwargs: kwargs } : {}),
    ...(logprobs ? { logprobs: true, top_logprobs: b.top_logprobs ?? 0 } : {}),
  };
  return { chat, conversation: messages };
}

/** Responses' allowed_tools ({mode, tools: [{type, name}]}) in Chat Completions' form. */
function allowedTools(choice: { mode?: unknown; tools?: unknown }): object {
  const tools = Array.isArray(choice.tools)
    ? choice.tools.map((t: { type?: unknown; name?: unknown; namespace?: unknown } | null) =>
        t?.type === "function" || t?.type === "custom"
          ? { type: t.type, [t.type]: { name: qualifiedOf(t) } }
          : t,
      )
    : choice.tools;
  return { mode: choice.mode, tools };
}

/**
 * The chat messages items stand for (a conversation's, input and output items alike; their
 * thinking left out, as DeepSeek's templates drop it): what goes before a request that
 * continues them.
 */
export function messagesOf(items: readonly InputListItem[]): ChatMessage[] {
  if (items.length === 0) return [];
  return chatRequestOf({ model: "", input: items as unknown as ResponsesRequest["input"] })
    .conversation;
}

/** The answer's items as the conversation's next messages (its thinking left out). */
function answerMessages(items: readonly OutputItem[]): ChatMessage[] {
  const text = items.map((i) => (i.type === "message" ? i.content[0]!.text : "")).join("");
  const calls = items.flatMap(
    (i): NonNullable<ChatMessage["tool_calls"]> =>
      i.type === "function_call"
        ? [
            {
              id: i.call_id,
              type: "function",
              function: { name: qualified(i.namespace, i.name), arguments: i.arguments },
            },
          ]
        : i.type === "custom_tool_call"
          ? [
              {
                id: i.call_id,
                type: "custom",
                custom: { name: qualified(i.namespace, i.name), input: i.input },
              },
            ]
          : [],
  );
  return [
    calls.length > 0
      ? { role: "assistant", content: text || null, tool_calls: calls }
      : { role: "assistant", content: text },
  ];
}

/** A chat field a refusal names, as the Responses field it came from (the whole param). */
const PARAMS: [RegExp, string][] = [
  [/^messages(\..*)?$/, "input"],
  [/^response_format.*$/, "text.format"],
  [/^(max_tokens|max_completion_tokens)$/, "max_output_tokens"],
];

export const newId = (prefix: string) => `${prefix}_${randomBytes(12).toString("hex")}`;

/** fittedRun (openai.ts), its refusals naming the Responses fields. */
const fitted = (ctx: ServeContext, chat: ChatCompletionRequest, auto: boolean) =>
  fittedRun(ctx, chat, auto, (err) => renameParam(err, PARAMS));

const ITEM_ID_PREFIX: Record<string, string> = {
  message: "msg",
  function_call: "fc",
  function_call_output: "fco",
  custom_tool_call: "ctc",
  custom_tool_call_output: "ctco",
  reasoning: "rs",
  compaction: "cmp",
};

/**
 * Refuses items that give one id twice, or an id `held` has already (a conversation's
 * items), as OpenAI's does (400 `<param>.<i>.id`): the same turn added twice would be read
 * twice, and an item by id is one item.
 */
export function checkItemIds(
  items: readonly unknown[],
  held: ReadonlySet<string>,
  param: string,
): void {
  const seen = new Set<string>();
  for (const [i, item] of items.entries()) {
    const id = (item as { id?: unknown } | null)?.id;
    if (typeof id !== "string" || id === "") continue;
    if (seen.has(id) || held.has(id))
      throw bad(
        `Duplicate item found with id ${id.slice(0, 80)}: ${held.has(id) ? "the conversation holds it already" : "given twice"}`,
        `${param}.${i}.id`,
      );
    seen.add(id);
  }
}

/**
 * A request's input as the items GET /v1/responses/{id}/input_items lists: a string input is
 * one user message; message content becomes content parts (input_text, or output_text for
 * the assistant's); items keep the id they came with, others get one.
 */
export function inputItemsOf(input: ResponsesRequest["input"]): InputListItem[] {
  const items = typeof input === "string" ? [{ role: "user" as const, content: input }] : input;
  return items.map((item) => {
    const type = item.type ?? "message";
    const given = (item as { id?: unknown }).id;
    const id =
      typeof given === "string" && given.length > 0 ? given : newId(ITEM_ID_PREFIX[type] ?? "item");
    if (!("role" in item)) return { ...item, id, type };
    const part = item.role === "assistant" ? "output_text" : "input_text";
    const content =
      typeof item.content === "string" ? [{ type: part, text: item.content }] : item.content;
    return { id, type, role: item.role, content, status: "completed" };
  });
}

type OutputItem =
  | { type: "compaction"; id: string; encrypted_content: string }
  | {
      type: "reasoning";
      id: string;
      summary: [];
      content: { type: "reasoning_text"; text: string }[];
    }
  | {
      type: "message";
      id: string;
      status: "in_progress" | "completed" | "incomplete";
      role: "assistant";
      content: { type: "output_text"; text: string; annotations: []; logprobs?: object[] }[];
    }
  | {
      type: "function_call";
      id: string;
      call_id: string;
      name: string;
      namespace?: string;
      arguments: string;
      status: "in_progress" | "completed" | "incomplete";
    }
  | {
      type: "custom_tool_call";
      id: string;
      call_id: string;
      name: string;
      namespace?: string;
      input: string;
      status: "in_progress" | "completed" | "incomplete";
    };

type CallItem = OutputItem & { type: "function_call" | "custom_tool_call" };

/**
 * Output items from a choice's deltas (ChatOutput), as they come: a delta of another kind
 * than the open item's closes it. Emits the stream's item and text events on the way.
 */
class OutputItems {
  readonly items: OutputItem[] = [];
  #open: OutputItem | null = null;
  /** Call items (a function's or a custom tool's) by the chat delta's call index. */
  readonly #calls = new Map<number, CallItem>();
  readonly #emit: (type: string, body: object) => void;
  /** With logprobs: the entries of tokens whose text has not been released yet. */
  readonly #logprobs: boolean;
  /** The namespace tools' functions by the names the model calls them (namespacesOf). */
  readonly #namespaces: ReadonlyMap<string, Namespaced>;
  #pending: object[] = [];

  constructor(
    emit: (type: string, body: object) => void = () => {},
    o: { logprobs?: boolean; namespaces?: ReadonlyMap<string, Namespaced> } = {},
  ) {
    this.#emit = emit;
    this.#logprobs = o.logprobs ?? false;
    this.#namespaces = o.namespaces ?? new Map();
  }

  /**
   * Logprob entries of the tokens whose text comes next: they go with the next text delta
   * of the message (a token whose text is held back, a possible stop sequence, goes with
   * the text that follows), and into its output_text part. Only for answers that are one
   * message (no thinking, no calls: the request checks).
   */
  addLogprobs(entries: object[]): void {
    if (this.#logprobs) this.#pending.push(...entries);
  }

  push(d: ChatDelta): void {
    if ("reasoning_content" in d) {
      const item = this.#openOf("reasoning", () => ({
        type: "reasoning",
        id: newId("rs"),
        summary: [],
        content: [{ type: "reasoning_text", text: "" }],
      }));
      item.content[0]!.text += d.reasoning_content;
      this.#emit("response.reasoning_text.delta", {
        ...this.#at(item),
        content_index: 0,
        delta: d.reasoning_content,
      });
    } else if ("content" in d) {
      if (d.content === "") return;
      const item = this.#openOf("message", () => ({
        type: "message",
        id: newId("msg"),
        status: "in_progress",
        role: "assistant",
        content: [
          {
            type: "output_text",
            text: "",
            annotations: [],
            ...(this.#logprobs ? { logprobs: [] } : {}),
          },
        ],
      }));
      item.content[0]!.text += d.content;
      const logprobs = this.#take(item);
      this.#emit("response.output_text.delta", {
        ...this.#at(item),
        content_index: 0,
        delta: d.content,
        logprobs,
      });
    } else {
      for (const t of d.tool_calls) {
        let item = this.#calls.get(t.index);
        if (t.id !== undefined || !item) {
          const called = t.function.name ?? "";
          const head = {
            call_id: t.id ?? newId("call"),
            ...(this.#namespaces.get(called) ?? { name: called }),
            status: "in_progress" as const,
          };
          item =
            t.type === "custom"
              ? { type: "custom_tool_call", id: newId("ctc"), ...head, input: "" }
              : { type: "function_call", id: newId("fc"), ...head, arguments: "" };
          this.#calls.set(t.index, item);
          this.#start(item);
        }
        const more = t.function.arguments;
        if (item.type === "custom_tool_call") {
          item.input += more;
          if (more)
            this.#emit("response.custom_tool_call_input.delta", { ...this.#at(item), delta: more });
        } else {
          item.arguments += more;
          if (more)
            this.#emit("response.function_call_arguments.delta", {
              ...this.#at(item),
              delta: more,
            });
        }
      }
    }
  }

  /** A whole item (a compaction) added before the answer's: its added and done events. */
  add(item: OutputItem): void {
    this.#close();
    this.items.push(item);
    const at = { output_index: this.items.length - 1, item: structuredClone(item) };
    this.#emit("response.output_item.added", at);
    this.#emit("response.output_item.done", at);
  }

  /** Closes the open item: the end of the answer, "incomplete" when the length cut it. */
  end(status: "completed" | "incomplete" = "completed"): void {
    this.#close(status);
  }

  #openOf<K extends OutputItem["type"]>(
    type: K,
    make: () => OutputItem & { type: K },
  ): OutputItem & { type: K } {
    if (this.#open?.type === type) return this.#open as OutputItem & { type: K };
    const item = make();
    this.#start(item);
    return item;
  }

  /** The pending logprob entries, moved into the message's part. */
  #take(item: OutputItem & { type: "message" }): object[] {
    const taken = this.#pending;
    this.#pending = [];
    item.content[0]!.logprobs?.push(...taken);
    return taken;
  }

  #start(item: OutputItem): void {
    this.#close();
    this.items.push(item);
    this.#open = item;
    // A message or reasoning item opens without content; its part is added next (as OpenAI
    // streams them: the SDKs' accumulators append the part to an empty content).
    const parted = item.type === "message" || item.type === "reasoning";
    this.#emit("response.output_item.added", {
      output_index: this.items.length - 1,
      item: parted ? { ...structuredClone(item), content: [] } : structuredClone(item),
    });
    if (item.type === "message")
      this.#emit("response.content_part.added", {
        ...this.#at(item),
        content_index: 0,
        part: {
          type: "output_text",
          text: "",
          annotations: [],
          ...(this.#logprobs ? { logprobs: [] } : {}),
        },
      });
    else if (item.type === "reasoning")
      this.#emit("response.content_part.added", {
        ...this.#at(item),
        content_index: 0,
        part: { type: "reasoning_text", text: "" },
      });
  }

  #close(status: "completed" | "incomplete" = "completed"): void {
    const item = this.#open;
    if (!item) return;
    this.#open = null;
    if (item.type === "reasoning") {
      this.#emit("response.reasoning_text.done", {
        ...this.#at(item),
        content_index: 0,
        text: item.content[0]!.text,
      });
      this.#emit("response.content_part.done", {
        ...this.#at(item),
        content_index: 0,
        part: item.content[0],
      });
    } else if (item.type === "message") {
      item.status = status;
      this.#take(item); // tokens whose text never came out (held back at the end)
      this.#emit("response.output_text.done", {
        ...this.#at(item),
        content_index: 0,
        text: item.content[0]!.text,
        logprobs: item.content[0]!.logprobs ?? [],
      });
      this.#emit("response.content_part.done", {
        ...this.#at(item),
        content_index: 0,
        part: item.content[0],
      });
    } else if (item.type === "custom_tool_call") {
      item.status = status;
      this.#emit("response.custom_tool_call_input.done", {
        ...this.#at(item),
        input: item.input,
      });
    } else if (item.type === "function_call") {
      item.status = status;
      this.#emit("response.function_call_arguments.done", {
        ...this.#at(item),
        arguments: item.arguments,
      });
    }
    this.#emit("response.output_item.done", {
      output_index: this.items.indexOf(item),
      item: structuredClone(item),
    });
  }

  #at(item: OutputItem) {
    return { item_id: item.id, output_index: this.items.indexOf(item) };
  }
}

/**
 * The routes plugin; `store` keeps this gateway's responses, `owner` says who a request is
 * (ownerOf of its key, as for files and batches): a response is found only by its owner.
 */
export function responsesRoutes(
  ctx: ServeContext,
  store: KeptResponses,
  owner: (req: FastifyRequest) => string = () => "",
  conversations: Conversations | null = null,
  files: FileStore | null = null,
) {
  /** Background responses still running, by id (POST .../cancel stops them). */
  const running = new Map<string, Running>();
  /** The request's own response `id` (another owner's is not there for it). */
  const find = (req: FastifyRequest, id: string) => keptFor(store, owner(req), id);
  /** The request's own background response `id` running here. */
  const runningOf = (req: FastifyRequest, id: string): Running | undefined => {
    const r = running.get(id);
    return r?.owner === owner(req) ? r : undefined;
  };
  return async (app: FastifyInstance) => {
    // Files in the input (input_file parts) read as text before anything else sees it.
    app.addHook("preHandler", async (req) => {
      if (req.method === "POST" && isObject(req.body) && Array.isArray(req.body["input"]))
        req.body = await withInputFiles(ctx, req.body, { store: files, owner: owner(req) });
    });
    app.post<{ Body: ResponsesRequest }>(
      "/v1/responses",
      { schema: { body: ResponsesRequest } },
      (req, reply) =>
        respond(ctx, store, conversations, running, owner(req), req, reply).catch((err) =>
          failedOpen(reply, err),
        ),
    );
    app.post<{ Body: InputTokensRequest }>(
      "/v1/responses/input_tokens",
      { schema: { body: InputTokensRequest } },
      async (req) => {
        const b = req.body;
        if (b.model != null) checkModel(ctx, b.model);
        // (a compaction asked for is checked; what is counted is the prompt as sent, the
        // count its threshold is compared with)
        compactThreshold(b.context_management, ctx.maxModelLen);
        const { before } = continued(b, (id) => find(req, id), conversations, owner(req));
        const { chat } = chatRequestOf({ ...b, model: b.model ?? ctx.servedModelName }, before);
        // truncation "auto": what the response would run on, its conversation fitted.
        if (b.truncation === "auto") {
          const { spec } = await fitted(ctx, chat, true);
          return { object: "response.input_tokens", input_tokens: spec.prompts[0]!.tokens.length };
        }
        const { prompt } = await chatPrompt(ctx, chat).catch((err: unknown) => {
          throw renameParam(err, PARAMS);
        });
        return { object: "response.input_tokens", input_tokens: prompt.length };
      },
    );
    app.post<{ Body: CompactBody }>(
      "/v1/responses/compact",
      { schema: { body: CompactRequest } },
      (req, reply) =>
        compact(
          ctx,
          {
            conversationOf: (r, b) => {
              const before = previousConversation((id) => find(r, id), b.previous_response_id);
              const input = b.input as ResponsesRequest["input"] | null | undefined;
              if (input == null || input.length === 0) return [...before];
              return chatRequestOf({ model: ctx.servedModelName, input }, before).conversation;
            },
            fitted: (chat) => fitted(ctx, chat, true),
            newId,
          },
          req,
          reply,
        ),
    );
    app.post<{ Params: { id: string } }>("/v1/responses/:id/cancel", async (req) => {
      const id = req.params.id;
      const r = runningOf(req, id);
      if (r) {
        r.cancel();
        await r.settled;
        return find(req, id)?.response ?? r.last();
      }
      let kept = find(req, id);
      if (!kept) throw notFound(id, null);
      if (store instanceof ResponseFiles && isRunning(kept)) {
        // Running on another gateway of the folder: asked to stop, and waited for.
        store.mark(id, "cancel");
        const until = Date.now() + CANCEL_WAIT_MS;
        while (isRunning(kept) && Date.now() < until) {
          await sleep(MARK_POLL_MS / 2);
          kept = find(req, id);
        }
        if (!kept) throw notFound(id, null);
        return kept.response;
      }
      if ((kept.response as { background?: boolean }).background !== true)
        throw new ApiError(
          "EM_GATEWAY_BAD_REQUEST",
          `response '${id.slice(0, 80)}' was not created with background: true; only those can be cancelled`,
          {
            param: null,
          },
        );
      return kept.response; // already finished: as it ended
    });
    app.get<{ Params: { id: string }; Querystring: RetrieveQuery }>(
      "/v1/responses/:id",
      { schema: { querystring: RetrieveQuery } },
      async (req, reply) => {
        const id = req.params.id;
        const kept = find(req, id);
        if (!kept) throw notFound(id, null);
        if (req.query.stream !== "true") return kept.response;
        // Its events again, from the start or after starting_after, until its last.
        if ((kept.response as { background?: boolean }).background !== true)
          throw bad(
            `response '${id.slice(0, 80)}' was not created with background: true; only those are streamed again (GET it without stream)`,
            "stream",
          );
        const after =
          req.query.starting_after === undefined ? -1 : Number(req.query.starting_after);
        const here = runningOf(req, id)?.log;
        const ended = () => {
          const now = find(req, id);
          return now && !isRunning(now) ? now.response : null;
        };
        const left = new AbortController();
        const lines = here
          ? here.follow(after, left.signal)
          : store.events(id, after, ended, left.signal);
        if (!lines)
          throw bad(
            `the events of response '${id.slice(0, 80)}' were not kept (it was made before they were): GET it without stream`,
            "stream",
          );
        return sendEvents(ctx, reply, lines, left);
      },
    );
    app.get<{ Params: { id: string }; Querystring: InputItemsQuery }>(
      "/v1/responses/:id/input_items",
      { schema: { querystring: InputItemsQuery } },
      async (req) => {
        const kept = find(req, req.params.id);
        if (!kept) throw notFound(req.params.id, null);
        return itemsPage(kept.inputItems, req.query, `response '${req.params.id}'`);
      },
    );
    app.delete<{ Params: { id: string } }>("/v1/responses/:id", async (req) => {
      const id = req.params.id;
      const kept = find(req, id);
      if (!kept) throw notFound(id, null);
      const here = runningOf(req, id);
      here?.drop(); // a background response: stopped, and not kept again
      // One running on another gateway of the folder: asked to stop and keep nothing more.
      if (!here && store instanceof ResponseFiles && isRunning(kept)) store.mark(id, "drop");
      if (!store.delete(id)) throw notFound(id, null);
      return { id: req.params.id, object: "response.deleted", deleted: true };
    });
  };
}

/** `owner`'s response `id` (another owner's is not there for them). */
function keptFor(store: KeptResponses, owner: string, id: string): Kept | undefined {
  const kept = store.get(id);
  return kept && (kept.owner ?? "") === owner ? kept : undefined;
}

/**
 * Sends the events `lines` yields as server-sent events, until their last or until the
 * client leaves (`left` aborted then, which stops only the sending: a background response
 * runs on).
 */
async function sendEvents(
  ctx: ServeContext,
  reply: FastifyReply,
  lines: AsyncGenerator<string>,
  left: AbortController,
): Promise<FastifyReply> {
  const raw = eventStream(reply, ctx);
  raw.on("close", () => left.abort());
  for await (const line of lines) {
    if (raw.destroyed) break;
    // (a slow client: waited for, not buffered without bound)
    if (!raw.write(sseOf(line))) await once(raw, "drain", { signal: left.signal }).catch(() => {});
  }
  if (!raw.destroyed) raw.end();
  return reply;
}

/** A background response while it runs. */
interface Running {
  /** Who made it (Kept's owner). */
  readonly owner: string;
  /** Its events (GET ?stream=true follows them here). */
  readonly log: EventLog;
  cancel(): void;
  /** Stops it and keeps nothing more of it (DELETE). */
  drop(): void;
  /** Resolves once the kept response has its final status. */
  readonly settled: Promise<void>;
  /** The response as last kept (for a gateway that keeps none any more). */
  last(): object;
}

/**
 * What a request continues, as the messages before its input: a kept response
 * (previous_response_id), or a conversation (whose id it also says: the request's input and
 * its answer are added to it), or nothing.
 */
function continued(
  b: Pick<ResponsesRequest, "previous_response_id" | "conversation">,
  find: (id: string) => Kept | undefined,
  conversations: Conversations | null,
  owner: string,
): {
  before: readonly ChatMessage[];
  conversation: string | null;
  /** The ids of the conversation's items (none without one). */
  held: ReadonlySet<string>;
} {
  const id = typeof b.conversation === "string" ? b.conversation : (b.conversation?.id ?? null);
  if (id === null)
    return {
      before: previousConversation(find, b.previous_response_id),
      conversation: null,
      held: new Set(),
    };
  if (b.previous_response_id != null)
    throw bad(
      "conversation and previous_response_id cannot both be given: the conversation holds what came before",
      "conversation",
    );
  if (!conversations) throw bad("this gateway keeps no conversations", "conversation");
  const c = conversations.need(owner, id, "conversation");
  return {
    before: messagesOf(c.items),
    conversation: c.id,
    held: new Set(c.items.map((i) => i.id)),
  };
}

/** The conversation a request continues (previous_response_id: a finished response kept). */
function previousConversation(
  find: (id: string) => Kept | undefined,
  id: string | null | undefined,
): readonly ChatMessage[] {
  if (id == null) return [];
  const kept = find(id);
  if (!kept) throw notFound(id, "previous_response_id");
  if (isRunning(kept))
    throw bad(
      `response '${id.slice(0, 80)}' is still in progress (background): continue it once it has finished`,
      "previous_response_id",
    );
  return kept.conversation;
}

/**
 * A request that failed after its stream was opened (a compaction's summary opens it before
 * the answer is admitted): an error event ends the stream, as one that fails later; before,
 * the error is the request's.
 */
function failedOpen(reply: FastifyReply, err: unknown): FastifyReply {
  const raw = reply.raw;
  if (!raw.headersSent) throw err;
  const e = toApiError(err);
  const event = {
    type: "error",
    sequence_number: 0,
    code: e.code,
    message: e.message,
    param: e.param,
  };
  if (!raw.destroyed) raw.end(`event: error\ndata: ${JSON.stringify(event)}\n\n`);
  return reply;
}

async function respond(
  ctx: ServeContext,
  store: KeptResponses,
  conversations: Conversations | null,
  running: Map<string, Running>,
  owner: string,
  req: FastifyRequest<{ Body: ResponsesRequest }>,
  reply: FastifyReply,
): Promise<unknown> {
  const b = req.body;
  const {
    before,
    conversation: joined,
    held,
  } = continued(b, (id) => keptFor(store, owner, id), conversations, owner);
  if (typeof b.input !== "string") checkItemIds(b.input, held, "input");
  // (a conversation in a full folder takes no more items: refused before anything runs)
  const convFull = joined ? conversations!.logs.refusal() : null;
  if (convFull) throw convFull;
  if (b.background && (b.store === false || store.capacity < 1))
    throw bad(
      "background: true needs the response stored (store: true, --responses-store > 0) to be fetched later",
      "background",
    );
  const asked = chatRequestOf(b, before);
  let { chat: chatRequest, conversation } = asked;
  // Token logprobs go onto the message's text: an answer split into items (thinking, calls)
  // would need each token placed in its item, which this gateway does not do.
  const logprobs = chatRequest.logprobs === true;
  /** Calls of a namespace's tools are named back into it (namespace, name). */
  const namespaces = namespacesOf(b.tools);
  if (logprobs && requestThinks(ctx.reasoningParser, chatRequest.chat_template_kwargs ?? undefined))
    throw bad(
      "include message.output_text.logprobs: not for an answer that thinks first (this gateway's reasoning parser, or reasoning.effort)",
      "include",
    );
  if (logprobs && (b.tools?.length ?? 0) > 0 && b.tool_choice !== "none")
    throw bad(
      "include message.output_text.logprobs: not with tools (their calls are items of their own)",
      "include",
    );
  let stored = b.store !== false && store.capacity > 0;
  // A folder with no room left keeps no more responses: refused before anything runs.
  const full = stored && store instanceof ResponseFiles ? store.refusal() : null;
  if (full) throw full;
  // Server-side compaction (context_management): a prompt that reaches the threshold has the
  // conversation before its last turn summarized first (compaction.ts), and the answer runs on
  // the compacted conversation, which the response keeps; its output starts with the item.
  type Compaction = { item: OutputItem; usage: SummaryUsage };
  // (set by compactFirst: typed so that the checker does not narrow it to null here)
  let compaction = null as Compaction | null;
  /** The turns to summarize and the last (the answer's), when a compaction is due. */
  let due: { history: ChatMessage[]; last: ChatMessage[] } | null = null;
  const threshold = compactThreshold(b.context_management, ctx.maxModelLen);
  if (threshold !== null) {
    const { prompt } = await chatPrompt(ctx, chatRequest).catch((err: unknown) => {
      throw renameParam(err, PARAMS);
    });
    const t = prompt.length >= threshold ? lastTurnStart(conversation) : null;
    if (t !== null) {
      checkModel(ctx, chatRequest.model); // (not after a summary made for nothing)
      due = { history: conversation.slice(0, t), last: conversation.slice(t) };
    }
  }
  /**
   * Summarizes what `due` names, and compacts the conversation and the chat request with
   * the summary (`reply`, `o`: summarize's). False: cancelled.
   */
  const compactFirst = async (
    reply: FastifyReply | null,
    o: Pick<SummaryOptions, "admitted" | "started">,
  ): Promise<boolean> => {
    const { history, last } = due!;
    const fit = (chat: ChatCompletionRequest) => fitted(ctx, chat, true);
    const s = await summarize(ctx, fit, history, reply, { instructions: b.instructions, ...o });
    if (s === null) return false;
    conversation = compactedConversation(history, {
      summary: s.summary,
      users: userTexts(history),
      after: last,
    });
    const system = chatRequest.messages.length - asked.conversation.length;
    chatRequest = {
      ...chatRequest,
      messages: [...chatRequest.messages.slice(0, system), ...conversation],
    };
    compaction = { item: compactionItem(history, s.summary, newId, last), usage: s.usage };
    return true;
  };
  /** The stream, when the compaction's summary opened it (answered below, not by fastify). */
  let opened = null as FastifyReply["raw"] | null;
  // In the foreground the answer waits for the summary here; a background response is
  // answered at once (queued), its summary the first part of its work (below).
  if (due && !b.background) {
    const summarized = await compactFirst(reply, {
      // Streamed: the headers go once the summary's job is admitted, so that the client
      // hears from the stream (its keepalive) while the summary is made.
      admitted: () => {
        if (b.stream) opened = eventStream(reply, ctx);
      },
    });
    if (!summarized) return leftReply(reply);
  }
  /** How the answer runs: known now, or once a background response's summary is made. */
  let run = due && b.background ? null : await fitted(ctx, chatRequest, b.truncation === "auto");
  if (due && b.background)
    // (its fields checked now, on the conversation as sent, so that a refusal is still this
    // request's: a prompt too long is what the compaction is for)
    await fitted(ctx, chatRequest, true).catch((err: unknown) => {
      if (!(err instanceof ApiError && err.code === "EM_GATEWAY_PROMPT_TOO_LONG")) throw err;
    });
  /** The response's temperature and top_p (the same before a compaction and after). */
  const sampling = temperatureOf(ctx, chatRequest);
  const id = newId("resp");
  // Its input as items, ids given once: a background response is kept twice (running, ended),
  // and a conversation gets the same ids.
  const givenItems = stored || joined ? inputItemsOf(b.input) : [];
  const inputItems = stored ? givenItems : [];
  const createdAt = Math.floor(Date.now() / 1000);
  /** The response object, status and output as given. */
  const response = (status: string, output: OutputItem[], extra: object = {}) => ({
    id,
    object: "response",
    created_at: createdAt,
    status,
    model: ctx.servedModelName,
    output,
    instructions: b.instructions ?? null,
    max_output_tokens: b.max_output_tokens ?? null,
    temperature: sampling.temperature,
    top_p: sampling.topP,
    tools: b.tools ?? [],
    tool_choice: b.tool_choice ?? "auto",
    parallel_tool_calls: b.parallel_tool_calls ?? true,
    text: { format: b.text?.format ?? { type: "text" }, verbosity: b.text?.verbosity ?? "medium" },
    top_logprobs: b.top_logprobs ?? 0,
    reasoning: { effort: b.reasoning?.effort ?? null, summary: b.reasoning?.summary ?? null },
    max_tool_calls: b.max_tool_calls ?? null,
    service_tier: "default",
    user: b.user ?? null,
    prompt_cache_key: b.prompt_cache_key ?? null,
    safety_identifier: b.safety_identifier ?? null,
    previous_response_id: b.previous_response_id ?? null,
    conversation: joined ? { id: joined } : null,
    store: stored,
    background: b.background ?? false,
    truncation: b.truncation ?? "disabled",
    metadata: b.metadata ?? {},
    error: null,
    incomplete_details: null,
    usage: null,
    ...extra,
  });
  let job: Job | undefined;
  /** Keeps response `r` when stored, with the conversation up to its answer `items`. */
  const keepAs = (r: object, items: readonly OutputItem[] = []) => {
    if (stored)
      store.put(id, {
        conversation: [...conversation, ...answerMessages(items)],
        response: r,
        inputItems,
        owner,
      });
  };
  /** The finished response. */
  const finalOf = (c: Choice, output: ChatOutput, items: OutputItem[]) => {
    const length = run!.finishOf(c, output) === "length";
    const usage = usageOf(job!);
    const reasoning = items.map((i) => (i.type === "reasoning" ? i.content[0]!.text : "")).join("");
    // (a compaction's summary counted with the answer: both were this response's work)
    const more = compaction?.usage;
    const done = response(length ? "incomplete" : "completed", items, {
      ...(length ? { incomplete_details: { reason: "max_output_tokens" } } : {}),
      usage: {
        input_tokens: usage.prompt_tokens + (more?.input_tokens ?? 0),
        input_tokens_details: {
          cached_tokens: usage.prompt_tokens_details.cached_tokens + (more?.cached_tokens ?? 0),
        },
        output_tokens: usage.completion_tokens + (more?.output_tokens ?? 0),
        // The thinking's text, encoded again: the output tokens it spans, near enough.
        output_tokens_details: {
          reasoning_tokens:
            (reasoning ? ctx.tokenizer.encode(reasoning, false).length : 0) +
            (more?.reasoning_tokens ?? 0),
        },
        total_tokens: usage.total_tokens + (more ? more.input_tokens + more.output_tokens : 0),
      },
    });
    return done;
  };
  /**
   * Adds the input and the answer `items` of response `r` to the conversation it continues,
   * once it has ended with an answer (completed, or incomplete: cut by max_output_tokens);
   * a cancelled or failed one adds nothing. A conversation deleted meanwhile takes nothing.
   */
  const joinAnswer = (r: object, items: readonly OutputItem[]) => {
    const status = (r as { status?: string }).status;
    if (!joined || (status !== "completed" && status !== "incomplete")) return;
    try {
      conversations!.append(joined, [...givenItems, ...(items as unknown as InputListItem[])]);
    } catch (err) {
      // (the folder failed: the response stands; its conversation does not have it)
      req.log.error({ err, conversation: joined }, "conversation: the answer was not added");
    }
  };
  /**
   * A job's end as a response: finished (completed or incomplete), or cancelled (the client
   * left, or POST .../cancel) with the text it had, flushed, ending its items (which hooks
   * fed as it ran: itemHooks).
   */
  const endOf = (c: Choice, output: ChatOutput, items: OutputItems) => {
    if (c.finishReason !== null) return finalOf(c, output, items.items);
    for (const d of [...output.push(c.out.flush()), ...output.end()]) items.push(d);
    items.end("incomplete");
    return response("cancelled", items.items);
  };
  /**
   * Response `r` with its answer `items` kept when stored, and added to its conversation
   * when it has an answer (a client that left before the end: cancelled, added nowhere).
   */
  const finished = (r: ReturnType<typeof response>, items: OutputItem[]) => {
    keepAs(r, items);
    joinAnswer(r, items);
    return r;
  };
  /** Job hooks that read the answer into `items` as it comes (their events emitted). */
  const itemHooks = (output: ChatOutput, items: OutputItems): JobHooks => ({
    onToken: (_c, t, text) => {
      items.addLogprobs([chatLogprob(ctx, t)]);
      for (const d of output.push(text)) items.push(d);
    },
    onFinish: (c, text) => {
      for (const d of [...output.push(text), ...output.end()]) items.push(d);
      items.end(c.finishReason === "length" ? "incomplete" : "completed");
    },
  });

  /** The response a job that has ended makes, its answer read into items. */
  const answer = () => {
    const c = job!.choices[0]!;
    const output = new ChatOutput(run!.outputOptions);
    const items = new OutputItems(undefined, { logprobs, namespaces });
    if (compaction) items.add(compaction.item);
    items.addLogprobs(c.tokens.map((t) => chatLogprob(ctx, t)));
    // Cancelled: its text so far, what it held back too (so endOf finds nothing to flush).
    if (c.finishReason === null) c.out.flush();
    for (const d of output.push(c.out.text)) items.push(d);
    if (c.finishReason !== null) {
      for (const d of output.end()) items.push(d);
      items.end(c.finishReason === "length" ? "incomplete" : "completed");
    }
    return { r: endOf(c, output, items), items: items.items };
  };

  if (b.background) {
    // Admitted now (a refusal is still this request's error); kept as queued, as in_progress
    // once its first step runs (it has left the engine's queue), and again when it ends:
    // completed, incomplete, cancelled or failed. Its events go to a log
    // (response-events.ts) that this request follows with stream: true, and GET
    // /v1/responses/{id}?stream=true replays. The client leaving does not stop it;
    // POST /v1/responses/{id}/cancel does. A compaction due is its work's first part: the
    // summary's job is what is admitted now, the answer's starts once the summary is made.
    const files = stored && store instanceof ResponseFiles ? store : null;
    const log = store.eventLog(id);
    const items = new OutputItems((type, body) => log.append(type, body), {
      logprobs,
      namespaces,
    });
    /** The answer's output, once its job has started. */
    let output: ChatOutput | null = null;
    /** The summary's job while it runs. */
    let summary: Job | null = null;
    let stopped = false;
    /** Stops it: its summary or its answer, whichever runs. */
    const cancel = () => {
      stopped = true;
      summary?.cancel();
      job?.cancel();
    };
    /** Starts the answer's job (a refusal is thrown). */
    const answerJob = (r: ChatRun) => {
      output = new ChatOutput(r.outputOptions);
      // (onStarted comes from a later step of the engine, never from within startJob)
      return startJob(ctx, r.spec, { ...itemHooks(output, items), onStarted: () => start() });
    };
    /** The compaction item, its events after in_progress (or at the end, never started). */
    const lead = () => {
      if (compaction && items.items[0] !== compaction.item) items.add(compaction.item);
    };
    let current: object = response("queued", []);
    /** Another gateway's cancel or DELETE of it (a mark in the folder), acted on. */
    const marked = () => {
      const mark = files?.takeMark(id);
      if (mark === "cancel") running.get(id)?.cancel();
      else if (mark === "drop") running.get(id)?.drop();
      else if (mark === "lost") lose();
    };
    /**
     * Another gateway found it silent past STALE_MS (this one was paused, or cut off from the
     * folder) and wrote it failed: a client may have seen that, so it ends failed here too,
     * and is not written again.
     */
    let lost = false;
    const lose = () => {
      if (lost) return;
      lost = true;
      stored = false;
      current = lostOf(files?.peek(id) ?? { conversation, response: current, inputItems }).response;
      log.append(terminalType(current), { response: current });
      log.end();
      cancel();
    };
    /** Kept as queued, and told: as its first job is admitted. */
    const announce = () => {
      keepAs(current);
      log.append("response.created", { response: current });
      log.append("response.queued", { response: current });
    };
    /** Its first step scheduled: in_progress, kept and told (unless it has ended since). */
    let begun = false;
    const start = () => {
      if (lost || log.ended) return;
      if (!begun) {
        begun = true;
        current = response("in_progress", []);
        keepAs(current);
        log.append("response.in_progress", { response: current });
      }
      lead();
    };
    /** Its work: the answer's job, after the summary's when one is due. */
    let work: Promise<unknown> = Promise.resolve();
    try {
      if (!due) {
        job = answerJob(run!);
        announce();
        work = job.done;
      } else {
        let admit!: () => void;
        const admitted = new Promise<void>((resolve) => {
          admit = resolve;
        });
        const summarized = compactFirst(null, {
          admitted: (j) => {
            summary = j;
            announce();
            admit();
          },
          started: start,
        });
        work = summarized.then(async (made) => {
          summary = null;
          if (!made || stopped) return;
          lead(); // (the compaction item's events, before the answer's)
          run = await fitted(ctx, chatRequest, b.truncation === "auto");
          if (stopped) return;
          job = answerJob(run);
          await job.done;
        });
        // (a refusal of the summary's job, or of its prompt, is this request's)
        await Promise.race([admitted, summarized]);
      }
    } catch (err) {
      store.delete(id); // (refused: its log, or its events file, go)
      work.catch(() => {}); // (the same refusal)
      throw err;
    }
    /** Ends it as `r`: its last event, then kept (whoever finds it ended finds that event). */
    const end = (r: object, answerItems: readonly OutputItem[] = []) => {
      if (lost) return; // (as it ended then)
      const mark = files?.takeMark(id);
      if (mark === "lost") return lose();
      current = r;
      if (mark === "drop") stored = false; // (a DELETE just made: not again)
      if (!stored) return log.end(true);
      log.append(terminalType(r), { response: r });
      log.end();
      keepAs(r, answerItems);
      joinAnswer(r, answerItems);
    };
    const settled = work.then(
      () => {
        lead();
        // (cancelled before its answer's job started: what it has, the compaction at most)
        if (!job || !output) return end(response("cancelled", items.items), items.items);
        end(endOf(job.choices[0]!, output, items), items.items);
      },
      (err: unknown) => {
        const e = toApiError(err);
        end(response("failed", [], { error: { code: e.code, message: e.message } }));
      },
    );
    // In a shared folder: its marks looked for, and written again while it runs (the others
    // see it alive); at once after a pause (the timer late), lest it be found silent.
    let touched = Date.now();
    const watch = files
      ? setInterval(() => {
          marked();
          if (stored && Date.now() - touched >= HEARTBEAT_MS) {
            touched = Date.now();
            files.touch(id);
          }
        }, MARK_POLL_MS)
      : null;
    running.set(id, {
      owner,
      log,
      cancel,
      drop: () => {
        stored = false;
        log.end(true); // (its readers end now; nothing more is written)
        cancel();
      },
      settled: settled.finally(() => {
        running.delete(id);
        if (watch) clearInterval(watch);
      }),
      last: () => current,
    });
    if (!b.stream) return current;
    const left = new AbortController();
    return sendEvents(ctx, reply, log.follow(-1, left.signal), left);
  }

  const { spec, outputOptions } = run!;
  if (!b.stream) {
    job = startJob(ctx, spec);
    bind(reply, job);
    await job.done;
    const { r, items } = answer();
    return finished(r, items);
  }

  // Streamed: events as the text is released, numbered as written; written once the job is
  // admitted (until then a refusal is still a plain error response), queued before.
  let sequence = 0;
  let raw: FastifyReply["raw"] | null = null;
  const queued: [string, object][] = [];
  const write = (type: string, body: object) => {
    if (!raw!.destroyed)
      raw!.write(
        `event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: sequence++, ...body })}\n\n`,
      );
  };
  const emit = (type: string, body: object) =>
    raw ? write(type, body) : queued.push([type, body]);
  const output = new ChatOutput(outputOptions);
  const items = new OutputItems(emit, { logprobs, namespaces });
  if (compaction) items.add(compaction.item);
  job = startJob(ctx, spec, itemHooks(output, items));
  raw = opened ?? eventStream(reply, ctx);
  write("response.created", { response: response("in_progress", []) });
  write("response.in_progress", { response: response("in_progress", []) });
  for (const [type, body] of queued) write(type, body);
  bind(reply, job);
  try {
    await job.done;
    const done = finished(endOf(job.choices[0]!, output, items), items.items);
    write(terminalType(done), { response: done });
  } catch (err) {
    const e = toApiError(err);
    write("error", { code: e.code, message: e.message, param: e.param });
  }
  if (!reply.raw.destroyed) reply.raw.end();
  return reply;
}
