import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { writeTinyModel } from "../../src/model/tiny.ts";
import {
  SPECIAL_TOKENS,
  tinyTokenizerConfigJson,
  tinyTokenizerJson,
} from "../../src/model/tiny-tokenizer.ts";
import { type ChatMessage, TOOL_TOKENS, Tokenizer } from "../../src/model/tokenizer.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

const root = mkdtempSync(join(tmpdir(), "em-tokenizer-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof ExpertMeshError ? err.code : `not ExpertMeshError: ${err}`;
  }
  return undefined;
}

let tok: Tokenizer;
beforeAll(async () => {
  await writeTinyModel(root, { arch: "v3" });
  tok = Tokenizer.load(root);
});

describe("tiny tokenizer", () => {
  it("has the DeepSeek special tokens and add_bos_token", () => {
    expect(tok.size).toBe(320);
    expect([tok.bosTokenId, tok.eosTokenId]).toEqual([0, 1]);
    expect([tok.bosToken, tok.eosToken]).toEqual([SPECIAL_TOKENS.bos, SPECIAL_TOKENS.eos]);
    expect([tok.addBosToken, tok.addEosToken]).toEqual([true, false]);
    expect(tok.tokenToId(SPECIAL_TOKENS.user)).toBe(3);
    expect(tok.tokenToId(SPECIAL_TOKENS.assistant)).toBe(4);
    expect(tok.tokenToId("Ġthe")).toBeDefined(); // a merge
  });

  // Ids from Hugging Face's Rust `tokenizers` on the same tokenizer.json.
  const reference: [string, number[]][] = [
    [
      "Hello the world, with you and it is there.",
      [
        77, 106, 291, 116, 268, 272, 279, 113, 105, 49, 272, 280, 109, 309, 295, 37, 280, 303, 268,
        267, 51,
      ],
    ],
    [
      "héllo 世界 🚀 naïve",
      [
        109, 200, 174, 291, 116, 37, 233, 189, 155, 236, 154, 145, 37, 245, 164, 159, 133, 299, 102,
        200, 180, 123, 106,
      ],
    ],
    ["<｜User｜>hi<｜Assistant｜>", [3, 109, 110, 4]],
    [
      "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
      [
        311, 313, 107, 122, 115, 104, 121, 110, 266, 315, 107, 15, 101, 101, 101, 111, 120, 266, 15,
        128, 130, 15, 101, 101, 101, 314, 312,
      ],
    ],
    [
      "  two  spaces\n\ttab",
      [37, 261, 124, 116, 37, 271, 117, 102, 104, 278, 15, 14, 121, 102, 103],
    ],
  ];
  it.each(reference)("encodes %j like the reference and decodes it back", (text, ids) => {
    expect(tok.encode(text, false)).toEqual(ids);
    expect(tok.encode(text)).toEqual([0, ...ids]);
    expect(tok.decode(ids)).toBe(text);
  });

  it.each([
    "",
    "The quick brown fox jumps over the lazy dog 0123456789 !@#$%^&*()",
    "Ünïcödé — “quotes” 日本語テキスト 한국어 العربية 🎉👩‍👩‍👧",
    "\u0000\u0001 control \u007f and \r\n line ends",
  ])("round-trips %j", (text) => {
    expect(tok.decode(tok.encode(text))).toBe(`${SPECIAL_TOKENS.bos}${text}`);
    expect(tok.decode(tok.encode(text), true)).toBe(text);
  });

  it("decodes ids past the tokenizer (DeepSeek's padding rows of vocab_size) to nothing", () => {
    expect(tok.decode([tok.tokenToId("Ġthe")!, 320])).toBe(" the");
  });
});

