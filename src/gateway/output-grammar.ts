// What constrains a request's output (docs/gateway.md): response_format json_object,
// json_schema or structural_tag (structural-tag.ts), vLLM's guided_json / guided_regex /
// guided_choice / guided_grammar (guided.ts) and structured_outputs, and tools
// (tool-calls.ts), each turned into the grammar (grammar.ts) its choices are decoded under.

import type { Tokenizer } from "../model/tokenizer.ts";
import { ApiError } from "./errors.ts";
import { type ByteAutomaton, TokenGrammar, type Vocabulary, vocabularyFor } from "./grammar.ts";
import { cfgGrammar, patternGrammar } from "./guided.ts";
import type { ServeContext } from "./jobs.ts";
import { jsonObjectGrammar, run, START } from "./json-mode.ts";
import { schemaGrammar } from "./json-schema.ts";
import { thinkingFirst } from "./reasoning.ts";
import { choicePattern } from "./regex.ts";
import type { ChatCompletionRequest, CompletionRequest } from "./schemas.ts";
import { structuralTagGrammar } from "./structural-tag.ts";
import {
  type CustomFormat,
  checkCustomTools,
  customInputGrammar,
  type ToolFunction,
  type ToolMode,
  toolCallGrammar,
  toolSymbols,
} from "./tool-calls.ts";

/**
 * Builds at startup, rather than on the event loop at the first request that needs it, what
 * constrained decoding keeps per vocabulary (grammar.ts): the vocabulary sorted and split by
 * the quote byte (~0.6 s at 129k tokens), the string parts of JSON and of a schema string
 * under lengths (~65 ms each), the text
 * of tool_choice "auto" and "none" (~60 ms each) and, for a thinking model, the thought's
 * first mask. Nothing for a tokenizer that is not byte-level.
 */
export function prepareVocabulary(
  tokenizer: Tokenizer,
  size: number,
  o: { thinking?: boolean } = {},
): void {
  const v = vocabularyFor(tokenizer, size);
  if (!v) return;
  v.split(0x22);
  const json = jsonObjectGrammar(v);
  for (const prefix of ['{"', '{"a": "'])
    json.mask(run(START, new Uint8Array(Buffer.from(prefix)))!);
  // A string under lengths (json-string.ts local): its part, kept per vocabulary.
  const lengths = schemaGrammar(v, {
    type: "object",
    properties: { a: { type: "string", minLength: 1 } },
    required: ["a"],
  });
  const inString = [...Buffer.from('{"a": "')].reduce(
    (s, b) => lengths.automaton.step(s, b)!,
    lengths.automaton.start,
  );
  lengths.mask(inString);
  for (const mode of ["auto", "none"] as const) {
    const g = toolCallGrammar(v, [], { mode, parallel: true });
    g?.mask(g.automaton.start);
  }
  if (o.thinking) {
    const g = thinkingFirst(json as TokenGrammar<unknown>);
    g.mask(g.automaton.start);
  }
}

/**
 * How a chat request's tools shape its output (docs/gateway.md, Tool calls):
 * - "text": no tools (or tool_choice "none" where the tokenizer has no tool-call tokens).
 * - "native": DeepSeek's own call format (tool-calls.ts) under its grammar; `named`: a
 *   named tool_choice (OpenAI finishes those "stop", others with calls "tool_calls");
 *   with response_format and tool_choice "auto", calls or an answer under the format.
 * - "arguments": a forced call where the tokenizer has no tool-call tokens: the output is
 *   the arguments alone, under the parameters' schema.
 */
export type ToolPlan =
  | { readonly kind: "text"; readonly tools: readonly ToolFunction[] }
  | {
      readonly kind: "native";
      readonly tools: readonly ToolFunction[];
      readonly grammar: TokenGrammar<unknown>;
      readonly named: boolean;
      /** The grammar is calls or an answer under response_format (callsOrAnswer). */
      readonly answerFormat?: boolean;
    }
  | {
      readonly kind: "arguments";
      readonly tools: readonly ToolFunction[];
      readonly tool: ToolFunction;
      readonly grammar: TokenGrammar<unknown>;
    };

/** OpenAI's rule for function names. */
const NAME = /^[a-zA-Z0-9_-]{1,64}$/;

