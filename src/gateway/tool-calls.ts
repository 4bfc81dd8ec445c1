// Tool calls in DeepSeek's own format (TOOL_TOKENS, src/model/tokenizer.ts): the grammar a
// choice is decoded under when a request has tools, and the parser that turns its text into
// OpenAI's `content` and `tool_calls`.
//
// The grammar lets the model write text, then (tool_choice "auto") decide to call: once it
// samples `<｜tool▁calls▁begin｜>` the rest is constrained to well-formed calls of the
// request's functions, each call's arguments to the function's parameters (json-schema.ts).
// "required" and a named function start at the calls; "none" never allows them. Text is
// free except that it cannot spell the calls-begin marker in plain bytes, so a marker in
// the decoded text is always the token: the parser, reading text, sees what the grammar saw.
//
// A custom tool (OpenAI's `"type": "custom"`) takes text, not JSON: its input is free text,
// or text in a Lark grammar or matching a regular expression, written where a function's
// arguments go. The input cannot hold what ends arguments (V3: a newline and three
// backticks; V3.1: the call-end token's text), so the parser ends it where the grammar did.
import { type ChatMessage, TOOL_TOKENS } from "../model/tokenizer.ts";
import { type ByteAutomaton, GrammarCache, TokenGrammar, type Vocabulary } from "./grammar.ts";
import { cfgGrammar, patternGrammar } from "./guided.ts";
import { compileSchema } from "./json-schema.ts";

/** A custom tool's input: free text, or text in a grammar's language. */
export type CustomFormat =
  | { readonly type: "text" }
  | { readonly type: "grammar"; readonly syntax: "lark" | "regex"; readonly definition: string };

/** A tool of the request's `tools`: a function, or a custom tool (`custom` set). */
export interface ToolFunction {
  readonly name: string;
  readonly description?: string;
  /** A JSON schema of an object (a function's). */
  readonly parameters: unknown;
  /** A custom tool's input format: its input is this text, not JSON arguments. */
  readonly custom?: CustomFormat;
}

/** The symbol custom inputs' automata take as "the input may end here". */
const PROBE = 0xffff;

/**
 * The grammar of a custom tool's input over `vocabulary`, ending with the end-of-sequence
 * symbol `eos` (400 naming `param` for a definition that cannot be compiled).
 */
export function customInputGrammar(
  vocabulary: Vocabulary,
  f: ToolFunction,
  eos: number | null,
  param: string,
): TokenGrammar<unknown> {
  const c = f.custom ?? { type: "text" };
  const g =
    c.type === "text"
      ? patternGrammar(vocabulary, "[\\s\\S]*", eos, param)
      : c.syntax === "regex"
        ? patternGrammar(vocabulary, c.definition, eos, param)
        : cfgGrammar(vocabulary, c.definition, eos, param, "lark");
  return g as TokenGrammar<unknown>;
}

/** "auto": text or calls; "required": calls only; "none": text only. */
export type ToolMode = "auto" | "required" | "none";

export interface ToolCallOptions {
  readonly mode: ToolMode;
  /** More than one call in a turn (OpenAI's parallel_tool_calls). */
  readonly parallel: boolean;
  /** The model's call format (default deepseek-v3). */
  readonly format?: ToolCallFormat;
  /** The vocabulary's longest token in bytes (json-schema.ts CompileOptions). */
  readonly tokenBytes?: number;
  /**
   * Custom tools' inputs by tool name: automata that step PROBE where the input may end
   * (customInputGrammar's, built with eos PROBE). Required for each custom tool.
   */
  readonly customInputs?: ReadonlyMap<string, ByteAutomaton<unknown>>;
}

/**
 * DeepSeek's call formats, inside `<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>`:
 * - deepseek-v3 (V3, R1): `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>`,
 *   calls after the first on a new line;
 * - deepseek-v3.1 (V3.1): `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`, calls
 *   one after the other.
 */
export type ToolCallFormat = "deepseek-v3" | "deepseek-v3.1";

export const TOOL_CALL_FORMATS: readonly ToolCallFormat[] = ["deepseek-v3", "deepseek-v3.1"];

