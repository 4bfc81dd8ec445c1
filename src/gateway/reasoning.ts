// DeepSeek-R1's reasoning (`--reasoning-parser deepseek-r1`): the model thinks before it
// answers, `<think>` (often written by the chat template's generation prompt) ... `</think>`
// then the answer. Chat responses carry the thinking as `reasoning_content` (DeepSeek's own
// API field, vLLM's too) and the answer as `content`. Until `</think>` everything is
// reasoning (R1 always thinks first); tool calls (their calls token) end it too, so calls
// made without closing the thought are not lost in it.
import { TOOL_TOKENS } from "../model/tokenizer.ts";
import type { TokenConstraint } from "./engine.ts";
import { type ByteAutomaton, SYMBOL_BASE, TokenGrammar, type Vocabulary } from "./grammar.ts";
import { heldBack } from "./tool-calls.ts";

/**
 * deepseek-r1: every answer thinks first. deepseek-v3: DeepSeek-V3.1's hybrid thinking, only
 * answers whose request sets chat_template_kwargs `thinking` (or `enable_thinking`) think
 * (vLLM's deepseek_v3 parser); the others are plain content.
 */
export type ReasoningParserName = "deepseek-r1" | "deepseek-v3" | "none";

export const REASONING_PARSERS: readonly ReasoningParserName[] = [
  "deepseek-r1",
  "deepseek-v3",
  "none",
];

/** Whether a chat request's answer starts with a thought, under `parser`. */
export function requestThinks(
  parser: ReasoningParserName,
  kwargs: Readonly<Record<string, unknown>> | undefined,
): boolean {
  if (parser === "deepseek-r1") return true;
  if (parser === "none") return false;
  return kwargs?.["thinking"] === true || kwargs?.["enable_thinking"] === true;
}

/**
 * Template variables with a reasoning effort applied (OpenAI's reasoning_effort, Responses'
 * reasoning.effort): other than "none" or "minimal" it asks a hybrid model (V3.1) to think,
 * its template's `thinking` switch, unless `kwargs` set that themselves. R1 thinks whatever
 * the request says. Undefined when there are none.
 */
export function effortKwargs(
  effort: string | null | undefined,
  kwargs: Readonly<Record<string, unknown>> | null | undefined,
): Record<string, unknown> | undefined {
  const thinks = effort != null && effort !== "none" && effort !== "minimal";
  return thinks || kwargs != null
    ? { ...(thinks ? { thinking: true } : {}), ...(kwargs ?? {}) }
    : undefined;
}

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

/** Whitespace taken between `</think>` and the answer. */
const MAX_GAP = 8;
const CLOSE_BYTES = [...Buffer.from(CLOSE)];
const isWs = (b: number) => b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;

/**
 * Thinking state: `</think>` bytes matched (`m`); between it and the answer: whitespace
 * taken (`gap`); then the answer's own state.
 */
export type ThinkState<S> =
  | { readonly m: number }
  | { readonly gap: number }
  | { readonly answer: S };

/**
 * The symbols of `<think>` and `</think>` where a vocabulary has them as added tokens
 * (DeepSeek-R1's and V3.1's tokenizers do; the model writes the tag as that one token).
 */
export interface ThinkSymbols {
  readonly open: number | null;
  readonly close: number | null;
}

/** `<think>` and `</think>` as `vocabulary`'s symbols, where it has them. */
export function thinkSymbols(vocabulary: { symbol(text: string): number | null }): ThinkSymbols {
  return { open: vocabulary.symbol(OPEN), close: vocabulary.symbol(CLOSE) };
}

/**
 * R1 thinks, then answers under `answer` (a JSON object, a schema, required calls): any
 * bytes until `</think>` (as bytes, or as its added token where the vocabulary has one; no
 * other added token but `<think>`'s: the thought must close, the end-of-sentence token
 * among them), a little whitespace, then the answer's automaton. As vLLM does with
 * reasoning models, the structure applies after the thinking, which the model keeps.
 */
export class ThinkThen<S> implements ByteAutomaton<ThinkState<S>> {
  readonly start: ThinkState<S> = { m: 0 };
  readonly symbols: boolean;
  readonly #answer: ByteAutomaton<S>;
  readonly #tags: ThinkSymbols;

  constructor(answer: ByteAutomaton<S>, tags: ThinkSymbols = { open: null, close: null }) {
    this.#answer = answer;
    this.#tags = tags;
    this.symbols = (answer.symbols ?? false) || tags.open !== null || tags.close !== null;
  }