/** The request's `tools`, checked (400 naming the bad one). */
export function requestTools(b: ChatCompletionRequest): ToolFunction[] {
  const tools = b.tools ?? [];
  if (!Array.isArray(tools)) return refuse("tools", "tools must be an array");
  const names = new Set<string>();
  return tools.map((t: unknown, i) => {
    const type = (t as { type?: unknown })?.type;
    const f = (t as { function?: Record<string, unknown>; custom?: Record<string, unknown> })?.[
      type === "custom" ? "custom" : "function"
    ];
    if ((type !== "function" && type !== "custom") || typeof f?.["name"] !== "string")
      refuse(
        `tools.${i}`,
        `tools[${i}] must be {"type": "function", "function": {"name", ...}} or {"type": "custom", "custom": {"name", ...}}`,
      );
    const name = f!["name"] as string;
    if (!NAME.test(name))
      refuse(`tools.${i}`, `tools[${i}]: a function name is 1-64 of a-z, A-Z, 0-9, _ and -`);
    if (names.has(name)) refuse(`tools.${i}`, `tools[${i}]: the name '${name}' is used twice`);
    names.add(name);
    const description = f!["description"];
    return {
      name,
      ...(typeof description === "string" ? { description } : {}),
      parameters: f!["parameters"] ?? { type: "object", properties: {} },
      ...(type === "custom"
        ? { custom: customFormat(f!["format"], `tools.${i}.custom.format`) }
        : {}),
    };
  });
}

/**
 * A custom tool's `format` (Chat Completions' form: `{"type": "text"}` or `{"type": "grammar",
 * "grammar": {"syntax": "lark" | "regex", "definition"}}`; absent: text).
 */
function customFormat(format: unknown, param: string): CustomFormat {
  if (format == null) return { type: "text" };
  const f = format as { type?: unknown; grammar?: { syntax?: unknown; definition?: unknown } };
  if (f.type === "text") return { type: "text" };
  const syntax = f.grammar?.syntax;
  const definition = f.grammar?.definition;
  if (
    f.type !== "grammar" ||
    (syntax !== "lark" && syntax !== "regex") ||
    typeof definition !== "string" ||
    definition.trim() === ""
  )
    return refuse(
      param,
      `${param} must be {"type": "text"} or {"type": "grammar", "grammar": {"syntax": "lark" | "regex", "definition": "..."}}`,
    );
  return { type: "grammar", syntax, definition };
}

const refuse = (param: string, message: string): never => {
  throw new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });
};

/** The plan for a chat request's tools and tool_choice (400 for what cannot be served). */
export function toolPlan(ctx: ServeContext, b: ChatCompletionRequest): ToolPlan {
  const tools = requestTools(b);
  const given = b.tool_choice;
  if (tools.length === 0) {
    if (given != null && given !== "none")
      refuse("tool_choice", "tool_choice needs tools: send the functions in tools");
    return { kind: "text", tools };
  }
  const choice = given ?? "auto";
  const kind = (choice as { type?: unknown }).type;
  const named = (choice as { function?: { name?: unknown }; custom?: { name?: unknown } } | null)?.[
    kind === "custom" ? "custom" : "function"
  ]?.name;
  let chosen: readonly ToolFunction[] = tools;
  let mode: ToolMode;
  if (choice === "auto" || choice === "required" || choice === "none") {
    mode = choice;
  } else if ((kind === "function" || kind === "custom") && typeof named === "string") {
    chosen = [toolNamed(tools, kind, named, "tool_choice")];
    mode = "required";
  } else if (kind === "allowed_tools") {
    // OpenAI's: calls only of these tools (all of them stay in the prompt).
    const a = (choice as { allowed_tools?: { mode?: unknown; tools?: unknown } }).allowed_tools;
    const param = "tool_choice.allowed_tools";
    if (
      (a?.mode !== "auto" && a?.mode !== "required") ||
      !Array.isArray(a.tools) ||
      a.tools.length === 0
    )
      return refuse(
        param,
        `${param} must be {"mode": "auto" | "required", "tools": [{"type": "function", "function": {"name": ...}} or {"type": "custom", "custom": {"name": ...}}, ...]}`,
      );
    mode = a.mode;
    chosen = [
      ...new Set(
        a.tools.map((t: unknown, i) => {
          const type = (t as { type?: unknown })?.type;
          const name = (t as Record<string, { name?: unknown } | undefined>)?.[
            type === "custom" ? "custom" : "function"
          ]?.name;
          if ((type !== "function" && type !== "custom") || typeof name !== "string")
            return refuse(
              `${param}.tools.${i}`,
              `${param}.tools[${i}] must be {"type": "function", "function": {"name": ...}} or {"type": "custom", "custom": {"name": ...}}`,
            );
          return toolNamed(tools, type, name, `${param}.tools.${i}`);
        }),
      ),
    ];
  } else {
    return refuse(
      "tool_choice",
      `tool_choice ${JSON.stringify(choice).slice(0, 60)} is not valid ("none", "auto", "required", {"type": "function", "function": {"name": ...}}, {"type": "custom", "custom": {"name": ...}} or {"type": "allowed_tools", "allowed_tools": {...}})`,
    );
  }
  const parallel = typeof named === "string" ? false : (b.parallel_tool_calls ?? true);
  const vocabulary = vocabularyFor(ctx.tokenizer, ctx.vocabSize);
  // Every custom tool's input compiled (kept for the grammar), a bad one named by its place.
  if (vocabulary) checkCustomTools(vocabulary, tools);
  const grammar =
    vocabulary &&
    toolCallGrammar(vocabulary, chosen, { mode, parallel, format: ctx.toolCallFormat });
  if (grammar)
    return {
      kind: "native",
      tools,
      grammar: grammar as TokenGrammar<unknown>,
      named: typeof named === "string",
    };
  // No tool-call tokens: only a call whose function is known can be served (its arguments).
  if (mode === "none") return { kind: "text", tools };
  if (chosen.length === 1 && mode === "required") {
    const tool = chosen[0]!;
    if (tool.custom) {
      const v = vocabularyOf(ctx, "a tool call", "tool_choice");
      const grammar = customInputGrammar(v, tool, eosSymbol(ctx, v), "tools");
      return { kind: "arguments", tools, tool, grammar };
    }
    const grammar = schemaGrammar(
      vocabularyOf(ctx, "a tool call", "tool_choice"),
      tool.parameters,
      { param: "tools", label: `tool '${tool.name}' parameters` },
      { lenient: true },
    ) as TokenGrammar<unknown>;
    return { kind: "arguments", tools, tool, grammar };
  }
  return refuse(
    "tool_choice",
    `tool_choice ${JSON.stringify(choice)} with ${tools.length} tools needs the model's tool-call tokens, which this model's tokenizer lacks: name the function in tool_choice`,
  );
}

