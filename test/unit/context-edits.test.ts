// Anthropic's context management, read and applied (src/gateway/context-edits.ts): the
// edits' defaults and refusals, which tool uses are cleared, which thinking turns count.
import { describe, expect, it } from "vitest";
import {
  CLEARED_RESULT,
  type ClearToolUses,
  clearingDue,
  clearToolUses,
  compactionRequestOf,
  contextEditsOf,
  thinkingTurnsCleared,
} from "../../src/gateway/context-edits.ts";
import { ApiError } from "../../src/gateway/errors.ts";
import type { ChatMessage } from "../../src/gateway/schemas.ts";

/** The refusal `f` throws: its param and message. */
function refusal(f: () => unknown): { param: string | null | undefined; message: string } {
  try {
    f();
  } catch (err) {
    expect(err).toBeInstanceOf(ApiError);
    const e = err as ApiError;
    expect(e.code).toBe("EM_GATEWAY_BAD_REQUEST");
    expect(e.status).toBe(400);
    return { param: e.param, message: e.message };
  }
  throw new Error("not refused");
}

describe("contextEditsOf", () => {
  it("absent is null; an empty list edits nothing", () => {
    expect(contextEditsOf(undefined, 4096)).toBeNull();
    expect(contextEditsOf(null, 4096)).toBeNull();
    expect(contextEditsOf({}, 4096)).toEqual({
      clearThinking: null,
      clearToolUses: null,
      compact: null,
    });
  });

  it.each([
    // [context length, the default clearing trigger, the default compaction trigger]
    [4096, 3072, 3072],
    [131072, 98304, 98304],
    [1_000_000, 100_000, 150_000],
  ])(
    "defaults with a context of %i: triggers %i and %i, 3 uses kept, 1 thought",
    (ctx, clear, compact) => {
      const e = contextEditsOf(
        {
          edits: [
            { type: "clear_thinking_20251015" },
            { type: "clear_tool_uses_20250919" },
            { type: "compact_20260112" },
          ],
        },
        ctx,
      )!;
      expect(e.clearThinking).toEqual({ keep: 1 });
      expect(e.clearToolUses).toEqual({
        trigger: { type: "input_tokens", value: clear },
        keep: 3,
        clearAtLeast: 0,
        excludeTools: new Set(),
        clearInputs: false,
      });
      expect(e.compact).toEqual({ trigger: compact, pause: false, instructions: null });
    },
  );

  it("reads what is given", () => {
    const e = contextEditsOf(
      {
        edits: [
          { type: "clear_thinking_20251015", keep: { type: "thinking_turns", value: 2 } },
          {
            type: "clear_tool_uses_20250919",
            trigger: { type: "tool_uses", value: 5 },
            keep: { type: "tool_uses", value: 0 },
            clear_at_least: { type: "input_tokens", value: 100 },
            exclude_tools: ["memory"],
            clear_tool_inputs: ["search"],
          },
          {
            type: "compact_20260112",
            trigger: { type: "input_tokens", value: 500 },
            pause_after_compaction: true,
            instructions: "Keep the numbers.",
          },
        ],
      },
      4096,
    )!;
    expect(e.clearThinking).toEqual({ keep: 2 });
    expect(e.clearToolUses).toEqual({
      trigger: { type: "tool_uses", value: 5 },
      keep: 0,
      clearAtLeast: 100,
      excludeTools: new Set(["memory"]),
      clearInputs: new Set(["search"]),
    });
    expect(e.compact).toEqual({ trigger: 500, pause: true, instructions: "Keep the numbers." });
    for (const keep of ["all", { type: "all" }])
      expect(
        contextEditsOf({ edits: [{ type: "clear_thinking_20251015", keep }] }, 4096)!.clearThinking,
      ).toEqual({ keep: "all" });
    // Whitespace instructions are absent.
    expect(
      contextEditsOf({ edits: [{ type: "compact_20260112", instructions: "  " }] }, 4096)!.compact
        ?.instructions,
    ).toBeNull();
  });

  const CLEAR = "clear_tool_uses_20250919";
  it.each([
    ["not an object", [], "context_management"],
    ["edits not a list", { edits: {} }, "context_management.edits"],
    [
      "an unknown type",
      { edits: [{ type: "clear_everything" }] },
      "context_management.edits.0.type",
    ],
    ["an edit not an object", { edits: ["x"] }, "context_management.edits.0.type"],
    ["an edit twice", { edits: [{ type: CLEAR }, { type: CLEAR }] }, "context_management.edits.1"],
    [
      "clear_thinking not first",
      { edits: [{ type: CLEAR }, { type: "clear_thinking_20251015" }] },
      "context_management.edits.1.type",
    ],
    [
      "a trigger of another kind",
      { edits: [{ type: CLEAR, trigger: { type: "turns", value: 3 } }] },
      "context_management.edits.0.trigger",
    ],
    [
      "a trigger of 0",
      { edits: [{ type: CLEAR, trigger: { type: "input_tokens", value: 0 } }] },
      "context_management.edits.0.trigger.value",
    ],
    [
      "a fractional keep",
      { edits: [{ type: CLEAR, keep: { type: "tool_uses", value: 1.5 } }] },
      "context_management.edits.0.keep.value",
    ],
    [
      "clear_at_least in tool uses",
      { edits: [{ type: CLEAR, clear_at_least: { type: "tool_uses", value: 1 } }] },
      "context_management.edits.0.clear_at_least",
    ],
    [
      "exclude_tools not names",
      { edits: [{ type: CLEAR, exclude_tools: [1] }] },
      "context_management.edits.0.exclude_tools",
    ],
    [
      "clear_tool_inputs a string",
      { edits: [{ type: CLEAR, clear_tool_inputs: "yes" }] },
      "context_management.edits.0.clear_tool_inputs",
    ],
    [
      "thinking turns of 0",
      { edits: [{ type: "clear_thinking_20251015", keep: { type: "thinking_turns", value: 0 } }] },
      "context_management.edits.0.keep.value",
    ],
    [
      "a compaction trigger in tool uses",
      { edits: [{ type: "compact_20260112", trigger: { type: "tool_uses", value: 3 } }] },
      "context_management.edits.0.trigger",
    ],
    [
      "pause_after_compaction a string",
      { edits: [{ type: "compact_20260112", pause_after_compaction: "yes" }] },
      "context_management.edits.0.pause_after_compaction",
    ],
    [
      "instructions not a string",
      { edits: [{ type: "compact_20260112", instructions: 3 }] },
      "context_management.edits.0.instructions",
    ],
  ])("refuses %s (param %s)", (_what, value, param) => {
    expect(refusal(() => contextEditsOf(value, 4096)).param).toBe(param);
  });
});

