// The progress bars of `expertmesh up` without processes: the text of one bar or plain line
// for given states and widths, when plain lines are due, the line protocol children use,
// the board that draws them (terminal and plain), the children's reporter, whose byte
// totals are checked against a real tiny checkpoint, and the status line of `fetch` and
// `batch`.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it, vi } from "vitest";
import { denseLoadBytes, expertLoad, loadProgress, statusLine } from "../../src/cli/progress.ts";
import {
  type BarState,
  emptyBar,
  encodeProgress,
  formatBytes,
  formatElapsed,
  PROGRESS_PREFIX,
  parseProgressLine,
  plainLineDue,
  renderBar,
  renderPlain,
} from "../../src/local/progress.ts";
import { ProgressBoard } from "../../src/local/progress-board.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { isMoeLayer } from "../../src/model/config.ts";
import { writeTinyModel } from "../../src/model/tiny.ts";

const base = emptyBar("experts", "running");
const st = (s: Partial<BarState>): BarState => ({ ...base, ...s });

const KiB = 1024;
const running = st({ done: 4, total: 12, bytes: 48 * KiB, totalBytes: 144 * KiB, elapsedMs: 1234 });
const done = st({
  done: 12,
  total: 12,
  bytes: 144 * KiB,
  totalBytes: 144 * KiB,
  elapsedMs: 2500,
  finished: true,
  status: "done",
});
const failed = st({ ...running, status: "failed", reason: "exited (1)" });
const writing = st({
  unit: "bytes",
  done: 512,
  total: 2048,
  bytes: 512,
  totalBytes: 2048,
  elapsedMs: 100,
});
const layers = st({ unit: "layers", done: 1, total: 4, bytes: 1000, elapsedMs: 65_000 });

describe("renderBar", () => {
  const cases: [string, string, BarState, number, number, string][] = [
    ["waiting", "shard-0.0", st({ status: "waiting" }), 80, 9, "shard-0.0  waiting"],
    [
      "running, bar fills the room left",
      "shard-0.0",
      running,
      80,
      9,
      "shard-0.0  [#######---------------]  33%  4/12 experts  48.0 KiB/144.0 KiB  1.2s",
    ],
    [
      "cells rounded, percent floored",
      "shard-0.0",
      { ...running, done: 8, bytes: 96 * KiB },
      80,
      9,
      "shard-0.0  [###############-------]  66%  8/12 experts  96.0 KiB/144.0 KiB  1.2s",
    ],
    [
      "no room for a bar",
      "shard-0.0",
      running,
      60,
      9,
      "shard-0.0   33%  4/12 experts  48.0 KiB/144.0 KiB  1.2s",
    ],
    ["cut to the width", "shard-0.0", running, 40, 9, "shard-0.0   33%  4/12 experts  48.0 KiB~"],
    [
      "done, bar at most 30 cells",
      "shard-0.0",
      done,
      100,
      9,
      "shard-0.0  [##############################] 100%  12/12 experts  144.0 KiB  done in 2.5s",
    ],
    [
      "failed",
      "shard-0.0",
      failed,
      80,
      9,
      "shard-0.0  [#########-------------------]  33%  4/12 experts  failed: exited (1)",
    ],
    [
      "label padded to the widest",
      "gateway",
      st({ status: "waiting" }),
      80,
      9,
      "gateway    waiting",
    ],
    [
      "bytes as the unit",
      "tiny-v3 model",
      writing,
      60,
      0,
      "tiny-v3 model  [####-------------]  25%  512 B/2.0 KiB  0.1s",
    ],
  ];
  it.each(cases)("%s", (_what, label, state, width, labelWidth, want) => {
    const line = renderBar(label, state, width, labelWidth);
    expect(line).toBe(want);
    expect(line.length).toBeLessThanOrEqual(width);
  });
});

describe("renderPlain", () => {
  const cases: [string, string, BarState, string][] = [
    ["running", "shard-0.0", running, "shard-0.0: 33% (4/12 experts, 48.0 KiB/144.0 KiB, 1.2s)"],
    ["total bytes unknown", "gateway", layers, "gateway: 25% (1/4 layers, 1000 B, 1m05s)"],
    ["done", "shard-0.0", done, "shard-0.0: done (12/12 experts, 144.0 KiB) in 2.5s"],
    [
      "done, bytes as the unit",
      "tiny-v3 model",
      { ...writing, done: 2048, status: "done" },
      "tiny-v3 model: done (2.0 KiB) in 0.1s",
    ],
    ["failed", "shard-0.0", failed, "shard-0.0: failed at 33% (4/12 experts): exited (1)"],
    [
      "failed before any report",
      "gateway",
      st({ status: "failed", reason: "exited (SIGKILL)" }),
      "gateway: failed: exited (SIGKILL)",
    ],
    ["waiting", "shard-1.0", st({ status: "waiting" }), "shard-1.0: waiting"],
  ];
  it.each(cases)("%s", (_what, label, state, want) => {
    expect(renderPlain(label, state)).toBe(want);
  });
});