/** The tool of `tools` named `name`, of `type` ("function" or "custom"; 400 naming `param`). */
function toolNamed(
  tools: readonly ToolFunction[],
  type: "function" | "custom",
  name: string,
  param: string,
): ToolFunction {
  const f = tools.find((x) => x.name === name);
  if (!f || (type === "custom") !== (f.custom !== undefined))
    refuse(param, `${param} names '${name}', which is not among tools' ${type} tools`);
  return f!;
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

/** What constrains a request's output, and the grammar of it. */
export interface OutputFormat {
  readonly grammar?: TokenGrammar<unknown>;
  /** The request field that asked for it ("response_format", "guided_regex", ...). */
  readonly param?: string;
  /** JSON (an object), or plain text (guided_regex, guided_choice, guided_grammar). */
  readonly kind?: "json" | "text";
}

/** The kinds of guided decoding (vLLM's fields). */
type GuidedKind = "json" | "regex" | "choice" | "grammar" | "structural_tag";
/** structured_outputs' keys taken here. */
const STRUCTURED_OUTPUTS = ["json", "regex", "choice", "grammar", "structural_tag"];

/** Strings in a guided_choice, at most. */
const MAX_CHOICES = 1024;

/**
 * The grammar that constrains each choice (docs/gateway.md, JSON mode and structured
 * outputs; guided decoding): response_format json_object or json_schema, or vLLM's
 * guided_json, guided_regex, guided_choice, guided_grammar, or their structured_outputs
 * form. At most one may be given (400 naming the second).
 */
export function outputFormat(
  ctx: ServeContext,
  b: ChatCompletionRequest | CompletionRequest,
): OutputFormat {
  const r = b as Record<string, unknown>;
  const given = r["structured_outputs"];
  if (given != null && !isRecord(given))
    refuse("structured_outputs", "structured_outputs must be an object");
  const so = (given ?? {}) as Record<string, unknown>;
  const guided: [string, GuidedKind, unknown][] = [];
  for (const [param, kind, value] of [
    ["guided_json", "json", r["guided_json"]],
    ["guided_regex", "regex", r["guided_regex"]],
    ["guided_choice", "choice", r["guided_choice"]],
    ["guided_grammar", "grammar", r["guided_grammar"]],
    ["structured_outputs.json", "json", so["json"]],
    ["structured_outputs.regex", "regex", so["regex"]],
    ["structured_outputs.choice", "choice", so["choice"]],
    ["structured_outputs.grammar", "grammar", so["grammar"]],
    ["structured_outputs.structural_tag", "structural_tag", so["structural_tag"]],
  ] as const)
    if (value != null) guided.push([param, kind, value]);
  for (const k of Object.keys(so))
    if (!STRUCTURED_OUTPUTS.includes(k) && so[k] != null)
      refuse(
        `structured_outputs.${k}`,
        `structured_outputs.${k} is not supported (${STRUCTURED_OUTPUTS.join(", ")} are)`,
      );
  const format = responseFormat(ctx, b);
  const asked = [...(format.grammar ? ["response_format"] : []), ...guided.map((g) => g[0])];
  if (asked.length > 1)
    refuse(asked[1]!, `${asked.join(" and ")} both constrain the output: give one`);
  if (guided.length === 0) return format;
  const [param, kind, value] = guided[0]!;
  const vocabulary = vocabularyOf(ctx, param, param);
  if (kind === "json") {
    const schema = fromText(value, param, "a JSON schema's text");
    const source = { param, label: param };
    return {
      grammar: schemaGrammar(vocabulary, schema, source) as TokenGrammar<unknown>,
      param,
      kind: "json",
    };
  }
  const eos = eosSymbol(ctx, vocabulary);
  if (kind === "structural_tag") {
    const tag = fromText(value, param, "a structural tag's JSON text");
    const grammar = structuralTagGrammar(vocabulary, tag, eos, param);
    return { grammar: grammar as TokenGrammar<unknown>, param, kind: "text" };
  }
  if (kind === "grammar") {
    if (typeof value !== "string" || value.trim() === "")
      return refuse(param, `${param} must be a grammar's text (GBNF or Lark)`);
    const grammar = cfgGrammar(vocabulary, value, eos, param);
    return { grammar: grammar as TokenGrammar<unknown>, param, kind: "text" };
  }
  let pattern: string;
  if (kind === "regex") {
    if (typeof value !== "string") return refuse(param, `${param} must be a string`);
    pattern = value;
  } else {
    if (
      !Array.isArray(value) ||
      value.length === 0 ||
      value.length > MAX_CHOICES ||
      value.some((c) => typeof c !== "string")
    )
      return refuse(param, `${param} must be 1 to ${MAX_CHOICES} strings`);
    pattern = choicePattern(value as string[]);
  }
  const grammar = patternGrammar(vocabulary, pattern, eos, param);
  return { grammar: grammar as TokenGrammar<unknown>, param, kind: "text" };
}

/** The end-of-sequence token's symbol in `vocabulary` (null: the model has none). */
function eosSymbol(ctx: ServeContext, vocabulary: Vocabulary): number | null {
  const eos = ctx.tokenizer.eosToken;
  return eos === null ? null : vocabulary.symbol(eos);
}

/** A field that takes an object or its JSON text: the object (400 naming `param` for bad text). */
function fromText(value: unknown, param: string, what: string): unknown {
  if (typeof value !== "string") return value;
  try {
    return JSON.parse(value);
  } catch {
    return refuse(param, `${param}: a string must be ${what}`);
  }
}

const isRecord = (x: unknown): x is Record<string, unknown> =>
  typeof x === "object" && x !== null && !Array.isArray(x);

/**
 * response_format json_object, json_schema or structural_tag: the grammar that constrains
 * each choice (docs/gateway.md, JSON mode and structured outputs; structural tags).
 */
function responseFormat(
  ctx: ServeContext,
  b: ChatCompletionRequest | CompletionRequest,
): OutputFormat {
  const format = (
    b as { response_format?: { type?: unknown; json_schema?: { schema?: unknown } } | null }
  ).response_format;
  const type = format?.type;
  if (!format || (type !== "json_object" && type !== "json_schema" && type !== "structural_tag"))
    return {};
  const vocabulary = vocabularyOf(ctx, `response_format ${type}`, "response_format");
  const param = "response_format";
  if (type === "structural_tag") {
    const grammar = structuralTagGrammar(vocabulary, format, eosSymbol(ctx, vocabulary), param);
    return { grammar: grammar as TokenGrammar<unknown>, param, kind: "text" };
  }
  if (type === "json_object")
    return { grammar: jsonObjectGrammar(vocabulary) as TokenGrammar<unknown>, param, kind: "json" };
  if (format.json_schema?.schema === undefined)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      "response_format json_schema: json_schema.schema is missing",
      { param: "response_format" },
    );
  const grammar = schemaGrammar(vocabulary, format.json_schema.schema) as TokenGrammar<unknown>;
  return { grammar, param, kind: "json" };
}

