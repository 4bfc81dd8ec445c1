// OpenAI's compaction of a Responses conversation (ADR 0056): POST /v1/responses/compact
// takes a conversation (its input, after a previous response's) and answers it compacted:
// its user messages as they were, then one `compaction` item holding the model's summary of
// everything else (its answers, calls and their outputs). A client sends that output, and
// its next message, as the input of its next /v1/responses request, which reads the
// compaction item as the model's own earlier turn (chatRequestOf): a conversation that
// outgrew the context goes on in a fraction of it.
//
// The item's `encrypted_content` is this gateway's encoding of the summary ("emc1." and the
// text in base64url), opaque to clients as OpenAI's is, but not encrypted: the key that made
// it can read it (it is that key's own conversation), and any gateway of the model reads it
// (no key to share between replicas).
import type { FastifyReply, FastifyRequest } from "fastify";
import { ChatOutput } from "./chat-output.ts";
import { ApiError } from "./errors.ts";
import { type ServeContext, startJob } from "./jobs.ts";
import { bind, type ChatRun, checkModel, usageOf } from "./openai.ts";
import type { ChatCompletionRequest, ChatMessage } from "./schemas.ts";

/** What a compaction item's encrypted_content starts with (its format's version). */
const PREFIX = "emc1.";

/** A summary as a compaction item's encrypted_content. */
export function encodeCompaction(summary: string): string {
  return PREFIX + Buffer.from(summary, "utf8").toString("base64url");
}

/** The summary a compaction item holds; 400 (`param`) when this gateway did not make it. */
export function decodeCompaction(content: string, param: string): string {
  const body = content.startsWith(PREFIX) ? content.slice(PREFIX.length) : null;
  if (body === null || !/^[A-Za-z0-9_-]*$/.test(body))
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `${param}: not a compaction this gateway made (POST /v1/responses/compact makes them; another server's cannot be read here)`,
      { param },
    );
  return Buffer.from(body, "base64url").toString("utf8");
}

/** What the model is asked, after the conversation, to compact it. */
export const COMPACTION_PROMPT =
  "Summarize the conversation so far, so that it can go on from the summary alone: " +
  "what was asked, what was answered and done, and what is still open.";

/** The longest summary (tokens), and its share of the context at most. */
export const COMPACTION_MAX_TOKENS = 1024;

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

/**
 * The compacted conversation: `conversation`'s user messages as items, then the compaction
 * item of `summary`.
 */
export function compactedItems(
  conversation: readonly ChatMessage[],
  summary: string,
  newId: (prefix: string) => string,
) {
  const users = conversation
    .filter((m) => m.role === "user")
    .map((m) => ({
      id: newId("msg"),
      type: "message" as const,
      role: "user" as const,
      status: "completed" as const,
      content: [
        { type: "input_text" as const, text: typeof m.content === "string" ? m.content : "" },
      ],
    }));
  return [
    ...users,
    { id: newId("cmp"), type: "compaction" as const, encrypted_content: encodeCompaction(summary) },
  ];
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
  // The summary: asked after the conversation, greedy, at most a quarter of the context; a
  // conversation too long for the context has its oldest items dropped to fit (the summary
  // then covers what fits).
  const chat: ChatCompletionRequest = {
    model: ctx.servedModelName,
    messages: [
      ...(b.instructions ? [{ role: "system" as const, content: b.instructions }] : []),
      ...conversation,
      { role: "user", content: COMPACTION_PROMPT },
    ],
    max_completion_tokens: Math.min(COMPACTION_MAX_TOKENS, Math.floor(ctx.maxModelLen / 4)),
    temperature: 0,
  };
  const { spec, outputOptions } = await deps.fitted(chat);
  const job = startJob(ctx, spec);
  bind(reply, job);
  await job.done;
  const c = job.choices[0]!;
  const message = new ChatOutput(outputOptions).message(c.out.text) as { content?: unknown };
  const summary = typeof message.content === "string" ? message.content : "";
  const thought = (message as { reasoning_content?: unknown }).reasoning_content;
  const usage = usageOf(job);
  return {
    id: deps.newId("resp"),
    object: "response.compaction",
    created_at: Math.floor(Date.now() / 1000),
    output: compactedItems(conversation, summary, deps.newId),
    usage: {
      input_tokens: usage.prompt_tokens,
      input_tokens_details: { cached_tokens: usage.prompt_tokens_details.cached_tokens },
      output_tokens: usage.completion_tokens,
      output_tokens_details: {
        reasoning_tokens:
          typeof thought === "string" ? ctx.tokenizer.encode(thought, false).length : 0,
      },
      total_tokens: usage.total_tokens,
    },
  };
}