  step(s: ThinkState<S>, b: number): ThinkState<S> | null {
    if ("m" in s) {
      if (b >= SYMBOL_BASE) {
        if (b === this.#tags.close) return { gap: 0 };
        return b === this.#tags.open ? { m: 0 } : null;
      }
      // "</think>" has no proper border: a mismatch restarts at its first byte.
      const m = CLOSE_BYTES[s.m] === b ? s.m + 1 : CLOSE_BYTES[0] === b ? 1 : 0;
      return m === CLOSE_BYTES.length ? { gap: 0 } : { m };
    }
    if ("gap" in s) {
      if (isWs(b) && s.gap < MAX_GAP) return { gap: s.gap + 1 };
      return this.#inner(this.#answer.start, b);
    }
    return this.#inner(s.answer, b);
  }

  #inner(s: S, b: number): ThinkState<S> | null {
    if (b >= SYMBOL_BASE && !this.#answer.symbols) return null;
    const next = this.#answer.step(s, b);
    return next === null ? null : { answer: next };
  }

  isDone(s: ThinkState<S>): boolean {
    return "answer" in s && this.#answer.isDone(s.answer);
  }

  key(s: ThinkState<S>): string {
    if ("m" in s) return `k${s.m}`;
    if ("gap" in s) return `g${s.gap}`;
    return `a|${this.#answer.key(s.answer)}`;
  }

  local(s: ThinkState<S>): { key: string; byte: number } | null {
    return "answer" in s ? (this.#answer.local?.(s.answer) ?? null) : null;
  }

  /** The thinking's masks are the same whatever the answer. */
  shared(s: ThinkState<S>): string | null {
    if ("m" in s) return `think ${s.m}`;
    return "answer" in s ? (this.#answer.shared?.(s.answer) ?? null) : null;
  }
}

const thinking = new WeakMap<TokenGrammar<unknown>, TokenGrammar<unknown>>();

/** `answer`'s grammar with R1's thinking first (one per answer grammar: masks are kept). */
export function thinkingFirst(answer: TokenGrammar<unknown>): TokenGrammar<unknown> {
  let g = thinking.get(answer);
  if (!g) {
    g = new TokenGrammar(
      new ThinkThen(answer.automaton, thinkSymbols(answer.vocabulary)),
      answer.vocabulary,
    ) as TokenGrammar<unknown>;
    thinking.set(answer, g);
  }
  return g;
}

/** Every token allowed, per vocabulary size (a mask that masks nothing). */
const ALL = new Map<number, Uint32Array>();
function allOf(size: number): Uint32Array {
  let m = ALL.get(size);
  if (!m) {
    m = new Uint32Array(Math.ceil(size / 32)).fill(0xffffffff);
    ALL.set(size, m);
  }
  return m;
}

/** One token allowed, kept per vocabulary size and id. */
const ONE = new Map<string, Uint32Array>();
function oneOf(size: number, id: number): Uint32Array {
  const key = `${size}:${id}`;
  let m = ONE.get(key);
  if (!m) {
    m = new Uint32Array(Math.ceil(size / 32));
    m[id >>> 5] = 1 << (id & 31);
    ONE.set(key, m);
  }
  return m;
}

/** What a thinking budget needs of the vocabulary and the tokenizer. */
export interface ThinkingBudgetSpec {
  /** The most tokens the thought may take before it is closed. */
  readonly budget: number;
  /** `</think>` as the tokenizer encodes it: the tokens that close a thought cut short. */
  readonly closeIds: readonly number[];
  /**
   * By the bytes of `</think>` the thought already ends with (0-7), the rest of it encoded
   * (closeRest[0] is closeIds): a thought cut after `</th` gets `ink>`, not a second tag.
   * Absent: closeIds whatever came before.
   */
  readonly closeRest?: readonly (readonly number[])[];
  readonly vocabulary: Vocabulary;
}

/**
 * A thinking budget (vLLM's thinking_token_budget, Anthropic's budget_tokens): the thought
 * takes at most `budget` tokens; one still open then is closed by `</think>`'s tokens,
 * forced one by one, and the answer follows. The thought ends by itself at `</think>` (its
 * bytes across tokens, or its added token) or the calls token, as ReasoningParser reads it.
 * `inner`: the request's own constraint (its grammar), told every token too.
 */
export class ThinkingBudget implements TokenConstraint {
  readonly #spec: ThinkingBudgetSpec;
  readonly #inner: TokenConstraint | null;
  readonly #close: number | null;
  readonly #calls: number | null;
  /**
   * Tokens thought so far; bytes of `</think>` matched; the closing tokens forced (the rest
   * of the tag after what was matched) and the one forced next (-1: none).
   */
  #thought = 0;
  #m = 0;
  #closing: readonly number[];
  #forcing = -1;
  #open = true;

  constructor(spec: ThinkingBudgetSpec, inner: TokenConstraint | null) {
    this.#spec = spec;
    this.#inner = inner;
    this.#close = spec.vocabulary.symbol(CLOSE);
    this.#calls = spec.vocabulary.symbol(TOOL_TOKENS.callsBegin);
    this.#closing = spec.closeIds;
    if (spec.budget === 0) this.#forcing = 0;
  }

  /** Whether the thought is still open (not closed, by the model or by the budget). */
  get thinking(): boolean {
    return this.#open;
  }

  allowed(): Uint32Array {
    const size = this.#spec.vocabulary.size;
    if (this.#forcing >= 0) return oneOf(size, this.#closing[this.#forcing]!);
    return this.#inner?.allowed() ?? allOf(size);
  }

  accept(id: number): boolean {
    const done = this.#inner?.accept(id) ?? false;
    if (!this.#open) return done;
    if (this.#forcing >= 0) {
      this.#forcing++;
      if (this.#forcing === this.#closing.length) {
        this.#forcing = -1;
        this.#open = false;
      }
      return done;
    }
    for (const b of this.#spec.vocabulary.bytes[id] ?? []) {
      if (b >= SYMBOL_BASE) {
        if (b === this.#close || b === this.#calls) this.#open = false;
        this.#m = 0;
        continue;
      }
      this.#m = CLOSE_BYTES[this.#m] === b ? this.#m + 1 : CLOSE_BYTES[0] === b ? 1 : 0;
      if (this.#m === CLOSE_BYTES.length) this.#open = false;
    }
    this.#thought++;
    if (this.#open && this.#thought >= this.#spec.budget) {
      const rest = this.#spec.closeRest?.[this.#m] ?? this.#spec.closeIds;
      if (rest.length > 0) {
        this.#closing = rest;
        this.#forcing = 0;
      } else this.#open = false;
    }
    return done;
  }

  fork(): ThinkingBudget {
    const c = new ThinkingBudget(this.#spec, this.#inner?.fork() ?? null);
    c.#thought = this.#thought;
    c.#m = this.#m;
    c.#closing = this.#closing;
    c.#forcing = this.#forcing;
    c.#open = this.#open;
    return c;
  }
}
