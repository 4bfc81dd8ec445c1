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
      ]);
  });
});
