// The gateway's kept responses (POST /v1/responses with store): least recently used out
// first, bounded by count and by characters; and a request's input as the items
// GET /v1/responses/{id}/input_items lists.
import { describe, expect, it } from "vitest";
import { inputItemsOf, ResponseStore } from "../../src/gateway/responses.ts";

const kept = (text: string) => ({
  conversation: [{ role: "user" as const, content: text }],
  response: { id: text },
  inputItems: [],
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

  it("a background response's events: counted with it when it is kept, gone with it", async () => {
    const s = new ResponseStore(2);
    const log = s.eventLog("a");
    s.put("a", kept("a"));
    const without = s.chars;
    log.append("response.completed", { response: { id: "a", text: "x".repeat(50) } });
    log.end();
    s.put("a", kept("a"));
    expect(s.chars).toBe(without + log.chars);
    const left = new AbortController();
    const replay = async () => {
      const lines: string[] = [];
      const g = s.events("a", -1, () => null, left.signal);
      if (!g) return undefined;
      for await (const l of g) lines.push(l);
      return lines;
    };
    expect(await replay()).toHaveLength(1);
    s.put("b", kept("b"));
    s.put("c", kept("c")); // (a pushed out, its events with it)
    expect(await replay()).toBeUndefined();
    expect(s.events("b", -1, () => null, left.signal)).toBeUndefined(); // (not a background one)
  });

  it("a running background response pushed out keeps its events: its end keeps both again", async () => {
    const s = new ResponseStore(1);
    const log = s.eventLog("a");
    s.put("a", kept("a"));
    log.append("response.created", {});
    s.put("b", kept("b")); // (a pushed out while it runs)
    expect(s.get("a")).toBeUndefined();
    log.append("response.completed", {});
    log.end();
    s.put("a", kept("a"));
    const lines: string[] = [];
    for await (const l of s.events("a", -1, () => null, AbortSignal.timeout(1000))!) lines.push(l);
    expect(lines).toHaveLength(2);
    s.put("c", kept("c")); // (ended now: pushed out with it)
    expect(s.events("a", -1, () => null, AbortSignal.timeout(1000))).toBeUndefined();
  });
});

describe("inputItemsOf", () => {
  it.each([
    [
      "a string: one user message of input_text",
      "hi",
      [
        {
          type: "message",
          role: "user",
          content: [{ type: "input_text", text: "hi" }],
          status: "completed",
        },
      ],
    ],
    [
      "string content: input_text, or output_text for the assistant",
      [
        { role: "system", content: "be brief" },
        { role: "assistant", content: "ok" },
      ],
      [
        { type: "message", role: "system", content: [{ type: "input_text", text: "be brief" }] },
        { type: "message", role: "assistant", content: [{ type: "output_text", text: "ok" }] },
      ],
    ],
    [
      "content parts as given",
      [
        {
          type: "message",
          role: "user",
          content: [
            { type: "input_text", text: "a" },
            { type: "input_text", text: "b" },
          ],
        },
      ],
      [
        {
          type: "message",
          role: "user",
          content: [
            { type: "input_text", text: "a" },
            { type: "input_text", text: "b" },
          ],
        },
      ],
    ],
    [
      "a call keeps the id it came with; its output and a reasoning item get theirs",
      [
        { type: "function_call", id: "fc_given", call_id: "c1", name: "f", arguments: "{}" },
        { type: "function_call_output", call_id: "c1", output: "42" },
        { type: "reasoning" },
      ],
      [
        { id: "fc_given", type: "function_call", call_id: "c1", name: "f", arguments: "{}" },
        { type: "function_call_output", call_id: "c1", output: "42" },
        { type: "reasoning" },
      ],
    ],
  ] as const)("%s", (_name, input, want) => {
    const got = inputItemsOf(input as never);
    expect(got).toMatchObject(want);
    const prefixes = got.map((i) => i.id.split("_")[0]);
    const expected = got.map((i) =>
      i.id === "fc_given"
        ? "fc"
        : (
            {
              message: "msg",
              function_call: "fc",
              function_call_output: "fco",
              reasoning: "rs",
            } as Record<string, string>
          )[i.type],
    );
    expect(prefixes).toEqual(expected);
    expect(new Set(got.map((i) => i.id)).size).toBe(got.length);
  });
});
