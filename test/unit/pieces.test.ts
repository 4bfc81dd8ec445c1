// pieces.ts: where a text's encoding may be cut. The splitter is built only for tokenizers
// whose pieces @huggingface/tokenizers encodes independently; its cuts follow the library's
// scan (the longest added token at each position); and the property the prompt encoder's
// cache rests on, checked against the library on the tiny tokenizer: the encodings of the
// parts, joined, are the encoding of the text, wherever the parts are cut.
import { describe, expect, it } from "vitest";
import { PieceCache } from "../../src/gateway/prompt-encoder.ts";
import { type PieceSplitter, pieceSplitter, splitPieces } from "../../src/model/pieces.ts";
import { tinyTokenizerConfigJson, tinyTokenizerJson } from "../../src/model/tiny-tokenizer.ts";
import { TOOL_TOKENS, Tokenizer } from "../../src/model/tokenizer.ts";

const added = (content: string, o: Record<string, unknown> = {}) => ({
  id: 0,
  content,
  special: true,
  lstrip: false,
  rstrip: false,
  normalized: false,
  ...o,
});
const json = (tokens: object[], more: Record<string, unknown> = {}) => ({
  added_tokens: tokens,
  normalizer: null,
  pre_tokenizer: { type: "ByteLevel" },
  ...more,
});

describe("pieceSplitter: built only where pieces are encoded alone", () => {
  it.each<[string, Record<string, unknown>, boolean]>([
    ["byte-level, plain added tokens", json([added("<a>"), added("<b>")]), true],
    ["no added tokens", json([]), true],
    ["an added token with lstrip", json([added("<a>"), added("<b>", { lstrip: true })]), false],
    ["an added token with rstrip", json([added("<a>", { rstrip: true })]), false],
    [
      "Metaspace, anywhere in the pre-tokenizer",
      json([added("<a>")], {
        pre_tokenizer: {
          type: "Sequence",
          pretokenizers: [{ type: "Metaspace", replacement: "▁", prepend_scheme: "first" }],
        },
      }),
      false,
    ],
    ["an added token with no text", json([added("")]), false],
    // (normalized tokens with a normalizer are matched inside pieces: their strip flags
    // never cut the raw text)
    [
      "a normalized token with rstrip beside a normalizer",
      json([added("<a>"), added("x", { normalized: true, rstrip: true })], {
        normalizer: { type: "Lowercase" },
      }),
      true,
    ],
  ])("%s: %s", (_name, tokenizer, built) => {
    expect(pieceSplitter(tokenizer) !== null).toBe(built);
  });
});

describe("splitPieces: cut after added tokens, the library's way", () => {
  const s = pieceSplitter(
    json([added("<a>"), added("<a>b"), added("<b>"), added("x", { normalized: true })], {
      normalizer: { type: "Lowercase" },
    }),
  )!;
  it.each<[string, number, string[]]>([
    ["plain text", 1, ["plain text"]],
    ["", 1, [""]],
    ["one<a>two<b>three", 1, ["one<a>", "two<b>", "three"]],
    ["<a><b>", 1, ["<a>", "<b>"]],
    // The longest token at a position: "<a>b" over "<a>".
    ["1<a>b2<a>3", 1, ["1<a>b", "2<a>", "3"]],
    // A normalized token (here: with a normalizer) does not cut.
    ["1x2<a>", 1, ["1x2<a>"]],
    // Parts shorter than minChars are joined with the next.
    ["1<a>2<a>3<a>4", 5, ["1<a>2<a>", "3<a>4"]],
    ["1<a>2<a>3<a>4", 100, ["1<a>2<a>3<a>4"]],
    // A token half there is text.
    ["1<a2<b", 1, ["1<a2<b"]],
  ])("%j (minChars %d)", (text, min, parts) => {
    const got = splitPieces(s, text, min);
    expect(got).toEqual(parts);
    expect(got.join("")).toBe(text);
  });
});