/** A call in `format`, as the model writes it (and as a template renders it). */
export function formatCall(format: ToolCallFormat, name: string, args: string): string {
  const t = TOOL_TOKENS;
  return format === "deepseek-v3.1"
    ? `${t.callBegin}${name}${t.sep}${args}${t.callEnd}`
    : `${t.callBegin}function${t.sep}${name}${ARGS_OPEN}${args}${ARGS_CLOSE}${t.callEnd}`;
}

const utf8 = (s: string) => [...Buffer.from(s, "utf8")];

/** Between a call's name and its arguments, and after its arguments. */
const ARGS_OPEN = "\n```json\n";
const ARGS_CLOSE = "\n```";

/** A custom tool's input so far: its automaton's state (null: dead), the terminator's bytes matched, and whether the input could end where they began. */
interface CustomArgs {
  readonly inner: unknown;
  readonly k: number;
  readonly ok: boolean;
}

/** Phases of the automaton's state. */
const P = { Text: 0, Literal: 1, Name: 2, Args: 3, Next: 4, Done: 5 } as const;

/**
 * Text: `i` marker bytes matched; Literal: literal `t`, `i` units in; Name: trie node `i`;
 * Args: function `t`, its arguments' state `inner`.
 */
export interface ToolState {
  readonly p: number;
  readonly i: number;
  readonly t: number;
  readonly inner?: unknown;
}

const TEXT: ToolState = { p: P.Text, i: 0, t: 0 };
const NEXT: ToolState = { p: P.Next, i: 0, t: 0 };
const DONE: ToolState = { p: P.Done, i: 0, t: 0 };
const NAME: ToolState = { p: P.Name, i: 0, t: 0 };
/** The literals: the calls' opening, a call's head, a call's close. */
const OPEN = 0;
const HEAD = 1;
const CLOSE = 2;

/** Calls over a vocabulary's symbols (which must hold DeepSeek's tool-call tokens). */
export class ToolCallAutomaton implements ByteAutomaton<ToolState> {
  readonly symbols = true;
  readonly start: ToolState;
  readonly #parallel: boolean;
  readonly #mode: ToolMode;
  readonly #format: ToolCallFormat;
  readonly #args: ByteAutomaton<unknown>[];
  /** Per tool: a custom tool (its input is text, CustomArgs). */
  readonly #custom: boolean[];
  /** What a custom input cannot hold: V3's argument fence, V3.1's call-end token's text. */
  readonly #terminator: number[];
  readonly #callEnd: number;
  readonly #literals: number[][];
  readonly #callsBegin: number;
  readonly #callBegin: number;
  readonly #callsEnd: number;
  /** Tool-call symbols text may not hold (all but calls-begin). */
  readonly #toolSymbols: Set<number>;
  /** The calls-begin marker's bytes and their KMP failure table. */
  readonly #marker: number[];
  readonly #fail: number[];
  /** Trie of `name + ARGS_OPEN`: children per node; the function a leaf ends. */
  readonly #trie: Map<number, number>[] = [new Map()];
  readonly #leaf = new Map<number, number>();

