// What constrains a request's output (docs/gateway.md): response_format json_object or
// json_schema, and a forced tool call (tools + a named tool_choice), each turned into the
// grammar (grammar.ts) its choices are decoded under.
import { ApiError } from "./errors.ts";
import { type TokenGrammar, type Vocabulary, vocabularyFor } from "./grammar.ts";
import type { ServeContext } from "./jobs.ts";
import { jsonObjectGrammar } from "./json-mode.ts";
import { schemaGrammar } from "./json-schema.ts";
import type { ChatCompletionRequest, CompletionRequest } from "./schemas.ts";

export interface ForcedTool {
  readonly name: string;
  /** The function's parameters: a JSON schema of an object. */
  readonly parameters: unknown;
}

/**
 * The function `tools` + `tool_choice` make the model call, or null (plain text). Only
 * forced calls are served: a named tool_choice, or "required" with one tool, whose
 * arguments are then constrained to its parameters' schema (as vLLM does for these);
 * "auto" (the model deciding whether to call, which needs the model's own tool-call
 * format parsed) is refused.
 */
export function forcedTool(b: ChatCompletionRequest): ForcedTool | null {
  const refuse = (param: string, message: string): never => {
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });
  };
  const tools = b.tools ?? [];
  if (!Array.isArray(tools)) return refuse("tools", "tools must be an array");
  const choice = b.tool_choice ?? (tools.length ? "auto" : "none");
  const functions = tools.map((t: unknown, i) => {
    const f = (t as { type?: unknown; function?: { name?: unknown; parameters?: unknown } })
      ?.function;
    if ((t as { type?: unknown })?.type !== "function" || typeof f?.name !== "string")
      refuse(`tools.${i}`, `tools[${i}] must be {"type": "function", "function": {"name", ...}}`);
    return {
      name: f!.name as string,
      parameters: f!.parameters ?? { type: "object", properties: {} },
    };
  });
  if (choice === "none") return null;
  if (choice === "required") {
    if (functions.length !== 1)
      refuse(
        "tool_choice",
        `tool_choice "required" with ${functions.length} tools (the model choosing one) is not supported: name one in tool_choice`,
      );
    return functions[0]!;
  }
  const named = (choice as { type?: unknown; function?: { name?: unknown } }).function?.name;
  if ((choice as { type?: unknown }).type === "function" && typeof named === "string") {
    const f = functions.find((x) => x.name === named);
    return f ?? refuse("tool_choice", `tool_choice names '${named}', which is not among tools`);
  }
  if (choice === "auto")
    return refuse(
      "tool_choice",
      'tool_choice "auto" (the model deciding whether to call a tool) is not supported: name the function in tool_choice ({"type": "function", "function": {"name": ...}}), or send "none"',
    );
  return refuse("tool_choice", `tool_choice ${JSON.stringify(choice).slice(0, 60)} is not valid`);
}

/** The vocabulary to constrain (byte-level tokenizers only; others: 400 naming `param`). */
function vocabularyOf(ctx: ServeContext, what: string, param: string): Vocabulary {
  const vocabulary = vocabularyFor(ctx.tokenizer, ctx.vocabSize);
  if (!vocabulary)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `${what} needs a byte-level BPE tokenizer (DeepSeek's is); this model's is not`,
      { param },
    );
  return vocabulary;
}

/** The grammar of a forced call's arguments: its parameters' schema. */
export function toolGrammar(ctx: ServeContext, tool: ForcedTool): TokenGrammar<unknown> {
  const vocabulary = vocabularyOf(ctx, "a tool call", "tool_choice");
  return schemaGrammar(vocabulary, tool.parameters, {
    param: "tools",
    label: `tool '${tool.name}' parameters`,
  }) as TokenGrammar<unknown>;
}

/**
 * response_format json_object or json_schema: the grammar that constrains each choice
 * (docs/gateway.md, JSON mode and structured outputs).
 */
export function jsonMode(
  ctx: ServeContext,
  b: ChatCompletionRequest | CompletionRequest,
): { grammar?: TokenGrammar<unknown> } {
  const format = (
    b as { response_format?: { type?: unknown; json_schema?: { schema?: unknown } } | null }
  ).response_format;
  if (format?.type !== "json_object" && format?.type !== "json_schema") return {};
  const vocabulary = vocabularyOf(ctx, `response_format ${format.type}`, "response_format");
  if (format.type === "json_object")
    return { grammar: jsonObjectGrammar(vocabulary) as TokenGrammar<unknown> };
  if (format.json_schema?.schema === undefined)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "response_format json_schema: json_schema.schema is missing",
      { param: "response_format" },
    );
  return { grammar: schemaGrammar(vocabulary, format.json_schema.schema) as TokenGrammar<unknown> };
}
