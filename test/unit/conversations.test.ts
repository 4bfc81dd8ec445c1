// Conversations' logs (src/gateway/conversations.ts): records folded into what a
// conversation holds, the memory store's bounds, the folder's files.
import { appendFileSync, existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  Conversations,
  FolderLogs,
  fold,
  foldInto,
  MemoryLogs,
} from "../../src/gateway/conversations.ts";
import { FolderQuota } from "../../src/gateway/files.ts";

const made = { made: { id: "conv_a", created_at: 1, metadata: { k: "v" }, owner: "" } };
const item = (id: string) => ({ id, type: "message", role: "user", content: [] });
const line = (r: object) => JSON.stringify(r);

describe("fold", () => {
  it.each<[string, string[], { metadata: object; items: string[] } | undefined]>([
    ["made alone", [line(made)], { metadata: { k: "v" }, items: [] }],
    [
      "items added, in order",
      [line(made), line({ items: [item("a"), item("b")] }), line({ items: [item("c")] })],
      { metadata: { k: "v" }, items: ["a", "b", "c"] },
    ],
    [
      "metadata set (replaced whole)",
      [line(made), line({ metadata: { x: "y" } })],
      { metadata: { x: "y" }, items: [] },
    ],
    [
      "an item deleted",
      [line(made), line({ items: [item("a"), item("b")] }), line({ deleted: "a" })],
      { metadata: { k: "v" }, items: ["b"] },
    ],
    [
      "an item deleted that is not there: nothing",
      [line(made), line({ items: [item("a")] }), line({ deleted: "z" })],
      { metadata: { k: "v" }, items: ["a"] },
    ],
    [
      "a line cut short (its writer killed): passed over",
      [line(made), line({ items: [item("a")] }), '{"items":[{"id":"b"'],
      { metadata: { k: "v" }, items: ["a"] },
    ],
    [
      "null and other JSON: passed over",
      [line(made), "null", "3", '"x"'],
      { metadata: { k: "v" }, items: [] },
    ],
    ["no record that made it first: none", [line({ items: [item("a")] }), line(made)], undefined],
    ["empty: none", [], undefined],
  ])("%s", (_what, lines, want) => {
    const c = fold(lines);
    expect(c && { metadata: c.metadata, items: c.items.map((i) => i.id) }).toEqual(want);
  });
});

describe("foldInto: a log folded in pieces is the log folded whole", () => {
  const lines = [
    line(made),
    line({ items: [item("a"), item("b")] }),
    line({ metadata: { x: "y" } }),
    line({ deleted: "a" }),
    line({ items: [item("c")] }),
  ];
  it.each([1, 2, 3, 4])("split after line %i", (at) => {
    const first = foldInto(undefined, lines.slice(0, at));
    const whole = fold(lines)!;
    const s = foldInto(first, lines.slice(at))!;
    expect({ ...s.made, metadata: s.metadata, items: s.items }).toEqual(whole);
  });
});

describe("MemoryLogs", () => {
  it("reads from a cursor: the lines after it; a cursor past the end starts again", () => {
    const logs = new MemoryLogs(4);
    logs.make("a", "1");
    logs.append("a", "2");
    const r = logs.read("a", 0)!;
    expect(r).toEqual({ lines: ["1", "2"], cursor: 2, restarted: false });
    logs.append("a", "3");
    expect(logs.read("a", r.cursor)).toEqual({ lines: ["3"], cursor: 3, restarted: false });
    expect(logs.read("a", 3)).toEqual({ lines: [], cursor: 3, restarted: false });
    expect(logs.read("a", 9)).toEqual({ lines: ["1", "2", "3"], cursor: 3, restarted: true });
  });

  it("keeps the newest `capacity` conversations, the least recently used out first", () => {
    const logs = new MemoryLogs(2);
    logs.make("a", "1");
    logs.make("b", "1");
    logs.read("a", 0); // (a used: b is the oldest now)
    logs.make("c", "1");
    expect([logs.read("a", 0)?.lines, logs.read("b", 0)?.lines, logs.read("c", 0)?.lines]).toEqual([
      ["1"],
      undefined,
      ["1"],
    ]);
  });

  it("keeps `maxChars` characters at most, never pushing out the one written to", () => {
    const logs = new MemoryLogs(10, 10);
    logs.make("a", "aaaa");
    logs.make("b", "bbbb");
    expect(logs.append("b", "bbbb")).toBe(true); // 12 > 10: a goes
    expect(logs.read("a", 0)?.lines).toBeUndefined();
    expect(logs.append("b", "bbbb")).toBe(true); // 12 alone: kept
    expect(logs.read("b", 0)?.lines).toEqual(["bbbb", "bbbb", "bbbb"]);
    expect(logs.append("a", "x")).toBe(false);
  });

  it("capacity 0 keeps none: Conversations refuses to make one", () => {
    const c = new Conversations(new MemoryLogs(0));
    expect(() => c.make("", {}, [])).toThrow(/keeps no conversations/);
  });

  it("lines are a copy", () => {
    const logs = new MemoryLogs(1);
    logs.make("a", "1");
    logs.read("a", 0)!.lines.push("2");
    expect(logs.read("a", 0)?.lines).toEqual(["1"]);
  });
});

