// OpenAI's compaction of a Responses conversation (ADRs 0056, 0058). POST
// /v1/responses/compact takes a conversation (its input, after a previous response's) and
// answers it compacted: its user messages as they were, then one `compaction` item holding
// them and the model's summary of everything else (its answers, calls and their outputs). A
// Responses request with `context_management` compacts its own conversation the same way when
// its prompt reaches a threshold, before it answers (server-side compaction), and its output
// starts with the compaction item.
//
// A compaction item stands for the whole conversation before it (compactedConversation): a
// request that sends it reads it as the system messages before it, its user messages, the
// summary as the model's own earlier turn, and (made inside a response) the last turn that
// response answered, whatever items the client kept before it (OpenAI's "items before the
// latest compaction item may be dropped"). So a client that chains by appending outputs to its
// input does not send the compacted turns back into the context.
//
// The item's `encrypted_content` is this gateway's encoding ("emc2." and JSON in base64url;
// "emc1.", the summary alone, is still read: in place, superseding nothing), opaque to clients
// as OpenAI's is, but not encrypted: the key that made it can read it (it is that key's own
// conversation), and any gateway of the model reads it (no key to share between replicas).

import { Value } from "@sinclair/typebox/value";
import type { FastifyReply, FastifyRequest } from "fastify";
import { ChatOutput } from "./chat-output.ts";
import { ApiError } from "./errors.ts";
import { type Job, type ServeContext, startJob } from "./jobs.ts";
import { bind, type ChatRun, checkModel, usageOf } from "./openai.ts";
import { type ChatCompletionRequest, ChatMessage } from "./schemas.ts";

/** What a compaction item's encrypted_content starts with (its format's version). */
const PREFIX = "emc2.";
/** The first format: the summary's text alone (read in place, superseding nothing). */
const PREFIX_V1 = "emc1.";

/**
 * What a compaction item holds: the compacted conversation's user messages, the summary, and
 * the turn after it (a server-side compaction's: the turn its response answered).
 */
export interface Compaction {
  readonly summary: string;
  /** The user messages' texts (null in a first-format item, which holds the summary alone). */
  readonly users: readonly string[] | null;
  readonly after: readonly ChatMessage[];
}

/** A compaction as a compaction item's encrypted_content. */
export function encodeCompaction(c: {
  summary: string;
  users: readonly string[];
  after?: readonly ChatMessage[];
}): string {
  const json = JSON.stringify({
    summary: c.summary,
    users: c.users,
    ...(c.after?.length ? { after: c.after } : {}),
  });
  return PREFIX + Buffer.from(json, "utf8").toString("base64url");
}

/** The compaction an item holds; 400 (`param`) when this gateway did not make it. */
export function decodeCompaction(content: string, param: string): Compaction {
  const foreign = () =>
    new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `${param}: not a compaction this gateway made (POST /v1/responses/compact and context_management make them; another server's cannot be read here)`,
      { param },
    );
  const [prefix, body] = [content.slice(0, PREFIX.length), content.slice(PREFIX.length)];
  if ((prefix !== PREFIX && prefix !== PREFIX_V1) || !/^[A-Za-z0-9_-]*$/.test(body))
    throw foreign();
  const text = Buffer.from(body, "base64url").toString("utf8");
  if (prefix === PREFIX_V1) return { summary: text, users: null, after: [] };
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw foreign();
  }
  const { summary, users, after = [] } = (v ?? {}) as Record<string, unknown>;
  // (checked as a request's messages are: the item came from the client)
  if (
    typeof summary !== "string" ||
    !Array.isArray(users) ||
    !users.every((u) => typeof u === "string") ||
    !Array.isArray(after) ||
    !after.every((m) => Value.Check(ChatMessage, m))
  )
    throw foreign();
  return { summary, users, after: after as ChatMessage[] };
}

/**
 * The conversation a compaction item stands for, in place of `before` (the messages before
 * it): their system and developer messages, its user messages, its summary as the model's
 * turn, then the turn after it. A first-format item (no users) supersedes nothing: `before`,
 * then the summary.
 */
export function compactedConversation(
  before: readonly ChatMessage[],
  c: Compaction,
): ChatMessage[] {
  const summary: ChatMessage = { role: "assistant", content: c.summary };
  if (c.users === null) return [...before, summary];
  return [
    ...before.filter((m) => m.role === "system" || m.role === "developer"),
    ...c.users.map((content): ChatMessage => ({ role: "user", content })),
    summary,
    ...structuredClone(c.after),
  ];
}

