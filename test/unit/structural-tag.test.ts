// Structural tags (src/gateway/structural-tag.ts): a table of formats and the texts each takes
// whole (then the end-of-sequence symbol), as a prefix only, or refuses at some byte; masks
// equal to checking every token; each refusal of a format with the path to the part at fault.
import { describe, expect, it } from "vitest";
import { ApiError } from "../../src/gateway/errors.ts";
import { SYMBOL_BASE, Vocabulary } from "../../src/gateway/grammar.ts";
import {
  type StructuralState,
  structuralTagFormat,
  structuralTagGrammar,
} from "../../src/gateway/structural-tag.ts";
import { Prng } from "../../src/model/prng.ts";
import { expectExactMasks, utf8 } from "../support/grammar.ts";

const EOS = SYMBOL_BASE;
const CALL = SYMBOL_BASE + 1;
// Every printable ASCII byte, some longer tokens (that cross a region's edges), é's bytes,
// the end-of-sequence and a tool-call token.
const texts = [
  ...Array.from({ length: 0x7f - 0x20 }, (_, i) => String.fromCharCode(0x20 + i)),
  "<function=",
  "get_weather>",
  '{"city": "',
  '"}</function>',
  "}</",
  "</think>",
  "é",
];
const tokenBytes = [null, ...texts.map(utf8), Uint16Array.of(EOS), Uint16Array.of(CALL)];
const V = tokenBytes.length;
const vocabulary = new Vocabulary(
  tokenBytes,
  V,
  new Map([
    ["</s>", EOS],
    ["<call>", CALL],
  ]),
);

const weather = {
  type: "object",
  properties: { city: { type: "string" } },
  required: ["city"],
  additionalProperties: false,
};
const functionTag = (name: string, schema: unknown = weather) => ({
  type: "tag",
  begin: `<function=${name}>`,
  content: { type: "json_schema", json_schema: schema },
  end: "</function>",
});
const calls = (o: Record<string, unknown> = {}) => ({
  type: "triggered_tags",
  triggers: ["<function="],
  tags: [functionTag("get_weather"), functionTag("get_time", { type: "object" })],
  ...o,
});
const tag = (format: unknown) => ({ type: "structural_tag", format });
const objectTag = {
  type: "tag",
  begin: "<a>",
  content: { type: "json_schema", json_schema: { type: "object" } },
  end: "</a>",
};
/** Any tokens, ended by the added token <call>. */
const untilCall = {
  type: "tag",
  begin: "[",
  content: { type: "any_tokens" },
  end: { type: "token", token: "<call>" },
};
const signedNumber = {
  type: "sequence",
  elements: [
    { type: "optional", content: { type: "const_string", value: "-" } },
    { type: "regex", pattern: "[0-9]+" },
    { type: "const_string", value: "!" },
  ],
};
const parenthesised = {
  type: "sequence",
  elements: [
    { type: "grammar", grammar: 'root ::= "(" [a-z]* ")"' },
    { type: "const_string", value: "." },
  ],
};

const larkList = {
  type: "sequence",
  elements: [
    { type: "grammar", grammar: 'start: list\nlist: list "," ITEM | ITEM\nITEM: "a" | "b"' },
    { type: "const_string", value: ";" },
  ],
};

/** Runs `text` (CALL where it says <call>); "whole": then EOS is taken; "prefix"; "refused". */
function verdict(format: unknown, text: string): "whole" | "prefix" | "refused" {
  const a = structuralTagGrammar(vocabulary, format, EOS, "response_format").automaton;
  let s: StructuralState | null = a.start;
  const units = text
    .split("<call>")
    .flatMap((part, i) => [...(i > 0 ? [CALL] : []), ...utf8(part)]);
  for (const u of units) {
    s = a.step(s, u);
    if (s === null) return "refused";
  }
  const end = a.step(s, EOS);
  return end !== null && a.isDone(end) ? "whole" : "prefix";
}

