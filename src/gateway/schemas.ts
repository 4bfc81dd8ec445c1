// Request bodies of the OpenAI-compatible routes, as TypeBox schemas: fastify validates
// them (Ajv, no type coercion) and the handlers get their static types. Unknown fields are
// accepted and ignored, as OpenAI clients send fields that change nothing here (user, ...);
// the ones that would change the answer and are not implemented (functions, a
// response_format other than text, json_object, json_schema or structural_tag, vLLM's beam
// search, ...) are refused by the routes (openai.ts: unsupported).
import { type Static, type TSchema, Type } from "@sinclair/typebox";
import { MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY } from "../model/generation-config.ts";
import { ContentPart } from "./content-parts.ts";

const Nullable = <T extends TSchema>(t: T) => Type.Union([t, Type.Null()]);

/**
 * vLLM's fields that shape what is sampled and how it reads, shared by chat, completions and
 * the Responses API (which has no stop strings, so no include_stop_str_in_output).
 */
export const VLLM_OUTPUT_FIELDS = {
  /** vLLM's extension (default true): false keeps special tokens in the text. */
  skip_special_tokens: Type.Optional(Nullable(Type.Boolean())),
  /** vLLM's extension: words (strings) the output may not contain (openai.ts badWordTokens). */
  bad_words: Type.Optional(
    Nullable(Type.Array(Type.String({ minLength: 1, maxLength: 256 }), { maxItems: 256 })),
  ),
  /** vLLM's extension: only these token ids are sampled. */
  allowed_token_ids: Type.Optional(
    Nullable(Type.Array(Type.Integer({ minimum: 0 }), { minItems: 1, maxItems: 1 << 18 })),
  ),
};

/** Sampling and length fields shared by both routes. */
const common = {
  model: Type.String({ minLength: 1 }),
  max_tokens: Type.Optional(Nullable(Type.Integer({ minimum: 1 }))),
  temperature: Type.Optional(Nullable(Type.Number({ minimum: 0, maximum: 2 }))),
  top_p: Type.Optional(Nullable(Type.Number({ exclusiveMinimum: 0, maximum: 1 }))),
  /** vLLM's extension: -1 or 0 turns it off. */
  top_k: Type.Optional(Nullable(Type.Integer({ minimum: -1 }))),
  /**
   * vLLM's extension: only tokens at least this many times as likely as the most likely one
   * are sampled (0 turns it off).
   */
  min_p: Type.Optional(Nullable(Type.Number({ minimum: 0, maximum: 1 }))),
  /**
   * vLLM's extension: the logits of the prompt's and the output's tokens divided by it when
   * positive, multiplied when not (> 1 discourages repeating them; 1 turns it off); at most
   * MAX_REPETITION_PENALTY.
   */
  repetition_penalty: Type.Optional(
    Nullable(Type.Number({ minimum: MIN_REPETITION_PENALTY, maximum: MAX_REPETITION_PENALTY })),
  ),
  seed: Type.Optional(Nullable(Type.Integer())),
  /** vLLM's extension: keep generating past the end-of-sequence token (up to max_tokens). */
  ignore_eos: Type.Optional(Nullable(Type.Boolean())),
  /** vLLM's extension: no stop token (end-of-sequence, stop_token_ids) before this many. */
  min_tokens: Type.Optional(Nullable(Type.Integer({ minimum: 0 }))),
  /**
   * vLLM's extension: lower is scheduled first, and may preempt higher (default 0); only
   * with --scheduling-policy priority (startJob refuses others).
   */
  priority: Type.Optional(Nullable(Type.Integer({ minimum: -(2 ** 31), maximum: 2 ** 31 - 1 }))),
  /**
   * vLLM's extension: a secret mixed into the prompt's cached blocks' hashes, so that only
   * requests with the same salt share them (tenants cannot probe each other's prompts by
   * timing); non-empty.
   */
  cache_salt: Type.Optional(Nullable(Type.String({ minLength: 1, maxLength: 1024 }))),
  /**
   * vLLM's extension: only the prompt's last k tokens are used (left truncation; -1: the
   * context length).
   */
  truncate_prompt_tokens: Type.Optional(Nullable(Type.Integer({ minimum: -1 }))),
  /**
   * vLLM's extension: every prompt token's logprob and rank, with this many most likely
   * tokens per position (not with stream).
   */
  prompt_logprobs: Type.Optional(Nullable(Type.Integer({ minimum: 0, maximum: 20 }))),
  ...VLLM_OUTPUT_FIELDS,
  /** vLLM's extension: the text ends after the stop string that ended it, not before. */
  include_stop_str_in_output: Type.Optional(Nullable(Type.Boolean())),
  /** vLLM's extension: logprobs name tokens "token_id:<id>" (exact ids, for RL trainers). */
  return_tokens_as_token_ids: Type.Optional(Nullable(Type.Boolean())),
  /** vLLM's extension: token ids that end a choice like the end-of-sequence token. */
  stop_token_ids: Type.Optional(
    Nullable(Type.Array(Type.Integer({ minimum: 0 }), { maxItems: 64 })),
  ),
  stop: Type.Optional(
    Type.Union([
      Type.String(),
      Type.Array(Type.String({ minLength: 1 }), { maxItems: 4 }),
      Type.Null(),
    ]),
  ),
  n: Type.Optional(Nullable(Type.Integer({ minimum: 1, maximum: 16 }))),
  presence_penalty: Type.Optional(Nullable(Type.Number({ minimum: -2, maximum: 2 }))),
  frequency_penalty: Type.Optional(Nullable(Type.Number({ minimum: -2, maximum: 2 }))),
  /** Token id (decimal string) -> bias added to its logit, -100..100 (OpenAI's). */
  logit_bias: Type.Optional(
    Nullable(
      Type.Record(
        Type.String({ pattern: "^[0-9]{1,10}$" }),
        Type.Number({ minimum: -100, maximum: 100 }),
        {
          maxProperties: 300,
          additionalProperties: false,
        },
      ),
    ),
  ),
  /**
   * vLLM's guided decoding (output-grammar.ts outputFormat): a JSON schema (or its text), a
   * pattern the whole output matches, strings it is one of, a GBNF grammar; or those as
   * structured_outputs {json, regex, choice, grammar}. At most one of them and response_format.
   */
  guided_json: Type.Optional(Type.Unknown()),
  guided_regex: Type.Optional(Type.Unknown()),
  guided_choice: Type.Optional(Type.Unknown()),
  guided_grammar: Type.Optional(Type.Unknown()),
  structured_outputs: Type.Optional(Type.Unknown()),
  stream: Type.Optional(Nullable(Type.Boolean())),
  stream_options: Type.Optional(
    Type.Union([Type.Object({ include_usage: Type.Optional(Type.Boolean()) }), Type.Null()]),
  ),
};