describe("splitPieces: the same cuts whether the scan jumps between first characters or not", () => {
  it("nine tokens of nine first characters (no jumps) and the same as two splitters of fewer", () => {
    const heads = "abcdefghi".split("");
    const many = pieceSplitter(json(heads.map((h) => added(`${h}#`))))!;
    expect(many.firsts).toBeNull();
    const few = [
      pieceSplitter(json(heads.slice(0, 5).map((h) => added(`${h}#`))))!,
      pieceSplitter(json(heads.slice(5).map((h) => added(`${h}#`))))!,
    ];
    expect(few.every((f) => f.firsts !== null)).toBe(true);
    const text = "xa#yb#zc#d#e#f#g#h#i#j#a#".repeat(3);
    const parts = splitPieces(many, text, 1);
    expect(parts.join("")).toBe(text);
    // every token ends a part: 9 tokens a round and "j#" not one
    expect(parts.length).toBe(3 * 10 + 0);
    expect(parts.every((p, i) => i === parts.length - 1 || /[a-i]#$/.test(p))).toBe(true);
    // Cut by each half's tokens alone, then by the other's: the same parts.
    const halves = few[0]!;
    const firstHalf = splitPieces(halves, text, 1);
    expect(firstHalf.every((p, i) => i === firstHalf.length - 1 || /[a-e]#$/.test(p))).toBe(true);
  });
});

describe("the encodings of the parts, joined, are the text's (tiny tokenizer)", () => {
  const tok = new Tokenizer(tinyTokenizerJson(), tinyTokenizerConfigJson(256));
  const splitter = tok.pieceSplitter as PieceSplitter;
  const specials = [...tok.addedTokens.map((t) => t.content), ...Object.values(TOOL_TOKENS)];
  /** A deterministic pseudo-random text: words, spaces, unicode, and added tokens. */
  const textOf = (seed: number, n: number) => {
    let x = seed * 2654435761;
    const next = () => {
      x = (x * 1103515245 + 12345) >>> 0;
      return x;
    };
    const bits = [
      " ",
      "  ",
      "\n",
      "\n\n",
      "word",
      "Zürich",
      "東京",
      "🙂",
      "'s",
      "123",
      "\t",
      "<",
      "｜",
    ];
    let out = "";
    for (let i = 0; i < n; i++) {
      const r = next() % 10;
      out += r < 2 ? specials[next() % specials.length]! : bits[next() % bits.length]!;
    }
    return out;
  };

  it("has a splitter", () => {
    expect(splitter).not.toBeNull();
  });

  it.each(Array.from({ length: 40 }, (_, i) => i))(
    "random text %d, cut at every token and by length",
    (seed) => {
      const text = textOf(seed, 200);
      const whole = tok.encode(text, false);
      for (const min of [1, 7, 64, 10_000]) {
        const parts = splitPieces(splitter, text, min);
        expect(parts.join("")).toBe(text);
        expect(parts.flatMap((p) => tok.encode(p, false))).toEqual(whole);
      }
    },
  );

  it("a chat rendered by the template, with calls and results", () => {
    const text = tok.applyChatTemplate(
      [
        { role: "system", content: "Be brief. ".repeat(30) },
        { role: "user", content: "Find the weather in Paris, then in Rome.\n\n" },
        {
          role: "assistant",
          content: null,
          tool_calls: [
            { id: "c1", type: "function", function: { name: "w", arguments: '{"city": "Paris"}' } },
          ],
        },
        { role: "tool", tool_call_id: "c1", content: ' {"temp": 12} \n' },
        { role: "assistant", content: "  Paris: 12°C. " },
        { role: "user", content: "And Rome?" },
      ],
      true,
    );
    const whole = tok.encode(text, false);
    for (const min of [1, 16, 256]) {
      const parts = splitPieces(splitter, text, min);
      expect(parts.length).toBeGreaterThan(min === 256 ? 0 : 3);
      expect(parts.flatMap((p) => tok.encode(p, false))).toEqual(whole);
    }
  });
});

describe("PieceCache: least recently used out past its bytes", () => {
  it("keeps, refreshes on use, and drops the oldest", () => {
    const ids = [1, 2, 3, 4];
    const one = PieceCache.cost("aaaa", ids);
    const c = new PieceCache(3 * one);
    c.set("aaaa", ids);
    c.set("bbbb", ids);
    c.set("cccc", ids);
    expect([c.size, c.bytes]).toEqual([3, 3 * one]);
    expect(c.get("aaaa")).toEqual(ids); // (now the most recent)
    c.set("dddd", ids);
    expect(c.get("bbbb")).toBeUndefined();
    expect(c.get("aaaa")).toEqual(ids);
    expect(c.get("cccc")).toEqual(ids);
    expect(c.get("dddd")).toEqual(ids);
    expect(c.bytes).toBe(3 * one);
    // Bigger than the whole budget: not kept, nothing dropped for it.
    c.set("e".repeat(100), ids);
    expect([c.size, c.get("e".repeat(100))]).toEqual([3, undefined]);
  });
});