describe("structural tags: what each format takes", () => {
  const W = '{"city": "Paris"}';
  it.each(
    (
      [
        // triggered_tags: free text, a call wherever its trigger appears, free text again
        [calls(), "", "whole"],
        [calls(), "Just text, < and <functio too.", "whole"],
        [calls(), `Let me look. <function=get_weather>${W}</function> Done.`, "whole"],
        [calls(), `<function=get_weather>${W}</function><function=get_time>{}</function>`, "whole"],
        [calls(), "<function=get_weather>", "prefix"],
        [calls(), `<function=get_weather>${W}`, "prefix"],
        [calls(), "<function=get_temperature>", "refused"],
        [calls(), '<function=get_weather>{"town": "Paris"}', "refused"],
        [calls(), `<function=get_weather>${W}</func>`, "refused"],
        [calls({ at_least_one: true }), "Hi <function=get_time>{}</function>", "refused"],
        [calls({ at_least_one: true }), "<function=get_time>{}</function> then text", "whole"],
        [calls({ at_least_one: true }), "", "prefix"],
        [calls({ stop_after_first: true }), "a <function=get_time>{}</function>", "whole"],
        [calls({ stop_after_first: true }), "a <function=get_time>{}</function>b", "refused"],
        [calls({ stop_after_first: true }), "only text", "whole"],
        [
          calls({ at_least_one: true, stop_after_first: true }),
          "<function=get_time>{}</function>",
          "whole",
        ],
        [calls({ excludes: ["STOP"] }), "no STOP here", "refused"],
        // vLLM's older form: the same triggered_tags
        [
          {
            type: "structural_tag",
            structures: [{ begin: "<function=get_weather>", schema: weather, end: "</function>" }],
            triggers: ["<function="],
          },
          `Text <function=get_weather>${W}</function>`,
          "whole",
        ],
        // a tag whose free content stops at its end; what follows it
        [
          {
            type: "sequence",
            elements: [
              { type: "tag", begin: "<think>", content: { type: "any_text" }, end: "</think>" },
              { type: "const_string", value: "Answer" },
            ],
          },
          "<think>a < b, </thin></think>Answer",
          "whole",
        ],
        [
          {
            type: "sequence",
            elements: [
              { type: "tag", begin: "<think>", content: { type: "any_text" }, end: "</think>" },
              { type: "const_string", value: "Answer" },
            ],
          },
          "<think>a</think>b</think>",
          "refused",
        ],
        [
          { type: "tag", begin: "<r>", content: { type: "any_text" }, end: ["</r>", "</x>"] },
          "<r>x</x>",
          "whole",
        ],
        // free text's own limits
        [{ type: "any_text", excludes: ["bad"] }, "ba d, b a d", "whole"],
        [{ type: "any_text", excludes: ["bad"] }, "not bad", "refused"],
        [{ type: "any_text", max_chars: 3 }, "aéb", "whole"],
        [{ type: "any_text", max_chars: 3 }, "abcd", "refused"],
        [{ type: "any_text" }, "text <call>", "refused"],
        [{ type: "any_text" }, "caf\u00e9 \u{1F600}", "whole"],
        [{ type: "any_text", max_chars: 2 }, "\u{1F600}\u{1F600}", "whole"],
        [{ type: "any_text", max_chars: 2 }, "\u{1F600}\u{1F600}x", "refused"],
        // compositions
        [
          {
            type: "or",
            elements: [
              { type: "const_string", value: "yes" },
              { type: "const_string", value: "no" },
            ],
          },
          "no",
          "whole",
        ],
        [
          {
            type: "or",
            elements: [
              { type: "const_string", value: "yes" },
              { type: "const_string", value: "no" },
            ],
          },
          "ye",
          "prefix",
        ],
        [
          { type: "repeat", min: 2, max: 3, content: { type: "const_string", value: "ab" } },
          "ab",
          "prefix",
        ],
        [
          { type: "repeat", min: 2, max: 3, content: { type: "const_string", value: "ab" } },
          "abab",
          "whole",
        ],
        [
          { type: "repeat", min: 2, max: 3, content: { type: "const_string", value: "ab" } },
          "ababab",
          "whole",
        ],
        [
          { type: "repeat", min: 2, max: 3, content: { type: "const_string", value: "ab" } },
          "abababa",
          "refused",
        ],
        [
          { type: "repeat", min: 1, max: -1, content: { type: "const_string", value: "ab" } },
          "ababababab",
          "whole",
        ],
        [{ type: "plus", content: { type: "const_string", value: "x" } }, "", "prefix"],
        [{ type: "star", content: { type: "const_string", value: "x" } }, "", "whole"],
        [signedNumber, "-123!", "whole"],
        [signedNumber, "12!", "whole"],
        [signedNumber, "12a", "refused"],
        [parenthesised, "(ab).", "whole"],
        [parenthesised, "(ab", "prefix"],
        // a grammar in Lark (no '::='), left-recursive
        [larkList, "a,b,a;", "whole"],
        [larkList, "a,b", "prefix"],
        [larkList, "a,,b;", "refused"],
        // token-level: any tokens but some added ones, regions entered by an added token
        [{ type: "any_tokens", exclude_tokens: ["</s>"] }, "text<call>more", "whole"],
        [{ type: "any_tokens", exclude_tokens: ["<call>"] }, "text<call>", "refused"],
        [
          {
            type: "token_triggered_tags",
            trigger_tokens: ["<call>"],
            tags: [
              {
                type: "tag",
                begin: { type: "token", token: "<call>" },
                content: { type: "any_tokens" },
                end: "!",
              },
            ],
          },
          "a<call>b! c<call>!",
          "whole",
        ],
        [untilCall, "[x]<call>", "whole"],
        [untilCall, "[x<call>y", "refused"],
        [
          {
            type: "token_triggered_tags",
            trigger_tokens: ["<call>"],
            tags: [
              {
                type: "tag",
                begin: { type: "token", token: "<call>" },
                content: { type: "json_schema", json_schema: { type: "object" } },
                end: "!",
              },
            ],
            at_least_one: true,
          },
          "text first",
          "refused",
        ],
        [
          { type: "token_dispatch", rules: [["<call>", { type: "const_string", value: "ok" }]] },
          "a<call>ok b<call>ok",
          "whole",
        ],
        [
          { type: "token_dispatch", rules: [["<call>", { type: "const_string", value: "ok" }]] },
          "a<call>no",
          "refused",
        ],
        // lists of tags, dispatch on patterns, added tokens
        [
          {
            type: "tags_with_separator",
            tags: [objectTag],
            separator: ",",
          },
          "<a>{}</a>,<a>{ }</a>",
          "whole",
        ],
        [
          {
            type: "tags_with_separator",
            tags: [objectTag],
            separator: ",",
          },
          "",
          "whole",
        ],
        [
          {
            type: "tags_with_separator",
            tags: [objectTag],
            separator: ",",
            at_least_one: true,
          },
          "",
          "prefix",
        ],
        [
          {
            type: "tags_with_separator",
            tags: [objectTag],
            separator: ",",
            stop_after_first: true,
          },
          "<a>{}</a>,",
          "refused",
        ],
        [
          { type: "dispatch", rules: [["#n=", { type: "regex", pattern: "[0-9]+;" }]] },
          "a #n=12; b #n=3;",
          "whole",
        ],
        [
          { type: "dispatch", rules: [["#n=", { type: "regex", pattern: "[0-9]+;" }]] },
          "a #n=x",
          "refused",
        ],
        [
          {
            type: "dispatch",
            rules: [["#n=", { type: "regex", pattern: "[0-9]+;" }]],
            loop: false,
          },
          "#n=1; #n=",
          "refused",
        ],
        [
          {
            type: "sequence",
            elements: [
              { type: "token", token: "<call>" },
              { type: "const_string", value: "go" },
            ],
          },
          "<call>go",
          "whole",
        ],
        [
          {
            type: "tag",
            begin: { type: "token", token: "<call>" },
            content: { type: "json_schema", json_schema: { type: "object" } },
            end: "!",
          },
          "<call>{}!",
          "whole",
        ],
      ] as [unknown, string, string][]
    ).map(([format, text, want]) => ({
      name: `${(format as { type: string }).type} on ${JSON.stringify(text)}: ${want}`,
      format: (format as { type: string }).type === "structural_tag" ? format : tag(format),
      text,
      want,
    })),
  )("$name", ({ format, text, want }) => {
    expect(verdict(format, text)).toBe(want);
  });

  it("masks allow exactly the tokens the automaton takes, across a call's edges", () => {
    const g = structuralTagGrammar(vocabulary, tag(calls()), EOS, "response_format");
    const a = g.automaton;
    const states: StructuralState[] = [a.start];
    let s: StructuralState | null = a.start;
    for (const b of utf8('Hi <function=get_weather>{"city": "Nice"}</function> ok')) {
      s = a.step(s!, b);
      expect(s).not.toBeNull();
      states.push(s!);
    }
    expectExactMasks(g, a, states, tokenBytes, V);
  });

  it("masks stay exact for free text in a tag, at the top, and before an end token", () => {
    // The same excluded bytes in three places; the added tokens (the end-of-sequence one, an
    // end token) allowed exactly where each may come.
    const formats = [
      { type: "tag", begin: "(", content: { type: "any_text", excludes: ["#"] }, end: "#)" },
      { type: "any_text", excludes: ["#)"] },
      {
        type: "tag",
        begin: "(",
        content: { type: "any_text", excludes: ["#)"] },
        end: { type: "token", token: "<call>" },
      },
    ];
    for (const format of formats) {
      const g = structuralTagGrammar(vocabulary, tag(format), EOS, "response_format");
      const a = g.automaton;
      const states: StructuralState[] = [a.start];
      let s: StructuralState | null = a.start;
      for (const b of utf8("(ab é, #x")) {
        s = a.step(s!, b);
        if (s === null) break;
        states.push(s);
      }
      expectExactMasks(g, a, states, tokenBytes, V);
    }
  });

  it("keeps the grammar of a format once per vocabulary", () => {
    const a = structuralTagGrammar(vocabulary, tag(calls()), EOS, "p");
    expect(structuralTagGrammar(vocabulary, tag(calls()), EOS, "p")).toBe(a);
  });
});