describe("compactionRequestOf", () => {
  it.each([
    [undefined, undefined],
    [null, undefined],
    [{ type: "summarize" }, { instructions: null }],
    [{ type: "summarize", instructions: "" }, { instructions: null }],
    [{ type: "summarize", instructions: "Be brief." }, { instructions: "Be brief." }],
  ])("%j is %j", (value, read) => {
    expect(compactionRequestOf(value)).toEqual(read);
  });
  it.each([
    [{ type: "truncate" }, "compaction.type"],
    ["summarize", "compaction.type"],
    [{ type: "summarize", instructions: 1 }, "compaction.instructions"],
  ])("refuses %j (param %s)", (value, param) => {
    expect(refusal(() => compactionRequestOf(value)).param).toBe(param);
  });
});

/** An assistant turn calling `name` with id `id`, and the tool's result. */
const use = (id: string, name: string, result: string): ChatMessage[] => [
  {
    role: "assistant",
    content: null,
    tool_calls: [{ id, type: "function", function: { name, arguments: `{"q":"${id}"}` } }],
  },
  { role: "tool", tool_call_id: id, content: result },
];

const CONVERSATION: ChatMessage[] = [
  { role: "system", content: "sys" },
  { role: "user", content: "go" },
  ...use("c1", "search", "r1"),
  ...use("c2", "memory", "r2"),
  ...use("c3", "search", "r3"),
  ...use("c4", "fetch", "r4"),
  { role: "assistant", content: "done" },
];

const edit = (over: Partial<ClearToolUses> = {}): ClearToolUses => ({
  trigger: { type: "input_tokens", value: 1 },
  keep: 1,
  clearAtLeast: 0,
  excludeTools: new Set(),
  clearInputs: false,
  ...over,
});

