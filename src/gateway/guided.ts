// vLLM's guided decoding of plain text (docs/gateway.md): `guided_regex` (the whole output
// matches the pattern), `guided_choice` (the output is one of the strings) and
// `guided_grammar` (a GBNF grammar, cfg.ts, or a Lark one, lark.ts), also as `structured_outputs: {"regex" |
// "choice" | "grammar"}` (vLLM's newer form). The pattern compiles as a
// JSON Schema pattern does (regex.ts, json-string.ts), over the output's raw UTF-8; the
// end-of-sequence token is allowed exactly where the text so far matches, and where nothing
// can follow a match the choice ends there without it.
import { type CfgState, compileGrammar, GrammarError, GrammarText } from "./cfg.ts";
import { ApiError } from "./errors.ts";
import {
  type ByteAutomaton,
  GrammarCache,
  SYMBOL_BASE,
  TokenGrammar,
  type Vocabulary,
} from "./grammar.ts";
import { StringRule, type StringState } from "./json-string.ts";
import { compileLark, isGbnf } from "./lark.ts";
import { compilePattern, RegexError } from "./regex.ts";

/** After the end-of-sequence token. */
const DONE = "done";
export type TextState = StringState | typeof DONE;

/** The output's bytes under a pattern, then the end-of-sequence symbol where it matches. */
export class PatternText implements ByteAutomaton<TextState> {
  readonly symbols = true;
  readonly start: TextState;
  readonly #rule: StringRule;
  readonly #eos: number | null;

  /** `eos`: the end-of-sequence token's symbol (none: the output ends only where forced). */
  constructor(rule: StringRule, eos: number | null) {
    this.#rule = rule;
    this.#eos = eos;
    this.start = rule.start;
  }

  step(s: TextState, b: number): TextState | null {
    if (s === DONE) return null;
    if (b >= SYMBOL_BASE) return b === this.#eos && this.#rule.canClose(s) ? DONE : null;
    return this.#rule.stepRaw(s, b);
  }

  isDone(s: TextState): boolean {
    return s === DONE || (this.#rule.canClose(s) && !this.#rule.canContinue(s));
  }

  key(s: TextState): string {
    return s === DONE ? DONE : this.#rule.key(s);
  }
}

/** Grammars of the last 16 patterns (with their end-of-sequence symbol), per vocabulary. */
const grammars = new GrammarCache<TextState>(16);

/**
 * The grammar of outputs that match `pattern` whole (400 naming `param` for one that cannot
 * be compiled or matches nothing).
 */
export function patternGrammar(
  vocabulary: Vocabulary,
  pattern: string,
  eos: number | null,
  param: string,
): TokenGrammar<TextState> {
  return grammars.get(vocabulary, `${eos} ${pattern}`, () => {
    let rule: StringRule;
    try {
      const nfa = compilePattern(pattern, { fullMatch: true });
      rule = new StringRule(nfa, 0, Number.POSITIVE_INFINITY, vocabulary.maxTokenBytes);
    } catch (err) {
      if (!(err instanceof RegexError || err instanceof RangeError)) throw err;
      throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${param}: ${err.message}`, { param });
    }
    return new TokenGrammar(new PatternText(rule, eos), vocabulary);
  });
}

/** Grammars of the last 16 grammar texts (with their end-of-sequence symbol), per vocabulary. */
const cfgGrammars = new GrammarCache<CfgState>(16);

/**
 * The grammar of outputs in the language of `text`: GBNF where it has a `name ::=`, Lark
 * otherwise, as vLLM tells them apart, unless `syntax` says (400 naming `param` for one that cannot be compiled:
 * the reason, with line and column).
 */
export function cfgGrammar(
  vocabulary: Vocabulary,
  text: string,
  eos: number | null,
  param: string,
  syntax: "gbnf" | "lark" = isGbnf(text) ? "gbnf" : "lark",
): TokenGrammar<CfgState> {
  return cfgGrammars.get(vocabulary, `${eos} ${syntax} ${text}`, () => {
    try {
      const g = syntax === "gbnf" ? compileGrammar(text) : compileLark(text);
      return new TokenGrammar(new GrammarText(g, eos), vocabulary);
    } catch (err) {
      // RangeError: a grammar past what the recognizer's tables or the call stack hold.
      if (!(err instanceof GrammarError || err instanceof RangeError)) throw err;
      throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${param}: ${err.message}`, { param });
    }
  });
}
