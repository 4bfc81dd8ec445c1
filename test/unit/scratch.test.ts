// The forward pass's scratch arrays (src/engine/scratch.ts): power-of-two buckets, reuse
// after release in stack order, the size caps, and the sweep of buckets out of use.
import { describe, expect, it } from "vitest";
import { bucketOf, Scratch } from "../../src/engine/scratch.ts";

describe("bucketOf", () => {
  it.each([
    [0, 16],
    [1, 16],
    [16, 16],
    [17, 32],
    [1000, 1024],
    [1024, 1024],
    [1025, 2048],
    [32 * 1024, 32 * 1024],
    [32 * 1024 + 1, 64 * 1024],
  ])("%i floats -> %i", (n, cap) => {
    expect(bucketOf(n)).toBe(cap);
  });
});

describe("Scratch", () => {
  it("hands out n floats and the same memory again after release", () => {
    const s = new Scratch();
    const a = s.take(1000);
    expect(a.length).toBe(1000);
    a.fill(7);
    const b = s.take(1000);
    expect(b.buffer).not.toBe(a.buffer); // a is still out
    s.release(0);
    const c = s.take(900); // the same bucket: a's or b's memory, as it was left
    expect([a.buffer, b.buffer]).toContain(c.buffer);
    expect(c.length).toBe(900);
    expect(s.keptFloats).toBe(2048);
  });

  it("in the test suite (EM_SCRATCH_POISON=1, vitest's config): every array handed out is NaN", () => {
    expect(process.env["EM_SCRATCH_POISON"]).toBe("1");
    const s = new Scratch();
    s.take(100).fill(7);
    s.release(0);
    for (const n of [100, 16, (1 << 22) + 1])
      expect(s.take(n).every(Number.isNaN), `${n}`).toBe(true);
  });

  it("releases in stack order: arrays taken before the mark stay out", () => {
    const s = new Scratch();
    const step = s.take(64);
    const mark = s.mark();
    const layer = s.take(64);
    s.release(mark);
    const again = s.take(64);
    expect(again.buffer).toBe(layer.buffer);
    expect(again.buffer).not.toBe(step.buffer);
    s.release(0);
    const both = [s.take(64).buffer, s.take(64).buffer];
    expect(both).toContain(step.buffer);
    expect(both).toContain(layer.buffer);
    expect(s.keptFloats).toBe(128);
  });

  it("allocates fresh (and keeps nothing) above 16 MiB per array", () => {
    const s = new Scratch();
    const big = s.take((1 << 22) + 1);
    expect(big.length).toBe((1 << 22) + 1);
    expect(s.keptFloats).toBe(0);
    const atCap = s.take(1 << 22);
    expect(s.keptFloats).toBe(1 << 22);
    s.release(0);
    expect(s.take(1 << 22).buffer).toBe(atCap.buffer);
  });

  it("keeps at most 256 MiB; past it, fresh arrays", () => {
    const s = new Scratch();
    for (let i = 0; i < 16; i++) s.take(1 << 22);
    expect(s.keptFloats).toBe(1 << 26);
    const over = s.take(1 << 20);
    expect(over.length).toBe(1 << 20);
    expect(s.keptFloats).toBe(1 << 26);
    s.release(0);
    expect(s.keptFloats).toBe(1 << 26);
  });

  it("drops the buckets no step took from since the last sweep", () => {
    const s = new Scratch();
    s.take(5000); // a bucket of 8192, used once (a long prompt's step)
    s.release(0);
    expect(s.keptFloats).toBe(8192);
    // Decode steps: 64 floats each, 512 releases per sweep.
    for (let i = 0; i < 512; i++) {
      s.take(64);
      s.release(0);
    }
    // The first sweep saw both buckets in use since the start; the second drops 8192.
    expect(s.keptFloats).toBe(8192 + 64);
    for (let i = 0; i < 512; i++) {
      s.take(64);
      s.release(0);
    }
    expect(s.keptFloats).toBe(64);
  });
});
