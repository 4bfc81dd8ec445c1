// The data plane's buffer pool (src/util/buffer-pool.ts): reuse after give, best fit,
// offset-0 views, bounded free list.
import { describe, expect, it } from "vitest";
import { BufferPool } from "../../src/util/buffer-pool.ts";

describe("BufferPool", () => {
  it("gives n bytes at offset 0 and reuses a buffer once it is given back", () => {
    const pool = new BufferPool();
    const a = pool.bytes(1000);
    expect(a.length).toBe(1000);
    expect(a.byteOffset).toBe(0);
    expect(a.buffer.byteLength).toBeGreaterThanOrEqual(1000);
    const b = pool.bytes(1000);
    expect(b.buffer).not.toBe(a.buffer); // a is still out
    pool.give(a);
    pool.give(a); // twice is once
    expect(pool.free).toBe(1);
    const c = pool.bytes(1100); // within the headroom of a's buffer
    expect(c.buffer).toBe(a.buffer);
    expect(c.length).toBe(1100);
    expect(pool.free).toBe(0);
  });

  it("takes the best fit and leaves a much larger buffer for a larger request", () => {
    const pool = new BufferPool();
    const big = pool.bytes(1 << 20);
    const mid = pool.bytes(1 << 16);
    pool.give(big);
    pool.give(mid);
    expect(pool.bytes(60_000).buffer).toBe(mid.buffer);
    const small = pool.bytes(100);
    expect(small.buffer).not.toBe(big.buffer);
    expect(pool.bytes(1 << 20).buffer).toBe(big.buffer);
  });

  it("hands out float32 views and keeps at most maxFree buffers", () => {
    const pool = new BufferPool(2);
    const xs = [pool.f32(10), pool.f32(10), pool.f32(10)];
    for (const x of xs) {
      expect(x.length).toBe(10);
      expect(x.byteOffset).toBe(0);
      pool.give(x);
    }
    expect(pool.free).toBe(2);
    const y = pool.f32(10);
    expect([xs[1]!.buffer, xs[2]!.buffer]).toContain(y.buffer);
  });
});
