// The pure parts of server-side compaction (compaction.ts, ADR 0058): which part of a
// conversation is its last turn (kept after the summary), the threshold a request's
// context_management asks for, and what a compaction item stands for when read back.
import { describe, expect, it } from "vitest";
import {
  compactedConversation,
  compactThreshold,
  lastTurnStart,
  userTexts,
} from "../../src/gateway/compaction.ts";
import type { ChatMessage } from "../../src/gateway/schemas.ts";

const u = (content: string): ChatMessage => ({ role: "user", content });
const a = (content: string): ChatMessage => ({ role: "assistant", content });
const sys = (content: string): ChatMessage => ({ role: "system", content });
const dev = (content: string): ChatMessage => ({ role: "developer", content });
const call = (id: string): ChatMessage => ({
  role: "assistant",
  content: null,
  tool_calls: [{ id, type: "function", function: { name: "f", arguments: "{}" } }],
});
const out = (id: string): ChatMessage => ({ role: "tool", tool_call_id: id, content: "r" });

describe("lastTurnStart", () => {
  it.each<[string, ChatMessage[], number | null]>([
    ["empty", [], null],
    ["one user message: nothing of the model's before it", [u("q")], null],
    ["users only", [u("a"), u("b")], null],
    ["a turn after an answer", [u("q1"), a("r1"), u("q2")], 2],
    ["consecutive user messages are one turn", [u("q1"), a("r1"), u("q2"), u("q3")], 2],
    ["a system message first", [sys("s"), u("q1"), a("r1"), u("q2")], 3],
    ["a developer message inside the turn ends it", [u("q1"), a("r1"), dev("d"), u("q2")], 3],
    ["an answer begun (continued)", [u("q1"), a("r1"), u("q2"), a("part")], 2],
    [
      "after calls: the calling message and the outputs",
      [u("q1"), a("r1"), u("q2"), call("c"), out("c")],
      3,
    ],
    [
      "calls as the first model turn: the user before them is history",
      [u("q"), call("c"), out("c")],
      null,
    ],
    ["two calls' outputs", [u("q"), call("c"), out("c"), call("d"), out("d"), out("d2")], 3],
    ["outputs with no call before them", [out("c")], null],
    ["an assistant message alone", [a("r")], null],
  ])("%s", (_name, messages, want) => {
    expect(lastTurnStart(messages)).toBe(want);
  });
});

describe("compactThreshold", () => {
  it.each<[string, unknown, number | null]>([
    ["absent", undefined, null],
    ["null", null, null],
    ["an empty list asks nothing", [], null],
    ["a threshold", [{ type: "compaction", compact_threshold: 500 }], 500],
    ["no threshold: three quarters of the context", [{ type: "compaction" }], 3072],
    ["a null threshold: the default", [{ type: "compaction", compact_threshold: null }], 3072],
    ["1 (every prompt)", [{ type: "compaction", compact_threshold: 1 }], 1],
  ])("%s", (_name, value, want) => {
    expect(compactThreshold(value, 4096)).toBe(want);
  });

  it.each<[string, unknown, string]>([
    ["not a list", { type: "compaction" }, "context_management"],
    ["another type", [{ type: "truncation" }], "context_management.0.type"],
    ["no type", [{ compact_threshold: 5 }], "context_management.0.type"],
    ["not an object", ["compaction"], "context_management.0.type"],
    [
      "zero",
      [{ type: "compaction", compact_threshold: 0 }],
      "context_management.0.compact_threshold",
    ],
    [
      "a fraction",
      [{ type: "compaction", compact_threshold: 1.5 }],
      "context_management.0.compact_threshold",
    ],
    [
      "a string",
      [{ type: "compaction", compact_threshold: "9" }],
      "context_management.0.compact_threshold",
    ],
    ["two entries", [{ type: "compaction" }, { type: "compaction" }], "context_management.1"],
  ])("refuses %s", (_name, value, param) => {
    let err: unknown;
    try {
      compactThreshold(value, 4096);
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: "EM_GATEWAY_BAD_REQUEST", param });
  });
});

describe("compactedConversation", () => {
  const before = [sys("s"), u("q1"), a("r1"), dev("d"), u("q2"), call("c"), out("c")];
  it("an item with users: the system and developer messages before it, the users, the summary, the turn after", () => {
    expect(
      compactedConversation(before, { summary: "sum", users: ["q1", "q2"], after: [u("q3")] }),
    ).toEqual([sys("s"), dev("d"), u("q1"), u("q2"), a("sum"), u("q3")]);
  });
  it("a first-format item supersedes nothing", () => {
    expect(compactedConversation(before, { summary: "sum", users: null, after: [] })).toEqual([
      ...before,
      a("sum"),
    ]);
  });
  it("the turn after is copied, not shared", () => {
    const after = [u("q3")];
    const got = compactedConversation([], { summary: "s", users: [], after });
    (got[1] as { content: string }).content = "changed";
    expect(after[0]!.content).toBe("q3");
  });
  it("userTexts: the user messages' texts, in order", () => {
    expect(userTexts(before)).toEqual(["q1", "q2"]);
  });
});