describe("plainLineDue", () => {
  const at = (pct: number, status: BarState["status"] = "running") =>
    st({ done: pct, total: 100, status });
  const cases: [string, { atMs: number; tenth: number }, BarState, number, boolean][] = [
    ["new step, under a second", { atMs: 0, tenth: 0 }, at(33), 500, false],
    ["new step, just under a second", { atMs: 0, tenth: 0 }, at(33), 999, false],
    ["new step, a second on", { atMs: 0, tenth: 0 }, at(33), 1000, true],
    ["same step", { atMs: 0, tenth: 0 }, at(5), 5000, false],
    ["same step, 10 s on", { atMs: 0, tenth: 0 }, at(5), 10_000, true],
    ["same step as the last line", { atMs: 0, tenth: 3 }, at(35), 2000, false],
    ["next step after the last line", { atMs: 0, tenth: 3 }, at(41), 2000, true],
    ["100% but not finished", { atMs: 0, tenth: 0 }, at(100), 5000, false],
    ["done", { atMs: 0, tenth: 0 }, at(100, "done"), 10, true],
    ["failed", { atMs: 0, tenth: 0 }, at(3, "failed"), 10, true],
    ["waiting", { atMs: 0, tenth: 0 }, at(0, "waiting"), 20_000, false],
  ];
  it.each(cases)("%s", (_what, last, state, now, want) => {
    expect(plainLineDue(last, state, now)).toBe(want);
  });
});

describe("formatting", () => {
  it.each([
    [0, "0 B"],
    [1023, "1023 B"],
    [1536, "1.5 KiB"],
    [12 * 2 ** 20, "12.0 MiB"],
    [1.25 * 2 ** 30, "1.25 GiB"],
  ])("formatBytes(%d) = %s", (n, want) => expect(formatBytes(n)).toBe(want));
  it.each([
    [400, "0.4s"],
    [12_000, "12.0s"],
    [185_000, "3m05s"],
    [3_720_000, "1h02m"],
  ])("formatElapsed(%d) = %s", (ms, want) => expect(formatElapsed(ms)).toBe(want));
});

describe("protocol lines", () => {
  const e = {
    unit: "experts",
    done: 3,
    total: 12,
    bytes: 10,
    totalBytes: 40,
    elapsedMs: 7,
    finished: false,
  };
  it("round-trips an event", () => {
    const line = encodeProgress(e);
    expect(line.startsWith(PROGRESS_PREFIX)).toBe(true);
    expect(line).not.toContain("\n");
    expect(parseProgressLine(line)).toEqual(e);
  });
  it.each([
    ["a log line", "2026-01-01T00:00:00.000Z shard 0/r0: loading experts 3/12"],
    ["not JSON", `${PROGRESS_PREFIX}{nope`],
    ["a field missing", `${PROGRESS_PREFIX}${JSON.stringify({ ...e, total: undefined })}`],
    ["a negative count", `${PROGRESS_PREFIX}${JSON.stringify({ ...e, done: -1 })}`],
    ["unit not a string", `${PROGRESS_PREFIX}${JSON.stringify({ ...e, unit: 3 })}`],
  ])("ignores %s", (_what, line) => expect(parseProgressLine(line)).toBeNull());
});

/** The board's cursor movements (ESC [ n F, ESC [ J), to read the text it draws. */
const CURSOR_MOVES = new RegExp(`${String.fromCharCode(27)}\\[\\d*[FJ]`, "g");

/** A stream that records what is written. */
function sink(tty: boolean, columns = 80, rows = 24) {
  const writes: string[] = [];
  return { writes, out: { isTTY: tty, columns, rows, write: (s: string) => writes.push(s) } };
}
const ev = (doneN: number, total: number, finished = false) => ({
  unit: "experts",
  done: doneN,
  total,
  bytes: doneN * 1024,
  totalBytes: total * 1024,
  finished,
});