describe("FolderLogs", () => {
  const folder = () => mkdtempSync(join(tmpdir(), "conversations-"));

  it("a file a conversation, a line a record; counted in the folder's quota; removed whole", async () => {
    const dir = folder();
    const quota = new FolderQuota(dir, 1 << 20, 3_600_000);
    await quota.ready;
    const c = new Conversations(new FolderLogs(dir, quota));
    const conv = c.make("o", { k: "v" }, [item("msg_a")]);
    expect(c.add(conv.id, [item("msg_b")])).toBe(true);
    expect(c.deleteItem(conv.id, "msg_a")).toBe(true);
    const path = join(dir, "conversations", `${conv.id}.jsonl`);
    const text = readFileSync(path, "utf8");
    expect(text.trim().split("\n")).toHaveLength(4);
    expect(quota.used()).toBe(Buffer.byteLength(text));
    expect(c.find("o", conv.id)?.items.map((i) => i.id)).toEqual(["msg_b"]);
    expect(c.find("someone else", conv.id)).toBeUndefined();
    expect(c.delete(conv.id)).toBe(true);
    expect(quota.used()).toBe(0);
    // Deleted: an answer that ends later adds nothing, and does not make the file again.
    expect(c.append(conv.id, [item("msg_c")])).toBe(false);
    expect(existsSync(path)).toBe(false);
    quota.close();
  });

  it("a full folder refuses new items (not a response's answer at its end)", async () => {
    const dir = folder();
    const quota = new FolderQuota(dir, 300, 3_600_000);
    await quota.ready;
    const c = new Conversations(new FolderLogs(dir, quota));
    const conv = c.make("", {}, [item("msg_a")]);
    c.add(conv.id, [
      { ...item("msg_b"), content: [{ type: "input_text", text: "x".repeat(300) }] },
    ]);
    expect(() => c.add(conv.id, [item("msg_c")])).toThrow(/files folder holds/);
    expect(() => c.make("", {}, [])).toThrow(/files folder holds/);
    expect(c.append(conv.id, [item("msg_d")])).toBe(true);
    quota.close();
  });

  it("reads only what was appended since its cursor; a line still being written is left for the next read", () => {
    const dir = folder();
    const logs = new FolderLogs(dir, null);
    const id = `conv_${"1".repeat(24)}`;
    logs.make(id, "one");
    const path = join(dir, "conversations", `${id}.jsonl`);
    const a = logs.read(id, 0)!;
    expect(a).toEqual({ lines: ["one"], cursor: 4, restarted: false });
    appendFileSync(path, 'two\n{"items":[');
    const b = logs.read(id, a.cursor)!;
    expect(b).toEqual({ lines: ["two"], cursor: 8, restarted: false });
    appendFileSync(path, "]}\n");
    expect(logs.read(id, b.cursor)).toEqual({
      lines: ['{"items":[]}'],
      cursor: 21,
      restarted: false,
    });
    writeFileSync(path, "new\n"); // (shorter than the cursor: read whole)
    expect(logs.read(id, 21)).toEqual({ lines: ["new"], cursor: 4, restarted: true });
  });

  it("Conversations fold only what another gateway appended since their last find", () => {
    const dir = folder();
    const here = new Conversations(new FolderLogs(dir, null));
    const there = new Conversations(new FolderLogs(dir, null));
    const conv = here.make("o", {}, [item("msg_a")]);
    expect(there.find("o", conv.id)?.items.map((i) => i.id)).toEqual(["msg_a"]);
    const before = there.find("o", conv.id)!;
    here.add(conv.id, [item("msg_b")]);
    here.deleteItem(conv.id, "msg_a");
    here.setMetadata(conv.id, { k: "v" });
    const after = there.find("o", conv.id)!;
    expect([after.items.map((i) => i.id), after.metadata]).toEqual([["msg_b"], { k: "v" }]);
    expect(before.items.map((i) => i.id)).toEqual(["msg_a"]); // (what it found then, unchanged)
    // A damaged record in the middle (two writers mixed) is passed over, the rest folded.
    appendFileSync(join(dir, "conversations", `${conv.id}.jsonl`), '{"items":[{"id\n');
    here.add(conv.id, [item("msg_c")]);
    expect(there.find("o", conv.id)?.items.map((i) => i.id)).toEqual(["msg_b", "msg_c"]);
    // Deleted on one gateway: gone on the other too.
    here.delete(conv.id);
    expect(there.find("o", conv.id)).toBeUndefined();
  });

  it("ids it did not make name no file", () => {
    const logs = new FolderLogs(folder(), null);
    for (const id of ["../x", "conv_", "conv_zz", `resp_${"a".repeat(24)}`]) {
      expect(logs.read(id, 0)?.lines).toBeUndefined();
      expect(logs.append(id, "{}")).toBe(false);
      expect(logs.remove(id)).toBe(false);
    }
  });
});