describe("chat template", () => {
  const chat: ChatMessage[] = [
    { role: "system", content: "Be brief." },
    { role: "system", content: "Be kind." },
    { role: "user", content: "Hi" },
    { role: "assistant", content: "Hello!" },
    { role: "user", content: "Bye" },
  ];

  it("renders DeepSeek's format", () => {
    expect(tok.applyChatTemplate(chat, true)).toBe(
      "<｜begin▁of▁sentence｜>Be brief.\n\nBe kind.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜>",
    );
    expect(tok.applyChatTemplate([{ role: "user", content: "Hi" }])).toBe(
      "<｜begin▁of▁sentence｜><｜User｜>Hi",
    );
  });

  it("continues the final message: the text ends with its content, the turn left open", () => {
    const prefix: ChatMessage[] = [
      { role: "user", content: "Hello!" },
      { role: "assistant", content: "Hello" },
    ];
    // The last occurrence is cut after, not the user's "Hello!".
    expect(tok.applyChatTemplate(prefix, false, { continueFinalMessage: true })).toBe(
      "<｜begin▁of▁sentence｜><｜User｜>Hello!<｜Assistant｜>Hello",
    );
    // A template that changes the content (R1's drops what precedes </think>) cannot be
    // continued: refused, not cut somewhere else.
    const r1Like = new Tokenizer(tinyTokenizerJson(), {
      ...tinyTokenizerConfigJson(256),
      chat_template: "{% for m in messages %}{{ m.content.split('</think>')[-1] }}|{% endfor %}",
    });
    const thought: ChatMessage[] = [{ role: "assistant", content: "<think>a</think>b" }];
    expect(
      codeOf(() => r1Like.applyChatTemplate(thought, false, { continueFinalMessage: true })),
    ).toBe("EM_TOKENIZER_TEMPLATE");
  });

  it("renders tool calls and their results as DeepSeek-V3's template does", () => {
    const call = (id: string, args: string) => ({
      id,
      type: "function" as const,
      function: { name: "get_weather", arguments: args },
    });
    const turns: ChatMessage[] = [
      { role: "user", content: "Paris and Rome?" },
      {
        role: "assistant",
        content: "Checking.",
        tool_calls: [call("a", '{"city":"Paris"}'), call("b", '{"city":"Rome"}')],
      },
      { role: "tool", content: "sunny", tool_call_id: "a" },
      { role: "tool", content: "rain", tool_call_id: "b" },
    ];
    const calls =
      "<｜Assistant｜>Checking.<｜tool▁calls▁begin｜>" +
      '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city":"Paris"}\n```<｜tool▁call▁end｜>\n' +
      '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city":"Rome"}\n```<｜tool▁call▁end｜>' +
      "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>";
    const outputs =
      "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>\n" +
      "<｜tool▁output▁begin｜>rain<｜tool▁output▁end｜><｜tool▁outputs▁end｜>";
    // After results the model answers straight on (no assistant token), as in V3's.
    expect(tok.applyChatTemplate(turns, true)).toBe(
      `<｜begin▁of▁sentence｜><｜User｜>Paris and Rome?${calls}${outputs}`,
    );
    expect(
      tok.applyChatTemplate(
        [
          ...turns,
          { role: "assistant", content: "Sunny, rainy." },
          { role: "user", content: "Thanks" },
        ],
        true,
      ),
    ).toBe(
      `<｜begin▁of▁sentence｜><｜User｜>Paris and Rome?${calls}${outputs}Sunny, rainy.<｜end▁of▁sentence｜><｜User｜>Thanks<｜Assistant｜>`,
    );
    // Tool tokens encode as single ids.
    const ids = tok.encode(calls, false);
    for (const t of Object.values(TOOL_TOKENS).slice(0, 5)) expect(ids).toContain(tok.tokenToId(t));
  });

  it("keeps tool-call tokens when skipping special ones, even where they are marked special", () => {
    const json = tinyTokenizerJson() as { added_tokens: { content: string; special: boolean }[] };
    for (const t of json.added_tokens) if (t.content.includes("tool")) t.special = true;
    const marked = new Tokenizer(json, tinyTokenizerConfigJson(256));
    const text = `${SPECIAL_TOKENS.bos}é${TOOL_TOKENS.callsBegin}x${TOOL_TOKENS.sep}東${TOOL_TOKENS.callsEnd}`;
    const ids = marked.encode(text, false);
    expect(marked.decode(ids, true)).toBe(
      `é${TOOL_TOKENS.callsBegin}x${TOOL_TOKENS.sep}東${TOOL_TOKENS.callsEnd}`,
    );
    expect(marked.decode(ids, true)).toBe(tok.decode(tok.encode(text, false), true));
    expect(marked.decode(ids)).toBe(text);
  });

  it("names the request's tools after the system prompt", () => {
    const tools = [
      { type: "function", function: { name: "a" } },
      { type: "function", function: { name: "b" } },
    ];
    expect(tok.applyChatTemplate([{ role: "user", content: "x" }], true, { tools })).toBe(
      "<｜begin▁of▁sentence｜>Tools: a, b<｜User｜>x<｜Assistant｜>",
    );
    expect(tok.applyChatTemplate(chat.slice(0, 1), false, { tools })).toBe(
      "<｜begin▁of▁sentence｜>Be brief.\n\nTools: a, b",
    );
  });

  it("encodes a chat with one BOS, role tokens as single ids", () => {
    const ids = tok.encodeChat([{ role: "user", content: "Hi" }], true);
    expect(ids).toEqual([0, 3, ...tok.encode("Hi", false), 4]);
  });
});

describe("tokenizer errors", () => {
  const json = tinyTokenizerJson();
  const config = tinyTokenizerConfigJson(256);
  const cases: [string, () => unknown, string][] = [
    ["missing files", () => Tokenizer.load(join(root, "nowhere")), "EM_TOKENIZER_READ"],
    ["tokenizer.json not an object", () => new Tokenizer([], config), "EM_TOKENIZER_INVALID"],
    [
      "unknown model type",
      () => new Tokenizer({ ...json, model: { type: "Nope" } }, config),
      "EM_TOKENIZER_INVALID",
    ],
    [
      "bos token not in the vocabulary",
      () => new Tokenizer(json, { ...config, bos_token: "<s>" }),
      "EM_TOKENIZER_INVALID",
    ],
    [
      "add_bos_token without a bos token",
      () => new Tokenizer(json, { ...config, bos_token: null }),
      "EM_TOKENIZER_INVALID",
    ],
    [
      "no chat template",
      () => new Tokenizer(json, { ...config, chat_template: undefined }).applyChatTemplate([]),
      "EM_TOKENIZER_TEMPLATE",
    ],
    [
      "template that does not parse",
      () => new Tokenizer(json, { ...config, chat_template: "{% if %}" }),
      "EM_TOKENIZER_TEMPLATE",
    ],
    [
      "template that raises",
      () =>
        new Tokenizer(json, {
          ...config,
          chat_template: "{{ raise_exception('no system role') }}",
        }).applyChatTemplate([]),
      "EM_TOKENIZER_TEMPLATE",
    ],
  ];
  it.each(cases)("%s", (_name, fn, code) => {
    expect(codeOf(fn)).toBe(code);
  });

  it("picks the default of a list of named templates", () => {
    const t = new Tokenizer(json, {
      ...config,
      chat_template: [
        { name: "tool_use", template: "tools" },
        { name: "default", template: "{{ bos_token }}default" },
      ],
    });
    expect(t.applyChatTemplate([])).toBe(`${SPECIAL_TOKENS.bos}default`);
  });
});
