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
import { leftReply, type SummaryUsage, summarize } from "./compaction.ts";
import {
  COMPACT_PROMPT,
  type Compact,
  clearingDue,
  clearToolUses,
  compactionRequestOf,
  contextEditsOf,
  summaryTurn,
  thinkingTurnsCleared,
} from "./context-edits.ts";
import { documentText, storedFileText } from "./documents.ts";
import { ApiError, anthropicErrorBody, refusalHeaders, renameParam, toApiError } from "./errors.ts";
import type { FileStore } from "./files.ts";
import { type Choice, type Job, logServerError, type ServeContext, startJob } from "./jobs.ts";
import { bind, chatPrompt, chatRun, checkModel, eventStream, fittedRun } from "./openai.ts";
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
      /**
       * "system": instructions given at that point of the conversation (Anthropic's
       * SystemMessageParam: text only), a system message of the chat request.
       */
      role: Type.Union([Type.Literal("user"), Type.Literal("assistant"), Type.Literal("system")]),
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
  /** Anthropic's context editing and compaction (context-edits.ts checks it). */
  context_management: Type.Optional(Type.Unknown()),
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
        /**
         * "omitted": thinking blocks come empty (their text left out), as Anthropic's;
         * "summarized" and "updates" (a beta's, Claude Code sends it) give the thought.
         */
        display: Type.Optional(
          Type.Union([
            Type.Literal("summarized"),
            Type.Literal("omitted"),
            Type.Literal("updates"),
            Type.Null(),
          ]),
        ),
      },
      { additionalProperties: true },
    ),
  ),
} satisfies Record<string, TSchema>;

/**
 * What Anthropic runs on its side and this gateway does not, refused by name rather than
 * ignored (the answer would be made without it): MCP servers (the MCP connector) and a
 * container (code execution, skills).
 */
function refuseServerSide(b: Record<string, unknown>): void {
  const servers = b["mcp_servers"];
  if (Array.isArray(servers) ? servers.length > 0 : servers != null)
    throw bad(
      "mcp_servers: this gateway connects to no MCP servers; run an MCP client beside your application and send its tools as client tools (name, input_schema)",
      "mcp_servers",
    );
  if (b["container"] != null)
    throw bad(
      "container: this gateway runs no code execution or skills containers; send client tools instead",
      "container",
    );
}

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
    /** A compaction request: {type: "summarize", instructions?} (context-edits.ts). */
    compaction: Type.Optional(Type.Unknown()),
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

/**
 * The text of a content field: a string, or its text blocks; with `sourced`, documents and
 * search results too (as sourcedText renders them). Others are refused.
 */
function textOf(content: Blocks, param: string, sourced = false): string {
  if (typeof content === "string") return content;
  return (content as unknown[])
    .map((x, i) => {
      const b = (isObject(x) ? x : { type: "not an object" }) as AnyBlock;
      if (sourced && (b.type === "document" || b.type === "search_result"))
        return sourcedText(b, `${param}.${i}`);
      if (b.type !== "text" || typeof b["text"] !== "string")
        throw bad(
          `${param}[${i}]: a '${String(b.type).slice(0, 40)}' block is not supported here (text${sourced ? ", document, search_result" : ""} is)`,
          `${param}.${i}`,
        );
      return b["text"] as string;
    })
    .join("");
}

/**
 * A text document or a search result, as the prompt's text: its text in a tag that carries
 * its title (and source), the document's `context` first. A PDF (or a file, a URL) is
 * refused: DeepSeek reads text, and this gateway has no PDF reader. Citations are refused
 * too: the answer's text blocks carry none.
 */