describe("ProgressBoard, plain", () => {
  it("writes a line at new 10% steps at most once a second, and one at the end", () => {
    let now = 0;
    const { writes, out } = sink(false);
    const board = new ProgressBoard(out, { now: () => now });
    board.add("a");
    board.add("b");
    board.update("a", { ...ev(0, 10), elapsedMs: 0 });
    now = 1500;
    board.update("a", { ...ev(5, 10), elapsedMs: 1500 });
    now = 1600;
    board.update("a", { ...ev(6, 10), elapsedMs: 1600 }); // under a second since the last
    board.log("[a] hello");
    now = 2000;
    board.update("a", { ...ev(10, 10, true), elapsedMs: 2000 });
    now = 2100;
    board.fail("b", "exited (1)");
    board.fail("b", "again"); // ended: no second line
    expect(writes).toEqual([
      "[up] a: 50% (5/10 experts, 5.0 KiB/10.0 KiB, 1.5s)\n",
      "[a] hello\n",
      "[up] a: done (10/10 experts, 10.0 KiB) in 2.0s\n",
      "[up] b: failed: exited (1)\n",
    ]);
  });

  it("close() fails the bars still open", () => {
    const { writes, out } = sink(false);
    const board = new ProgressBoard(out, { now: () => 0 });
    board.update("a", { ...ev(3, 10), elapsedMs: 0 });
    board.close("stopped");
    expect(writes).toEqual(["[up] a: failed at 30% (3/10 experts): stopped\n"]);
  });
});

describe("ProgressBoard, terminal", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("redraws in place, throttled, keeps log lines above, and leaves the finished block", () => {
    vi.useFakeTimers({ now: 0 });
    const { writes, out } = sink(true, 71);
    const board = new ProgressBoard(out, { redrawMs: 100 });
    board.add("a");
    expect(writes).toEqual(["a  waiting\n"]);
    vi.advanceTimersByTime(10);
    board.update("a", { ...ev(1, 2), elapsedMs: 0 });
    board.update("a", { ...ev(1, 2), elapsedMs: 5 });
    expect(writes.length).toBe(1); // throttled: one redraw 100 ms after the last
    vi.advanceTimersByTime(90);
    expect(writes[1]).toBe(
      "\x1b[1F\x1b[Ja  [############------------]  50%  1/2 experts  1.0 KiB/2.0 KiB  0.1s\n",
    );
    board.log("[a] hello");
    expect(writes[2]).toBe(
      "\x1b[1F\x1b[J[a] hello\na  [############------------]  50%  1/2 experts  1.0 KiB/2.0 KiB  0.1s\n",
    );
    vi.advanceTimersByTime(50);
    board.update("a", { ...ev(2, 2, true), elapsedMs: 200 });
    expect(writes[3]).toBe(
      "\x1b[1F\x1b[Ja  [########################] 100%  2/2 experts  2.0 KiB  done in 0.2s\n",
    );
    // The block is finished: later lines go below it, nothing moves up any more.
    board.log("[up] next");
    vi.advanceTimersByTime(5000);
    expect(writes.slice(4)).toEqual(["[up] next\n"]);
  });

  it("draws a terminal that reports no size (0 x 0) as 80 x 24", () => {
    vi.useFakeTimers({ now: 0 });
    const { writes, out } = sink(true, 0, 0);
    const board = new ProgressBoard(out, { redrawMs: 100 });
    for (const name of ["shard-0", "shard-1", "shard-2", "shard-3", "gateway"]) board.add(name);
    board.update("shard-0", { ...ev(1, 2), elapsedMs: 0 });
    vi.advanceTimersByTime(100);
    const lines = writes.at(-1)!.replace(CURSOR_MOVES, "").trimEnd().split("\n");
    expect(lines.map((l) => l.split(" ")[0])).toEqual([
      "shard-0",
      "shard-1",
      "shard-2",
      "shard-3",
      "gateway",
    ]); // every bar, none summed up
    expect(lines[0]).toContain("1/2 experts  1.0 KiB/2.0 KiB"); // not cut at 20 columns
    expect(lines[0]!.length).toBeLessThanOrEqual(79);
  });

  it("shows open bars first and sums up the rest when they do not fit", () => {
    vi.useFakeTimers({ now: 0 });
    const { writes, out } = sink(true, 60, 5); // room for 3 lines
    const board = new ProgressBoard(out, { redrawMs: 0 });
    for (const l of ["s0", "s1", "s2", "s3"]) board.add(l);
    board.update("s0", { ...ev(1, 1, true), elapsedMs: 10 });
    board.update("s3", { ...ev(1, 4), elapsedMs: 10 });
    const last = writes.at(-1)!;
    const clear = "\x1b[3F\x1b[J"; // up over the 3 lines drawn before
    expect(last.startsWith(clear)).toBe(true);
    expect(last.slice(clear.length).split("\n")).toEqual([
      "s1  waiting",
      "s3  [###---------]  25%  1/4 experts  1.0 KiB/4.0 KiB  0.0s",
      "... 2 more: 1 done, 0 loading, 1 waiting, 0 failed",
      "",
    ]);
  });
});

