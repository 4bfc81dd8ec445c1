// Helpers of the constrained-decoding tests (test/unit/json-mode.test.ts, json-schema.test.ts).
import { expect } from "vitest";
import type { CfgState, GrammarText } from "../../src/gateway/cfg.ts";
import {
  type ByteAutomaton,
  runBytes,
  SYMBOL_BASE,
  type TokenBytes,
  TokenGrammar,
  Vocabulary,
} from "../../src/gateway/grammar.ts";
import type { Prng } from "../../src/model/prng.ts";
import type { Tokenizer } from "../../src/model/tokenizer.ts";

export const utf8 = (s: string) => new Uint8Array(Buffer.from(s, "utf8"));

/** The characters JSON's structure turns on (edits and test vocabularies start from them). */
export const JSON_CHARS = ["{", "}", "[", "]", '"', ":", ",", " ", "\n", "\\", "-"] as const;

/**
 * `perDoc` random one-character edits of each document: an insertion, a deletion or a
 * substitution at a random place, with characters from `chars`; edits that leave a lone
 * surrogate (not text) are dropped.
 */
export function oneCharEdits(
  docs: readonly string[],
  rng: Prng,
  chars: readonly string[],
  perDoc: number,
): string[] {
  const out: string[] = [];
  for (const doc of docs)
    for (let e = 0; e < perDoc; e++) {
      const at = Math.floor(rng.uniform() * (doc.length + 1));
      const ch = chars[Math.floor(rng.uniform() * chars.length)]!;
      const kind = Math.floor(rng.uniform() * 3);
      const edited =
        kind === 0
          ? doc.slice(0, at) + ch + doc.slice(at)
          : kind === 1
            ? doc.slice(0, at) + doc.slice(at + 1)
            : doc.slice(0, at) + ch + doc.slice(at + 1);
      if (edited.isWellFormed()) out.push(edited);
    }
  return out;
}

/**
 * Each state's mask allows exactly the tokens whose bytes the automaton takes from it (a
 * symbol only when the automaton declares `symbols`).
 */
export function expectExactMasks<S>(
  grammar: TokenGrammar<S>,
  automaton: ByteAutomaton<S>,
  states: readonly S[],
  tokenBytes: readonly (TokenBytes | null)[],
  size: number,
): void {
  for (const s of states) {
    const mask = grammar.mask(s);
    for (let id = 0; id < size; id++) {
      const t = tokenBytes[id];
      const want =
        t && (automaton.symbols || t[0]! < SYMBOL_BASE)
          ? runBytes(automaton, s, t) !== null
          : false;
      const got = ((mask[id >>> 5]! >>> (id & 31)) & 1) === 1;
      expect(got, `state ${automaton.key(s)}, token ${id}`).toBe(want);
    }
  }
}

/**
 * `text` as an automaton's units over `vocabulary`: the tokenizer's added tokens (written
 * by their text) as their symbols, the rest UTF-8 bytes.
 */
export function textUnits(tokenizer: Tokenizer, vocabulary: Vocabulary, text: string): number[] {
  const out: number[] = [];
  const added = tokenizer.addedTokens.map((t) => t.content);
  for (let i = 0; i < text.length; ) {
    const hit = added.find((a) => text.startsWith(a, i));
    if (hit) {
      out.push(vocabulary.symbol(hit)!);
      i += hit.length;
      continue;
    }
    const ch = String.fromCodePoint(text.codePointAt(i)!);
    out.push(...Buffer.from(ch, "utf8"));
    i += ch.length;
  }
  return out;
}

/** `text` cut into random pieces of 1 to `most` characters (markers cut too). */
export function randomPieces(text: string, rng: Prng, most: number): string[] {
  const out: string[] = [];
  for (let i = 0; i < text.length; ) {
    const n = 1 + Math.floor(rng.uniform() * most);
    out.push(text.slice(i, i + n));
    i += n;
  }
  return out;
}

/**
 * A context-free grammar's verdict on `text`, byte by byte as masks step it: "whole" (the
 * end-of-sequence symbol `eos` is allowed after it), "prefix", or "no".
 */
export function cfgVerdict(a: GrammarText, text: string, eos: number): "whole" | "prefix" | "no" {
  let s: CfgState | null = a.start;
  for (const b of new TextEncoder().encode(text)) {
    s = a.step(s, b);
    if (s === null) return "no";
  }
  return a.step(s, eos) !== null ? "whole" : "prefix";
}

/**
 * A small vocabulary of JSON's pieces (and the end-of-sequence symbol SYMBOL_BASE) and the
 * states a grammar for JSON passes along three documents: where the JSON grammars' masks are
 * checked against every token (cfg.test, lark.test).
 */
export function jsonMaskCase(a: GrammarText): {
  units: (TokenBytes | null)[];
  grammar: TokenGrammar<CfgState>;
  states: CfgState[];
} {
  // biome-ignore format: a list
  const texts = [
    "{", "}", "[", "]", '"', ":", ",", " ", "\n", "\\", "-", "ab", '"a"', '":', '","', "\\n", "\\u",
    "00e9", "é", "東京", "\u0001", "12", "1.5e", "true", "null", '"}', "a b", 'x"y', '\\"', "\t\t",
  ];
  const units = [null, ...texts.map(utf8), Uint16Array.of(SYMBOL_BASE)];
  const grammar = new TokenGrammar(a, new Vocabulary(units, units.length));
  const docs = [
    String.raw`{"a": "x y", "b": [1, -2.5e3, "q\"\u00e9"], "c": {"d": null}}`,
    '{ "k" : [ { "x" : "東京" } , true ] }',
    String.raw`{"s": "a\nb", "t": "", "u": []}`,
  ];
  const states: CfgState[] = [];
  for (const d of docs) {
    let st: CfgState | null = a.start;
    for (const b of utf8(d)) {
      st = a.step(st!, b);
      expect(st, d).not.toBeNull();
      states.push(st!);
    }
  }
  return { units, grammar, states };
}
