// DeepSeek-R1's reasoning (`--reasoning-parser deepseek-r1`): the model thinks before it
// answers, `<think>` (often written by the chat template's generation prompt) ... `</think>`
// then the answer. Chat responses carry the thinking as `reasoning_content` (DeepSeek's own
// API field, vLLM's too) and the answer as `content`. Until `</think>` everything is
// reasoning (R1 always thinks first); tool calls (their calls token) end it too, so calls
// made without closing the thought are not lost in it.
import { TOOL_TOKENS } from "../model/tokenizer.ts";
import { heldBack } from "./tool-calls.ts";

export type ReasoningParserName = "deepseek-r1" | "none";

const OPEN = "<think>";
const CLOSE = "</think>";

/** What a piece of text holds: thinking, and answer (either may be ""). */
export interface ReasoningSplit {
  readonly reasoning: string;
  readonly content: string;
}

/**
 * Splits a choice's text into reasoning and content as it is released; a possible marker's
 * start is held until the next push (or end()).
 */
export class ReasoningParser {
  #buf = "";
  #thinking = true;
  /** The leading `<think>` was looked for (stripped when there). */
  #opened = false;

  push(text: string): ReasoningSplit {
    if (!this.#thinking) return { reasoning: "", content: text };
    this.#buf += text;
    if (!this.#opened) {
      const lead = this.#buf.trimStart();
      // Wait while the text may still become the opening tag.
      if (OPEN.startsWith(lead) && lead.length < OPEN.length) return { reasoning: "", content: "" };
      this.#opened = true;
      if (lead.startsWith(OPEN)) this.#buf = lead.slice(OPEN.length);
    }
    const close = this.#buf.indexOf(CLOSE);
    const calls = this.#buf.indexOf(TOOL_TOKENS.callsBegin);
    if (close >= 0 && (calls < 0 || close < calls)) {
      this.#thinking = false;
      const out = {
        reasoning: this.#buf.slice(0, close),
        content: this.#buf.slice(close + CLOSE.length),
      };
      this.#buf = "";
      return out;
    }
    if (calls >= 0) {
      this.#thinking = false;
      const out = { reasoning: this.#buf.slice(0, calls), content: this.#buf.slice(calls) };
      this.#buf = "";
      return out;
    }
    const hold = Math.max(heldBack(this.#buf, CLOSE), heldBack(this.#buf, TOOL_TOKENS.callsBegin));
    const reasoning = this.#buf.slice(0, this.#buf.length - hold);
    this.#buf = this.#buf.slice(this.#buf.length - hold);
    return { reasoning, content: "" };
  }

  /** The end of the text: what was held back (thinking never closed stays reasoning). */
  end(): ReasoningSplit {
    const reasoning = this.#thinking ? this.#buf : "";
    this.#buf = "";
    return { reasoning, content: "" };
  }
}

/** A whole text's reasoning and content. */
export function splitReasoning(text: string): ReasoningSplit {
  const p = new ReasoningParser();
  const a = p.push(text);
  const b = p.end();
  return { reasoning: a.reasoning + b.reasoning, content: a.content + b.content };
}
