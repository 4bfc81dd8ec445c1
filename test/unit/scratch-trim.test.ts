// ScratchTrimmer (src/engine/scratch-trim.ts): the native scratch caches are freed once, after
// the quiet time since the last work, and not again until more work ran; and the addon's
// trimScratch really frees what a long call left cached.
import { afterEach, describe, expect, it } from "vitest";
import { loadAddon } from "../../src/engine/native.ts";
import { ScratchTrimmer, scratchTrimAfterMs } from "../../src/engine/scratch-trim.ts";

const trimmers: ScratchTrimmer[] = [];
afterEach(() => {
  for (const t of trimmers.splice(0)) t.close();
});

type Event = ["touch" | "check", number, number?];

describe("ScratchTrimmer", () => {
  it.each<[string, number, Event[]]>([
    // [what, afterMs, events: [kind, time, trims so far after it]]
    ["nothing ran: nothing to trim", 25, [["check", 100, 0]]],
    [
      "one trim after the quiet time, none again while quiet",
      25,
      [
        ["touch", 0],
        ["check", 10, 0],
        ["check", 24, 0],
        ["check", 25, 1],
        ["check", 60, 1],
        ["check", 1000, 1],
      ],
    ],
    [
      "work restarts the wait",
      25,
      [
        ["touch", 0],
        ["touch", 20],
        ["check", 30, 0],
        ["check", 45, 1],
        ["touch", 70],
        ["check", 90, 1],
        ["check", 96, 2],
      ],
    ],
  ])("%s", (_what, afterMs, events) => {
    let calls = 0;
    const t = new ScratchTrimmer(() => ++calls * 1000, afterMs);
    trimmers.push(t);
    for (const [kind, at, want] of events) {
      if (kind === "touch") t.touch(at);
      else t.check(at);
      if (want !== undefined) expect(t.trims, `${kind} at ${at}`).toBe(want);
    }
    expect(calls).toBe(t.trims);
    expect(t.freedBytes).toBe((t.trims * (t.trims + 1) * 1000) / 2);
  });

  it("reads EM_SCRATCH_TRIM_MS, and refuses what is not a duration", () => {
    expect(scratchTrimAfterMs({})).toBe(30_000);
    expect(scratchTrimAfterMs({ EM_SCRATCH_TRIM_MS: "0" })).toBe(0);
    expect(scratchTrimAfterMs({ EM_SCRATCH_TRIM_MS: "1500" })).toBe(1500);
    for (const bad of ["-1", "1.5", "soon"])
      expect(() => scratchTrimAfterMs({ EM_SCRATCH_TRIM_MS: bad })).toThrow(
        /EM_SCRATCH_TRIM_MS must be a whole number/,
      );
  });

  it("frees what the native engine cached (the addon's trimScratch)", () => {
    const addon = loadAddon();
    // One expert's FFN over 600 rows of 256: its hidden activations (600 x 512 floats,
    // 1.2 MiB) go to the calling thread's cache, on every ISA.
    const rows = 600;
    const dim = 256;
    const inter = 512;
    const up = { dtype: "bf16" as const, shape: [inter, dim], data: new Uint16Array(inter * dim) };
    const down = {
      dtype: "bf16" as const,
      shape: [dim, inter],
      data: new Uint16Array(inter * dim),
    };
    addon.moeFfn({
      x: new Float32Array(rows * dim),
      dim,
      expertOffsets: new Int32Array([0, rows]),
      w1: [up],
      w2: [down],
      w3: [up],
    });
    expect(addon.scratchBytes()).toBeGreaterThan(0);
    const before = addon.scratchBytes();
    expect(addon.trimScratch()).toBe(before);
    expect(addon.scratchBytes()).toBe(0);
  });
});
