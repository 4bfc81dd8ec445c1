// DeepSeek-R1's thinking apart from its answer (src/gateway/reasoning.ts) and a chat
// choice's reader (src/gateway/chat-output.ts): hand cases, then random texts built from
// the markers' pieces split as a direct reading splits them, whole or pushed in random
// pieces, and a streamed choice's deltas adding up to the whole response's message.
import { describe, expect, it } from "vitest";
import { type ChatDelta, ChatOutput } from "../../src/gateway/chat-output.ts";
import { ReasoningParser, splitReasoning } from "../../src/gateway/reasoning.ts";
import { Prng } from "../../src/model/prng.ts";
import { TOOL_TOKENS } from "../../src/model/tokenizer.ts";

const T = TOOL_TOKENS;

describe("the reasoning split", () => {
  it.each([
    [
      "tags, then the answer",
      "<think>\nLet me see.</think>\n\nIt is 4.",
      "\nLet me see.",
      "\n\nIt is 4.",
    ],
    ["no opening tag (the template wrote it)", "Hmm.</think>Yes.", "Hmm.", "Yes."],
    ["an opening tag after whitespace", "\n <think>x</think>y", "x", "y"],
    ["thinking never closed: all reasoning", "<think>still thinking", "still thinking", ""],
    ["an empty thought", "<think></think>Answer", "", "Answer"],
    ["a second closing tag belongs to the answer", "a</think>b</think>c", "a", "b</think>c"],
    ["a tag's start at the end stays reasoning", "a </thi", "a </thi", ""],
    ["calls end the thinking too", `plan${T.callsBegin}x`, "plan", `${T.callsBegin}x`],
    ["the first of the two ends it", `a</think>b${T.callsBegin}`, "a", `b${T.callsBegin}`],
    ["only the start of <think>", "<thi", "<thi", ""],
  ])("%s", (_what, text, reasoning, content) => {
    expect(splitReasoning(text)).toEqual({ reasoning, content });
  });

  /** A direct reading: an optional leading <think>, then up to the first end marker. */
  function oracle(text: string) {
    const body = /^\s*<think>/.test(text) ? text.replace(/^\s*<think>/, "") : text;
    const close = body.indexOf("</think>");
    const calls = body.indexOf(T.callsBegin);
    const ends = [close, calls].filter((i) => i >= 0);
    if (ends.length === 0) return { reasoning: body, content: "" };
    const at = Math.min(...ends);
    return {
      reasoning: body.slice(0, at),
      content: body.slice(at === close ? at + "</think>".length : at),
    };
  }

  const PIECES = [
    "<think>",
    "</think>",
    "<",
    "</",
    "think",
    ">",
    "a b",
    "\n",
    " ",
    T.callsBegin,
    "<｜tool",
    "é",
  ];
  const rng = new Prng(5, "reasoning");
  const texts = Array.from({ length: 400 }, () =>
    Array.from(
      { length: 1 + Math.floor(rng.uniform() * 12) },
      () => PIECES[Math.floor(rng.uniform() * PIECES.length)]!,
    ).join(""),
  );

  it("splits 400 random texts as a direct reading does, whole and in random pieces", () => {
    let closed = 0;
    for (const text of texts) {
      const want = oracle(text);
      expect(splitReasoning(text), JSON.stringify(text)).toEqual(want);
      const p = new ReasoningParser();
      let reasoning = "";
      let content = "";
      for (let i = 0; i < text.length; ) {
        const n = 1 + Math.floor(rng.uniform() * 6);
        const r = p.push(text.slice(i, i + n));
        reasoning += r.reasoning;
        content += r.content;
        i += n;
      }
      const r = p.end();
      expect(
        { reasoning: reasoning + r.reasoning, content: content + r.content },
        JSON.stringify(text),
      ).toEqual(want);
      if (want.content) closed++;
    }
    expect(closed).toBeGreaterThan(100);
  });
});

describe("a chat choice's reader", () => {
  const call = (name: string, args: string) =>
    `${T.callBegin}function${T.sep}${name}\n\`\`\`json\n${args}\n\`\`\`${T.callEnd}`;

  /** The message the deltas of a stream add up to (as a client accumulates them). */
  function accumulate(first: Record<string, unknown>, deltas: ChatDelta[], reasoning: boolean) {
    let content = "";
    let thought = "";
    const calls: { id: string; type: string; function: { name: string; arguments: string } }[] = [];
    const head = first["tool_calls"] as { id: string; function: { name: string } }[] | undefined;
    if (head)
      calls.push({
        id: head[0]!.id,
        type: "function",
        function: { name: head[0]!.function.name, arguments: "" },
      });
    for (const d of deltas) {
      if ("content" in d) content += d.content;
      else if ("reasoning_content" in d) thought += d.reasoning_content;
      else
        for (const t of d.tool_calls) {
          if (t.id)
            calls[t.index] = {
              id: t.id,
              type: "function",
              function: { name: t.function.name!, arguments: "" },
            };
          calls[t.index]!.function.arguments += t.function.arguments;
        }
    }
    return {
      role: "assistant",
      content: calls.length > 0 && content === "" ? null : content,
      ...(reasoning ? { reasoning_content: thought } : {}),
      ...(calls.length > 0 ? { tool_calls: calls } : {}),
    };
  }

  const withoutIds = (m: Record<string, unknown>) =>
    JSON.parse(JSON.stringify(m, (k, v) => (k === "id" ? "call" : v))) as unknown;

  it.each([
    ["text", { tools: "text", reasoning: false }, "Hello", { role: "assistant", content: "Hello" }],
    [
      "thinking, then text",
      { tools: "text", reasoning: true },
      "<think>hm</think>Hi",
      { role: "assistant", content: "Hi", reasoning_content: "hm" },
    ],
    [
      "thinking, then a call",
      { tools: "calls", reasoning: true },
      `<think>need weather</think>\n${T.callsBegin}${call("get", '{"a":1}')}${T.callsEnd}`,
      {
        role: "assistant",
        content: "\n",
        reasoning_content: "need weather",
        tool_calls: [
          { id: "call", type: "function", function: { name: "get", arguments: '{"a":1}' } },
        ],
      },
    ],
    [
      "a call without closing the thought",
      { tools: "calls", reasoning: true },
      `thinking${T.callsBegin}${call("get", "{}")}${T.callsEnd}`,
      {
        role: "assistant",
        content: null,
        reasoning_content: "thinking",
        tool_calls: [{ id: "call", type: "function", function: { name: "get", arguments: "{}" } }],
      },
    ],
    [
      "a forced call's arguments",
      { tools: "arguments", forced: "get", reasoning: false },
      '{"a": 2}',
      {
        role: "assistant",
        content: null,
        tool_calls: [
          { id: "call", type: "function", function: { name: "get", arguments: '{"a": 2}' } },
        ],
      },
    ],
  ] as const)("reads %s; streamed deltas add up to the same message", (_what, o, text, want) => {
    const whole = new ChatOutput(o).message(text);
    expect(withoutIds(whole)).toEqual(want);
    for (let trial = 0; trial < 20; trial++) {
      const rng = new Prng(trial, "chat-output");
      const stream = new ChatOutput(o);
      const first = stream.first();
      const deltas: ChatDelta[] = [];
      for (let i = 0; i < text.length; ) {
        const n = 1 + Math.floor(rng.uniform() * 8);
        deltas.push(...stream.push(text.slice(i, i + n)));
        i += n;
      }
      deltas.push(...stream.end());
      expect(withoutIds(accumulate(first, deltas, o.reasoning))).toEqual(want);
    }
  });
});
