// A chat choice's text as OpenAI's message and deltas: its thinking (`reasoning_content`,
// with --reasoning-parser deepseek-r1: reasoning.ts), its answer (`content`) and its tool
// calls (tool-calls.ts, or the arguments alone for a forced call on a tokenizer without
// tool-call tokens). Streams read the text as it is released, whole responses read it at
// once through the same reader, so both say the same.
import { randomBytes } from "node:crypto";
import { ReasoningParser } from "./reasoning.ts";
import { type ToolCallFormat, ToolCallParser } from "./tool-calls.ts";

/**
 * A call's piece: its head (id, type, name) starts it. A custom tool's input is carried as
 * `function.arguments` here too; chatDelta and message give OpenAI's `custom` form.
 */
export interface ToolCallDelta {
  readonly index: number;
  readonly id?: string;
  readonly type?: "function" | "custom";
  readonly function: { readonly name?: string; readonly arguments: string };
}

export type ChatDelta =
  | { readonly reasoning_content: string }
  | { readonly content: string }
  | { readonly tool_calls: readonly ToolCallDelta[] };

export interface ChatOutputOptions {
  /**
   * "text": content only; "calls": DeepSeek's tool-call format parsed out of it;
   * "arguments": the text is the arguments of `forced`'s one call.
   */
  readonly tools: "text" | "calls" | "arguments";
  readonly forced?: string;
  /** The request's custom tools' names (their calls carry text input, not arguments). */
  readonly custom?: readonly string[];
  /** The calls' format ("calls"; default deepseek-v3). */
  readonly format?: ToolCallFormat;
  /** The text starts with the model's thinking (reasoning.ts). */
  readonly reasoning: boolean;
}

const callId = () => `call_${randomBytes(12).toString("hex")}`;

/** One choice's reader. */
export class ChatOutput {
  readonly #o: ChatOutputOptions;
  readonly #reasoning: ReasoningParser | null;
  readonly #calls: ToolCallParser | null;
  /** The forced call's id ("arguments"). */
  readonly #forcedId = callId();
  readonly #custom: ReadonlySet<string>;
  /** Indexes of the calls to custom tools. */
  readonly #customCalls = new Set<number>();

  constructor(o: ChatOutputOptions) {
    this.#o = o;
    this.#custom = new Set(o.custom ?? []);
    if (o.tools === "arguments" && this.#custom.has(o.forced!)) this.#customCalls.add(0);
    this.#reasoning = o.reasoning ? new ReasoningParser() : null;
    this.#calls = o.tools === "calls" ? new ToolCallParser(o.format) : null;
  }

  /** The stream's first delta: the role, and a forced call's head. */
  first(): Record<string, unknown> {
    if (this.#o.tools !== "arguments") return { role: "assistant", content: "" };
    return {
      role: "assistant",
      content: null,
      tool_calls: [
        {
          index: 0,
          id: this.#forcedId,
          type: this.#customCalls.has(0) ? "custom" : "function",
          function: { name: this.#o.forced, arguments: "" },
        } satisfies ToolCallDelta,
      ],
    };
  }

  /** A delta (or first()) as Chat Completions sends it: custom tools' calls as `custom`. */
  chatDelta(d: ChatDelta | Record<string, unknown>): object {
    if (!("tool_calls" in d) || this.#customCalls.size === 0) return d;
    return {
      ...d,
      tool_calls: (d.tool_calls as ToolCallDelta[]).map((t) =>
        this.#customCalls.has(t.index)
          ? {
              index: t.index,
              ...(t.id !== undefined ? { id: t.id, type: "custom" } : {}),
              custom: {
                ...(t.function.name !== undefined ? { name: t.function.name } : {}),
                input: t.function.arguments,
              },
            }
          : t,
      ),
    };
  }

  /** The deltas a piece of released text makes. */
  push(text: string): ChatDelta[] {
    return this.#read(text, false);
  }

  /** At the end of the text: what the parsers held back. */
  end(): ChatDelta[] {
    return this.#read("", true);
  }

  /** Calls were made and ended (the calls-end token read): finish "tool_calls". */
  get callsComplete(): boolean {
    return this.#calls?.complete ?? false;
  }

  #read(text: string, end: boolean): ChatDelta[] {
    const out: ChatDelta[] = [];
    let content = text;
    if (this.#reasoning) {
      const a = this.#reasoning.push(text);
      const b = end ? this.#reasoning.end() : { reasoning: "", content: "" };
      const thought = a.reasoning + b.reasoning;
      if (thought) out.push({ reasoning_content: thought });
      content = a.content + b.content;
    }
    if (this.#o.tools === "arguments") {
      if (content) out.push({ tool_calls: [{ index: 0, function: { arguments: content } }] });
      return out;
    }
    if (!this.#calls) {
      if (content) out.push({ content });
      return out;
    }
    for (const e of [...this.#calls.push(content), ...(end ? this.#calls.end() : [])]) {
      if (e.type === "content") out.push({ content: e.text });
      else if (e.type === "call") {
        const custom = this.#custom.has(e.name);
        if (custom) this.#customCalls.add(e.index);
        out.push({
          tool_calls: [
            {
              index: e.index,
              id: callId(),
              type: custom ? "custom" : "function",
              function: { name: e.name, arguments: "" },
            },
          ],
        });
      } else out.push({ tool_calls: [{ index: e.index, function: { arguments: e.text } }] });
    }
    return out;
  }

  /** The whole message of a choice whose text is `text` (read at once). */
  message(text: string): Record<string, unknown> {
    const deltas = [...this.push(text), ...this.end()];
    let content = "";
    let reasoning = "";
    const calls: { id: string; function: { name: string; arguments: string } }[] =
      this.#o.tools === "arguments"
        ? [{ id: this.#forcedId, function: { name: this.#o.forced!, arguments: "" } }]
        : [];
    for (const d of deltas) {
      if ("content" in d) content += d.content;
      else if ("reasoning_content" in d) reasoning += d.reasoning_content;
      else
        for (const t of d.tool_calls) {
          if (t.id)
            calls[t.index] = { id: t.id, function: { name: t.function.name!, arguments: "" } };
          calls[t.index]!.function.arguments += t.function.arguments;
        }
    }
    const toolCalls = calls.map((c, i) =>
      this.#customCalls.has(i)
        ? {
            id: c.id,
            type: "custom",
            custom: { name: c.function.name, input: c.function.arguments },
          }
        : { id: c.id, type: "function", function: c.function },
    );
    return {
      role: "assistant",
      // With calls, no text (or only the whitespace after a thought) is null, as OpenAI's.
      content: calls.length > 0 && content.trim() === "" ? null : content,
      ...(this.#reasoning ? { reasoning_content: reasoning } : {}),
      ...(calls.length > 0 ? { tool_calls: toolCalls } : {}),
    };
  }
}
