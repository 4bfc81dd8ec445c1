// A background response's events (src/gateway/response-events.ts): the log its gateway
// writes and follows, the file the other gateways follow, and how each stream ends.
import { getEventListeners } from "node:events";
import {
  appendFileSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  EventFile,
  EventLog,
  FLUSH_MS,
  followFile,
  isTerminal,
  sseOf,
  terminalType,
} from "../../src/gateway/response-events.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function all(g: AsyncGenerator<string>): Promise<string[]> {
  const out: string[] = [];
  for await (const l of g) out.push(l);
  return out;
}

const seq = (lines: string[]) =>
  lines.map((l) => (JSON.parse(l) as { sequence_number: number }).sequence_number);
const types = (lines: string[]) => lines.map((l) => (JSON.parse(l) as { type: string }).type);

describe("terminalType, isTerminal, sseOf", () => {
  it.each([
    ["completed", "response.completed"],
    ["incomplete", "response.incomplete"],
    ["cancelled", "response.incomplete"],
    ["failed", "response.failed"],
  ])("a response %s ends with %s", (status, type) => {
    expect(terminalType({ status })).toBe(type);
    expect(isTerminal(JSON.stringify({ type, sequence_number: 3 }))).toBe(true);
  });

  it.each(["response.created", "response.in_progress", "response.output_text.delta", "error"])(
    "%s does not end a stream",
    (type) => {
      expect(isTerminal(JSON.stringify({ type, sequence_number: 0 }))).toBe(false);
    },
  );

  it("an event goes out as a server-sent event named by its type", () => {
    const line = JSON.stringify({ type: "response.output_text.delta", sequence_number: 4 });
    expect(sseOf(line)).toBe(`event: response.output_text.delta\ndata: ${line}\n\n`);
  });
});

describe("EventLog", () => {
  it("numbers its events; a reader gets those written, then each as it comes, until the end", async () => {
    const log = new EventLog();
    log.append("response.created", { response: { id: "r" } });
    log.append("response.in_progress", {});
    const reading = all(log.follow(-1));
    const late = all(log.follow(1)); // (after the second: nothing yet)
    await sleep(5);
    log.append("response.output_text.delta", { delta: "hé" });
    log.append("response.completed", {});
    log.end();
    log.append("response.output_text.delta", { delta: "after the end" }); // (dropped)
    const got = await reading;
    expect(seq(got)).toEqual([0, 1, 2, 3]);
    expect(types(got)).toEqual([
      "response.created",
      "response.in_progress",
      "response.output_text.delta",
      "response.completed",
    ]);
    expect(seq(await late)).toEqual([2, 3]);
    expect(seq(await all(log.follow(10)))).toEqual([]); // (past its end: nothing, at once)
    expect(log.chars).toBe(got.join("").length);
  });

  it("a reader whose client left stops; the log runs on", async () => {
    const log = new EventLog();
    log.append("response.created", {});
    const left = new AbortController();
    const reading = all(log.follow(-1, left.signal));
    await sleep(5);
    left.abort();
    expect(seq(await reading)).toEqual([0]);
    log.append("response.in_progress", {});
    expect(seq(await all(log.follow(-1, AbortSignal.abort())))).toEqual([0, 1]);
  });

  it("a reader waiting for each of many events holds one listener on its signal, not one per event", async () => {
    const log = new EventLog();
    const left = new AbortController();
    const reading = all(log.follow(-1, left.signal));
    for (let i = 0; i < 50; i++) {
      await sleep(0);
      log.append("response.output_text.delta", { delta: String(i) });
    }
    await sleep(0);
    expect(getEventListeners(left.signal, "abort").length).toBeLessThanOrEqual(1);
    log.end();
    expect(await reading).toHaveLength(50);
  });

  it("passes its events to its sink; end closes it, a discarding end drops what is pending", () => {
    const calls: string[] = [];
    const sink = {
      write: (l: string) => calls.push(`write ${JSON.parse(l).type}`),
      close: () => calls.push("close"),
      discard: () => calls.push("discard"),
    };
    const a = new EventLog(sink);
    a.append("response.created", {});
    a.end();
    const b = new EventLog(sink);
    b.end(true);
    b.end();
    expect(calls).toEqual(["write response.created", "close", "discard"]);
  });
});