/** The texts of a conversation's user messages (what a compaction keeps as they were). */
export function userTexts(conversation: readonly ChatMessage[]): string[] {
  return conversation
    .filter((m) => m.role === "user")
    .map((m) => (typeof m.content === "string" ? m.content : ""));
}

/** What the model is asked, after the conversation, to compact it. */
export const COMPACTION_PROMPT =
  "Summarize the conversation so far, so that it can go on from the summary alone: " +
  "what was asked, what was answered and done, and what is still open.";

/** The longest summary (tokens), and its share of the context at most. */
export const COMPACTION_MAX_TOKENS = 1024;

/**
 * Where a conversation's last turn starts, the part a server-side compaction keeps after the
 * summary (the model answers it): the trailing run of user messages (and any answer begun
 * after them); after calls, the assistant message that made them and their outputs. Null when
 * nothing before that is the model's (no answer, call or output to summarize).
 */
export function lastTurnStart(messages: readonly ChatMessage[]): number | null {
  let t = messages.length - 1;
  if (t < 0) return null;
  if (messages[t]!.role === "tool") {
    while (t >= 0 && messages[t]!.role === "tool") t--;
    if (t < 0 || messages[t]!.role !== "assistant") return null;
  } else {
    if (messages[t]!.role === "assistant") t--; // (an answer begun: continued)
    while (t >= 0 && messages[t]!.role !== "user") t--;
    while (t > 0 && messages[t - 1]!.role === "user") t--;
    if (t < 0) return null;
  }
  const modelBefore = messages.slice(0, t).some((m) => m.role === "assistant" || m.role === "tool");
  return modelBefore ? t : null;
}

/**
 * A request's `context_management` as the prompt's length (tokens) that makes it compact
 * (null: none asked for). One entry of type "compaction"; its compact_threshold an integer of
 * at least 1, or absent (three quarters of the context, `maxModelLen`).
 */
export function compactThreshold(value: unknown, maxModelLen: number): number | null {
  if (value == null) return null;
  const bad = (message: string, param: string) =>
    new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });
  if (!Array.isArray(value))
    throw bad(
      'context_management is a list of entries ([{"type": "compaction", "compact_threshold": N}])',
      "context_management",
    );
  let threshold: number | null = null;
  for (const [i, entry] of value.entries()) {
    const e = (entry ?? {}) as { type?: unknown; compact_threshold?: unknown };
    if (typeof entry !== "object" || e.type !== "compaction")
      throw bad(
        `context_management[${i}]: only {"type": "compaction"} is supported (got type ${JSON.stringify(e.type ?? null).slice(0, 40)})`,
        `context_management.${i}.type`,
      );
    if (threshold !== null)
      throw bad(
        `context_management[${i}]: one compaction entry at most`,
        `context_management.${i}`,
      );
    const n = e.compact_threshold;
    if (n != null && !(Number.isSafeInteger(n) && (n as number) >= 1))
      throw bad(
        `context_management[${i}].compact_threshold: a whole number of tokens, at least 1`,
        `context_management.${i}.compact_threshold`,
      );
    threshold = (n as number | null | undefined) ?? Math.max(1, Math.floor((maxModelLen * 3) / 4));
  }
  return threshold;
}

/** What a summary cost: the usage a compaction reports (and a response adds to its own). */
export interface SummaryUsage {
  readonly input_tokens: number;
  readonly cached_tokens: number;
  readonly output_tokens: number;
  readonly reasoning_tokens: number;
}

/** How summarize asks for the summary. */
export interface SummaryOptions {
  /** The system message the conversation had (the Responses API's instructions). */
  readonly instructions?: string | null | undefined;
  /** The last user turn, which asks for the summary (default COMPACTION_PROMPT). */
  readonly prompt?: string;
  /** Called once the summary's job is admitted (a refusal before it is the request's). */
  readonly admitted?: (job: Job) => void;
  /** Called when the summary's job has its first step scheduled (it left the queue). */
  readonly started?: () => void;
}

/**
 * The model's summary of `conversation` (after o.instructions): asked after it (o.prompt), greedy, at most
 * a quarter of the context and COMPACTION_MAX_TOKENS; a conversation too long for the
 * context has its oldest items dropped to fit (`fitted`, as truncation "auto"), so the summary
 * covers what fits. A client that leaves cancels it (`reply`; none: a background response's,
 * whose cancel cancels the job o.admitted is given): null.
 */