/**
 * A call in an assistant message of the history: a function's (its arguments: JSON text) or
 * a custom tool's (its input: text).
 */
const ToolCall = Type.Union([
  Type.Object({
    id: Type.String(),
    type: Type.Literal("function"),
    function: Type.Object({ name: Type.String({ minLength: 1 }), arguments: Type.String() }),
  }),
  Type.Object({
    id: Type.String(),
    type: Type.Literal("custom"),
    custom: Type.Object({ name: Type.String({ minLength: 1 }), input: Type.String() }),
  }),
]);

/**
 * A message: content is required except in an assistant message with tool_calls; a "tool"
 * message (a call's result) names its call (openai.ts checks the pairing of role and fields).
 */
export const ChatMessage = Type.Object({
  role: Type.Union([
    Type.Literal("system"),
    Type.Literal("developer"),
    Type.Literal("user"),
    Type.Literal("assistant"),
    Type.Literal("tool"),
  ]),
  content: Type.Optional(
    // (parts of any type: openai.ts refuses those that are not text, naming them)
    Type.Union([Type.String(), Type.Array(ContentPart, { minItems: 1 }), Type.Null()]),
  ),
  tool_calls: Type.Optional(Nullable(Type.Array(ToolCall))),
  tool_call_id: Type.Optional(Type.String()),
  /**
   * DeepSeek API's chat prefix completion: on the last message, an assistant's, the answer
   * continues its content (as continue_final_message).
   */
  prefix: Type.Optional(Nullable(Type.Boolean())),
});
export type ChatMessage = Static<typeof ChatMessage>;

/** An object's metadata, within OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512. */
export const Metadata = Type.Record(
  Type.String({ maxLength: 64 }),
  Type.String({ maxLength: 512 }),
  {
    maxProperties: 16,
  },
);