function sourcedText(b: AnyBlock, param: string): string {
  const citations = b["citations"];
  if (isObject(citations) && citations["enabled"] === true)
    throw bad(
      "citations are not supported: the answer's text blocks carry none",
      `${param}.citations`,
    );
  const attr = (name: string, v: unknown) =>
    typeof v === "string" && v !== "" ? ` ${name}=${JSON.stringify(v)}` : "";
  if (b.type === "search_result") {
    const { source, title, content } = b as {
      source?: unknown;
      title?: unknown;
      content?: unknown;
    };
    if (typeof source !== "string" || typeof title !== "string" || !Array.isArray(content))
      throw bad("a search_result block has a source, a title and text blocks as content", param);
    const text = textOf(content as Blocks, `${param}.content`);
    return `<search_result${attr("source", source)}${attr("title", title)}>\n${text}\n</search_result>\n`;
  }
  const source = b["source"];
  const kind = isObject(source) ? source["type"] : undefined;
  let text: string;
  if (kind === "text" && typeof (source as { data?: unknown }).data === "string")
    text = (source as { data: string }).data;
  else if (kind === "content") {
    const content = (source as { content?: unknown }).content;
    if (typeof content !== "string" && !Array.isArray(content))
      throw bad("a content source holds a string or text blocks", `${param}.source.content`);
    text = textOf(content as Blocks, `${param}.source.content`);
  } else
    throw bad(
      `a document's source is text ({"type": "text", "media_type": "text/plain", "data"}) or content blocks here; a '${String(kind).slice(0, 40)}' source (a PDF, a file, a URL) is not supported: DeepSeek reads text`,
      `${param}.source`,
    );
  return documentText(b["title"], text, b["context"]);
}

/** Where Messages documents find the files they name (`{"type": "file", "file_id"}`). */
export interface MessageFiles {
  /** null: this gateway keeps no files (no --files-dir). */
  readonly store: FileStore | null;
  readonly owner: (req: FastifyRequest) => string;
}

/**
 * `b` with each document that names an uploaded file (Anthropic's Files API) given the
 * file's text instead (documents.ts: a text file, UTF-8; its filename the title when the
 * document has none), in user turns and tool results.
 */
async function withFileTexts<T extends MessagesRequest | CountRequest>(
  ctx: ServeContext,
  b: T,
  files: MessageFiles | undefined,
  owner: string,
): Promise<T> {
  const read = async (doc: Record<string, unknown>, param: string) => {
    const source = doc["source"] as Record<string, unknown>;
    const id = source["file_id"];
    if (typeof id !== "string")
      throw bad("a file source names its file: file_id", `${param}.source.file_id`);
    const { text, filename } = await storedFileText(
      ctx,
      { store: files?.store ?? null, owner },
      id,
      `${param}.source.file_id`,
      { param: `${param}.source`, instead: "send the document's text as a text source" },
    );
    return {
      ...doc,
      source: { type: "text", media_type: "text/plain", data: text },
      title: typeof doc["title"] === "string" && doc["title"] ? doc["title"] : filename,
    };
  };
  const isFileDoc = (x: unknown): x is Record<string, unknown> =>
    isObject(x) &&
    x["type"] === "document" &&
    isObject(x["source"]) &&
    x["source"]["type"] === "file";
  /** Blocks with their file documents read (the same array when none is). */
  const blocksOf = async (blocks: unknown[], param: string, inResults: boolean) => {
    let out: unknown[] | null = null;
    for (const [j, x] of blocks.entries()) {
      let y: unknown = x;
      if (isFileDoc(x)) y = await read(x, `${param}.${j}`);
      else if (
        inResults &&
        isObject(x) &&
        x["type"] === "tool_result" &&
        Array.isArray(x["content"])
      ) {
        const content = await blocksOf(x["content"], `${param}.${j}.content`, false);
        if (content !== x["content"]) y = { ...x, content };
      }
      if (y !== x) {
        out ??= [...blocks];
        out[j] = y;
      }
    }
    return out ?? blocks;
  };
  let messages: typeof b.messages | null = null;
  for (const [i, m] of b.messages.entries()) {
    if (m.role !== "user" || !Array.isArray(m.content)) continue;
    const content = await blocksOf(m.content, `messages.${i}.content`, true);
    if (content !== m.content) {
      messages ??= [...b.messages];
      messages[i] = { ...m, content: content as typeof m.content };
    }
  }
  return messages ? { ...b, messages } : b;
}