/** A state of CallsOrAnswer: before the first byte, in the calls, or in the answer. */
type EitherState = { readonly side: 0 } | { readonly side: 1 | 2; readonly s: unknown };
const EITHER_START: EitherState = { side: 0 };

/**
 * Tools with response_format (tool_choice "auto"): the answer is either calls (the tools'
 * grammar, entered by the calls-begin token) or a JSON answer under the format, chosen by
 * the first token. What OpenAI's structured outputs with tools give, and what agent
 * frameworks with an output type send.
 */
class CallsOrAnswer implements ByteAutomaton<EitherState> {
  readonly symbols = true;
  readonly start = EITHER_START;
  readonly #calls: ByteAutomaton<unknown>;
  readonly #answer: ByteAutomaton<unknown>;
  readonly #callsBegin: number;

  constructor(calls: ByteAutomaton<unknown>, answer: ByteAutomaton<unknown>, callsBegin: number) {
    this.#calls = calls;
    this.#answer = answer;
    this.#callsBegin = callsBegin;
  }

  step(st: EitherState, b: number): EitherState | null {
    if (st.side === 0) {
      if (b === this.#callsBegin) {
        const s = this.#calls.step(this.#calls.start, b);
        return s === null ? null : { side: 1, s };
      }
      if (b >= 256) return null; // no other symbol first: an empty answer is not JSON
      const s = this.#answer.step(this.#answer.start, b);
      return s === null ? null : { side: 2, s };
    }
    if (st.side === 1) {
      const s = this.#calls.step(st.s, b);
      return s === null ? null : { side: 1, s };
    }
    if (b >= 256 && !this.#answer.symbols) return null;
    const s = this.#answer.step(st.s, b);
    return s === null ? null : { side: 2, s };
  }

  isDone(st: EitherState): boolean {
    return st.side === 1
      ? this.#calls.isDone(st.s)
      : st.side === 2
        ? this.#answer.isDone(st.s)
        : false;
  }

  key(st: EitherState): string {
    return st.side === 0
      ? "either"
      : `${st.side === 1 ? "c" : "a"}|${(st.side === 1 ? this.#calls : this.#answer).key(st.s)}`;
  }

  local(st: EitherState): { key: string; byte: number } | null {
    if (st.side === 0) return null;
    return (st.side === 1 ? this.#calls : this.#answer).local?.(st.s) ?? null;
  }

  shared(st: EitherState): string | null {
    // The inner automata's shared masks hold for them alone; the calls' and the answer's
    // states keep them (neither allows the other's tokens after the first).
    if (st.side === 0) return null;
    return (st.side === 1 ? this.#calls : this.#answer).shared?.(st.s) ?? null;
  }
}

/**
 * The combined grammars used last, by their parts (both cached by their own builders). A
 * grammar keeps up to 256 masks of a vocabulary's size (16 KB each at DeepSeek's), so these
 * are bounded too: 16 pairs, least recently used out.
 */
const MAX_COMBINED = 16;
const combined: {
  calls: TokenGrammar<unknown>;
  answer: TokenGrammar<unknown>;
  grammar: TokenGrammar<unknown>;
}[] = [];

/**
 * The grammar of "calls or an answer under the format" over the calls grammar's vocabulary
 * (tool_choice "auto" with response_format); null where the vocabulary has no tool-call
 * tokens.
 */
export function callsOrAnswer(
  calls: TokenGrammar<unknown>,
  answer: TokenGrammar<unknown>,
): TokenGrammar<unknown> | null {
  const symbols = toolSymbols(calls.vocabulary);
  if (!symbols || answer.vocabulary !== calls.vocabulary) return null;
  const at = combined.findIndex((e) => e.calls === calls && e.answer === answer);
  const entry =
    at >= 0
      ? combined.splice(at, 1)[0]!
      : {
          calls,
          answer,
          grammar: new TokenGrammar(
            new CallsOrAnswer(
              calls.automaton,
              answer.automaton,
              symbols.callsBegin,
            ) as ByteAutomaton<unknown>,
            calls.vocabulary,
          ),
        };
  combined.push(entry);
  if (combined.length > MAX_COMBINED) combined.shift();
  return entry.grammar;
}
