// vLLM's guided_regex / guided_choice (src/gateway/guided.ts): the output's raw UTF-8 under
// a whole-string pattern, the end-of-sequence symbol allowed exactly where the text so far
// matches, the choice ended where nothing can follow; masks equal checking every token.
import { describe, expect, it } from "vitest";
import { ApiError } from "../../src/gateway/errors.ts";
import { runBytes, SYMBOL_BASE, Vocabulary } from "../../src/gateway/grammar.ts";
import { patternGrammar, type TextState } from "../../src/gateway/guided.ts";
import { choicePattern, compilePattern, nfaMatches } from "../../src/gateway/regex.ts";
import { Prng } from "../../src/model/prng.ts";
import { expectExactMasks, utf8 } from "../support/grammar.ts";

const EOS = SYMBOL_BASE;
const texts = [
  "1",
  "12",
  "123",
  "-",
  "a",
  "ab",
  "b",
  "yes",
  "y",
  "es",
  "no",
  "n",
  "o",
  " ",
  "\n",
  "é",
  "a.b",
  "(",
  ")",
  "x",
];
const tokenBytes = [
  null,
  ...texts.map(utf8),
  Uint16Array.of(EOS),
  Uint8Array.of(0xc3),
  Uint8Array.of(0xa9),
];
const V = tokenBytes.length;
const vocabulary = new Vocabulary(tokenBytes, V, new Map([["</s>", EOS]]));

/** Runs `text`, then the end-of-sequence symbol when `eos`; null where refused. */
function run(pattern: string, text: string, eos = false): { s: TextState | null; done: boolean } {
  const g = patternGrammar(vocabulary, pattern, EOS, "guided_regex");
  const a = g.automaton;
  let s = runBytes(a, a.start, utf8(text));
  if (s !== null && eos) s = a.step(s, EOS);
  return { s, done: s !== null && a.isDone(s) };
}

describe("a pattern over the whole output", () => {
  it.each([
    ["[0-9]{3}-[a-z]+", "123-ab", true],
    ["[0-9]{3}-[a-z]+", "123-", false],
    ["[0-9]{3}-[a-z]+", "x123-ab", false],
    ["(yes|no)\\n?", "yes", true],
    ["(yes|no)\\n?", "yes\n", true],
    ["é+", "éé", true],
    ["a|b", "ab", false],
  ])("%s on %j: taken whole, then ended by EOS: %s", (pattern, text, ok) => {
    const r = run(pattern, text, true);
    expect(r.done).toBe(ok);
    expect(ok).toBe(new RegExp(`^(?:${pattern})$`, "u").test(text));
  });

  it("refuses a byte no match continues, and EOS before the text matches", () => {
    expect(run("[0-9]{3}", "12a").s).toBeNull();
    expect(run("[0-9]{3}", "12", true).s).toBeNull();
    expect(run("[0-9]{3}", "12").done).toBe(false);
  });

  it("ends the output where nothing can follow a match, without EOS", () => {
    expect(run("yes|no", "yes").done).toBe(true);
    expect(run("yes|no", "y").done).toBe(false);
    // "a" matches but "ab" could follow: EOS decides.
    expect(run("ab?", "a").done).toBe(false);
    expect(run("ab?", "a", true).done).toBe(true);
  });

  it("gives masks equal to checking every token, EOS included", () => {
    const g = patternGrammar(
      vocabulary,
      "(yes|no|[0-9]+(-[a-z]{1,2})?|é)\\n?",
      EOS,
      "guided_regex",
    );
    const a = g.automaton;
    const rng = new Prng(5);
    const states: TextState[] = [a.start];
    for (const t of ["yes\n", "12-ab", "123", "é\n", "no"])
      for (let i = 1; i <= utf8(t).length; i++) {
        const s = runBytes(a, a.start, utf8(t).subarray(0, i));
        if (s !== null && rng.uniform() < 0.8) states.push(s);
      }
    expectExactMasks(g, a, states, tokenBytes, V);
  });

  it.each([
    ["(?=a)", /lookahead/],
    ["a{2,1}", /guided_regex/],
    ["[^\\s\\S]", /no string satisfies/],
  ])("refuses %s with 400", (pattern, message) => {
    let err: unknown;
    try {
      patternGrammar(vocabulary, pattern, EOS, "guided_regex");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).param).toBe("guided_regex");
    expect((err as ApiError).message).toMatch(message);
  });
});

describe("choicePattern", () => {
  it("matches exactly its strings, special characters literally", () => {
    const choices = ["a.b", "(x)", "1+1", "[y]", "a|b", "^$", "\\", "/", "-", "é😀", ""];
    const nfa = compilePattern(choicePattern(choices), { fullMatch: true });
    for (const c of choices) expect(nfaMatches(nfa, c), c).toBe(true);
    for (const c of ["axb", "x", "11", "a", "b", "y", "^", "é"])
      expect(nfaMatches(nfa, c), c).toBe(false);
  });
});