/** The results and arguments of a conversation's tool uses, by id. */
function uses(messages: readonly ChatMessage[]) {
  const out: Record<string, { result?: unknown; args?: string }> = {};
  const at = (id: string) => {
    out[id] ??= {};
    return out[id];
  };
  for (const m of messages) {
    if (m.role === "tool") at(m.tool_call_id!).result = m.content;
    for (const t of m.tool_calls ?? [])
      if (t.type === "function") at(t.id).args = t.function.arguments;
  }
  return out;
}

describe("clearToolUses", () => {
  it.each([
    // [what, edit, the ids whose results are cleared, the ids whose inputs are]
    ["the latest kept", edit(), ["c1", "c2", "c3"], []],
    ["3 kept", edit({ keep: 3 }), ["c1"], []],
    ["all kept", edit({ keep: 4 }), [], []],
    ["none kept", edit({ keep: 0 }), ["c1", "c2", "c3", "c4"], []],
    ["a tool excluded", edit({ excludeTools: new Set(["memory"]) }), ["c1", "c3"], []],
    ["inputs too", edit({ keep: 2, clearInputs: true }), ["c1", "c2"], ["c1", "c2"]],
    [
      "the inputs of one tool",
      edit({ clearInputs: new Set(["search"]) }),
      ["c1", "c2", "c3"],
      ["c1", "c3"],
    ],
  ])("%s", (_what, e, results, inputs) => {
    const { messages, cleared } = clearToolUses(CONVERSATION, e);
    const after = uses(messages);
    const before = uses(CONVERSATION);
    for (const id of ["c1", "c2", "c3", "c4"]) {
      expect(after[id]!.result).toBe(results.includes(id) ? CLEARED_RESULT : before[id]!.result);
      expect(after[id]!.args).toBe(inputs.includes(id) ? "{}" : before[id]!.args);
    }
    expect(cleared).toBe(new Set([...results, ...inputs]).size);
    // The rest as it was; the conversation given unchanged.
    expect(messages.filter((m) => m.role !== "tool" && !m.tool_calls)).toEqual(
      CONVERSATION.filter((m) => m.role !== "tool" && !m.tool_calls),
    );
    expect(uses(CONVERSATION)).toEqual(before);
  });

  it("counts only what changes: results already cleared are not cleared again", () => {
    const once = clearToolUses(CONVERSATION, edit()).messages;
    expect(clearToolUses(once, edit())).toEqual({ messages: once, cleared: 0 });
  });

  it("clears a custom tool's input to an empty string", () => {
    const custom: ChatMessage[] = [
      { role: "user", content: "go" },
      {
        role: "assistant",
        content: null,
        tool_calls: [{ id: "x", type: "custom", custom: { name: "sh", input: "ls -la" } }],
      },
      { role: "tool", tool_call_id: "x", content: "files" },
    ];
    const { messages, cleared } = clearToolUses(custom, edit({ keep: 0, clearInputs: true }));
    expect(cleared).toBe(1);
    expect(messages[1]!.tool_calls).toEqual([
      { id: "x", type: "custom", custom: { name: "sh", input: "" } },
    ]);
    expect(messages[2]!.content).toBe(CLEARED_RESULT);
  });
});

describe("clearingDue", () => {
  it.each([
    [{ type: "input_tokens" as const, value: 100 }, 99, false],
    [{ type: "input_tokens" as const, value: 100 }, 100, true],
    [{ type: "tool_uses" as const, value: 4 }, 0, true],
    [{ type: "tool_uses" as const, value: 5 }, 1_000_000, false],
  ])("trigger %j with %i input tokens: %s", (trigger, tokens, due) => {
    expect(clearingDue(edit({ trigger }), CONVERSATION, tokens)).toBe(due);
  });
});

describe("thinkingTurnsCleared", () => {
  const thought = (t: string) => ({
    role: "assistant",
    content: [
      { type: "thinking", thinking: t, signature: "" },
      { type: "text", text: "a" },
    ],
  });
  const turns = [
    { role: "user", content: "q" },
    thought("1"),
    { role: "user", content: "q" },
    { role: "assistant", content: "plain" },
    { role: "user", content: "q" },
    thought("2"),
    { role: "user", content: "q" },
    { role: "assistant", content: [{ type: "redacted_thinking", data: "x" }] },
  ];
  it.each([
    [1, 2],
    [2, 1],
    [3, 0],
    [5, 0],
    ["all" as const, 0],
  ])("keep %s: %i turns cleared", (keep, n) => {
    expect(thinkingTurnsCleared(turns, keep)).toBe(n);
  });
});
