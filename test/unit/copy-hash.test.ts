// The copy of a redundant expert a batch-invariant gateway sends a token to (copyHash,
// src/moe/dispatcher.ts): fixed by the token's own activations, wherever it sits in the step,
// and spread over the copies about evenly.
import { describe, expect, it } from "vitest";
import { copyHash } from "../../src/moe/dispatcher.ts";

/** n rows of dim pseudo-random floats (a fixed LCG), as a step's x. */
function rows(n: number, dim: number, seed: number): Float32Array {
  const x = new Float32Array(n * dim);
  let s = seed >>> 0;
  for (let i = 0; i < x.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    x[i] = s / 2 ** 32 - 0.5;
  }
  return x;
}

const bitsOf = (x: Float32Array) => new Uint32Array(x.buffer, x.byteOffset, x.length);

describe("copyHash", () => {
  it.each([
    [16, 1],
    [64, 7],
    [7168, 3],
  ])("a token's hash is the same at any place in the step (dim %i, seed %i)", (dim, seed) => {
    const step = rows(12, dim, seed);
    const bits = bitsOf(step);
    for (let tok = 0; tok < 12; tok++) {
      const alone = bitsOf(step.slice(tok * dim, (tok + 1) * dim));
      expect(copyHash(bits, tok * dim, dim)).toBe(copyHash(alone, 0, dim));
      // Placed elsewhere in another step.
      const other = rows(5, dim, seed + 100);
      other.set(step.subarray(tok * dim, (tok + 1) * dim), 3 * dim);
      expect(copyHash(bitsOf(other), 3 * dim, dim)).toBe(copyHash(alone, 0, dim));
    }
  });

  it.each([2, 3, 4, 8])("spreads tokens over %i copies about evenly", (copies) => {
    const dim = 64;
    const n = 4000;
    const bits = bitsOf(rows(n, dim, 42));
    const counts = new Array<number>(copies).fill(0);
    for (let tok = 0; tok < n; tok++) {
      const h = copyHash(bits, tok * dim, dim);
      expect(h).toBeGreaterThanOrEqual(0);
      counts[h % copies]!++;
    }
    for (const c of counts) expect(Math.abs(c - n / copies)).toBeLessThan(0.15 * (n / copies));
  });
});