/** The chat completions request a Messages request means. */
export function chatRequestOfMessages(b: MessagesRequest | CountRequest): ChatCompletionRequest {
  refuseServerSide(b);
  const messages: ChatMessage[] = [];
  if (b.system !== undefined) {
    const system = textOf(b.system, "system");
    if (system) messages.push({ role: "system", content: system });
  }
  /** Where the conversation starts (after the system prompt): a compaction replaces it all. */
  const head = messages.length;
  for (const [i, m] of b.messages.entries()) {
    if (m.role === "system") {
      // (where the template puts it is the template's: DeepSeek's gather every system
      // message into the prompt's start)
      const text = textOf(m.content, `messages.${i}.content`);
      if (text) messages.push({ role: "system", content: text });
      continue;
    }
    const blocks: AnyBlock[] =
      typeof m.content === "string" ? [{ type: "text", text: m.content }] : m.content;
    let text = "";
    let compacted = false;
    const calls: NonNullable<ChatMessage["tool_calls"]> = [];
    const results: ChatMessage[] = [];
    for (const [j, blk] of blocks.entries()) {
      const at = `messages.${i}.content.${j}`;
      if (blk.type === "text" && typeof blk["text"] === "string") text += blk["text"] as string;
      else if ((blk.type === "document" || blk.type === "search_result") && m.role === "user")
        text += sourcedText(blk, at);
      else if (blk.type === "compaction" && m.role === "assistant") {
        // A compaction (context-edits.ts): its summary stands for everything before it.
        const summary = blk["content"];
        if (summary === null || summary === undefined) continue; // (one that failed: no-op)
        if (typeof summary !== "string" || summary === "")
          throw bad(
            "a compaction block's content is its summary: a string, not empty (null when the compaction failed)",
            `${at}.content`,
          );
        // (system messages are instructions, not conversation: they stay)
        messages.push(...messages.splice(head).filter((x) => x.role === "system"));
        messages.push(summaryTurn(summary));
        text = "";
        calls.length = 0;
        compacted = true;
      } else if (blk.type === "tool_use" && m.role === "assistant") {
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
              ? textOf(content as Blocks, `${at}.content`, true)
              : "";
        results.push({ role: "tool", tool_call_id: id, content: out });
      } else if (blk.type === "thinking" || blk.type === "redacted_thinking") {
        // Earlier turns' thinking: the chat templates leave it out of the prompt.
      } else
        throw bad(
          `a '${blk.type.slice(0, 40)}' block is not supported in a ${m.role} turn (text${m.role === "user" ? ", tool_result, document, search_result" : ", tool_use, thinking, compaction"} are)`,
          at,
        );
    }
    if (m.role === "user") {
      messages.push(...results);
      if (text || results.length === 0) messages.push({ role: "user", content: text });
    } else if (compacted && !text && calls.length === 0) {
      // (the compaction alone: its summary is the turn)
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

type StopReason =
  | "end_turn"
  | "max_tokens"
  | "stop_sequence"
  | "tool_use"
  | "compaction"
  | "model_context_window_exceeded";

/**
 * Why a choice ended, in Anthropic's words, and the stop sequence that ended it. `window`:
 * its max_tokens was cut to the rest of the context, so a length stop is the window's.
 */
function stopOf(
  c: Choice,
  calls: number,
  window: boolean,
): { stop_reason: StopReason; stop_sequence: string | null } {
  if (c.finishReason === "length")
    return {
      stop_reason: window ? "model_context_window_exceeded" : "max_tokens",
      stop_sequence: null,
    };
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
export function messagesRoutes(
  ctx: ServeContext,
  more?: (app: FastifyInstance) => Promise<void>,
  files?: MessageFiles,
) {
  return async (app: FastifyInstance) => {
    app.setErrorHandler((err, req, reply) => {
      const e = toApiError(renameParam(err, PARAMS));
      logServerError(ctx, `${req.method} ${req.url}`, err);
      reply.headers(refusalHeaders(e));
      reply.status(e.status).send(anthropicErrorBody(e));
    });
    if (more) await app.register(more);
    app.post<{ Body: CountRequest }>(
      "/v1/messages/count_tokens",
      { schema: { body: CountRequest } },
      async (req) => {
        // (`compaction` is ignored, as Anthropic's: the count is of the conversation as sent)
        const b = await withFileTexts(ctx, req.body, files, files?.owner(req) ?? "");
        const { chat, original } = await edited(ctx, b);
        const { prompt } = await chatPrompt(ctx, chat);
        return {
          input_tokens: prompt.length,
          ...(original !== null ? { context_management: { original_input_tokens: original } } : {}),
        };
      },
    );
    app.post<{ Body: MessagesRequest }>(
      "/v1/messages",
      { schema: { body: MessagesRequest } },
      (req, reply) => messages(ctx, req, reply, files),
    );
  };
}

/** A Messages request's chat request, its context edits (context-edits.ts) applied. */
interface Edited {
  readonly chat: ChatCompletionRequest;
  /** What the edits cleared (null: no context_management asked for). */
  readonly applied: object[] | null;
  /** The prompt's tokens before the edits (null: no context_management). */
  readonly original: number | null;
  /** The compaction due (its trigger reached), or null. */
  readonly compact: Compact | null;
}

async function edited(ctx: ServeContext, b: MessagesRequest | CountRequest): Promise<Edited> {
  let chat = chatRequestOfMessages(b);
  const edits = contextEditsOf(b.context_management, ctx.maxModelLen);
  if (edits === null) return { chat, applied: null, original: null, compact: null };
  const count = async (c: ChatCompletionRequest) => (await chatPrompt(ctx, c)).prompt.length;
  const original = await count(chat);
  let tokens = original;
  const applied: object[] = [];
  if (edits.clearThinking) {
    const n = thinkingTurnsCleared(b.messages, edits.clearThinking.keep);
    // (the templates never render an earlier turn's thought: no tokens go)
    if (n > 0)
      applied.push({
        type: "clear_thinking_20251015",
        cleared_thinking_turns: n,
        cleared_input_tokens: 0,
      });
  }
  const e = edits.clearToolUses;
  if (e && clearingDue(e, chat.messages, tokens)) {
    const r = clearToolUses(chat.messages, e);
    if (r.cleared > 0) {
      const next = { ...chat, messages: r.messages };
      const after = await count(next);
      if (tokens - after >= e.clearAtLeast) {
        applied.push({
          type: "clear_tool_uses_20250919",
          cleared_tool_uses: r.cleared,
          cleared_input_tokens: tokens - after,
        });
        chat = next;
        tokens = after;
      }
    }
  }
  const compact = edits.compact && tokens >= edits.compact.trigger ? edits.compact : null;
  return { chat, applied, original, compact };
}

/** A request that compacts (`compaction`): the fields that shape an answer are refused. */
function checkCompactionRequest(b: MessagesRequest): void {
  const refuse = (what: string, param: string) =>
    bad(`a compaction request (compaction) gives no answer, so it takes no ${what}`, param);
  if (b.context_management != null)
    throw refuse("context_management (they do not combine)", "context_management");
  if (b.stop_sequences?.length) throw refuse("stop_sequences", "stop_sequences");
  if (b.output_config?.format) throw refuse("output format", "output_config.format");
  if (b.tool_choice?.type === "any" || b.tool_choice?.type === "tool")
    throw refuse(`tool_choice ${b.tool_choice.type}`, "tool_choice");
}

/** The block a compaction answers with (content null: the summary came out empty). */
interface CompactionBlock {
  readonly type: "compaction";
  readonly content: string | null;
  readonly encrypted_content: null;
}

/** A summary's usage as an entry of Anthropic's usage.iterations. */
const compactionIteration = (u: SummaryUsage) => ({
  type: "compaction",
  input_tokens: u.input_tokens - u.cached_tokens,
  cache_creation_input_tokens: 0,
  cache_read_input_tokens: u.cached_tokens,
  cache_creation: null,
  output_tokens: u.output_tokens,
});

const NO_USAGE = {
  input_tokens: 0,
  cache_creation_input_tokens: 0,
  cache_read_input_tokens: 0,
  output_tokens: 0,
};

async function messages(
  ctx: ServeContext,
  req: FastifyRequest<{ Body: MessagesRequest }>,
  reply: FastifyReply,
  files: MessageFiles | undefined,
): Promise<unknown> {
  const b = await withFileTexts(ctx, req.body, files, files?.owner(req) ?? "");
  const compactOnly = compactionRequestOf(b.compaction);
  if (compactOnly) checkCompactionRequest(b);
  let { chat, applied, compact } = await edited(ctx, b);
  const managed = applied !== null ? { context_management: { applied_edits: applied } } : {};
  const id = `msg_${randomBytes(12).toString("hex")}`;
  const head = { id, type: "message", role: "assistant", model: ctx.servedModelName };
  // Streamed: the events open with the first job admitted (until then a refusal is still a
  // plain error response); after that, what fails is an error event.
  const events = b.stream ? new MessageEvents(ctx, reply, head) : null;
  try {
    return await answer();
  } catch (err) {
    if (!events?.opened) throw err;
    events.send(anthropicErrorBody(toApiError(err)));
    events.end();
    return reply;
  }

  async function answer(): Promise<unknown> {
    // A compaction (asked for, or its trigger reached): the model's summary of the
    // conversation comes first, as a compaction block; the answer, if any, runs on the
    // summary alone. Streamed, the block starts as the summary's job is admitted, so that
    // the client hears from the stream (pings) while the summary is made.
    let compaction: { block: CompactionBlock; usage: SummaryUsage } | null = null;
    if (compactOnly || compact) {
      checkModel(ctx, b.model);
      const s = await summarize(ctx, (c) => fittedRun(ctx, c, true), chat.messages, reply, {
        prompt: (compactOnly ?? compact)?.instructions ?? COMPACT_PROMPT,
        admitted: () => {
          events?.open(NO_USAGE);
          events?.send(COMPACTION_START);
        },
      });
      if (s === null) return events?.opened ? events.end() : leftReply(reply); // (the client left)
      const summary = s.summary.trim() === "" ? null : s.summary; // (null: it failed)
      compaction = {
        block: { type: "compaction", content: summary, encrypted_content: null },
        usage: s.usage,
      };
      events?.send(compactionDelta(compaction.block));
      events?.send({ type: "content_block_stop", index: 0 });
      if (summary !== null) {
        const system = chat.messages.filter((m) => m.role === "system");
        // (an answer begun, continued after the summary)
        const prefill = chat.continue_final_message ? [chat.messages.at(-1)!] : [];
        chat = { ...chat, messages: [...system, summaryTurn(summary), ...prefill] };
      }
      if (compactOnly || compact?.pause) {
        const usage = { ...NO_USAGE, iterations: [compactionIteration(s.usage)] };
        const stop = { stop_reason: "compaction", stop_sequence: null };
        if (!events) return { ...head, content: [compaction.block], ...stop, usage, ...managed };
        events.send({ type: "message_delta", delta: stop, usage, ...managed });
        events.send({ type: "message_stop" });
        return events.end();
      }
    }
    // A max_tokens past the context's rest runs to the window's end (Anthropic's).
    const { spec, outputOptions } = await chatRun(ctx, chat, { toWindow: true });
    const window = spec.prompts[0]!.maxTokens < b.max_tokens;
    /** display "omitted": thinking blocks without their text. */
    const omitted = b.thinking?.display === "omitted";
    /** The usage: the answer's, with the summary's as a separate iteration. */
    const usageWith = (u: ReturnType<typeof usageOf>) =>
      compaction
        ? { ...u, iterations: [compactionIteration(compaction.usage), { type: "message", ...u }] }
        : u;
    if (!events) {
      const job = startJob(ctx, spec);
      bind(reply, job);
      await job.done;
      const c = job.choices[0]!;
      const m = new ChatOutput(outputOptions).message(c.out.text) as {
        content: string | null;
        reasoning_content?: string;
        tool_calls?: { id: string; function: { name: string; arguments: string } }[];
      };
      const content: object[] = compaction ? [compaction.block] : [];
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
        ...stopOf(c, calls, window),
        usage: usageWith(usageOf(ctx, job, m.reasoning_content)),
        ...managed,
      };
    }

    // Streamed: the answer's blocks (from index 1 after a compaction block).
    const send = (o: { type: string }) => events.send(o);
    const blocks = new BlockStream(send, omitted, compaction ? 1 : 0);
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
        stop = stopOf(c, blocks.calls, window);
      },
    });
    // Admitted: the events start (unless a compaction's started them).
    events.open({ ...usageOf(ctx, job), output_tokens: 0 });
    bind(reply, job);
    await job.done;
    // The whole usage again: message_start's came before the prefix cache was looked up.
    send({
      type: "message_delta",
      delta: stop ?? { stop_reason: "end_turn", stop_sequence: null },
      usage: usageWith(usageOf(ctx, job, blocks.thought)),
      ...managed,
    } as unknown as { type: string });
    send({ type: "message_stop" });
    return events.end();
  }
}

