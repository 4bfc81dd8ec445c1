// The gateway's kept responses (POST /v1/responses with store): least recently used out
// first, bounded by count and by characters.
import { describe, expect, it } from "vitest";
import { ResponseStore } from "../../src/gateway/responses.ts";

const kept = (text: string) => ({
  conversation: [{ role: "user" as const, content: text }],
  response: { id: text },
});

describe("ResponseStore", () => {
  it.each([
    ["count: the oldest out", 2, 1e9, ["a", "b", "c"], [], ["b", "c"]],
    ["a read makes it the newest", 2, 1e9, ["a", "b", "c"], ["a"], ["a", "c"]],
    ["characters: as many as fit", 10, 120, ["aa", "bb", "cc", "dd"], [], ["cc", "dd"]],
    ["capacity 0: nothing", 0, 1e9, ["a"], [], []],
    [
      "one larger than the budget: not kept, the others stay",
      10,
      60,
      ["a", "x".repeat(100)],
      [],
      ["a"],
    ],
  ] as const)("%s", (_name, capacity, maxChars, puts, reads, want) => {
    const s = new ResponseStore(capacity, maxChars);
    for (const [i, id] of puts.entries()) {
      // A read of `reads` before the last put.
      if (i === puts.length - 1) for (const r of reads) s.get(r);
      s.put(id, kept(id));
    }
    const all = new Set<string>(puts);
    expect([...all].filter((id) => s.get(id) !== undefined).sort()).toEqual([...want].sort());
    expect(s.chars).toBeLessThanOrEqual(maxChars);
  });

  it("delete frees its characters; putting an id again replaces it", () => {
    const s = new ResponseStore(10);
    s.put("a", kept("a"));
    const one = s.chars;
    s.put("a", kept("a"));
    expect([s.size, s.chars]).toEqual([1, one]);
    expect(s.delete("a")).toBe(true);
    expect([s.size, s.chars, s.delete("a")]).toEqual([0, 0, false]);
  });
});
