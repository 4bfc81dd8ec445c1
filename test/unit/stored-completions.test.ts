// The pure parts of stored chat completions (stored-completions.ts): time-ordered ids, a
// list's pages over them, the messages as kept, and the memory store's bounds.
import { describe, expect, it } from "vitest";
import {
  completionId,
  MemoryCompletions,
  pageOf,
  type StoredCompletion,
  startAfter,
  storedMessages,
} from "../../src/gateway/stored-completions.ts";

describe("completionId", () => {
  it("sorts as the time it was made, whatever its random part", () => {
    const times = [0, 1, 255, 256, 1_700_000_000_000, 1_700_000_000_001, 2 ** 47];
    const ids = times.map((t) => completionId(t));
    for (const id of ids) expect(id).toMatch(/^chatcmpl-[0-9a-f]{24}$/);
    expect([...ids].reverse().sort()).toEqual(ids);
  });
});

describe("startAfter", () => {
  const asc = ["a1", "a3", "a5"];
  const desc = [...asc].reverse();
  it.each([
    ["no after: the start", asc, undefined, "asc", 0],
    ["after one there", asc, "a1", "asc", 1],
    ["after one deleted since", asc, "a2", "asc", 1],
    ["after the last", asc, "a5", "asc", 3],
    ["after one past the last", asc, "a9", "asc", 3],
    ["after one before the first", asc, "a0", "asc", 0],
    ["desc: after one there", desc, "a5", "desc", 1],
    ["desc: after one deleted since", desc, "a4", "desc", 1],
    ["desc: after the first made", desc, "a1", "desc", 3],
  ] as const)("%s", (_, ids, after, order, want) => {
    expect(startAfter(ids, after, order)).toBe(want);
  });
});

describe("pageOf", () => {
  const rows = new Map(["a", "b", "c", "d", "e"].map((id, i) => [id, { id, n: i }]));
  const load = (id: string) => rows.get(id);
  const ids = [...rows.keys()];
  it.each([
    ["a page of two", 0, 2, undefined, ["a", "b"], true],
    ["the rest", 2, 10, undefined, ["c", "d", "e"], false],
    ["exactly the rest: no more", 3, 2, undefined, ["d", "e"], false],
    ["filtered: even n", 0, 2, (x: { n: number }) => x.n % 2 === 0, ["a", "c"], true],
    [
      "filtered, the last match: no more",
      1,
      2,
      (x: { n: number }) => x.n % 2 === 0,
      ["c", "e"],
      false,
    ],
    ["past the end", 5, 2, undefined, [], false],
  ] as const)("%s", (_, from, limit, keep, want, more) => {
    const p = pageOf(ids, from, limit, load, keep);
    expect(p.data.map((x) => x.id)).toEqual(want);
    expect(p.has_more).toBe(more);
    expect(p.first_id).toBe(want[0] ?? null);
    expect(p.last_id).toBe(want.at(-1) ?? null);
  });
  it("passes over ids gone since they were listed", () => {
    const p = pageOf(["a", "gone", "b"], 0, 2, load);
    expect(p.data.map((x) => x.id)).toEqual(["a", "b"]);
    expect(p.has_more).toBe(false);
  });
});

describe("storedMessages", () => {
  it("ids by index; parts kept and their text as content; the rest as sent", () => {
    const got = storedMessages("chatcmpl-x", [
      { role: "user", content: "hi" },
      {
        role: "user",
        content: [
          { type: "text", text: "a" },
          { type: "image_url", image_url: { url: "u" } },
          { type: "text", text: "b" },
        ],
      },
      { role: "assistant", content: null, tool_calls: [{ id: "c1" }] },
      { role: "tool", tool_call_id: "c1", content: "42" },
    ]);
    expect(got).toEqual([
      { id: "chatcmpl-x-0", role: "user", content: "hi", content_parts: null },
      {
        id: "chatcmpl-x-1",
        role: "user",
        content: "ab",
        content_parts: [
          { type: "text", text: "a" },
          { type: "image_url", image_url: { url: "u" } },
          { type: "text", text: "b" },
        ],
      },
      {
        id: "chatcmpl-x-2",
        role: "assistant",
        content: null,
        content_parts: null,
        tool_calls: [{ id: "c1" }],
      },
      { id: "chatcmpl-x-3", role: "tool", tool_call_id: "c1", content: "42", content_parts: null },
    ]);
  });
});

describe("MemoryCompletions", () => {
  const kept = (t: number, owner = "", text = "x"): StoredCompletion => ({
    owner,
    completion: { id: completionId(t), model: "m", created: t, metadata: {}, text },
    messages: [],
  });
  it("keeps the newest `capacity`, oldest out first; an update keeps its place", () => {
    const s = new MemoryCompletions(3);
    const all = [5, 1, 4, 2, 3].map((t) => kept(t));
    for (const k of all) s.put(k);
    // (made out of order: 5 and 1 went in first, but 1 and 2 are the oldest)
    const idOf = (t: number) => all.find((k) => k.completion.created === t)!.completion.id;
    expect(s.ids("")).toEqual([3, 4, 5].map(idOf));
    expect(s.size).toBe(3);
    const three = s.ids("")[0]!;
    s.put({
      ...s.get("", three)!,
      completion: { ...s.get("", three)!.completion, metadata: { a: "b" } },
    });
    expect(s.ids("")[0]).toBe(three);
    expect(s.get("", three)?.completion.metadata).toEqual({ a: "b" });
    expect(s.size).toBe(3);
  });
  it("each owner finds and deletes its own", () => {
    const s = new MemoryCompletions(10);
    const mine = kept(1, "me");
    const theirs = kept(2, "them");
    s.put(mine);
    s.put(theirs);
    expect(s.ids("me")).toEqual([mine.completion.id]);
    expect(s.get("them", mine.completion.id)).toBeUndefined();
    expect(s.delete("them", mine.completion.id)).toBe(false);
    expect(s.delete("me", mine.completion.id)).toBe(true);
    expect(s.ids("me")).toEqual([]);
    expect(s.ids("them")).toEqual([theirs.completion.id]);
  });
  it("holds `maxChars` at most; one larger is not kept; capacity 0 keeps none", () => {
    const one = kept(1, "", "y".repeat(100));
    const size = JSON.stringify(one.completion).length + JSON.stringify(one.messages).length;
    const s = new MemoryCompletions(100, size * 2);
    for (const t of [1, 2, 3]) s.put(kept(t, "", "y".repeat(100)));
    expect(s.size).toBe(2);
    s.put(kept(4, "", "y".repeat(1000)));
    expect(s.size).toBe(2);
    const zero = new MemoryCompletions(0);
    expect(zero.keeps).toBe(false);
    zero.put(one);
    expect(zero.size).toBe(0);
  });
});
