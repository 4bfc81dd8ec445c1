import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { Startup } from "../../src/cli/startup.ts";

const GiB = 2 ** 30;

describe("Startup", () => {
  it.each([
    { bytes: null, done: 0, total: 61, phase: "loading layers 0/61" },
    {
      bytes: [0.2 * GiB, GiB],
      done: 3,
      total: 16,
      phase: "loading layers 3/16 (0.20 of 1.00 GiB)",
    },
    {
      bytes: [12.5 * GiB, 40 * GiB],
      done: 40,
      total: 128,
      phase: "loading layers 40/128 (12.5 of 40.0 GiB)",
    },
    // The total was not known (0 bytes): no byte figures rather than "of 0.00".
    { bytes: [5, 0], done: 1, total: 2, phase: "loading layers 1/2" },
  ] as const)("loading $done/$total with bytes $bytes: $phase", ({ bytes, done, total, phase }) => {
    const s = new Startup({ role: "gateway", registry: new Registry() });
    if (bytes) s.bytes(() => bytes[0], bytes[1]);
    s.loading("layers", done, total);
    expect(s.phase).toBe(phase);
    expect(s.done).toBe(false);
  });

  it("steps, then serving; the gauges follow, in every registry it was given", async () => {
    const first = new Registry();
    let read = 100;
    let now = 1_000;
    const s = new Startup({ role: "shard", registry: first, now: () => now });
    const gauges = async (r: Registry) =>
      (await r.getMetricsAsJSON()).map((m) => [m.name, m.values[0]?.value, m.values[0]?.labels]);
    expect(s.phase).toBe("starting");
    expect(await gauges(first)).toEqual([
      ["expertmesh_startup_complete", 0, { role: "shard" }],
      ["expertmesh_load_read_bytes", 0, { role: "shard" }],
      ["expertmesh_load_size_bytes", 0, { role: "shard" }],
    ]);
    s.bytes(() => read, 400);
    read = 250;
    s.weights("0123456789abcdef");
    s.step("connecting to NATS at nats://x:4222");
    expect(s.phase).toBe("connecting to NATS at nats://x:4222");
    const second = new Registry();
    s.register(second);
    now = 3_500;
    s.finish();
    expect([s.done, s.phase, s.elapsedSeconds]).toEqual([true, "serving", 2.5]);
    for (const r of [first, second])
      expect(await gauges(r)).toEqual([
        ["expertmesh_startup_complete", 1, { role: "shard" }],
        ["expertmesh_load_read_bytes", 250, { role: "shard" }],
        ["expertmesh_load_size_bytes", 400, { role: "shard" }],
        ["expertmesh_weights_info", 1, { role: "shard", digest: "0123456789abcdef" }],
      ]);
  });
});

describe("Startup.stalled", () => {
  // Each row: checks at these times (s), with the bytes read and the step at each; what
  // stalled(60) says at the last one.
  // biome-ignore format: a table
  it.each([
    { name: "bytes keep coming", at: [[0, 0, "l"], [50, 10, "l"], [100, 20, "l"], [150, 30, "l"]], stalled: null },
    { name: "no byte for 60 s", at: [[0, 0, "l"], [30, 10, "l"], [90, 10, "l"]], stalled: "no progress for 60 s while loading layers 1/4" },
    { name: "59 s is not yet", at: [[0, 0, "l"], [59, 0, "l"]], stalled: null },
    { name: "a step taken counts as progress", at: [[0, 0, "l"], [50, 0, "l2"], [100, 0, "l2"]], stalled: null },
    { name: "opening the checkpoint counts", at: [[0, 0, "o"], [61, 0, "o"]], stalled: "no progress for 61 s while opening the checkpoint: file 1/3" },
    { name: "so does starting", at: [[0, 0, "s"], [60, 0, "s"]], stalled: "no progress for 60 s while starting" },
    { name: "waiting for NATS is --nats-wait's", at: [[0, 0, "n"], [500, 0, "n"]], stalled: null },
    { name: "serving is never stalled", at: [[0, 0, "l"], [500, 0, "done"]], stalled: null },
  ] as const)("$name", ({ at, stalled }) => {
    let now = 0;
    let read = 0;
    const s = new Startup({ role: "gateway", registry: new Registry(), now: () => now });
    s.bytes(() => read, 1000);
    let last: string | null = null;
    for (const [t, bytes, step] of at) {
      now = t * 1000;
      read = bytes;
      if (step === "l") s.loading("layers", 1, 4);
      else if (step === "l2") s.loading("layers", 2, 4);
      else if (step === "o") s.opening(1, 3);
      else if (step === "n") s.step("connecting to NATS at nats://x:4222");
      else if (step === "done") s.finish();
      last = s.stalled(60);
    }
    if (stalled === null) expect(last).toBeNull();
    else expect(last).toMatch(new RegExp(`^${stalled.replace(/[()]/g, "\\$&")}`));
  });

  it("watchStalls calls back once on a real timer, and not at all with 0", async () => {
    const s = new Startup({ role: "shard", registry: new Registry() });
    s.loading("experts", 0, 2);
    const calls: string[] = [];
    s.watchStalls(0, (m) => calls.push(m));
    s.watchStalls(0.3, (m) => calls.push(m));
    await new Promise((r) => setTimeout(r, 900));
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatch(/^no progress for 0\.\d s while loading experts 0\/2/);
  });
});