describe("structural tags: refusals", () => {
  it.each([
    [tag({ type: "exclude_token" }), /"exclude_token" is not supported/],
    [tag({ type: "any_tokens", exclude_tokens: [5] }), /exclude_tokens\.0: must be an added token/],
    [
      tag({ type: "any_tokens", exclude_tokens: ["a"] }),
      /exclude_tokens\.0\.token: names no added token/,
    ],
    [tag({ type: "any_tokens", max_tokens: 3 }), /max_tokens: is not supported/],
    [tag({ type: "nonsense" }), /response_format\.type: "nonsense" is no format/],
    [
      tag({ type: "json_schema", json_schema: {}, style: "qwen_xml" }),
      /style: "qwen_xml" is not supported/,
    ],
    [tag({ type: "json_schema", json_schema: {}, any_order: true }), /any_order: is not supported/],
    [tag({ type: "any_text", max_tokens: 4 }), /max_tokens: is not supported/],
    [tag({ type: "sequence", elements: [] }), /elements: must be a non-empty array/],
    [
      tag({ type: "repeat", min: 3, max: 2, content: { type: "any_text" } }),
      /max: must be at least min \(3\)/,
    ],
    [tag(calls({ triggers: ["<tool="] })), /tags\.0\.begin: must begin with one of the triggers/],
    [tag(calls({ triggers: ["<function=", "<x"] })), /triggers\.1: begins no tag/],
    [tag({ type: "token", token: "<nope>" }), /token: names no added token/],
    [tag({ type: "token", token: 99999 }), /token: names no token/],
    [
      tag({ type: "tag", begin: "<a>", content: { type: "regex", pattern: "(" }, end: "</a>" }),
      /pattern/,
    ],
    [{ type: "structural_tag" }, /neither "format" nor "structures"/],
    [{ type: "structural_tag", structures: [] }, /structures must be a non-empty array/],
    [
      tag(
        Array.from({ length: 40 }).reduce((inner) => ({ type: "optional", content: inner }), {
          type: "any_text",
        }),
      ),
      /nest more than 32 deep/,
    ],
  ] as [unknown, RegExp][])("refuses %# (%s)", (format, message) => {
    let err: unknown;
    try {
      structuralTagGrammar(vocabulary, format, EOS, "response_format");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).code).toBe("EM_GATEWAY_BAD_REQUEST");
    expect((err as ApiError).message).toMatch(message as RegExp);
  });

  it("reads vLLM's older form as triggered_tags", () => {
    expect(
      structuralTagFormat(
        {
          type: "structural_tag",
          structures: [{ begin: "<a>", schema: {}, end: "</a>" }],
          triggers: ["<a"],
        },
        "p",
      ),
    ).toEqual({
      type: "triggered_tags",
      triggers: ["<a"],
      tags: [
        {
          type: "tag",
          begin: "<a>",
          content: { type: "json_schema", json_schema: {} },
          end: "</a>",
        },
      ],
    });
  });
});

