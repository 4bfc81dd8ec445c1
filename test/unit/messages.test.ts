// Anthropic Messages requests as the chat completions requests they stand for
// (src/gateway/messages.ts chatRequestOfMessages), and the refusals, field by field.
import { describe, expect, it } from "vitest";
import { ApiError } from "../../src/gateway/errors.ts";
import { chatRequestOfMessages, type MessagesRequest } from "../../src/gateway/messages.ts";

const base = { model: "m", max_tokens: 5, messages: [{ role: "user", content: "hi" }] };
const weather = { name: "w", input_schema: { type: "object" } };

// biome-ignore format: a table
const cases: [string, object, object][] = [
  ["a string turn, max_tokens", base, { model: "m", messages: [{ role: "user", content: "hi" }], max_completion_tokens: 5 }],
  ["system blocks, sampling, stops", { ...base, system: [{ type: "text", text: "a" }, { type: "text", text: "b" }], temperature: 0.5, top_p: 0.9, top_k: 40, stop_sequences: ["x"] },
    { messages: [{ role: "system", content: "ab" }, { role: "user", content: "hi" }], temperature: 0.5, top_p: 0.9, top_k: 40, stop: ["x"] }],
  ["top_k 0 is no top_k", { ...base, top_k: 0 }, { messages: [{ role: "user", content: "hi" }] }],
  ["a call and its result", { ...base, messages: [
      { role: "user", content: "q" },
      { role: "assistant", content: [{ type: "thinking", thinking: "t", signature: "" }, { type: "text", text: "ok" }, { type: "tool_use", id: "c1", name: "w", input: { a: 1 } }] },
      { role: "user", content: [{ type: "tool_result", tool_use_id: "c1", content: "sun" }, { type: "text", text: "more" }] },
    ] },
    { messages: [
      { role: "user", content: "q" },
      { role: "assistant", content: "ok", tool_calls: [{ id: "c1", type: "function", function: { name: "w", arguments: '{"a":1}' } }] },
      { role: "tool", tool_call_id: "c1", content: "sun" },
      { role: "user", content: "more" },
    ] }],
  ["a result alone, its content as blocks", { ...base, messages: [
      { role: "assistant", content: [{ type: "tool_use", id: "c", name: "w", input: {} }] },
      { role: "user", content: [{ type: "tool_result", tool_use_id: "c", content: [{ type: "text", text: "r" }] }] },
    ] },
    { messages: [
      { role: "assistant", content: null, tool_calls: [{ id: "c", type: "function", function: { name: "w", arguments: "{}" } }] },
      { role: "tool", tool_call_id: "c", content: "r" },
    ] }],
  ["tools and tool_choice any, no parallel calls", { ...base, tools: [weather], tool_choice: { type: "any", disable_parallel_tool_use: true } },
    { tools: [{ type: "function", function: { name: "w", parameters: { type: "object" } } }], tool_choice: "required", parallel_tool_calls: false }],
  ["tool_choice tool", { ...base, tools: [weather], tool_choice: { type: "tool", name: "w" } },
    { tool_choice: { type: "function", function: { name: "w" } } }],
  ["tool_choice none", { ...base, tools: [weather], tool_choice: { type: "none" } }, { tool_choice: "none" }],
  ["thinking on", { ...base, thinking: { type: "enabled", budget_tokens: 1024 } }, { chat_template_kwargs: { thinking: true } }],
  ["thinking off", { ...base, thinking: { type: "disabled" } }, { chat_template_kwargs: { thinking: false } }],
];

// biome-ignore format: a table
const refusals: [string, object, string][] = [
  ["an image", { ...base, messages: [{ role: "user", content: [{ type: "image" }] }] }, "messages.0.content.0"],
  ["tool_use from the user", { ...base, messages: [{ role: "user", content: [{ type: "tool_use", id: "c", name: "w" }] }] }, "messages.0.content.0"],
  ["tool_result from the assistant", { ...base, messages: [{ role: "assistant", content: [{ type: "tool_result", tool_use_id: "c" }] }] }, "messages.0.content.0"],
  ["tool_use without an id", { ...base, messages: [{ role: "assistant", content: [{ type: "tool_use", name: "w" }] }] }, "messages.0.content.0"],
  ["a non-text system block", { ...base, system: [{ type: "image" }] }, "system.0"],
  ["a server tool", { ...base, tools: [{ type: "bash_20250124", name: "bash" }] }, "tools.0.type"],
  ["tool_choice tool without a name", { ...base, tools: [weather], tool_choice: { type: "tool" } }, "tool_choice.name"],
];

describe("chatRequestOfMessages", () => {
  it.each(cases)("%s", (_what, request, want) => {
    expect(chatRequestOfMessages(request as MessagesRequest)).toMatchObject(want);
  });

  it("leaves out what is unset or neutral (top_k 0, no system, no tools)", () => {
    const chat = chatRequestOfMessages({
      ...base,
      top_k: 0,
      tool_choice: { type: "auto" },
    } as MessagesRequest);
    for (const k of [
      "top_k",
      "tools",
      "tool_choice",
      "stop",
      "temperature",
      "chat_template_kwargs",
    ])
      expect(chat).not.toHaveProperty(k);
    expect(chat.messages).toHaveLength(1);
  });

  it.each(refusals)("refuses %s", (_what, request, param) => {
    try {
      chatRequestOfMessages(request as MessagesRequest);
      expect.unreachable("accepted");
    } catch (e) {
      expect(e).toBeInstanceOf(ApiError);
      expect([(e as ApiError).code, (e as ApiError).param]).toEqual([
        "EM_GATEWAY_BAD_REQUEST",
        param,
      ]);
    }
  });
});