export const ChatCompletionRequest = Type.Object({
  ...common,
  /** Keep the completion (stored-completions.ts): listed, retrieved, updated, deleted later. */
  store: Type.Optional(Nullable(Type.Boolean())),
  metadata: Type.Optional(Nullable(Metadata)),
  /**
   * vLLM's: the most tokens the model's thought may take; one still open then is closed
   * (`</think>` forced) and the answer follows (reasoning.ts ThinkingBudget). Only for an
   * answer that thinks.
   */
  thinking_token_budget: Type.Optional(Nullable(Type.Integer({ minimum: 0 }))),
  /**
   * OpenAI's: other than "none" or "minimal" it asks V3.1 to think (its template's
   * `thinking`, unless chat_template_kwargs set it); R1 thinks whatever it says.
   */
  reasoning_effort: Type.Optional(Nullable(Type.String({ maxLength: 32 }))),
  /**
   * OpenAI's predicted output: text the answer is expected to repeat much of (a file with a
   * few edits); its tokens are the engine's drafts, so the answer (unchanged) comes in fewer
   * steps where it follows them.
   */
  prediction: Type.Optional(
    Nullable(
      Type.Object({
        type: Type.Literal("content"),
        content: Type.Union([
          Type.String(),
          Type.Array(Type.Object({ type: Type.Literal("text"), text: Type.String() }), {
            minItems: 1,
          }),
        ]),
      }),
    ),
  ),
  messages: Type.Array(ChatMessage, { minItems: 1 }),
  /** Function tools and how the model may call them (output-grammar.ts, tool-calls.ts). */
  tools: Type.Optional(Type.Unknown()),
  tool_choice: Type.Optional(Type.Unknown()),
  parallel_tool_calls: Type.Optional(Nullable(Type.Boolean())),
  /** Not implemented: refused when they would change the answer (openai.ts). */
  functions: Type.Optional(Type.Unknown()),
  /** {"type": "text"} or {"type": "json_object"} (JSON mode); others refused (openai.ts). */
  response_format: Type.Optional(Type.Unknown()),
  max_completion_tokens: Type.Optional(Nullable(Type.Integer({ minimum: 1 }))),
  /** vLLM's: extra variables for the chat template (e.g. DeepSeek-V3.1's `thinking`). */
  chat_template_kwargs: Type.Optional(Nullable(Type.Record(Type.String(), Type.Unknown()))),
  logprobs: Type.Optional(Nullable(Type.Boolean())),
  top_logprobs: Type.Optional(Nullable(Type.Integer({ minimum: 0, maximum: 20 }))),
  /**
   * vLLM's: the answer continues the last message (an assistant's) instead of opening a new
   * turn; its text is the continuation only.
   */
  continue_final_message: Type.Optional(Nullable(Type.Boolean())),
  /** vLLM's: open the assistant's turn after the messages (default true). */
  add_generation_prompt: Type.Optional(Nullable(Type.Boolean())),
});
export type ChatCompletionRequest = Static<typeof ChatCompletionRequest>;

/** Prompts in one completions request, at most. */
export const MAX_PROMPTS = 64;
const TokenIds = Type.Array(Type.Integer({ minimum: 0 }), { minItems: 1 });

export const CompletionRequest = Type.Object({
  ...common,
  /**
   * One prompt (text, or token ids) or several (OpenAI's batch form): each gets `n` choices,
   * indexed prompt * n + choice.
   */
  prompt: Type.Union([
    Type.String(),
    TokenIds,
    Type.Array(Type.String(), { minItems: 1, maxItems: MAX_PROMPTS }),
    Type.Array(TokenIds, { minItems: 1, maxItems: MAX_PROMPTS }),
  ]),
  logprobs: Type.Optional(Nullable(Type.Integer({ minimum: 0, maximum: 5 }))),
  echo: Type.Optional(Nullable(Type.Boolean())),
  /** As in chat (vLLM takes it here too). */
  response_format: Type.Optional(Type.Unknown()),
  /** Fill in the middle: the text after the completion (DeepSeek's FIM tokens; openai.ts). */
  suffix: Type.Optional(Type.Unknown()),
  /** Choices generated per prompt, of which the n most likely are returned (openai.ts). */
  best_of: Type.Optional(Type.Unknown()),
});
export type CompletionRequest = Static<typeof CompletionRequest>;

/** vLLM's POST /tokenize: exactly one of prompt (a completion's) and messages (a chat's). */
export const TokenizeRequest = Type.Object({
  model: Type.Optional(Nullable(Type.String({ minLength: 1 }))),
  prompt: Type.Optional(Type.String()),
  /** With prompt: the tokenizer's special tokens (BOS) added, as completions add them. */
  add_special_tokens: Type.Optional(Nullable(Type.Boolean())),
  messages: Type.Optional(Type.Array(ChatMessage, { minItems: 1 })),
  tools: Type.Optional(Type.Unknown()),
  tool_choice: Type.Optional(Type.Unknown()),
  chat_template_kwargs: Type.Optional(Nullable(Type.Record(Type.String(), Type.Unknown()))),
  /** With messages: the assistant's turn opened, as chat completions open it (default true). */
  add_generation_prompt: Type.Optional(Nullable(Type.Boolean())),
  /** With messages: the last (assistant) message left open, as chat completions continue it. */
  continue_final_message: Type.Optional(Nullable(Type.Boolean())),
  return_token_strs: Type.Optional(Nullable(Type.Boolean())),
});
export type TokenizeRequest = Static<typeof TokenizeRequest>;

/** vLLM's POST /detokenize. */
export const DetokenizeRequest = Type.Object({
  model: Type.Optional(Nullable(Type.String({ minLength: 1 }))),
  tokens: Type.Array(Type.Integer({ minimum: 0 }), { maxItems: 1 << 20 }),
});
export type DetokenizeRequest = Static<typeof DetokenizeRequest>;