describe("structural tags: free text is UTF-8", () => {
  const a = structuralTagGrammar(vocabulary, tag({ type: "any_text" }), EOS, "p").automaton;
  const run = (bytes: number[]) =>
    bytes.reduce<StructuralState | null>((s, b) => (s === null ? null : a.step(s, b)), a.start);
  it.each([
    ["a lone continuation byte", [0x80], false],
    ["an overlong lead byte", [0xc0, 0x80], false],
    ["a surrogate", [0xed, 0xa0, 0x80], false],
    ["past U+10FFFF", [0xf4, 0x90, 0x80, 0x80], false],
    ["é", [0xc3, 0xa9], true],
  ])("%s: taken %s", (_, bytes, ok) => {
    expect(run(bytes as number[]) !== null).toBe(ok);
  });

  it("ends only between characters", () => {
    expect(a.step(run([0xc3])!, EOS)).toBeNull();
    expect(a.step(run([0xc3, 0xa9])!, EOS)).not.toBeNull();
  });
});

describe("structural tags: free text's excluded strings", () => {
  it("takes a text exactly when it holds none of them (400 random texts, overlapping strings)", () => {
    const excludes = ["ab<", "b<<", "<a", "aaa"];
    const a = structuralTagGrammar(
      vocabulary,
      tag({ type: "any_text", excludes }),
      EOS,
      "p",
    ).automaton;
    const rng = new Prng(7);
    for (let i = 0; i < 400; i++) {
      const text = Array.from(
        { length: 1 + Math.floor(rng.uniform() * 12) },
        () => "ab<>"[Math.floor(rng.uniform() * 4)],
      ).join("");
      let s: StructuralState | null = a.start;
      for (const b of utf8(text)) s = s && a.step(s, b);
      expect(s !== null, text).toBe(!excludes.some((x) => text.includes(x)));
    }
  });
});