/** One server-sent event: `event: <type>` and its JSON. */
const sse = (o: { type: string }) => `event: ${o.type}\ndata: ${JSON.stringify(o)}\n\n`;

/**
 * A streamed message's events: written once the stream is opened (its first job admitted),
 * queued before; pings (Anthropic's keepalive) while it is quiet.
 */
class MessageEvents {
  readonly #ctx: ServeContext;
  readonly #reply: FastifyReply;
  readonly #head: object;
  #raw: FastifyReply["raw"] | null = null;
  readonly #pending: string[] = [];

  constructor(ctx: ServeContext, reply: FastifyReply, head: object) {
    this.#ctx = ctx;
    this.#reply = reply;
    this.#head = head;
  }

  get opened(): boolean {
    return this.#raw !== null;
  }

  /** Sends the headers and message_start (its usage as known now); again, nothing. */
  open(usage: object): void {
    if (this.#raw) return;
    const raw = eventStream(this.#reply, this.#ctx, sse({ type: "ping" }));
    this.#raw = raw;
    const message = { ...this.#head, content: [], stop_reason: null, stop_sequence: null, usage };
    raw.write(sse({ type: "message_start", message } as { type: string }));
    for (const e of this.#pending) raw.write(e);
    this.#pending.length = 0;
  }

  send(o: object): void {
    const event = sse(o as { type: string });
    if (this.#raw === null) this.#pending.push(event);
    else if (!this.#raw.destroyed) this.#raw.write(event);
  }

  /** Ends the stream (the reply, for the route to return). */
  end(): FastifyReply {
    if (this.#raw && !this.#raw.destroyed) this.#raw.end();
    return this.#reply;
  }
}

/** A compaction block's start, at index 0 (its content follows in one delta). */
const COMPACTION_START = {
  type: "content_block_start",
  index: 0,
  content_block: { type: "compaction", content: null, encrypted_content: null },
};

/** A compaction block's content, in one delta. */
const compactionDelta = ({ content }: CompactionBlock) => ({
  type: "content_block_delta",
  index: 0,
  delta: { type: "compaction_delta", content, encrypted_content: null },
});

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

  /**
   * `omitted`: thinking blocks start and stop with no thinking_delta (display "omitted");
   * `first`: the first block's index (1 after a compaction block).
   */
  constructor(send: (o: { type: string }) => void, omitted = false, first = 0) {
    this.#send = send;
    this.#omitted = omitted;
    this.#index = first - 1;
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
