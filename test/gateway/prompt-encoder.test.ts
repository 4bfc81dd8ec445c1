// The PromptEncoder's worker threads (real ones, loading the tiny checkpoint's tokenizer
// files): the ids they give are the tokenizer's in this thread, whatever the text; and a
// worker that cannot serve costs no prompt (they are encoded in place instead).
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { PromptEncoder } from "../../src/gateway/prompt-encoder.ts";
import { tinyTokenizerConfigJson, tinyTokenizerJson } from "../../src/model/tiny-tokenizer.ts";
import { Tokenizer } from "../../src/model/tokenizer.ts";
import { tinyCheckpointFor } from "../support/golden.ts";

let tokenizer: Tokenizer;
const open: PromptEncoder[] = [];
const encoder = (t: Tokenizer, o: ConstructorParameters<typeof PromptEncoder>[1]) => {
  const e = new PromptEncoder(t, o);
  open.push(e);
  return e;
};

beforeAll(async () => {
  tokenizer = Tokenizer.load(await tinyCheckpointFor("tiny-v3"));
});
afterAll(async () => {
  await Promise.all(open.map((e) => e.close()));
});

const TEXTS: [string, string, boolean][] = [
  ["empty", "", true],
  ["ascii", "The quick brown fox jumps over the lazy dog. ".repeat(40), true],
  ["without BOS", "The quick brown fox jumps over the lazy dog. ".repeat(40), false],
  ["accents and CJK", "Ça va? Grüße aus Zürich, 東京と大阪, 한국어 ".repeat(30), true],
  ["emoji and ZWJ", "👩‍👩‍👧‍👦 🏳️‍🌈 family flags ".repeat(30), true],
  ["lone surrogates", "a\uD800b\uDFFFc ".repeat(100), true],
  ["control characters", "\u0000\u0001\t\r\n\u007f\u00a0 ".repeat(100), true],
  ["special token text", "<｜begin▁of▁sentence｜>hello<｜end▁of▁sentence｜> ".repeat(20), true],
];