describe("loadProgress (the children's side)", () => {
  it("reports protocol lines, at most every 100 ms but the first and the last", () => {
    let now = 0;
    let read = 500; // headers already read: not counted
    const lines: string[] = [];
    const human: string[] = [];
    const p = loadProgress({
      unit: "experts",
      total: 4,
      totalBytes: 400,
      bytesRead: () => read,
      human: (d, t) => human.push(`${d}/${t}`),
      machine: true,
      write: (l) => lines.push(l),
      now: () => now,
    });
    now = 50;
    read = 600;
    p.update(1);
    now = 150;
    read = 700;
    p.update(2);
    now = 160;
    read = 900;
    p.update(4);
    now = 170;
    p.finish();
    const events = lines.map(parseProgressLine);
    // [done, bytes, elapsedMs, finished] of 4 experts, 400 bytes in all.
    const want: [number, number, number, boolean][] = [
      [0, 0, 0, false],
      [2, 200, 150, false],
      [4, 400, 160, false],
      [4, 400, 170, true],
    ];
    expect(events).toEqual(
      want.map(([done, bytes, elapsedMs, finished]) => ({
        unit: "experts",
        done,
        total: 4,
        bytes,
        totalBytes: 400,
        elapsedMs,
        finished,
      })),
    );
    expect(human).toEqual([]);
  });

  it("keeps the human log lines when not run by `up`", () => {
    const lines: string[] = [];
    const human: string[] = [];
    const p = loadProgress({
      unit: "layers",
      total: 3,
      totalBytes: 0,
      bytesRead: () => 0,
      human: (d, t) => human.push(`${d}/${t}`),
      machine: false,
      write: (l) => lines.push(l),
    });
    p.update(1);
    p.update(2, 2);
    p.finish();
    expect(human).toEqual(["1/3", "2/2"]);
    expect(lines).toEqual([]);
  });

  it("sizes a tiny checkpoint's loads: the shards' experts plus the gateway's rest are every tensor", async () => {
    const dir = mkdtempSync(join(tmpdir(), "expertmesh-progress-"));
    const summary = await writeTinyModel(dir, { arch: "v3", seed: 0 });
    const ckpt = await Checkpoint.open(dir);
    const c = ckpt.config;
    const moeLayers = Array.from({ length: c.numHiddenLayers }, (_, i) => i).filter((i) =>
      isMoeLayer(c, i),
    ).length;
    const all = expertLoad(ckpt, () => true);
    expect(all.experts).toBe(moeLayers * c.nRoutedExperts);
    // Four shards by expert id modulo 4: together exactly all experts.
    const parts = [0, 1, 2, 3].map((k) => expertLoad(ckpt, (_l, e) => e % 4 === k));
    expect(parts.reduce((n, p) => n + p.experts, 0)).toBe(all.experts);
    expect(parts.reduce((n, p) => n + p.bytes, 0)).toBe(all.bytes);
    const gateway = denseLoadBytes(ckpt, false);
    expect(gateway).toBeGreaterThan(0);
    expect(gateway + all.bytes).toBe(denseLoadBytes(ckpt, true));
    expect(denseLoadBytes(ckpt, true)).toBe(summary.tensorBytes);
  });
});

describe("statusLine (fetch, batch)", () => {
  // [what, tty, updates at (ms, text), end text, written]
  it.each<[string, boolean, [number, string][], string | undefined, string[]]>([
    [
      "a terminal: rewritten at most every 200 ms, the end replaces it",
      true,
      [
        [0, "a"],
        [100, "b"],
        [250, "c"],
      ],
      "done",
      ["\r\x1b[Ka", "\r\x1b[Kc", "\r\x1b[Kdone\n"],
    ],
    [
      "a terminal, no end text: the line shown stays",
      true,
      [[0, "a"]],
      undefined,
      ["\r\x1b[Ka", "\n"],
    ],
    ["a terminal, nothing shown, no end text: nothing", true, [], undefined, []],
    [
      "a log: a line every 10 s, the end once more when it changed",
      false,
      [
        [0, "a"],
        [5000, "b"],
        [10_000, "c"],
      ],
      "done",
      ["a\n", "c\n", "done\n"],
    ],
    ["a log: the end not repeated", false, [[0, "a"]], "a", ["a\n"]],
  ])("%s", (_, tty, updates, end, written) => {
    const out: string[] = [];
    let t = 0;
    const line = statusLine({ tty, write: (s) => out.push(s), now: () => t });
    for (const [at, text] of updates) {
      t = at;
      line.update(() => text);
    }
    line.end(end);
    expect(out).toEqual(written);
  });

  it("counts seconds from its making", () => {
    let t = 1000;
    const line = statusLine({ tty: false, write: () => {}, now: () => t });
    t = 3500;
    expect(line.seconds()).toBe(2.5);
  });
});