describe("EventFile", () => {
  it("is there at once; appends FLUSH_MS apart; close writes what is pending; discard nothing more", async () => {
    const dir = mkdtempSync(join(tmpdir(), "em-events-"));
    const path = join(dir, "r.events");
    let grew = 0;
    const quota = { grew: (n: number) => (grew += n) } as never;
    const f = new EventFile(path, quota);
    expect(readFileSync(path, "utf8")).toBe("");
    f.write('{"type":"a"}');
    f.write('{"type":"b"}');
    expect(readFileSync(path, "utf8")).toBe(""); // (not yet)
    await sleep(FLUSH_MS * 3);
    expect(readFileSync(path, "utf8")).toBe('{"type":"a"}\n{"type":"b"}\n');
    f.write('{"type":"c"}');
    f.close();
    f.write('{"type":"d"}');
    await sleep(FLUSH_MS * 2);
    expect(readFileSync(path, "utf8")).toBe('{"type":"a"}\n{"type":"b"}\n{"type":"c"}\n');
    expect(grew).toBe(39);
    const g = new EventFile(join(dir, "s.events"), null);
    g.write('{"type":"a"}');
    g.discard();
    await sleep(FLUSH_MS * 2);
    expect(readFileSync(join(dir, "s.events"), "utf8")).toBe("");
  });

  it("a file removed meanwhile (its response deleted elsewhere) is not made again", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "em-events-")), "r.events");
    let grew = 0;
    const f = new EventFile(path, { grew: (n: number) => (grew += n) } as never);
    f.write('{"type":"a"}');
    rmSync(path);
    await sleep(FLUSH_MS * 3);
    f.write('{"type":"b"}');
    f.close();
    expect([existsSync(path), grew]).toEqual([false, 0]);
  });

  it("a folder that cannot be written leaves it closed, without throwing", () => {
    const f = new EventFile(join(tmpdir(), "no-such-folder-em", "x", "r.events"), null);
    f.write("{}");
    f.close();
  });
});

describe("followFile", () => {
  const line = (type: string, n: number, body: object = {}) =>
    `${JSON.stringify({ type, sequence_number: n, ...body })}\n`;

  it("follows a file as it is written (a line and a character split across writes) to its last event", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "em-follow-")), "r.events");
    writeFileSync(path, line("response.created", 0) + line("response.in_progress", 1));
    const reading = all(followFile(path, -1, () => null));
    await sleep(150);
    const delta = Buffer.from(line("response.output_text.delta", 2, { delta: "é€" }));
    appendFileSync(path, delta.subarray(0, delta.length - 4)); // (mid-character)
    await sleep(150);
    appendFileSync(path, delta.subarray(delta.length - 4));
    appendFileSync(path, line("response.completed", 3));
    appendFileSync(path, line("response.output_text.delta", 4)); // (past the last: not read)
    const got = await reading;
    expect(seq(got)).toEqual([0, 1, 2, 3]);
    expect(JSON.parse(got[2]!).delta).toBe("é€");
    expect(seq(await all(followFile(path, 1, () => null)))).toEqual([2, 3]);
  });

  it("a file that ends without its last event (the gateway stopped) ends with the response as kept", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "em-follow-")), "r.events");
    writeFileSync(path, line("response.created", 0) + line("response.in_progress", 1));
    let kept: object | null = null;
    const reading = all(followFile(path, 0, () => kept));
    await sleep(250);
    kept = { id: "r", status: "failed", error: { code: "EM_GATEWAY_RESPONSE_LOST" } };
    const got = await reading;
    expect(seq(got)).toEqual([1, 2]);
    expect(JSON.parse(got[1]!)).toEqual({
      type: "response.failed",
      sequence_number: 2,
      response: kept,
    });
    // A cancelled one ends as incomplete; a reader past the end gets nothing.
    const cancelled = { id: "r", status: "cancelled" };
    expect(types(await all(followFile(path, -1, () => cancelled))).at(-1)).toBe(
      "response.incomplete",
    );
    expect(await all(followFile(path, 5, () => cancelled))).toEqual([]);
  });

  it("stops when its client leaves", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "em-follow-")), "r.events");
    writeFileSync(path, line("response.created", 0));
    const left = new AbortController();
    const reading = all(followFile(path, -1, () => null, left.signal));
    await sleep(150);
    left.abort();
    expect(seq(await reading)).toEqual([0]);
  });
});