describe("PromptEncoder", () => {
  it.each(TEXTS)("worker ids equal this thread's ids: %s", async (_name, text, special) => {
    const e = encoder(tokenizer, { workers: 1, inlineBytes: 0 });
    const ids = await e.encode(text, special);
    expect(ids).toEqual(tokenizer.encode(text, special));
    expect(e.stats).toMatchObject({ offloaded: text === "" ? 0 : 1, inline: text === "" ? 1 : 0 });
  });

  it("spreads concurrent prompts over its workers and answers each with its own ids", async () => {
    const e = encoder(tokenizer, { workers: 2, inlineBytes: 16 });
    const texts = Array.from({ length: 24 }, (_, i) => `prompt ${i}: ${"word ".repeat(i * 7)}`);
    const got = await Promise.all(texts.map((t) => e.encode(t)));
    expect(got).toEqual(texts.map((t) => tokenizer.encode(t)));
    const long = texts.filter((t) => Buffer.byteLength(t) > 16).length;
    expect(e.stats).toMatchObject({ offloaded: long, inline: texts.length - long });
    expect(e.liveWorkers).toBe(2);
  });

  it("encodes chats as the tokenizer does (template in place, text on a worker)", async () => {
    const e = encoder(tokenizer, { workers: 1, inlineBytes: 0 });
    const chat = [
      { role: "system" as const, content: "Be brief." },
      { role: "user" as const, content: "Tell me about foxes. ".repeat(20) },
    ];
    expect(await e.encodeChat(chat, true)).toEqual(tokenizer.encodeChat(chat, true));
    expect(e.stats.offloaded).toBe(1);
  });

  it("a chat sent again with a turn more: its earlier pieces from the cache, on one worker message for the rest, the ids the whole chat's", async () => {
    const e = encoder(tokenizer, { workers: 1, inlineBytes: 0 });
    const chat = [
      { role: "system" as const, content: "Be brief. ".repeat(300) },
      { role: "user" as const, content: "Tell me about foxes. ".repeat(200) },
      { role: "assistant" as const, content: "Foxes are small. ".repeat(200) },
      { role: "user" as const, content: "And wolves? ".repeat(200) },
    ];
    expect(await e.encodeChat(chat, true)).toEqual(tokenizer.encodeChat(chat, true));
    expect(e.stats).toMatchObject({ offloaded: 1, pieceTokensCached: 0 });
    const first = e.stats.pieceTokensEncoded;
    expect(first).toBe(tokenizer.encodeChat(chat, true).length);
    const more = [
      ...chat,
      { role: "assistant" as const, content: "Wolves are larger." },
      { role: "user" as const, content: "Thanks." },
    ];
    const ids = await e.encodeChat(more, true);
    expect(ids).toEqual(tokenizer.encodeChat(more, true));
    expect(e.stats.offloaded).toBe(2);
    // Encoded again: the new turns, and the piece they joined (the last one, and at most one
    // piece of a few thousand characters before them).
    const encoded = e.stats.pieceTokensEncoded - first;
    expect(e.stats.pieceTokensCached + encoded).toBe(ids.length);
    expect(e.stats.pieceTokensCached).toBeGreaterThan(ids.length / 2);
    // The same chat again: all from the cache, no worker.
    expect(await e.encodeChat(more, true)).toEqual(ids);
    expect(e.stats).toMatchObject({ offloaded: 2, pieceTokensEncoded: first + encoded });
    // No cache: encoded whole, every time.
    const off = encoder(tokenizer, { workers: 1, inlineBytes: 0, pieceCacheBytes: 0 });
    expect(await off.encodeChat(more, true)).toEqual(ids);
    expect(off.stats).toMatchObject({ pieceTokensCached: 0, pieceTokensEncoded: 0 });
  });

  it("encodes short prompts in place, and all of them without workers", async () => {
    const e = encoder(tokenizer, { workers: 1 });
    expect(await e.encode("short")).toEqual(tokenizer.encode("short"));
    expect(e.stats).toMatchObject({ offloaded: 0, inline: 1 });
    const none = encoder(tokenizer, { workers: 0, inlineBytes: 0 });
    expect(await none.encode("x".repeat(10_000))).toEqual(tokenizer.encode("x".repeat(10_000)));
    expect(none.stats).toMatchObject({ offloaded: 0, inline: 1 });
    // A tokenizer built from objects has no files a worker could load.
    const fromObjects = new Tokenizer(tinyTokenizerJson(), tinyTokenizerConfigJson(256));
    const e2 = encoder(fromObjects, { workers: 2, inlineBytes: 0 });
    expect(e2.liveWorkers).toBe(0);
    expect(await e2.encode("hello world")).toEqual(fromObjects.encode("hello world"));
  });

  it("encodes in place when its worker cannot load the tokenizer, and says so", async () => {
    const dir = mkdtempSync(join(tmpdir(), "em-tok-"));
    try {
      for (const f of ["tokenizer.json", "tokenizer_config.json"])
        copyFileSync(join(tokenizer.dir!, f), join(dir, f));
      const copy = Tokenizer.load(dir);
      rmSync(join(dir, "tokenizer.json"));
      const logs: string[] = [];
      const e = encoder(copy, { workers: 1, inlineBytes: 0, log: (m) => logs.push(m) });
      const text = "The quick brown fox. ".repeat(50);
      // Sent before the worker failed (it holds them) and after: all answered.
      const first = await Promise.all([e.encode(text), e.encode(`${text}!`)]);
      expect(first).toEqual([copy.encode(text), copy.encode(`${text}!`)]);
      expect(e.liveWorkers).toBe(0);
      expect(logs).toHaveLength(1);
      expect(logs[0]).toMatch(/tokenizer worker 0 could not load the tokenizer: .*tokenizer\.json/);
      expect(await e.encode(text)).toEqual(copy.encode(text));
      expect(e.stats).toMatchObject({ offloaded: 2, inline: 1 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("answers the prompts its workers still hold when closed", async () => {
    const e = encoder(tokenizer, { workers: 1, inlineBytes: 0 });
    const texts = Array.from({ length: 8 }, (_, i) => `${i} ${"lorem ipsum ".repeat(500)}`);
    const pending = texts.map((t) => e.encode(t));
    await e.close();
    expect(await Promise.all(pending)).toEqual(texts.map((t) => tokenizer.encode(t)));
    expect(e.liveWorkers).toBe(0);
    // After close: in place.
    expect(await e.encode(texts[0]!)).toEqual(tokenizer.encode(texts[0]!));
  });
});