  constructor(
    symbols: Record<keyof typeof TOOL_TOKENS, number>,
    tools: readonly ToolFunction[],
    o: ToolCallOptions,
  ) {
    this.#mode = o.mode;
    this.#parallel = o.parallel;
    this.#format = o.format ?? "deepseek-v3";
    const v31 = this.#format === "deepseek-v3.1";
    this.#callsBegin = symbols.callsBegin;
    this.#callBegin = symbols.callBegin;
    this.#callsEnd = symbols.callsEnd;
    this.#toolSymbols = new Set(Object.values(symbols).filter((s) => s !== symbols.callsBegin));
    // V3: the call's type before the name, the arguments in a json block; V3.1: the name
    // at once, the raw arguments right after the separator.
    const head = v31 ? [symbols.callBegin] : [symbols.callBegin, ...utf8("function"), symbols.sep];
    const close = v31 ? [symbols.callEnd] : [...utf8(ARGS_CLOSE), symbols.callEnd];
    this.#literals = [[symbols.callsBegin, ...head], head, close];
    // Lenient: what the subset does not cover (`uniqueItems`, a `pattern` with lookahead,
    // ...) is not enforced rather than refused; the rest of the parameters' schema is.
    this.#args = tools.map((f) => {
      if (!f.custom)
        return compileSchema(
          f.parameters,
          { param: "tools", label: `tool '${f.name}' parameters` },
          { lenient: true, tokenBytes: o.tokenBytes },
        ) as ByteAutomaton<unknown>;
      const input = o.customInputs?.get(f.name);
      if (!input) throw new Error(`custom tool '${f.name}' has no input automaton`);
      return input;
    });
    this.#custom = tools.map((f) => f.custom !== undefined);
    this.#callEnd = symbols.callEnd;
    this.#terminator = utf8(v31 ? TOOL_TOKENS.callEnd : ARGS_CLOSE);
    tools.forEach((f, t) => {
      let node = 0;
      const entry = v31 ? [...utf8(f.name), symbols.sep] : utf8(f.name + ARGS_OPEN);
      for (const b of entry) {
        let child = this.#trie[node]!.get(b);
        if (child === undefined) {
          child = this.#trie.length;
          this.#trie.push(new Map());
          this.#trie[node]!.set(b, child);
        }
        node = child;
      }
      // Names have no newline (nor a symbol), so no name's entry is a prefix of another's.
      this.#leaf.set(node, t);
    });
    this.#marker = utf8(TOOL_TOKENS.callsBegin);
    this.#fail = failure(this.#marker);
    this.start = o.mode === "auto" || o.mode === "none" ? TEXT : { p: P.Literal, t: OPEN, i: 0 };
  }

  step(s: ToolState, b: number): ToolState | null {
    switch (s.p) {
      case P.Text: {
        if (b >= 256) {
          if (b === this.#callsBegin)
            return this.#mode === "none" ? null : { p: P.Literal, t: OPEN, i: 1 };
          return this.#toolSymbols.has(b) ? null : TEXT;
        }
        let m = s.i;
        while (m > 0 && this.#marker[m] !== b) m = this.#fail[m - 1]!;
        if (this.#marker[m] === b) m++;
        if (m === this.#marker.length) return null;
        return m === 0 ? TEXT : { p: P.Text, i: m, t: 0 };
      }
      case P.Literal: {
        const lit = this.#literals[s.t]!;
        if (lit[s.i] !== b) return null;
        if (s.i + 1 < lit.length) return { p: P.Literal, t: s.t, i: s.i + 1 };
        return s.t === CLOSE ? NEXT : NAME;
      }
      case P.Name: {
        const child = this.#trie[s.i]!.get(b);
        if (child === undefined) return null;
        const t = this.#leaf.get(child);
        if (t === undefined) return { p: P.Name, i: child, t: 0 };
        const start = this.#args[t]!.start;
        const inner = this.#custom[t] ? ({ inner: start, k: 0, ok: false } as CustomArgs) : start;
        return { p: P.Args, i: 0, t, inner };
      }
      case P.Args: {
        if (this.#custom[s.t]) return this.#customStep(s.t, s.inner as CustomArgs, b);
        if (b >= 256) return null;
        const args = this.#args[s.t]!;
        const inner = args.step(s.inner, b);
        if (inner === null) return null;
        return args.isDone(inner) ? { p: P.Literal, t: CLOSE, i: 0 } : { ...s, inner };
      }
      case P.Next:
        if (b === this.#callsEnd) return DONE;
        if (!this.#parallel) return null;
        if (b === 0x0a) return { p: P.Literal, t: HEAD, i: 0 };
        if (b !== this.#callBegin) return null;
        // V3.1's head is the call-begin token alone: the name follows.
        return this.#literals[HEAD]!.length > 1 ? { p: P.Literal, t: HEAD, i: 1 } : NAME;
      default:
        return null;
    }
  }

  /**
   * A custom input's step. Its bytes go to its automaton while they do not complete the
   * terminator (whose first byte occurs in it only there); V3: the terminator is the
   * arguments' close, taken where the input could end before it, then the call-end token
   * follows; V3.1: the call-end token ends an input that can end.
   */
  #customStep(t: number, s: CustomArgs, b: number): ToolState | null {
    const a = this.#args[t]!;
    const v31 = this.#format === "deepseek-v3.1";
    const end = this.#terminator;
    if (b >= 256)
      return v31 && b === this.#callEnd && s.inner !== null && a.step(s.inner, PROBE) !== null
        ? NEXT
        : null;
    const k = end[s.k] === b ? s.k + 1 : b === end[0] ? 1 : 0;
    const ok = k === 1 ? s.inner !== null && a.step(s.inner, PROBE) !== null : s.ok;
    const inner = s.inner === null ? null : a.step(s.inner, b);
    if (k === end.length) return v31 || !ok ? null : { p: P.Literal, t: CLOSE, i: end.length };
    if (inner === null && (v31 || k === 0 || !ok)) return null;
    return { p: P.Args, i: 0, t, inner: { inner, k, ok } satisfies CustomArgs };
  }

  isDone(s: ToolState): boolean {
    return s.p === P.Done;
  }

  key(s: ToolState): string {
    switch (s.p) {
      case P.Text:
        return `t${s.i}`;
      case P.Literal:
        return `l${s.t},${s.i}`;
      case P.Name:
        return `n${s.i}`;
      case P.Args: {
        if (!this.#custom[s.t]) return `a${s.t}|${this.#args[s.t]!.key(s.inner)}`;
        const c = s.inner as CustomArgs;
        const inner = c.inner === null ? "-" : this.#args[s.t]!.key(c.inner);
        return `c${s.t}|${c.k}${c.ok ? "+" : ""}|${inner}`;
      }
      default:
        return s.p === P.Next ? "x" : "d";
    }
  }

  local(s: ToolState): { key: string; byte: number } | null {
    // Inside an argument's string: the string's own (json-mode.ts's keys).
    return s.p === P.Args && !this.#custom[s.t]
      ? (this.#args[s.t]!.local?.(s.inner) ?? null)
      : null;
  }

  /** Text, the fixed parts and between calls do not depend on the tools. */
  shared(s: ToolState): string | null {
    switch (s.p) {
      case P.Text:
        return `tools ${this.#mode} text ${s.i}`;
      case P.Literal:
        return `tools ${this.#format} literal ${s.t},${s.i}`;
      case P.Next:
        return `tools next ${this.#parallel}`;
      default:
        return null;
    }
  }
}

/** KMP failure table of `p`. */
function failure(p: readonly number[]): number[] {
  const f = new Array<number>(p.length).fill(0);
  for (let i = 1, k = 0; i < p.length; i++) {
    while (k > 0 && p[i] !== p[k]) k = f[k - 1]!;
    if (p[i] === p[k]) k++;
    f[i] = k;
  }
  return f;
}

/** The tool-call symbols of a vocabulary, or null when it lacks any (not DeepSeek's format). */
export function toolSymbols(
  vocabulary: Vocabulary,
): Record<keyof typeof TOOL_TOKENS, number> | null {
  const out: Partial<Record<keyof typeof TOOL_TOKENS, number>> = {};
  for (const [k, text] of Object.entries(TOOL_TOKENS)) {
    const s = vocabulary.symbol(text);
    if (s === null) return null;
    out[k as keyof typeof TOOL_TOKENS] = s;
  }
  return out as Record<keyof typeof TOOL_TOKENS, number>;
}

/**
 * Compiles each custom tool's input (kept: toolCallGrammar finds it again), so that a bad
 * one is a 400 naming its place in the request's tools (`tools.N`).
 */
export function checkCustomTools(vocabulary: Vocabulary, tools: readonly ToolFunction[]): void {
  tools.forEach((f, i) => {
    if (f.custom) customInputGrammar(vocabulary, f, PROBE, `tools.${i}`);
  });
}

/** Grammars of the last 16 tool sets (with their options), per vocabulary. */
const grammars = new GrammarCache<ToolState>(16);

/**
 * The grammar of calls to `tools` over `vocabulary` (built once per distinct tool set and
 * options), or null when the vocabulary has no tool-call tokens. Throws 400 for parameters
 * the schema subset does not cover (json-schema.ts).
 */
export function toolCallGrammar(
  vocabulary: Vocabulary,
  tools: readonly ToolFunction[],
  o: ToolCallOptions,
): TokenGrammar<ToolState> | null {
  const symbols = toolSymbols(vocabulary);
  if (!symbols) return null;
  const text = JSON.stringify([
    o.format ?? "deepseek-v3",
    o.mode,
    o.parallel,
    tools.map((f) => [f.name, f.custom ?? f.parameters]),
  ]);
  return grammars.get(vocabulary, text, () => {
    const customInputs = new Map(
      tools.flatMap((f, i) =>
        f.custom
          ? [[f.name, customInputGrammar(vocabulary, f, PROBE, `tools.${i}`).automaton] as const]
          : [],
      ),
    );
    const a = new ToolCallAutomaton(symbols, tools, {
      ...o,
      tokenBytes: vocabulary.maxTokenBytes,
      customInputs,
    });
    return new TokenGrammar(a, vocabulary);
  });
}

/** What the parser finds in the text, in order. */
export type ToolEvent =
  | { readonly type: "content"; readonly text: string }
  /** A call's name is complete: call `index` (0, 1, ... in the turn) begins. */
  | { readonly type: "call"; readonly index: number; readonly name: string }
  /** More of call `index`'s arguments (JSON text). */
  | { readonly type: "arguments"; readonly index: number; readonly text: string };

/**
 * Reads a choice's text as it is released and tells its content and calls apart. Text
 * that may be the start of a marker is held until the next push (or end()).
 */
export class ToolCallParser {
  readonly #format: ToolCallFormat;
  #buf = "";
  #mode: "content" | "head" | "args" | "close" | "next" | "done" = "content";
  #calls = 0;

  constructor(format: ToolCallFormat = "deepseek-v3") {
    this.#format = format;
  }

  /** Calls begun so far. */
  get calls(): number {
    return this.#calls;
  }

  /** The calls ended (`<｜tool▁calls▁end｜>` read): not cut by max_tokens or a stop string. */
  get complete(): boolean {
    return this.#mode === "done";
  }

  push(text: string): ToolEvent[] {
    this.#buf += text;
    const out: ToolEvent[] = [];
    for (;;) {
      const before = this.#buf.length;
      const mode = this.#mode;
      this.#advance(out);
      if (this.#buf.length === before && this.#mode === mode) return out;
    }
  }

  /** The end of the text: what was held back. */
  end(): ToolEvent[] {
    const out: ToolEvent[] = [];
    if (this.#buf && this.#mode === "content") out.push({ type: "content", text: this.#buf });
    if (this.#buf && this.#mode === "args")
      out.push({ type: "arguments", index: this.#calls - 1, text: this.#buf });
    this.#buf = "";
    return out;
  }

  #advance(out: ToolEvent[]): void {
    const buf = this.#buf;
    switch (this.#mode) {
      case "content": {
        const at = buf.indexOf(TOOL_TOKENS.callsBegin);
        const upTo = at >= 0 ? at : buf.length - heldBack(buf, TOOL_TOKENS.callsBegin);
        if (upTo > 0) out.push({ type: "content", text: buf.slice(0, upTo) });
        this.#buf = buf.slice(at >= 0 ? at + TOOL_TOKENS.callsBegin.length : upTo);
        if (at >= 0) this.#mode = "head";
        return;
      }
      case "head": {
        if (this.#format === "deepseek-v3.1") {
          // <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>
          const sep = buf.indexOf(TOOL_TOKENS.sep);
          if (sep < 0) return;
          const name = buf.slice(TOOL_TOKENS.callBegin.length, sep);
          out.push({ type: "call", index: this.#calls++, name });
          this.#buf = buf.slice(sep + TOOL_TOKENS.sep.length);
          this.#mode = "args";
          return;
        }
        // <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n
        const end = buf.indexOf(ARGS_OPEN);
        if (end < 0) return;
        const sep = buf.indexOf(TOOL_TOKENS.sep);
        const name = buf.slice(sep + TOOL_TOKENS.sep.length, end);
        out.push({ type: "call", index: this.#calls++, name });
        this.#buf = buf.slice(end + ARGS_OPEN.length);
        this.#mode = "args";
        return;
      }
      case "args": {
        // V3: JSON text cannot hold a newline followed by ``` (strings escape newlines).
        // V3.1: the arguments end at the call-end token (the grammar writes it as the token
        // after a complete value; a string spelling it in plain characters would end them
        // here too).
        const end = this.#format === "deepseek-v3.1" ? TOOL_TOKENS.callEnd : ARGS_CLOSE;
        const at = buf.indexOf(end);
        const upTo = at >= 0 ? at : buf.length - heldBack(buf, end);
        if (upTo > 0)
          out.push({ type: "arguments", index: this.#calls - 1, text: buf.slice(0, upTo) });
        this.#buf = buf.slice(at >= 0 ? at + end.length : upTo);
        if (at >= 0) this.#mode = this.#format === "deepseek-v3.1" ? "next" : "close";
        return;
      }
      case "close":
        if (buf.startsWith(TOOL_TOKENS.callEnd)) {
          this.#buf = buf.slice(TOOL_TOKENS.callEnd.length);
          this.#mode = "next";
        }
        return;
      case "next":
        if (buf.startsWith("\n")) this.#buf = buf.slice(1);
        else if (buf.startsWith(TOOL_TOKENS.callBegin)) this.#mode = "head";
        else if (buf.startsWith(TOOL_TOKENS.callsEnd)) {
          this.#buf = buf.slice(TOOL_TOKENS.callsEnd.length);
          this.#mode = "done";
        }
        return;
      case "done":
        this.#buf = "";
        return;
    }
  }
}

/** The length of the longest end of `text` that is a proper start of `marker`. */
export function heldBack(text: string, marker: string): number {
  for (let n = Math.min(text.length, marker.length - 1); n > 0; n--)
    if (marker.startsWith(text.slice(text.length - n))) return n;
  return 0;
}

/** A whole text's content and calls, and whether the calls ended (ToolCallParser.complete). */
export function parseToolCalls(
  text: string,
  format: ToolCallFormat = "deepseek-v3",
): {
  content: string;
  calls: { name: string; arguments: string }[];
  complete: boolean;
} {
  const p = new ToolCallParser(format);
  let content = "";
  const calls: { name: string; arguments: string }[] = [];
  for (const e of [...p.push(text), ...p.end()]) {
    if (e.type === "content") content += e.text;
    else if (e.type === "call") calls.push({ name: e.name, arguments: "" });
    else calls[e.index]!.arguments += e.text;
  }
  return { content, calls, complete: p.complete };
}

/**
 * The request's functions as a system prompt, for chat templates that do not present
 * `tools` themselves (DeepSeek-V3's does not): each function's name, description and
 * parameters, and the format of a call.
 */
export function toolsPrompt(
  tools: readonly ToolFunction[],
  format: ToolCallFormat = "deepseek-v3",
): string {
  const t = TOOL_TOKENS;
  const parts = tools.map(
    (f) =>
      `### ${f.name}\n` +
      (f.description ? `Description: ${f.description}\n` : "") +
      (f.custom ? customInputText(f.custom) : `Parameters: ${JSON.stringify(f.parameters)}`),
  );
  return (
    `## Tools\n\nYou can call these functions:\n\n${parts.join("\n\n")}\n\n` +
    `To call functions, answer with ${t.callsBegin}, then for each call ` +
    `${formatCall(format, "FUNCTION_NAME", "ARGUMENTS_AS_JSON")} ` +
    (format === "deepseek-v3" ? "(calls after the first on a new line), " : "") +
    `then ${t.callsEnd}.`
  );
}

/** How a custom tool's input is described to the model (in place of its parameters). */
export function customInputText(c: CustomFormat): string {
  if (c.type === "text") return "Input: free text, written in place of the JSON arguments.";
  return c.syntax === "regex"
    ? `Input: text matching the regular expression ${c.definition}, written in place of the JSON arguments.`
    : `Input: text in the language of this Lark grammar, written in place of the JSON arguments:\n${c.definition}`;
}

/**
 * `messages` with `tools` presented: by the template itself when it reads `tools`
 * (`templatePresentsTools`), else as a system message (toolsPrompt) after the leading
 * system messages (DeepSeek's template joins every system message into the prompt's start).
 */
export function withTools(
  messages: readonly ChatMessage[],
  tools: readonly ToolFunction[],
  templatePresentsTools: boolean,
  format: ToolCallFormat = "deepseek-v3",
): ChatMessage[] {
  if (tools.length === 0 || templatePresentsTools) return [...messages];
  let at = 0;
  while (messages[at]?.role === "system") at++;
  return [
    ...messages.slice(0, at),
    { role: "system", content: toolsPrompt(tools, format) },
    ...messages.slice(at),
  ];
}