export async function summarize(
  ctx: ServeContext,
  fitted: (chat: ChatCompletionRequest) => Promise<ChatRun>,
  conversation: readonly ChatMessage[],
  reply: FastifyReply | null,
  o: SummaryOptions = {},
): Promise<{ summary: string; usage: SummaryUsage } | null> {
  const { instructions, prompt = COMPACTION_PROMPT } = o;
  const chat: ChatCompletionRequest = {
    model: ctx.servedModelName,
    messages: [
      ...(instructions ? [{ role: "system" as const, content: instructions }] : []),
      ...conversation,
      { role: "user", content: prompt },
    ],
    max_completion_tokens: Math.min(COMPACTION_MAX_TOKENS, Math.floor(ctx.maxModelLen / 4)),
    temperature: 0,
  };
  const { spec, outputOptions } = await fitted(chat);
  const job = startJob(ctx, spec, o.started ? { onStarted: o.started } : {});
  if (reply) bind(reply, job);
  o.admitted?.(job);
  await job.done;
  const c = job.choices[0]!;
  if (c.finishReason === null) return null; // (the client left)
  const message = new ChatOutput(outputOptions).message(c.out.text) as { content?: unknown };
  const thought = (message as { reasoning_content?: unknown }).reasoning_content;
  const usage = usageOf(job);
  return {
    summary: typeof message.content === "string" ? message.content : "",
    usage: {
      input_tokens: usage.prompt_tokens,
      cached_tokens: usage.prompt_tokens_details.cached_tokens,
      output_tokens: usage.completion_tokens,
      reasoning_tokens:
        typeof thought === "string" ? ctx.tokenizer.encode(thought, false).length : 0,
    },
  };
}

/** What compact needs of the Responses machinery (responses.ts). */
export interface CompactDeps {
  /**
   * The conversation the request stands for: the previous response's messages, then its
   * input's (400 when the input is not valid input, or names what is not there).
   */
  conversationOf(req: FastifyRequest, b: CompactBody): ChatMessage[];
  /** The chat request run as truncation "auto" runs it: fitted to the context. */
  fitted(chat: ChatCompletionRequest): Promise<ChatRun>;
  newId(prefix: string): string;
}

/** POST /v1/responses/compact's body (its schema: responses.ts CompactRequest). */
export interface CompactBody {
  model?: string | null;
  input?: unknown;
  instructions?: string | null;
  previous_response_id?: string | null;
}

/** The compaction item of `conversation`'s user messages, `summary`, and the turn `after`. */
export function compactionItem(
  conversation: readonly ChatMessage[],
  summary: string,
  newId: (prefix: string) => string,
  after: readonly ChatMessage[] = [],
) {
  return {
    id: newId("cmp"),
    type: "compaction" as const,
    encrypted_content: encodeCompaction({ summary, users: userTexts(conversation), after }),
  };
}

/**
 * The compacted conversation: `conversation`'s user messages as items, then the compaction
 * item of them and `summary`.
 */
export function compactedItems(
  conversation: readonly ChatMessage[],
  summary: string,
  newId: (prefix: string) => string,
) {
  const users = userTexts(conversation).map((text) => ({
    id: newId("msg"),
    type: "message" as const,
    role: "user" as const,
    status: "completed" as const,
    content: [{ type: "input_text" as const, text }],
  }));
  return [...users, compactionItem(conversation, summary, newId)];
}

/** A summary's usage as a Responses usage object. */
export function responsesUsage(u: SummaryUsage) {
  return {
    input_tokens: u.input_tokens,
    input_tokens_details: { cached_tokens: u.cached_tokens },
    output_tokens: u.output_tokens,
    output_tokens_details: { reasoning_tokens: u.reasoning_tokens },
    total_tokens: u.input_tokens + u.output_tokens,
  };
}

/** Ends a request whose client left: nothing more is sent. */
export function leftReply(reply: FastifyReply): FastifyReply {
  reply.hijack();
  if (!reply.raw.destroyed) reply.raw.destroy();
  return reply;
}

/** POST /v1/responses/compact: the conversation compacted (a job of the model's summary). */
export async function compact(
  ctx: ServeContext,
  deps: CompactDeps,
  req: FastifyRequest<{ Body: CompactBody }>,
  reply: FastifyReply,
): Promise<unknown> {
  const b = req.body;
  if (b.model != null) checkModel(ctx, b.model);
  const conversation = deps.conversationOf(req, b);
  if (conversation.length === 0)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "nothing to compact: give the conversation as input, or previous_response_id",
      { param: "input" },
    );
  const s = await summarize(ctx, deps.fitted, conversation, reply, {
    instructions: b.instructions,
  });
  if (s === null) return leftReply(reply);
  return {
    id: deps.newId("resp"),
    object: "response.compaction",
    created_at: Math.floor(Date.now() / 1000),
    output: compactedItems(conversation, s.summary, deps.newId),
    usage: responsesUsage(s.usage),
  };
}
